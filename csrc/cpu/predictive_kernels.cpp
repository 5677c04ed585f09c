// CPU kernel of predictive_score: the per-entry score of the predictive compressor, a small MLP
// (F = H + 2 features, `hidden` ReLU units, one output) over the accumulator a = residual + grad
// and the H previous gradients of the history ring (contract: python/gradsieve/ops.py).
//
//   pass 1  read grad and residual: s = sum |a| / n, in double over fixed chunks of kChunk entries
//           (8 interleaved lanes each), the chunk partials added in chunk order, so the sum does
//           not depend on the number of threads; s = 1 when n == 0 or s rounds to 0 in float32
//   pass 2  read grad, residual and the H history vectors; write the accumulator a and the score,
//           one tile of kTile entries at a time: the F features of the tile into a buffer on the
//           stack, then the hidden units one by one over the whole tile (loops the compiler
//           vectorises), then the score
// so: grad 2 reads, residual 2 reads, each history vector 1 read, accumulator and score 1 write.
// The weights (hidden * (H + 4) + 1 floats) stay in cache. Every float operation of an entry is
// done in the order of the contract and rounded on its own (the build uses -ffp-contract=off), as
// in the CUDA kernel (csrc/cuda/predictive.cu); the two differ only by the last bits of log1pf and
// expf. A NaN or infinite input never stops the kernel: it yields NaN or infinite scores.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops/validation.h"

namespace gradsieve {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;  // entries per partial sum of pass 1
constexpr int64_t kTile = 256;                 // entries per tile of pass 2
constexpr int64_t kLanes = 8;  // kChunk is a multiple: entry i always adds into lane i % kLanes
constexpr int64_t kMaxFeatures = kPredictiveMaxHistory + 2;

// sgn with sgn(0) = sgn(-0) = sgn(NaN) = 0.
inline float sign_of(float v) { return static_cast<float>((v > 0.0f) - (v < 0.0f)); }

// Pass 1: s = sum |residual + grad| / n as used by pass 2 (float32), 1 when n == 0 or s == 0.
float mean_magnitude(const float* g, const float* r, int64_t n) {
  if (n == 0) return 1.0f;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      double lane[kLanes] = {};
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          lane[l] += std::fabs(static_cast<double>(r[i + l] + g[i + l]));
        }
      }
      for (; i < end; ++i) lane[i % kLanes] += std::fabs(static_cast<double>(r[i] + g[i]));
      double sum = 0.0;
      for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
      partial[static_cast<size_t>(c)] = sum;
    }
  });
  double total = 0.0;
  for (const double p : partial) total += p;
  const float s = static_cast<float>(total / static_cast<double>(n));
  return s == 0.0f ? 1.0f : s;  // NaN and inf are kept: the scores show them
}

// Pass 2. h[j] is h_j (j = 0 the newest), already in ring order.
template <typename T>
void score_entries(const float* g, const float* r, const std::vector<const T*>& h,
                   const float* weights, int64_t hidden, bool product, float s, int64_t n,
                   float* acc, float* score) {
  const int64_t H = static_cast<int64_t>(h.size());
  const int64_t F = H + 2;
  const float* w1 = weights;            // [hidden, F]
  const float* b1 = w1 + hidden * F;    // [hidden]
  const float* w2 = b1 + hidden;        // [hidden]
  const float b2 = w2[hidden];
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, kChunk / kTile, [&](int64_t t0, int64_t t1) {
    float x[kMaxFeatures][kTile];
    float sa[kTile], mag[kTile], pre[kTile], logit[kTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t base = t * kTile;
      const int64_t m = std::min(kTile, n - base);
      for (int64_t i = 0; i < m; ++i) {
        const float gi = g[base + i];
        const float a = r[base + i] + gi;
        acc[base + i] = a;
        mag[i] = std::fabs(a);
        sa[i] = sign_of(a);
        x[0][i] = std::log1p(mag[i] / s);
        x[1][i] = std::log1p(std::fabs(gi) / s);
      }
      for (int64_t j = 0; j < H; ++j) {
        const T* hj = h[static_cast<size_t>(j)] + base;
        for (int64_t i = 0; i < m; ++i) {
          const float v = static_cast<float>(hj[i]);
          x[2 + j][i] = sa[i] * sign_of(v) * std::log1p(std::fabs(v) / s);
        }
      }
      for (int64_t i = 0; i < m; ++i) logit[i] = b2;
      for (int64_t u = 0; u < hidden; ++u) {
        const float* wu = w1 + u * F;
        for (int64_t i = 0; i < m; ++i) pre[i] = b1[u];
        for (int64_t f = 0; f < F; ++f) {
          const float wf = wu[f];
          for (int64_t i = 0; i < m; ++i) pre[i] += wf * x[f][i];
        }
        const float w2u = w2[u];
        for (int64_t i = 0; i < m; ++i) {
          const float z = pre[i] < 0.0f ? 0.0f : pre[i];  // ReLU that keeps a NaN
          logit[i] += w2u * z;
        }
      }
      float* out = score + base;
      if (product) {
        for (int64_t i = 0; i < m; ++i) out[i] = 1.0f / (1.0f + std::exp(-logit[i])) * mag[i];
      } else {
        for (int64_t i = 0; i < m; ++i) {
          out[i] = logit[i] > 20.0f ? logit[i] : std::log1p(std::exp(logit[i]));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> predictive_score_cpu(
    const at::Tensor& grad_in, const at::Tensor& residual_in, at::TensorList history_in,
    int64_t newest, const at::Tensor& weights_in, int64_t hidden, bool product) {
  check_predictive_score(grad_in, residual_in, history_in, newest, weights_in, hidden);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const int64_t H = static_cast<int64_t>(history_in.size());
  std::vector<at::Tensor> history;  // h_j = history[(newest - j) mod H], newest first
  history.reserve(static_cast<size_t>(H));
  for (int64_t j = 0; j < H; ++j) history.push_back(history_in[(newest - j + H) % H].contiguous());
  const int64_t n = grad.numel();
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor accumulator = at::empty({n}, f32);
  at::Tensor score = at::empty({n}, f32);
  at::Tensor scale = at::empty({}, f32);

  const float* g = grad.data_ptr<float>();
  const float* r = residual.data_ptr<float>();
  const float s = mean_magnitude(g, r, n);
  *scale.data_ptr<float>() = s;
  const float* w = weights.data_ptr<float>();
  float* acc = accumulator.data_ptr<float>();
  float* out = score.data_ptr<float>();
  if (history[0].scalar_type() == at::kBFloat16) {
    std::vector<const c10::BFloat16*> h;
    for (const at::Tensor& t : history) h.push_back(t.data_ptr<c10::BFloat16>());
    score_entries(g, r, h, w, hidden, product, s, n, acc, out);
  } else {
    std::vector<const float*> h;
    for (const at::Tensor& t : history) h.push_back(t.data_ptr<float>());
    score_entries(g, r, h, w, hidden, product, s, n, acc, out);
  }
  return {accumulator, score, scale};
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("predictive_score", &gradsieve::cpu::predictive_score_cpu);
}

// CPU kernels of influence_update and segment_mean (contracts: python/gradsieve/ops.py; CUDA
// kernels: csrc/cuda/influence.cu).
//
// influence_update: one pass over grad, residual, score (and hessian when given) that writes the
// accumulator a = residual + grad and the blended score, per entry in float32, in the order of
// the contract, each product and sum rounded on its own (the build uses -ffp-contract=off):
//   a = residual + float(grad);  t = |a| * eps;  u = 0.5 * |h|;  u = u * eps;  u = u * eps;
//   influence = t + u  (no hessian: influence = t);  s = rho * score;  w = (1 - rho) * influence;
//   score_out = s + w
// with eps, rho and (1 - rho) (computed in double) rounded once to float32. The CUDA kernel does
// the same operations with __fmul_rn/__fadd_rn, so the two agree bit for bit (NaN payloads aside).
// Cost: grad, residual, score (and hessian) read once; acc and score_out written once.
//
// segment_mean: the mean of each consecutive segment of x (numels[j] entries each; 0 for an empty
// segment), summed in double over fixed chunks of kChunk entries of the segment (8 interleaved
// lanes each, a loop the compiler vectorises), the chunk partials added in chunk order, divided
// by the count in double and rounded once to float32: the result does not depend on the number
// of threads (the chunks, not the threads, fix the order of the additions). Cost: x read once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ops/validation.h"

namespace gradsieve {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;  // entries per task (and per partial sum)
constexpr int64_t kLanes = 8;                  // kChunk is a multiple: entry i adds into lane i % 8
constexpr int64_t kSegmentGrain = 4096;        // segments per task of the final division

// One entry of influence_update, every operation rounded to float32 on its own.
template <bool kHessian>
inline void influence_entry(float r, float g, float score, float h, float eps_f, float rho_f,
                            float keep_f, float* acc, float* score_out) {
  const float a = r + g;
  *acc = a;
  float influence = std::fabs(a) * eps_f;
  if (kHessian) {
    float u = 0.5f * std::fabs(h);
    u = u * eps_f;
    u = u * eps_f;
    influence = influence + u;
  }
  const float carried = rho_f * score;
  const float fresh = keep_f * influence;
  *score_out = carried + fresh;
}

std::tuple<at::Tensor, at::Tensor> influence_update_cpu(const at::Tensor& grad_in,
                                                        const at::Tensor& residual_in,
                                                        const at::Tensor& score_in,
                                                        const c10::optional<at::Tensor>& hessian_in,
                                                        double eps, double rho) {
  check_influence_update(grad_in, residual_in, score_in, hessian_in, eps, rho);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor score = score_in.contiguous();
  const bool has_hessian = hessian_in.has_value() && hessian_in->defined();
  const at::Tensor hessian = has_hessian ? hessian_in->contiguous() : at::Tensor();
  const int64_t n = grad.numel();
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor acc = at::empty({n}, f32);
  at::Tensor score_out = at::empty({n}, f32);
  if (n == 0) return {acc, score_out};

  const float eps_f = static_cast<float>(eps);
  const float rho_f = static_cast<float>(rho);
  const float keep_f = static_cast<float>(1.0 - rho);
  const float* r = residual.data_ptr<float>();
  const float* s = score.data_ptr<float>();
  const float* h = has_hessian ? hessian.data_ptr<float>() : nullptr;
  float* a = acc.data_ptr<float>();
  float* out = score_out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "influence_update", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      if (h != nullptr) {
        for (int64_t i = begin; i < end; ++i) {
          influence_entry<true>(r[i], static_cast<float>(g[i]), s[i], h[i], eps_f, rho_f, keep_f,
                                a + i, out + i);
        }
      } else {
        for (int64_t i = begin; i < end; ++i) {
          influence_entry<false>(r[i], static_cast<float>(g[i]), s[i], 0.0f, eps_f, rho_f, keep_f,
                                 a + i, out + i);
        }
      }
    });
  });
  return {acc, score_out};
}

// The double sum of m entries (m <= kChunk), entry i into lane i % kLanes, the lanes in order.
double chunk_sum(const float* v, int64_t m) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= m; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(v[i + l]);
  }
  for (; i < m; ++i) lane[i % kLanes] += static_cast<double>(v[i]);
  double sum = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

at::Tensor segment_mean_cpu(const at::Tensor& x_in, at::IntArrayRef numels) {
  check_segment_mean(x_in, numels);
  const at::Tensor x = x_in.contiguous();
  const int64_t segments = static_cast<int64_t>(numels.size());
  at::Tensor out = at::empty({segments}, x.options());
  if (segments == 0) return out;

  // Tasks are (segment, chunk) pairs: segment j owns tasks first_task[j] .. first_task[j + 1] - 1.
  std::vector<int64_t> start(static_cast<size_t>(segments));
  std::vector<int64_t> first_task(static_cast<size_t>(segments) + 1);
  int64_t offset = 0, tasks = 0;
  for (int64_t j = 0; j < segments; ++j) {
    start[j] = offset;
    first_task[j] = tasks;
    tasks += (numels[j] + kChunk - 1) / kChunk;
    offset += numels[j];
  }
  first_task[segments] = tasks;
  std::vector<double> partial(static_cast<size_t>(tasks));
  const float* v = x.data_ptr<float>();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    // The segment of task t0: the last j with first_task[j] <= t0 (empty segments own no task).
    int64_t j = std::upper_bound(first_task.begin(), first_task.end(), t0) - first_task.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (first_task[j + 1] <= t) ++j;
      const int64_t begin = start[j] + (t - first_task[j]) * kChunk;
      const int64_t end = std::min(start[j] + numels[j], begin + kChunk);
      partial[t] = chunk_sum(v + begin, end - begin);
    }
  });
  float* o = out.data_ptr<float>();
  at::parallel_for(0, segments, kSegmentGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double sum = 0.0;
      for (int64_t t = first_task[j]; t < first_task[j + 1]; ++t) sum += partial[t];
      o[j] = numels[j] > 0 ? static_cast<float>(sum / static_cast<double>(numels[j])) : 0.0f;
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("influence_update", &gradsieve::cpu::influence_update_cpu);
  m.impl("segment_mean", &gradsieve::cpu::segment_mean_cpu);
}

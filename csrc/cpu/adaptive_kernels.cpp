// CPU kernels of the adaptive compressor and of the csr16 wire index.
//
// adaptive_select, one segment's per-step work (the contract is in python/gradsieve/ops.py):
//   pass 1  read grad, residual, average; write average_out (the moving average of |a|)
//   select  quantile of average_out: the radix select of radix_select_cpu.h (histogram pass and
//           candidate pass over average_out, then the candidates only)
//   pass 2  read grad, residual, average_out, momentum; write residual_out and the blended value
//           Q to a scratch buffer; count the entries with Q != 0
//   select  over Q: when more than `capacity` entries are nonzero, the radix select of the
//           capacity-th largest |Q| (2 reads of Q); then write_selection (2 reads of Q)
// so: grad 2 reads, residual 2 reads, average 1 read + 1 write + 3 reads, momentum 1 read,
// residual_out 1 write, Q 1 write + 2-4 reads. Every float operation is the one of the eager
// reference, rounded in the same order (the build uses -ffp-contract=off).
//
// csr16_indices: for every slot of every rank, the block holding it (binary search in the prefix
// sums of that rank's block counts) and the bucket position block * 65536 + offset; -1 for slots
// that carry no entry or that a malformed payload would put outside the bucket.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../ops/validation.h"
#include "radix_select_cpu.h"

namespace gradsieve {
namespace cpu {
namespace {

struct FloatMagnitudeKeys {
  const float* data;
  uint32_t operator()(int64_t i) const { return AbsKeyTraits::from_float(data[i]); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adaptive_select_cpu(const at::Tensor& grad_in, const at::Tensor& average_in,
                    const at::Tensor& momentum_in, const at::Tensor& residual_in, double alpha,
                    double beta, double q, bool compare_average, bool error_feedback,
                    int64_t capacity) {
  check_adaptive_select(grad_in, average_in, momentum_in, residual_in, alpha, beta, q, capacity);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor average = average_in.contiguous();
  const at::Tensor momentum = momentum_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  const int64_t n = grad.numel();
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor average_out = at::empty({n}, f32);
  at::Tensor residual_out = at::empty({n}, f32);
  at::Tensor blended = at::empty({n}, f32);
  at::Tensor values = at::zeros({capacity}, f32);
  at::Tensor indices = at::zeros({capacity}, f32.dtype(at::kLong));
  at::Tensor count = at::empty({}, f32.dtype(at::kLong));
  at::Tensor threshold = at::empty({}, f32);

  const float alpha_f = static_cast<float>(alpha);
  const float keep_f = static_cast<float>(1.0 - alpha);
  const float beta_f = static_cast<float>(beta);
  const float carry_f = static_cast<float>(1.0 - beta);
  const float* r = residual.data_ptr<float>();
  const float* ma = average.data_ptr<float>();
  const float* qm = momentum.data_ptr<float>();
  float* ma_out = average_out.data_ptr<float>();
  float* r_out = residual_out.data_ptr<float>();
  float* blend = blended.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "adaptive_select", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // Pass 1: the moving average of |a|, a = residual + grad.
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float a = r[i] + static_cast<float>(g[i]);
        ma_out[i] = alpha_f * std::fabs(a) + keep_f * ma[i];
      }
    });
    // The percentile threshold: the ascending rank floor(q * (n - 1)) of |average_out|.
    float thr = std::numeric_limits<float>::quiet_NaN();
    if (n > 0) {
      const int64_t rank = static_cast<int64_t>(std::floor(q * static_cast<double>(n - 1)));
      const KthLargest kth = find_kth_largest(n, n - rank, FloatMagnitudeKeys{ma_out});
      if (!kth.has_nan) std::memcpy(&thr, &kth.key, sizeof(thr));
    }
    *threshold.data_ptr<float>() = thr;
    // Pass 2: mask, blend with the momentum, what stays behind if nothing is sent.
    const int64_t nonzero_found = at::parallel_reduce(
        0, n, kChunk, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t acc) {
          for (int64_t i = begin; i < end; ++i) {
            const float a = r[i] + static_cast<float>(g[i]);
            const float key = compare_average ? ma_out[i] : std::fabs(a);
            const float m = key >= thr ? a : 0.0f;
            const float blend_i = beta_f * m + carry_f * qm[i];
            blend[i] = blend_i;
            const float left = error_feedback ? a - m : 0.0f;
            r_out[i] = left + blend_i / beta_f;
            acc += blend_i != 0.0f;
          }
          return acc;
        },
        std::plus<int64_t>());
    *count.data_ptr<int64_t>() = nonzero_found;
  });

  // The candidates: every Q != 0 (key >= 1), the `capacity` largest |Q| when more are nonzero.
  const int64_t nonzero = *count.data_ptr<int64_t>();
  if (capacity > 0 && nonzero > 0) {
    const FloatMagnitudeKeys keys{blend};
    uint32_t cut = 1u;
    int64_t need = kUnlimited;
    if (nonzero > capacity) {
      const KthLargest kth = find_kth_largest(n, capacity, keys);
      cut = kth.key;
      need = kth.need_equal;
    }
    float* out_v = values.data_ptr<float>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    write_selection(n, cut, need, keys, [&](int64_t pos, int64_t i) {
      out_v[pos] = blend[i];
      out_i[pos] = i;
    });
  }
  return {average_out, residual_out, values, indices, count, threshold};
}

at::Tensor csr16_indices_cpu(const at::Tensor& counts_in, const at::Tensor& offsets_in,
                             const at::Tensor& valid_in, int64_t numel) {
  check_csr16_indices(counts_in, offsets_in, valid_in, numel);
  const at::Tensor counts = counts_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor valid = valid_in.contiguous();
  const int64_t world = offsets.size(0), slots = offsets.size(1), blocks = counts.size(1);
  at::Tensor out = at::empty({world, slots}, offsets.options().dtype(at::kLong));
  const int32_t* c = counts.data_ptr<int32_t>();
  const int16_t* off = offsets.data_ptr<int16_t>();
  const int32_t* v = valid.data_ptr<int32_t>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, world, 1, [&](int64_t w0, int64_t w1) {
    std::vector<int64_t> ends(static_cast<size_t>(blocks));
    for (int64_t w = w0; w < w1; ++w) {
      // ends[b]: slots used by blocks 0..b (negative counts from a malformed payload count as 0).
      int64_t total = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        total += std::max<int32_t>(c[w * blocks + b], 0);
        ends[static_cast<size_t>(b)] = total;
      }
      const int64_t used = std::min<int64_t>(std::max<int32_t>(v[w], 0), slots);
      for (int64_t j = 0; j < slots; ++j) {
        int64_t index = -1;
        if (j < used) {
          const int64_t b = std::upper_bound(ends.begin(), ends.end(), j) - ends.begin();
          if (b < blocks) {
            const int64_t pos = b * kCsr16Block + static_cast<uint16_t>(off[w * slots + j]);
            if (pos < numel) index = pos;
          }
        }
        o[w * slots + j] = index;
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("adaptive_select", &gradsieve::cpu::adaptive_select_cpu);
  m.impl("csr16_indices", &gradsieve::cpu::csr16_indices_cpu);
}

// CPU kernels of the selection ops: topk_abs, quantile_abs, ef_topk_ and threshold_select, all on
// the radix select of radix_select_cpu.h (see there for the passes and their cost).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../ops/validation.h"
#include "radix_select_cpu.h"

namespace gradsieve {
namespace cpu {
namespace {

template <typename T>
struct MagnitudeKeys {
  const T* data;
  uint32_t operator()(int64_t i) const {
    return AbsKeyTraits::from_float(static_cast<float>(data[i]));
  }
};

float key_to_float(uint32_t key) {
  float v;
  std::memcpy(&v, &key, sizeof(v));
  return v;
}

std::tuple<at::Tensor, at::Tensor> topk_abs_cpu(const at::Tensor& x_in, int64_t k) {
  check_topk_abs(x_in, k);
  const at::Tensor x = x_in.contiguous();
  at::Tensor values = at::empty({k}, x.options());
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kLong));
  if (k == 0) return {values, indices};
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_abs", [&] {
    const MagnitudeKeys<scalar_t> keys{x.data_ptr<scalar_t>()};
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    select_top_k(n, k, keys, [&](int64_t pos, int64_t i) {
      out_v[pos] = keys.data[i];
      out_i[pos] = i;
    });
  });
  return {values, indices};
}

at::Tensor quantile_abs_cpu(const at::Tensor& x_in, double q) {
  check_quantile_abs(x_in, q);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor out = at::empty({}, x.options());
  if (n == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());
  // torch.quantile(..., interpolation="lower") takes ascending rank floor(q * (n - 1)).
  const int64_t rank = static_cast<int64_t>(std::floor(q * static_cast<double>(n - 1)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantile_abs", [&] {
    const KthLargest kth = find_kth_largest(n, n - rank, MagnitudeKeys<scalar_t>{x.data_ptr<scalar_t>()});
    const float v = kth.has_nan ? std::numeric_limits<float>::quiet_NaN() : key_to_float(kth.key);
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(v);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ef_topk_cpu(at::Tensor& residual, const at::Tensor& grad_in,
                                               int64_t k, double scale_in) {
  check_ef_topk(residual, grad_in, k, scale_in);
  const at::Tensor grad = grad_in.contiguous();
  // A non-contiguous residual is worked on in a contiguous copy and written back at the end.
  at::Tensor acc = residual.is_contiguous() ? residual : residual.contiguous();
  at::Tensor values = at::empty({k}, acc.options());
  at::Tensor indices = at::empty({k}, acc.options().dtype(at::kLong));
  const int64_t n = grad.numel();
  const float scale = static_cast<float>(scale_in);
  float* r = acc.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ef_topk_", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // Two roundings, as in the eager reference residual + scale * grad (built with
    // -ffp-contract=off so the compiler does not fuse them).
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float scaled = scale * static_cast<float>(g[i]);
        r[i] = r[i] + scaled;
      }
    });
  });
  take_top_k(r, n, k, MagnitudeKeys<float>{r}, values.data_ptr<float>(),
             indices.data_ptr<int64_t>());
  if (!acc.is_same(residual)) residual.copy_(acc.view(residual.sizes()));
  return {values, indices};
}

// ef_topk_ out of place: out = residual + scale * grad (residual is not written), the flag of an
// all-finite grad from the same pass, then the same selection on out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ef_topk_into_cpu(at::Tensor& out, const at::Tensor& residual_in,
                                                                const at::Tensor& grad_in, int64_t k,
                                                                double scale_in) {
  check_ef_topk_into(out, residual_in, grad_in, k, scale_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  at::Tensor values = at::empty({k}, out.options());
  at::Tensor indices = at::empty({k}, out.options().dtype(at::kLong));
  at::Tensor finite = at::empty({}, out.options().dtype(at::kBool));
  const int64_t n = grad.numel();
  const float scale = static_cast<float>(scale_in);
  const float* src = residual.data_ptr<float>();
  float* r = out.data_ptr<float>();
  bool all_finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ef_topk_into", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // The roundings of ef_topk_ (residual + scale * grad, no fused multiply-add).
    all_finite = at::parallel_reduce(
        0, n, kChunk, true,
        [&](int64_t begin, int64_t end, bool ok) {
          for (int64_t i = begin; i < end; ++i) {
            const float gi = static_cast<float>(g[i]);
            const float scaled = scale * gi;
            r[i] = src[i] + scaled;
            ok = ok && std::isfinite(gi);
          }
          return ok;
        },
        [](bool a, bool b) { return a && b; });
  });
  *finite.data_ptr<bool>() = all_finite;
  take_top_k(r, n, k, MagnitudeKeys<float>{r}, values.data_ptr<float>(), indices.data_ptr<int64_t>());
  return {values, indices, finite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_cpu(const at::Tensor& x_in,
                                                                    const at::Tensor& threshold,
                                                                    int64_t capacity) {
  check_threshold_select(x_in, threshold, capacity);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor values = at::zeros({capacity}, x.options());
  at::Tensor indices = at::zeros({capacity}, x.options().dtype(at::kLong));
  at::Tensor count = at::empty({}, x.options().dtype(at::kLong));
  const uint32_t tkey = AbsKeyTraits::threshold_key(threshold.item<float>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "threshold_select", [&] {
    const MagnitudeKeys<scalar_t> keys{x.data_ptr<scalar_t>()};
    const int64_t passed = at::parallel_reduce(
        0, n, kChunk, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t acc) {
          for (int64_t i = begin; i < end; ++i) acc += keys(i) >= tkey;
          return acc;
        },
        std::plus<int64_t>());
    *count.data_ptr<int64_t>() = passed;
    if (capacity == 0 || passed == 0) return;
    uint32_t cut = tkey;
    int64_t need = kUnlimited;
    if (passed > capacity) {  // overflow: the `capacity` largest, all of which pass
      const KthLargest kth = find_kth_largest(n, capacity, keys);
      cut = kth.key;
      need = kth.need_equal;
    }
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    write_selection(n, cut, need, keys, [&](int64_t pos, int64_t i) {
      out_v[pos] = keys.data[i];
      out_i[pos] = i;
    });
  });
  return {values, indices, count};
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("topk_abs", &gradsieve::cpu::topk_abs_cpu);
  m.impl("quantile_abs", &gradsieve::cpu::quantile_abs_cpu);
  m.impl("ef_topk_", &gradsieve::cpu::ef_topk_cpu);
  m.impl("ef_topk_into", &gradsieve::cpu::ef_topk_into_cpu);
  m.impl("threshold_select", &gradsieve::cpu::threshold_select_cpu);
}

// CUDA launchers: validate (the shared checks), turn tensors into the raw pointers, sizes and
// stream of gradsieve/cuda_kernels.h, allocate workspaces through torch's caching allocator, and
// turn a CUDA error into a torch error. No device code lives here; no host synchronisation either,
// except where a caller of sparse_accumulate_ or regtopk_select_ passes no `bad` flags: a position
// outside its range must then raise as on the CPU, which needs one read of the device (the hook
// always passes flags).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <mutex>

#include "../ops/validation.h"
#include "gradsieve/cuda_kernels.h"

namespace gradsieve {
namespace cuda_launch {
namespace {

using cuda::DType;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "gradsieve: unsupported dtype ", t);
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "gradsieve.", op, ": CUDA error: ", cudaGetErrorString(err));
}

// Without flags, positions outside [0, n) are an error, raised (after one device read) before the
// kernels run, with the CPU backend's message.
void require_inside(const at::Tensor& positions, int64_t n, const char* op, const char* arg,
                    const char* what) {
  if (positions.numel() == 0) return;
  const at::Tensor outside = positions.lt(0).logical_or_(positions.ge(n));
  if (!outside.any().item<bool>()) return;
  const int64_t j = outside.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK(false, "gradsieve.", op, ": ", arg, " must lie in [0, ", n, ") (", what, "), got ",
              arg, "[", j, "] = ", positions[j].item<int64_t>());
}

int32_t* flags_of(const c10::optional<at::Tensor>& bad) {
  return bad.has_value() && bad->defined() ? bad->data_ptr<int32_t>() : nullptr;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> topk_abs_cuda(const at::Tensor& x_in, int64_t k) {
  check_topk_abs(x_in, k);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor values = at::empty({k}, x.options());
  at::Tensor indices = at::empty({k}, x.options().dtype(at::kLong));
  if (k == 0) return {values, indices};
  const int64_t n = x.numel();
  const size_t bytes = cuda::topk_abs_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, x);
  check_cuda(cuda::topk_abs(x.data_ptr(), to_dtype(x.scalar_type()), n, k, values.data_ptr(),
                            indices.data_ptr<int64_t>(), ws.data_ptr(), bytes,
                            c10::cuda::getCurrentCUDAStream()),
             "topk_abs");
  return {values, indices};
}

at::Tensor quantile_abs_cuda(const at::Tensor& x_in, double q) {
  check_quantile_abs(x_in, q);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({}, x.options());
  const int64_t n = x.numel();
  const size_t bytes = cuda::quantile_abs_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, x);
  check_cuda(cuda::quantile_abs(x.data_ptr(), to_dtype(x.scalar_type()), n, q, out.data_ptr(),
                                ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()),
             "quantile_abs");
  return out;
}

std::tuple<at::Tensor, at::Tensor> ef_topk_cuda(at::Tensor& residual, const at::Tensor& grad_in,
                                                int64_t k, double scale) {
  check_ef_topk(residual, grad_in, k, scale);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor acc = residual.is_contiguous() ? residual : residual.contiguous();
  at::Tensor values = at::empty({k}, acc.options());
  at::Tensor indices = at::empty({k}, acc.options().dtype(at::kLong));
  const int64_t n = grad.numel();
  const size_t bytes = cuda::ef_topk_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, grad);
  check_cuda(cuda::ef_topk(acc.data_ptr<float>(), grad.data_ptr(), to_dtype(grad.scalar_type()), n,
                           k, static_cast<float>(scale), values.data_ptr<float>(),
                           indices.data_ptr<int64_t>(), ws.data_ptr(), bytes,
                           c10::cuda::getCurrentCUDAStream()),
             "ef_topk_");
  if (!acc.is_same(residual)) residual.copy_(acc);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ef_topk_into_cuda(at::Tensor& out, const at::Tensor& residual_in,
                                                                 const at::Tensor& grad_in, int64_t k,
                                                                 double scale) {
  check_ef_topk_into(out, residual_in, grad_in, k, scale);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  at::Tensor values = at::empty({k}, out.options());
  at::Tensor indices = at::empty({k}, out.options().dtype(at::kLong));
  at::Tensor nonfinite = at::zeros({}, out.options().dtype(at::kInt));
  const int64_t n = grad.numel();
  const size_t bytes = cuda::ef_topk_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, grad);
  check_cuda(cuda::ef_topk_into(residual.data_ptr<float>(), out.data_ptr<float>(), grad.data_ptr(),
                                to_dtype(grad.scalar_type()), n, k, static_cast<float>(scale),
                                values.data_ptr<float>(), indices.data_ptr<int64_t>(),
                                nonfinite.data_ptr<int>(), ws.data_ptr(), bytes,
                                c10::cuda::getCurrentCUDAStream()),
             "ef_topk_into");
  return {values, indices, nonfinite.eq(0)};
}

std::tuple<at::Tensor, at::Tensor> regtopk_select_cuda(at::Tensor& residual,
                                                       const at::Tensor& grad_in,
                                                       const at::Tensor& prev_indices_in,
                                                       const at::Tensor& prev_sent_in,
                                                       const at::Tensor& prev_agg_in, double mu,
                                                       int64_t k, int64_t world_size,
                                                       c10::optional<double> q,
                                                       const c10::optional<at::Tensor>& bad,
                                                       const c10::optional<at::Tensor>& kept_in,
                                                       const c10::optional<at::Tensor>& finite) {
  check_regtopk_select(residual, grad_in, prev_indices_in, prev_sent_in, prev_agg_in, mu, k,
                       world_size, q, bad, kept_in, finite);
  const bool has_finite = finite.has_value() && finite->defined();
  const bool has_kept = kept_in.has_value() && kept_in->defined();
  const at::Tensor kept = has_kept ? kept_in->contiguous() : at::Tensor();
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor prev_indices = prev_indices_in.contiguous();
  if (flags_of(bad) == nullptr) {
    require_inside(prev_indices, grad.numel(), "regtopk_select_", "prev_indices", "grad.numel()");
  }
  const at::Tensor prev_sent = prev_sent_in.contiguous();
  const at::Tensor prev_agg = prev_agg_in.contiguous();
  at::Tensor acc = residual.is_contiguous() ? residual : residual.contiguous();
  at::Tensor values = at::empty({k}, acc.options());
  at::Tensor indices = at::empty({k}, acc.options().dtype(at::kLong));
  const int64_t n = grad.numel();
  const size_t bytes = cuda::regtopk_select_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, grad);
  cuda::RegTopKArgs args{};
  args.residual = acc.data_ptr<float>();
  args.kept = has_kept ? kept.data_ptr<float>() : nullptr;
  // A one-element bool tensor is contiguous: the kernel writes through its pointer.
  args.finite = has_finite ? finite->data_ptr<bool>() : nullptr;
  args.grad = grad.data_ptr();
  args.grad_dtype = to_dtype(grad.scalar_type());
  args.n = n;
  args.prev_indices = prev_indices.data_ptr();
  args.prev_indices_int64 = prev_indices.scalar_type() == at::kLong;
  args.prev_sent = prev_sent.data_ptr<float>();
  args.prev_agg = prev_agg.data_ptr<float>();
  args.m = prev_indices.numel();
  args.mu = mu;
  args.world_size = world_size;
  args.has_q = q.has_value();
  args.q = q.value_or(0.0);
  args.k = k;
  args.values = values.data_ptr<float>();
  args.indices = indices.data_ptr<int64_t>();
  args.bad = flags_of(bad);
  args.bad_count = args.bad != nullptr ? bad->numel() : 0;
  check_cuda(cuda::regtopk_select(args, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()),
             "regtopk_select_");
  if (!acc.is_same(residual)) residual.copy_(acc);
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_cuda(const at::Tensor& x_in,
                                                                     const at::Tensor& threshold,
                                                                     int64_t capacity) {
  check_threshold_select(x_in, threshold, capacity);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor t = threshold.to(at::kFloat).contiguous();
  at::Tensor values = at::zeros({capacity}, x.options());
  at::Tensor indices = at::zeros({capacity}, x.options().dtype(at::kLong));
  at::Tensor count = at::empty({}, x.options().dtype(at::kLong));
  const int64_t n = x.numel();
  const size_t bytes = cuda::threshold_select_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, x);
  check_cuda(cuda::threshold_select(x.data_ptr(), to_dtype(x.scalar_type()), n,
                                    t.data_ptr<float>(), capacity, values.data_ptr(),
                                    indices.data_ptr<int64_t>(), count.data_ptr<int64_t>(),
                                    ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()),
             "threshold_select");
  return {values, indices, count};
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x_in, int64_t chunk,
                                                      bool stochastic,
                                                      c10::optional<at::Generator> generator) {
  check_quantize_int8(x_in, chunk);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({num_chunks(n, chunk)}, x.options().dtype(at::kFloat));
  uint64_t seed = 0, offset = 0;
  if (stochastic) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    const at::PhiloxCudaState state = gen->philox_cuda_state(static_cast<uint64_t>(n));
    TORCH_CHECK(!state.captured_,
                "gradsieve.quantize_int8: stochastic rounding is not supported inside CUDA graph "
                "capture, got a capturing stream");
    seed = state.seed_.val;
    offset = state.offset_.val;
  }
  check_cuda(cuda::quantize_int8(x.data_ptr(), to_dtype(x.scalar_type()), n, chunk, stochastic,
                                 seed, offset, q.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                 c10::cuda::getCurrentCUDAStream()),
             "quantize_int8");
  return {q, scales};
}

at::Tensor dequantize_int8_cuda(const at::Tensor& q_in, const at::Tensor& scales_in, int64_t chunk,
                                at::ScalarType dtype) {
  check_dequantize_int8(q_in, scales_in, chunk, dtype);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  check_cuda(cuda::dequantize_int8(q.data_ptr<int8_t>(), scales.data_ptr<float>(), q.numel(),
                                   chunk, out.data_ptr(), to_dtype(dtype),
                                   c10::cuda::getCurrentCUDAStream()),
             "dequantize_int8");
  return out;
}

void sparse_accumulate_cuda(at::Tensor& out, const at::Tensor& indices_in,
                            const at::Tensor& values_in,
                            const c10::optional<at::Tensor>& scales_in, int64_t chunk,
                            const c10::optional<at::Tensor>& bad) {
  check_sparse_accumulate(out, indices_in, values_in, scales_in, chunk, bad);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  if (indices.numel() == 0) return;
  int32_t* flags = flags_of(bad);
  if (flags == nullptr) {
    require_inside(indices, out.numel(), "sparse_accumulate_", "indices", "out.numel()");
  }
  at::Tensor dense = out.is_contiguous() ? out : out.contiguous();
  const bool int8_values = values.scalar_type() == at::kChar;
  const at::Tensor scales = int8_values ? scales_in->contiguous() : at::Tensor();
  check_cuda(cuda::sparse_accumulate(
                 dense.data_ptr(), to_dtype(dense.scalar_type()), dense.numel(), indices.data_ptr(),
                 indices.scalar_type() == at::kLong, values.data_ptr(),
                 int8_values ? DType::kFloat32 : to_dtype(values.scalar_type()), int8_values,
                 int8_values ? scales.data_ptr<float>() : nullptr, chunk, indices.numel(), flags,
                 flags != nullptr ? bad->numel() : 0, c10::cuda::getCurrentCUDAStream()),
             "sparse_accumulate_");
  if (!dense.is_same(out)) out.copy_(dense);
}

}  // namespace
}  // namespace cuda_launch
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CUDA, m) {
  m.impl("topk_abs", &gradsieve::cuda_launch::topk_abs_cuda);
  m.impl("quantile_abs", &gradsieve::cuda_launch::quantile_abs_cuda);
  m.impl("ef_topk_", &gradsieve::cuda_launch::ef_topk_cuda);
  m.impl("ef_topk_into", &gradsieve::cuda_launch::ef_topk_into_cuda);
  m.impl("regtopk_select_", &gradsieve::cuda_launch::regtopk_select_cuda);
  m.impl("threshold_select", &gradsieve::cuda_launch::threshold_select_cuda);
  m.impl("quantize_int8", &gradsieve::cuda_launch::quantize_int8_cuda);
  m.impl("dequantize_int8", &gradsieve::cuda_launch::dequantize_int8_cuda);
  m.impl("sparse_accumulate_", &gradsieve::cuda_launch::sparse_accumulate_cuda);
}

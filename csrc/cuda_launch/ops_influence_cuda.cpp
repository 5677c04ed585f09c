// CUDA launchers of influence_update and segment_mean (the kernels: csrc/cuda/influence.cu), in
// the manner of ops_cuda.cpp: the shared checks, tensors to raw pointers, CUDA errors to torch
// errors. segment_mean's boundaries go to the device from a pinned host buffer, copied on the
// current stream (torch's caching host allocator keeps the buffer until the copy is done). No
// host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

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

std::tuple<at::Tensor, at::Tensor> influence_update_cuda(const at::Tensor& grad_in,
                                                         const at::Tensor& residual_in,
                                                         const at::Tensor& score_in,
                                                         const c10::optional<at::Tensor>& hessian_in,
                                                         double eps, double rho) {
  check_influence_update(grad_in, residual_in, score_in, hessian_in, eps, rho);
  const c10::cuda::CUDAGuard guard(grad_in.device());
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
  cuda::InfluenceUpdateArgs args{};
  args.grad = grad.data_ptr();
  args.grad_dtype = to_dtype(grad.scalar_type());
  args.residual = residual.data_ptr<float>();
  args.score = score.data_ptr<float>();
  args.hessian = has_hessian ? hessian.data_ptr<float>() : nullptr;
  args.n = n;
  args.eps = eps;
  args.rho = rho;
  args.acc = acc.data_ptr<float>();
  args.score_out = score_out.data_ptr<float>();
  check_cuda(cuda::influence_update(args, c10::cuda::getCurrentCUDAStream()), "influence_update");
  return {acc, score_out};
}

at::Tensor segment_mean_cuda(const at::Tensor& x_in, at::IntArrayRef numels) {
  check_segment_mean(x_in, numels);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t segments = static_cast<int64_t>(numels.size());
  at::Tensor out = at::empty({segments}, x.options());
  if (segments == 0) return out;
  // offsets[j] = numels[0] + ... + numels[j - 1], j = 0 .. segments.
  at::Tensor host = at::empty({segments + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  h[0] = 0;
  for (int64_t j = 0; j < segments; ++j) h[j + 1] = h[j] + numels[j];
  at::Tensor offsets = at::empty({segments + 1}, x.options().dtype(at::kLong));
  offsets.copy_(host, /*non_blocking=*/true);
  check_cuda(cuda::segment_mean(x.data_ptr<float>(), offsets.data_ptr<int64_t>(), segments,
                                out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "segment_mean");
  return out;
}

}  // namespace
}  // namespace cuda_launch
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CUDA, m) {
  m.impl("influence_update", &gradsieve::cuda_launch::influence_update_cuda);
  m.impl("segment_mean", &gradsieve::cuda_launch::segment_mean_cuda);
}

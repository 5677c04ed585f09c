// CUDA launchers of adaptive_select and csr16_indices (the kernels: csrc/cuda/adaptive.cu), in the
// manner of ops_cuda.cpp: the shared checks, tensors to raw pointers, the workspace from torch's
// caching allocator, CUDA errors to torch errors. No host synchronisation.
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

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adaptive_select_cuda(const at::Tensor& grad_in, const at::Tensor& average_in,
                     const at::Tensor& momentum_in, const at::Tensor& residual_in, double alpha,
                     double beta, double q, bool compare_average, bool error_feedback,
                     int64_t capacity) {
  check_adaptive_select(grad_in, average_in, momentum_in, residual_in, alpha, beta, q, capacity);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor average = average_in.contiguous();
  const at::Tensor momentum = momentum_in.contiguous();
  const at::Tensor residual = residual_in.contiguous();
  const int64_t n = grad.numel();
  const auto f32 = grad.options().dtype(at::kFloat);
  at::Tensor average_out = at::empty({n}, f32);
  at::Tensor residual_out = at::empty({n}, f32);
  at::Tensor values = at::zeros({capacity}, f32);
  at::Tensor indices = at::zeros({capacity}, f32.dtype(at::kLong));
  at::Tensor count = at::empty({}, f32.dtype(at::kLong));
  at::Tensor threshold = at::empty({}, f32);
  const size_t bytes = cuda::adaptive_select_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, grad);
  cuda::AdaptiveSelectArgs args{};
  args.grad = grad.data_ptr();
  args.grad_dtype = to_dtype(grad.scalar_type());
  args.average = average.data_ptr<float>();
  args.momentum = momentum.data_ptr<float>();
  args.residual = residual.data_ptr<float>();
  args.n = n;
  args.alpha = alpha;
  args.beta = beta;
  args.q = q;
  args.compare_average = compare_average;
  args.error_feedback = error_feedback;
  args.capacity = capacity;
  args.average_out = average_out.data_ptr<float>();
  args.residual_out = residual_out.data_ptr<float>();
  args.values = values.data_ptr<float>();
  args.indices = indices.data_ptr<int64_t>();
  args.count = count.data_ptr<int64_t>();
  args.threshold = threshold.data_ptr<float>();
  check_cuda(cuda::adaptive_select(args, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()),
             "adaptive_select");
  return {average_out, residual_out, values, indices, count, threshold};
}

at::Tensor csr16_indices_cuda(const at::Tensor& counts_in, const at::Tensor& offsets_in,
                              const at::Tensor& valid_in, int64_t numel) {
  check_csr16_indices(counts_in, offsets_in, valid_in, numel);
  const c10::cuda::CUDAGuard guard(offsets_in.device());
  const at::Tensor counts = counts_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor valid = valid_in.contiguous();
  const int64_t world = offsets.size(0), slots = offsets.size(1), blocks = counts.size(1);
  at::Tensor out = at::empty({world, slots}, offsets.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const size_t bytes = cuda::csr16_indices_workspace_bytes(world, blocks);
  at::Tensor ws = workspace(bytes, offsets);
  check_cuda(cuda::csr16_indices(counts.data_ptr<int32_t>(), offsets.data_ptr<int16_t>(),
                                 valid.data_ptr<int32_t>(), world, blocks, slots, numel,
                                 out.data_ptr<int64_t>(), ws.data_ptr(), bytes,
                                 c10::cuda::getCurrentCUDAStream()),
             "csr16_indices");
  return out;
}

}  // namespace
}  // namespace cuda_launch
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CUDA, m) {
  m.impl("adaptive_select", &gradsieve::cuda_launch::adaptive_select_cuda);
  m.impl("csr16_indices", &gradsieve::cuda_launch::csr16_indices_cuda);
}

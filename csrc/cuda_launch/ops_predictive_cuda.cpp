// CUDA launcher of predictive_score (the kernels: csrc/cuda/predictive.cu), in the manner of
// ops_cuda.cpp: the shared checks, tensors to raw pointers (the history in ring order, newest
// first), the workspace from torch's caching allocator, CUDA errors to torch errors. No host
// synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../ops/validation.h"
#include "gradsieve/cuda_kernels.h"

namespace gradsieve {
namespace cuda_launch {
namespace {

static_assert(cuda::kPredictiveMaxHistory == kPredictiveMaxHistory &&
                  cuda::kPredictiveMaxHidden == kPredictiveMaxHidden,
              "the kernel's limits are the checks' limits");

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "gradsieve.", op, ": CUDA error: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> predictive_score_cuda(
    const at::Tensor& grad_in, const at::Tensor& residual_in, at::TensorList history_in,
    int64_t newest, const at::Tensor& weights_in, int64_t hidden, bool product) {
  check_predictive_score(grad_in, residual_in, history_in, newest, weights_in, hidden);
  const c10::cuda::CUDAGuard guard(grad_in.device());
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
  const size_t bytes = cuda::predictive_score_workspace_bytes(n);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, grad.options().dtype(at::kByte));

  cuda::PredictiveScoreArgs args{};
  args.grad = grad.data_ptr<float>();
  args.residual = residual.data_ptr<float>();
  for (int64_t j = 0; j < H; ++j) args.history[j] = history[static_cast<size_t>(j)].data_ptr();
  args.history_dtype = history[0].scalar_type() == at::kBFloat16 ? cuda::DType::kBFloat16
                                                                 : cuda::DType::kFloat32;
  args.history_count = static_cast<int>(H);
  args.weights = weights.data_ptr<float>();
  args.hidden = static_cast<int>(hidden);
  args.product = product;
  args.n = n;
  args.accumulator = accumulator.data_ptr<float>();
  args.score = score.data_ptr<float>();
  args.scale = scale.data_ptr<float>();
  check_cuda(cuda::predictive_score(args, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()),
             "predictive_score");
  return {accumulator, score, scale};
}

}  // namespace
}  // namespace cuda_launch
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CUDA, m) {
  m.impl("predictive_score", &gradsieve::cuda_launch::predictive_score_cuda);
}

// RegTop-k selection fused with error feedback for the CUDA backend: regtopk_select_
// (Bereyhi et al., arXiv 2409.14893; the weight formula and its edge cases: regtopk_weight.h).
//
// Algorithm. Pass 1 (one read of grad, one read and write of the residual, or a read of `kept`
// and a write of the residual, one write of a float score buffer in the workspace): acc =
// residual (or kept) + grad, score = w_unsent * |acc|. Two small
// kernels over the m entries sent last step then give those entries their own score: the first
// marks each listed index with the largest key (skipping, and flagging, one outside [0, n)), the
// second takes the atomic minimum of the keys w_j * |acc_j| of its entries, so an index listed
// more than once deterministically keeps its lowest score. Scores are >= 0 or NaN, so their float bits are their
// radix keys (radix_key.h). The exact radix select of radix_select.cu (select_by_score) then finds
// the k largest scores, ties to the lower index, and writes acc's values at the selected indices,
// zeroing them in the residual.
//
// Cost in passes over n: grad read + residual read/write + score write, then the select's 3
// histogram reads + 1 count read + 1 write read of the score (plus k residual reads and writes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gradsieve/cuda_kernels.h"
#include "gradsieve/radix_key.h"
#include "gradsieve/regtopk_weight.h"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

size_t score_bytes(int64_t n) {
  return align_up(sizeof(float) * static_cast<size_t>(n > 0 ? n : 1));
}

unsigned blocks_for(int64_t count) {
  const int64_t want = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > kMaxBlocks ? kMaxBlocks : want));
}

// acc = before + grad (one rounding, as the CPU kernel; before is the residual itself, or the
// kept memory when the residual is an output only), score = w_unsent * |acc|.
// With `finite`, a thread that reads a NaN or Inf gradient entry stores false there (every such
// store writes the same value).
template <typename G>
__global__ void __launch_bounds__(kThreads)
    regtopk_accumulate_kernel(float* residual, const float* before, const G* __restrict__ grad,
                              int64_t n, float w_unsent, float* __restrict__ score, bool* finite) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  bool all_finite = true;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_float(grad[i]);
    all_finite = all_finite && isfinite(g);
    const float acc = __fadd_rn(before[i], g);
    residual[i] = acc;
    score[i] = __fmul_rn(w_unsent, fabsf(acc));
  }
  if (finite != nullptr && !all_finite) *finite = false;
}

// Every index sent last step starts from the largest key. One outside [0, n) is skipped here and
// in the next kernel (its entry keeps the score of an entry not sent) and sets its flag, if any.
template <typename I>
__global__ void __launch_bounds__(kThreads)
    regtopk_mark_kernel(const I* __restrict__ prev_indices, int64_t m, int64_t n,
                        unsigned* __restrict__ score_keys, int32_t* __restrict__ bad,
                        int64_t per) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += stride) {
    const int64_t i = static_cast<int64_t>(prev_indices[j]);
    if (i < 0 || i >= n) {
      if (bad != nullptr) bad[j / per] = 1;
      continue;
    }
    score_keys[i] = AbsKeyTraits::kNanKey;
  }
}

// The score of each entry sent last step: the lowest over its listings of key(w_j * |acc_j|).
template <typename I>
__global__ void __launch_bounds__(kThreads)
    regtopk_weight_kernel(const I* __restrict__ prev_indices, const float* __restrict__ prev_sent,
                          const float* __restrict__ prev_agg, int64_t m, int64_t n,
                          const float* __restrict__ residual, double world_size, double mu,
                          float w_unsent, unsigned* __restrict__ score_keys) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += stride) {
    const int64_t i = static_cast<int64_t>(prev_indices[j]);
    if (i < 0 || i >= n) continue;
    const float w = RegTopKWeight::sent(prev_sent[j], prev_agg[j], world_size, mu, w_unsent);
    atomicMin(score_keys + i, AbsKeyTraits::from_float(__fmul_rn(w, fabsf(residual[i]))));
  }
}

template <typename I>
cudaError_t apply_previous(const RegTopKArgs& a, float w_unsent, float* score,
                           cudaStream_t stream) {
  const I* idx = static_cast<const I*>(a.prev_indices);
  unsigned* keys = reinterpret_cast<unsigned*>(score);
  const unsigned grid = blocks_for(a.m);
  const int64_t per = a.bad != nullptr ? a.m / a.bad_count : a.m;
  regtopk_mark_kernel<I><<<grid, kThreads, 0, stream>>>(idx, a.m, a.n, keys, a.bad, per);
  regtopk_weight_kernel<I><<<grid, kThreads, 0, stream>>>(
      idx, a.prev_sent, a.prev_agg, a.m, a.n, a.residual, static_cast<double>(a.world_size), a.mu,
      w_unsent, keys);
  return cudaGetLastError();
}

}  // namespace

size_t regtopk_select_workspace_bytes(int64_t n) {
  return score_bytes(n) + select_by_score_workspace_bytes(n);
}

cudaError_t regtopk_select(const RegTopKArgs& a, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (a.n == 0 && a.m == 0) return cudaSuccess;
  if (workspace_bytes < regtopk_select_workspace_bytes(a.n)) return cudaErrorInvalidValue;
  if (a.bad != nullptr && (a.bad_count <= 0 || a.m % a.bad_count != 0)) {
    return cudaErrorInvalidValue;
  }
  float* score = static_cast<float*>(workspace);
  const float w_unsent = RegTopKWeight::unsent(a.has_q, a.q, a.mu);
  const float* before = a.kept != nullptr ? a.kept : a.residual;
  if (a.n > 0) {
    const unsigned grid = blocks_for(a.n);
    switch (a.grad_dtype) {
      case DType::kFloat32:
        regtopk_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
            a.residual, before, static_cast<const float*>(a.grad), a.n, w_unsent, score, a.finite);
        break;
      case DType::kFloat16:
        regtopk_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
            a.residual, before, static_cast<const __half*>(a.grad), a.n, w_unsent, score, a.finite);
        break;
      case DType::kBFloat16:
        regtopk_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
            a.residual, before, static_cast<const __nv_bfloat16*>(a.grad), a.n, w_unsent, score,
            a.finite);
        break;
      default:
        return cudaErrorInvalidValue;
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.m > 0) {
    cudaError_t err = a.prev_indices_int64 ? apply_previous<int64_t>(a, w_unsent, score, stream)
                                           : apply_previous<int32_t>(a, w_unsent, score, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.k == 0 || a.n == 0) return cudaSuccess;
  return select_by_score(score, a.residual, a.n, a.k, a.values, a.indices,
                         static_cast<char*>(workspace) + score_bytes(a.n),
                         workspace_bytes - score_bytes(a.n), stream);
}

}  // namespace cuda
}  // namespace gradsieve

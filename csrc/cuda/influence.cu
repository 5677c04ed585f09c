// CUDA kernels of influence_update and segment_mean (contracts: python/gradsieve/ops.py and
// gradsieve/cuda_kernels.h; CPU kernels: csrc/cpu/influence_kernels.cpp).
//
// influence_update (influence_update_kernel<G, kHessian>, grid-stride): kElems entries per thread
// and step, the e-th at base + e * blockDim.x so that every load and store is coalesced; all loads
// of a step are issued before the arithmetic. Per entry: a = residual + grad -> acc; t = |a| * eps;
// u = 0.5 * |h|, u = u * eps, u = u * eps; influence = t + u (no hessian: t); score_out =
// rho * score + (1 - rho) * influence. Every product and sum is rounded on its own (__fmul_rn,
// __fadd_rn: no fused multiply-add), in the CPU kernel's order, so the two agree bit for bit (NaN
// payloads aside). Cost: one pass, grad, residual, score (and hessian) read once, acc and
// score_out written once: 2 + 4 + 4 (+ 4) + 4 + 4 bytes per entry with a bf16 grad.
//
// segment_mean (segment_mean_kernel): one block per segment (a block takes segments j, j + grid,
// ... when there are more segments than the grid's cap). Each thread sums its entries begin +
// threadIdx.x, + blockDim.x, ... in double, kSegmentItems of them loaded per step before they are
// added (in index order), so that enough loads are in flight; cub's block reduction (a fixed
// order) adds the threads' sums; thread 0 writes float(sum / count), 0 for an empty segment. The
// order of the additions depends only on the segment's length, so the result is deterministic.
// Cost: x read once. A segment is summed by one block, so a segment holding a large share of x
// takes as long as one SM needs to read it while the others idle.
//
// No trap or assert: NaN or infinite inputs give NaN or infinite outputs. No host
// synchronisation; everything runs on the given stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>

#include "gradsieve/cuda_kernels.h"
#include "radix_select_internal.cuh"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kElems = 4;                        // entries per thread and step of influence_update
constexpr int kSegmentItems = 8;                 // loads in flight per thread of segment_mean
constexpr int64_t kMaxSegmentBlocks = 1 << 20;   // segment_mean's grid cap (blocks loop beyond it)

// ----------------------------------------------------------------------------- influence_update
template <typename G, bool kHessian>
__global__ void __launch_bounds__(kThreads)
    influence_update_kernel(const G* __restrict__ grad, const float* __restrict__ residual,
                            const float* __restrict__ score, const float* __restrict__ hessian,
                            int64_t n, float eps_f, float rho_f, float keep_f,
                            float* __restrict__ acc, float* __restrict__ score_out) {
  const int64_t tile = int64_t(kElems) * blockDim.x;
  const int64_t stride = int64_t(gridDim.x) * tile;
  for (int64_t base = int64_t(blockIdx.x) * tile + threadIdx.x; base < n; base += stride) {
    float r[kElems], g[kElems], s[kElems], h[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = base + int64_t(e) * blockDim.x;
      const bool in = i < n;
      r[e] = in ? residual[i] : 0.0f;
      g[e] = in ? to_float(grad[i]) : 0.0f;
      s[e] = in ? score[i] : 0.0f;
      h[e] = (kHessian && in) ? hessian[i] : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = base + int64_t(e) * blockDim.x;
      if (i >= n) continue;
      const float a = __fadd_rn(r[e], g[e]);
      float influence = __fmul_rn(fabsf(a), eps_f);
      if (kHessian) {
        float u = __fmul_rn(0.5f, fabsf(h[e]));
        u = __fmul_rn(u, eps_f);
        u = __fmul_rn(u, eps_f);
        influence = __fadd_rn(influence, u);
      }
      acc[i] = a;
      score_out[i] = __fadd_rn(__fmul_rn(rho_f, s[e]), __fmul_rn(keep_f, influence));
    }
  }
}

template <typename G>
cudaError_t launch_influence(const InfluenceUpdateArgs& a, cudaStream_t stream) {
  const int grid = radix::grid_size(a.n, kElems);
  const float eps_f = static_cast<float>(a.eps);
  const float rho_f = static_cast<float>(a.rho);
  const float keep_f = static_cast<float>(1.0 - a.rho);
  const G* grad = static_cast<const G*>(a.grad);
  if (a.hessian != nullptr) {
    influence_update_kernel<G, true><<<grid, kThreads, 0, stream>>>(
        grad, a.residual, a.score, a.hessian, a.n, eps_f, rho_f, keep_f, a.acc, a.score_out);
  } else {
    influence_update_kernel<G, false><<<grid, kThreads, 0, stream>>>(
        grad, a.residual, a.score, nullptr, a.n, eps_f, rho_f, keep_f, a.acc, a.score_out);
  }
  return cudaGetLastError();
}

// --------------------------------------------------------------------------------- segment_mean
__global__ void __launch_bounds__(kThreads)
    segment_mean_kernel(const float* __restrict__ x, const int64_t* __restrict__ offsets,
                        int64_t segments, float* __restrict__ out) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  for (int64_t j = blockIdx.x; j < segments; j += gridDim.x) {
    const int64_t begin = offsets[j];
    const int64_t end = offsets[j + 1];
    const int64_t tile = int64_t(kSegmentItems) * blockDim.x;
    double sum = 0.0;
    for (int64_t base = begin + threadIdx.x; base < end; base += tile) {
      float v[kSegmentItems];
#pragma unroll
      for (int e = 0; e < kSegmentItems; ++e) {
        const int64_t i = base + int64_t(e) * blockDim.x;
        v[e] = i < end ? x[i] : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kSegmentItems; ++e) sum += static_cast<double>(v[e]);
    }
    const double total = Reduce(tmp).Sum(sum);
    if (threadIdx.x == 0) {
      out[j] = end > begin ? __double2float_rn(total / static_cast<double>(end - begin)) : 0.0f;
    }
    __syncthreads();  // tmp is reused by this block's next segment
  }
}

}  // namespace

cudaError_t influence_update(const InfluenceUpdateArgs& args, cudaStream_t stream) {
  if (args.n < 0) return cudaErrorInvalidValue;
  if (args.n == 0) return cudaSuccess;
  switch (args.grad_dtype) {
    case DType::kFloat32: return launch_influence<float>(args, stream);
    case DType::kFloat16: return launch_influence<__half>(args, stream);
    case DType::kBFloat16: return launch_influence<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t segment_mean(const float* x, const int64_t* offsets, int64_t segments, float* out,
                         cudaStream_t stream) {
  if (segments < 0) return cudaErrorInvalidValue;
  if (segments == 0) return cudaSuccess;
  const unsigned grid =
      static_cast<unsigned>(segments < kMaxSegmentBlocks ? segments : kMaxSegmentBlocks);
  segment_mean_kernel<<<grid, kThreads, 0, stream>>>(x, offsets, segments, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradsieve

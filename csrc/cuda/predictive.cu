// CUDA kernels of predictive_score: the per-entry score of the predictive compressor, a small MLP
// over the accumulator a = residual + grad and the H previous gradients of the history ring
// (contract: python/gradsieve/ops.py and gradsieve/cuda_kernels.h; CPU kernel:
// csrc/cpu/predictive_kernels.cpp).
//
// Pass 1 (magnitude_sum_kernel, grid-stride): each block sums |residual + grad| in double and
// writes its partial; the grid is a function of n alone (never of the device), and cub's block
// reduction has a fixed order, so the sum is deterministic. scale_kernel (one block) adds the
// partials in block order and writes s = sum / n as float32 (1 when it is 0) to the scale output.
// Pass 2 (predictive_score_kernel<H, T>, grid-stride): each block copies the weights (at most
// 64 * 20 + 1 floats) to shared memory once; each thread reads s and then, kElems entries at a
// time, reads grad, residual and the H history vectors, writes a and the score. The H + 2 features
// of its entries stay in registers (H is a template argument, 1 to 16), and each weight read from
// shared memory (a broadcast: every thread reads the same word) serves kElems entries.
//
// Cost in passes over n: pass 1 reads grad and residual; pass 2 reads grad, residual and the H
// history vectors and writes the accumulator and the score. With float32 history: 8 + 8 + 4H + 8
// bytes per entry. Every product, sum and quotient is rounded on its own (__fmul_rn, __fadd_rn,
// __fdiv_rn: no fused multiply-add), in the CPU kernel's order, so CPU and CUDA differ only by the
// last bits of log1pf and expf. No trap or assert: NaN or infinite inputs give NaN or infinite
// scores, which the caller detects. No host synchronisation; everything runs on the given stream.
#include <cuda_bf16.h>

#include <cub/block/block_reduce.cuh>

#include "gradsieve/cuda_kernels.h"
#include "radix_select_internal.cuh"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSumItems = 8;          // entries per thread of pass 1 before the grid is capped
constexpr int kMaxSumBlocks = 1024;   // pass 1's grid: a function of n only
constexpr int kMaxWeights = kPredictiveMaxHidden * (kPredictiveMaxHistory + 4) + 1;

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

int sum_blocks(int64_t n) {
  const int64_t per_block = int64_t(kThreads) * kSumItems;
  const int64_t want = (n + per_block - 1) / per_block;
  return static_cast<int>(want < 1 ? 1 : (want > kMaxSumBlocks ? kMaxSumBlocks : want));
}

// sgn with sgn(0) = sgn(-0) = sgn(NaN) = 0.
__device__ __forceinline__ float sign_of(float v) {
  return static_cast<float>((v > 0.0f) - (v < 0.0f));
}

// Pass 1: one double partial of sum |residual + grad| per block.
__global__ void __launch_bounds__(kThreads)
    magnitude_sum_kernel(const float* __restrict__ grad, const float* __restrict__ residual,
                         int64_t n, double* __restrict__ partial) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double sum = 0.0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    sum += fabs(static_cast<double>(__fadd_rn(residual[i], grad[i])));
  }
  const double total = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// The partials in block order, s = sum / n (n >= 1), 1 when s rounds to 0.
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const double* __restrict__ partial, int blocks, int64_t n, float* scale) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double sum = 0.0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) sum += partial[b];
  const double total = Reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) {
    const float s = static_cast<float>(total / static_cast<double>(n));
    *scale = s == 0.0f ? 1.0f : s;  // NaN and inf are kept: the scores show them
  }
}

// n == 0: s = 1.
__global__ void unit_scale_kernel(float* scale) { *scale = 1.0f; }

// Pass 2. H history vectors of type T; kElems entries per thread and step, the i-th of them at
// tile + e * blockDim.x + threadIdx.x, so that every load and store is coalesced.
template <int H, typename T>
__global__ void __launch_bounds__(kThreads)
    predictive_score_kernel(const PredictiveScoreArgs a) {
  constexpr int F = H + 2;
  constexpr int kElems = H <= 8 ? 4 : 2;  // H + 2 features per entry in registers
  __shared__ float w[kMaxWeights];
  const int hidden = a.hidden;
  const int count = hidden * (F + 2) + 1;
  for (int i = threadIdx.x; i < count; i += blockDim.x) w[i] = a.weights[i];
  __syncthreads();
  const float* w1 = w;                // [hidden, F]
  const float* b1 = w + hidden * F;   // [hidden]
  const float* w2 = b1 + hidden;      // [hidden]
  const float b2 = w2[hidden];
  const float s = *a.scale;
  const int64_t n = a.n;
  const int64_t tile = int64_t(kElems) * blockDim.x;
  const int64_t stride = int64_t(gridDim.x) * tile;
  for (int64_t base = int64_t(blockIdx.x) * tile + threadIdx.x; base < n; base += stride) {
    float x[kElems][F];
    float mag[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = base + int64_t(e) * blockDim.x;
      const bool in = i < n;
      const float g = in ? a.grad[i] : 0.0f;
      const float acc = __fadd_rn(in ? a.residual[i] : 0.0f, g);
      if (in) a.accumulator[i] = acc;
      mag[e] = fabsf(acc);
      const float sa = sign_of(acc);
      x[e][0] = log1pf(__fdiv_rn(mag[e], s));
      x[e][1] = log1pf(__fdiv_rn(fabsf(g), s));
#pragma unroll
      for (int j = 0; j < H; ++j) {
        const float v = in ? to_float(static_cast<const T*>(a.history[j])[i]) : 0.0f;
        x[e][2 + j] = __fmul_rn(__fmul_rn(sa, sign_of(v)), log1pf(__fdiv_rn(fabsf(v), s)));
      }
    }
    float logit[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) logit[e] = b2;
    for (int u = 0; u < hidden; ++u) {
      float pre[kElems];
      const float b1u = b1[u];
#pragma unroll
      for (int e = 0; e < kElems; ++e) pre[e] = b1u;
#pragma unroll
      for (int f = 0; f < F; ++f) {
        const float wf = w1[u * F + f];
#pragma unroll
        for (int e = 0; e < kElems; ++e) pre[e] = __fadd_rn(pre[e], __fmul_rn(wf, x[e][f]));
      }
      const float w2u = w2[u];
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        const float z = pre[e] < 0.0f ? 0.0f : pre[e];  // ReLU that keeps a NaN
        logit[e] = __fadd_rn(logit[e], __fmul_rn(w2u, z));
      }
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int64_t i = base + int64_t(e) * blockDim.x;
      if (i >= n) continue;
      const float l = logit[e];
      a.score[i] = a.product
                       ? __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-l))), mag[e])
                       : (l > 20.0f ? l : log1pf(expf(l)));
    }
  }
}

template <int H>
cudaError_t launch_scores(const PredictiveScoreArgs& a, cudaStream_t stream) {
  constexpr int kElems = H <= 8 ? 4 : 2;
  const int grid = radix::grid_size(a.n, kElems);
  if (a.history_dtype == DType::kBFloat16) {
    predictive_score_kernel<H, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(a);
  } else {
    predictive_score_kernel<H, float><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_scores_for(int history_count, const PredictiveScoreArgs& a,
                              cudaStream_t stream) {
  switch (history_count) {
    case 1: return launch_scores<1>(a, stream);
    case 2: return launch_scores<2>(a, stream);
    case 3: return launch_scores<3>(a, stream);
    case 4: return launch_scores<4>(a, stream);
    case 5: return launch_scores<5>(a, stream);
    case 6: return launch_scores<6>(a, stream);
    case 7: return launch_scores<7>(a, stream);
    case 8: return launch_scores<8>(a, stream);
    case 9: return launch_scores<9>(a, stream);
    case 10: return launch_scores<10>(a, stream);
    case 11: return launch_scores<11>(a, stream);
    case 12: return launch_scores<12>(a, stream);
    case 13: return launch_scores<13>(a, stream);
    case 14: return launch_scores<14>(a, stream);
    case 15: return launch_scores<15>(a, stream);
    case 16: return launch_scores<16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
static_assert(kPredictiveMaxHistory == 16, "launch_scores_for covers H = 1 .. 16");

}  // namespace

size_t predictive_score_workspace_bytes(int64_t n) {
  return align_up(sizeof(double) * static_cast<size_t>(sum_blocks(n)));
}

cudaError_t predictive_score(const PredictiveScoreArgs& args, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  if (args.n < 0 || args.history_count < 1 || args.history_count > kPredictiveMaxHistory ||
      args.hidden < 1 || args.hidden > kPredictiveMaxHidden ||
      (args.history_dtype != DType::kFloat32 && args.history_dtype != DType::kBFloat16)) {
    return cudaErrorInvalidValue;
  }
  if (args.n == 0) {
    unit_scale_kernel<<<1, 1, 0, stream>>>(args.scale);
    return cudaGetLastError();
  }
  if (workspace_bytes < predictive_score_workspace_bytes(args.n)) return cudaErrorInvalidValue;
  double* partial = static_cast<double*>(workspace);
  const int blocks = sum_blocks(args.n);
  magnitude_sum_kernel<<<blocks, kThreads, 0, stream>>>(args.grad, args.residual, args.n, partial);
  scale_kernel<<<1, kThreads, 0, stream>>>(partial, blocks, args.n, args.scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_scores_for(args.history_count, args, stream);
}

}  // namespace cuda
}  // namespace gradsieve

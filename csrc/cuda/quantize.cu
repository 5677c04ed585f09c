// Per-chunk absmax int8 quantization and its inverse for the CUDA backend.
//
// One block per chunk: a block-wide max of |x| gives scale = absmax / 127 (NaN when the chunk holds
// a NaN or Inf, so the non-finite step stays visible after decoding), then every entry becomes
// rint(x / scale) or, with stochastic rounding, floor(x / scale + u), u drawn from the counter-based
// generator in radix_key.h, clamped to [-127, 127]. A zero chunk has scale 0 and all-zero codes.
// Cost: two reads of x (the second from L2 for chunks up to a few MiB), one write of q; dequantize
// is one read of q and one write.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>

#include "gradsieve/cuda_kernels.h"
#include "gradsieve/radix_key.h"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ x, int64_t n, int64_t chunk, bool stochastic,
                    uint64_t seed, uint64_t offset, int8_t* __restrict__ q,
                    float* __restrict__ scales) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float chunk_scale;
  const int64_t chunks = (n + chunk - 1) / chunk;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const int64_t start = c * chunk;
    const int64_t end = start + chunk < n ? start + chunk : n;
    float amax = 0.0f;
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
      const float v = fabsf(to_float(x[i]));
      // NaN and Inf both become +inf here, which marks the chunk non-finite.
      amax = (v != v || v > amax) ? (v != v ? __int_as_float(0x7F800000) : v) : amax;
    }
    const float block_max = Reduce(tmp).Reduce(amax, [](float a, float b) { return a > b ? a : b; });
    if (threadIdx.x == 0) {
      chunk_scale = isinf(block_max) ? __int_as_float(0x7FC00000) : block_max / 127.0f;
      scales[c] = chunk_scale;
    }
    __syncthreads();
    const float scale = chunk_scale;
    const bool usable = scale > 0.0f;  // false for 0 and NaN
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
      float code = 0.0f;
      if (usable) {
        const float r = to_float(x[i]) / scale;
        code = stochastic ? floorf(r + uniform_from_counter(seed, offset + uint64_t(i))) : rintf(r);
        code = fminf(fmaxf(code, -127.0f), 127.0f);
      }
      q[i] = static_cast<int8_t>(code);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void dequantize_kernel(const int8_t* __restrict__ q, const float* __restrict__ scales,
                                  int64_t n, int64_t chunk, T* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = from_float<T>(static_cast<float>(q[i]) * scales[i / chunk]);
  }
}

int grid_cap() {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms * 16;
}

}  // namespace

cudaError_t quantize_int8(const void* x, DType dtype, int64_t n, int64_t chunk, bool stochastic,
                          uint64_t seed, uint64_t offset, int8_t* q, float* scales,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (chunk <= 0) return cudaErrorInvalidValue;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t cap = int64_t(grid_cap()) * 4;
  const unsigned grid = static_cast<unsigned>(chunks < cap ? chunks : cap);
  switch (dtype) {
    case DType::kFloat32:
      quantize_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(x), n, chunk,
                                                     stochastic, seed, offset, q, scales);
      break;
    case DType::kFloat16:
      quantize_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(x), n, chunk,
                                                     stochastic, seed, offset, q, scales);
      break;
    case DType::kBFloat16:
      quantize_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), n,
                                                     chunk, stochastic, seed, offset, q, scales);
      break;
  }
  return cudaGetLastError();
}

cudaError_t dequantize_int8(const int8_t* q, const float* scales, int64_t n, int64_t chunk,
                            void* out, DType out_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (chunk <= 0) return cudaErrorInvalidValue;
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int64_t cap = grid_cap();
  const unsigned grid = static_cast<unsigned>(want < cap ? want : cap);
  switch (out_dtype) {
    case DType::kFloat32:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(q, scales, n, chunk,
                                                       static_cast<float*>(out));
      break;
    case DType::kFloat16:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(q, scales, n, chunk,
                                                       static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      dequantize_kernel<<<grid, kThreads, 0, stream>>>(q, scales, n, chunk,
                                                       static_cast<__nv_bfloat16*>(out));
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradsieve

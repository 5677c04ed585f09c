// Sparse decode for the CUDA backend: out[indices[j]] += values[j] (dequantized when int8).
//
// One thread per payload entry with an atomic add into the dense buffer, so duplicate indices (the
// same coordinate chosen by several workers) add up. Cost: one read of the payloads and one
// read-modify-write per entry. The atomics make the summation order, and so the last bit of fp32
// sums with duplicates, depend on scheduling; the CPU backend is sequential and deterministic.
//
// Hostile payloads: an entry whose index lies outside [0, out_n) is skipped and, when flags are
// given, sets its payload's flag (bad[j / per] = 1, a plain store of the same value by every
// thread that finds one). The kernel never writes outside out and never stops the context.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gradsieve/cuda_kernels.h"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename O, typename I, typename V>
__global__ void __launch_bounds__(kThreads)
    sparse_accumulate_kernel(O* __restrict__ out, int64_t out_n, const I* __restrict__ indices,
                             const V* __restrict__ values, const float* __restrict__ scales,
                             int64_t chunk, int64_t m, int32_t* __restrict__ bad, int64_t per) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += stride) {
    const int64_t i = static_cast<int64_t>(indices[j]);
    if (i < 0 || i >= out_n) {
      if (bad != nullptr) bad[j / per] = 1;
      continue;
    }
    float v = to_float(values[j]);
    if (scales != nullptr) v *= scales[j / chunk];
    atomicAdd(out + i, from_float<O>(v));
  }
}

template <typename O, typename I>
void launch_for_values(O* out, int64_t out_n, const I* indices, const void* values,
                       DType values_dtype, bool values_int8, const float* scales, int64_t chunk,
                       int64_t m, int32_t* bad, int64_t per, unsigned grid,
                       cudaStream_t stream) {
  if (values_int8) {
    sparse_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
        out, out_n, indices, static_cast<const int8_t*>(values), scales, chunk, m, bad, per);
    return;
  }
  switch (values_dtype) {
    case DType::kFloat32:
      sparse_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
          out, out_n, indices, static_cast<const float*>(values), scales, chunk, m, bad, per);
      break;
    case DType::kFloat16:
      sparse_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
          out, out_n, indices, static_cast<const __half*>(values), scales, chunk, m, bad, per);
      break;
    case DType::kBFloat16:
      sparse_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
          out, out_n, indices, static_cast<const __nv_bfloat16*>(values), scales, chunk, m, bad,
          per);
      break;
  }
}

template <typename O>
void launch_for_indices(O* out, int64_t out_n, const void* indices, bool indices_int64,
                        const void* values, DType values_dtype, bool values_int8,
                        const float* scales, int64_t chunk, int64_t m, int32_t* bad,
                        int64_t per, unsigned grid, cudaStream_t stream) {
  if (indices_int64) {
    launch_for_values(out, out_n, static_cast<const int64_t*>(indices), values, values_dtype,
                      values_int8, scales, chunk, m, bad, per, grid, stream);
  } else {
    launch_for_values(out, out_n, static_cast<const int32_t*>(indices), values, values_dtype,
                      values_int8, scales, chunk, m, bad, per, grid, stream);
  }
}

}  // namespace

cudaError_t sparse_accumulate(void* out, DType out_dtype, int64_t out_n, const void* indices,
                              bool indices_int64, const void* values, DType values_dtype,
                              bool values_int8, const float* scales, int64_t chunk, int64_t m,
                              int32_t* bad, int64_t payloads, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  if (values_int8 && (scales == nullptr || chunk <= 0)) return cudaErrorInvalidValue;
  if (bad != nullptr && (payloads <= 0 || m % payloads != 0)) return cudaErrorInvalidValue;
  const int64_t per = bad != nullptr ? m / payloads : m;
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (m + kThreads - 1) / kThreads;
  const int64_t cap = int64_t(sms) * 16;
  const unsigned grid = static_cast<unsigned>(want < cap ? want : cap);
  switch (out_dtype) {
    case DType::kFloat32:
      launch_for_indices(static_cast<float*>(out), out_n, indices, indices_int64, values,
                         values_dtype, values_int8, scales, chunk, m, bad, per, grid, stream);
      break;
    case DType::kFloat16:
      launch_for_indices(static_cast<__half*>(out), out_n, indices, indices_int64, values,
                         values_dtype, values_int8, scales, chunk, m, bad, per, grid, stream);
      break;
    case DType::kBFloat16:
      launch_for_indices(static_cast<__nv_bfloat16*>(out), out_n, indices, indices_int64,
                         values, values_dtype, values_int8, scales, chunk, m, bad, per, grid,
                         stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradsieve

// Radix select on |x| for the CUDA backend: topk_abs, quantile_abs, ef_topk_, threshold_select,
// and select_by_score (the selection of regtopk_select_, csrc/cuda/regtopk.cu).
//
// Algorithm. Keys are the order-preserving magnitudes of radix_key.h. Three histogram passes (11,
// 11 and 10 bits, most significant digit first) each count, in shared memory, the digit of every
// key that still matches the prefix fixed so far; a one-block kernel then scans the histogram from
// the top and fixes the next digit of the k-th largest key. Nothing returns to the host between
// passes: the running prefix and the rank still to find live in a small device-side state. The
// selection then counts, per tile of 4096 entries, keys above the cut and keys equal to it, scans
// those counts (CUB), and writes each selected entry at its rank, so the output is in ascending
// index order and ties at the cut go to the lower indices.
//
// Cost in passes over x: 3 histogram reads + 1 count read + 1 write read = 5 reads (ef_topk_ fuses
// the accumulate into the first: grad read, residual read + write). Candidate compaction and a
// one-read bracketed variant are the next steps.
// adaptive.cu builds adaptive_select's two selects from these kernels (radix_select_internal.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_load.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include "gradsieve/cuda_kernels.h"
#include "gradsieve/radix_key.h"
#include "radix_select_internal.cuh"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

// The constants, the select state and the workspace layout (radix_select_internal.cuh, shared
// with adaptive.cu).
using radix::kItems;
using radix::kScanThreads;
using radix::kThreads;
using radix::kTile;
using radix::kUnlimited;
using radix::Key;
using radix::SelectState;
using radix::Workspace;

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

int64_t num_tiles(int64_t n) { return (n + kTile - 1) / kTile; }

size_t scan_scratch_bytes(int64_t tiles) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<unsigned long long*>(nullptr),
                                static_cast<unsigned long long*>(nullptr),
                                static_cast<int>(tiles > 0 ? tiles : 1));
  return bytes;
}

size_t workspace_bytes_for(int64_t n) {
  const int64_t tiles = num_tiles(n) > 0 ? num_tiles(n) : 1;
  return align_up(sizeof(SelectState)) + align_up(sizeof(unsigned) * RadixDigits::kMaxBins) +
         2 * align_up(sizeof(unsigned long long) * tiles) + align_up(scan_scratch_bytes(tiles));
}

Workspace carve(void* base, int64_t n) {
  const int64_t tiles = num_tiles(n) > 0 ? num_tiles(n) : 1;
  char* p = static_cast<char*>(base);
  Workspace w;
  w.state = reinterpret_cast<SelectState*>(p);
  p += align_up(sizeof(SelectState));
  w.hist = reinterpret_cast<unsigned*>(p);
  p += align_up(sizeof(unsigned) * RadixDigits::kMaxBins);
  w.tile_counts = reinterpret_cast<unsigned long long*>(p);
  p += align_up(sizeof(unsigned long long) * tiles);
  w.tile_offsets = reinterpret_cast<unsigned long long*>(p);
  p += align_up(sizeof(unsigned long long) * tiles);
  w.scan_tmp = p;
  w.scan_bytes = align_up(scan_scratch_bytes(tiles));
  return w;
}

int grid_for(int64_t n, int per_thread) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t want = (n + int64_t(kThreads) * per_thread - 1) / (int64_t(kThreads) * per_thread);
  const int64_t cap = int64_t(sms) * 8;
  return static_cast<int>(want < 1 ? 1 : (want > cap ? cap : want));
}

__global__ void init_state_kernel(SelectState* st, unsigned long long k, const float* threshold) {
  st->k_remaining = k;
  st->need_equal = 0;
  st->passed = 0;
  st->prefix = 0;
  st->cut_key = 0;
  st->threshold_key = threshold ? AbsKeyTraits::threshold_key(*threshold) : 0u;
  st->has_nan = 0;
}

// Histogram of digit `pass` over the keys of x that match the prefix fixed so far.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const T* __restrict__ x, int64_t n, int pass, const SelectState* st,
                     unsigned* __restrict__ hist) {
  __shared__ unsigned local[RadixDigits::kMaxBins];
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const Key mask = RadixDigits::prefix_mask(pass);
  const Key prefix = st->prefix;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const Key key = AbsKeyTraits::from_float(to_float(x[i]));
    if ((key & mask) == prefix) atomicAdd(&local[RadixDigits::digit(key, pass)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) {
    if (local[b]) atomicAdd(&hist[b], local[b]);
  }
}

// First pass of ef_topk_: acc = residual + scale * grad written to out (residual itself for
// ef_topk_, another buffer for ef_topk_into), histogram of the top digit, and (when nonfinite is
// given) 1 stored there by any thread that reads a non-finite grad entry.
// __fmul_rn/__fadd_rn keep the two roundings of the eager reference (no fused multiply-add).
template <typename G>
__global__ void __launch_bounds__(kThreads)
    ef_accumulate_histogram_kernel(const float* residual, float* out, const G* __restrict__ grad,
                                   int64_t n, float scale, unsigned* __restrict__ hist,
                                   int* __restrict__ nonfinite) {
  __shared__ unsigned local[RadixDigits::kMaxBins];
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_float(grad[i]);
    const float acc = __fadd_rn(residual[i], __fmul_rn(scale, g));
    out[i] = acc;
    if (nonfinite != nullptr && !isfinite(g)) *nonfinite = 1;
    atomicAdd(&local[RadixDigits::digit(AbsKeyTraits::from_float(acc), 0)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) {
    if (local[b]) atomicAdd(&hist[b], local[b]);
  }
}

// Fixes digit `pass` of the k-th largest key: scans the histogram from the top bin down, finds the
// bin holding rank k_remaining, and clears the histogram for the next pass.
__global__ void __launch_bounds__(kScanThreads)
    choose_digit_kernel(unsigned* __restrict__ hist, int pass, SelectState* st) {
  using Scan = cub::BlockScan<unsigned, kScanThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  const int nbins = 1 << RadixDigits::bits(pass);
  unsigned counts[2];
  int bins[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = 2 * threadIdx.x + j;  // r-th bin counted from the top
    bins[j] = nbins - 1 - r;
    counts[j] = r < nbins ? hist[bins[j]] : 0u;
  }
  unsigned before[2];
  Scan(scan_tmp).ExclusiveSum(counts, before);
  const unsigned long long k = st->k_remaining;
  const unsigned nan_count = (pass == 0 && threadIdx.x == 0) ? hist[RadixDigits::kMaxBins - 1] : 0u;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (counts[j] > 0 && before[j] < k && k <= before[j] + counts[j]) {
      st->prefix |= static_cast<Key>(bins[j]) << RadixDigits::shift(pass);
      st->k_remaining = k - before[j];
    }
  }
  if (pass == 0 && threadIdx.x == 0) st->has_nan = nan_count > 0 ? 1u : 0u;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (2 * threadIdx.x + j < nbins) hist[bins[j]] = 0u;
  }
}

// Top-k rule: cut at the k-th largest key, keep the first k_remaining keys equal to it.
// Threshold rule (threshold_select): everything >= threshold when at most `capacity` pass.
__global__ void finalize_kernel(SelectState* st, bool threshold_mode, bool select_ran,
                                unsigned long long capacity, int64_t* count_out) {
  if (threshold_mode) {
    *count_out = static_cast<int64_t>(st->passed);
    if (!select_ran || st->passed <= capacity) {
      st->cut_key = st->threshold_key;
      st->need_equal = kUnlimited;
      return;
    }
  }
  st->cut_key = st->prefix;
  st->need_equal = st->k_remaining;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    count_at_least_kernel(const T* __restrict__ x, int64_t n, SelectState* st) {
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Key tkey = st->threshold_key;
  unsigned long long c = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    c += AbsKeyTraits::from_float(to_float(x[i])) >= tkey ? 1ull : 0ull;
  }
  const unsigned long long total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0 && total) atomicAdd(&st->passed, total);
}

// Per tile: (keys above the cut) << 32 | (keys equal to the cut).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tile_count_kernel(const T* __restrict__ x, int64_t n, const SelectState* st,
                      unsigned long long* __restrict__ tile_counts) {
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Key cut = st->cut_key;
  const int64_t start = int64_t(blockIdx.x) * kTile;
  const int64_t end = start + kTile < n ? start + kTile : n;
  unsigned long long packed = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    const Key key = AbsKeyTraits::from_float(to_float(x[i]));
    packed += key > cut ? (1ull << 32) : (key == cut ? 1ull : 0ull);
  }
  const unsigned long long total = Reduce(tmp).Sum(packed);
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

// Writes the selected entries of one tile at their global ranks. The values written are x's, or,
// with kFromSource (select_by_score: x is then the score), those of `source`. With kClearSelected
// (ef_topk_, select_by_score) the selected entries of x, or of source with kFromSource, are set
// to zero. kFromSource is a template argument, not a null test, so that the other ops' kernels
// keep their register count (ptxas: 64 instead of 80 for the 16-bit types).
template <typename T, typename V, bool kClearSelected, bool kFromSource = false>
__global__ void __launch_bounds__(kThreads)
    tile_write_kernel(T* __restrict__ x, int64_t n, const SelectState* st,
                      const unsigned long long* __restrict__ tile_offsets, V* __restrict__ values,
                      int64_t* __restrict__ indices, float* __restrict__ source) {
  using Load = cub::BlockLoad<T, kThreads, kItems, cub::BLOCK_LOAD_TRANSPOSE>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename Load::TempStorage load;
    typename Scan::TempStorage scan;
  } tmp;
  const Key cut = st->cut_key;
  const unsigned long long need = st->need_equal;
  const int64_t start = int64_t(blockIdx.x) * kTile;
  const int valid = static_cast<int>(n - start < kTile ? n - start : kTile);
  T items[kItems];
  Load(tmp.load).Load(x + start, items, valid, from_float<T>(0.0f));
  __syncthreads();
  unsigned long long mine = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int local = threadIdx.x * kItems + j;
    const Key key = AbsKeyTraits::from_float(to_float(items[j]));
    if (local < valid) mine += key > cut ? (1ull << 32) : (key == cut ? 1ull : 0ull);
  }
  unsigned long long before;
  Scan(tmp.scan).ExclusiveSum(mine, before);
  const unsigned long long base = tile_offsets[blockIdx.x] + before;
  unsigned long long greater = base >> 32;
  unsigned long long equal = base & 0xFFFFFFFFull;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int local = threadIdx.x * kItems + j;
    if (local >= valid) break;
    const Key key = AbsKeyTraits::from_float(to_float(items[j]));
    bool take = false;
    unsigned long long pos = 0;
    if (key > cut) {
      take = true;
      pos = greater + (equal < need ? equal : need);
      ++greater;
    } else if (key == cut) {
      take = equal < need;
      pos = greater + equal;
      ++equal;
    }
    if (take) {
      const int64_t i = start + local;
      indices[pos] = i;
      if constexpr (kFromSource) {
        values[pos] = static_cast<V>(source[i]);
        if (kClearSelected) source[i] = 0.0f;
      } else {
        values[pos] = static_cast<V>(items[j]);
        if (kClearSelected) x[i] = from_float<T>(0.0f);
      }
    }
  }
}

__global__ void quantile_output_kernel(const SelectState* st, bool empty, float* out_f32,
                                       __half* out_f16, __nv_bfloat16* out_bf16) {
  float v;
  if (empty || st->has_nan) {
    v = __int_as_float(0x7FC00000);
  } else {
    v = __uint_as_float(st->prefix);
  }
  if (out_f32) *out_f32 = v;
  if (out_f16) *out_f16 = __float2half_rn(v);
  if (out_bf16) *out_bf16 = __float2bfloat16_rn(v);
}

// The three histogram passes that find the k-th largest key of x (k >= 1). For ef_topk_ the
// first pass is the fused accumulate (done by the caller), so `first_pass` is then 1.
template <typename T>
cudaError_t find_kth(const T* x, int64_t n, int first_pass, const Workspace& w,
                     cudaStream_t stream) {
  const int grid = grid_for(n, 8);
  for (int pass = first_pass; pass < RadixDigits::kPasses; ++pass) {
    histogram_kernel<T><<<grid, kThreads, 0, stream>>>(x, n, pass, w.state, w.hist);
    choose_digit_kernel<<<1, kScanThreads, 0, stream>>>(w.hist, pass, w.state);
  }
  return cudaGetLastError();
}

// Count per tile, scan, write: the selection pass shared by every op that outputs entries.
template <typename T, typename V, bool kClearSelected, bool kFromSource = false>
cudaError_t write_selection(T* x, int64_t n, const Workspace& w, V* values, int64_t* indices,
                            cudaStream_t stream, float* source = nullptr) {
  const int64_t tiles = num_tiles(n);
  tile_count_kernel<T><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(x, n, w.state,
                                                                              w.tile_counts);
  size_t scan_bytes = w.scan_bytes;
  cudaError_t err = cub::DeviceScan::ExclusiveSum(w.scan_tmp, scan_bytes, w.tile_counts,
                                                  w.tile_offsets, static_cast<int>(tiles), stream);
  if (err != cudaSuccess) return err;
  tile_write_kernel<T, V, kClearSelected, kFromSource>
      <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      x, n, w.state, w.tile_offsets, values, indices, source);
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_abs_typed(const T* x, int64_t n, int64_t k, T* values, int64_t* indices,
                           const Workspace& w, cudaStream_t stream) {
  cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream);
  init_state_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(k), nullptr);
  cudaError_t err = find_kth(x, n, 0, w, stream);
  if (err != cudaSuccess) return err;
  finalize_kernel<<<1, 1, 0, stream>>>(w.state, false, true, 0, nullptr);
  return write_selection<T, T, false>(const_cast<T*>(x), n, w, values, indices, stream);
}

template <typename T>
cudaError_t quantile_abs_typed(const T* x, int64_t n, double q, void* out, const Workspace& w,
                               cudaStream_t stream) {
  float* out_f32 = nullptr;
  __half* out_f16 = nullptr;
  __nv_bfloat16* out_bf16 = nullptr;
  if (sizeof(T) == 4) out_f32 = static_cast<float*>(out);
  else if (std::is_same<T, __half>::value) out_f16 = static_cast<__half*>(out);
  else out_bf16 = static_cast<__nv_bfloat16*>(out);
  if (n == 0) {
    quantile_output_kernel<<<1, 1, 0, stream>>>(w.state, true, out_f32, out_f16, out_bf16);
    return cudaGetLastError();
  }
  // The ascending rank floor(q * (n - 1)) is the (n - rank)-th largest.
  const int64_t rank = static_cast<int64_t>(q * static_cast<double>(n - 1));
  const int64_t k = n - rank;
  cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream);
  init_state_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(k), nullptr);
  cudaError_t err = find_kth(x, n, 0, w, stream);
  if (err != cudaSuccess) return err;
  quantile_output_kernel<<<1, 1, 0, stream>>>(w.state, false, out_f32, out_f16, out_bf16);
  return cudaGetLastError();
}

// ef_topk_ (out == residual) and ef_topk_into (out another buffer, nonfinite its flag).
template <typename G>
cudaError_t ef_topk_typed(const float* residual, float* out, const G* grad, int64_t n, int64_t k,
                          float scale, float* values, int64_t* indices, int* nonfinite,
                          const Workspace& w, cudaStream_t stream) {
  cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream);
  init_state_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(k), nullptr);
  ef_accumulate_histogram_kernel<G><<<grid_for(n, 8), kThreads, 0, stream>>>(
      residual, out, grad, n, scale, w.hist, nonfinite);
  if (k == 0) return cudaGetLastError();
  choose_digit_kernel<<<1, kScanThreads, 0, stream>>>(w.hist, 0, w.state);
  cudaError_t err = find_kth<float>(out, n, 1, w, stream);
  if (err != cudaSuccess) return err;
  finalize_kernel<<<1, 1, 0, stream>>>(w.state, false, true, 0, nullptr);
  return write_selection<float, float, true>(out, n, w, values, indices, stream);
}

// The top k of a float score buffer; the values come from (and are cleared in) `source`.
cudaError_t select_by_score_impl(const float* score, float* source, int64_t n, int64_t k,
                                 float* values, int64_t* indices, const Workspace& w,
                                 cudaStream_t stream) {
  cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream);
  init_state_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(k), nullptr);
  cudaError_t err = find_kth(score, n, 0, w, stream);
  if (err != cudaSuccess) return err;
  finalize_kernel<<<1, 1, 0, stream>>>(w.state, false, true, 0, nullptr);
  // With kFromSource the score is only read; the cast serves the shared kernel signature.
  return write_selection<float, float, true, true>(const_cast<float*>(score), n, w, values,
                                                   indices, stream, source);
}

template <typename T>
cudaError_t threshold_select_typed(const T* x, int64_t n, const float* threshold,
                                   int64_t capacity, T* values, int64_t* indices, int64_t* count,
                                   const Workspace& w, cudaStream_t stream) {
  init_state_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(capacity),
                                         threshold);
  if (n > 0) {
    count_at_least_kernel<T><<<grid_for(n, 8), kThreads, 0, stream>>>(x, n, w.state);
  }
  // The overflow case needs the capacity-th largest key; with capacity >= n it cannot overflow.
  const bool select_ran = capacity > 0 && capacity < n;
  if (select_ran) {
    cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream);
    cudaError_t err = find_kth(x, n, 0, w, stream);
    if (err != cudaSuccess) return err;
  }
  finalize_kernel<<<1, 1, 0, stream>>>(w.state, true, select_ran,
                                       static_cast<unsigned long long>(capacity), count);
  if (n == 0 || capacity == 0) return cudaGetLastError();
  return write_selection<T, T, false>(const_cast<T*>(x), n, w, values, indices, stream);
}

}  // namespace

// The building blocks of radix_select_internal.cuh.
namespace radix {

size_t select_workspace_bytes(int64_t n) { return workspace_bytes_for(n); }
Workspace carve_workspace(void* base, int64_t n) { return carve(base, n); }
int grid_size(int64_t n, int per_thread) { return grid_for(n, per_thread); }

cudaError_t launch_choose_digit(const Workspace& w, int pass, cudaStream_t stream) {
  choose_digit_kernel<<<1, kScanThreads, 0, stream>>>(w.hist, pass, w.state);
  return cudaGetLastError();
}

cudaError_t find_kth_float(const float* x, int64_t n, int first_pass, const Workspace& w,
                           cudaStream_t stream) {
  return find_kth<float>(x, n, first_pass, w, stream);
}

cudaError_t launch_finalize(const Workspace& w, bool threshold_mode, bool select_ran,
                            unsigned long long capacity, int64_t* count_out, cudaStream_t stream) {
  finalize_kernel<<<1, 1, 0, stream>>>(w.state, threshold_mode, select_ran, capacity, count_out);
  return cudaGetLastError();
}

cudaError_t write_selection_float(const float* x, int64_t n, const Workspace& w, float* values,
                                  int64_t* indices, cudaStream_t stream) {
  // Without kClearSelected x is only read; the cast serves the shared kernel signature.
  return write_selection<float, float, false>(const_cast<float*>(x), n, w, values, indices,
                                              stream);
}

}  // namespace radix

size_t topk_abs_workspace_bytes(int64_t n) { return workspace_bytes_for(n); }
size_t quantile_abs_workspace_bytes(int64_t n) { return workspace_bytes_for(n); }
size_t ef_topk_workspace_bytes(int64_t n) { return workspace_bytes_for(n); }
size_t threshold_select_workspace_bytes(int64_t n) { return workspace_bytes_for(n); }
size_t select_by_score_workspace_bytes(int64_t n) { return workspace_bytes_for(n); }

cudaError_t topk_abs(const void* x, DType dtype, int64_t n, int64_t k, void* values,
                     int64_t* indices, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream) {
  if (k == 0 || n == 0) return cudaSuccess;
  if (workspace_bytes < workspace_bytes_for(n)) return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, n);
  switch (dtype) {
    case DType::kFloat32:
      return topk_abs_typed(static_cast<const float*>(x), n, k, static_cast<float*>(values),
                            indices, w, stream);
    case DType::kFloat16:
      return topk_abs_typed(static_cast<const __half*>(x), n, k, static_cast<__half*>(values),
                            indices, w, stream);
    case DType::kBFloat16:
      return topk_abs_typed(static_cast<const __nv_bfloat16*>(x), n, k,
                            static_cast<__nv_bfloat16*>(values), indices, w, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t quantile_abs(const void* x, DType dtype, int64_t n, double q, void* out,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace_bytes < workspace_bytes_for(n)) return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, n);
  switch (dtype) {
    case DType::kFloat32:
      return quantile_abs_typed(static_cast<const float*>(x), n, q, out, w, stream);
    case DType::kFloat16:
      return quantile_abs_typed(static_cast<const __half*>(x), n, q, out, w, stream);
    case DType::kBFloat16:
      return quantile_abs_typed(static_cast<const __nv_bfloat16*>(x), n, q, out, w, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ef_topk_into(const float* residual, float* out, const void* grad, DType grad_dtype,
                         int64_t n, int64_t k, float scale, float* values, int64_t* indices,
                         int* nonfinite, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (workspace_bytes < workspace_bytes_for(n)) return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, n);
  switch (grad_dtype) {
    case DType::kFloat32:
      return ef_topk_typed(residual, out, static_cast<const float*>(grad), n, k, scale, values,
                           indices, nonfinite, w, stream);
    case DType::kFloat16:
      return ef_topk_typed(residual, out, static_cast<const __half*>(grad), n, k, scale, values,
                           indices, nonfinite, w, stream);
    case DType::kBFloat16:
      return ef_topk_typed(residual, out, static_cast<const __nv_bfloat16*>(grad), n, k, scale,
                           values, indices, nonfinite, w, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ef_topk(float* residual, const void* grad, DType grad_dtype, int64_t n, int64_t k,
                    float scale, float* values, int64_t* indices, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  return ef_topk_into(residual, residual, grad, grad_dtype, n, k, scale, values, indices, nullptr,
                      workspace, workspace_bytes, stream);
}

cudaError_t select_by_score(const float* score, float* source, int64_t n, int64_t k,
                            float* values, int64_t* indices, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  if (k == 0 || n == 0) return cudaSuccess;
  if (workspace_bytes < workspace_bytes_for(n)) return cudaErrorInvalidValue;
  return select_by_score_impl(score, source, n, k, values, indices, carve(workspace, n), stream);
}

cudaError_t threshold_select(const void* x, DType dtype, int64_t n, const float* threshold,
                             int64_t capacity, void* values, int64_t* indices, int64_t* count,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (workspace_bytes < workspace_bytes_for(n)) return cudaErrorInvalidValue;
  const Workspace w = carve(workspace, n);
  switch (dtype) {
    case DType::kFloat32:
      return threshold_select_typed(static_cast<const float*>(x), n, threshold, capacity,
                                    static_cast<float*>(values), indices, count, w, stream);
    case DType::kFloat16:
      return threshold_select_typed(static_cast<const __half*>(x), n, threshold, capacity,
                                    static_cast<__half*>(values), indices, count, w, stream);
    case DType::kBFloat16:
      return threshold_select_typed(static_cast<const __nv_bfloat16*>(x), n, threshold, capacity,
                                    static_cast<__nv_bfloat16*>(values), indices, count, w,
                                    stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gradsieve

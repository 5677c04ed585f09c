// CUDA kernels of the adaptive compressor and of the csr16 wire index: adaptive_select
// and csr16_indices (contracts: python/gradsieve/ops.py; CPU kernels:
// csrc/cpu/adaptive_kernels.cpp).
//
// adaptive_select. Pass 1 (grid-stride): a = residual + grad, average_out = alpha * |a| +
// (1 - alpha) * average, and the histogram of the top digit of |average_out| (radix_key.h). The
// radix select of radix_select.cu then fixes the two lower digits (two more reads of average_out)
// and a one-thread kernel writes the threshold (the ascending rank floor(q * (n - 1)) of
// |average_out|, NaN when it holds a NaN) to the output and resets the select state. Pass 2: the
// mask, the momentum blend Q (written to a workspace buffer), residual_out, the number of Q != 0
// (block sums, one atomic per block) and, when the overflow select can run (0 < capacity < n),
// the top-digit histogram of the nonzero keys of Q. The candidates are every Q != 0 (key >= 1)
// when at most `capacity` are nonzero, else the capacity largest |Q|: that decision is made on
// the device (finalize_kernel's threshold rule, as threshold_select's), and the two lower-digit
// histogram passes over Q return at once when nothing overflowed. The selection (count per tile,
// scan, write) is radix_select.cu's. No host synchronisation anywhere.
//
// Cost in passes over n: pass 1 (grad, residual, average read, average_out written), 2 reads of
// average_out, pass 2 (grad, residual, momentum read, average_out read with compare_average,
// residual_out and Q written), then, with capacity > 0, 2 reads of Q (tile count, write) and,
// only when more than `capacity` entries are nonzero, 2 more reads of Q (histograms): 6 passes
// (8 on overflow, 4 with capacity 0). Every float operation is rounded on its own (__fmul_rn,
// __fadd_rn, __fsub_rn, __fdiv_rn: no fused multiply-add), so the results are bitwise the CPU
// kernel's (NaN payloads aside).
//
// csr16_indices. One block per rank scans max(counts, 0) into int64 block ends (workspace); then
// one thread per slot finds its block by binary search (the first block whose end exceeds the
// slot) and writes block * 65536 + offset, or -1 for slots beyond valid, beyond the sum of the
// counts, or at a position >= numel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "gradsieve/cuda_kernels.h"
#include "gradsieve/radix_key.h"
#include "radix_select_internal.cuh"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

using radix::Key;
using radix::kThreads;
using radix::SelectState;
using radix::Workspace;

constexpr int64_t kMaxBlocks = 4096;
constexpr int64_t kCsr16Block = int64_t(1) << 16;

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

// The blend buffer Q, at the start of adaptive_select's workspace (the select's follows it).
size_t blend_bytes(int64_t n) {
  return align_up(sizeof(float) * static_cast<size_t>(n > 0 ? n : 1));
}

unsigned blocks_for(int64_t count) {
  const int64_t want = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > kMaxBlocks ? kMaxBlocks : want));
}

// ------------------------------------------------------------------------------ adaptive_select
// Pass 1: the moving average of |a|, a = residual + grad, and the histogram of the top digit of
// its key (every entry counts: the threshold is an order statistic of all of them).
template <typename G>
__global__ void __launch_bounds__(kThreads)
    adaptive_average_kernel(const G* __restrict__ grad, const float* __restrict__ residual,
                            const float* __restrict__ average, int64_t n, float alpha_f,
                            float keep_f, float* __restrict__ average_out,
                            unsigned* __restrict__ hist) {
  __shared__ unsigned local[RadixDigits::kMaxBins];
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float a = __fadd_rn(residual[i], to_float(grad[i]));
    const float ma = __fadd_rn(__fmul_rn(alpha_f, fabsf(a)), __fmul_rn(keep_f, average[i]));
    average_out[i] = ma;
    atomicAdd(&local[RadixDigits::digit(AbsKeyTraits::from_float(ma), 0)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) {
    if (local[b]) atomicAdd(&hist[b], local[b]);
  }
}

// The state of the quantile select: the k-th largest key of |average_out|.
__global__ void adaptive_init_kernel(SelectState* st, unsigned long long k) {
  st->k_remaining = k;
  st->need_equal = 0;
  st->passed = 0;
  st->prefix = 0;
  st->cut_key = 0;
  st->threshold_key = 0;
  st->has_nan = 0;
}

// After the quantile select: the threshold to the output (NaN when average_out holds a NaN), and
// the state reset for the select over Q: the capacity-th largest key, and the threshold rule
// key >= 1 (Q != 0, NaN included) for the case where at most `capacity` entries are nonzero.
// The histogram is already clear (choose_digit_kernel clears every bin it reads).
__global__ void adaptive_threshold_kernel(SelectState* st, float* threshold,
                                          unsigned long long capacity) {
  *threshold = st->has_nan ? __int_as_float(0x7FC00000) : __uint_as_float(st->prefix);
  st->k_remaining = capacity;
  st->need_equal = 0;
  st->passed = 0;
  st->prefix = 0;
  st->cut_key = 0;
  st->threshold_key = 1u;
  st->has_nan = 0;
}

// Pass 2: mask, blend with the momentum, what stays behind; counts the nonzero Q into
// st->passed and, with kHistogram, builds the top-digit histogram of the nonzero keys of Q. Zero
// keys are left out of it: the overflow select looks for rank capacity < (number of nonzero
// keys), which zeros (the smallest keys) cannot change, and leaving them out spares the shared
// counter of bin 0 the contention of a mostly-zero Q.
template <typename G, bool kHistogram>
__global__ void __launch_bounds__(kThreads)
    adaptive_blend_kernel(const G* __restrict__ grad, const float* __restrict__ residual,
                          const float* __restrict__ average_out,
                          const float* __restrict__ momentum, int64_t n,
                          const float* __restrict__ threshold, float beta_f, float carry_f,
                          bool compare_average, bool error_feedback,
                          float* __restrict__ residual_out, float* __restrict__ blended,
                          SelectState* st, unsigned* __restrict__ hist) {
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_tmp;
  __shared__ unsigned local[kHistogram ? RadixDigits::kMaxBins : 1];
  if constexpr (kHistogram) {
    for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) local[b] = 0;
    __syncthreads();
  }
  const float thr = *threshold;
  unsigned long long nonzero = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float a = __fadd_rn(residual[i], to_float(grad[i]));
    const float key = compare_average ? average_out[i] : fabsf(a);
    const float m = key >= thr ? a : 0.0f;
    const float q = __fadd_rn(__fmul_rn(beta_f, m), __fmul_rn(carry_f, momentum[i]));
    blended[i] = q;
    const float left = error_feedback ? __fsub_rn(a, m) : 0.0f;
    residual_out[i] = __fadd_rn(left, __fdiv_rn(q, beta_f));
    nonzero += q != 0.0f ? 1ull : 0ull;  // NaN != 0: counts
    if constexpr (kHistogram) {
      const Key qkey = AbsKeyTraits::from_float(q);
      if (qkey != 0u) atomicAdd(&local[RadixDigits::digit(qkey, 0)], 1u);
    }
  }
  const unsigned long long total = Reduce(reduce_tmp).Sum(nonzero);
  if (threadIdx.x == 0 && total) atomicAdd(&st->passed, total);
  if constexpr (kHistogram) {
    __syncthreads();
    for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) {
      if (local[b]) atomicAdd(&hist[b], local[b]);
    }
  }
}

// A lower-digit histogram pass of the select over Q (radix_select.cu's histogram_kernel, zero
// keys left out as above), run only when more than `capacity` entries of Q are nonzero: otherwise
// every block returns at once (a block-uniform test, before any barrier), the histogram stays
// clear and choose_digit_kernel finds nothing, which finalize_kernel then ignores.
__global__ void __launch_bounds__(kThreads)
    overflow_histogram_kernel(const float* __restrict__ x, int64_t n, int pass,
                              const SelectState* st, unsigned long long capacity,
                              unsigned* __restrict__ hist) {
  if (st->passed <= capacity) return;
  __shared__ unsigned local[RadixDigits::kMaxBins];
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const Key mask = RadixDigits::prefix_mask(pass);
  const Key prefix = st->prefix;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const Key key = AbsKeyTraits::from_float(x[i]);
    if (key != 0u && (key & mask) == prefix) atomicAdd(&local[RadixDigits::digit(key, pass)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) {
    if (local[b]) atomicAdd(&hist[b], local[b]);
  }
}

// n == 0: threshold NaN, count 0 (capacity is then 0: nothing to select).
__global__ void adaptive_empty_kernel(float* threshold, int64_t* count) {
  *threshold = __int_as_float(0x7FC00000);
  *count = 0;
}

template <typename G>
cudaError_t adaptive_select_typed(const AdaptiveSelectArgs& a, const G* grad, float* blended,
                                  const Workspace& w, cudaStream_t stream) {
  const int64_t n = a.n;
  const float alpha_f = static_cast<float>(a.alpha);
  const float keep_f = static_cast<float>(1.0 - a.alpha);
  const float beta_f = static_cast<float>(a.beta);
  const float carry_f = static_cast<float>(1.0 - a.beta);
  const int grid = radix::grid_size(n, 8);
  cudaError_t err;

  // Pass 1 and the quantile: the (n - rank)-th largest key of average_out, 1 <= n - rank <= n.
  const int64_t rank = static_cast<int64_t>(a.q * static_cast<double>(n - 1));
  const unsigned long long k = static_cast<unsigned long long>(n - rank);
  cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream);
  adaptive_init_kernel<<<1, 1, 0, stream>>>(w.state, k);
  adaptive_average_kernel<G><<<grid, kThreads, 0, stream>>>(grad, a.residual, a.average, n,
                                                            alpha_f, keep_f, a.average_out,
                                                            w.hist);
  if ((err = radix::launch_choose_digit(w, 0, stream)) != cudaSuccess) return err;
  if ((err = radix::find_kth_float(a.average_out, n, 1, w, stream)) != cudaSuccess) return err;
  const unsigned long long capacity = static_cast<unsigned long long>(a.capacity);
  adaptive_threshold_kernel<<<1, 1, 0, stream>>>(w.state, a.threshold, capacity);

  // Pass 2; the overflow select needs the top digit of Q's keys only when 0 < capacity < n
  // (with capacity >= n nothing can overflow).
  const bool select_ran = a.capacity > 0 && a.capacity < n;
  if (select_ran) {
    adaptive_blend_kernel<G, true><<<grid, kThreads, 0, stream>>>(
        grad, a.residual, a.average_out, a.momentum, n, a.threshold, beta_f, carry_f,
        a.compare_average, a.error_feedback, a.residual_out, blended, w.state, w.hist);
  } else {
    adaptive_blend_kernel<G, false><<<grid, kThreads, 0, stream>>>(
        grad, a.residual, a.average_out, a.momentum, n, a.threshold, beta_f, carry_f,
        a.compare_average, a.error_feedback, a.residual_out, blended, w.state, w.hist);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // The capacity largest |Q| when more are nonzero (the lower digits run only then).
  if (select_ran) {
    if ((err = radix::launch_choose_digit(w, 0, stream)) != cudaSuccess) return err;
    for (int pass = 1; pass < RadixDigits::kPasses; ++pass) {
      overflow_histogram_kernel<<<grid, kThreads, 0, stream>>>(blended, n, pass, w.state,
                                                               capacity, w.hist);
      if ((err = radix::launch_choose_digit(w, pass, stream)) != cudaSuccess) return err;
    }
  }
  // count = the number of nonzero Q; the cut: key >= 1 when count <= capacity, else top-k.
  if ((err = radix::launch_finalize(w, true, select_ran, capacity, a.count, stream)) !=
      cudaSuccess) {
    return err;
  }
  if (a.capacity == 0) return cudaGetLastError();
  return radix::write_selection_float(blended, n, w, a.values, a.indices, stream);
}

// ------------------------------------------------------------------------------ csr16_indices
// ends[w, b] = sum of max(counts[w, 0..b], 0), one block per rank (grid-stride over ranks).
__global__ void __launch_bounds__(kThreads)
    csr16_ends_kernel(const int32_t* __restrict__ counts, int64_t world, int64_t blocks,
                      long long* __restrict__ ends) {
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  for (int64_t w = blockIdx.x; w < world; w += gridDim.x) {
    const int32_t* c = counts + w * blocks;
    long long* e = ends + w * blocks;
    long long carry = 0;
    for (int64_t base = 0; base < blocks; base += kThreads) {
      const int64_t b = base + threadIdx.x;
      const int32_t count = b < blocks ? c[b] : 0;
      const long long v = count > 0 ? static_cast<long long>(count) : 0ll;
      long long inclusive, total;
      Scan(tmp).InclusiveSum(v, inclusive, total);
      if (b < blocks) e[b] = carry + inclusive;
      carry += total;
      __syncthreads();  // tmp is reused by the next tile
    }
  }
}

// One thread per slot (grid-stride): the first block whose end exceeds the slot, then the
// position, or -1.
__global__ void __launch_bounds__(kThreads)
    csr16_slots_kernel(const long long* __restrict__ ends, const int16_t* __restrict__ offsets,
                       const int32_t* __restrict__ valid, int64_t world, int64_t blocks,
                       int64_t slots, int64_t numel, int64_t* __restrict__ out) {
  const int64_t total = world * slots;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t w = idx / slots;
    const int64_t j = idx - w * slots;
    const int32_t v = valid[w];
    const int64_t used = v < 0 ? 0 : (v > slots ? slots : static_cast<int64_t>(v));
    int64_t index = -1;
    if (j < used) {
      const long long* e = ends + w * blocks;
      int64_t lo = 0, hi = blocks;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (e[mid] > j) hi = mid;
        else lo = mid + 1;
      }
      if (lo < blocks) {
        const int64_t pos = lo * kCsr16Block + static_cast<uint16_t>(offsets[idx]);
        if (pos < numel) index = pos;
      }
    }
    out[idx] = index;
  }
}

size_t csr16_ends_bytes(int64_t world, int64_t blocks) {
  const int64_t entries = world * blocks;
  return align_up(sizeof(long long) * static_cast<size_t>(entries > 0 ? entries : 1));
}

}  // namespace

size_t adaptive_select_workspace_bytes(int64_t n) {
  return blend_bytes(n) + radix::select_workspace_bytes(n);
}

cudaError_t adaptive_select(const AdaptiveSelectArgs& args, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream) {
  if (args.n < 0 || args.capacity < 0 || args.capacity > args.n) return cudaErrorInvalidValue;
  if (args.n == 0) {
    adaptive_empty_kernel<<<1, 1, 0, stream>>>(args.threshold, args.count);
    return cudaGetLastError();
  }
  if (workspace_bytes < adaptive_select_workspace_bytes(args.n)) return cudaErrorInvalidValue;
  float* blended = static_cast<float*>(workspace);
  const Workspace w =
      radix::carve_workspace(static_cast<char*>(workspace) + blend_bytes(args.n), args.n);
  switch (args.grad_dtype) {
    case DType::kFloat32:
      return adaptive_select_typed(args, static_cast<const float*>(args.grad), blended, w, stream);
    case DType::kFloat16:
      return adaptive_select_typed(args, static_cast<const __half*>(args.grad), blended, w,
                                   stream);
    case DType::kBFloat16:
      return adaptive_select_typed(args, static_cast<const __nv_bfloat16*>(args.grad), blended, w,
                                   stream);
  }
  return cudaErrorInvalidValue;
}

size_t csr16_indices_workspace_bytes(int64_t world, int64_t blocks) {
  return csr16_ends_bytes(world, blocks);
}

cudaError_t csr16_indices(const int32_t* counts, const int16_t* offsets, const int32_t* valid,
                          int64_t world, int64_t blocks, int64_t slots, int64_t numel,
                          int64_t* out, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream) {
  if (world < 0 || blocks < 0 || slots < 0 || numel < 0) return cudaErrorInvalidValue;
  if (world == 0 || slots == 0) return cudaSuccess;
  if (workspace_bytes < csr16_ends_bytes(world, blocks)) return cudaErrorInvalidValue;
  long long* ends = static_cast<long long*>(workspace);
  if (blocks > 0) {
    const unsigned grid = static_cast<unsigned>(world < kMaxBlocks ? world : kMaxBlocks);
    csr16_ends_kernel<<<grid, kThreads, 0, stream>>>(counts, world, blocks, ends);
  }
  csr16_slots_kernel<<<blocks_for(world * slots), kThreads, 0, stream>>>(
      ends, offsets, valid, world, blocks, slots, numel, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradsieve

// CUDA kernels of the fused compress-side ops (contracts: python/gradsieve/ops.py; CPU kernels:
// csrc/cpu/compress_kernels.cpp; launchers: csrc/cuda_launch/ops_compress_cuda.cpp). No kernel
// here reads anything back to the host; an empty input launches no kernel of grid size 0.
//
// ef21_topk. Pass 1 (grid-stride) computes change = grad - estimate (one float32 rounding,
// __fsub_rn), written to a workspace buffer, the histogram of its top key digit (shared memory,
// merged once per block) and the gradient's finiteness (a block vote, one store per block that
// saw a non-finite entry). Then ef_topk_'s radix select of radix_select.cu (2 histogram passes,
// count per tile, scan, write) on the buffer: ties to the lower index, indices ascending, the NaN policy of radix_key.h, as
// topk_abs(grad - estimate). Cost: grad and estimate read once, the n-float buffer written once
// and read 4 times (2 histograms, count, write); workspace n floats + the select's.
//
// pack_payload. A memset of the payload, then one kernel: each block takes groups of entries (a
// chunk of a scaled codec, else 4096 entries). A scaled codec's chunk first gets its scale:
// max |x| / qmax by a block-wide max of the bits (intB), or for sign the sum of |x| by one thread
// in slot order (the CPU's float32 sum bit for bit) over the number of nonzero entries. The block
// then writes the positions (or csr16 offsets; the block counts by warp-aggregated integer
// atomics; or the local index: its unary counts' bit j + chunk, its b-bit offsets or its bitmap
// bits by atomicOr on 32-bit words of the zeroed section), float values or int8 codes, and decoded values (0 at slots not valid), and
// adds its number of valid slots to the header with one integer atomic. Codes below a byte (int4, int2,
// sign) are written by a second kernel, one thread per byte of the values section. Integer
// atomics only, so the bytes do not depend on the schedule. Cost: the K entries read once per slot
// pass, plus once for a scaled codec's max (and once more, by one thread per chunk, for sign's
// sum) and once for the codes below a byte; the payload written once (plus the memset).
//
// ef21_commit: one elementwise pass (estimate copied, global_estimate + average written twice),
// then one thread per sent entry, an atomicAdd into the new estimate (index_add_'s CUDA kernel;
// a position listed twice adds twice, in an order the schedule picks).
// dgc_accumulate: one elementwise pass (u = u * m + g, v = v + u) with the finiteness vote.
// dgc_mask_: one thread per sent entry, u[i] *= 0 and v[i] *= 0 in place.
// Every float operation is rounded on its own (__fadd_rn, __fmul_rn, __fsub_rn: no fused
// multiply-add), as the CPU kernels and the eager torch code they replace.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>

#include "gradsieve/cuda_kernels.h"
#include "gradsieve/radix_key.h"
#include "radix_select_internal.cuh"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

using radix::kThreads;
using radix::SelectState;
using radix::Workspace;

constexpr int64_t kPackGroup = 4096;   // entries per group of a float payload
constexpr int64_t kCsr16Block = 65536;
constexpr unsigned kMaxGrid = 65535;

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t want = (items + per_block - 1) / per_block;
  return static_cast<unsigned>(want < 1 ? 1 : (want > kMaxGrid ? kMaxGrid : want));
}

// -------------------------------------------------------------------------------------- ef21_topk
// init_state_kernel of radix_select.cu (no threshold).
__global__ void init_select_kernel(SelectState* st, unsigned long long k) {
  st->k_remaining = k;
  st->need_equal = 0;
  st->passed = 0;
  st->prefix = 0;
  st->cut_key = 0;
  st->threshold_key = 0;
  st->has_nan = 0;
}

// change[i] = grad[i] - estimate[i] (float32, one rounding: torch's grad - estimate); the top
// digit's histogram of |change|; *finite = false when a grad entry is not finite (it was set true
// before). ef_accumulate_histogram_kernel of radix_select.cu with the difference.
template <typename G>
__global__ void __launch_bounds__(kThreads)
    change_histogram_kernel(const G* __restrict__ grad, const float* __restrict__ estimate,
                            int64_t n, float* __restrict__ change, unsigned* __restrict__ hist,
                            bool* __restrict__ finite) {
  __shared__ unsigned local[RadixDigits::kMaxBins];
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  bool ok = true;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_float(grad[i]);
    ok = ok && isfinite(g);
    const float c = __fsub_rn(g, estimate[i]);
    change[i] = c;
    atomicAdd(&local[RadixDigits::digit(AbsKeyTraits::from_float(c), 0)], 1u);
  }
  const int all_ok = __syncthreads_and(ok ? 1 : 0);  // also the barrier before the merge
  if (threadIdx.x == 0 && !all_ok) *finite = false;
  for (int b = threadIdx.x; b < RadixDigits::kMaxBins; b += blockDim.x) {
    if (local[b]) atomicAdd(&hist[b], local[b]);
  }
}

// ef_topk_'s sequence of kernels (radix_select.cu, ef_topk_typed) with the first pass above and
// the selection written without clearing (n >= 1).
template <typename G>
cudaError_t ef21_select(const G* grad, const float* estimate, int64_t n, int64_t k, float* change,
                        float* values, int64_t* indices, bool* finite, const Workspace& w,
                        cudaStream_t stream) {
  cudaError_t err;
  if ((err = cudaMemsetAsync(finite, 1, sizeof(bool), stream)) != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(w.hist, 0, sizeof(unsigned) * RadixDigits::kMaxBins, stream)) !=
      cudaSuccess) {
    return err;
  }
  init_select_kernel<<<1, 1, 0, stream>>>(w.state, static_cast<unsigned long long>(k));
  change_histogram_kernel<G><<<radix::grid_size(n, 8), kThreads, 0, stream>>>(
      grad, estimate, n, change, w.hist, finite);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (k == 0) return cudaSuccess;
  if ((err = radix::launch_choose_digit(w, 0, stream)) != cudaSuccess) return err;
  if ((err = radix::find_kth_float(change, n, 1, w, stream)) != cudaSuccess) return err;
  if ((err = radix::launch_finalize(w, false, true, 0, nullptr, stream)) != cudaSuccess) return err;
  return radix::write_selection_float(change, n, w, values, indices, stream);
}

// ----------------------------------------------------------------------------------- pack_payload
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to even

__device__ __forceinline__ int64_t floor_mod_block(int64_t p) {
  const int64_t r = p % kCsr16Block;
  return r < 0 ? r + kCsr16Block : r;
}

// The code of v (slot j) under its chunk's scale (compress_kernels.cpp's code_of): intB rounds
// v / scale half to even, or stochastically floor(v / scale + rounding_draw(seed, j, bits of v)),
// and clamps it to +-qmax (0 under a zero or NaN scale); sign: 1 for a negative v (0 under a NaN
// scale).
template <WireValues kCodec>
__device__ __forceinline__ int32_t code_of(float v, float scale, const PackPayloadArgs& a,
                                           int64_t j) {
  if constexpr (kCodec == WireValues::kSign) {
    return (v < 0.0f && !isnan(scale)) ? 1 : 0;
  } else {
    if (!(scale > 0.0f)) return 0;
    const float r =
        a.stochastic
            ? floorf(__fadd_rn(__fdiv_rn(v, scale), rounding_draw(a.seed, j, __float_as_uint(v))))
            : __fsub_rn(__fadd_rn(__fdiv_rn(v, scale), kRoundMagic), kRoundMagic);
    const float q = static_cast<float>(wire_qmax(kCodec));
    return static_cast<int32_t>(fminf(q, fmaxf(-q, r)));
  }
}

// What a receiver decodes for a code (compress_kernels.cpp's decoded: one float32 product).
template <WireValues kCodec>
__device__ __forceinline__ float decoded(int32_t code, float scale) {
  if constexpr (kCodec == WireValues::kSign) {
    return __fmul_rn(code != 0 ? -1.0f : 1.0f, scale);
  } else {
    return __fmul_rn(static_cast<float>(code), scale);
  }
}

// Slot j's value as it goes on the wire: 0 at a slot that carries no entry (compress_kernels.cpp).
__device__ __forceinline__ float wire_value(const PackPayloadArgs& a, int64_t j) {
  return (a.valid == nullptr || a.valid[j]) ? a.values[j] : 0.0f;
}

// ORs the `bits`-bit field (bits <= 15, field < 2^bits) into `words` at bit `bit` (LSB first:
// bit b of the section is bit b % 32 of little-endian word b / 32): one word, or two when the
// field crosses into the next.
__device__ __forceinline__ void or_field(uint32_t* words, int64_t bit, uint32_t field, int bits) {
  if (field == 0) return;
  const int shift = static_cast<int>(bit & 31);
  atomicOr(words + (bit >> 5), field << shift);
  if (shift + bits > 32) atomicOr(words + (bit >> 5) + 1, field >> (32 - shift));
}

// One block per group of slots (a chunk of a scaled codec, else kPackGroup slots): the group's
// scale, then per slot its position (or csr16 offset and block count, or its local index entry:
// unary count bit and offset, or bitmap bit), its value (float codecs; int8 codes, a byte each) and
// what it decodes to. Codes below a byte are left to pack_codes_kernel.
template <WireValues kCodec>
__global__ void __launch_bounds__(kThreads)
    pack_payload_kernel(const PackPayloadArgs a, int64_t group, int64_t groups) {
  constexpr bool kScaled = wire_scaled(kCodec);
  using MaxReduce = cub::BlockReduce<uint32_t, kThreads>;
  using CountReduce = cub::BlockReduce<long long, kThreads>;
  __shared__ union {
    typename MaxReduce::TempStorage max;
    typename CountReduce::TempStorage count;
  } tmp;
  __shared__ float group_scale;
  int32_t* header = reinterpret_cast<int32_t*>(a.payload);
  int32_t* counts = reinterpret_cast<int32_t*>(a.payload + a.index_offset);
  int32_t* index32 = reinterpret_cast<int32_t*>(a.payload + a.index_offset);
  uint16_t* offsets = reinterpret_cast<uint16_t*>(a.payload + a.offsets_offset);
  // The local index: the 32-bit words of its unary counts, and of its offsets or bitmap.
  uint32_t* local_counts = reinterpret_cast<uint32_t*>(a.payload + a.index_offset + 4);
  uint32_t* local_words = reinterpret_cast<uint32_t*>(a.payload + a.offsets_offset);
  const bool csr16 = a.index == WireIndex::kCsr16;
  const bool local = a.index == WireIndex::kLocal;
  float* scales = reinterpret_cast<float*>(a.payload + a.scales_offset);
  uint8_t* wire = a.payload + a.values_offset;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    header[0] = *a.finite ? 1 : 0;
    if (a.valid == nullptr) header[1] = static_cast<int32_t>(a.k);
    if (local) index32[0] = a.local_bits == 0 ? kWireLocalBitmap : a.local_bits;  // descriptor
  }
  long long carried = 0;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t start = g * group;
    const int64_t stop = start + group < a.k ? start + group : a.k;
    float scale = 0.0f;
    if constexpr (kScaled) {
      // chunk_scale of compress_kernels.cpp. max |x| by its bits (a block reduction, exact in
      // any order): NaN and Inf sort above every number.
      uint32_t bits_max = 0;
      for (int64_t j = start + threadIdx.x; j < stop; j += kThreads) {
        const uint32_t bits = __float_as_uint(wire_value(a, j)) & 0x7fffffffu;
        bits_max = bits > bits_max ? bits : bits_max;
      }
      const uint32_t block_max =
          MaxReduce(tmp.max).Reduce(bits_max, [](uint32_t x, uint32_t y) { return x > y ? x : y; });
      if (threadIdx.x == 0) {
        float s;
        if (block_max >= 0x7f800000u) {
          s = __int_as_float(0x7fc00000);  // NaN when the chunk holds NaN or Inf
        } else if constexpr (kCodec != WireValues::kSign) {
          s = __fdiv_rn(__uint_as_float(block_max), static_cast<float>(wire_qmax(kCodec)));
        } else {
          // The mean |x| of the nonzero entries: one thread sums them sequentially from 0 in
          // slot order, the CPU's float32 sum bit for bit (0 when none is nonzero).
          float sum = 0.0f;
          long long nonzero = 0;
          for (int64_t j = start; j < stop; ++j) {
            const float v = wire_value(a, j);
            sum = __fadd_rn(sum, fabsf(v));
            nonzero += v != 0.0f ? 1 : 0;
          }
          s = nonzero > 0 ? __fdiv_rn(sum, static_cast<float>(nonzero)) : 0.0f;
        }
        group_scale = s;
        scales[g] = s;
      }
      __syncthreads();
      scale = group_scale;
    }
    // Every thread runs the same number of rounds (the warp votes below need whole warps).
    for (int64_t first = start; first < stop; first += kThreads) {
      const int64_t j = first + threadIdx.x;
      int64_t block = -1;  // the csr16 block count this slot adds 1 to
      if (j < stop) {
        const bool carries = a.valid == nullptr || a.valid[j];
        carried += carries ? 1 : 0;
        const int64_t position = a.indices_int64 ? static_cast<const int64_t*>(a.indices)[j]
                                                 : static_cast<const int32_t*>(a.indices)[j];
        if (csr16) {
          // Padding slots go on the wire as position 0 and are not counted.
          const int64_t p = carries ? position : 0;
          const int64_t low = floor_mod_block(p);
          offsets[j] = static_cast<uint16_t>(low);
          const int64_t b = (p - low) / kCsr16Block;
          if (carries && b >= 0 && b < a.blocks) block = b;
        } else if (local) {
          // A slot not valid, or outside the bucket, sets no bit (offset 0).
          if (carries && position >= 0 && position < a.numel) {
            if (a.local_bits == 0) {
              atomicOr(local_words + (position >> 5), 1u << (position & 31));
            } else {
              const int64_t q = j + (position >> a.local_bits);
              atomicOr(local_counts + (q >> 5), 1u << (q & 31));
              const uint32_t field = static_cast<uint32_t>(position) & ((1u << a.local_bits) - 1u);
              or_field(local_words, j * a.local_bits, field, a.local_bits);
            }
          }
        } else {
          index32[j] = static_cast<int32_t>(position);
        }
        const float v = carries ? a.values[j] : 0.0f;
        float got;
        if constexpr (kScaled) {
          const int32_t code = code_of<kCodec>(v, scale, a, j);
          if constexpr (kCodec == WireValues::kInt8) {
            reinterpret_cast<int8_t*>(wire)[j] = static_cast<int8_t>(code);
          }
          got = decoded<kCodec>(code, scale);
        } else if constexpr (kCodec == WireValues::kFloat16) {
          const __half h = from_float<__half>(v);
          reinterpret_cast<__half*>(wire)[j] = h;
          got = to_float(h);
        } else if constexpr (kCodec == WireValues::kBFloat16) {
          const __nv_bfloat16 h = from_float<__nv_bfloat16>(v);
          reinterpret_cast<__nv_bfloat16*>(wire)[j] = h;
          got = to_float(h);
        } else {
          reinterpret_cast<float*>(wire)[j] = v;
          got = v;
        }
        // A slot that carries no entry is not decoded: nothing was sent for it.
        a.sent[j] = carries ? got : 0.0f;
      }
      if (csr16) {
        // Lanes counting into the same block add once, together.
        const unsigned lanes = __ballot_sync(0xFFFFFFFFu, block >= 0);
        if (block >= 0) {
          const unsigned peers = __match_any_sync(lanes, static_cast<long long>(block));
          if (static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
            atomicAdd(&counts[block], static_cast<int32_t>(__popc(peers)));
          }
        }
      }
    }
    if constexpr (kScaled) __syncthreads();  // group_scale and tmp are reused
  }
  if (a.valid != nullptr) {
    const long long total = CountReduce(tmp.count).Sum(carried);
    if (threadIdx.x == 0 && total) atomicAdd(&header[1], static_cast<int32_t>(total));
  }
}

// The codes below a byte (int4, int2, sign), after pack_payload_kernel wrote the scales: one
// thread per byte of the values section computes the 8 / B codes the byte holds (slots
// y * 8 / B onwards, each under its chunk's scale read back from the payload) and stores the
// assembled byte, so that no two threads write the same byte. Bits past K * B stay 0.
template <WireValues kCodec>
__global__ void __launch_bounds__(kThreads) pack_codes_kernel(const PackPayloadArgs a,
                                                              int64_t bytes) {
  constexpr int kBits = wire_bits(kCodec);
  constexpr int kPerByte = 8 / kBits;
  const float* scales = reinterpret_cast<const float*>(a.payload + a.scales_offset);
  uint8_t* wire = a.payload + a.values_offset;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t y = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; y < bytes; y += stride) {
    uint32_t byte = 0;
#pragma unroll
    for (int t = 0; t < kPerByte; ++t) {
      const int64_t j = y * kPerByte + t;
      if (j < a.k) {
        const int32_t code = code_of<kCodec>(wire_value(a, j), scales[j / a.chunk], a, j);
        byte |= (static_cast<uint32_t>(code) & ((1u << kBits) - 1u)) << (t * kBits);
      }
    }
    wire[y] = static_cast<uint8_t>(byte);
  }
}

// -------------------------------------------------------------------- ef21_commit, dgc_accumulate
__global__ void ef21_commit_dense_kernel(const float* __restrict__ estimate,
                                         const float* __restrict__ global_estimate,
                                         const float* __restrict__ average, int64_t n,
                                         float* __restrict__ estimate_out,
                                         float* __restrict__ global_out,
                                         float* __restrict__ result) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    estimate_out[i] = estimate[i];
    const float s = __fadd_rn(global_estimate[i], average[i]);
    global_out[i] = s;
    result[i] = s;
  }
}

// index_add_: an atomic add per entry (a position listed twice adds twice, as on CUDA there).
template <typename I>
__global__ void ef21_commit_sparse_kernel(const I* __restrict__ indices,
                                          const float* __restrict__ change, int64_t m, int64_t n,
                                          float* __restrict__ estimate_out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += stride) {
    const int64_t i = static_cast<int64_t>(indices[j]);
    if (i >= 0 && i < n) atomicAdd(&estimate_out[i], change[j]);
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads)
    dgc_accumulate_kernel(const G* __restrict__ grad, const float* __restrict__ u,
                          const float* __restrict__ v, int64_t n, float momentum,
                          const float* __restrict__ grad_scale, float* __restrict__ u_out,
                          float* __restrict__ v_out, bool* __restrict__ finite) {
  const float factor = grad_scale != nullptr ? *grad_scale : 1.0f;
  bool ok = true;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = to_float(grad[i]);
    ok = ok && isfinite(g);
    const float clipped = grad_scale != nullptr ? __fmul_rn(g, factor) : g;
    const float ui = __fadd_rn(__fmul_rn(u[i], momentum), clipped);
    u_out[i] = ui;
    v_out[i] = __fadd_rn(v[i], ui);
  }
  if (!__syncthreads_and(ok ? 1 : 0) && threadIdx.x == 0) *finite = false;
}

template <typename I>
__global__ void dgc_mask_kernel(float* __restrict__ u, float* __restrict__ v, int64_t n,
                                const I* __restrict__ indices, const bool* __restrict__ valid,
                                int64_t m) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m; j += stride) {
    if (valid != nullptr && !valid[j]) continue;
    const int64_t i = static_cast<int64_t>(indices[j]);
    if (i < 0 || i >= n) continue;
    // x * 0, not a fill (-0.0 for a negative entry, NaN for a non-finite one); a position listed
    // twice gets the same value either way.
    u[i] = __fmul_rn(u[i], 0.0f);
    v[i] = __fmul_rn(v[i], 0.0f);
  }
}

}  // namespace

size_t ef21_topk_workspace_bytes(int64_t n) {
  return align_up(sizeof(float) * static_cast<size_t>(n > 0 ? n : 1)) +
         radix::select_workspace_bytes(n);
}

cudaError_t ef21_topk(const void* grad, DType grad_dtype, const float* estimate, int64_t n,
                      int64_t k, float* values, int64_t* indices, bool* finite, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) {
  if (n < 0 || k < 0 || k > n) return cudaErrorInvalidValue;
  if (n == 0) return cudaMemsetAsync(finite, 1, sizeof(bool), stream);
  if (workspace_bytes < ef21_topk_workspace_bytes(n)) return cudaErrorInvalidValue;
  float* change = static_cast<float*>(workspace);
  const size_t change_bytes = align_up(sizeof(float) * static_cast<size_t>(n));
  const Workspace w = radix::carve_workspace(static_cast<char*>(workspace) + change_bytes, n);
  switch (grad_dtype) {
    case DType::kFloat32:
      return ef21_select(static_cast<const float*>(grad), estimate, n, k, change, values, indices,
                         finite, w, stream);
    case DType::kFloat16:
      return ef21_select(static_cast<const __half*>(grad), estimate, n, k, change, values, indices,
                         finite, w, stream);
    case DType::kBFloat16:
      return ef21_select(static_cast<const __nv_bfloat16*>(grad), estimate, n, k, change, values,
                         indices, finite, w, stream);
  }
  return cudaErrorInvalidValue;
}

template <WireValues kCodec>
cudaError_t launch_pack(const PackPayloadArgs& a, int64_t values_bytes, cudaStream_t stream) {
  const int64_t group = wire_scaled(kCodec) ? a.chunk : kPackGroup;
  const int64_t groups = (a.k + group - 1) / group;
  pack_payload_kernel<kCodec><<<blocks_for(groups, 1), kThreads, 0, stream>>>(a, group, groups);
  cudaError_t err = cudaGetLastError();
  if constexpr (wire_bits(kCodec) < 8) {
    if (err == cudaSuccess && values_bytes > 0) {
      pack_codes_kernel<kCodec><<<blocks_for(values_bytes, kThreads), kThreads, 0, stream>>>(
          a, values_bytes);
      err = cudaGetLastError();
    }
  }
  return err;
}

cudaError_t pack_payload(const PackPayloadArgs& a, cudaStream_t stream) {
  if (a.k < 0 || a.chunk < 1) return cudaErrorInvalidValue;
  const int64_t values_bytes = (a.k * wire_bits(a.codec) + 7) / 8;
  if (a.values_offset < 0 || a.nbytes < a.values_offset + values_bytes) {
    return cudaErrorInvalidValue;
  }
  if (a.index == WireIndex::kLocal) {
    // The local index's sections inside the payload, as 32-bit words (atomics need 4-byte
    // alignment): offsets mode, ceil((K + chunks) / 32) words of unary counts then
    // ceil(K * b / 32) of offsets;
    // bitmap mode, ceil(numel / 32) words.
    const bool bitmap = a.local_bits == 0;
    const int64_t words = bitmap ? (a.numel + 31) / 32 : (a.k * a.local_bits + 31) / 32;
    const bool fits =
        a.local_bits >= 0 && a.local_bits <= 15 && a.numel >= 0 && a.index_offset >= 0 &&
        (bitmap ? a.offsets_offset >= a.index_offset + 4
                : a.blocks == (a.numel + (int64_t(1) << a.local_bits) - 1) >> a.local_bits &&
                      a.offsets_offset >= a.index_offset + 4 + 4 * ((a.k + a.blocks + 31) / 32)) &&
        a.offsets_offset + 4 * words <= a.nbytes;
    const bool aligned = reinterpret_cast<uintptr_t>(a.payload) % 4 == 0 &&
                         a.index_offset % 4 == 0 && a.offsets_offset % 4 == 0;
    if (!fits || !aligned) return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(a.payload, 0, static_cast<size_t>(a.nbytes), stream);
  if (err != cudaSuccess) return err;
  switch (a.codec) {
    case WireValues::kFloat32: return launch_pack<WireValues::kFloat32>(a, values_bytes, stream);
    case WireValues::kFloat16: return launch_pack<WireValues::kFloat16>(a, values_bytes, stream);
    case WireValues::kBFloat16: return launch_pack<WireValues::kBFloat16>(a, values_bytes, stream);
    case WireValues::kInt8: return launch_pack<WireValues::kInt8>(a, values_bytes, stream);
    case WireValues::kInt4: return launch_pack<WireValues::kInt4>(a, values_bytes, stream);
    case WireValues::kInt2: return launch_pack<WireValues::kInt2>(a, values_bytes, stream);
    case WireValues::kSign: return launch_pack<WireValues::kSign>(a, values_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ef21_commit(const float* estimate, const float* global_estimate, const float* average,
                        int64_t n, const void* indices, bool indices_int64, const float* change,
                        int64_t m, float* estimate_out, float* global_out, float* result,
                        cudaStream_t stream) {
  if (n < 0 || m < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  ef21_commit_dense_kernel<<<blocks_for(n, int64_t(kThreads) * 4), kThreads, 0, stream>>>(
      estimate, global_estimate, average, n, estimate_out, global_out, result);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || m == 0) return err;
  if (indices_int64) {
    ef21_commit_sparse_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(
        static_cast<const int64_t*>(indices), change, m, n, estimate_out);
  } else {
    ef21_commit_sparse_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(
        static_cast<const int32_t*>(indices), change, m, n, estimate_out);
  }
  return cudaGetLastError();
}

cudaError_t dgc_accumulate(const void* grad, DType grad_dtype, const float* u, const float* v,
                           int64_t n, float momentum, const float* grad_scale, float* u_out,
                           float* v_out, bool* finite, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(finite, 1, sizeof(bool), stream);
  if (err != cudaSuccess || n == 0) return err;
  const unsigned grid = blocks_for(n, int64_t(kThreads) * 4);
  switch (grad_dtype) {
    case DType::kFloat32:
      dgc_accumulate_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(grad), u, v,
                                                           n, momentum, grad_scale, u_out, v_out,
                                                           finite);
      break;
    case DType::kFloat16:
      dgc_accumulate_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(grad), u, v,
                                                           n, momentum, grad_scale, u_out, v_out,
                                                           finite);
      break;
    case DType::kBFloat16:
      dgc_accumulate_kernel<<<grid, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(grad), u, v, n, momentum, grad_scale, u_out, v_out,
          finite);
      break;
  }
  return cudaGetLastError();
}

cudaError_t dgc_mask(float* u, float* v, int64_t n, const void* indices, bool indices_int64,
                     const bool* valid, int64_t m, cudaStream_t stream) {
  if (n < 0 || m < 0) return cudaErrorInvalidValue;
  if (m == 0 || n == 0) return cudaSuccess;
  if (indices_int64) {
    dgc_mask_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(
        u, v, n, static_cast<const int64_t*>(indices), valid, m);
  } else {
    dgc_mask_kernel<<<blocks_for(m, kThreads), kThreads, 0, stream>>>(
        u, v, n, static_cast<const int32_t*>(indices), valid, m);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradsieve

// decode_average_ for the CUDA backend: the world's gathered payloads (python/gradsieve/wire.py's
// PayloadFormat) decoded into their average, with each payload's finite and well-formed flags, in
// three launches and no host synchronisation:
//
//   1. prepare: every block zeroes its share of out (grid-stride); block r (grid-stride over
//      ranks) checks payload r's header (finite flag 0 or 1, count in [0, K]), its checksum (a
//      block reduction over its bytes), csr16's block counts (a block scan into the running sums
//      of max(count, 0), kept in the workspace: none negative, adding up to the count), or the
//      local index (its descriptor; offsets mode: the running sums of the set bits of its unary
//      counts per 32-bit word, as many as the count; bitmap mode: the running sums of the set
//      bits below numel per 32-bit word, none set at or past numel, as many as the count) and
//      the scales of a scaled
//      codec (all ceil(K / chunk) finite under a header that says finite), and writes the flags
//      and the slots in use.
//   2. scatter: one thread per (rank, slot): the slot's position (int32; csr16's block, or the
//      local index's unary or bitmap word, found by binary search in the running sums; then the
//      int16 offset; the set bit q of rank j, so chunk q - j, and the b-bit offset; or the set
//      bit of rank j in the bitmap), its value
//      (float codecs; scaled codecs: the code, an
//      int8 byte or a B-bit field sign-extended, or a sign bit as -1 or 1, times the scale of the
//      slot's chunk) and an atomic add into out. A position outside the bucket, or a non-finite
//      value under a finite header, clears the payload's well_formed (a plain store of the same
//      value by every thread that finds one).
//   3. finish: out /= divisor (a true division, __fdiv_rn; skipped when the divisor is 1).
//
// Cost: out written 3 times (zero, atomics, division), each payload read once (twice with the
// checksum). The same entries are added as on the CPU (padding slots add nothing, except a scaled
// codec's 0 * scale when that scale is not finite, as in decode_sum), but the atomics make the
// summation order, and so the last bit of an fp32 sum of three or more entries at one position,
// depend on scheduling, as in sparse_accumulate_; the CPU kernel is sequential and bitwise the
// reference.
// Payload rows may start at any byte (an odd nbytes): the kernels then read bytes and assemble.
// Every read stays inside its payload row whatever the bytes say: slot j < K reads index bytes
// below scales_offset (local offsets mode: word w < ceil((K + chunks) / 32) of the unary counts,
// found by a binary search over the workspace's running sums, and the bytes of bits j * b ..
// j * b + b - 1 of a section of ceil(K * b / 8) bytes or more; bitmap mode: word w <
// ceil(numel / 32) of the bitmap, found the same way), the scale j / chunk < ceil(K / chunk),
// and the byte (j * B) / 8 < ceil(K * B / 8) of the values section, the row's last. A slot in use
// whose index gives no position (csr16 and local) adds a padding slot's zero and flags its
// payload, as on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "gradsieve/decode_kernels.h"
#include "scalar_convert.cuh"

namespace gradsieve {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kCsr16Block = int64_t(1) << 16;
constexpr unsigned long long kChecksumModulus = 65521;

size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }

// A little-endian value of up to 4 bytes at any address.
template <typename T>
__device__ __forceinline__ T load_bytes(const uint8_t* p) {
  uint32_t bits = 0;
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(T)); ++k) bits |= uint32_t(p[k]) << (8 * k);
  T v;
  memcpy(&v, &bits, sizeof(T));
  return v;
}

template <bool kAligned, typename T>
__device__ __forceinline__ T load(const uint8_t* p) {
  if constexpr (kAligned) {
    return *reinterpret_cast<const T*>(p);
  } else {
    return load_bytes<T>(p);
  }
}

struct Workspace {
  long long* ends;  // world * blocks running sums: of max(count, 0) per csr16 block, or of
                    // the set bits per word of the local index's unary counts or bitmap
  int32_t* used;    // world: slots in use
  int32_t* claims;  // world: the header says finite
};

Workspace carve(void* workspace, int64_t world, int64_t blocks) {
  char* base = static_cast<char*>(workspace);
  Workspace w;
  w.ends = reinterpret_cast<long long*>(base);
  base += align_up(sizeof(long long) * static_cast<size_t>(world * blocks));
  w.used = reinterpret_cast<int32_t*>(base);
  base += align_up(sizeof(int32_t) * static_cast<size_t>(world));
  w.claims = reinterpret_cast<int32_t*>(base);
  return w;
}

__device__ __forceinline__ long long python_mod(unsigned long long x) {
  const long long r = static_cast<long long>(x) % static_cast<long long>(kChecksumModulus);
  return r < 0 ? r + static_cast<long long>(kChecksumModulus) : r;
}

// The bits of bitmap word w that stand for positions below numel.
__device__ __forceinline__ uint32_t bitmap_mask(int64_t numel, int64_t w) {
  const int64_t below = numel - 32 * w;
  return below >= 32 ? 0xFFFFFFFFu : (below <= 0 ? 0u : (1u << below) - 1u);
}

// ------------------------------------------------------------------------------ 1. prepare
__global__ void __launch_bounds__(kThreads) decode_prepare_kernel(DecodeAverageArgs a,
                                                                  Workspace w) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.numel; i += stride) {
    a.out[i] = 0.0f;
  }
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  using Scan = cub::BlockScan<long long, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int32_t s_used, s_flag;
  __shared__ unsigned long long s_low;
  for (int64_t r = blockIdx.x; r < a.world; r += gridDim.x) {
    const uint8_t* p = a.gathered + r * a.nbytes;
    if (threadIdx.x == 0) {
      const int32_t flag = load_bytes<int32_t>(p), count = load_bytes<int32_t>(p + 4);
      s_flag = flag;
      s_used = count < 0 ? 0 : (count > a.slots ? static_cast<int32_t>(a.slots) : count);
      bool ok = count >= 0 && count <= a.slots && (flag == 0 || flag == 1);
      if (a.numel == 0 && a.slots > 0) ok = false;  // padding decodes to index 0, outside
      a.finite[r] = flag != 0;
      a.well_formed[r] = ok;
      w.used[r] = s_used;
      w.claims[r] = flag == 1;
    }
    __syncthreads();
    bool bad = false;
    if (a.checksum) {
      // wire.checksum_of with bytes 8..11 read as zero; the sums wrap as torch's int64 sums do.
      unsigned long long low = 0, high = 0;
      for (int64_t i = threadIdx.x; i < a.nbytes; i += blockDim.x) {
        const unsigned long long b = (i >= 8 && i < 12) ? 0ull : p[i];
        low += b;
        high += b * static_cast<unsigned long long>(a.nbytes - i);
      }
      low = Reduce(tmp.reduce).Sum(low);
      if (threadIdx.x == 0) s_low = low;
      __syncthreads();
      high = Reduce(tmp.reduce).Sum(high);
      if (threadIdx.x == 0) {
        const unsigned long long value = python_mod(high) * 65536ull + python_mod(s_low);
        bad |= static_cast<uint32_t>(value) != load_bytes<uint32_t>(p + 8);
      }
      __syncthreads();
    }
    if (a.index != WireIndex::kInt32) {
      const bool local = a.index == WireIndex::kLocal;
      const bool bitmap = local && a.local_bits == 0;
      if (local && threadIdx.x == 0) {
        const int32_t descriptor = bitmap ? kWireLocalBitmap : a.local_bits;
        bad |= load_bytes<int32_t>(p + a.index_offset) != descriptor;
      }
      long long carry = 0;
      long long* e = w.ends + r * a.blocks;
      for (int64_t base = 0; base < a.blocks; base += kThreads) {
        const int64_t b = base + threadIdx.x;
        // The unit's count: csr16's max(count, 0) (none negative), the set bits of a word of
        // the unary counts (its padding included), or of a bitmap word below numel (none at or
        // past it).
        long long count = 0;
        if (b < a.blocks) {
          if (!local) {
            const int32_t c = load_bytes<int32_t>(p + a.index_offset + 4 * b);
            bad |= c < 0;
            count = c > 0 ? c : 0;
          } else if (!bitmap) {
            count = __popc(load_bytes<uint32_t>(p + a.index_offset + 4 + 4 * b));
          } else {
            const uint32_t word = load_bytes<uint32_t>(p + a.offsets_offset + 4 * b);
            const uint32_t inside = word & bitmap_mask(a.numel, b);
            bad |= inside != word;
            count = __popc(inside);
          }
        }
        long long inclusive, total;
        Scan(tmp.scan).InclusiveSum(count, inclusive, total);
        if (b < a.blocks) e[b] = carry + inclusive;
        carry += total;
        __syncthreads();  // tmp is reused by the next tile
      }
      if (threadIdx.x == 0) bad |= carry != s_used;
    }
    if (a.num_scales > 0 && s_flag == 1) {
      for (int64_t s = threadIdx.x; s < a.num_scales; s += blockDim.x) {
        bad |= !isfinite(load_bytes<float>(p + a.scales_offset + 4 * s));
      }
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) a.well_formed[r] = false;
    __syncthreads();  // the shared values are rewritten for the next rank
  }
}

// ------------------------------------------------------------------------------ 2. scatter
// The `bits`-bit field (bits <= 15) at bit `bit` of `base` (LSB first), from the bytes it
// covers, bit / 8 to (bit + bits - 1) / 8: at most 3, and none past the field's last.
__device__ __forceinline__ uint32_t field_at(const uint8_t* base, int64_t bit, int bits) {
  const uint8_t* q = base + (bit >> 3);
  const int shift = static_cast<int>(bit & 7);
  const int count = (shift + bits + 7) >> 3;
  uint32_t v = 0;
  for (int k = 0; k < count; ++k) v |= uint32_t(q[k]) << (8 * k);
  return (v >> shift) & ((1u << bits) - 1u);
}

// The bit number of word's set bit of rank `rank` (0: the lowest), by halving; -1 when word has
// no more than `rank` set bits.
__device__ __forceinline__ int select_bit(uint32_t word, long long rank) {
  if (rank < 0 || rank >= __popc(word)) return -1;
  int r = static_cast<int>(rank), at = 0;
#pragma unroll
  for (int width = 16; width > 0; width >>= 1) {
    const int low = __popc(word & ((1u << width) - 1u));
    if (r >= low) {
      r -= low;
      word >>= width;
      at += width;
    }
  }
  return at;
}

// Slot j's value (float codecs) or code (scaled codecs, as a float: int8/int4/int2 sign-extended
// from B bits; sign: -1 for a set bit, else 1), not yet times its scale (decode_kernels.cpp's
// value_at). Fields below a byte never straddle two bytes: byte (j * B) / 8, bits (j * B) % 8
// onwards.
template <WireValues kCodec, bool kAligned>
__device__ __forceinline__ float value_at(const uint8_t* values, int64_t j) {
  if constexpr (kCodec == WireValues::kFloat32) {
    return load<kAligned, float>(values + 4 * j);
  } else if constexpr (kCodec == WireValues::kFloat16) {
    return to_float(load<kAligned, __half>(values + 2 * j));
  } else if constexpr (kCodec == WireValues::kBFloat16) {
    return to_float(load<kAligned, __nv_bfloat16>(values + 2 * j));
  } else if constexpr (kCodec == WireValues::kInt8) {
    return static_cast<float>(static_cast<int8_t>(values[j]));
  } else if constexpr (kCodec == WireValues::kSign) {
    return ((values[j >> 3] >> (j & 7)) & 1u) ? -1.0f : 1.0f;
  } else {
    constexpr int kBits = wire_bits(kCodec);
    const int64_t bit = j * kBits;
    const int32_t field = (values[bit >> 3] >> (bit & 7)) & ((1 << kBits) - 1);
    // Sign-extend the B-bit two's complement field.
    return static_cast<float>(field >= (1 << (kBits - 1)) ? field - (1 << kBits) : field);
  }
}

template <WireValues kCodec, bool kAligned>
__global__ void __launch_bounds__(kThreads) decode_scatter_kernel(DecodeAverageArgs a,
                                                                  Workspace w) {
  constexpr bool kScaled = wire_scaled(kCodec);
  const int64_t total = a.world * a.slots;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t r = t / a.slots, j = t - r * a.slots;
    const uint8_t* p = a.gathered + r * a.nbytes;
    const bool in_use = j < w.used[r];
    int64_t i = -1;
    if (in_use) {
      if (a.index != WireIndex::kInt32) {
        // The first block (csr16), unary or bitmap word (local) whose running sum exceeds j.
        const long long* e = w.ends + r * a.blocks;
        int64_t lo = 0, hi = a.blocks;
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (e[mid] > j) hi = mid; else lo = mid + 1;
        }
        if (lo < a.blocks) {
          int64_t pos;
          if (a.index == WireIndex::kCsr16) {
            pos = lo * kCsr16Block + load<kAligned, uint16_t>(p + a.offsets_offset + 2 * j);
          } else if (a.local_bits > 0) {
            // The set bit q of rank j of the unary counts: slot j is in chunk q - j.
            const uint32_t word = load_bytes<uint32_t>(p + a.index_offset + 4 + 4 * lo);
            const int bit = select_bit(word, j - (lo > 0 ? e[lo - 1] : 0ll));
            const int64_t chunk = bit < 0 ? -1 : 32 * lo + bit - j;
            pos = chunk < 0 || chunk >= a.local_chunks
                      ? -1
                      : (chunk << a.local_bits) +
                            field_at(p + a.offsets_offset, j * a.local_bits, a.local_bits);
          } else {
            // The set bit of rank j - (the set bits of the words before) in word lo, below numel.
            const uint32_t word =
                load_bytes<uint32_t>(p + a.offsets_offset + 4 * lo) & bitmap_mask(a.numel, lo);
            const int bit = select_bit(word, j - (lo > 0 ? e[lo - 1] : 0ll));
            pos = bit < 0 ? -1 : 32 * lo + bit;
          }
          if (pos >= 0 && pos < a.numel) i = pos;
        }
        if (i < 0) a.well_formed[r] = false;  // then added as padding (index 0, value 0)
      } else {
        i = load<kAligned, int32_t>(p + a.index_offset + 4 * j);
        if (i < 0 || i >= a.numel) {  // skipped
          a.well_formed[r] = false;
          continue;
        }
      }
    }
    float v = 0.0f;
    if (i >= 0) {
      v = value_at<kCodec, kAligned>(p + a.values_offset, j);
      if (!kScaled && w.claims[r] && !isfinite(v)) a.well_formed[r] = false;
    } else {
      i = 0;  // padding: a zero value at index 0
    }
    if constexpr (kScaled) {
      v = __fmul_rn(v, load<kAligned, float>(p + a.scales_offset + 4 * (j / a.chunk)));
    }
    // Adding +-0 leaves out unchanged (it starts at +0 and so never holds -0): skipped.
    if (v != 0.0f && a.numel > 0) atomicAdd(a.out + i, v);
  }
}

// ------------------------------------------------------------------------------ 3. finish
__global__ void __launch_bounds__(kThreads) decode_finish_kernel(float* out, int64_t numel,
                                                                 float divisor) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    out[i] = __fdiv_rn(out[i], divisor);
  }
}

template <WireValues kCodec>
void launch_scatter(const DecodeAverageArgs& a, const Workspace& w, bool aligned, unsigned grid,
                    cudaStream_t stream) {
  if (aligned) {
    decode_scatter_kernel<kCodec, true><<<grid, kThreads, 0, stream>>>(a, w);
  } else {
    decode_scatter_kernel<kCodec, false><<<grid, kThreads, 0, stream>>>(a, w);
  }
}

unsigned grid_for(int64_t count, int64_t cap) {
  const int64_t want = (count + kThreads - 1) / kThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > cap ? cap : want));
}

}  // namespace

size_t decode_average_workspace_bytes(int64_t world, int64_t blocks) {
  return align_up(sizeof(long long) * static_cast<size_t>(world * blocks)) +
         2 * align_up(sizeof(int32_t) * static_cast<size_t>(world > 0 ? world : 1));
}

cudaError_t decode_average(const DecodeAverageArgs& a, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  if (workspace_bytes < decode_average_workspace_bytes(a.world, a.blocks)) {
    return cudaErrorInvalidValue;
  }
  // The layout's sizes, which bound every read: ceil(K / chunk) scales (none for float codecs),
  // and the values section, ceil(K * B / 8) bytes, inside the payload.
  if (a.slots < 0 || a.nbytes < a.values_offset + (a.slots * wire_bits(a.values) + 7) / 8) {
    return cudaErrorInvalidValue;
  }
  if (wire_scaled(a.values) ? a.chunk <= 0 || a.num_scales != (a.slots + a.chunk - 1) / a.chunk
                            : a.num_scales != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.index == WireIndex::kLocal) {
    // The local index's sections, below the scales: offsets mode, the descriptor, the unary
    // counts (ceil((K + chunks) / 32) words, chunks = ceil(numel / 2^b)) and ceil(K * b / 8)
    // bytes of offsets; bitmap mode, the descriptor and ceil(numel / 32) words.
    const int b = a.local_bits;
    const bool fits =
        b >= 0 && b <= 15 && a.numel >= 0 && a.index_offset >= 0 &&
        (b == 0 ? a.blocks == (a.numel + 31) / 32 && a.offsets_offset >= a.index_offset + 4 &&
                      a.offsets_offset + 4 * a.blocks <= a.scales_offset
                : a.local_chunks == (a.numel + (int64_t(1) << b) - 1) >> b &&
                      a.blocks == (a.slots + a.local_chunks + 31) / 32 &&
                      a.offsets_offset >= a.index_offset + 4 + 4 * a.blocks &&
                      a.offsets_offset + (a.slots * b + 7) / 8 <= a.scales_offset);
    if (!fits) return cudaErrorInvalidValue;
  }
  if (a.world == 0 && a.numel == 0) return cudaSuccess;
  const Workspace w = carve(workspace, a.world, a.blocks);
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t cap = int64_t(sms) * 16;
  // Enough blocks to zero out, and at least one per rank up to the cap (they loop beyond it).
  const int64_t prepare = (a.numel + kThreads - 1) / kThreads;
  const int64_t want = prepare > a.world ? prepare : a.world;
  const unsigned prepare_grid = static_cast<unsigned>(want < 1 ? 1 : (want > cap ? cap : want));
  decode_prepare_kernel<<<prepare_grid, kThreads, 0, stream>>>(a, w);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t entries = a.world * a.slots;
  if (entries > 0 && a.numel > 0) {
    // Every field starts at a multiple of 4 bytes from its payload's start.
    const bool aligned = reinterpret_cast<uintptr_t>(a.gathered) % 4 == 0 && a.nbytes % 4 == 0;
    const unsigned grid = grid_for(entries, cap);
    using V = WireValues;
    switch (a.values) {
      case V::kFloat32: launch_scatter<V::kFloat32>(a, w, aligned, grid, stream); break;
      case V::kFloat16: launch_scatter<V::kFloat16>(a, w, aligned, grid, stream); break;
      case V::kBFloat16: launch_scatter<V::kBFloat16>(a, w, aligned, grid, stream); break;
      case V::kInt8: launch_scatter<V::kInt8>(a, w, aligned, grid, stream); break;
      case V::kInt4: launch_scatter<V::kInt4>(a, w, aligned, grid, stream); break;
      case V::kInt2: launch_scatter<V::kInt2>(a, w, aligned, grid, stream); break;
      case V::kSign: launch_scatter<V::kSign>(a, w, aligned, grid, stream); break;
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.divisor != 1.0f && a.numel > 0) {
    decode_finish_kernel<<<grid_for(a.numel, cap), kThreads, 0, stream>>>(a.out, a.numel,
                                                                          a.divisor);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradsieve

// Shared by the CPU codec kernels (codec_kernels.cpp) and the fused pack (compress_kernels.cpp).
#pragma once

#include <cstdint>

// The hot loops are plain float loops, cloned for AVX2 where the compiler supports function
// multi-versioning (the loader picks the clone the machine runs), so they vectorise as wide as the
// hardware allows without building the whole extension for one instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GRADSIEVE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GRADSIEVE_CLONES
#endif

namespace gradsieve {
namespace cpu {

// max |x| over x[0, n) as the bit pattern of |x|: NaN and Inf (>= 0x7f800000) above every number.
GRADSIEVE_CLONES uint32_t chunk_abs_bits_max(const float* __restrict x, int64_t n);

}  // namespace cpu
}  // namespace gradsieve

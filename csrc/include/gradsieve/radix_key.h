// Order-preserving integer keys for magnitudes, shared by the CPU and CUDA radix selects.
//
// Every selection in gradsieve ranks entries by |x|. A radix select needs an unsigned integer whose
// order is the order of |x|: for an IEEE float with the sign bit cleared, the raw bits already have
// that property (0 < subnormals < normals < +inf). The policy this header fixes, in one place:
//   * -0.0 and +0.0 map to the same key 0 (equal magnitudes);
//   * every NaN, whatever its sign or payload, maps to the single largest key, so NaN counts as the
//     largest magnitude and all NaNs tie with one another (the lower index then wins);
//   * float16 and bfloat16 are widened to float first: the widening is exact and monotonic, so their
//     keys order exactly as their magnitudes do.
// The header has no torch dependency and compiles as host C++ and as CUDA device code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GRADSIEVE_HD __host__ __device__ __forceinline__
#else
#define GRADSIEVE_HD inline
#endif

namespace gradsieve {

struct AbsKeyTraits {
  using Key = uint32_t;
  static constexpr int kBits = 32;
  // Key of a NaN: above the key of +inf (0x7F800000) and of any finite value.
  static constexpr Key kNanKey = 0xFFFFFFFFu;
  static constexpr Key kInfKey = 0x7F800000u;

  GRADSIEVE_HD static Key from_float(float v) {
    uint32_t bits;
#if defined(__CUDA_ARCH__)
    bits = __float_as_uint(v);
#else
    std::memcpy(&bits, &v, sizeof(bits));
#endif
    bits &= 0x7FFFFFFFu;
    return bits > kInfKey ? kNanKey : bits;
  }

  // Key of a threshold t for the rule |x| >= t. A threshold at or below zero admits every entry
  // (key 0); a NaN threshold admits only NaN entries.
  GRADSIEVE_HD static Key threshold_key(float t) {
    if (t <= 0.0f) return 0u;
    return from_float(t);
  }
};

// Digit layout of the select: three passes of 11, 11 and 10 bits, most significant first.
struct RadixDigits {
  static constexpr int kPasses = 3;
  static constexpr int kMaxBins = 2048;
  GRADSIEVE_HD static int shift(int pass) { return pass == 0 ? 21 : (pass == 1 ? 10 : 0); }
  GRADSIEVE_HD static int bits(int pass) { return pass == 2 ? 10 : 11; }
  GRADSIEVE_HD static uint32_t digit(uint32_t key, int pass) {
    return (key >> shift(pass)) & ((1u << bits(pass)) - 1u);
  }
  // Mask of the key bits already fixed before `pass` runs.
  GRADSIEVE_HD static uint32_t prefix_mask(int pass) {
    return pass == 0 ? 0u : ~((1u << (shift(pass - 1))) - 1u);
  }
};

// Counter-based uniform draw in [0, 1) used by stochastic rounding on both backends, so that one
// seed gives the same rounding on CPU and CUDA. SplitMix64 finaliser over (seed, counter).
GRADSIEVE_HD float uniform_from_counter(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z = z ^ (z >> 31);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // 24 random bits
}

// The draw stochastic rounding adds to slot `slot`'s v / scale in pack_payload: the counter holds
// v's bit pattern (high 32 bits) and the slot (low 32 bits), so that ranks sending different
// values under one seed draw independently.
GRADSIEVE_HD float rounding_draw(uint64_t seed, int64_t slot, uint32_t value_bits) {
  return uniform_from_counter(
      seed, (static_cast<uint64_t>(value_bits) << 32) | (static_cast<uint64_t>(slot) & 0xFFFFFFFFull));
}

}  // namespace gradsieve

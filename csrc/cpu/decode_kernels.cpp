// CPU kernel of decode_average_: the world's gathered payloads (uint8[world, nbytes], the layout of
// python/gradsieve/wire.py's PayloadFormat) decoded into their average, out = (sum over ranks of
// the decoded entries) / divisor, with each payload's finite and well-formed flags.
//
// Pass 1 (one task per rank): the header (finite flag 0 or 1, count in [0, K]), the checksum when
// the format has one, csr16's block counts (none negative, adding up to the count) or the local
// index (its descriptor; as many bits set in its unary counts or its bitmap as the count, none
// of the bitmap's past numel), the scales
// and every slot in use (its index inside the bucket; a finite value under a header that says
// finite), each slot's position kept in a buffer of world * K int32: one read of each payload.
// Pass 2 (the output split in ranges across threads): each thread zeroes its range, applies the
// entries that land in it, rank 0 first and each rank's slots in order, then divides its range by
// the divisor: one write of out plus one read of the values and of the positions per thread. Every entry is added exactly as PayloadFormat.decode_sum and sparse_accumulate_ add
// it (padding slots included: index 0, value 0, times the chunk's scale for scaled codecs), so the result
// is bitwise `out.zero_(); fmt.decode_sum(gathered, out); out.div_(divisor)`, malformed payloads
// included. Nothing is written outside out and no byte pattern raises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../ops/validation.h"
#include "../ops/validation_decode.h"

namespace gradsieve {
namespace cpu {
namespace {

constexpr int64_t kMinRange = int64_t(1) << 14;
constexpr int64_t kChecksumModulus = 65521;

// Payload fields may sit at any byte offset (world rows of an odd nbytes): read through memcpy.
template <typename T>
inline T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Slot j's value (float codecs) or code (the others, as a float: int8/int4/int2 sign-extended
// from B bits; sign: -1 for a set bit, else 1), not yet times its scale.
inline float value_at(const uint8_t* values, int64_t j, Codec codec) {
  switch (codec) {
    case Codec::kF32: return load<float>(values + 4 * j);
    case Codec::kF16: return static_cast<float>(load<at::Half>(values + 2 * j));
    case Codec::kBF16: return static_cast<float>(load<at::BFloat16>(values + 2 * j));
    case Codec::kI8: return static_cast<float>(load<int8_t>(values + j));
    case Codec::kSign: return ((values[j >> 3] >> (j & 7)) & 1u) ? -1.0f : 1.0f;
    default: {
      const int64_t bits = codec_bits(codec);
      const int64_t bit = j * bits;
      const int32_t field = (values[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
      // Sign-extend the B-bit two's complement field.
      return static_cast<float>(field >= (1 << (bits - 1)) ? field - (1 << bits) : field);
    }
  }
}

// wire.checksum_of of a payload with its checksum word (bytes 8..11) read as zero: the sums wrap
// modulo 2^64 as torch's int64 sums do, then Python's remainder (never negative).
uint32_t checksum_of(const uint8_t* p, int64_t n) {
  uint64_t low = 0, high = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t b = (i >= 8 && i < 12) ? 0u : p[i];
    low += b;
    high += b * static_cast<uint64_t>(n - i);
  }
  const auto mod = [](uint64_t x) {
    const int64_t r = static_cast<int64_t>(x) % kChecksumModulus;
    return r < 0 ? r + kChecksumModulus : r;
  };
  return static_cast<uint32_t>(mod(high) * 65536 + mod(low));
}

struct Format {
  PackLayout<int64_t> layout;
  Codec codec;
  int64_t chunk;
  bool csr16;
  bool checksum;
  int64_t numel;
  bool local() const { return layout.index == IndexKind::kLocal; }
  bool bitmap() const { return local() && layout.local.bitmap; }
  // Slots whose position the index may not give (csr16, local): they add their zero value.
  bool positional() const { return csr16 || local(); }
  // Running sums kept per payload: csr16's blocks.
  int64_t counted() const { return csr16 ? layout.blocks : 0; }
};

// The `bits`-bit field at bit `bit` of `base` (LSB first).
inline uint32_t bits_at(const uint8_t* base, int64_t bit, int64_t bits) {
  uint32_t v = 0;
  int64_t got = 0;
  while (got < bits) {
    const int64_t shift = bit & 7;
    const int64_t take = std::min<int64_t>(8 - shift, bits - got);
    v |= static_cast<uint32_t>((base[bit >> 3] >> shift) & ((1u << take) - 1u)) << got;
    bit += take;
    got += take;
  }
  return v;
}

// The first set bit at or after bit `from` of an LSB-first bit field (bit b is bit b % 8 of byte
// b / 8) of `end` bits or more, a multiple of 32 bits long; `end` when there is none below `end`.
// A 32-bit word at a time.
inline int64_t next_set_bit(const uint8_t* base, int64_t from, int64_t end) {
  while (from < end) {
    const int64_t word = from >> 5;
    const uint32_t bits = load<uint32_t>(base + 4 * word) >> (from & 31);
    if (bits != 0) return std::min<int64_t>(from + __builtin_ctz(bits), end);
    from = (word + 1) << 5;
  }
  return end;
}

// Slot j's bucket position, for the slots of one payload in order (j = 0, 1, ...): int32 indices
// as they are (possibly outside the bucket); csr16 positions block * 65536 + offset, -1 beyond
// the counts or the bucket (`ends` holds the running sums of the block counts); local positions
// chunk * 2^b + offset with chunk = q - j, q the (j + 1)-th set bit of the unary counts, -1 when
// there is none, or the chunk or the position is past the bucket; local bitmap: the position of
// the (j + 1)-th set bit, -1 when there is none below numel.
class SlotIndex {
 public:
  SlotIndex(const Format& f, const uint8_t* payload, const int64_t* ends)
      : f_(f), p_(payload), ends_(ends) {}
  int64_t operator()(int64_t j) {
    const PackLayout<int64_t>& l = f_.layout;
    if (f_.bitmap()) {
      cursor_ = next_set_bit(p_ + l.offsets_offset, cursor_, f_.numel);
      if (cursor_ >= f_.numel) return -1;
      return cursor_++;
    }
    if (f_.local()) {
      const int64_t end = 8 * l.local.counts_bytes;
      cursor_ = next_set_bit(p_ + l.index_offset + 4, cursor_, end);
      if (cursor_ >= end) return -1;
      const int64_t chunk = cursor_++ - j;
      if (chunk >= l.local.chunks) return -1;
      const int64_t pos =
          (chunk << l.local.bits) + bits_at(p_ + l.offsets_offset, j * l.local.bits, l.local.bits);
      return pos < f_.numel ? pos : -1;
    }
    const int64_t counted = f_.counted();
    if (counted == 0 && !f_.positional()) return load<int32_t>(p_ + l.index_offset + 4 * j);
    while (block_ < counted && ends_[block_] <= j) ++block_;
    if (block_ >= counted) return -1;
    const int64_t pos = block_ * kCsr16Block + load<uint16_t>(p_ + l.offsets_offset + 2 * j);
    return pos < f_.numel ? pos : -1;
  }

 private:
  const Format& f_;
  const uint8_t* p_;
  const int64_t* ends_;
  int64_t block_ = 0;
  int64_t cursor_ = 0;
};

// Pass 1 for one payload: its flags and the number of slots in use; csr16's block ends.
void check_payload(const Format& f, const uint8_t* p, int64_t* ends, int32_t* positions,
                   bool* finite, bool* well_formed, int64_t* used_out) {
  const PackLayout<int64_t>& l = f.layout;
  const int32_t flag = load<int32_t>(p), count = load<int32_t>(p + 4);
  *finite = flag != 0;
  bool ok = count >= 0 && count <= l.entries && (flag == 0 || flag == 1);
  const bool claims_finite = flag == 1;
  const int64_t used = std::min<int64_t>(std::max<int32_t>(count, 0), l.entries);
  *used_out = used;
  if (f.checksum) ok &= checksum_of(p, l.nbytes) == load<uint32_t>(p + 8);
  if (f.csr16) {
    int64_t total = 0;
    for (int64_t b = 0; b < l.blocks; ++b) {
      const int32_t c = load<int32_t>(p + l.index_offset + 4 * b);
      ok &= c >= 0;
      total += std::max<int32_t>(c, 0);
      ends[b] = total;
    }
    ok &= total == used;
  } else if (f.local()) {
    ok &= load<int32_t>(p + l.index_offset) ==
          (l.local.bitmap ? kLocalBitmap : static_cast<int32_t>(l.local.bits));
    int64_t total = 0;
    if (l.local.bitmap) {
      // Set bits below numel, and none at or past it.
      const uint8_t* bitmap = p + l.offsets_offset;
      for (int64_t byte = 0; byte < l.local.offsets_bytes; ++byte) {
        const int64_t below = std::min<int64_t>(std::max<int64_t>(f.numel - 8 * byte, 0), 8);
        const uint32_t bits = bitmap[byte];
        const uint32_t inside = bits & ((1u << below) - 1u);
        ok &= inside == bits;
        total += __builtin_popcount(inside);
      }
    } else {
      // Set bits of the unary counts, its padding included.
      const uint8_t* unary = p + l.index_offset + 4;
      for (int64_t byte = 0; byte < l.local.counts_bytes; ++byte) {
        total += __builtin_popcount(static_cast<uint32_t>(unary[byte]));
      }
    }
    ok &= total == used;
  }
  // Padding slots decode to index 0, outside an empty bucket.
  if (f.numel == 0 && l.entries > 0) ok = false;
  if (codec_scaled(f.codec)) {
    for (int64_t s = 0; s < l.num_scales && claims_finite; ++s) {
      ok &= std::isfinite(load<float>(p + l.scales_offset + 4 * s));
    }
  }
  SlotIndex index_of(f, p, ends);
  const uint8_t* values = p + l.values_offset;
  for (int64_t j = 0; j < used; ++j) {
    const int64_t i = index_of(j);
    positions[j] = static_cast<int32_t>(i);  // an int32 index as it is, or a position, or -1
    if (!ok) continue;
    if (i < 0 || i >= f.numel) {
      ok = false;
    } else if (claims_finite && !codec_scaled(f.codec)) {
      ok &= std::isfinite(value_at(values, j, f.codec));
    }
  }
  *well_formed = ok;
}

// Pass 2 for one payload, restricted to out[lo, hi): every slot in order, as decode_sum feeds it
// to sparse_accumulate_ (a slot not in use, or a csr16 slot without a position, adds its zero
// value, times its scale for a scaled codec, at index 0; an int32 index outside the bucket adds nothing).
void apply_payload(const Format& f, const uint8_t* p, const int32_t* positions, int64_t used,
                   float* out, int64_t lo, int64_t hi) {
  const PackLayout<int64_t>& l = f.layout;
  const uint8_t* values = p + l.values_offset;
  const bool scaled = codec_scaled(f.codec);
  for (int64_t j = 0; j < l.entries; ++j) {
    int64_t i = j < used ? positions[j] : -1;
    float v;
    if (j < used && (i >= 0 || !f.positional())) {
      v = value_at(values, j, f.codec);
    } else {
      i = 0;
      v = 0.0f;
    }
    if (i < lo || i >= hi) continue;
    if (scaled) v *= load<float>(p + l.scales_offset + 4 * (j / f.chunk));
    out[i] = out[i] + v;
  }
}

std::tuple<at::Tensor, at::Tensor> decode_average_cpu(at::Tensor& out,
                                                      const at::Tensor& gathered_in,
                                                      int64_t slots, c10::string_view values,
                                                      int64_t chunk, c10::string_view index,
                                                      bool checksum, double divisor) {
  const Codec codec = check_decode_average(out, gathered_in, slots, values, chunk, index,
                                           checksum, divisor);
  const IndexKind kind = index_of("decode_average_", index);
  const bool csr16 = kind == IndexKind::kCsr16;
  const at::Tensor gathered = gathered_in.contiguous();
  const int64_t world = gathered.size(0), numel = out.numel();
  const Format f{pack_layout<int64_t>(slots, codec, chunk, kind, numel, checksum), codec, chunk,
                 csr16, checksum, numel};
  const auto flag_options = gathered.options().dtype(at::kBool);
  at::Tensor finite = at::empty({world}, flag_options);
  at::Tensor well_formed = at::empty({world}, flag_options);
  bool* fin = finite.data_ptr<bool>();
  bool* wf = well_formed.data_ptr<bool>();
  const uint8_t* base = world > 0 ? gathered.data_ptr<uint8_t>() : nullptr;
  const int64_t nbytes = f.layout.nbytes, blocks = f.counted();
  std::vector<int64_t> ends(static_cast<size_t>(std::max<int64_t>(world * blocks, 1)));
  std::vector<int64_t> used(static_cast<size_t>(std::max<int64_t>(world, 1)));
  // Each slot's position, found once per payload in pass 1 and read by every thread in pass 2.
  const int64_t slots_per = f.layout.entries;
  std::vector<int32_t> positions(static_cast<size_t>(std::max<int64_t>(world * slots_per, 1)));
  at::parallel_for(0, world, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      check_payload(f, base + r * nbytes, ends.data() + r * blocks, positions.data() + r * slots_per,
                    fin + r, wf + r, used.data() + r);
    }
  });
  float* o = out.data_ptr<float>();
  const float d = static_cast<float>(divisor);
  const int64_t grain =
      std::max<int64_t>(kMinRange, (numel + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, numel, grain, [&](int64_t lo, int64_t hi) {
    std::fill(o + lo, o + hi, 0.0f);
    for (int64_t r = 0; r < world; ++r) {
      apply_payload(f, base + r * nbytes, positions.data() + r * slots_per, used[r], o, lo, hi);
    }
    // x / 1 is x, bit for bit (out holds no signalling NaN): the division is skipped.
    if (d != 1.0f) {
      for (int64_t i = lo; i < hi; ++i) o[i] = o[i] / d;
    }
  });
  return {finite, well_formed};
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("decode_average_", &gradsieve::cpu::decode_average_cpu);
}

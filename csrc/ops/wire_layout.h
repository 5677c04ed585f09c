// The byte layout of a sparse payload (python/gradsieve/wire.py, PayloadFormat), computed in one
// place for pack_payload and decode_average_ on every backend, and its value codecs.
//
//   header  int32[2] (finite flag, count C) [+ int32[2] checksum field]
//   index   int32[K], or csr16: int32[blocks] counts then int16[K] offsets padded to 4 bytes
//   scales  float32[ceil(K / chunk)]           scaled codecs (int8, int4, int2, sign) only
//   values  ceil(K * bits / 8) bytes           fp32/fp16/bf16 values, or B-bit codes packed LSB
//                                              first (entry j's code starts at bit j * B)
//
// K slots, no padding: the last scale's chunk may be partial. Every section starts at a multiple
// of 4 bytes from the payload's start; the payload ends at the byte its last code needs.
// Templated on the integer type so that Meta kernels compute sizes with torch.compile's symbolic
// sizes (c10::SymInt).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string>

#include "validation.h"

namespace gradsieve {

enum class Codec : int32_t { kF32 = 0, kF16, kBF16, kI8, kI4, kI2, kSign };

// The codec named `name` ("fp32", "fp16", "bf16", "int8", "int4", "int2" or "sign"); a clear error
// naming `op` and `arg` otherwise.
inline Codec codec_of(const char* op, const char* arg, c10::string_view name) {
  if (name == "fp32") return Codec::kF32;
  if (name == "fp16") return Codec::kF16;
  if (name == "bf16") return Codec::kBF16;
  if (name == "int8") return Codec::kI8;
  if (name == "int4") return Codec::kI4;
  if (name == "int2") return Codec::kI2;
  if (name == "sign") return Codec::kSign;
  TORCH_CHECK(false, "gradsieve.", op, ": ", arg,
              " must be one of 'fp32', 'fp16', 'bf16', 'int8', 'int4', 'int2', 'sign', got '",
              std::string(name.data(), name.size()), "'");
}

// Bits per entry on the wire.
inline int64_t codec_bits(Codec c) {
  switch (c) {
    case Codec::kF32: return 32;
    case Codec::kF16:
    case Codec::kBF16: return 16;
    case Codec::kI8: return 8;
    case Codec::kI4: return 4;
    case Codec::kI2: return 2;
    default: return 1;
  }
}

// Whether values are codes times a float32 scale per chunk.
inline bool codec_scaled(Codec c) { return c >= Codec::kI8; }

// The largest code magnitude of the integer codecs (2^(B-1) - 1); 0 for the others.
inline int32_t codec_qmax(Codec c) {
  switch (c) {
    case Codec::kI8: return 127;
    case Codec::kI4: return 7;
    case Codec::kI2: return 1;
    default: return 0;
  }
}

inline bool is_csr16(c10::string_view index) { return index == "csr16"; }

template <typename I>
struct PackLayout {
  I entries;              // K (slots: every one is on the wire)
  Codec codec;
  int64_t bits;           // per value
  int64_t header_bytes;   // 8, or 16 with the checksum field
  int64_t blocks;         // csr16 block counts (0 for int32 indices)
  int64_t index_offset;   // == header_bytes
  int64_t offsets_offset; // csr16: the int16 offsets, after the block counts
  I index_bytes;
  I scales_offset;
  I num_scales;
  I values_offset;
  I values_bytes;
  I nbytes;
};

template <typename I>
PackLayout<I> pack_layout(const I& entries, Codec codec, int64_t chunk, bool csr16, int64_t numel,
                          bool checksum) {
  PackLayout<I> p{entries, codec, codec_bits(codec), checksum ? 16 : 8, 0, 0, 0,
                  I(0), I(0), I(0), I(0), I(0), I(0)};
  p.index_offset = p.header_bytes;
  if (csr16) {
    p.blocks = csr16_blocks(numel);
    p.index_bytes = (entries * 2 + 3) / 4 * 4 + 4 * p.blocks;
  } else {
    p.index_bytes = entries * 4;
  }
  p.offsets_offset = p.index_offset + 4 * p.blocks;
  if (codec_scaled(codec)) p.num_scales = (entries + (chunk - 1)) / chunk;
  p.scales_offset = p.index_bytes + p.header_bytes;
  p.values_offset = p.scales_offset + p.num_scales * 4;
  p.values_bytes = (entries * p.bits + 7) / 8;
  p.nbytes = p.values_offset + p.values_bytes;
  return p;
}

}  // namespace gradsieve

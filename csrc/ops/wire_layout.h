// The byte layout of a sparse payload (python/gradsieve/wire.py, PayloadFormat), computed in one
// place for pack_payload and decode_average_ on every backend, and its value codecs.
//
//   header  int32[2] (finite flag, count C) [+ int32[2] checksum field]
//   index   int32[K]; or csr16: int32[blocks] counts then int16[K] offsets padded to 4 bytes; or
//           local: int32 descriptor, then the chunk counts in unary (K + chunks bits) and K b-bit
//           offsets (each part padded to 4 bytes), or a bitmap of numel bits padded to 4 bytes
//           (local_layout)
//   scales  float32[ceil(K / chunk)]           scaled codecs (int8, int4, int2, sign) only
//   values  ceil(K * bits / 8) bytes           fp32/fp16/bf16 values, or B-bit codes packed LSB
//                                              first (entry j's code starts at bit j * B)
//
// K slots, no padding: the last scale's chunk may be partial. Every section starts at a multiple
// of 4 bytes from the payload's start; the payload ends at the byte its last code needs.
// Templated on the integer type so that Meta kernels compute sizes with torch.compile's symbolic
// sizes (c10::SymInt).
#pragma once

#include <c10/core/SymInt.h>
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

enum class IndexKind : int32_t { kInt32 = 0, kCsr16, kLocal };

// The index format named `name` ("int32", "csr16" or "local"); a clear error naming `op` otherwise.
inline IndexKind index_of(const char* op, c10::string_view name) {
  if (name == "int32") return IndexKind::kInt32;
  if (name == "csr16") return IndexKind::kCsr16;
  if (name == "local") return IndexKind::kLocal;
  TORCH_CHECK(false, "gradsieve.", op, ": index must be 'int32', 'csr16' or 'local', got '",
              std::string(name.data(), name.size()), "'");
}

// The descriptor word of a local index section in bitmap mode (in offsets mode it is b).
constexpr int32_t kLocalBitmap = 256;

// The chunk-local index of K entries over numel positions: chunks of 2^bits positions, their
// counts in unary (slot j of chunk c sets bit j + c: each chunk's count in ones, then a zero)
// and a bits-bit offset per entry, bits in [1, 15] the smallest section (the smallest bits on a
// tie); or a bitmap of the numel positions when that is smaller still.
struct LocalLayout {
  int64_t bits = 0;     // b (0 in bitmap mode)
  bool bitmap = false;
  int64_t chunks = 0;   // offsets mode: ceil(numel / 2^b)
  int64_t counts_bytes = 0;   // offsets mode: the unary counts, 4 * ceil((K + chunks) / 32)
  int64_t offsets_bytes = 0;  // offsets mode: 4 * ceil(K * b / 32); bitmap mode: 4 * ceil(numel / 32)
  int64_t bytes = 0;    // the whole section: 4 (descriptor) + counts + offsets, or 4 + the bitmap
};

inline LocalLayout local_layout(int64_t entries, int64_t numel) {
  LocalLayout best;
  int64_t best_bytes = -1;
  for (int64_t b = 1; b <= 15; ++b) {
    const int64_t chunks = (numel + (int64_t(1) << b) - 1) >> b;
    const int64_t counts = 4 * ((entries + chunks + 31) / 32);
    const int64_t offsets = 4 * ((entries * b + 31) / 32);
    if (best_bytes < 0 || counts + offsets < best_bytes) {
      best_bytes = counts + offsets;
      best.bits = b;
      best.chunks = chunks;
      best.counts_bytes = counts;
      best.offsets_bytes = offsets;
    }
  }
  const int64_t bitmap = 4 * ((numel + 31) / 32);
  if (bitmap < best_bytes) {
    best = LocalLayout();
    best.bitmap = true;
    best.offsets_bytes = bitmap;
    best_bytes = bitmap;
  }
  best.bytes = 4 + best_bytes;
  return best;
}

// A size as a plain integer: symbolic sizes (torch.compile) are specialised, since the local
// index's layout is not a linear function of them.
inline int64_t concrete_size(int64_t v) { return v; }
inline int64_t concrete_size(const c10::SymInt& v) { return v.guard_int(__FILE__, __LINE__); }

template <typename I>
struct PackLayout {
  I entries;              // K (slots: every one is on the wire)
  Codec codec;
  int64_t bits;           // per value
  int64_t header_bytes;   // 8, or 16 with the checksum field
  IndexKind index;
  int64_t blocks;         // csr16 block counts (0 for other indices)
  int64_t index_offset;   // == header_bytes
  int64_t offsets_offset; // csr16: the int16 offsets, after the block counts; local: the offsets
                          // (or the bitmap), after the descriptor and the counts
  LocalLayout local;      // local indices only
  I index_bytes;
  I scales_offset;
  I num_scales;
  I values_offset;
  I values_bytes;
  I nbytes;
};

template <typename I>
PackLayout<I> pack_layout(const I& entries, Codec codec, int64_t chunk, IndexKind index,
                          int64_t numel, bool checksum) {
  PackLayout<I> p{entries, codec, codec_bits(codec), checksum ? 16 : 8, index, 0, 0, 0,
                  LocalLayout(), I(0), I(0), I(0), I(0), I(0), I(0)};
  p.index_offset = p.header_bytes;
  if (index == IndexKind::kCsr16) {
    p.blocks = csr16_blocks(numel);
    p.index_bytes = (entries * 2 + 3) / 4 * 4 + 4 * p.blocks;
    p.offsets_offset = p.index_offset + 4 * p.blocks;
  } else if (index == IndexKind::kLocal) {
    p.local = local_layout(concrete_size(entries), numel);
    p.index_bytes = I(p.local.bytes);
    p.offsets_offset = p.index_offset + 4 + p.local.counts_bytes;
  } else {
    p.index_bytes = entries * 4;
    p.offsets_offset = p.index_offset;
  }
  if (codec_scaled(codec)) p.num_scales = (entries + (chunk - 1)) / chunk;
  p.scales_offset = p.index_bytes + p.header_bytes;
  p.values_offset = p.scales_offset + p.num_scales * 4;
  p.values_bytes = (entries * p.bits + 7) / 8;
  p.nbytes = p.values_offset + p.values_bytes;
  return p;
}

}  // namespace gradsieve

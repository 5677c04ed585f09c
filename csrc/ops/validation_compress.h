// Argument checks of the fused compress-side ops (registration_compress.cpp:
// pack_payload, ef21_topk, ef21_commit, dgc_accumulate, dgc_mask_), shared by their CPU, CUDA and
// Meta kernels as validation.h's are. Messages read "gradsieve.<op>: <arg> must be ..., got ...".
// Also the byte layout of a packed payload (python/gradsieve/wire.py, PayloadFormat), computed
// once here for every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "validation.h"

namespace gradsieve {

void check_ef21_topk(const at::Tensor& grad, const at::Tensor& estimate, int64_t k);
void check_ef21_commit(const at::Tensor& estimate, const at::Tensor& indices,
                       const at::Tensor& change, const at::Tensor& global_estimate,
                       const at::Tensor& average);
void check_dgc_accumulate(const at::Tensor& grad, const at::Tensor& momentum_u,
                          const at::Tensor& velocity_v, double momentum,
                          const c10::optional<at::Tensor>& grad_scale);
void check_dgc_mask(const at::Tensor& momentum_u, const at::Tensor& velocity_v,
                    const at::Tensor& indices, const c10::optional<at::Tensor>& valid);

// Where each section of a payload of K entries lies (wire.py's module docstring):
//   header  int32[2] (+ int32[2] checksum field)
//   index   int32[slots], or int32[blocks] counts then int16[slots] offsets padded to 4 bytes
//   scales  float32[slots / chunk] (int8 values only)
//   values  wire dtype [slots]
// slots is K, rounded up to a multiple of chunk for int8 values. Templated on the integer type so
// that the Meta kernel computes the size with torch.compile's symbolic sizes (c10::SymInt).
template <typename I>
struct PackLayout {
  I entries;         // K
  I slots;           // K on the wire
  int64_t header_bytes;
  int64_t blocks;    // csr16 block counts (0 for int32 indices)
  I index_bytes;
  I scales_offset;
  I num_scales;
  I values_offset;
  int64_t value_size;
  I nbytes;
};

inline bool is_csr16(c10::string_view index) { return index == "csr16"; }

template <typename I>
PackLayout<I> pack_layout(const I& entries, at::ScalarType wire_dtype, int64_t chunk,
                                c10::string_view index, int64_t numel, bool checksum) {
  PackLayout<I> p{entries, entries, checksum ? 16 : 8, 0, I(0), I(0), I(0), I(0), 1, I(0)};
  const bool int8 = wire_dtype == at::kChar;
  if (int8) {
    p.num_scales = (entries + (chunk - 1)) / chunk;
    p.slots = p.num_scales * chunk;
  }
  if (is_csr16(index)) {
    p.blocks = csr16_blocks(numel);
    p.index_bytes = (p.slots * 2 + 3) / 4 * 4 + 4 * p.blocks;
  } else {
    p.index_bytes = p.slots * 4;
  }
  p.scales_offset = p.index_bytes + p.header_bytes;
  p.values_offset = p.scales_offset + p.num_scales * 4;
  p.value_size = int8 ? 1 : static_cast<int64_t>(c10::elementSize(wire_dtype));
  p.nbytes = p.values_offset + p.slots * p.value_size;
  return p;
}

// Checks pack_payload's arguments (the layout is then pack_layout(indices.numel(), ...)).
void check_pack_payload(const at::Tensor& finite, const at::Tensor& indices,
                        const at::Tensor& values, const c10::optional<at::Tensor>& valid,
                        at::ScalarType wire_dtype, int64_t chunk, c10::string_view index,
                        int64_t numel, bool checksum);

}  // namespace gradsieve

#include "validation_decode.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "validation.h"

namespace gradsieve {

Codec check_decode_average(const at::Tensor& out, const at::Tensor& gathered, int64_t slots,
                           c10::string_view values, int64_t chunk, c10::string_view index,
                           bool checksum, double divisor) {
  TORCH_CHECK(out.defined() && out.scalar_type() == at::kFloat,
              "gradsieve.decode_average_: out must be a float32 tensor, got ",
              out.defined() ? c10::toString(out.scalar_type()) : "None");
  TORCH_CHECK(out.is_contiguous(), "gradsieve.decode_average_: out must be contiguous, got strides ",
              out.strides());
  TORCH_CHECK(out.sym_numel() <= kMaxNumel,
              "gradsieve.decode_average_: out must have at most 2^31 - 1 elements, got ",
              out.sym_numel());
  TORCH_CHECK(gathered.defined() && gathered.scalar_type() == at::kByte && gathered.dim() == 2,
              "gradsieve.decode_average_: gathered must be a 2-D uint8 tensor [world, nbytes], got ",
              gathered.defined() ? c10::toString(gathered.scalar_type()) : "None", " of ",
              gathered.defined() ? gathered.dim() : 0, " dims");
  TORCH_CHECK(gathered.device() == out.device(),
              "gradsieve.decode_average_: gathered must be on the same device as out (",
              out.device(), "), got ", gathered.device());
  TORCH_CHECK(slots >= 0 && slots <= kMaxNumel,
              "gradsieve.decode_average_: slots must be in [0, 2^31 - 1], got ", slots);
  const Codec codec = codec_of("decode_average_", "values", values);
  TORCH_CHECK(!codec_scaled(codec) || (chunk > 0 && chunk <= (int64_t(1) << 20)),
              "gradsieve.decode_average_: chunk must be in [1, 2^20] with ",
              std::string(values.data(), values.size()), " values, got ", chunk);
  const IndexKind kind = index_of("decode_average_", index);
  TORCH_CHECK(std::isfinite(divisor) && divisor > 0.0,
              "gradsieve.decode_average_: divisor must be a finite number > 0, got ", divisor);
  // The payload size, as SymInt: the csr16 block count follows out's (possibly symbolic) size; the
  // local index's layout needs its concrete value.
  c10::SymInt nbytes;
  if (kind == IndexKind::kLocal) {
    nbytes = pack_layout<int64_t>(slots, codec, chunk, kind, concrete_size(out.sym_numel()), checksum)
                 .nbytes;
  } else {
    const c10::SymInt blocks = kind == IndexKind::kCsr16
                                   ? (out.sym_numel() + (kCsr16Block - 1)) / kCsr16Block
                                   : c10::SymInt(0);
    nbytes = blocks * 4 + pack_layout<int64_t>(slots, codec, chunk, kind, 0, checksum).nbytes;
  }
  TORCH_CHECK(gathered.sym_size(1) == nbytes, "gradsieve.decode_average_: gathered must have ",
              nbytes, " bytes per payload (slots ", slots, ", ",
              std::string(values.data(), values.size()), " values, ", index, " indices over ",
              out.sym_numel(), " entries", checksum ? ", checksum" : "", "), got ",
              gathered.sym_size(1));
  return codec;
}

}  // namespace gradsieve

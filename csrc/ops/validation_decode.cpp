#include "validation_decode.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "validation.h"

namespace gradsieve {
namespace {

int64_t value_size_of(at::ScalarType t) { return t == at::kChar ? 1 : (t == at::kFloat ? 4 : 2); }

}  // namespace

PayloadLayout payload_layout(int64_t slots, at::ScalarType value_dtype, int64_t chunk, bool csr16,
                             int64_t numel, bool checksum) {
  PayloadLayout l;
  l.slots = slots;
  l.blocks = csr16 ? csr16_blocks(numel) : 0;
  l.num_scales = value_dtype == at::kChar ? slots / chunk : 0;
  l.value_size = value_size_of(value_dtype);
  l.header_bytes = checksum ? 16 : 8;
  l.index_offset = l.header_bytes;
  l.offsets_offset = l.index_offset + 4 * l.blocks;
  const int64_t index_bytes = csr16 ? 4 * l.blocks + (2 * slots + 3) / 4 * 4 : 4 * slots;
  l.scales_offset = l.index_offset + index_bytes;
  l.values_offset = l.scales_offset + 4 * l.num_scales;
  l.nbytes = l.values_offset + l.value_size * slots;
  return l;
}

bool check_decode_average(const at::Tensor& out, const at::Tensor& gathered, int64_t slots,
                          at::ScalarType value_dtype, int64_t chunk, c10::string_view index,
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
  TORCH_CHECK(value_dtype == at::kFloat || value_dtype == at::kHalf ||
                  value_dtype == at::kBFloat16 || value_dtype == at::kChar,
              "gradsieve.decode_average_: value_dtype must be float32, float16, bfloat16 or int8, "
              "got ", value_dtype);
  if (value_dtype == at::kChar) {
    TORCH_CHECK(chunk > 0, "gradsieve.decode_average_: chunk must be > 0 with int8 values, got ",
                chunk);
    TORCH_CHECK(slots % chunk == 0, "gradsieve.decode_average_: slots must be a multiple of chunk (",
                chunk, ") with int8 values, got ", slots);
  }
  const std::string index_name(index.data(), index.size());
  TORCH_CHECK(index_name == "int32" || index_name == "csr16",
              "gradsieve.decode_average_: index must be \"int32\" or \"csr16\", got \"",
              index_name, "\"");
  TORCH_CHECK(std::isfinite(divisor) && divisor > 0.0,
              "gradsieve.decode_average_: divisor must be a finite number > 0, got ", divisor);
  const bool csr16 = index_name == "csr16";
  // The payload size, as SymInt: the csr16 block count follows out's (possibly symbolic) size.
  const c10::SymInt blocks = csr16 ? (out.sym_numel() + (kCsr16Block - 1)) / kCsr16Block
                                   : c10::SymInt(0);
  const int64_t num_scales = value_dtype == at::kChar ? slots / chunk : 0;
  const int64_t fixed = (checksum ? 16 : 8) +
                        (csr16 ? (2 * slots + 3) / 4 * 4 : 4 * slots) + 4 * num_scales +
                        value_size_of(value_dtype) * slots;
  const c10::SymInt nbytes = blocks * 4 + fixed;
  TORCH_CHECK(gathered.sym_size(1) == nbytes, "gradsieve.decode_average_: gathered must have ",
              nbytes, " bytes per payload (slots ", slots, ", ", value_dtype, " values, ", index,
              " indices over ", out.sym_numel(), " entries", checksum ? ", checksum" : "",
              "), got ", gathered.sym_size(1));
  return csr16;
}

}  // namespace gradsieve

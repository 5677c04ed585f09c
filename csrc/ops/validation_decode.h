// Argument checks of decode_average_ (the fused decode of the world's gathered payloads), shared by
// its CPU, CUDA and Meta kernels. Messages read "gradsieve.decode_average_: <arg> must be ..., got
// ...". The payload layout is wire_layout.h's (python/gradsieve/wire.py's PayloadFormat).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>

#include <string>

#include "wire_layout.h"

namespace gradsieve {

// Validates every argument and returns the codec named by `values` (the layout of one payload is
// then pack_layout(slots, codec, chunk, index_of(op, index), out.numel(), checksum)).
Codec check_decode_average(const at::Tensor& out, const at::Tensor& gathered, int64_t slots,
                           c10::string_view values, int64_t chunk, c10::string_view index,
                           bool checksum, double divisor);

}  // namespace gradsieve

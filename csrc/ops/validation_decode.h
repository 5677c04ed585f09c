// Argument checks of decode_average_ (the fused decode of the world's gathered payloads), shared by
// its CPU, CUDA and Meta kernels; the payload layout's sizes, computed in one place. Messages read
// "gradsieve.decode_average_: <arg> must be ..., got ...". The layout is python/gradsieve/wire.py's
// PayloadFormat: header int32[2] (finite flag, count) [+ int32[2] checksum field], index (int32[K],
// or csr16: int32[blocks] counts + int16[K] offsets padded to 4 bytes), float32[K / chunk] scales
// for int8 values, then K values.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>

#include <string>

namespace gradsieve {

// The byte offsets of one payload's fields (every one a multiple of 4 from the payload's start).
struct PayloadLayout {
  int64_t slots = 0;         // K
  int64_t blocks = 0;        // csr16 blocks (0 for int32 indices)
  int64_t num_scales = 0;    // int8 only: K / chunk
  int64_t value_size = 4;    // bytes per value
  int64_t header_bytes = 8;  // 16 with the checksum field
  int64_t index_offset = 8;
  int64_t offsets_offset = 8;  // csr16: the int16 offsets, after the block counts
  int64_t scales_offset = 8;
  int64_t values_offset = 8;
  int64_t nbytes = 8;
};

// The layout for K `slots` of `value_dtype` (kFloat, kHalf, kBFloat16 or kChar) with int8 `chunk`,
// `csr16` or int32 indices over a bucket of `numel` entries, with or without the checksum field.
// Assumes the arguments passed check_decode_average.
PayloadLayout payload_layout(int64_t slots, at::ScalarType value_dtype, int64_t chunk, bool csr16,
                             int64_t numel, bool checksum);

// Validates every argument and returns whether the index format is csr16.
bool check_decode_average(const at::Tensor& out, const at::Tensor& gathered, int64_t slots,
                          at::ScalarType value_dtype, int64_t chunk, c10::string_view index,
                          bool checksum, double divisor);

}  // namespace gradsieve

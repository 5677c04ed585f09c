// decode_average_: the fused decode of the world's gathered payloads (python/gradsieve/wire.py's
// PayloadFormat) into their average, with each payload's finite and well-formed flags. Its schema
// and Meta (fake) kernel; the CPU kernel is csrc/cpu/decode_kernels.cpp, the CUDA one
// csrc/cuda/decode.cu with its launcher csrc/cuda_launch/ops_decode_cuda.cpp. A fragment of the
// gradsieve library declared in registration.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "validation_decode.h"

namespace gradsieve {
namespace {

std::tuple<at::Tensor, at::Tensor> decode_average_meta(at::Tensor& out, const at::Tensor& gathered,
                                                       int64_t slots, c10::string_view values,
                                                       int64_t chunk, c10::string_view index,
                                                       bool checksum, double divisor) {
  check_decode_average(out, gathered, slots, values, chunk, index, checksum, divisor);
  const auto flags = gathered.options().dtype(at::kBool);
  return {at::empty_symint({gathered.sym_size(0)}, flags),
          at::empty_symint({gathered.sym_size(0)}, flags)};
}

}  // namespace
}  // namespace gradsieve

TORCH_LIBRARY_FRAGMENT(gradsieve, m) {
  m.def("decode_average_(Tensor(a!) out, Tensor gathered, int slots, str values, "
        "int chunk, str index, bool checksum, float divisor) -> (Tensor finite, "
        "Tensor well_formed)");
}

TORCH_LIBRARY_IMPL(gradsieve, Meta, m) {
  m.impl("decode_average_", &gradsieve::decode_average_meta);
}

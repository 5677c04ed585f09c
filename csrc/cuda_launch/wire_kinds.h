// The kernels' names (gradsieve/cuda_kernels.h) for a wire codec and an index format
// (csrc/ops/wire_layout.h), shared by the pack and decode launchers.
#pragma once

#include <c10/util/Exception.h>

#include "../ops/wire_layout.h"
#include "gradsieve/cuda_kernels.h"

namespace gradsieve {
namespace cuda_launch {

inline cuda::WireValues to_wire_values(Codec c) {
  switch (c) {
    case Codec::kF32: return cuda::WireValues::kFloat32;
    case Codec::kF16: return cuda::WireValues::kFloat16;
    case Codec::kBF16: return cuda::WireValues::kBFloat16;
    case Codec::kI8: return cuda::WireValues::kInt8;
    case Codec::kI4: return cuda::WireValues::kInt4;
    case Codec::kI2: return cuda::WireValues::kInt2;
    case Codec::kSign: return cuda::WireValues::kSign;
  }
  TORCH_CHECK(false, "gradsieve: unsupported wire codec ", static_cast<int>(c));
}

inline cuda::WireIndex to_wire_index(IndexKind kind) {
  static_assert(cuda::kWireLocalBitmap == kLocalBitmap, "the local bitmap descriptor");
  switch (kind) {
    case IndexKind::kInt32: return cuda::WireIndex::kInt32;
    case IndexKind::kCsr16: return cuda::WireIndex::kCsr16;
    case IndexKind::kLocal: return cuda::WireIndex::kLocal;
  }
  TORCH_CHECK(false, "gradsieve: unsupported wire index ", static_cast<int>(kind));
}

}  // namespace cuda_launch
}  // namespace gradsieve

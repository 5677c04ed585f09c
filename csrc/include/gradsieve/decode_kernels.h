// The torch-free interface of decode_average_'s CUDA kernels (csrc/cuda/decode.cu): raw pointers,
// sizes and a cudaStream_t, as in cuda_kernels.h. The launcher (csrc/cuda_launch/
// ops_decode_cuda.cpp) computes the payload layout (csrc/ops/wire_layout.h) and allocates
// the workspace through torch's caching allocator.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "gradsieve/cuda_kernels.h"  // WireValues, WireIndex

namespace gradsieve {
namespace cuda {

// out (numel float32) = (the sum of every payload's decoded entries) / divisor; finite[r] and
// well_formed[r] (bool) the flags of payload r, as python/gradsieve/wire.py's
// PayloadFormat.decode_sum computes them. Offsets are in bytes from a payload's start.
struct DecodeAverageArgs {
  float* out;
  int64_t numel;
  const uint8_t* gathered;  // world payloads of nbytes each, one after the other
  int64_t world;
  int64_t nbytes;
  int64_t slots;            // K
  WireValues values;
  int64_t chunk;            // scaled codecs: slots per scale (the last chunk partial)
  WireIndex index;
  bool checksum;            // the header holds a checksum of the payload (bytes 8..11)
  int64_t blocks;           // the counted units of an index, a running sum kept per payload
                            // for each: csr16 blocks; local: the 32-bit words of its unary
                            // counts (offsets mode, ceil((K + local_chunks) / 32)) or of its
                            // bitmap (bitmap mode, ceil(numel / 32)); 0 for int32 indices
  int local_bits;           // local index: b in [1, 15], or 0 in bitmap mode
  int64_t local_chunks;     // local index, offsets mode: ceil(numel / 2^b); 0 otherwise
  int64_t index_offset;     // int32 indices, csr16's int32 block counts, or the local
                            // descriptor (its unary counts 4 bytes on)
  int64_t offsets_offset;   // csr16's int16 offsets; local: the b-bit offsets, or the bitmap
  int64_t scales_offset;    // scaled codecs' float32 scales
  int64_t num_scales;       // scaled codecs: ceil(slots / chunk); 0 otherwise
  int64_t values_offset;    // values_bytes = ceil(slots * B / 8) bytes from here
  float divisor;
  bool* finite;             // world bools
  bool* well_formed;        // world bools
};

// blocks: DecodeAverageArgs::blocks.
size_t decode_average_workspace_bytes(int64_t world, int64_t blocks);
cudaError_t decode_average(const DecodeAverageArgs& args, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace gradsieve

// CUDA launcher of decode_average_ (the kernels: csrc/cuda/decode.cu), in the manner of
// ops_cuda.cpp: the shared checks, the payload layout, tensors to raw pointers, a workspace from
// torch's caching allocator, CUDA errors to torch errors. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../ops/validation_decode.h"
#include "gradsieve/decode_kernels.h"
#include "wire_kinds.h"

namespace gradsieve {
namespace cuda_launch {
namespace {

std::tuple<at::Tensor, at::Tensor> decode_average_cuda(at::Tensor& out,
                                                       const at::Tensor& gathered_in,
                                                       int64_t slots, c10::string_view values,
                                                       int64_t chunk, c10::string_view index,
                                                       bool checksum, double divisor) {
  const Codec codec = check_decode_average(out, gathered_in, slots, values, chunk, index,
                                           checksum, divisor);
  const IndexKind kind = index_of("decode_average_", index);
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor gathered = gathered_in.contiguous();
  const int64_t world = gathered.size(0), numel = out.numel();
  const auto flag_options = gathered.options().dtype(at::kBool);
  at::Tensor finite = at::empty({world}, flag_options);
  at::Tensor well_formed = at::empty({world}, flag_options);
  if (world == 0 && numel == 0) return {finite, well_formed};
  const PackLayout<int64_t> l = pack_layout<int64_t>(slots, codec, chunk, kind, numel, checksum);
  // The units counted per payload: csr16 blocks, the 32-bit words of the local index's unary
  // counts or of its bitmap.
  const bool local = kind == IndexKind::kLocal;
  const int64_t blocks =
      local ? (l.local.bitmap ? l.local.offsets_bytes : l.local.counts_bytes) / 4 : l.blocks;
  cuda::DecodeAverageArgs args{};
  args.out = out.data_ptr<float>();
  args.numel = numel;
  args.gathered = world > 0 ? gathered.data_ptr<uint8_t>() : nullptr;
  args.world = world;
  args.nbytes = l.nbytes;
  args.slots = slots;
  args.values = to_wire_values(codec);
  args.chunk = chunk;
  args.index = to_wire_index(kind);
  args.checksum = checksum;
  args.blocks = blocks;
  args.local_bits = local ? static_cast<int>(l.local.bits) : 0;
  args.local_chunks = local ? l.local.chunks : 0;
  args.index_offset = l.index_offset;
  args.offsets_offset = l.offsets_offset;
  args.scales_offset = l.scales_offset;
  args.num_scales = l.num_scales;
  args.values_offset = l.values_offset;
  args.divisor = static_cast<float>(divisor);
  args.finite = world > 0 ? finite.data_ptr<bool>() : nullptr;
  args.well_formed = world > 0 ? well_formed.data_ptr<bool>() : nullptr;
  const size_t bytes = cuda::decode_average_workspace_bytes(world, blocks);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, out.options().dtype(at::kByte));
  const cudaError_t err =
      cuda::decode_average(args, ws.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gradsieve.decode_average_: CUDA error: ",
              cudaGetErrorString(err));
  return {finite, well_formed};
}

}  // namespace
}  // namespace cuda_launch
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CUDA, m) {
  m.impl("decode_average_", &gradsieve::cuda_launch::decode_average_cuda);
}

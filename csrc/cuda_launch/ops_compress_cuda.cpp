// CUDA launchers of the fused compress-side ops (schemas and Meta kernels:
// csrc/ops/registration_compress.cpp; kernels: csrc/cuda/compress.cu), in the manner of
// ops_cuda.cpp: the shared checks (validation_compress.h), tensors to raw pointers, workspaces
// from torch's caching allocator, CUDA errors to torch errors. No host synchronisation: the
// finiteness flags and grad_scale stay on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../ops/validation_compress.h"
#include "gradsieve/cuda_kernels.h"
#include "wire_kinds.h"

namespace gradsieve {
namespace cuda_launch {
namespace {

using cuda::DType;

DType to_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "gradsieve.", op, ": unsupported dtype ", t);
  }
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "gradsieve.", op, ": CUDA error: ", cudaGetErrorString(err));
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ----------------------------------------------------------------------------------- pack_payload
std::tuple<at::Tensor, at::Tensor> pack_payload_cuda(const at::Tensor& finite_in,
                                                     const at::Tensor& indices_in,
                                                     const at::Tensor& values_in,
                                                     const c10::optional<at::Tensor>& valid_in,
                                                     c10::string_view wire, int64_t chunk,
                                                     c10::string_view index, int64_t numel,
                                                     bool checksum, c10::optional<int64_t> seed) {
  const Codec codec = check_pack_payload(finite_in, indices_in, values_in, valid_in, wire, chunk,
                                         index, numel, checksum, seed);
  const c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor finite = finite_in.contiguous();
  const at::Tensor valid = has(valid_in) ? valid_in->contiguous() : at::Tensor();
  const int64_t k = values.numel();
  const IndexKind kind = index_of("pack_payload", index);
  const PackLayout<int64_t> layout = pack_layout<int64_t>(k, codec, chunk, kind, numel, checksum);
  // The kernel zeroes the payload itself (a memset on the stream) before writing it.
  at::Tensor payload = at::empty({layout.nbytes}, values.options().dtype(at::kByte));
  at::Tensor sent = at::empty({k}, values.options());
  cuda::PackPayloadArgs args{};
  args.finite = finite.data_ptr<bool>();
  args.indices = indices.data_ptr();
  args.indices_int64 = indices.scalar_type() == at::kLong;
  args.values = values.data_ptr<float>();
  args.valid = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  args.k = k;
  args.codec = to_wire_values(codec);
  args.chunk = chunk;
  args.index = to_wire_index(kind);
  args.numel = numel;
  args.stochastic = seed.has_value();
  args.seed = seed.has_value() ? static_cast<uint64_t>(*seed) : 0;
  const bool local = kind == IndexKind::kLocal;
  args.blocks = local ? (layout.local.bitmap ? 0 : layout.local.chunks) : layout.blocks;
  args.local_bits = local ? static_cast<int>(layout.local.bits) : 0;
  args.index_offset = layout.index_offset;
  args.offsets_offset = layout.offsets_offset;
  args.scales_offset = layout.scales_offset;
  args.values_offset = layout.values_offset;
  args.payload = payload.data_ptr<uint8_t>();
  args.nbytes = layout.nbytes;
  args.sent = sent.data_ptr<float>();
  check_cuda(cuda::pack_payload(args, c10::cuda::getCurrentCUDAStream()), "pack_payload");
  return {payload, sent};
}

// -------------------------------------------------------------------------------------- ef21_topk
std::tuple<at::Tensor, at::Tensor, at::Tensor> ef21_topk_cuda(const at::Tensor& grad_in,
                                                              const at::Tensor& estimate_in,
                                                              int64_t k) {
  check_ef21_topk(grad_in, estimate_in, k);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor estimate = estimate_in.contiguous();
  const auto f32 = estimate.options();
  at::Tensor values = at::empty({k}, f32);
  at::Tensor indices = at::empty({k}, f32.dtype(at::kLong));
  at::Tensor finite = at::empty({}, f32.dtype(at::kBool));
  const int64_t n = grad.numel();
  const size_t bytes = cuda::ef21_topk_workspace_bytes(n);
  at::Tensor ws = workspace(bytes, grad);
  check_cuda(cuda::ef21_topk(grad.data_ptr(), to_dtype(grad.scalar_type(), "ef21_topk"),
                             estimate.data_ptr<float>(), n, k, values.data_ptr<float>(),
                             indices.data_ptr<int64_t>(), finite.data_ptr<bool>(), ws.data_ptr(),
                             bytes, c10::cuda::getCurrentCUDAStream()),
             "ef21_topk");
  return {values, indices, finite};
}

// ------------------------------------------------------------------------------------ ef21_commit
std::tuple<at::Tensor, at::Tensor, at::Tensor> ef21_commit_cuda(const at::Tensor& estimate_in,
                                                                const at::Tensor& indices_in,
                                                                const at::Tensor& change_in,
                                                                const at::Tensor& global_in,
                                                                const at::Tensor& average_in) {
  check_ef21_commit(estimate_in, indices_in, change_in, global_in, average_in);
  const c10::cuda::CUDAGuard guard(estimate_in.device());
  const at::Tensor estimate = estimate_in.contiguous();
  const at::Tensor global = global_in.contiguous();
  const at::Tensor average = average_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor change = change_in.contiguous();
  at::Tensor estimate_out = at::empty(estimate_in.sizes(), estimate.options());
  at::Tensor global_out = at::empty(global_in.sizes(), global.options());
  at::Tensor result = at::empty(global_in.sizes(), global.options());
  check_cuda(cuda::ef21_commit(estimate.data_ptr<float>(), global.data_ptr<float>(),
                               average.data_ptr<float>(), estimate.numel(), indices.data_ptr(),
                               indices.scalar_type() == at::kLong, change.data_ptr<float>(),
                               indices.numel(), estimate_out.data_ptr<float>(),
                               global_out.data_ptr<float>(), result.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream()),
             "ef21_commit");
  return {estimate_out, global_out, result};
}

// --------------------------------------------------------------------------------- dgc_accumulate
std::tuple<at::Tensor, at::Tensor, at::Tensor> dgc_accumulate_cuda(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& v_in, double momentum,
    const c10::optional<at::Tensor>& grad_scale) {
  check_dgc_accumulate(grad_in, u_in, v_in, momentum, grad_scale);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor u0 = u_in.contiguous();
  const at::Tensor v0 = v_in.contiguous();
  // A 0-d tensor is contiguous; its value is read by the kernel (no host read).
  const at::Tensor scale = has(grad_scale) ? grad_scale->contiguous() : at::Tensor();
  at::Tensor u = at::empty(u_in.sizes(), u0.options());
  at::Tensor v = at::empty(v_in.sizes(), v0.options());
  at::Tensor finite = at::empty({}, u0.options().dtype(at::kBool));
  check_cuda(cuda::dgc_accumulate(grad.data_ptr(), to_dtype(grad.scalar_type(), "dgc_accumulate"),
                                  u0.data_ptr<float>(), v0.data_ptr<float>(), grad.numel(),
                                  static_cast<float>(momentum),
                                  scale.defined() ? scale.data_ptr<float>() : nullptr,
                                  u.data_ptr<float>(), v.data_ptr<float>(),
                                  finite.data_ptr<bool>(), c10::cuda::getCurrentCUDAStream()),
             "dgc_accumulate");
  return {u, v, finite};
}

// -------------------------------------------------------------------------------------- dgc_mask_
void dgc_mask_cuda(at::Tensor& u_out, at::Tensor& v_out, const at::Tensor& indices_in,
                   const c10::optional<at::Tensor>& valid_in) {
  check_dgc_mask(u_out, v_out, indices_in, valid_in);
  const c10::cuda::CUDAGuard guard(u_out.device());
  const at::Tensor indices = indices_in.contiguous();
  const int64_t m = indices.numel();
  if (m == 0 || u_out.numel() == 0) return;
  const at::Tensor valid = has(valid_in) ? valid_in->contiguous() : at::Tensor();
  at::Tensor u = u_out.is_contiguous() ? u_out : u_out.contiguous();
  at::Tensor v = v_out.is_contiguous() ? v_out : v_out.contiguous();
  check_cuda(cuda::dgc_mask(u.data_ptr<float>(), v.data_ptr<float>(), u.numel(),
                            indices.data_ptr(), indices.scalar_type() == at::kLong,
                            valid.defined() ? valid.data_ptr<bool>() : nullptr, m,
                            c10::cuda::getCurrentCUDAStream()),
             "dgc_mask_");
  if (!u.is_same(u_out)) u_out.copy_(u);
  if (!v.is_same(v_out)) v_out.copy_(v);
}

}  // namespace
}  // namespace cuda_launch
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CUDA, m) {
  m.impl("pack_payload", &gradsieve::cuda_launch::pack_payload_cuda);
  m.impl("ef21_topk", &gradsieve::cuda_launch::ef21_topk_cuda);
  m.impl("ef21_commit", &gradsieve::cuda_launch::ef21_commit_cuda);
  m.impl("dgc_accumulate", &gradsieve::cuda_launch::dgc_accumulate_cuda);
  m.impl("dgc_mask_", &gradsieve::cuda_launch::dgc_mask_cuda);
}

// The fused compress-side ops of the hook: schemas (a fragment of the gradsieve library, which
// registration.cpp declares) and their Meta (fake) kernels. Backends: csrc/cpu/compress_kernels.cpp
// and csrc/cuda_launch/ops_compress_cuda.cpp (kernels in csrc/cuda/compress.cu).
//
//   pack_payload    a whole payload (header, index section, scales, values or codes) and the values
//                   as decoded, in one pass (PayloadFormat.pack's ordered case); with a seed, the
//                   integer codecs round stochastically.
//   ef21_topk       EF21's selection: the top-k of grad - estimate, with the finiteness of grad.
//   ef21_commit     EF21's commit: the new estimate, the new global estimate and its copy.
//   dgc_accumulate  DGC's momentum correction u = m u + g, v = v + u, with finiteness.
//   dgc_mask_       DGC's momentum factor masking at the sent entries.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "validation_compress.h"

namespace gradsieve {
namespace {

std::tuple<at::Tensor, at::Tensor> pack_payload_meta(const at::Tensor& finite,
                                                     const at::Tensor& indices,
                                                     const at::Tensor& values,
                                                     const c10::optional<at::Tensor>& valid,
                                                     c10::string_view wire, int64_t chunk,
                                                     c10::string_view index, int64_t numel,
                                                     bool checksum, c10::optional<int64_t> seed) {
  const Codec codec = check_pack_payload(finite, indices, values, valid, wire, chunk, index, numel,
                                         checksum, seed);
  const auto layout =
      pack_layout(values.sym_numel(), codec, chunk, index_of("pack_payload", index), numel, checksum);
  return {at::empty_symint({layout.nbytes}, values.options().dtype(at::kByte)),
          at::empty_symint({values.sym_numel()}, values.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ef21_topk_meta(const at::Tensor& grad,
                                                              const at::Tensor& estimate,
                                                              int64_t k) {
  check_ef21_topk(grad, estimate, k);
  const auto f32 = grad.options().dtype(at::kFloat);
  return {at::empty({k}, f32), at::empty({k}, f32.dtype(at::kLong)),
          at::empty({}, f32.dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ef21_commit_meta(const at::Tensor& estimate,
                                                                const at::Tensor& indices,
                                                                const at::Tensor& change,
                                                                const at::Tensor& global_estimate,
                                                                const at::Tensor& average) {
  check_ef21_commit(estimate, indices, change, global_estimate, average);
  return {at::empty_symint(estimate.sym_sizes(), estimate.options()),
          at::empty_symint(global_estimate.sym_sizes(), global_estimate.options()),
          at::empty_symint(global_estimate.sym_sizes(), global_estimate.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dgc_accumulate_meta(
    const at::Tensor& grad, const at::Tensor& momentum_u, const at::Tensor& velocity_v,
    double momentum, const c10::optional<at::Tensor>& grad_scale) {
  check_dgc_accumulate(grad, momentum_u, velocity_v, momentum, grad_scale);
  return {at::empty_symint(momentum_u.sym_sizes(), momentum_u.options()),
          at::empty_symint(velocity_v.sym_sizes(), velocity_v.options()),
          at::empty({}, grad.options().dtype(at::kBool))};
}

void dgc_mask_meta(at::Tensor& momentum_u, at::Tensor& velocity_v, const at::Tensor& indices,
                   const c10::optional<at::Tensor>& valid) {
  check_dgc_mask(momentum_u, velocity_v, indices, valid);
}

}  // namespace
}  // namespace gradsieve

TORCH_LIBRARY_FRAGMENT(gradsieve, m) {
  m.def("pack_payload(Tensor finite, Tensor indices, Tensor values, Tensor? valid, "
        "str wire, int chunk, str index, int numel, bool checksum=False, int? seed=None) -> "
        "(Tensor payload, Tensor sent)");
  m.def("ef21_topk(Tensor grad, Tensor estimate, int k) -> "
        "(Tensor values, Tensor indices, Tensor finite)");
  m.def("ef21_commit(Tensor estimate, Tensor indices, Tensor change, Tensor global_estimate, "
        "Tensor average) -> (Tensor estimate_out, Tensor global_out, Tensor result)");
  m.def("dgc_accumulate(Tensor grad, Tensor momentum_u, Tensor velocity_v, float momentum, "
        "Tensor? grad_scale=None) -> (Tensor u, Tensor v, Tensor finite)");
  m.def("dgc_mask_(Tensor(a!) momentum_u, Tensor(b!) velocity_v, Tensor indices, "
        "Tensor? valid=None) -> ()");
}

TORCH_LIBRARY_IMPL(gradsieve, Meta, m) {
  m.impl("pack_payload", &gradsieve::pack_payload_meta);
  m.impl("ef21_topk", &gradsieve::ef21_topk_meta);
  m.impl("ef21_commit", &gradsieve::ef21_commit_meta);
  m.impl("dgc_accumulate", &gradsieve::dgc_accumulate_meta);
  m.impl("dgc_mask_", &gradsieve::dgc_mask_meta);
}

#include "validation_compress.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <utility>

namespace gradsieve {
namespace {

const char* dtype_name(const at::Tensor& t) {
  return t.defined() ? c10::toString(t.scalar_type()) : "None";
}

// A float32 tensor with n elements on ref's device.
void check_float32_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat, "gradsieve.", op, ": ", arg,
              " must be a float32 tensor, got ", dtype_name(t));
  TORCH_CHECK(t.sym_numel() == ref.sym_numel(), "gradsieve.", op, ": ", arg,
              " must have as many elements as ", ref_arg, " (", ref.sym_numel(), "), got ",
              t.sym_numel());
  check_same_device(op, arg, t, ref_arg, ref);
}

// An output must not share memory with an input (the kernels read the inputs while writing it).
// Meta tensors have no memory to compare.
void check_no_overlap(const char* op, const char* arg, const at::Tensor& out, const char* in_arg,
                      const at::Tensor& in) {
  if (out.is_meta() || in.is_meta() || !out.has_storage() || !in.has_storage()) return;
  if (!out.storage().is_alias_of(in.storage())) return;
  // The same storage: only provably disjoint ranges pass (TooHard, e.g. strided views, does not).
  TORCH_CHECK(at::get_overlap_status(out, in) == at::MemOverlapStatus::No, "gradsieve.", op, ": ",
              arg, " must not overlap ", in_arg, ", got tensors that share memory");
}

void check_positions(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt),
              "gradsieve.", op, ": ", arg, " must be an int64 or int32 tensor, got ",
              dtype_name(t));
  TORCH_CHECK(t.dim() == 1, "gradsieve.", op, ": ", arg, " must be 1-D, got a tensor of ",
              t.dim(), " dims");
  check_same_device(op, arg, t, "the state", ref);
}

}  // namespace

void check_ef21_topk(const at::Tensor& grad, const at::Tensor& estimate, int64_t k) {
  constexpr const char* op = "ef21_topk";
  check_float_input(op, "grad", grad);
  check_float32_like(op, "estimate", estimate, "grad", grad);
  check_count(op, "k", k, grad.sym_numel());
}

void check_ef21_commit(const at::Tensor& estimate, const at::Tensor& indices,
                       const at::Tensor& change, const at::Tensor& global_estimate,
                       const at::Tensor& average) {
  constexpr const char* op = "ef21_commit";
  TORCH_CHECK(estimate.defined() && estimate.scalar_type() == at::kFloat,
              "gradsieve.ef21_commit: estimate must be a float32 tensor, got ",
              dtype_name(estimate));
  TORCH_CHECK(estimate.sym_numel() <= kMaxNumel,
              "gradsieve.ef21_commit: estimate must have at most 2^31 - 1 elements, got ",
              estimate.sym_numel());
  check_float32_like(op, "global_estimate", global_estimate, "estimate", estimate);
  check_float32_like(op, "average", average, "estimate", estimate);
  check_positions(op, "indices", indices, estimate);
  TORCH_CHECK(change.defined() && change.scalar_type() == at::kFloat,
              "gradsieve.ef21_commit: change must be a float32 tensor, got ", dtype_name(change));
  TORCH_CHECK(change.sym_numel() == indices.sym_numel(),
              "gradsieve.ef21_commit: change must have as many elements as indices (",
              indices.sym_numel(), "), got ", change.sym_numel());
  check_same_device(op, "change", change, "estimate", estimate);
}

void check_dgc_accumulate(const at::Tensor& grad, const at::Tensor& momentum_u,
                          const at::Tensor& velocity_v, double momentum,
                          const c10::optional<at::Tensor>& grad_scale) {
  constexpr const char* op = "dgc_accumulate";
  check_float_input(op, "grad", grad);
  check_float32_like(op, "momentum_u", momentum_u, "grad", grad);
  check_float32_like(op, "velocity_v", velocity_v, "grad", grad);
  TORCH_CHECK(std::isfinite(momentum), "gradsieve.dgc_accumulate: momentum must be finite, got ",
              momentum);
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->dim() == 0,
                "gradsieve.dgc_accumulate: grad_scale must be a 0-d float32 tensor, got ",
                grad_scale->scalar_type(), " of ", grad_scale->dim(), " dims");
    check_same_device(op, "grad_scale", *grad_scale, "grad", grad);
  }
}

void check_dgc_mask(const at::Tensor& momentum_u, const at::Tensor& velocity_v,
                    const at::Tensor& indices, const c10::optional<at::Tensor>& valid) {
  constexpr const char* op = "dgc_mask_";
  TORCH_CHECK(momentum_u.defined() && momentum_u.scalar_type() == at::kFloat,
              "gradsieve.dgc_mask_: momentum_u must be a float32 tensor, got ",
              dtype_name(momentum_u));
  TORCH_CHECK(momentum_u.sym_numel() <= kMaxNumel,
              "gradsieve.dgc_mask_: momentum_u must have at most 2^31 - 1 elements, got ",
              momentum_u.sym_numel());
  check_float32_like(op, "velocity_v", velocity_v, "momentum_u", momentum_u);
  check_no_overlap(op, "velocity_v", velocity_v, "momentum_u", momentum_u);
  check_positions(op, "indices", indices, momentum_u);
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool,
                "gradsieve.dgc_mask_: valid must be a bool tensor, got ", valid->scalar_type());
    TORCH_CHECK(valid->sym_numel() == indices.sym_numel(),
                "gradsieve.dgc_mask_: valid must have as many elements as indices (",
                indices.sym_numel(), "), got ", valid->sym_numel());
    check_same_device(op, "valid", *valid, "momentum_u", momentum_u);
  }
}

Codec check_pack_payload(const at::Tensor& finite, const at::Tensor& indices,
                         const at::Tensor& values, const c10::optional<at::Tensor>& valid,
                         c10::string_view wire, int64_t chunk, c10::string_view index,
                         int64_t numel, bool checksum, c10::optional<int64_t> seed) {
  constexpr const char* op = "pack_payload";
  TORCH_CHECK(values.defined() && values.scalar_type() == at::kFloat && values.dim() == 1,
              "gradsieve.pack_payload: values must be a 1-D float32 tensor, got ",
              dtype_name(values), " of ", values.defined() ? values.dim() : 0, " dims");
  TORCH_CHECK(values.sym_numel() <= kMaxNumel,
              "gradsieve.pack_payload: values must have at most 2^31 - 1 elements, got ",
              values.sym_numel());
  check_positions(op, "indices", indices, values);
  TORCH_CHECK(indices.sym_numel() == values.sym_numel(),
              "gradsieve.pack_payload: indices must have as many elements as values (",
              values.sym_numel(), "), got ", indices.sym_numel());
  TORCH_CHECK(finite.defined() && finite.scalar_type() == at::kBool && finite.sym_numel() == 1,
              "gradsieve.pack_payload: finite must be a bool tensor of one element, got ",
              dtype_name(finite), " with ", finite.defined() ? finite.sym_numel() : 0,
              " elements");
  check_same_device(op, "finite", finite, "values", values);
  if (valid.has_value() && valid->defined()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool,
                "gradsieve.pack_payload: valid must be a bool tensor, got ", valid->scalar_type());
    TORCH_CHECK(valid->sym_numel() == values.sym_numel(),
                "gradsieve.pack_payload: valid must have as many elements as values (",
                values.sym_numel(), "), got ", valid->sym_numel());
    check_same_device(op, "valid", *valid, "values", values);
  }
  const Codec codec = codec_of(op, "wire", wire);
  TORCH_CHECK(chunk >= 1 && chunk <= (int64_t(1) << 20),
              "gradsieve.pack_payload: chunk must be in [1, 2^20], got ", chunk);
  index_of(op, index);
  TORCH_CHECK(numel >= 0 && numel <= kMaxNumel,
              "gradsieve.pack_payload: numel must be in [0, 2^31 - 1], got ", numel);
  (void)checksum;
  TORCH_CHECK(!seed.has_value() || codec_qmax(codec) > 0,
              "gradsieve.pack_payload: seed (stochastic rounding) needs wire 'int8', 'int4' or "
              "'int2', got '", std::string(wire.data(), wire.size()), "'");
  return codec;
}

}  // namespace gradsieve

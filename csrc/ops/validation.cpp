#include "validation.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace gradsieve {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float_input(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "gradsieve.", op, ": ", arg, " must be a tensor, got None");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), "gradsieve.", op, ": ", arg,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.sym_numel() <= kMaxNumel, "gradsieve.", op, ": ", arg,
              " must have at most 2^31 - 1 elements, got ", t.sym_numel());
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "gradsieve.", op, ": ", arg,
              " must be on the same device as ", ref_arg, " (", ref.device(), "), got ",
              t.device());
}

void check_count(const char* op, const char* arg, int64_t value, const c10::SymInt& numel) {
  TORCH_CHECK(value >= 0 && value <= numel, "gradsieve.", op, ": ", arg, " must be in [0, ",
              numel, "] (the number of elements), got ", value);
}

void check_topk_abs(const at::Tensor& x, int64_t k) {
  check_float_input("topk_abs", "x", x);
  check_count("topk_abs", "k", k, x.sym_numel());
}

void check_quantile_abs(const at::Tensor& x, double q) {
  check_float_input("quantile_abs", "x", x);
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "gradsieve.quantile_abs: q must be in [0, 1], got ", q);
}

void check_ef_topk(const at::Tensor& residual, const at::Tensor& grad, int64_t k, double scale) {
  check_float_input("ef_topk_", "grad", grad);
  TORCH_CHECK(residual.defined() && residual.scalar_type() == at::kFloat,
              "gradsieve.ef_topk_: residual must be a float32 tensor, got ",
              residual.defined() ? c10::toString(residual.scalar_type()) : "None");
  TORCH_CHECK(residual.sym_numel() == grad.sym_numel(),
              "gradsieve.ef_topk_: residual must have as many elements as grad (", grad.sym_numel(),
              "), got ", residual.sym_numel());
  check_same_device("ef_topk_", "residual", residual, "grad", grad);
  check_count("ef_topk_", "k", k, grad.sym_numel());
  TORCH_CHECK(std::isfinite(scale), "gradsieve.ef_topk_: scale must be finite, got ", scale);
}

void check_ef_topk_into(const at::Tensor& out, const at::Tensor& residual, const at::Tensor& grad,
                        int64_t k, double scale) {
  check_float_input("ef_topk_into", "grad", grad);
  TORCH_CHECK(residual.defined() && residual.scalar_type() == at::kFloat,
              "gradsieve.ef_topk_into: residual must be a float32 tensor, got ",
              residual.defined() ? c10::toString(residual.scalar_type()) : "None");
  TORCH_CHECK(out.defined() && out.scalar_type() == at::kFloat,
              "gradsieve.ef_topk_into: out must be a float32 tensor, got ",
              out.defined() ? c10::toString(out.scalar_type()) : "None");
  TORCH_CHECK(residual.sym_numel() == grad.sym_numel(),
              "gradsieve.ef_topk_into: residual must have as many elements as grad (", grad.sym_numel(),
              "), got ", residual.sym_numel());
  TORCH_CHECK(out.sym_numel() == grad.sym_numel(),
              "gradsieve.ef_topk_into: out must have as many elements as grad (", grad.sym_numel(),
              "), got ", out.sym_numel());
  TORCH_CHECK(out.is_contiguous(), "gradsieve.ef_topk_into: out must be contiguous, got strides ",
              out.strides());
  check_same_device("ef_topk_into", "residual", residual, "grad", grad);
  check_same_device("ef_topk_into", "out", out, "grad", grad);
  check_count("ef_topk_into", "k", k, grad.sym_numel());
  TORCH_CHECK(std::isfinite(scale), "gradsieve.ef_topk_into: scale must be finite, got ", scale);
}

void check_regtopk_select(const at::Tensor& residual, const at::Tensor& grad,
                          const at::Tensor& prev_indices, const at::Tensor& prev_sent,
                          const at::Tensor& prev_agg, double mu, int64_t k, int64_t world_size,
                          c10::optional<double> q, const c10::optional<at::Tensor>& bad,
                          const c10::optional<at::Tensor>& kept,
                          const c10::optional<at::Tensor>& finite) {
  constexpr const char* op = "regtopk_select_";
  check_float_input(op, "grad", grad);
  TORCH_CHECK(residual.defined() && residual.scalar_type() == at::kFloat,
              "gradsieve.regtopk_select_: residual must be a float32 tensor, got ",
              residual.defined() ? c10::toString(residual.scalar_type()) : "None");
  TORCH_CHECK(residual.sym_numel() == grad.sym_numel(),
              "gradsieve.regtopk_select_: residual must have as many elements as grad (",
              grad.sym_numel(), "), got ", residual.sym_numel());
  check_same_device(op, "residual", residual, "grad", grad);
  TORCH_CHECK(prev_indices.defined() && (prev_indices.scalar_type() == at::kInt ||
                                         prev_indices.scalar_type() == at::kLong),
              "gradsieve.regtopk_select_: prev_indices must be int32 or int64, got ",
              prev_indices.defined() ? c10::toString(prev_indices.scalar_type()) : "None");
  check_same_device(op, "prev_indices", prev_indices, "grad", grad);
  const std::pair<const char*, const at::Tensor*> per_entry[] = {{"prev_sent", &prev_sent},
                                                                  {"prev_agg", &prev_agg}};
  for (const auto& [arg, t] : per_entry) {
    TORCH_CHECK(t->defined() && t->scalar_type() == at::kFloat, "gradsieve.regtopk_select_: ",
                arg, " must be a float32 tensor, got ",
                t->defined() ? c10::toString(t->scalar_type()) : "None");
    TORCH_CHECK(t->sym_numel() == prev_indices.sym_numel(), "gradsieve.regtopk_select_: ", arg,
                " must have as many elements as prev_indices (", prev_indices.sym_numel(),
                "), got ", t->sym_numel());
    check_same_device(op, arg, *t, "grad", grad);
  }
  check_count(op, "k", k, grad.sym_numel());
  TORCH_CHECK(std::isfinite(mu) && mu > 0.0,
              "gradsieve.regtopk_select_: mu must be a finite number > 0, got ", mu);
  TORCH_CHECK(world_size >= 1, "gradsieve.regtopk_select_: world_size must be >= 1, got ",
              world_size);
  TORCH_CHECK(!q.has_value() || *q >= 0.0,
              "gradsieve.regtopk_select_: q must be >= 0 (inf allowed) or None, got ", *q);
  check_bad_flags(op, bad, "prev_indices", prev_indices.sym_numel(), prev_indices);
  if (kept.has_value() && kept->defined()) {
    TORCH_CHECK(kept->scalar_type() == at::kFloat,
                "gradsieve.regtopk_select_: kept must be a float32 tensor, got ",
                c10::toString(kept->scalar_type()));
    TORCH_CHECK(kept->sym_numel() == grad.sym_numel(),
                "gradsieve.regtopk_select_: kept must have as many elements as grad (",
                grad.sym_numel(), "), got ", kept->sym_numel());
    check_same_device(op, "kept", *kept, "grad", grad);
  }
  if (finite.has_value() && finite->defined()) {
    TORCH_CHECK(finite->scalar_type() == at::kBool && finite->sym_numel() == 1,
                "gradsieve.regtopk_select_: finite must be a bool tensor of one element, got ",
                c10::toString(finite->scalar_type()), " with ", finite->sym_numel(), " elements");
    check_same_device(op, "finite", *finite, "grad", grad);
  }
}

void check_bad_flags(const char* op, const c10::optional<at::Tensor>& bad, const char* entries,
                     const c10::SymInt& m, const at::Tensor& like) {
  if (!bad.has_value() || !bad->defined()) return;
  TORCH_CHECK(bad->scalar_type() == at::kInt, "gradsieve.", op,
              ": bad must be an int32 tensor (one flag per payload), got ", bad->scalar_type());
  TORCH_CHECK(bad->is_contiguous(), "gradsieve.", op, ": bad must be contiguous, got strides ",
              bad->strides());
  const c10::SymInt payloads = bad->sym_numel();
  TORCH_CHECK(payloads >= 1, "gradsieve.", op, ": bad must have at least one element, got ",
              payloads);
  TORCH_CHECK(m % payloads == 0, "gradsieve.", op, ": bad.numel() (", payloads,
              ") must divide the number of ", entries, " (", m,
              "): the entries form bad.numel() payloads of equal size");
  check_same_device(op, "bad", *bad, entries, like);
}

void check_threshold_select(const at::Tensor& x, const at::Tensor& threshold, int64_t capacity) {
  check_float_input("threshold_select", "x", x);
  TORCH_CHECK(threshold.defined() && threshold.dim() == 0,
              "gradsieve.threshold_select: threshold must be a 0-d tensor, got ",
              threshold.defined() ? threshold.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()),
              "gradsieve.threshold_select: threshold must be a floating-point tensor, got ",
              threshold.scalar_type());
  check_same_device("threshold_select", "threshold", threshold, "x", x);
  TORCH_CHECK(capacity >= 0, "gradsieve.threshold_select: capacity must be >= 0, got ", capacity);
}

void check_quantize_int8(const at::Tensor& x, int64_t chunk) {
  check_float_input("quantize_int8", "x", x);
  TORCH_CHECK(chunk > 0, "gradsieve.quantize_int8: chunk must be > 0, got ", chunk);
}

void check_dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t chunk,
                           at::ScalarType dtype) {
  TORCH_CHECK(q.defined() && q.scalar_type() == at::kChar,
              "gradsieve.dequantize_int8: q must be an int8 tensor, got ",
              q.defined() ? c10::toString(q.scalar_type()) : "None");
  TORCH_CHECK(chunk > 0, "gradsieve.dequantize_int8: chunk must be > 0, got ", chunk);
  TORCH_CHECK(scales.defined() && scales.scalar_type() == at::kFloat,
              "gradsieve.dequantize_int8: scales must be a float32 tensor, got ",
              scales.defined() ? c10::toString(scales.scalar_type()) : "None");
  TORCH_CHECK(scales.sym_numel() == num_chunks(q.sym_numel(), chunk),
              "gradsieve.dequantize_int8: scales must have ceil(q.numel() / chunk) = ",
              num_chunks(q.sym_numel(), chunk), " elements, got ", scales.sym_numel());
  check_same_device("dequantize_int8", "scales", scales, "q", q);
  TORCH_CHECK(is_float_dtype(dtype),
              "gradsieve.dequantize_int8: dtype must be float32, float16 or bfloat16, got ", dtype);
}

void check_sparse_accumulate(const at::Tensor& out, const at::Tensor& indices,
                             const at::Tensor& values, const c10::optional<at::Tensor>& scales,
                             int64_t chunk, const c10::optional<at::Tensor>& bad) {
  check_float_input("sparse_accumulate_", "out", out);
  TORCH_CHECK(indices.defined() && (indices.scalar_type() == at::kInt ||
                                    indices.scalar_type() == at::kLong),
              "gradsieve.sparse_accumulate_: indices must be int32 or int64, got ",
              indices.defined() ? c10::toString(indices.scalar_type()) : "None");
  TORCH_CHECK(values.defined(), "gradsieve.sparse_accumulate_: values must be a tensor, got None");
  TORCH_CHECK(values.sym_numel() == indices.sym_numel(),
              "gradsieve.sparse_accumulate_: values must have as many elements as indices (",
              indices.sym_numel(), "), got ", values.sym_numel());
  check_same_device("sparse_accumulate_", "indices", indices, "out", out);
  check_same_device("sparse_accumulate_", "values", values, "out", out);
  const bool has_scales = scales.has_value() && scales->defined();
  if (values.scalar_type() == at::kChar) {
    TORCH_CHECK(has_scales,
                "gradsieve.sparse_accumulate_: scales must be given when values are int8, got None");
    TORCH_CHECK(chunk > 0,
                "gradsieve.sparse_accumulate_: chunk must be > 0 when values are int8, got ", chunk);
    TORCH_CHECK(scales->scalar_type() == at::kFloat,
                "gradsieve.sparse_accumulate_: scales must be float32, got ", scales->scalar_type());
    TORCH_CHECK(scales->sym_numel() == num_chunks(values.sym_numel(), chunk),
                "gradsieve.sparse_accumulate_: scales must have ceil(values.numel() / chunk) = ",
                num_chunks(values.sym_numel(), chunk), " elements, got ", scales->sym_numel());
    check_same_device("sparse_accumulate_", "scales", *scales, "out", out);
  } else {
    TORCH_CHECK(is_float_dtype(values.scalar_type()),
                "gradsieve.sparse_accumulate_: values must be float32, float16, bfloat16 or int8, "
                "got ", values.scalar_type());
    TORCH_CHECK(!has_scales,
                "gradsieve.sparse_accumulate_: scales must be None unless values are int8, got a "
                "tensor with values of dtype ", values.scalar_type());
  }  check_bad_flags("sparse_accumulate_", bad, "indices", indices.sym_numel(), indices);
}

void check_adaptive_select(const at::Tensor& grad, const at::Tensor& average,
                           const at::Tensor& momentum, const at::Tensor& residual, double alpha,
                           double beta, double q, int64_t capacity) {
  constexpr const char* op = "adaptive_select";
  check_float_input(op, "grad", grad);
  const std::pair<const char*, const at::Tensor*> state[] = {
      {"average", &average}, {"momentum", &momentum}, {"residual", &residual}};
  for (const auto& [arg, t] : state) {
    TORCH_CHECK(t->defined() && t->scalar_type() == at::kFloat, "gradsieve.adaptive_select: ",
                arg, " must be a float32 tensor, got ",
                t->defined() ? c10::toString(t->scalar_type()) : "None");
    TORCH_CHECK(t->sym_numel() == grad.sym_numel(), "gradsieve.adaptive_select: ", arg,
                " must have as many elements as grad (", grad.sym_numel(), "), got ",
                t->sym_numel());
    check_same_device(op, arg, *t, "grad", grad);
  }
  TORCH_CHECK(alpha >= 0.0 && alpha <= 1.0,
              "gradsieve.adaptive_select: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK(beta > 0.0 && beta <= 1.0,
              "gradsieve.adaptive_select: beta must be in (0, 1], got ", beta);
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "gradsieve.adaptive_select: q must be in [0, 1], got ", q);
  check_count(op, "capacity", capacity, grad.sym_numel());
}

void check_csr16_indices(const at::Tensor& counts, const at::Tensor& offsets,
                         const at::Tensor& valid, int64_t numel) {
  TORCH_CHECK(numel >= 0 && numel <= kMaxNumel,
              "gradsieve.csr16_indices: numel must be in [0, 2^31 - 1], got ", numel);
  TORCH_CHECK(counts.defined() && counts.scalar_type() == at::kInt && counts.dim() == 2,
              "gradsieve.csr16_indices: counts must be a 2-D int32 tensor [world, blocks], got ",
              counts.defined() ? c10::toString(counts.scalar_type()) : "None", " of ",
              counts.defined() ? counts.dim() : 0, " dims");
  TORCH_CHECK(offsets.defined() && offsets.scalar_type() == at::kShort && offsets.dim() == 2,
              "gradsieve.csr16_indices: offsets must be a 2-D int16 tensor [world, slots], got ",
              offsets.defined() ? c10::toString(offsets.scalar_type()) : "None", " of ",
              offsets.defined() ? offsets.dim() : 0, " dims");
  TORCH_CHECK(valid.defined() && valid.scalar_type() == at::kInt && valid.dim() == 1,
              "gradsieve.csr16_indices: valid must be a 1-D int32 tensor [world], got ",
              valid.defined() ? c10::toString(valid.scalar_type()) : "None", " of ",
              valid.defined() ? valid.dim() : 0, " dims");
  TORCH_CHECK(counts.sym_size(0) == offsets.sym_size(0) && valid.sym_size(0) == offsets.sym_size(0),
              "gradsieve.csr16_indices: counts, offsets and valid must have the same first "
              "dimension (world), got ", counts.sym_size(0), ", ", offsets.sym_size(0), " and ",
              valid.sym_size(0));
  TORCH_CHECK(counts.sym_size(1) == csr16_blocks(numel),
              "gradsieve.csr16_indices: counts must have ceil(numel / 65536) = ",
              csr16_blocks(numel), " columns, got ", counts.sym_size(1));
  check_same_device("csr16_indices", "offsets", offsets, "counts", counts);
  check_same_device("csr16_indices", "valid", valid, "counts", counts);
}


void check_predictive_score(const at::Tensor& grad, const at::Tensor& residual,
                            at::TensorList history, int64_t newest, const at::Tensor& weights,
                            int64_t hidden) {
  constexpr const char* op = "predictive_score";
  // grad, residual and weights: float32 vectors; residual as long as grad.
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"grad", &grad}, {"residual", &residual}, {"weights", &weights}};
  for (const auto& [arg, t] : vectors) {
    TORCH_CHECK(t->defined() && t->scalar_type() == at::kFloat, "gradsieve.predictive_score: ",
                arg, " must be a float32 tensor, got ",
                t->defined() ? c10::toString(t->scalar_type()) : "None");
    TORCH_CHECK(t->dim() == 1, "gradsieve.predictive_score: ", arg,
                " must be 1-D, got a tensor of ", t->dim(), " dims");
  }
  TORCH_CHECK(grad.sym_numel() <= kMaxNumel,
              "gradsieve.predictive_score: grad must have at most 2^31 - 1 elements, got ",
              grad.sym_numel());
  TORCH_CHECK(residual.sym_numel() == grad.sym_numel(),
              "gradsieve.predictive_score: residual must have as many elements as grad (",
              grad.sym_numel(), "), got ", residual.sym_numel());
  check_same_device(op, "residual", residual, "grad", grad);
  // history: 1 to 16 vectors of grad's length, all float32 or all bfloat16.
  const int64_t count = static_cast<int64_t>(history.size());
  TORCH_CHECK(count >= 1 && count <= kPredictiveMaxHistory,
              "gradsieve.predictive_score: history must hold 1 to ", kPredictiveMaxHistory,
              " tensors, got ", count);
  for (int64_t j = 0; j < count; ++j) {
    const at::Tensor& h = history[j];
    TORCH_CHECK(h.defined() && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16),
                "gradsieve.predictive_score: history[", j, "] must be float32 or bfloat16, got ",
                h.defined() ? c10::toString(h.scalar_type()) : "None");
    TORCH_CHECK(h.scalar_type() == history[0].scalar_type(), "gradsieve.predictive_score: history[",
                j, "] must have the dtype of history[0] (", history[0].scalar_type(), "), got ",
                h.scalar_type());
    TORCH_CHECK(h.dim() == 1, "gradsieve.predictive_score: history[", j,
                "] must be 1-D, got a tensor of ", h.dim(), " dims");
    TORCH_CHECK(h.sym_numel() == grad.sym_numel(), "gradsieve.predictive_score: history[", j,
                "] must have as many elements as grad (", grad.sym_numel(), "), got ",
                h.sym_numel());
    TORCH_CHECK(h.device() == grad.device(), "gradsieve.predictive_score: history[", j,
                "] must be on the same device as grad (", grad.device(), "), got ", h.device());
  }
  TORCH_CHECK(newest >= 0 && newest < count, "gradsieve.predictive_score: newest must be in [0, ",
              count, ") (the number of history tensors), got ", newest);
  // weights: W1 [hidden, H + 2], b1 [hidden], w2 [hidden], b2.
  TORCH_CHECK(hidden >= 1 && hidden <= kPredictiveMaxHidden,
              "gradsieve.predictive_score: hidden must be in [1, ", kPredictiveMaxHidden, "], got ",
              hidden);
  const int64_t want = predictive_weight_count(count, hidden);
  TORCH_CHECK(weights.sym_numel() == want,
              "gradsieve.predictive_score: weights must have hidden*(H+4)+1 = ", want,
              " entries (hidden ", hidden, ", H ", count, "), got ", weights.sym_numel());
  check_same_device(op, "weights", weights, "grad", grad);
}

void check_influence_update(const at::Tensor& grad, const at::Tensor& residual,
                            const at::Tensor& score, const c10::optional<at::Tensor>& hessian,
                            double eps, double rho) {
  constexpr const char* op = "influence_update";
  check_float_input(op, "grad", grad);
  TORCH_CHECK(grad.dim() == 1, "gradsieve.influence_update: grad must be 1-D, got a tensor of ",
              grad.dim(), " dims");
  // residual, score and (when given) hessian: float32 vectors as long as grad, on grad's device.
  const bool has_hessian = hessian.has_value() && hessian->defined();
  const std::pair<const char*, const at::Tensor*> state[] = {
      {"residual", &residual}, {"score", &score}, {"hessian", has_hessian ? &*hessian : nullptr}};
  for (const auto& [arg, t] : state) {
    if (t == nullptr) continue;  // hessian None: no curvature term
    TORCH_CHECK(t->defined() && t->scalar_type() == at::kFloat, "gradsieve.influence_update: ",
                arg, " must be a float32 tensor, got ",
                t->defined() ? c10::toString(t->scalar_type()) : "None");
    TORCH_CHECK(t->dim() == 1, "gradsieve.influence_update: ", arg,
                " must be 1-D, got a tensor of ", t->dim(), " dims");
    TORCH_CHECK(t->sym_numel() == grad.sym_numel(), "gradsieve.influence_update: ", arg,
                " must have as many elements as grad (", grad.sym_numel(), "), got ",
                t->sym_numel());
    check_same_device(op, arg, *t, "grad", grad);
  }
  TORCH_CHECK(std::isfinite(eps) && eps > 0.0,
              "gradsieve.influence_update: eps must be a finite number > 0, got ", eps);
  TORCH_CHECK(rho >= 0.0 && rho < 1.0, "gradsieve.influence_update: rho must be in [0, 1), got ",
              rho);
}

void check_segment_mean(const at::Tensor& x, at::IntArrayRef numels) {
  TORCH_CHECK(x.defined() && x.scalar_type() == at::kFloat,
              "gradsieve.segment_mean: x must be a float32 tensor, got ",
              x.defined() ? c10::toString(x.scalar_type()) : "None");
  TORCH_CHECK(x.dim() == 1, "gradsieve.segment_mean: x must be 1-D, got a tensor of ", x.dim(),
              " dims");
  TORCH_CHECK(x.sym_numel() <= kMaxNumel,
              "gradsieve.segment_mean: x must have at most 2^31 - 1 elements, got ", x.sym_numel());
  // The sum saturates above 2^31 - 1 (no int64 overflow); it must then differ from x.numel().
  int64_t total = 0;
  for (size_t j = 0; j < numels.size(); ++j) {
    TORCH_CHECK(numels[j] >= 0, "gradsieve.segment_mean: numels[", j, "] must be >= 0, got ",
                numels[j]);
    total = std::min<int64_t>(total + std::min<int64_t>(numels[j], kMaxNumel + 1), kMaxNumel + 1);
  }
  TORCH_CHECK(total <= kMaxNumel, "gradsieve.segment_mean: numels must sum to x.numel() (",
              x.sym_numel(), "), got more than 2^31 - 1");
  TORCH_CHECK(x.sym_numel() == total, "gradsieve.segment_mean: numels must sum to x.numel() (",
              x.sym_numel(), "), got ", total);
}

}  // namespace gradsieve

// The gradsieve operator library: schemas and the Meta (fake) kernels used for tracing (sizes
// handled as SymInt, so torch.compile's dynamic shapes trace them). Backends
// register their kernels in their own files (csrc/cpu, csrc/cuda_launch) with TORCH_LIBRARY_IMPL.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "validation.h"

namespace gradsieve {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_abs_meta(const at::Tensor& x, int64_t k) {
  check_topk_abs(x, k);
  return {at::empty({k}, x.options()), at::empty({k}, x.options().dtype(at::kLong))};
}

at::Tensor quantile_abs_meta(const at::Tensor& x, double q) {
  check_quantile_abs(x, q);
  return at::empty({}, x.options());
}

std::tuple<at::Tensor, at::Tensor> ef_topk_meta(at::Tensor& residual, const at::Tensor& grad,
                                                int64_t k, double scale) {
  check_ef_topk(residual, grad, k, scale);
  return {at::empty({k}, residual.options()), at::empty({k}, residual.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ef_topk_into_meta(at::Tensor& out, const at::Tensor& residual,
                                                                  const at::Tensor& grad, int64_t k,
                                                                  double scale) {
  check_ef_topk_into(out, residual, grad, k, scale);
  return {at::empty({k}, out.options()), at::empty({k}, out.options().dtype(at::kLong)),
          at::empty({}, out.options().dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor> regtopk_select_meta(at::Tensor& residual, const at::Tensor& grad,
                                                       const at::Tensor& prev_indices,
                                                       const at::Tensor& prev_sent,
                                                       const at::Tensor& prev_agg, double mu,
                                                       int64_t k, int64_t world_size,
                                                       c10::optional<double> q,
                                                       const c10::optional<at::Tensor>& bad,
                                                       const c10::optional<at::Tensor>& kept,
                                                       const c10::optional<at::Tensor>& finite) {
  check_regtopk_select(residual, grad, prev_indices, prev_sent, prev_agg, mu, k, world_size, q,
                       bad, kept, finite);
  return {at::empty({k}, residual.options()), at::empty({k}, residual.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> threshold_select_meta(const at::Tensor& x,
                                                                     const at::Tensor& threshold,
                                                                     int64_t capacity) {
  check_threshold_select(x, threshold, capacity);
  return {at::empty({capacity}, x.options()), at::empty({capacity}, x.options().dtype(at::kLong)),
          at::empty({}, x.options().dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_meta(const at::Tensor& x, int64_t chunk,
                                                      bool stochastic,
                                                      c10::optional<at::Generator> generator) {
  check_quantize_int8(x, chunk);
  return {at::empty_symint(x.sym_sizes(), x.options().dtype(at::kChar)),
          at::empty_symint({num_chunks(x.sym_numel(), chunk)}, x.options().dtype(at::kFloat))};
}

at::Tensor dequantize_int8_meta(const at::Tensor& q, const at::Tensor& scales, int64_t chunk,
                                at::ScalarType dtype) {
  check_dequantize_int8(q, scales, chunk, dtype);
  return at::empty_symint(q.sym_sizes(), q.options().dtype(dtype));
}

void sparse_accumulate_meta(at::Tensor& out, const at::Tensor& indices, const at::Tensor& values,
                            const c10::optional<at::Tensor>& scales, int64_t chunk,
                            const c10::optional<at::Tensor>& bad) {
  check_sparse_accumulate(out, indices, values, scales, chunk, bad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
adaptive_select_meta(const at::Tensor& grad, const at::Tensor& average, const at::Tensor& momentum,
                     const at::Tensor& residual, double alpha, double beta, double q,
                     bool compare_average, bool error_feedback, int64_t capacity) {
  check_adaptive_select(grad, average, momentum, residual, alpha, beta, q, capacity);
  const auto f32 = grad.options().dtype(at::kFloat);
  return {at::empty_symint({grad.sym_numel()}, f32), at::empty_symint({grad.sym_numel()}, f32),
          at::empty({capacity}, f32), at::empty({capacity}, f32.dtype(at::kLong)),
          at::empty({}, f32.dtype(at::kLong)), at::empty({}, f32)};
}

at::Tensor csr16_indices_meta(const at::Tensor& counts, const at::Tensor& offsets,
                              const at::Tensor& valid, int64_t numel) {
  check_csr16_indices(counts, offsets, valid, numel);
  return at::empty_symint(offsets.sym_sizes(), offsets.options().dtype(at::kLong));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> predictive_score_meta(
    const at::Tensor& grad, const at::Tensor& residual, at::TensorList history, int64_t newest,
    const at::Tensor& weights, int64_t hidden, bool product) {
  check_predictive_score(grad, residual, history, newest, weights, hidden);
  const auto f32 = grad.options().dtype(at::kFloat);
  return {at::empty_symint({grad.sym_numel()}, f32), at::empty_symint({grad.sym_numel()}, f32),
          at::empty({}, f32)};
}

std::tuple<at::Tensor, at::Tensor> influence_update_meta(const at::Tensor& grad,
                                                         const at::Tensor& residual,
                                                         const at::Tensor& score,
                                                         const c10::optional<at::Tensor>& hessian,
                                                         double eps, double rho) {
  check_influence_update(grad, residual, score, hessian, eps, rho);
  const auto f32 = grad.options().dtype(at::kFloat);
  return {at::empty_symint({grad.sym_numel()}, f32), at::empty_symint({grad.sym_numel()}, f32)};
}

at::Tensor segment_mean_meta(const at::Tensor& x, at::IntArrayRef numels) {
  check_segment_mean(x, numels);
  return at::empty({static_cast<int64_t>(numels.size())}, x.options());
}

}  // namespace
}  // namespace gradsieve

TORCH_LIBRARY(gradsieve, m) {
  m.def("topk_abs(Tensor x, int k) -> (Tensor values, Tensor indices)");
  m.def("quantile_abs(Tensor x, float q) -> Tensor");
  m.def("ef_topk_(Tensor(a!) residual, Tensor grad, int k, float scale=1.0) -> "
        "(Tensor values, Tensor indices)");
  m.def("ef_topk_into(Tensor(a!) out, Tensor residual, Tensor grad, int k, float scale=1.0) -> "
        "(Tensor values, Tensor indices, Tensor finite)");
  m.def("regtopk_select_(Tensor(a!) residual, Tensor grad, Tensor prev_indices, Tensor prev_sent, "
        "Tensor prev_agg, float mu, int k, int world_size, float? q=None, Tensor(b!)? bad=None, "
        "Tensor? kept=None, Tensor(c!)? finite=None) -> "
        "(Tensor values, Tensor indices)");
  m.def("threshold_select(Tensor x, Tensor threshold, int capacity) -> "
        "(Tensor values, Tensor indices, Tensor count)");
  m.def("quantize_int8(Tensor x, int chunk, bool stochastic=False, Generator? generator=None) -> "
        "(Tensor q, Tensor scales)");
  m.def("dequantize_int8(Tensor q, Tensor scales, int chunk, ScalarType dtype) -> Tensor");
  m.def("sparse_accumulate_(Tensor(a!) out, Tensor indices, Tensor values, Tensor? scales=None, "
        "int chunk=0, Tensor(b!)? bad=None) -> ()");
  m.def("adaptive_select(Tensor grad, Tensor average, Tensor momentum, Tensor residual, "
        "float alpha, float beta, float q, bool compare_average, bool error_feedback, "
        "int capacity) -> (Tensor average_out, Tensor residual_out, Tensor values, "
        "Tensor indices, Tensor count, Tensor threshold)");
  m.def("csr16_indices(Tensor counts, Tensor offsets, Tensor valid, int numel) -> Tensor");
  m.def("predictive_score(Tensor grad, Tensor residual, Tensor[] history, int newest, "
        "Tensor weights, int hidden, bool product) -> (Tensor accumulator, Tensor score, "
        "Tensor scale)");
  m.def("influence_update(Tensor grad, Tensor residual, Tensor score, Tensor? hessian, float eps, "
        "float rho) -> (Tensor acc, Tensor score_out)");
  m.def("segment_mean(Tensor x, int[] numels) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradsieve, Meta, m) {
  m.impl("topk_abs", &gradsieve::topk_abs_meta);
  m.impl("quantile_abs", &gradsieve::quantile_abs_meta);
  m.impl("ef_topk_", &gradsieve::ef_topk_meta);
  m.impl("ef_topk_into", &gradsieve::ef_topk_into_meta);
  m.impl("regtopk_select_", &gradsieve::regtopk_select_meta);
  m.impl("threshold_select", &gradsieve::threshold_select_meta);
  m.impl("quantize_int8", &gradsieve::quantize_int8_meta);
  m.impl("dequantize_int8", &gradsieve::dequantize_int8_meta);
  m.impl("sparse_accumulate_", &gradsieve::sparse_accumulate_meta);
  m.impl("adaptive_select", &gradsieve::adaptive_select_meta);
  m.impl("csr16_indices", &gradsieve::csr16_indices_meta);
  m.impl("predictive_score", &gradsieve::predictive_score_meta);
  m.impl("influence_update", &gradsieve::influence_update_meta);
  m.impl("segment_mean", &gradsieve::segment_mean_meta);
}

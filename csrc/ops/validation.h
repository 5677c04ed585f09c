// Argument checks shared by every backend of every gradsieve op (CPU, CUDA and Meta), so that a
// bad call fails the same way everywhere. Messages read "gradsieve.<op>: <arg> must be ..., got ...".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Optional.h>

#include <limits>

namespace gradsieve {

// Indices travel as int32 on the wire and the kernels count in 32 bits.
constexpr int64_t kMaxNumel = std::numeric_limits<int32_t>::max();

// The checks every op is built from (validation_compress.cpp uses them too).
bool is_float_dtype(at::ScalarType t);
// t: a float32, float16 or bfloat16 tensor of at most 2^31 - 1 elements.
void check_float_input(const char* op, const char* arg, const at::Tensor& t);
void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                       const at::Tensor& ref);
// value in [0, numel].
void check_count(const char* op, const char* arg, int64_t value, const c10::SymInt& numel);

void check_topk_abs(const at::Tensor& x, int64_t k);
void check_quantile_abs(const at::Tensor& x, double q);
void check_ef_topk(const at::Tensor& residual, const at::Tensor& grad, int64_t k, double scale);
void check_ef_topk_into(const at::Tensor& out, const at::Tensor& residual, const at::Tensor& grad,
                        int64_t k, double scale);
void check_regtopk_select(const at::Tensor& residual, const at::Tensor& grad,
                          const at::Tensor& prev_indices, const at::Tensor& prev_sent,
                          const at::Tensor& prev_agg, double mu, int64_t k, int64_t world_size,
                          c10::optional<double> q, const c10::optional<at::Tensor>& bad,
                          const c10::optional<at::Tensor>& kept,
                          const c10::optional<at::Tensor>& finite);
void check_threshold_select(const at::Tensor& x, const at::Tensor& threshold, int64_t capacity);
void check_quantize_int8(const at::Tensor& x, int64_t chunk);
void check_dequantize_int8(const at::Tensor& q, const at::Tensor& scales, int64_t chunk,
                           at::ScalarType dtype);
void check_sparse_accumulate(const at::Tensor& out, const at::Tensor& indices,
                             const at::Tensor& values, const c10::optional<at::Tensor>& scales,
                             int64_t chunk, const c10::optional<at::Tensor>& bad);
// The optional flag output of the ops that read positions from a payload or a memory (`bad`:
// int32[P], contiguous, on `like`'s device, P >= 1 dividing the m positions `entries` holds). With
// it, a position outside its range is skipped and sets bad[j / (m / P)] = 1 (payload j / (m / P)
// of P equal payloads); without it, such a position is an error.
void check_bad_flags(const char* op, const c10::optional<at::Tensor>& bad, const char* entries,
                     const c10::SymInt& m, const at::Tensor& like);
void check_adaptive_select(const at::Tensor& grad, const at::Tensor& average,
                           const at::Tensor& momentum, const at::Tensor& residual, double alpha,
                           double beta, double q, int64_t capacity);
void check_csr16_indices(const at::Tensor& counts, const at::Tensor& offsets,
                         const at::Tensor& valid, int64_t numel);
void check_predictive_score(const at::Tensor& grad, const at::Tensor& residual,
                            at::TensorList history, int64_t newest, const at::Tensor& weights,
                            int64_t hidden);
void check_influence_update(const at::Tensor& grad, const at::Tensor& residual,
                            const at::Tensor& score, const c10::optional<at::Tensor>& hessian,
                            double eps, double rho);
void check_segment_mean(const at::Tensor& x, at::IntArrayRef numels);

// predictive_score's limits: history vectors (H) and hidden units of its scorer. Its features are
// F = H + 2 per entry, its weights hidden * (F + 2) + 1 floats (W1, b1, w2, b2).
constexpr int64_t kPredictiveMaxHistory = 16;
constexpr int64_t kPredictiveMaxHidden = 64;
inline int64_t predictive_weight_count(int64_t history, int64_t hidden) {
  return hidden * (history + 4) + 1;
}

// Entries per block of the csr16 wire index: a position is (block, 16-bit offset in the block).
constexpr int64_t kCsr16Block = int64_t(1) << 16;
inline int64_t csr16_blocks(int64_t numel) { return (numel + kCsr16Block - 1) / kCsr16Block; }

// Number of int8 chunks that cover n entries. The checks take sizes as SymInt (sym_numel), so the
// same code serves concrete tensors and the symbolic shapes of torch.compile's dynamic tracing.
inline int64_t num_chunks(int64_t n, int64_t chunk) { return chunk > 0 ? (n + chunk - 1) / chunk : 0; }
inline c10::SymInt num_chunks(const c10::SymInt& n, int64_t chunk) {
  return chunk > 0 ? (n + (chunk - 1)) / chunk : c10::SymInt(0);
}

}  // namespace gradsieve

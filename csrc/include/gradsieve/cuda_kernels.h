// The torch-free interface of gradsieve's CUDA kernels (csrc/cuda/*.cu).
//
// Everything here is raw pointers, element counts and a cudaStream_t, so the device code compiles
// with nvcc alone (CI proves that on machines with no GPU and a CPU-only torch). The launchers in
// csrc/cuda_launch/ turn tensors into these arguments. Scratch memory follows CUB's convention:
// call the *_workspace_bytes function, allocate that many bytes (the launchers use torch's caching
// allocator), and pass the buffer in. Every function returns the first CUDA error it met.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace gradsieve {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Exact selection of the k largest |x| (see radix_key.h for the key order and the NaN policy), the
// tie rule "lower index first" and output in ascending index order.
//   values: k entries of x's dtype; indices: k int64. k may be 0 (nothing is launched).
size_t topk_abs_workspace_bytes(int64_t n);
cudaError_t topk_abs(const void* x, DType dtype, int64_t n, int64_t k, void* values,
                     int64_t* indices, void* workspace, size_t workspace_bytes,
                     cudaStream_t stream);

// out (0-d, x's dtype) = the order statistic of |x| at rank floor(q * (n - 1)), ascending; NaN when
// any entry of x is NaN or n == 0 (torch.quantile's rule).
size_t quantile_abs_workspace_bytes(int64_t n);
cudaError_t quantile_abs(const void* x, DType dtype, int64_t n, double q, void* out,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

// acc = residual + scale * grad (float32, residual updated in place); values (float32) and indices
// (int64) of the top-k |acc|; residual keeps acc with the selected entries set to zero.
size_t ef_topk_workspace_bytes(int64_t n);
cudaError_t ef_topk(float* residual, const void* grad, DType grad_dtype, int64_t n, int64_t k,
                    float scale, float* values, int64_t* indices, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream);
// The same with acc written to out (residual only read; out may be residual), and *nonfinite set
// to 1 when a grad entry is not finite (nonfinite may be null). Workspace: ef_topk_workspace_bytes.
cudaError_t ef_topk_into(const float* residual, float* out, const void* grad, DType grad_dtype,
                         int64_t n, int64_t k, float scale, float* values, int64_t* indices,
                         int* nonfinite, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// The selection of error feedback by a separate score: the k largest |score| (key order and NaN
// policy of radix_key.h; scores are normally >= 0), ties to the lower index, ascending indices.
// values (float32) receive source[indices], and those entries of source are set to zero.
size_t select_by_score_workspace_bytes(int64_t n);
cudaError_t select_by_score(const float* score, float* source, int64_t n, int64_t k,
                            float* values, int64_t* indices, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

// RegTop-k (arXiv 2409.14893) fused with error feedback, the arguments of regtopk_select_:
// acc = residual + grad (residual updated in place); the k entries of largest score
// w_j * |acc_j| (weights: gradsieve/regtopk_weight.h, from the m entries sent last step) are
// returned in values (float32, acc's values) and indices (int64, ascending) and zeroed in the
// residual. An index listed more than once in prev_indices takes its lowest score; an index
// outside [0, n) is skipped (scored as not sent) and flagged in `bad` when given.
struct RegTopKArgs {
  float* residual;           // n float32, in and out (with kept: out only)
  const float* kept;         // null, or n float32 read instead of the residual (out of place)
  bool* finite;              // null, or one bool set to false when grad holds NaN or Inf
  const void* grad;          // n entries of grad_dtype
  DType grad_dtype;
  int64_t n;
  const void* prev_indices;  // m int32 or int64
  bool prev_indices_int64;
  const float* prev_sent;    // m float32: the values sent last step
  const float* prev_agg;     // m float32: the world's average there
  int64_t m;
  double mu;                 // > 0
  int64_t world_size;        // >= 1
  bool has_q;                // false: entries not sent last step weigh exactly 1
  double q;
  int64_t k;
  float* values;             // k float32
  int64_t* indices;          // k int64
  // Optional device int32[bad_count] (bad_count dividing m): a previous index outside [0, n) is
  // skipped (its entry scored as not sent) and sets bad[j / (m / bad_count)] = 1.
  int32_t* bad;
  int64_t bad_count;
};
size_t regtopk_select_workspace_bytes(int64_t n);
cudaError_t regtopk_select(const RegTopKArgs& args, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

// Entries with |x| >= *threshold (a device float), at most `capacity` of them, the largest first
// when more pass. values/indices must be zero-filled by the caller (padding); *count (device int64)
// receives the number that passed.
size_t threshold_select_workspace_bytes(int64_t n);
cudaError_t threshold_select(const void* x, DType dtype, int64_t n, const float* threshold,
                             int64_t capacity, void* values, int64_t* indices, int64_t* count,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Per-chunk absmax int8 quantization. q: n int8; scales: ceil(n / chunk) float32.
// Stochastic rounding draws uniform_from_counter(seed, offset + i) for element i.
cudaError_t quantize_int8(const void* x, DType dtype, int64_t n, int64_t chunk, bool stochastic,
                          uint64_t seed, uint64_t offset, int8_t* q, float* scales,
                          cudaStream_t stream);
cudaError_t dequantize_int8(const int8_t* q, const float* scales, int64_t n, int64_t chunk,
                            void* out, DType out_dtype, cudaStream_t stream);

// out[indices[j]] += values[j] (times scales[j / chunk] when values are int8). Duplicates add up.
// An entry whose index lies outside [0, out_n) is skipped; when `bad` (device int32[payloads],
// payloads dividing m) is given it also sets bad[j / (m / payloads)] = 1. Nothing else of `bad` is
// written: the caller zero-fills it.
cudaError_t sparse_accumulate(void* out, DType out_dtype, int64_t out_n, const void* indices,
                              bool indices_int64, const void* values, DType values_dtype,
                              bool values_int8, const float* scales, int64_t chunk, int64_t m,
                              int32_t* bad, int64_t payloads, cudaStream_t stream);

// One step of the adaptive compressor on one segment (ops.adaptive_select), no host
// synchronisation: a = residual + grad; average_out = alpha * |a| + (1 - alpha) * average;
// *threshold (device float32) = the ascending rank floor(q * (n - 1)) of |average_out| (NaN when
// it holds a NaN, or n == 0); m = a where (compare_average ? average_out : |a|) >= threshold, else
// 0; Q = beta * m + (1 - beta) * momentum; residual_out = (error_feedback ? a - m : 0) + Q / beta
// (every product and sum rounded on its own, as the CPU kernel). *count (device int64) = the
// number of Q != 0 (NaN included); values (float32, Q) and indices (int64, ascending) receive
// every nonzero Q when at most `capacity` are nonzero, else the capacity largest |Q| (topk_abs's
// rules). values/indices must be zero-filled by the caller (padding).
struct AdaptiveSelectArgs {
  const void* grad;        // n entries of grad_dtype
  DType grad_dtype;
  const float* average;    // n float32
  const float* momentum;   // n float32
  const float* residual;   // n float32
  int64_t n;
  double alpha;            // in [0, 1]
  double beta;             // in (0, 1]
  double q;                // in [0, 1]
  bool compare_average;
  bool error_feedback;
  int64_t capacity;        // in [0, n]
  float* average_out;      // n float32
  float* residual_out;     // n float32
  float* values;           // capacity float32
  int64_t* indices;        // capacity int64
  int64_t* count;          // 0-d int64
  float* threshold;        // 0-d float32
};
size_t adaptive_select_workspace_bytes(int64_t n);
cudaError_t adaptive_select(const AdaptiveSelectArgs& args, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

// Bucket positions of csr16-encoded entries (ops.csr16_indices): counts int32[world, blocks],
// offsets int16[world, slots] (unsigned bits), valid int32[world]; out int64[world, slots]
// receives block * 65536 + offset for the first clamp(valid, 0, slots) slots of each rank (the
// block of slot j: the first whose running sum of max(counts, 0) exceeds j); -1 for the other
// slots, for slots beyond the sum of the counts and for positions >= numel.
size_t csr16_indices_workspace_bytes(int64_t world, int64_t blocks);
cudaError_t csr16_indices(const int32_t* counts, const int16_t* offsets, const int32_t* valid,
                          int64_t world, int64_t blocks, int64_t slots, int64_t numel,
                          int64_t* out, void* workspace, size_t workspace_bytes,
                          cudaStream_t stream);

// The score of the predictive compressor on one segment (ops.predictive_score), no host
// synchronisation: a = residual + grad -> accumulator; *scale (device float32) = s =
// sum |a| / n (1 when n == 0 or s == 0; NaN or inf kept); per entry the features
// x0 = log1p(|a| / s), x1 = log1p(|grad| / s), x_{2+j} = sgn(a) sgn(h_j) log1p(|h_j| / s) (sgn(0)
// = 0) and the scorer z_u = max(0, b1_u + sum_f W1[u, f] x_f) (NaN kept), logit = b2 +
// sum_u w2_u z_u, score = product ? sigmoid(logit) |a| : softplus(logit) (logit > 20: logit).
// Weights: W1 [hidden, H + 2] row-major, b1 [hidden], w2 [hidden], b2. The sum is deterministic
// (block partials over a grid fixed by n, added in block order); the elementwise math is float32,
// every product and sum rounded on its own, in the CPU kernel's order.
constexpr int kPredictiveMaxHistory = 16;
constexpr int kPredictiveMaxHidden = 64;
struct PredictiveScoreArgs {
  const float* grad;                            // n float32
  const float* residual;                        // n float32
  const void* history[kPredictiveMaxHistory];   // h_0 (newest) .. h_{H-1}: n entries each
  DType history_dtype;                          // kFloat32 or kBFloat16
  int history_count;                            // H in [1, kPredictiveMaxHistory]
  const float* weights;                         // hidden * (H + 4) + 1 float32
  int hidden;                                   // in [1, kPredictiveMaxHidden]
  bool product;
  int64_t n;
  float* accumulator;                           // n float32
  float* score;                                 // n float32
  float* scale;                                 // 0-d float32
};
size_t predictive_score_workspace_bytes(int64_t n);
cudaError_t predictive_score(const PredictiveScoreArgs& args, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// The influence score of granular (ops.influence_update), one elementwise pass, no workspace and
// no host synchronisation. Per entry, in float32, every product and sum rounded on its own in
// this order (bitwise the CPU kernel's): a = residual + grad -> acc; t = |a| * eps;
// u = 0.5 * |hessian|, u = u * eps, u = u * eps; influence = t + u (hessian nullptr: t);
// score_out = rho * score + (1 - rho) * influence (the two products, then their sum), with eps,
// rho and 1 - rho (computed in double) rounded once to float32.
struct InfluenceUpdateArgs {
  const void* grad;        // n entries of grad_dtype
  DType grad_dtype;
  const float* residual;   // n float32
  const float* score;      // n float32
  const float* hessian;    // n float32, or nullptr (no curvature term)
  int64_t n;
  double eps;              // finite, > 0
  double rho;              // in [0, 1)
  float* acc;              // n float32
  float* score_out;        // n float32
};
cudaError_t influence_update(const InfluenceUpdateArgs& args, cudaStream_t stream);

// Per-segment means (ops.segment_mean): out[j] = the mean of x[offsets[j] .. offsets[j + 1])
// (0.0 for an empty segment) for j < segments; offsets: segments + 1 nondecreasing int64 on the
// device, offsets[0] = 0. One block per segment sums in double (each thread a block-stride loop,
// then cub's block reduction: a fixed order, so the result is deterministic), divides by the
// count in double and rounds once to float32. No workspace, no host synchronisation.
cudaError_t segment_mean(const float* x, const int64_t* offsets, int64_t segments, float* out,
                         cudaStream_t stream);

// The fused compress-side ops (csrc/cuda/compress.cu; contracts: python/gradsieve/ops.py, the
// CPU kernels in csrc/cpu/compress_kernels.cpp).
//
// ef21_topk: the top-k |grad - estimate| (float32 difference, one rounding; topk_abs's key order,
// NaN policy and ties; indices ascending) into values (float32) and indices (int64), and *finite =
// whether every grad entry is finite. k may be 0; n == 0 only sets *finite.
size_t ef21_topk_workspace_bytes(int64_t n);
cudaError_t ef21_topk(const void* grad, DType grad_dtype, const float* estimate, int64_t n,
                      int64_t k, float* values, int64_t* indices, bool* finite, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream);

// The value codecs of a payload (csrc/ops/wire_layout.h's Codec, in the same order): float32,
// float16 or bfloat16 values; int8, int4 or int2 codes (two's complement) or sign bits (1:
// negative), B bits per slot packed LSB first (slot j's field starts at bit j * B of the values
// section), times a float32 scale per chunk of slots.
enum class WireValues : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt8 = 3,
  kInt4 = 4,
  kInt2 = 5,
  kSign = 6
};

// Bits per slot, whether values are codes times a per-chunk scale, and the largest code magnitude
// of the integer codecs (wire_layout.h's codec_bits, codec_scaled, codec_qmax).
__host__ __device__ constexpr int wire_bits(WireValues v) {
  return v == WireValues::kFloat32 ? 32
         : (v == WireValues::kFloat16 || v == WireValues::kBFloat16) ? 16
         : v == WireValues::kInt8 ? 8
         : v == WireValues::kInt4 ? 4
         : v == WireValues::kInt2 ? 2
         : 1;
}
__host__ __device__ constexpr bool wire_scaled(WireValues v) {
  return v == WireValues::kInt8 || v == WireValues::kInt4 || v == WireValues::kInt2 ||
         v == WireValues::kSign;
}
__host__ __device__ constexpr int wire_qmax(WireValues v) {
  return v == WireValues::kInt8 ? 127 : v == WireValues::kInt4 ? 7 : v == WireValues::kInt2 ? 1 : 0;
}

// The index formats of a payload (csrc/ops/wire_layout.h's IndexKind, in the same order): int32
// positions; csr16 (int32 counts per block of 65536 positions, then an int16 offset per slot); or
// the chunk-local index (an int32 descriptor, then the counts per chunk of 2^b positions in unary,
// slot j of chunk c setting bit j + c, and a b-bit offset per slot packed LSB first, or a bitmap of
// the positions; wire_layout.h's local_layout picks b or the bitmap).
enum class WireIndex : int { kInt32 = 0, kCsr16 = 1, kLocal = 2 };

// The local index's descriptor word in bitmap mode (wire_layout.h's kLocalBitmap); in offsets mode
// it is b.
constexpr int32_t kWireLocalBitmap = 256;

// pack_payload: a whole payload of K entries (python/gradsieve/wire.py's layout, offsets from
// pack_layout in csrc/ops/wire_layout.h; K slots, no padding) and the values as decoded (sent, K
// floats, 0 at slots that are not valid). indices: K int64 (indices_int64) or int32; valid: K
// bools or null (every slot valid); codec's values (scaled codecs: a scale per chunk of slots,
// the last chunk partial); int32 positions, csr16 (blocks counts, then int16 offsets) or the
// local index (a slot not valid, or whose position is outside [0, numel), sets no bit and has
// offset 0). The payload must be 4-byte aligned (torch's allocations are).
struct PackPayloadArgs {
  const bool* finite;
  const void* indices;
  bool indices_int64;
  const float* values;
  const bool* valid;
  int64_t k;                // entries, = slots
  WireValues codec;
  int64_t chunk;            // scaled codecs: slots per scale
  WireIndex index;
  int64_t numel;            // the bucket's positions (the local index covers [0, numel))
  bool stochastic;          // intB codes: floor(v / scale + rounding_draw(seed, j, v)), not rint
  uint64_t seed;
  int64_t blocks;           // csr16 blocks; local offsets mode: chunks of 2^local_bits positions
  int local_bits;           // local index: b in [1, 15], or 0 in bitmap mode
  int64_t index_offset;     // int32 positions, csr16's int32 block counts, or the local
                            // descriptor (its unary counts 4 bytes on)
  int64_t offsets_offset;   // csr16's int16 offsets; local: the b-bit offsets, or the bitmap
  int64_t scales_offset;    // scaled codecs' float32 scales
  int64_t values_offset;
  uint8_t* payload;
  int64_t nbytes;
  float* sent;
};
cudaError_t pack_payload(const PackPayloadArgs& args, cudaStream_t stream);

// ef21_commit: estimate_out = estimate with change index-added at indices (positions outside
// [0, n) skipped), global_out = result = global_estimate + average. n floats each; m entries.
cudaError_t ef21_commit(const float* estimate, const float* global_estimate, const float* average,
                        int64_t n, const void* indices, bool indices_int64, const float* change,
                        int64_t m, float* estimate_out, float* global_out, float* result,
                        cudaStream_t stream);

// dgc_accumulate: u_out = u * momentum + grad (grad * *grad_scale when grad_scale is not null),
// v_out = v + u_out, each operation rounded on its own; *finite = whether grad is all finite.
cudaError_t dgc_accumulate(const void* grad, DType grad_dtype, const float* u, const float* v,
                           int64_t n, float momentum, const float* grad_scale, float* u_out,
                           float* v_out, bool* finite, cudaStream_t stream);

// dgc_mask: u[i] *= 0 and v[i] *= 0 (in place) at the m positions i = indices[j] with valid[j]
// (valid may be null), positions outside [0, n) skipped.
cudaError_t dgc_mask(float* u, float* v, int64_t n, const void* indices, bool indices_int64,
                     const bool* valid, int64_t m, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradsieve

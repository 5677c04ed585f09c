// CPU kernels of the wire codec: quantize_int8, dequantize_int8 and sparse_accumulate_.
//
// quantize_int8: per chunk, scale = max|x| / 127 (NaN for a chunk holding NaN or Inf), then
// rint(x / scale) or, stochastically, floor(x / scale + u) with u from the counter-based generator
// of radix_key.h, so one seed rounds the same way on CPU and CUDA. Two reads of x (the second from
// cache), one write. sparse_accumulate_: one pass over the payload; with many entries the output
// range is split across threads and each applies the entries that land in its part, in payload
// order, so sums are deterministic and equal to a sequential loop.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>
#include <limits>
#include <mutex>

#include "../ops/validation.h"
#include "codec_cpu.h"
#include "gradsieve/radix_key.h"

namespace gradsieve {
namespace cpu {

// max |x| of a chunk as the bit pattern of |x|: for floats without sign the integer order is the
// numeric order, and NaN/Inf patterns (>= 0x7f800000) sort above every finite value, so one
// integer max (which vectorises, unlike a float max under IEEE rules) gives both answers.
GRADSIEVE_CLONES uint32_t chunk_abs_bits_max(const float* __restrict x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, sizeof(b));
    b &= 0x7fffffffu;
    m = b > m ? b : m;
  }
  return m;
}

namespace {

constexpr int64_t kSerialPayload = int64_t(1) << 15;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23


// Round half to even, exactly, for |r| < 2^22 (here |r| <= 127): adding 1.5 * 2^23 moves r where
// the float spacing is 1. Built with -ffp-contract=off and no fast-math, so nothing reorders it.
GRADSIEVE_CLONES void chunk_round(const float* __restrict x, int64_t n, float scale,
                                  int8_t* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    const float code = (x[i] / scale + kRoundMagic) - kRoundMagic;
    out[i] = static_cast<int8_t>(static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, code))));
  }
}

void chunk_round_stochastic(const float* x, int64_t n, float scale, uint64_t seed,
                            uint64_t first, int8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float r = x[i] / scale;
    const float code = std::floor(r + uniform_from_counter(seed, first + static_cast<uint64_t>(i)));
    out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, code)));
  }
}

// A chunk as float: float data as is, other types widened into `buffer`.
inline const float* as_float(const float* x, int64_t, std::vector<float>&) { return x; }
template <typename T>
const float* as_float(const T* x, int64_t n, std::vector<float>& buffer) {
  buffer.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(x[i]);
  return buffer.data();
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x_in, int64_t chunk,
                                                     bool stochastic,
                                                     c10::optional<at::Generator> generator) {
  check_quantize_int8(x_in, chunk);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t chunks = num_chunks(n, chunk);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({chunks}, x.options().dtype(at::kFloat));
  uint64_t seed = 0;
  if (stochastic) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  int8_t* out_q = q.data_ptr<int8_t>();
  float* out_s = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_int8", [&] {
    const scalar_t* data = x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / chunk);
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      // fp16/bf16 chunks are widened into a float buffer, one chunk at a time, first.
      std::vector<float> widened;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t start = c * chunk;
        const int64_t len = std::min(n, start + chunk) - start;
        const float* values = as_float(data + start, len, widened);
        const uint32_t bits = chunk_abs_bits_max(values, len);
        float amax;
        std::memcpy(&amax, &bits, sizeof(amax));
        const float scale =
            bits >= 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : amax / 127.0f;
        out_s[c] = scale;
        if (!(scale > 0.0f)) {  // zero chunk, or non-finite: zero codes
          std::fill(out_q + start, out_q + start + len, int8_t(0));
        } else if (stochastic) {
          chunk_round_stochastic(values, len, scale, seed, static_cast<uint64_t>(start), out_q + start);
        } else {
          chunk_round(values, len, scale, out_q + start);
        }
      }
    });
  });
  return {q, scales};
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q_in, const at::Tensor& scales_in, int64_t chunk,
                               at::ScalarType dtype) {
  check_dequantize_int8(q_in, scales_in, chunk, dtype);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const int8_t* codes = q.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_int8", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t n = q.numel();
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / chunk);
    at::parallel_for(0, num_chunks(n, chunk), grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const float scale = s[c];
        const int64_t end = std::min(n, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) {
          o[i] = static_cast<scalar_t>(static_cast<float>(codes[i]) * scale);
        }
      }
    });
  });
  return out;
}

template <typename O, typename I, typename V>
void accumulate_payload(O* out, int64_t out_n, const I* idx, const V* vals, const float* scales,
                        int64_t chunk, int64_t m) {
  const auto apply = [&](int64_t lo, int64_t hi) {
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = static_cast<int64_t>(idx[j]);
      if (i < lo || i >= hi) continue;
      float v = static_cast<float>(vals[j]);
      if (scales != nullptr) v *= scales[j / chunk];
      // Round the addend to the output type first, as an atomic add of that type does on CUDA.
      out[i] = static_cast<O>(static_cast<float>(out[i]) + static_cast<float>(static_cast<O>(v)));
    }
  };
  if (m < kSerialPayload) {
    apply(0, out_n);
  } else {
    // One output range per thread, so the payload is scanned once per thread. The split depends
    // on the thread count but the result does not: every output entry lies in exactly one range
    // and receives its addends in payload order, as in the serial loop above.
    at::parallel_for(0, out_n, std::max<int64_t>(1, out_n / at::get_num_threads()), apply);
  }
}

// Without flags an index outside [0, out_n) is an error, raised before anything is written. With
// flags (int32[P]) it sets its payload's flag and is skipped (accumulate_payload never writes
// outside [0, out_n)).
template <typename I>
void check_index_range(const I* idx, int64_t m, int64_t out_n, int32_t* bad, int64_t payloads) {
  const int64_t per = payloads > 0 ? m / payloads : m;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t i = static_cast<int64_t>(idx[j]);
    if (i >= 0 && i < out_n) continue;
    TORCH_CHECK(bad != nullptr, "gradsieve.sparse_accumulate_: indices must lie in [0, ", out_n,
                ") (out.numel()), got indices[", j, "] = ", i);
    bad[j / per] = 1;
  }
}

void sparse_accumulate_cpu(at::Tensor& out, const at::Tensor& indices_in,
                           const at::Tensor& values_in, const c10::optional<at::Tensor>& scales_in,
                           int64_t chunk, const c10::optional<at::Tensor>& bad_in) {
  check_sparse_accumulate(out, indices_in, values_in, scales_in, chunk, bad_in);
  const bool flagged = bad_in.has_value() && bad_in->defined();
  int32_t* bad = flagged ? bad_in->data_ptr<int32_t>() : nullptr;
  const int64_t payloads = flagged ? bad_in->numel() : 0;
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  const int64_t m = indices.numel();
  if (m == 0) return;
  at::Tensor dense = out.is_contiguous() ? out : out.contiguous();
  const int64_t out_n = dense.numel();
  const bool int8_values = values.scalar_type() == at::kChar;
  const at::Tensor scales = int8_values ? scales_in->contiguous() : at::Tensor();
  const float* s = int8_values ? scales.data_ptr<float>() : nullptr;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_accumulate_", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    check_index_range(idx, m, out_n, bad, payloads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(),
                                    "sparse_accumulate_", [&] {
      using out_t = scalar_t;
      out_t* o = dense.data_ptr<out_t>();
      if (int8_values) {
        accumulate_payload(o, out_n, idx, values.data_ptr<int8_t>(), s, chunk, m);
      } else {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(),
                                        "sparse_accumulate_", [&] {
          accumulate_payload(o, out_n, idx, values.data_ptr<scalar_t>(), nullptr, chunk, m);
        });
      }
    });
  });
  if (!dense.is_same(out)) out.copy_(dense.view(out.sizes()));
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("quantize_int8", &gradsieve::cpu::quantize_int8_cpu);
  m.impl("dequantize_int8", &gradsieve::cpu::dequantize_int8_cpu);
  m.impl("sparse_accumulate_", &gradsieve::cpu::sparse_accumulate_cpu);
}

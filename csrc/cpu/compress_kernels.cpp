// CPU kernels of the fused compress-side ops (schemas: csrc/ops/registration_compress.cpp).
//
// ef21_topk: a pass over grad for its finiteness, then select_top_k (radix_select_cpu.h) on the
// keys of grad - estimate, recomputed on the fly (no buffer is written). pack_payload: one pass over
// the K entries writes the whole payload (scaled codecs: one chunk at a time, its scale then its
// codes).
// ef21_commit, dgc_accumulate: one pass each (plus K scattered adds for the estimate);
// dgc_mask_: K scattered writes. Chunking is fixed, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "../ops/validation_compress.h"
#include "gradsieve/radix_key.h"
#include "codec_cpu.h"
#include "radix_select_cpu.h"

namespace gradsieve {
namespace cpu {
namespace {

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23, as quantize_int8's rounding

struct FloatKeys {
  const float* data;
  uint32_t operator()(int64_t i) const { return AbsKeyTraits::from_float(data[i]); }
};

// The keys of grad - estimate, computed on the fly (float32, one rounding: torch's grad - estimate).
template <typename G>
struct ChangeKeys {
  const G* grad;
  const float* estimate;
  float value(int64_t i) const { return static_cast<float>(grad[i]) - estimate[i]; }
  uint32_t operator()(int64_t i) const { return AbsKeyTraits::from_float(value(i)); }
};

// The finiteness of a pass's tasks, merged.
struct FirstPass {
  bool finite = true;
  std::mutex mutex;
  void merge(bool part_finite) {
    std::lock_guard<std::mutex> lock(mutex);
    finite = finite && part_finite;
  }
};

at::Tensor bool_scalar(bool value, const at::Tensor& like) {
  at::Tensor t = at::empty({}, like.options().dtype(at::kBool));
  *t.data_ptr<bool>() = value;
  return t;
}

// -------------------------------------------------------------------------------------- ef21_topk
std::tuple<at::Tensor, at::Tensor, at::Tensor> ef21_topk_cpu(const at::Tensor& grad_in,
                                                             const at::Tensor& estimate_in,
                                                             int64_t k) {
  check_ef21_topk(grad_in, estimate_in, k);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor estimate = estimate_in.contiguous();
  const auto f32 = estimate.options();
  at::Tensor values = at::empty({k}, f32);
  at::Tensor indices = at::empty({k}, f32.dtype(at::kLong));
  const int64_t n = grad.numel();
  FirstPass first;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ef21_topk", [&] {
    const ChangeKeys<scalar_t> keys{grad.data_ptr<scalar_t>(), estimate.data_ptr<float>()};
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      bool finite = true;
      for (int64_t i = begin; i < end; ++i) finite = finite && std::isfinite(static_cast<float>(keys.grad[i]));
      first.merge(finite);
    });
    float* out_v = values.data_ptr<float>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    select_top_k(n, k, keys, [&](int64_t pos, int64_t i) {
      out_v[pos] = keys.value(i);
      out_i[pos] = i;
    });
  });
  return {values, indices, bool_scalar(first.finite, estimate)};
}

// ------------------------------------------------------------------------------------ ef21_commit
std::tuple<at::Tensor, at::Tensor, at::Tensor> ef21_commit_cpu(const at::Tensor& estimate_in,
                                                               const at::Tensor& indices_in,
                                                               const at::Tensor& change_in,
                                                               const at::Tensor& global_in,
                                                               const at::Tensor& average_in) {
  check_ef21_commit(estimate_in, indices_in, change_in, global_in, average_in);
  const at::Tensor estimate = estimate_in.contiguous();
  const at::Tensor global = global_in.contiguous();
  const at::Tensor average = average_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor change = change_in.contiguous();
  at::Tensor estimate_out = at::empty(estimate_in.sizes(), estimate.options());
  at::Tensor global_out = at::empty(global_in.sizes(), global.options());
  at::Tensor result = at::empty(global_in.sizes(), global.options());
  const int64_t n = estimate.numel();
  const float* e = estimate.data_ptr<float>();
  const float* ge = global.data_ptr<float>();
  const float* av = average.data_ptr<float>();
  float* eo = estimate_out.data_ptr<float>();
  float* go = global_out.data_ptr<float>();
  float* res = result.data_ptr<float>();
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      eo[i] = e[i];
      const float s = ge[i] + av[i];
      go[i] = s;
      res[i] = s;
    }
  });
  // index_add_'s order: one entry after the other (a position listed twice adds twice).
  const float* c = change.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "ef21_commit", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    for (int64_t j = 0; j < indices.numel(); ++j) {
      const int64_t i = static_cast<int64_t>(idx[j]);
      if (i >= 0 && i < n) eo[i] = eo[i] + c[j];
    }
  });
  return {estimate_out, global_out, result};
}

// --------------------------------------------------------------------------------- dgc_accumulate
std::tuple<at::Tensor, at::Tensor, at::Tensor> dgc_accumulate_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in, const at::Tensor& v_in, double momentum,
    const c10::optional<at::Tensor>& grad_scale) {
  check_dgc_accumulate(grad_in, u_in, v_in, momentum, grad_scale);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor u0 = u_in.contiguous();
  const at::Tensor v0 = v_in.contiguous();
  at::Tensor u = at::empty(u_in.sizes(), u0.options());
  at::Tensor v = at::empty(v_in.sizes(), v0.options());
  const int64_t n = grad.numel();
  const float m = static_cast<float>(momentum);
  const bool scaled = grad_scale.has_value() && grad_scale->defined();
  const float factor = scaled ? *grad_scale->data_ptr<float>() : 1.0f;
  const float* pu = u0.data_ptr<float>();
  const float* pv = v0.data_ptr<float>();
  float* ou = u.data_ptr<float>();
  float* ov = v.data_ptr<float>();
  bool all_finite = true;
  std::mutex mutex;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dgc_accumulate", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      bool finite = true;
      for (int64_t i = begin; i < end; ++i) {
        const float gi = static_cast<float>(g[i]);
        finite = finite && std::isfinite(gi);
        // (u * momentum) + g, g = grad * grad_scale: each product and sum rounded on its own.
        const float clipped = scaled ? gi * factor : gi;
        const float decayed = pu[i] * m;
        const float ui = decayed + clipped;
        ou[i] = ui;
        ov[i] = pv[i] + ui;
      }
      std::lock_guard<std::mutex> lock(mutex);
      all_finite = all_finite && finite;
    });
  });
  return {u, v, bool_scalar(all_finite, u)};
}

// -------------------------------------------------------------------------------------- dgc_mask_
void dgc_mask_cpu(at::Tensor& u_out, at::Tensor& v_out, const at::Tensor& indices_in,
                  const c10::optional<at::Tensor>& valid_in) {
  check_dgc_mask(u_out, v_out, indices_in, valid_in);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t m = indices.numel();
  if (m == 0) return;
  const bool has_valid = valid_in.has_value() && valid_in->defined();
  const at::Tensor valid = has_valid ? valid_in->contiguous() : at::Tensor();
  const bool* ok = has_valid ? valid.data_ptr<bool>() : nullptr;
  at::Tensor u = u_out.is_contiguous() ? u_out : u_out.contiguous();
  at::Tensor v = v_out.is_contiguous() ? v_out : v_out.contiguous();
  const int64_t n = u.numel();
  float* pu = u.data_ptr<float>();
  float* pv = v.data_ptr<float>();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "dgc_mask_", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    for (int64_t j = 0; j < m; ++j) {
      if (ok != nullptr && !ok[j]) continue;
      const int64_t i = static_cast<int64_t>(idx[j]);
      if (i < 0 || i >= n) continue;
      // x * 0 (not a fill): -0.0 for a negative entry and NaN for a non-finite one, as the
      // product with a 0/1 mask gives.
      pu[i] = pu[i] * 0.0f;
      pv[i] = pv[i] * 0.0f;
    }
  });
  if (!u.is_same(u_out)) u_out.copy_(u);
  if (!v.is_same(v_out)) v_out.copy_(v);
}

// ----------------------------------------------------------------------------------- pack_payload
inline int64_t floor_mod(int64_t i, int64_t b) {
  const int64_t r = i % b;
  return r < 0 ? r + b : r;
}

// float -> wire value. float16/bfloat16 round to nearest even (c10's conversions, which match
// torch's vectorised .to() for every non-NaN value; NaN is handled by the caller).
template <typename W>
inline W to_wire(float v) { return static_cast<W>(v); }

// The scale of one chunk of a scaled codec (wire_layout.h; python/gradsieve/wire.py): NaN when
// the chunk holds NaN or Inf; intB: max |x| / qmax (quantize_int8's for int8); sign: the mean |x|
// of the chunk's nonzero entries, summed in slot order (0 when none is nonzero).
float chunk_scale(const float* x, int64_t n, Codec codec) {
  const uint32_t bits_max = chunk_abs_bits_max(x, n);
  if (bits_max >= 0x7f800000u) return std::numeric_limits<float>::quiet_NaN();
  if (codec != Codec::kSign) {
    float amax;
    std::memcpy(&amax, &bits_max, sizeof(amax));
    return amax / static_cast<float>(codec_qmax(codec));
  }
  float sum = 0.0f;
  int64_t nonzero = 0;
  for (int64_t j = 0; j < n; ++j) {
    sum += std::fabs(x[j]);
    nonzero += x[j] != 0.0f ? 1 : 0;
  }
  return nonzero > 0 ? sum / static_cast<float>(nonzero) : 0.0f;
}

// The code of v (slot j) under a chunk's scale: intB rounds v / scale half to even, or with a
// seed floor(v / scale + u), u = rounding_draw(seed, j, bits of v), and clamps to +-qmax (0 under
// a zero or NaN scale); sign: 1 for a negative v (0 under a NaN scale).
inline int32_t code_of(float v, float scale, Codec codec, int32_t qmax, const uint64_t* seed,
                       int64_t j) {
  if (codec == Codec::kSign) return (v < 0.0f && !std::isnan(scale)) ? 1 : 0;
  if (!(scale > 0.0f)) return 0;
  float r;
  if (seed != nullptr) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    r = std::floor(v / scale + rounding_draw(*seed, j, bits));
  } else {
    r = (v / scale + kRoundMagic) - kRoundMagic;
  }
  const float q = static_cast<float>(qmax);
  return static_cast<int32_t>(std::min(q, std::max(-q, r)));
}

// What a receiver decodes for a code (one float32 multiplication).
inline float decoded(int32_t code, float scale, Codec codec) {
  if (codec == Codec::kSign) return (code != 0 ? -1.0f : 1.0f) * scale;
  return static_cast<float>(code) * scale;
}

// ORs the low `bits` bits of `value` into `base` at bit `bit` (LSB first).
inline void put_bits(uint8_t* base, int64_t bit, uint32_t value, int64_t bits) {
  while (bits > 0) {
    const int64_t shift = bit & 7;
    const int64_t take = std::min<int64_t>(8 - shift, bits);
    base[bit >> 3] = static_cast<uint8_t>(base[bit >> 3] | ((value & ((1u << take) - 1u)) << shift));
    value >>= take;
    bit += take;
    bits -= take;
  }
}

// The local index section (wire_layout.h) of the K slots, at `section` (zeroed): the descriptor,
// then the unary counts (slot j of chunk c sets bit j + c) and each slot's offset in its chunk, or
// the bitmap. A slot that carries no entry, or whose position is outside [0, numel), sets no bit
// (offset 0).
template <typename index_t>
void write_local_index(const PackLayout<int64_t>& layout, int64_t numel, const index_t* idx,
                       const bool* ok, int64_t k, uint8_t* section) {
  const LocalLayout& l = layout.local;
  const int32_t descriptor = l.bitmap ? kLocalBitmap : static_cast<int32_t>(l.bits);
  std::memcpy(section, &descriptor, sizeof(descriptor));
  uint8_t* counts = section + 4;
  uint8_t* offsets = section + 4 + l.counts_bytes;
  const uint32_t mask = (1u << l.bits) - 1u;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t p = static_cast<int64_t>(idx[j]);
    if ((ok != nullptr && !ok[j]) || p < 0 || p >= numel) continue;
    if (l.bitmap) {
      offsets[p >> 3] = static_cast<uint8_t>(offsets[p >> 3] | (1u << (p & 7)));
    } else {
      const int64_t q = j + (p >> l.bits);
      counts[q >> 3] = static_cast<uint8_t>(counts[q >> 3] | (1u << (q & 7)));
      put_bits(offsets, j * l.bits, static_cast<uint32_t>(p) & mask, l.bits);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pack_payload_cpu(const at::Tensor& finite_in,
                                                    const at::Tensor& indices_in,
                                                    const at::Tensor& values_in,
                                                    const c10::optional<at::Tensor>& valid_in,
                                                    c10::string_view wire_name, int64_t chunk,
                                                    c10::string_view index, int64_t numel,
                                                    bool checksum, c10::optional<int64_t> seed_in) {
  const Codec codec = check_pack_payload(finite_in, indices_in, values_in, valid_in, wire_name,
                                         chunk, index, numel, checksum, seed_in);
  const uint64_t seed_value = seed_in.has_value() ? static_cast<uint64_t>(*seed_in) : 0;
  const uint64_t* seed = seed_in.has_value() ? &seed_value : nullptr;
  const at::Tensor values = values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const bool has_valid = valid_in.has_value() && valid_in->defined();
  const at::Tensor valid = has_valid ? valid_in->contiguous() : at::Tensor();
  const int64_t k = values.numel();
  const IndexKind kind = index_of("pack_payload", index);
  const bool csr16 = kind == IndexKind::kCsr16;
  const bool local = kind == IndexKind::kLocal;
  const PackLayout<int64_t> layout = pack_layout<int64_t>(k, codec, chunk, kind, numel, checksum);
  const bool scaled = codec_scaled(codec);
  const int64_t bits = layout.bits;
  const int32_t qmax = codec_qmax(codec);
  at::Tensor payload = at::zeros({layout.nbytes}, values.options().dtype(at::kByte));
  at::Tensor sent = at::empty({k}, values.options());
  uint8_t* base = payload.data_ptr<uint8_t>();
  int32_t* header = reinterpret_cast<int32_t*>(base);
  header[0] = *finite_in.contiguous().data_ptr<bool>() ? 1 : 0;
  int32_t* counts = reinterpret_cast<int32_t*>(base + layout.index_offset);
  int32_t* index32 = reinterpret_cast<int32_t*>(base + layout.index_offset);
  uint16_t* offsets = reinterpret_cast<uint16_t*>(base + layout.offsets_offset);
  float* scales = reinterpret_cast<float*>(base + layout.scales_offset);
  uint8_t* wire = base + layout.values_offset;
  const float* vals = values.data_ptr<float>();
  const bool* ok = has_valid ? valid.data_ptr<bool>() : nullptr;
  float* out_sent = sent.data_ptr<float>();

  // Groups of slots: the chunks of a scaled codec (a scale each), else fixed runs of kChunk
  // entries. A task takes whole groups, 8 at a time for codes below a byte, so that every task
  // starts on a byte of the values section and no two tasks write the same byte.
  const int64_t group = scaled ? chunk : kChunk;
  const int64_t groups = (k + group - 1) / group;
  const int64_t step = bits < 8 ? 8 : 1;
  const int64_t tasks = (groups + step - 1) / step;
  std::vector<int64_t> total_counts(static_cast<size_t>(layout.blocks), 0);
  int64_t total_valid = 0;
  bool nan_seen = false;
  std::mutex mutex;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "pack_payload", [&] {
    const index_t* idx = indices.data_ptr<index_t>();
    const int64_t grain = std::max<int64_t>(1, kChunk / (group * step));
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> local_counts(static_cast<size_t>(layout.blocks), 0);
      std::vector<float> zeroed;  // a chunk with its padding slots as 0
      int64_t local_valid = 0;
      bool local_nan = false;
      for (int64_t g = t0 * step; g < std::min(groups, t1 * step); ++g) {
        const int64_t start = g * group;
        const int64_t stop = std::min(k, start + group);
        float scale = 0.0f;
        if (scaled) {
          const float* chunk_values = vals + start;
          if (ok != nullptr) {
            zeroed.resize(static_cast<size_t>(stop - start));
            for (int64_t j = start; j < stop; ++j) zeroed[j - start] = ok[j] ? vals[j] : 0.0f;
            chunk_values = zeroed.data();
          }
          scale = chunk_scale(chunk_values, stop - start, codec);
          scales[g] = scale;
        }
        for (int64_t j = start; j < stop; ++j) {
          const bool carries = ok == nullptr || ok[j];
          local_valid += carries ? 1 : 0;
          const int64_t position = static_cast<int64_t>(idx[j]);
          if (csr16) {
            // Padding slots go on the wire as position 0 and are not counted.
            const int64_t p = carries ? position : 0;
            offsets[j] = static_cast<uint16_t>(floor_mod(p, kCsr16Block));
            if (carries) {
              const int64_t block = (p - floor_mod(p, kCsr16Block)) / kCsr16Block;
              if (block >= 0 && block < layout.blocks) ++local_counts[static_cast<size_t>(block)];
            }
          } else if (!local) {  // the local index is written below, in one pass
            index32[j] = static_cast<int32_t>(position);
          }
          const float v = carries ? vals[j] : 0.0f;  // a padding slot goes on the wire as 0
          float got;
          switch (codec) {
            case Codec::kF16: {
              const at::Half h = to_wire<at::Half>(v);
              reinterpret_cast<at::Half*>(wire)[j] = h;
              got = static_cast<float>(h);
              local_nan = local_nan || std::isnan(v);
              break;
            }
            case Codec::kBF16: {
              const at::BFloat16 h = to_wire<at::BFloat16>(v);
              reinterpret_cast<at::BFloat16*>(wire)[j] = h;
              got = static_cast<float>(h);
              local_nan = local_nan || std::isnan(v);
              break;
            }
            case Codec::kF32:
              reinterpret_cast<float*>(wire)[j] = v;
              got = v;
              break;
            default: {
              const int32_t code = code_of(v, scale, codec, qmax, seed, j);
              if (bits == 8) {
                reinterpret_cast<int8_t*>(wire)[j] = static_cast<int8_t>(code);
              } else {
                const int64_t bit = j * bits;
                const uint32_t field = static_cast<uint32_t>(code) & ((1u << bits) - 1u);
                wire[bit >> 3] = static_cast<uint8_t>(wire[bit >> 3] | (field << (bit & 7)));
              }
              got = decoded(code, scale, codec);
            }
          }
          // A slot that carries no entry is not decoded: nothing was sent for it.
          out_sent[j] = carries ? got : 0.0f;
        }
      }
      std::lock_guard<std::mutex> lock(mutex);
      for (size_t b = 0; b < local_counts.size(); ++b) total_counts[b] += local_counts[b];
      total_valid += local_valid;
      nan_seen = nan_seen || local_nan;
    });
  });
  header[1] = static_cast<int32_t>(has_valid ? total_valid : k);
  if (local) {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "pack_payload_local", [&] {
      write_local_index(layout, numel, indices.data_ptr<index_t>(), ok, k,
                        base + layout.index_offset);
    });
  }
  for (size_t b = 0; b < total_counts.size(); ++b) counts[b] = static_cast<int32_t>(total_counts[b]);
  if (nan_seen) {
    // torch's vectorised conversions keep NaN payloads (float16) or write one NaN pattern of
    // their own (bfloat16) that c10's scalar conversion does not: a NaN value (a non-finite
    // step, whose payload is dropped anyway) is written by torch's own cast, so the bytes are
    // exactly what PayloadFormat.pack writes.
    const auto dtype = codec == Codec::kF16 ? at::kHalf : at::kBFloat16;
    at::Tensor section = payload.narrow(0, layout.values_offset, 2 * k).view(dtype);
    section.copy_(has_valid ? at::where(valid, values, at::zeros({}, values.options())) : values);
    if (has_valid) {
      sent.copy_(at::where(valid, section.to(at::kFloat), at::zeros({}, sent.options())));
    } else {
      sent.copy_(section);
    }
  }
  return {payload, sent};
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("pack_payload", &gradsieve::cpu::pack_payload_cpu);
  m.impl("ef21_topk", &gradsieve::cpu::ef21_topk_cpu);
  m.impl("ef21_commit", &gradsieve::cpu::ef21_commit_cpu);
  m.impl("dgc_accumulate", &gradsieve::cpu::dgc_accumulate_cpu);
  m.impl("dgc_mask_", &gradsieve::cpu::dgc_mask_cpu);
}

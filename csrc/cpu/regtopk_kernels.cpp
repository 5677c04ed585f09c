// CPU kernel of regtopk_select_: error feedback whose selection ranks entries by the RegTop-k score
// (Bereyhi et al., arXiv 2409.14893) instead of by |acc|; the weights are in regtopk_weight.h.
//
// Pass 1, parallel: acc = residual + grad (written back to the residual; with `kept`, acc = kept +
// grad written to the residual, which is then only an output: error feedback out of place, with
// no copy of the memory) and the radix key of the score w_unsent * |acc| for every entry (one read
// of grad, one read and write of the residual or kept, one write of the keys; with `finite`, whether
// grad is finite from the same pass). Then, serially over the m entries sent last step (m is the previous k, a
// small fraction of n), their keys are replaced by the keys of w_j * |acc_j|; an index listed more
// than once keeps its lowest key. The exact radix select of radix_select_cpu.h then runs on the
// keys (4 passes over them) and writes acc's value at each selected index, zeroing it in the
// residual. Ties at the cut go to the lower index; indices come out in ascending order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>

#include "../ops/validation.h"
#include "gradsieve/regtopk_weight.h"
#include "radix_select_cpu.h"

namespace gradsieve {
namespace cpu {
namespace {

// Without flags a previous index outside [0, n) is an error, raised before anything is written;
// with flags (int32[P]) it sets its part's flag, and the entry is skipped (scored as not sent).
template <typename index_t>
void check_prev_index_range(const index_t* idx, int64_t m, int64_t n, int32_t* bad,
                            int64_t payloads) {
  const int64_t per = payloads > 0 ? m / payloads : m;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t i = static_cast<int64_t>(idx[j]);
    if (i >= 0 && i < n) continue;
    TORCH_CHECK(bad != nullptr, "gradsieve.regtopk_select_: prev_indices must lie in [0, ", n,
                ") (grad.numel()), got prev_indices[", j, "] = ", i);
    bad[j / per] = 1;
  }
}

// Scratch for the n score keys, left uninitialised (pass 1 writes every key). Fresh memory costs a
// page fault per 4 KiB on first touch, on every call: at n = 2^24 that was a third of the op's time
// (76 ms against 49 ms with a reused buffer, 2 cores). So each thread keeps one buffer for inputs
// up to kKeptKeys entries (64 MiB; a DDP bucket of 25 MiB holds 6.5M float32 entries) and reuses
// it; larger inputs get fresh memory, freed when the call returns.
constexpr int64_t kKeptKeys = int64_t(1) << 24;

uint32_t* key_scratch(int64_t n, std::unique_ptr<uint32_t[]>& fresh) {
  if (n > kKeptKeys) {
    fresh.reset(new uint32_t[static_cast<size_t>(n)]);
    return fresh.get();
  }
  thread_local std::unique_ptr<uint32_t[]> kept;
  thread_local int64_t kept_size = 0;
  if (kept_size < n) {
    kept.reset(new uint32_t[static_cast<size_t>(n)]);
    kept_size = n;
  }
  return kept.get();
}

std::tuple<at::Tensor, at::Tensor> regtopk_select_cpu(at::Tensor& residual,
                                                      const at::Tensor& grad_in,
                                                      const at::Tensor& prev_indices_in,
                                                      const at::Tensor& prev_sent_in,
                                                      const at::Tensor& prev_agg_in, double mu,
                                                      int64_t k, int64_t world_size,
                                                      c10::optional<double> q,
                                                      const c10::optional<at::Tensor>& bad_in,
                                                      const c10::optional<at::Tensor>& kept_in,
                                                      const c10::optional<at::Tensor>& finite) {
  check_regtopk_select(residual, grad_in, prev_indices_in, prev_sent_in, prev_agg_in, mu, k,
                       world_size, q, bad_in, kept_in, finite);
  const bool has_kept = kept_in.has_value() && kept_in->defined();
  const at::Tensor kept = has_kept ? kept_in->contiguous() : at::Tensor();
  const bool flagged = bad_in.has_value() && bad_in->defined();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor prev_indices = prev_indices_in.contiguous();
  const at::Tensor prev_sent = prev_sent_in.contiguous();
  const at::Tensor prev_agg = prev_agg_in.contiguous();
  const int64_t n = grad.numel();
  const int64_t m = prev_indices.numel();
  // Checked before anything is written: a bad call leaves the residual as it was.
  AT_DISPATCH_INDEX_TYPES(prev_indices.scalar_type(), "regtopk_select_", [&] {
    check_prev_index_range(prev_indices.data_ptr<index_t>(), m, n,
                           flagged ? bad_in->data_ptr<int32_t>() : nullptr,
                           flagged ? bad_in->numel() : 0);
  });

  // A non-contiguous residual is worked on in a contiguous copy and written back at the end.
  at::Tensor acc = residual.is_contiguous() ? residual : residual.contiguous();
  at::Tensor values = at::empty({k}, acc.options());
  at::Tensor indices = at::empty({k}, acc.options().dtype(at::kLong));
  float* r = acc.data_ptr<float>();
  // The memory read: kept's, or the residual's own (in place).
  const float* before = has_kept ? kept.data_ptr<float>() : r;
  std::unique_ptr<uint32_t[]> fresh;
  uint32_t* key = key_scratch(n, fresh);
  const float w_unsent = RegTopKWeight::unsent(q.has_value(), q.value_or(0.0), mu);
  std::atomic<bool> nonfinite{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "regtopk_select_",
                                  [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      bool all_finite = true;
      for (int64_t i = begin; i < end; ++i) {
        const float gi = static_cast<float>(g[i]);
        all_finite = all_finite && std::isfinite(gi);
        const float a = before[i] + gi;
        r[i] = a;
        key[i] = AbsKeyTraits::from_float(w_unsent * std::fabs(a));
      }
      if (!all_finite) nonfinite.store(true, std::memory_order_relaxed);
    });
  });
  if (finite.has_value() && finite->defined() && nonfinite.load()) finite->fill_(false);

  const float* sent = prev_sent.data_ptr<float>();
  const float* agg = prev_agg.data_ptr<float>();
  const double world = static_cast<double>(world_size);
  AT_DISPATCH_INDEX_TYPES(prev_indices.scalar_type(), "regtopk_select_", [&] {
    const index_t* idx = prev_indices.data_ptr<index_t>();
    // Every listed index first gets the largest key, then the lowest of its entries' keys.
    // (An index outside [0, n) was flagged above and is skipped here.)
    auto inside = [n](int64_t i) { return i >= 0 && i < n; };
    for (int64_t j = 0; j < m; ++j) {
      if (inside(static_cast<int64_t>(idx[j]))) key[idx[j]] = AbsKeyTraits::kNanKey;
    }
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = static_cast<int64_t>(idx[j]);
      if (!inside(i)) continue;
      const float w = RegTopKWeight::sent(sent[j], agg[j], world, mu, w_unsent);
      key[i] = std::min(key[i], AbsKeyTraits::from_float(w * std::fabs(r[i])));
    }
  });

  take_top_k(r, n, k, [key](int64_t i) { return key[i]; }, values.data_ptr<float>(),
             indices.data_ptr<int64_t>());
  if (!acc.is_same(residual)) residual.copy_(acc.view(residual.sizes()));
  return {values, indices};
}

}  // namespace
}  // namespace cpu
}  // namespace gradsieve

TORCH_LIBRARY_IMPL(gradsieve, CPU, m) {
  m.impl("regtopk_select_", &gradsieve::cpu::regtopk_select_cpu);
}

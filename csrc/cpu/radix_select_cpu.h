// Exact radix select on magnitude keys for the CPU backend, shared by topk_abs, quantile_abs,
// ef_topk_ and threshold_select.
//
// find_kth_largest: pass 1 builds the 2048-bin histogram of the top 11 key bits over all of x in
// parallel (one private histogram per task, merged once); the bin holding rank k fixes the top
// digit. Pass 2 compacts the keys of that bin into a candidate buffer (order does not matter for
// finding a value), and the two remaining digits (11 and 10 bits) are resolved on the candidates
// alone. write_selection: pass 3 counts, per fixed-size chunk, the keys above the cut and equal to
// it; a prefix sum over chunks gives every chunk its output offset; pass 4 writes the selected
// entries at their ranks, in ascending index order, the lower indices winning ties at the cut.
// Cost: 4 reads of x plus the candidates, no sort. select_top_k (below) brings topk_abs, ef_topk_
// and regtopk_select_ down to one read of x for a large n and a small k. Chunking is fixed (not per
// thread), so results do not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <utility>
#include <limits>
#include <mutex>
#include <vector>

#include "gradsieve/radix_key.h"

namespace gradsieve {
namespace cpu {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kUnlimited = std::numeric_limits<int64_t>::max();
using Histogram = std::array<int64_t, RadixDigits::kMaxBins>;

struct KthLargest {
  uint32_t key;        // the k-th largest key
  int64_t need_equal;  // how many keys equal to it belong to the top k
  bool has_nan;        // x holds at least one NaN
};

// Histogram of digit `pass` over keys matching `prefix` on the bits fixed before `pass`.
template <typename KeyAt>
Histogram histogram(int64_t n, const KeyAt& key_at, int pass, uint32_t prefix) {
  Histogram total{};
  std::mutex mutex;
  const uint32_t mask = RadixDigits::prefix_mask(pass);
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    Histogram local{};
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = key_at(i);
      if ((key & mask) == prefix) ++local[RadixDigits::digit(key, pass)];
    }
    std::lock_guard<std::mutex> lock(mutex);
    for (int b = 0; b < RadixDigits::kMaxBins; ++b) total[b] += local[b];
  });
  return total;
}

// Fixes digit `pass`: the bin, counted from the top, that holds rank `k_remaining`.
inline void choose_digit(const Histogram& hist, int pass, uint32_t& prefix, int64_t& k_remaining) {
  const int nbins = 1 << RadixDigits::bits(pass);
  int64_t above = 0;
  for (int b = nbins - 1; b >= 0; --b) {
    if (above + hist[b] >= k_remaining) {
      prefix |= static_cast<uint32_t>(b) << RadixDigits::shift(pass);
      k_remaining -= above;
      return;
    }
    above += hist[b];
  }
}

// The k-th largest key among key_at(0..n-1), 1 <= k <= n.
template <typename KeyAt>
KthLargest find_kth_largest(int64_t n, int64_t k, const KeyAt& key_at) {
  uint32_t prefix = 0;
  int64_t k_remaining = k;
  const Histogram top = histogram(n, key_at, 0, 0u);
  const bool has_nan = top[RadixDigits::kMaxBins - 1] > 0;
  choose_digit(top, 0, prefix, k_remaining);

  std::vector<uint32_t> candidates;
  candidates.reserve(static_cast<size_t>(top[RadixDigits::digit(prefix, 0)]));
  std::mutex mutex;
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local;
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = key_at(i);
      if ((key >> RadixDigits::shift(0)) == (prefix >> RadixDigits::shift(0))) local.push_back(key);
    }
    std::lock_guard<std::mutex> lock(mutex);
    candidates.insert(candidates.end(), local.begin(), local.end());
  });
  const auto candidate_at = [&candidates](int64_t i) { return candidates[static_cast<size_t>(i)]; };
  const int64_t m = static_cast<int64_t>(candidates.size());
  for (int pass = 1; pass < RadixDigits::kPasses; ++pass) {
    choose_digit(histogram(m, candidate_at, pass, prefix), pass, prefix, k_remaining);
  }
  return {prefix, k_remaining, has_nan};
}

// Calls emit(position, index) for every selected entry: keys above `cut`, and the first `need`
// keys equal to it. Positions are ranks in ascending index order.
template <typename KeyAt, typename Emit>
void write_selection(int64_t n, uint32_t cut, int64_t need, const KeyAt& key_at, const Emit& emit) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> greater(static_cast<size_t>(chunks) + 1, 0);
  std::vector<int64_t> equal(static_cast<size_t>(chunks) + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t g = 0, e = 0;
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const uint32_t key = key_at(i);
        g += key > cut;
        e += key == cut;
      }
      greater[static_cast<size_t>(c) + 1] = g;
      equal[static_cast<size_t>(c) + 1] = e;
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    greater[static_cast<size_t>(c) + 1] += greater[static_cast<size_t>(c)];
    equal[static_cast<size_t>(c) + 1] += equal[static_cast<size_t>(c)];
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t g = greater[static_cast<size_t>(c)];
      int64_t e = equal[static_cast<size_t>(c)];
      if (e >= need && greater[static_cast<size_t>(c) + 1] == g) continue;  // nothing to write
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const uint32_t key = key_at(i);
        if (key > cut) {
          emit(g + std::min(e, need), i);
          ++g;
        } else if (key == cut) {
          if (e < need) emit(g + e, i);
          ++e;
        }
      }
    }
  });
}

// The k entries of largest key (1 <= k <= n): emit(position, index), positions being ranks in
// ascending index order, ties at the cut to the lower indices: find_kth_largest + write_selection.
// For a large n and a small k it reads x once instead of 4 times: a fixed sample of 4096 keys
// gives a cut far below the k-th largest key (the sample's (2 s k / n + 16)-th largest, where about
// s k / n sample keys lie at or above the k-th largest); one pass keeps, per fixed chunk, the
// indices whose keys reach the cut (so they come out in index order); the exact select then runs
// on those candidates alone. When they are fewer than k (the sample misled: the k-th largest key
// lies below the cut) or more than n / 4, the full select runs instead. Both give the same result:
// with at least k candidates every key at or above the k-th largest is among them, in index order.
constexpr int64_t kSampledMinN = int64_t(1) << 18;
constexpr int64_t kSample = 4096;

template <typename KeyAt, typename Emit>
void select_top_k(int64_t n, int64_t k, const KeyAt& key_at, const Emit& emit) {
  if (k <= 0) return;
  if (n >= kSampledMinN && k <= n / 16) {
    std::vector<uint32_t> sample(static_cast<size_t>(kSample));
    const int64_t stride = n / kSample;
    for (int64_t s = 0; s < kSample; ++s) sample[static_cast<size_t>(s)] = key_at(s * stride);
    const int64_t expect = (kSample * k + n - 1) / n;
    const int64_t rank = std::min<int64_t>(kSample, 2 * expect + 16);
    std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<uint32_t>());
    const uint32_t cut = sample[static_cast<size_t>(rank - 1)];
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    // Per chunk: the candidates' indices and keys (the later passes read these, not x).
    std::vector<std::vector<std::pair<int64_t, uint32_t>>> found(static_cast<size_t>(chunks));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        auto& local = found[static_cast<size_t>(c)];
        const int64_t end = std::min(n, (c + 1) * kChunk);
        for (int64_t i = c * kChunk; i < end; ++i) {
          const uint32_t key = key_at(i);
          if (key >= cut) local.emplace_back(i, key);
        }
      }
    });
    int64_t m = 0;
    for (const auto& part : found) m += static_cast<int64_t>(part.size());
    if (m >= k && m <= n / 4) {
      std::vector<int64_t> candidates;
      std::vector<uint32_t> candidate_keys;
      candidates.reserve(static_cast<size_t>(m));
      candidate_keys.reserve(static_cast<size_t>(m));
      for (const auto& part : found) {
        for (const auto& entry : part) {
          candidates.push_back(entry.first);
          candidate_keys.push_back(entry.second);
        }
      }
      const auto candidate_key = [&](int64_t j) { return candidate_keys[static_cast<size_t>(j)]; };
      const KthLargest kth = find_kth_largest(m, k, candidate_key);
      write_selection(m, kth.key, kth.need_equal, candidate_key,
                      [&](int64_t pos, int64_t j) { emit(pos, candidates[static_cast<size_t>(j)]); });
      return;
    }
  }
  const KthLargest kth = find_kth_largest(n, k, key_at);
  write_selection(n, kth.key, kth.need_equal, key_at, emit);
}

// The selection step of error feedback: the k entries of largest key_at(i) (k >= 0) leave the
// accumulator r: their values go to out_values and their indices to out_indices (ascending), and
// they are set to zero in r.
template <typename KeyAt>
void take_top_k(float* r, int64_t n, int64_t k, const KeyAt& key_at, float* out_values,
                int64_t* out_indices) {
  select_top_k(n, k, key_at, [&](int64_t pos, int64_t i) {
    out_values[pos] = r[i];
    out_indices[pos] = i;
    r[i] = 0.0f;
  });
}

}  // namespace cpu
}  // namespace gradsieve

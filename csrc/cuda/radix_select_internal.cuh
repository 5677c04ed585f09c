// The radix select of radix_select.cu, as building blocks for the other kernels of csrc/cuda/
// (adaptive.cu): the device-side select state, the workspace layout, and host functions that
// launch radix_select.cu's kernels on float32 keys. Internal to csrc/cuda/; the public interface
// is gradsieve/cuda_kernels.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "gradsieve/radix_key.h"

namespace gradsieve {
namespace cuda {
namespace radix {

constexpr int kThreads = 256;
constexpr int kItems = 16;
constexpr int kTile = kThreads * kItems;
constexpr int kScanThreads = 1024;
constexpr unsigned long long kUnlimited = ~0ull;

using Key = AbsKeyTraits::Key;

// Device-side progress of one select. Written only by the one-block kernels (and, for `passed`,
// by the atomic counts of threshold_select and adaptive_select).
struct SelectState {
  unsigned long long k_remaining;  // rank still to find among keys matching `prefix`
  unsigned long long need_equal;   // how many keys equal to `cut_key` are selected
  unsigned long long passed;       // threshold_select: keys >= threshold_key
  Key prefix;                      // key bits fixed so far; the k-th largest key after 3 passes
  Key cut_key;                     // the selection rule: key > cut, or key == cut while rank < need
  Key threshold_key;
  unsigned int has_nan;
};

// Workspace layout: state | histogram (kMaxBins unsigned) | tile counts | tile offsets | CUB scan
// scratch.
struct Workspace {
  SelectState* state;
  unsigned* hist;
  unsigned long long* tile_counts;
  unsigned long long* tile_offsets;
  void* scan_tmp;
  size_t scan_bytes;
};

// Bytes of a select workspace for n keys, and its layout in a buffer of that size.
size_t select_workspace_bytes(int64_t n);
Workspace carve_workspace(void* base, int64_t n);

// Blocks of a grid-stride kernel of kThreads threads for n entries, per_thread each (capped at
// 8 blocks per SM).
int grid_size(int64_t n, int per_thread);

// choose_digit_kernel: fixes digit `pass` of the k-th largest key from the histogram in w.hist
// (and clears it).
cudaError_t launch_choose_digit(const Workspace& w, int pass, cudaStream_t stream);

// Histogram passes first_pass..2 (each followed by choose_digit) over the keys of x.
cudaError_t find_kth_float(const float* x, int64_t n, int first_pass, const Workspace& w,
                           cudaStream_t stream);

// finalize_kernel: the cut of write_selection from the state (threshold rule when threshold_mode
// and at most `capacity` keys passed or the select did not run, else the top-k rule); with
// threshold_mode, *count_out = passed.
cudaError_t launch_finalize(const Workspace& w, bool threshold_mode, bool select_ran,
                            unsigned long long capacity, int64_t* count_out, cudaStream_t stream);

// Count per tile, scan, write: the selected entries of x (their values and indices, ascending).
cudaError_t write_selection_float(const float* x, int64_t n, const Workspace& w, float* values,
                                  int64_t* indices, cudaStream_t stream);

}  // namespace radix
}  // namespace cuda
}  // namespace gradsieve

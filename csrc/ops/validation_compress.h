// Argument checks of the fused compress-side ops (registration_compress.cpp:
// pack_payload, ef21_topk, ef21_commit, dgc_accumulate, dgc_mask_), shared by their CPU, CUDA and
// Meta kernels as validation.h's are. Messages read "gradsieve.<op>: <arg> must be ..., got ...".
// The payload layout is wire_layout.h's.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/core/SymInt.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "validation.h"
#include "wire_layout.h"

namespace gradsieve {

void check_ef21_topk(const at::Tensor& grad, const at::Tensor& estimate, int64_t k);
void check_ef21_commit(const at::Tensor& estimate, const at::Tensor& indices,
                       const at::Tensor& change, const at::Tensor& global_estimate,
                       const at::Tensor& average);
void check_dgc_accumulate(const at::Tensor& grad, const at::Tensor& momentum_u,
                          const at::Tensor& velocity_v, double momentum,
                          const c10::optional<at::Tensor>& grad_scale);
void check_dgc_mask(const at::Tensor& momentum_u, const at::Tensor& velocity_v,
                    const at::Tensor& indices, const c10::optional<at::Tensor>& valid);

// Checks pack_payload's arguments and returns the codec named by `wire` (the layout is then
// pack_layout(indices.numel(), codec, chunk, index_of(op, index), numel, checksum)). A seed
// (stochastic rounding) needs an integer codec: int8, int4 or int2.
Codec check_pack_payload(const at::Tensor& finite, const at::Tensor& indices,
                         const at::Tensor& values, const c10::optional<at::Tensor>& valid,
                         c10::string_view wire, int64_t chunk, c10::string_view index,
                         int64_t numel, bool checksum, c10::optional<int64_t> seed);

}  // namespace gradsieve

// The RegTop-k weight of one entry (Bereyhi et al., arXiv 2409.14893), shared by the CPU and CUDA
// kernels of regtopk_select_ so that both backends compute it with the same formula and precision.
//
// Worker n ranks the entries of its accumulated gradient a by score_j = w_j * |a_j| with
//   w_j = tanh(|1 + Delta_j| / mu),   1 + Delta_j = g_agg[j] / (omega * sent[j]),   omega = 1 / N,
// for the entries j it sent last step (sent[j]: the value it put on the wire, g_agg[j]: the average
// every worker received there). For the entries it did not send, Delta_j = Q, a large constant, so
// w = tanh(|1 + Q| / mu); Q = infinity (the default) gives w = 1 exactly. The policy fixed here:
//   * the ratio and tanh are evaluated in double and the weight rounded once to float;
//   * an entry whose sent value is 0, or whose ratio is NaN (a NaN or inf / inf input), carries no
//     information about how its contribution aggregated: it is weighted as if not sent;
//   * an infinite ratio (sent tiny or agg huge) gives w = 1, the limit of tanh;
//   * agg == 0 (the workers' contributions cancelled exactly) gives w = 0 whatever mu is.
// The header has no torch dependency and compiles as host C++ and as CUDA device code.
#pragma once

#include <cmath>

#include "gradsieve/radix_key.h"  // GRADSIEVE_HD

namespace gradsieve {

struct RegTopKWeight {
  // Weight of the entries not sent last step: tanh(|1 + q| / mu), or exactly 1 without q.
  GRADSIEVE_HD static float unsent(bool has_q, double q, double mu) {
    return has_q ? static_cast<float>(tanh(fabs(1.0 + q) / mu)) : 1.0f;
  }

  // Weight of an entry sent last step with value `sent`, where the world's average was `agg`.
  GRADSIEVE_HD static float sent(float sent_value, float agg, double world_size, double mu,
                                 float unsent_weight) {
    if (sent_value == 0.0f) return unsent_weight;
    const double ratio = static_cast<double>(agg) * world_size / static_cast<double>(sent_value);
    if (ratio != ratio) return unsent_weight;  // NaN
    return static_cast<float>(tanh(fabs(ratio) / mu));
  }
};

}  // namespace gradsieve

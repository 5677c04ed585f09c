"""RegTop-k (Bereyhi, Liang, Boudreau, Afana 2024, "Novel Gradient Sparsification Algorithm via
Bayesian Inference", arXiv 2409.14893).

Error-feedback top-k (as ``topk``: ``a = residual + grad``, the residual keeps what is not sent)
with a regularised selection. Each worker remembers, per bucket, the entries it sent last step,
the values it put on the wire there and the average every worker received there. Its posterior
distortion ``1 + Delta_j = g_agg[j] / (sent[j] / world_size)`` says how its contribution fared in
the aggregate: about 1 when the workers agreed, about 0 when the other workers cancelled it. Entries
are ranked by ``tanh(|1 + Delta_j| / mu) * |a_j|`` (``Delta = q`` for the entries not sent last
step, weight about 1), so an entry that keeps being cancelled stops crowding out the others, and
the values sent are ``a``'s, unchanged. ``mu -> 0`` is plain top-k.

Memory: ``residual`` per entry; in the bucket's ``extra`` the previous step's bucket positions
(``prev_indices``), wire values (``prev_sent``), received averages (``prev_agg``) and the bucket
layout they refer to (``prev_layout``: parameter keys, sizes and per-segment k). When DDP rebuilds a
bucket with the same parameters in another order the stored positions are moved parameter by
parameter; when the parameters differ the step falls back to plain top-k.
"""

import dataclasses
import math
import weakref
from typing import Dict, List, Tuple

import torch

from gradsieve import ops
from gradsieve.compressor import SPARSE_OPTIONS, Segment, Selection, per_segment
from gradsieve.compressors.topk import TopKCompressor
from gradsieve.options import Option
from gradsieve.registry import register_compressor

Previous = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (local indices, sent, agg)


@register_compressor("regtopk")
class RegTopKCompressor(TopKCompressor):
    """RegTop-k: error-feedback top-k ranked by the posterior-regularised score.

    Options: those of ``topk`` (``density``, ``scope``, ``compress_1d``, ``values``, ``chunk``),
    plus ``mu`` (regularisation; the paper's experiments use 1 to 5, smaller is closer to top-k)
    and ``q`` (the distortion given to entries not sent last step; the authors' code uses 1e8, for
    which their weight is exactly 1 in float32). With ``values`` other than fp32 the rounding error
    stays in the residual and the distortion is computed from the values as received.

    Example::

        >>> sim = gradsieve.Simulator("regtopk", world_size=4, density=0.01, mu=4.0)
        >>> average = sim.step([torch.randn(10_000) for _ in range(4)])
    """

    # The distortion of the next step compares with the average.
    traits = dataclasses.replace(TopKCompressor.traits, commit_needs_average=True, counters=("prev_outside",))

    OPTIONS = {
        **SPARSE_OPTIONS,
        "mu": Option(4.0, "regularisation of the score tanh(|1 + Delta| / mu) * |a|, a finite "
                     "number > 0 (-> 0: plain top-k)",
                     check=lambda v: math.isfinite(v) and v > 0.0, allowed="a finite number > 0"),
        "q": Option(1e8, "distortion Delta of the entries not sent last step (large: weight ~1), "
                    ">= 0, inf allowed", check=lambda v: v >= 0.0, allowed="a number >= 0"),
    }

    # ------------------------------------------------------------------------ one step's work
    def select(self, grad, memory, segments, layout, step):
        # The pending residual is written out of place (the memory's stays, for an undo), and
        # the gradient's finite flag comes from the same pass.
        kept = memory.entries["residual"]
        residual = torch.empty_like(kept)
        finite = torch.ones(1, dtype=torch.bool, device=grad.device)
        previous = self._previous(memory, layout, segments, grad.device)
        # Set (on the device, no host sync) where a stored position lies outside its segment: only
        # a corrupted memory (a damaged checkpoint) has one. It is scored as not sent.
        outside = torch.zeros(1, dtype=torch.int32, device=grad.device)

        def pick(number, piece, k):
            prev_i, prev_s, prev_a = previous[number]
            return ops.regtopk_select_(residual[piece], grad[piece], prev_i, prev_s, prev_a,
                                       self.mu, k, layout.world_size, self.q, bad=outside,
                                       kept=kept[piece], finite=finite)

        indices, values = per_segment(segments, pick)
        scratch = {"indices": indices, "layout": _signature(layout, segments), "prev_outside": outside,
                   "finite": finite.view(())}
        return Selection(indices, values, {"residual": residual}, scratch)

    def commit(self, memory, compressed, average, layout):
        scratch = compressed.scratch
        # Counted on the device (stats()["prev_outside"]: steps whose stored positions lay outside
        # the bucket, as only a corrupted checkpoint has), not read here: no host sync per bucket.
        before = memory.counters.get("prev_outside")
        outside = scratch["prev_outside"].reshape(()).to(torch.int64).clamp(max=1)
        memory.counters["prev_outside"] = outside if before is None else before + outside
        indices = scratch["indices"]
        memory.entries["residual"] = compressed.pending["residual"]
        memory.extra["prev_indices"] = indices
        # The distortion compares the average with what this worker actually put on the wire.
        memory.extra["prev_sent"] = scratch["wire_values"]
        memory.extra["prev_agg"] = average[indices]
        memory.extra["prev_layout"] = scratch["layout"]
        return average

    # ------------------------------------------------------------------------ last step's entries
    def _previous(self, memory, layout, segments: List[Segment], device) -> List[Previous]:
        """Last step's entries for each segment, in segment coordinates (empty: plain top-k)."""
        extra = memory.extra
        nothing = (torch.empty(0, dtype=torch.int64, device=device),
                   torch.empty(0, dtype=torch.float32, device=device),
                   torch.empty(0, dtype=torch.float32, device=device))
        if "prev_indices" not in extra:
            return [nothing] * len(segments)
        prev_i, prev_s, prev_a = extra["prev_indices"], extra["prev_sent"], extra["prev_agg"]
        stored = _listed(extra["prev_layout"])
        current = _listed(_signature(layout, segments))
        if stored == current:  # the usual case: segment s owns the s-th run of k_s entries
            out, start = [], 0
            for seg in segments:
                end = start + seg.k
                out.append((prev_i[start:end] - seg.offset, prev_s[start:end], prev_a[start:end]))
                start = end
            return out
        count = stored[0]
        old_keys, old_numels = stored[1:1 + count], stored[1 + count:1 + 2 * count]
        if sorted(zip(old_keys, old_numels)) != sorted(zip(layout.keys, layout.param_numels)):
            return [nothing] * len(segments)  # other parameters: plain top-k for this step
        # The same parameters in another order (DDP rebuilt the bucket, or a restored run starts
        # from DDP's initial order): move every stored position to its parameter's new offset.
        # Data-dependent sizes (a host sync on CUDA), but only on the step after a reorder.
        new_offset = dict(zip(layout.keys, layout.param_offsets()))
        old_offsets = [sum(old_numels[:i]) for i in range(count)]
        starts = torch.tensor(old_offsets, dtype=torch.int64, device=device)
        shift = torch.tensor([new_offset[key] - off for key, off in zip(old_keys, old_offsets)],
                             dtype=torch.int64, device=device)
        owner = torch.bucketize(prev_i, starts, right=True) - 1
        moved = prev_i + shift[owner]
        out = []
        for seg in segments:
            inside = (moved >= seg.offset) & (moved < seg.offset + seg.numel)
            out.append((moved[inside] - seg.offset, prev_s[inside], prev_a[inside]))
        return out


# The Python list each live signature tensor was made from, by id (a tensor's == is elementwise,
# so no weak-key mapping): comparing signatures reads no tensor.
_LISTS: Dict[int, Tuple["weakref.ref[torch.Tensor]", List[int]]] = {}


def _remember(signature: torch.Tensor, listed: List[int]) -> None:
    key = id(signature)
    _LISTS[key] = (weakref.ref(signature, lambda _: _LISTS.pop(key, None)), listed)


def _signature(layout, segments: List[Segment]) -> torch.Tensor:
    """What the stored positions refer to, on the CPU: [P, the P parameter keys, their P sizes,
    the k of each segment]."""
    keys = list(layout.keys)
    listed = [len(keys), *keys, *layout.param_numels, *(s.k for s in segments)]
    signature = torch.tensor(listed, dtype=torch.int64)
    _remember(signature, listed)
    return signature


def _listed(signature: torch.Tensor) -> List[int]:
    """A signature as a list: the one it was made from, or (restored from a checkpoint, once) read."""
    found = _LISTS.get(id(signature))
    if found is not None and found[0]() is signature:
        return found[1]
    listed = signature.tolist()
    _remember(signature, listed)
    return listed

"""Top-k sparsification with error feedback (local gradient accumulation).

Each worker adds its gradient to a residual, sends the ``density`` fraction of entries of largest
magnitude, and keeps the rest for later steps: nothing is lost, only delayed (Stich et al. 2018,
"Sparsified SGD with Memory", arXiv 1809.07599; Aji & Heafield 2017, arXiv 1704.05021). With int8,
fp16 or bf16 values the rounding error of the sent values stays in the residual too.

At agreed indices (``compress_at``, for an exchange that all-reduces the values at one index set
chosen for all ranks) the accumulator is the same, the values at the given indices are sent, and
the residual keeps everything else, so the error-feedback account holds as with ``compress``.
"""

import torch

from gradsieve import ops
from gradsieve.compressor import Selection, SparseCompressor, all_of, per_segment
from gradsieve.registry import register_compressor


@register_compressor("topk")
class TopKCompressor(SparseCompressor):
    """Error-feedback top-k: ``acc = residual + grad``; send top-k of ``|acc|``; keep the rest.

    Options: ``density`` (fraction sent), ``scope`` (``"bucket"`` or ``"layer"``),
    ``compress_1d``, ``values`` (``fp32``/``fp16``/``bf16``/``int8``), ``chunk`` (int8 scale
    group). Tuning: 0.001-0.01 is the usual density; ``scope="layer"`` guarantees every layer sends
    something each step, at the same total budget. At agreed indices: ``accumulate`` is
    ``residual + grad``; ``compress_at`` leaves as residual that accumulator with the sent entries
    replaced by their rounding error (``values`` fp32/fp16/bf16).

    Example::

        >>> sim = gradsieve.Simulator("topk", world_size=4, density=0.01)
        >>> average = sim.step([torch.randn(10_000) for _ in range(4)])
    """

    memory_names = ("residual",)
    agreed_indices = True

    def select(self, grad, memory, segments, layout, step):
        # The pending residual is written out of place (the memory's stays, for an undo), and
        # the gradient's finite flag comes from the same pass.
        kept = memory.entries["residual"]
        residual = torch.empty_like(kept)
        finite = []

        def pick(_, piece, k):
            values, indices, ok = ops.ef_topk_into(residual[piece], kept[piece], grad[piece], k)
            finite.append(ok)
            return values, indices

        indices, values = per_segment(segments, pick)
        return Selection(indices, values, {"residual": residual}, {"finite": all_of(finite, grad.device)})

    def _accumulate(self, grad, memory, layout, step):
        return memory.entries["residual"] + grad

    def _pending_at(self, grad, memory, layout, step, indices, accumulated, chosen, sent):
        # The residual: the accumulator with the sent values taken out, their rounding kept.
        if self.values == "fp32":
            return {"residual": accumulated.index_fill(0, indices, 0.0)}, {}
        return {"residual": accumulated.index_copy(0, indices, chosen - sent)}, {}

    def absorb_rounding(self, selection, error):
        selection.pending["residual"].index_add_(0, selection.indices, error)

    def undelivered(self, memory):
        return memory.entries["residual"]

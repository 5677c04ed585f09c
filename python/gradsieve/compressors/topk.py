"""Top-k sparsification with error feedback (local gradient accumulation).

Each worker adds its gradient to a residual, sends the ``density`` fraction of entries of largest
magnitude, and keeps the rest for later steps: nothing is lost, only delayed (Stich et al. 2018,
"Sparsified SGD with Memory", arXiv 1809.07599; Aji & Heafield 2017, arXiv 1704.05021). With int8,
fp16 or bf16 values the rounding error of the sent values stays in the residual too.
"""

from gradsieve import ops
from gradsieve.compressor import Selection, SparseCompressor, ef_select
from gradsieve.registry import register_compressor


@register_compressor("topk")
class TopKCompressor(SparseCompressor):
    """Error-feedback top-k: ``acc = residual + grad``; send top-k of ``|acc|``; keep the rest.

    Options: ``density`` (fraction sent), ``scope`` (``"bucket"`` or ``"layer"``),
    ``compress_1d``, ``values`` (``fp32``/``fp16``/``bf16``/``int8``), ``chunk`` (int8 scale
    group). Tuning: 0.001-0.01 is the usual density; ``scope="layer"`` guarantees every layer sends
    something each step, at the same total budget.

    Example::

        >>> sim = gradsieve.Simulator("topk", world_size=4, density=0.01)
        >>> average = sim.step([torch.randn(10_000) for _ in range(4)])
    """

    memory_names = ("residual",)

    def select(self, grad, memory, segments, layout, step):
        residual = memory.entries["residual"].clone()
        indices, values = ef_select(residual, grad, segments, ops)
        return Selection(indices, values, {"residual": residual}, {})

    def absorb_rounding(self, selection, error):
        selection.pending["residual"].index_add_(0, selection.indices, error)

    def undelivered(self, memory):
        return memory.entries["residual"]

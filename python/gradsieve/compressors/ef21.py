"""EF21 (Richtarik, Sokolov, Fatkhullin 2021, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback", arXiv 2106.05203).

Each worker keeps an estimate ``g_i`` of its own gradient and sends only the top-k of the change,
``c_i = topk(grad_i - g_i)``; then ``g_i += c_i``. Every rank keeps the global estimate
``g = mean(g_i)`` by adding ``mean(c_i)``, and ``g`` is what the optimizer receives. Unlike plain
error feedback it converges on heterogeneous data, where workers' gradients differ persistently.
The estimates start at zero.

At agreed indices (``compress_at``) the change ``grad_i - g_i`` is sent at the given indices, and
``g_i`` moves by the values as sent (rounded to the wire's dtype).
"""

import dataclasses

from gradsieve import ops
from gradsieve.compressor import Selection, SparseCompressor, per_segment
from gradsieve.registry import register_compressor


@register_compressor("ef21")
class EF21Compressor(SparseCompressor):
    """EF21 with a top-k compressor. Options as ``topk``.

    Example::

        >>> sim = gradsieve.Simulator("ef21", world_size=4, density=0.05)
        >>> estimate = sim.step([torch.randn(1000) for _ in range(4)])
    """

    memory_names = ("estimate", "global_estimate")
    agreed_indices = True
    # The optimizer receives the global estimate, not this step's average.
    traits = dataclasses.replace(SparseCompressor.traits, returns_average=False, commit_needs_average=True)

    def select(self, grad, memory, segments, layout, step):
        estimate = memory.entries["estimate"]
        change = grad - estimate
        indices, values = per_segment(segments, lambda _, piece, k: ops.topk_abs(change[piece], k))
        return Selection(indices, values, {"estimate": estimate.clone()}, {"indices": indices, "change": values})

    def _accumulate(self, grad, memory, layout, step):
        return grad - memory.entries["estimate"]

    def _pending_at(self, grad, memory, layout, step, indices, accumulated, chosen, sent):
        # commit moves the estimate by the change as sent, at the indices.
        return {"estimate": memory.entries["estimate"].clone()}, {"change": sent}

    def absorb_rounding(self, selection, error):
        # g_i must move by what was actually sent: subtract the part that did not survive rounding.
        selection.scratch["change"] = selection.scratch["change"] - error

    def commit(self, memory, compressed, average, layout):
        estimate = compressed.pending["estimate"]
        estimate.index_add_(0, compressed.scratch["indices"], compressed.scratch["change"])
        memory.entries["estimate"] = estimate
        global_estimate = memory.entries["global_estimate"] + average
        memory.entries["global_estimate"] = global_estimate
        return global_estimate.clone()

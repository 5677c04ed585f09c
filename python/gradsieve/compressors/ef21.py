"""EF21 (Richtarik, Sokolov, Fatkhullin 2021, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback", arXiv 2106.05203).

Each worker keeps an estimate ``g_i`` of its own gradient and sends only the top-k of the change,
``c_i = topk(grad_i - g_i)``; then ``g_i += c_i``. Every rank keeps the global estimate
``g = mean(g_i)`` by adding ``mean(c_i)``, and ``g`` is what the optimizer receives. Unlike plain
error feedback it converges on heterogeneous data, where workers' gradients differ persistently.
The estimates start at zero.

With ``momentum`` > 0 it is EF21-SGDM (Fatkhullin, Tyurin, Richtarik 2023, "Momentum Provably
Improves Error Feedback!", arXiv 2305.15155): each worker keeps a momentum ``v_i = momentum * v_i +
grad_i`` (heavy-ball form, as ``torch.optim.SGD``) and sends ``topk(v_i - g_i)`` instead of
``topk(grad_i - g_i)``. Plain EF21 with stochastic gradients tracks each minibatch's noise with only
k entries a step, so at small densities the estimate stays far from the gradient (relative error
about 0.8 at density 0.001 on digits) and stale entries are applied step after step; the momentum
averages the noise out before it is compressed. Use it with a momentum-free optimizer (the
training CLI passes SGD's momentum here, as for dgc). ``momentum=0`` is plain EF21.

At agreed indices (``compress_at``) the change ``grad_i - g_i`` is sent at the given indices, and
``g_i`` moves by the values as sent (rounded to the wire's dtype).
"""

import dataclasses

from gradsieve import ops
from gradsieve.compressor import SPARSE_OPTIONS, Selection, SparseCompressor, all_of, per_segment
from gradsieve.options import Option
from gradsieve.registry import register_compressor
from gradsieve.signals import OptimizerSet, warn_if_momentum_twice


@register_compressor("ef21")
class EF21Compressor(SparseCompressor):
    """EF21 with a top-k compressor. Options as ``topk``, and ``momentum`` (EF21-SGDM).

    Example::

        >>> sim = gradsieve.Simulator("ef21", world_size=4, density=0.05)
        >>> estimate = sim.step([torch.randn(1000) for _ in range(4)])
    """

    OPTIONS = {
        **SPARSE_OPTIONS,
        "momentum": Option(0.0, "EF21-SGDM: momentum of the gradient before compression, in [0, 1) "
                           "(0: plain EF21); use a momentum-free optimizer",
                           check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)"),
    }
    memory_names = ("estimate", "global_estimate")
    agreed_indices = True
    # The optimizer receives the global estimate, not this step's average; with momentum, the
    # optimizer is checked for a momentum of its own.
    traits = dataclasses.replace(SparseCompressor.traits, returns_average=False, commit_needs_average=True,
                                 signals=frozenset({OptimizerSet}))

    def __init__(self, **options):
        super().__init__(**options)
        if self.momentum:
            self.memory_names = self.memory_names + ("momentum",)

    def observe(self, signal):
        if isinstance(signal, OptimizerSet) and self.momentum:
            warn_if_momentum_twice("ef21", "EF21-SGDM", signal.optimizer)

    def _tracked(self, grad, memory):
        """What the estimate tracks: the gradient, or with ``momentum`` the new momentum (a new
        tensor, committed with the step)."""
        if not self.momentum:
            return grad, {}
        velocity = memory.entries["momentum"] * self.momentum + grad
        return velocity, {"momentum": velocity}

    def select(self, grad, memory, segments, layout, step):
        # The top-k of the change grad - estimate, segment by segment, in one fused op (no buffer
        # for the change on the CPU) that also says whether the gradient is finite. The pending
        # estimate is the memory's own tensor, unchanged: commit writes the moved estimate to a
        # new tensor (ef21_commit), so nothing needs a copy here.
        estimate = memory.entries["estimate"]
        tracked, pending = self._tracked(grad, memory)
        flags = []

        def pick(_, piece, k):
            values, indices, finite = ops.ef21_topk(tracked[piece], estimate[piece], k)
            flags.append(finite)
            return values, indices

        indices, values = per_segment(segments, pick)
        scratch = {"indices": indices, "change": values, "finite": all_of(flags, grad.device)}
        pending["estimate"] = estimate
        return Selection(indices, values, pending, scratch)

    def _accumulate(self, grad, memory, layout, step):
        return self._tracked(grad, memory)[0] - memory.entries["estimate"]

    def _pending_at(self, grad, memory, layout, step, indices, accumulated, chosen, sent):
        # commit moves the estimate by the change as sent, at the indices (into a new tensor).
        pending = {"estimate": memory.entries["estimate"]}
        if self.momentum:
            pending["momentum"] = self._tracked(grad, memory)[0]
        return pending, {"change": sent}

    def absorb_rounding(self, selection, error):
        # g_i must move by what was actually sent: subtract the part that did not survive rounding.
        selection.scratch["change"] = selection.scratch["change"] - error

    def commit(self, memory, compressed, average, layout):
        # One pass: estimate + change at the indices, global estimate + average, and the copy of
        # the latter that the optimizer receives; all three are new tensors (rollback-safe).
        estimate, global_estimate, result = ops.ef21_commit(
            compressed.pending["estimate"], compressed.scratch["indices"], compressed.scratch["change"],
            memory.entries["global_estimate"], average)
        memory.entries["estimate"] = estimate
        if "momentum" in compressed.pending:
            memory.entries["momentum"] = compressed.pending["momentum"]
        memory.entries["global_estimate"] = global_estimate
        return result

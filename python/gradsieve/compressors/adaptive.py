"""Adaptive sparsity with momentum-based int8 quantization.

Per segment (the bucket, or each parameter with ``scope="layer"``) and worker, every step::

    a   = grad + residual                       # residual: see error_feedback and capacity
    MA  = alpha * |a| + (1 - alpha) * MA        # moving average of |grad|, per entry
    thr = quantile(|MA|, 1 - density)           # the original Percentile(MA, SparsityTarget)
    m   = a where (|a| if compare == "grad" else MA) >= thr, else 0
    Q   = beta * m + (1 - beta) * QM            # quantization momentum
    send the entries with Q != 0 (at most `capacity` of them: the largest |Q|), int8 values
    QM  = Q as the receivers decoded it (0 where nothing was sent)

What the original rule leaves open, and what is done here:

* The literal rule (``capacity=1.0, error_feedback=False``) sends every entry with ``Q != 0``. The
  blend keeps an entry alive for many steps after it was last above the threshold (its value
  decays by ``1 - beta`` per step and in float never reaches 0; int8 rounding is what eventually
  zeroes it), so the wire carries several times ``density`` entries. One all-gather needs payloads
  of the same size on every rank, so the payload has room for ``capacity * numel`` entries and
  says in its header how many it holds; the bytes reported are the bytes moved, padding included.
* ``capacity`` < 1 caps the entries sent: the largest ``|Q|`` win and the rest are carried, as
  ``Q / beta``, in a residual added to the next gradient (``Q`` holds ``beta`` of the fresh
  gradient, so ``Q / beta`` is the gradient mass it stands for).
* ``error_feedback=True`` also keeps the masked-out part ``a - m`` and the int8 rounding in that
  residual. Then ``sum(sent) + residual + (1 - beta) / beta * QM == sum(grad)`` holds exactly (up
  to float rounding): nothing is lost, only delayed, as in ``topk``.
* The default is ``beta = 1.0`` (no quantization momentum), not the originally proposed
  ``beta = 0.7``; docs/compressors.md has the measurements. Its capacity equals the density:
  without the momentum tail about ``density`` entries pass the threshold, so a larger capacity
  would mostly be padding. When more than the capacity pass the threshold, the cap keeps the
  largest: the default then selects what ``topk`` selects. ``beta=0.7`` gives the original rule.
* Momentum and the optimizer: with ``beta < 1``, ``Q`` is an exponential moving average of the
  masked gradient with weight ``beta`` (a heavy-ball momentum of ``1 - beta`` whose gain is 1),
  applied before the optimizer's own. With Adam or AdamW it delays and smooths the gradient Adam
  sees: Adam's first moment (0.9) dominates the smoothing, and its second moment is computed from
  already-smoothed values, so its step sizes come out slightly larger; with SGD and momentum 0.9
  the two momenta stack.

Memory per entry: ``average`` (MA), ``momentum`` (QM), ``residual``; counters in the bucket's
``counters``: ``wanted`` (entries with Q != 0, summed over steps) and ``sent``.
"""

import dataclasses
import math
from typing import List, Tuple

import torch

from gradsieve import ops
from gradsieve.compressor import SPARSE_OPTIONS, Segment, Selection, SparseCompressor, entries_for
from gradsieve.options import Option
from gradsieve.registry import register_compressor


@register_compressor("adaptive")
class AdaptiveCompressor(SparseCompressor):
    """Adaptive threshold: per-entry moving-average threshold, momentum blend, int8 values.

    Options: ``density`` (1 - the original SparsityTarget), ``alpha`` (weight of the new |grad| in
    the moving average), ``beta`` (weight of the masked gradient in the momentum blend; default 1.0,
    no momentum; the originally proposed 0.7 is ``beta=0.7``), ``compare`` (``"grad"``: |a|
    against the threshold, as the original rule; ``"average"``: the moving average against it),
    ``error_feedback``, ``capacity`` (most entries sent per segment and step, as a fraction; 0
    means ``density`` with ``beta=1`` and ``2 * density`` otherwise; ``capacity=1.0,
    error_feedback=False, beta=0.7`` is the literal original rule), and those of ``topk``
    (``scope``, ``compress_1d``, ``values`` (default ``int8``), ``chunk``, ``index``).

    Example::

        >>> sim = gradsieve.Simulator("adaptive", world_size=4, density=0.01)
        >>> average = sim.step([torch.randn(10_000) for _ in range(4)])
    """

    OPTIONS = {
        **SPARSE_OPTIONS,
        "values": Option("int8", SPARSE_OPTIONS["values"].doc, kind=str,
                         choices=SPARSE_OPTIONS["values"].choices),
        "alpha": Option(0.9, "weight of the new |grad| in the moving average, in [0, 1]",
                        check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
        "beta": Option(1.0, "weight of the masked gradient in the momentum blend, in (0, 1]; 1: no "
                       "momentum (the default), the originally proposed value is 0.7",
                       check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]"),
        "compare": Option("grad", "what is compared with the threshold: |grad| (the original "
                          "rule) or its moving average", kind=str, choices=("grad", "average")),
        "error_feedback": Option(True, "keep what was not sent (masked-out gradient, int8 rounding) "
                                 "in a residual added to the next gradient", kind=bool),
        "capacity": Option(0.0, "most entries one rank sends per segment and step, as a fraction of "
                           "the segment, in [0, 1]; 0: density when beta is 1, else 2 * density",
                           check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
    }
    memory_names = ("average", "momentum", "residual")
    traits = dataclasses.replace(SparseCompressor.traits, counters=("wanted", "sent"),
                                 reports=(("sent", "entries_sent"), ("wanted", "entries_wanted")))

    def capacity_fraction(self) -> float:
        """``capacity``, or when it is 0: ``density`` without momentum (``beta=1``; what passes the
        threshold is about ``density``), ``2 * density`` with it (room for the momentum tail)."""
        if self.capacity > 0:
            return self.capacity
        return self.density if self.beta == 1.0 else min(1.0, 2.0 * self.density)

    def segments(self, layout, step) -> List[Segment]:
        """The pieces of :meth:`SparseCompressor.segments`, each with ``k`` = its capacity."""
        fraction = self.capacity_fraction()
        return [Segment(s.offset, s.numel, s.numel if s.k == s.numel else
                        max(1, entries_for(fraction, s.numel)) if s.numel else 0)
                for s in self._pieces(layout, step)]

    def _pieces(self, layout, step) -> List[Segment]:
        return SparseCompressor.segments(self, layout, step)

    def _quantiles(self, layout, step) -> List[float]:
        # Pieces sent dense (compress_1d=False, or density 1) pass everything: threshold quantile 0.
        return [0.0 if s.k == s.numel else 1.0 - self.density for s in self._pieces(layout, step)]

    def select(self, grad, memory, segments, layout, step):
        entries = memory.entries
        average, residual = torch.empty_like(grad), torch.empty_like(grad)
        parts_i, parts_v, parts_ok = [], [], []
        wanted = torch.zeros((), dtype=torch.int64, device=grad.device)
        for seg, q in zip(segments, self._quantiles(layout, step)):
            piece = slice(seg.offset, seg.offset + seg.numel)
            avg, res, values, indices, count, _ = ops.adaptive_select(
                grad[piece], entries["average"][piece], entries["momentum"][piece],
                entries["residual"][piece], self.alpha, self.beta, q, self.compare == "average",
                self.error_feedback, seg.k)
            average[piece] = avg
            residual[piece] = res
            parts_i.append(indices + seg.offset if seg.offset else indices)
            parts_v.append(values)
            parts_ok.append(torch.arange(seg.k, device=grad.device) < count)
            wanted = wanted + count
        cat = (lambda parts: parts[0]) if len(parts_i) == 1 else torch.cat
        indices, values, valid = cat(parts_i), cat(parts_v), cat(parts_ok)
        return Selection(indices, values, {"average": average, "residual": residual},
                         {"indices": indices, "valid": valid, "wanted": wanted})

    def commit(self, memory, compressed, average, layout):
        pending, scratch = compressed.pending, compressed.scratch
        indices, valid, sent = scratch["indices"], scratch["valid"], scratch["wire_values"]
        residual = pending["residual"]
        if self.error_feedback:
            # What was sent leaves the residual; the int8 rounding (Q - sent) stays, over beta.
            residual.index_add_(0, indices, torch.where(valid, -(sent / self.beta), 0.0))
        else:
            # Without error feedback the residual only carries entries the capacity held back.
            residual.index_add_(0, indices, torch.where(valid, -residual[indices], 0.0))
        momentum = torch.zeros_like(residual).index_add_(0, indices, sent)
        memory.entries["average"] = pending["average"]
        memory.entries["momentum"] = momentum
        memory.entries["residual"] = residual
        counters = memory.counters
        zero = torch.zeros((), dtype=torch.int64, device=residual.device)
        counters["wanted"] = counters.get("wanted", zero) + scratch["wanted"]
        counters["sent"] = counters.get("sent", zero) + valid.sum()
        return average

    def undelivered(self, memory):
        if not self.error_feedback:
            return None
        entries = memory.entries
        return entries["residual"] + in_flight(self.beta) * entries["momentum"]


def in_flight(beta: float) -> float:
    """Weight of the momentum memory in the error-feedback invariant
    ``sum(sent) + residual + in_flight(beta) * momentum == sum(grad)``."""
    return (1.0 - beta) / beta if beta > 0 and math.isfinite(beta) else float("nan")


__all__: Tuple[str, ...] = ("AdaptiveCompressor", "in_flight")

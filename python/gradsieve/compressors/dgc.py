"""Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, ICLR 2018, arXiv 1712.01887).

Per worker and bucket:

* local gradient clipping (``clip_norm`` set): the gradient is scaled down to norm at most
  ``clip_norm / sqrt(world_size)`` before it is accumulated (per bucket here, since the hook sees
  one bucket at a time);
* momentum correction: ``u = momentum * u + g; v = v + u``; the entries sent are taken from ``v``,
  so the momentum of the entries that wait is not lost;
* momentum factor masking: where an entry is sent, both ``u`` and ``v`` are zeroed, so stale
  momentum does not push it again;
* density warm-up: the density follows 0.25, 0.0625, 0.015625, 0.004 (never below the target)
  over ``density_warmup_steps`` steps in four equal stages, then the target;
* sampled threshold (``sample_fraction`` > 0): the threshold is the top-density quantile of
  ``|v|`` on a random sample of about 1% of the entries; ``threshold_select`` takes what passes,
  falls back to the exact top-k of those when too many pass, and the threshold factor is lowered
  (on the device, no host sync) for the next step when too few passed. With ``sample_fraction=0``
  selection is exact top-k.

At agreed indices (``compress_at``, for an exchange that all-reduces the values at one index set
chosen for all ranks) clipping and momentum correction apply as above, the values of ``v`` at the
given indices are sent, and ``u`` and ``v`` are zeroed there (``v`` keeps the wire's rounding
error); the sampled threshold and the warm-up select nothing (the caller chooses the set, and may
size it by ``density_at``, which follows the warm-up).

Momentum lives in the compressor: use it with a momentum-free optimizer (plain SGD), or the
gradient gets momentum twice; given the optimizer (``state.watch_optimizer``) it warns about that.
"""

import dataclasses
import math

import torch

from gradsieve import ops
from gradsieve.compressor import SPARSE_OPTIONS, Selection, SparseCompressor, entries_for
from gradsieve.options import Option
from gradsieve.signals import OptimizerSet, warn_if_momentum_twice
from gradsieve.registry import register_compressor

WARMUP_DENSITIES = (0.25, 0.0625, 0.015625, 0.004)


@register_compressor("dgc")
class DGCCompressor(SparseCompressor):
    """DGC: top-k with momentum correction, factor masking, clipping, warm-up, sampled threshold.

    Example::

        >>> sim = gradsieve.Simulator("dgc", world_size=4, density=0.01, momentum=0.9)
        >>> update = sim.step([torch.randn(100_000) for _ in range(4)])
    """

    OPTIONS = {
        **SPARSE_OPTIONS,
        "momentum": Option(0.9, "momentum factor of the correction, in [0, 1)",
                           check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)"),
        "clip_norm": Option(0.0, "local gradient clipping threshold (0: off), >= 0",
                            check=lambda v: v >= 0.0 and math.isfinite(v), allowed="a finite number >= 0"),
        "density_warmup_steps": Option(0, "steps of exponential density warm-up (0: off)", kind=int,
                                       check=lambda v: v >= 0, allowed="an integer >= 0"),
        "sample_fraction": Option(0.01, "fraction of entries sampled for the threshold (0: exact top-k)",
                                  check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
        "seed": Option(0, "seed of the threshold sampling", kind=int),
    }
    memory_names = ("momentum_u", "velocity_v")
    agreed_indices = True
    # threshold_select pads each segment (padding inside the entries: the wire sorts them out);
    # the optimizer is checked for a momentum of its own.
    traits = dataclasses.replace(SparseCompressor.traits, ascending=False, signals=frozenset({OptimizerSet}))

    def density_at(self, step: int) -> float:
        if self.density_warmup_steps and step < self.density_warmup_steps:
            stage = min(3, step * 4 // self.density_warmup_steps)
            return max(self.density, WARMUP_DENSITIES[stage])
        return self.density

    def observe(self, signal):
        if isinstance(signal, OptimizerSet):
            self._check_optimizer(signal.optimizer)

    def _check_optimizer(self, optimizer):
        if self.momentum:
            warn_if_momentum_twice("dgc", "momentum correction", optimizer)

    def _sample_plan(self, layout, seg, device):
        """Where the threshold sample of one segment is drawn: for each parameter in the segment,
        in key order (so that the sample does not depend on DDP's bucket order), its offset and
        size, repeated once per sample drawn from it. Cached per layout and segment."""
        cache = self.__dict__.setdefault("_plans", {})
        key = (layout, seg, str(device))
        plan = cache.get(key)
        if plan is None:
            end = seg.offset + seg.numel
            inside = [(k, o - seg.offset, n) for k, o, n in zip(layout.keys, layout.param_offsets(),
                                                                  layout.param_numels)
                      if seg.offset <= o < end]
            inside.sort()
            target = min(seg.numel, max(seg.k * 4, entries_for(self.sample_fraction, seg.numel), 256))
            counts = [max(1, -(-target * n // seg.numel)) for _, _, n in inside]
            base = torch.tensor([o for (_, o, _), c in zip(inside, counts) for _ in range(c)], device=device)
            span = torch.tensor([n for (_, _, n), c in zip(inside, counts) for _ in range(c)], device=device)
            plan = cache[key] = (base, span, inside[0][0])
            if len(cache) > 256:
                cache.pop(next(iter(cache)))
        return plan

    def _threshold(self, v, seg, factor, layout, step):
        base, span, first_key = self._sample_plan(layout, seg, v.device)
        gen = torch.Generator(device=v.device)
        gen.manual_seed((self.seed * 1_000_003 + step * 7_919 + first_key * 104_729) % (2**63))
        u = torch.rand(base.numel(), generator=gen, device=v.device, dtype=torch.float64)
        picks = base + torch.minimum((u * span).long(), span - 1)
        return ops.quantile_abs(v[picks], max(0.0, 1.0 - seg.k / seg.numel)) * factor

    def _factor_slots(self, layout, segments):
        """The threshold factor is kept per parameter in key order (bucket order may change);
        a segment uses the slot of its smallest key."""
        order = {k: i for i, k in enumerate(sorted(layout.keys))}
        offsets = layout.param_offsets()
        slots = []
        for seg in segments:
            keys = [k for k, o in zip(layout.keys, offsets) if seg.offset <= o < seg.offset + seg.numel]
            slots.append(order[min(keys)])
        return slots

    def _momentum(self, grad, memory, layout):
        """``u = momentum * u + g`` (a new tensor), ``g`` the gradient after local clipping."""
        g = grad
        if self.clip_norm > 0:
            limit = self.clip_norm / math.sqrt(layout.world_size)
            g = grad * torch.clamp(limit / (torch.linalg.vector_norm(grad) + 1e-12), max=1.0)
        return memory.entries["momentum_u"] * self.momentum + g

    def _accumulate(self, grad, memory, layout, step):
        return memory.entries["velocity_v"] + self._momentum(grad, memory, layout)

    def _pending_at(self, grad, memory, layout, step, indices, accumulated, chosen, sent):
        # Momentum factor masking at the indices, by the same product with a 0/1 mask as select
        # (so a negative entry becomes -0.0 alike); v keeps the wire's rounding there. The
        # threshold factor is not used, so it stays as it is.
        keep = torch.ones_like(accumulated).index_fill_(0, indices, 0.0)
        u = self._momentum(grad, memory, layout) * keep
        v = accumulated * keep
        if self.values != "fp32":
            v.index_add_(0, indices, chosen - sent)
        return {"momentum_u": u, "velocity_v": v}, {}

    def _momentum_velocity(self, grad, memory, layout):
        """``u`` (as :meth:`_momentum`), ``v = velocity_v + u`` and whether the gradient is finite
        (None: not looked at), in one fused pass (clipping's factor aside)."""
        if self.clip_norm > 0 and grad.dtype != torch.float32:
            # grad * factor rounds to grad's own dtype here; the fused op computes in float32.
            u = self._momentum(grad, memory, layout)
            return u, memory.entries["velocity_v"] + u, None
        scale = None
        if self.clip_norm > 0:
            limit = self.clip_norm / math.sqrt(layout.world_size)
            scale = torch.clamp(limit / (torch.linalg.vector_norm(grad) + 1e-12), max=1.0)
        return ops.dgc_accumulate(grad, memory.entries["momentum_u"], memory.entries["velocity_v"],
                                  self.momentum, scale)

    def select(self, grad, memory, segments, layout, step):
        u, v, finite = self._momentum_velocity(grad, memory, layout)
        factor = memory.extra.get("threshold_factor")
        if factor is None or factor.numel() != len(layout.param_numels):
            factor = torch.ones(len(layout.param_numels), device=grad.device)
        new_factor = factor.clone()
        slots = self._factor_slots(layout, segments)
        parts_i, parts_v = [], []
        for seg, slot in zip(segments, slots):
            piece = v[seg.offset:seg.offset + seg.numel]
            if seg.k == seg.numel or self.sample_fraction == 0.0:
                values, indices = ops.topk_abs(piece, seg.k)
            else:
                threshold = self._threshold(piece, seg, factor[slot], layout, step)
                values, indices, count = ops.threshold_select(piece, threshold, seg.k)
                # Padding slots (index 0, value 0) are marked -1 so they neither land on the wire
                # as a real entry nor clear entry 0's momentum below.
                valid = torch.arange(seg.k, device=grad.device) < count
                values = torch.where(valid, values, torch.zeros_like(values))
                indices = torch.where(valid, indices, torch.full_like(indices, -1))
                too_few = count < seg.k
                new_factor[slot] = torch.where(too_few, factor[slot] * 0.7,
                                               torch.clamp(factor[slot] * 1.05, max=1.0))
            parts_i.append(torch.where(indices >= 0, indices + seg.offset, indices))
            parts_v.append(values)
        indices, values = torch.cat(parts_i), torch.cat(parts_v)
        sent = indices >= 0
        safe = torch.where(sent, indices, torch.zeros_like(indices))
        # Momentum factor masking: u and v become x * 0 where an entry was sent (padding slots,
        # which point at entry 0, are skipped), in place: both are this step's own new tensors.
        ops.dgc_mask_(u, v, safe, sent)
        scratch = {"valid": sent}
        if finite is not None:
            scratch["finite"] = finite
        return Selection(safe, values, {"momentum_u": u, "velocity_v": v, "threshold_factor": new_factor},
                         scratch)

    def absorb_rounding(self, selection, error):
        selection.pending["velocity_v"].index_add_(0, selection.indices,
                                                   torch.where(selection.scratch["valid"], error, 0.0))

    def undelivered(self, memory):
        # Without momentum or clipping, v is plain error feedback: what waits to be sent.
        if self.momentum == 0.0 and self.clip_norm == 0.0:
            return memory.entries["velocity_v"]
        return None

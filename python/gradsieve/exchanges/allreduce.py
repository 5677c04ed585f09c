"""The agreed-index all-reduce exchange: cross-node traffic that does not grow with the number of
ranks.

For each bucket and step all ranks agree on one set of k indices (k from the compressor's density),
each rank takes its values at those indices from what it would select from (the compressor's
``accumulate``: for ``topk`` its residual plus the gradient; see
:meth:`~gradsieve.compressor.SparseCompressor.compress_at`), and the values are summed with an
ordinary all-reduce (ring or tree, as the backend chooses) in the wire dtype of the compressor's
``values`` option (fp32, fp16 or bf16; int8 is refused: per-rank scales do not add up). No index
crosses the wire with the values; error feedback keeps everything outside the set. One more entry
in the all-reduce carries each rank's finiteness (0, or infinity when its gradient was not finite
anywhere), so a non-finite gradient outside the set skips the step too.

How the set is chosen (``select``):

* ``"leader"``: a leader (rotating with the step) takes the top-k of its own
  accumulator and broadcasts the k indices (CLT-k, ScaleCom);
* ``"previous"``: the top-k of the previous step's average of this bucket, which every rank has
  (nothing to broadcast); the first step, with no previous average, asks the leader;
* ``"mix"``: ``k - ceil(share * k)`` indices from the previous average and the rest from the
  leader's accumulator outside those.

Per node the all-reduce moves about ``2 (P - 1) / P * (k + 1) * b`` bytes each way (b bytes per
value) and the leader's broadcast about ``4 k`` more (int32 indices), whatever the number of ranks P.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from gradsieve import ops
from gradsieve.compressor import Aggregated, BucketLayout, Compressed, Compressor, entries_for
from gradsieve.exchange import Collective, Exchange, Phase, Round, register_exchange
from gradsieve.memory import BucketMemory

__all__ = ["AllReduceExchange"]

SELECTS = ("leader", "previous", "mix")


class AllReduceRound(Round):
    """One bucket on one rank: agree on the indices, all-reduce the values there."""

    def __init__(self, exchange: "AllReduceExchange", buffer: torch.Tensor, layout: BucketLayout,
                 members: Tuple[int, ...], rank: int) -> None:
        super().__init__(buffer, layout, members, rank)
        self.exchange = exchange
        self.key = (layout.index, members)
        self.indices: Optional[torch.Tensor] = None
        self.index_ok: Optional[torch.Tensor] = None
        self.next: Optional[torch.Tensor] = None

    def compress(self, compressor: Compressor, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout,
                 step: int) -> Phase:
        exchange = self.exchange
        numel = layout.numel
        k = entries_for(compressor.density_at(step), numel)
        previous = exchange.previous.get(self.key)
        if previous is not None:
            previous = previous.to(grad.device)
        if previous is not None and previous.numel() != k:
            previous = None  # the density changed (dgc's warm-up): the previous set is no guide
        select = exchange.select
        from_previous = 0 if previous is None else (k if select == "previous" else
                                                     k - math.ceil(exchange.share * k) if select == "mix" else 0)
        if previous is None:
            kept = torch.zeros(0, dtype=torch.int64, device=grad.device)
        else:
            kept = _top_of(previous, exchange.previous_values[self.key].to(grad.device), from_previous)
        accumulated = None
        wanted = k - kept.numel()
        if wanted > 0:
            leader = step % len(self.members)
            me = self.members.index(self.rank)
            chosen = torch.empty(wanted, dtype=torch.int32, device=grad.device)
            if me == leader:
                accumulated = compressor.accumulate(grad, memory, layout, step)
                if kept.numel():  # the leader's top entries outside the kept ones
                    candidates = _outside(kept, numel)
                    chosen = candidates[ops.topk_abs(accumulated[candidates], wanted)[1]].to(torch.int32)
                else:
                    chosen = ops.topk_abs(accumulated, wanted)[1].to(torch.int32)
            chosen = yield Collective("broadcast", self.members, chosen, src=leader)
            self.index_bytes = chosen.numel() * chosen.element_size()
            chosen = chosen.long()
            indices = torch.cat([kept, chosen]).sort().values if kept.numel() else chosen
        else:
            indices = kept
        # A broadcast set that is not k distinct in-range indices in ascending order is malformed.
        self.index_ok = ((indices >= 0) & (indices < numel)).all() & (indices[1:] > indices[:-1]).all()
        indices = torch.where(self.index_ok, indices, torch.arange(indices.numel(), device=indices.device) % max(1, numel))
        self.indices = indices
        compressed = compressor.compress_at(grad, memory, layout, step, indices, accumulated)
        flag = torch.where(compressed.scratch["finite"], 0.0, float("inf")).to(compressed.payload.dtype)
        payload = torch.cat([compressed.payload, flag.reshape(1)])
        return Compressed(payload, compressed.pending, compressed.scratch)

    def send(self, compressed: Compressed) -> Collective:
        return Collective("all_reduce", self.members, compressed.payload)

    def aggregate(self, compressor: Compressor, received: torch.Tensor, layout: BucketLayout,
                  step: int, out: Optional[torch.Tensor] = None) -> Aggregated:
        world = len(self.members)
        total = received.float()
        values, flag = total[:-1], total[-1]
        average = torch.zeros(layout.numel, dtype=torch.float32, device=received.device)
        average.index_put_((self.indices,), values / world)
        finite = (torch.isfinite(values).all() & torch.isfinite(flag)).expand(world)
        well_formed = self.index_ok.expand(world)
        self.next = average
        return Aggregated(average, finite, well_formed)

    def settled(self, kept: bool) -> None:
        if kept and self.next is not None and self.indices is not None:
            self.exchange.previous[self.key] = self.indices
            self.exchange.previous_values[self.key] = self.next[self.indices].abs()


def _outside(kept: torch.Tensor, numel: int) -> torch.Tensor:
    """The positions in ``[0, numel)`` that are not in ``kept`` (distinct, in range), ascending,
    with no host synchronisation (their number, ``numel - kept.numel()``, is known)."""
    outside = torch.ones(numel, dtype=torch.bool, device=kept.device)
    outside[kept] = False
    count = numel - kept.numel()
    # Each outside position goes to its rank among them; the kept ones to a spare last slot.
    slot = torch.where(outside, torch.cumsum(outside, 0) - 1, count)
    found = torch.empty(count + 1, dtype=torch.int64, device=kept.device)
    found.scatter_(0, slot, torch.arange(numel, device=kept.device))
    return found[:count]


def _top_of(indices: torch.Tensor, magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` of ``indices`` whose ``magnitudes`` are largest, ascending."""
    if count >= indices.numel():
        return indices
    _, at = ops.topk_abs(magnitudes, count)
    return indices[at]


@register_exchange("allreduce")
class AllReduceExchange(Exchange):
    """All ranks agree on one index set per bucket and step and all-reduce the values there (see
    the module's docstring).

    Args:
        process_group: the group to exchange in (default: the whole world).
        select: how the index set is chosen: ``"leader"``, ``"previous"`` or ``"mix"``.
        share: ``"mix"``: the fraction of the set the leader chooses, in (0, 1).

    Works with compressors that can send at given indices (``topk``, ``dgc``, ``ef21``).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, select: str = "leader",
                 share: float = 0.5, simulated_world: Optional[int] = None) -> None:
        super().__init__(process_group, simulated_world)
        if select not in SELECTS:
            raise ValueError(f"allreduce exchange: select must be one of {', '.join(SELECTS)}, got {select!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
            raise ValueError(f"allreduce exchange: share must be a number in (0, 1), got {share!r}")
        self.select = select
        self.share = float(share)
        self.options = {"select": select, "share": self.share}
        # Per (bucket, members): the last kept step's index set and its averages' magnitudes.
        self.previous: Dict[Any, torch.Tensor] = {}
        self.previous_values: Dict[Any, torch.Tensor] = {}

    def accepts(self, compressor: Compressor) -> None:
        if compressor.traits.dense:
            return
        if not getattr(compressor, "agreed_indices", False):
            raise ValueError(f"the allreduce exchange needs a compressor that can send at indices the ranks agree "
                             f"on (topk, dgc, ef21); {compressor.name!r} chooses its own")
        compressor.check_agreed_indices()

    def round_among(self, buffer: torch.Tensor, layout: BucketLayout, members: Tuple[int, ...], rank: int) -> Round:
        return AllReduceRound(self, buffer, layout, members, rank)

    def config(self) -> Dict[str, Any]:
        return {"exchange": self.name, "select": self.select, "share": self.share}

    def state_dict(self) -> Dict[str, Any]:
        return {"previous": {key: t.cpu() for key, t in self.previous.items()},
                "previous_values": {key: t.cpu() for key, t in self.previous_values.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.previous = dict(state.get("previous", {}))
        self.previous_values = dict(state.get("previous_values", {}))

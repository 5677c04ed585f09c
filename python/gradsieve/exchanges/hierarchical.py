"""The hierarchical exchange: dense inside a node, compressed across nodes.

For each bucket of n entries on a node of L ranks:

1. inside the node, an all-to-all hands local rank j every local rank's slice j of the bucket
   (slices of ``n // L`` or ``n // L + 1`` entries, the first ``n % L`` one longer); rank j adds
   them in local-rank order and divides by L: its shard of the node's average (the traffic of a
   reduce-scatter, with a summation order that does not depend on the library);
2. local rank j compresses its shard with its own memory (error feedback per shard: its residual
   is the shard's entries only);
3. the ranks with local index j, one per node, exchange their payloads (the cross-node step: an
   all-gather by default, or an agreed-index all-reduce with ``cross="allreduce"``) and decode the
   average of the N nodes' shards, which is the shard of the average of all ranks;
4. inside the node, an all-gather of the shards (each with a flag saying whether it was usable)
   rebuilds the bucket on every local rank; when any shard was not usable the whole step is
   skipped on every rank.

A bucket of fewer than L entries is exchanged whole among all ranks by the cross-node exchange.

Per node, the cross-node step moves about ``(N - 1) * payload`` bytes each way for the whole
bucket (L shards of payload / L each), where the flat all-gather moves ``(N L - 1) * payload``;
a rank's compressor memory covers n / L entries.

What a compressor sees: a bucket of the shard's entries whose parameters are the pieces of the
bucket's parameters that fall in the shard (a parameter cut by a shard boundary is two pieces,
each with a key of its own, :func:`gradsieve.compressor.piece_key`: ``scope="layer"`` selects per
piece), ``world_size`` N. Its counters and statistics count this rank's shard. Memory kept per
parameter is kept per piece (predictive's predictors), except what is measured per parameter
(granular's curvature), which a piece reads from its parameter.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from gradsieve.compressor import Aggregated, BucketLayout, Compressed, Compressor, piece_key
from gradsieve.exchange import (Collective, Exchange, Phase, Round, Topology, get_exchange, register_exchange)
from gradsieve.memory import BucketMemory

__all__ = ["HierarchicalExchange", "shard_sizes", "shard_layout"]


def shard_sizes(numel: int, parts: int) -> Tuple[int, ...]:
    """The sizes of ``parts`` contiguous shards of ``numel`` entries: the first ``numel % parts``
    one entry longer than the rest."""
    base, extra = divmod(numel, parts)
    return tuple(base + (1 if j < extra else 0) for j in range(parts))


def shard_layout(layout: BucketLayout, lo: int, hi: int, world_size: int) -> BucketLayout:
    """The layout of entries ``[lo, hi)`` of a bucket: the pieces of its parameters in that range.
    A parameter wholly inside keeps its key; a piece of one gets :func:`piece_key`."""
    numels: List[int] = []
    ndims: List[int] = []
    keys: List[int] = []
    for key, offset, numel, ndim in zip(layout.keys, layout.param_offsets(), layout.param_numels,
                                        layout.param_ndims):
        start, stop = max(lo, offset), min(hi, offset + numel)
        if start >= stop and not (numel == 0 and lo <= offset < hi):
            continue
        numels.append(stop - start if stop > start else 0)
        ndims.append(ndim)
        keys.append(key if (start == offset and stop == offset + numel) else piece_key(key, start - offset))
    return BucketLayout(hi - lo, tuple(numels), tuple(ndims), world_size, layout.index, tuple(keys))


class HierarchicalRound(Round):
    """One bucket on one rank: the node's all-to-all, the cross-node round of the shard (an inner
    exchange's round), the node's all-gather."""

    def __init__(self, exchange: "HierarchicalExchange", buffer: torch.Tensor, layout: BucketLayout,
                 rank: int) -> None:
        topology = exchange.topology
        super().__init__(buffer, layout, topology.cross_ranks(rank), rank)
        self.exchange = exchange
        self.node = topology.node_ranks(rank)
        self.j = rank % topology.local
        self.sizes = shard_sizes(layout.numel, topology.local)
        self.lo = sum(self.sizes[:self.j])
        self.inner: Optional[Round] = None
        self.gathers_back = topology.local > 1

    def prepare(self) -> Phase:
        grad = self.buffer.float()
        size, local = self.sizes[self.j], len(self.node)
        if local > 1:
            parts = yield Collective("all_to_all", self.node, grad, splits=self.sizes,
                                     key=("node slices", self.layout.index))
            self.node_bytes += (grad.numel() - size) * 4
            shard = parts[0].clone()
            for part in parts[1:]:
                shard += part
            shard.div_(local)
        else:
            shard = grad
        layout = shard_layout(self.layout, self.lo, self.lo + size, len(self.members))
        self.inner = self.exchange.inner.round_among(shard, layout, self.members, self.rank)
        return (yield from self.inner.prepare())

    def compress(self, compressor: Compressor, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout,
                 step: int) -> Phase:
        compressed = yield from self.inner.compress(compressor, grad, memory, layout, step)
        self.index_bytes += self.inner.index_bytes
        return compressed

    def send(self, compressed: Compressed) -> Collective:
        return self.inner.send(compressed)

    def aggregate(self, compressor: Compressor, received: torch.Tensor, layout: BucketLayout,
                  step: int, out: Optional[torch.Tensor] = None) -> Aggregated:
        return self.inner.aggregate(compressor, received, layout, step)  # a shard: not into ``out``

    def finish(self, result: torch.Tensor, usable: Any, malformed: Any = ()) -> Phase:
        result, usable, _ = yield from self.inner.finish(result, usable, malformed)
        if len(self.node) == 1:
            return result, usable, ()
        # Each local rank's shard, then its usable flag, then one flag per node: that node's
        # payload for this shard was malformed (so every rank counts every malformed sender).
        longest, nodes = max(self.sizes), len(self.members)
        device = result.device
        mine = torch.zeros(longest + 1 + nodes, dtype=torch.float32, device=device)
        mine[:result.numel()] = result
        if isinstance(usable, torch.Tensor):  # the flags stay on the device
            mine[longest] = usable.to(torch.float32)
        else:
            mine[longest] = 1.0 if usable else 0.0
        if isinstance(malformed, torch.Tensor):
            mine[longest + 1:] = malformed.to(torch.float32)
        else:
            for row in malformed:
                mine[longest + 1 + row] = 1.0
        shards = yield Collective("all_gather", self.node, mine, channel=1, key=("node shards", self.layout.index))
        self.node_bytes += mine.numel() * 4
        every = (shards[:, longest] == 1.0).all()
        bucket = torch.cat([shards[i, :size] for i, size in enumerate(self.sizes)])
        # The malformed payloads the other local ranks decoded (this rank counted its own), by
        # sending rank: node ``row``'s local rank ``i`` is rank ``row * local + i``.
        seen = shards[:, longest + 1:] == 1.0
        seen[self.j] = False
        elsewhere = seen.t().reshape(-1)
        return bucket, every, elsewhere

    def settled(self, kept: bool) -> None:
        self.inner.settled(kept)

    def sender(self, row: int) -> int:
        return self.inner.sender(row)

    @property
    def payload_group(self) -> int:
        """Ranks whose rounds give the same number here decode the same payloads."""
        return self.j


@register_exchange("hierarchical")
class HierarchicalExchange(Exchange):
    """Dense inside a node, compressed across nodes (see the module's docstring).

    Args:
        process_group: the group to exchange in (default: the whole world); its ranks numbered
            node by node, ``local`` to a node.
        local: ranks per node (default: torchrun's ``LOCAL_WORLD_SIZE``; without it, one node).
        cross: the registered exchange that moves the shards across nodes (``"allgather"``, or
            ``"allreduce"``), with ``cross_options`` (e.g. ``{"select": "mix"}``).

    Every rank must build it at the same point (it creates the node and cross-node process
    groups, a collective of the whole world).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, local: Optional[int] = None,
                 cross: str = "allgather", cross_options: Optional[Dict[str, Any]] = None,
                 simulated_world: Optional[int] = None) -> None:
        super().__init__(process_group, simulated_world)
        if cross == "hierarchical":
            raise ValueError("hierarchical exchange: cross must be a flat exchange, got 'hierarchical'")
        self.inner = get_exchange(cross, process_group, simulated_world=simulated_world, **(cross_options or {}))
        self.cross = cross
        self.options = {"local": local, "cross": cross, "cross_options": dict(cross_options or {})}
        self.topology = Topology.of(self.world_size, local)
        local_rank = _env_int("LOCAL_RANK")
        if (simulated_world is None and local is None and local_rank is not None
                and local_rank != self.rank % self.topology.local):
            raise ValueError(f"hierarchical exchange: rank {self.rank} has LOCAL_RANK {local_rank}, but the ranks "
                             f"of a node must be numbered together ({self.topology.local} per node: local rank "
                             f"{self.rank % self.topology.local}); give local= explicitly or launch with torchrun")
        t = self.topology
        nodes = [t.node_ranks(n * t.local) for n in range(t.nodes)]
        crosses = [t.cross_ranks(j) for j in range(t.local)]
        self.make_groups(nodes, channels=2)
        self.make_groups(crosses)

    def accepts(self, compressor: Compressor) -> None:
        self.inner.accepts(compressor)

    def round(self, buffer: torch.Tensor, layout: BucketLayout, rank: int) -> Round:
        if layout.numel < self.topology.local:
            # Fewer entries than ranks on a node: some shards would be empty. Such a bucket (at
            # most a few entries) goes through the cross-node exchange whole, among all ranks.
            return self.inner.round_among(buffer, layout, tuple(range(self.world_size)), rank)
        return HierarchicalRound(self, buffer, layout, rank)

    def config(self) -> Dict[str, Any]:
        return {"exchange": self.name, "nodes": self.topology.nodes, "local": self.topology.local,
                "cross": self.inner.config()}

    def state_dict(self) -> Dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def _env_int(name: str) -> Optional[int]:
    import os

    text = os.environ.get(name)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None

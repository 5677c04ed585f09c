"""Ways of moving a bucket between ranks: one class each, behind one small interface.

For each bucket and step the hook asks the state's exchange for a :class:`Round`, this rank's part
of moving that bucket, in five phases:

1. ``prepare()``: what this rank compresses (the whole bucket, or its shard of the node's average
   for :mod:`~gradsieve.exchanges.hierarchical`) and that part's :class:`BucketLayout`;
2. ``compress(compressor, ...)``: the :class:`~gradsieve.compressor.Compressed` payload (the
   compressor's own ``compress``, or its values at an index set the ranks agree on for
   :mod:`~gradsieve.exchanges.allreduce`);
3. ``send(compressed)``: the one collective that moves the payloads across the group;
4. ``aggregate(compressor, received, ...)``: what every rank of the group decodes from it (pure);
5. ``finish(result, usable, malformed)``: the bucket rebuilt from the part's result, whether every
   part of it is usable, and the senders of malformed payloads this rank did not see itself (the
   hierarchical exchange gathers the shards inside the node).

A phase does not call torch.distributed itself: it is a generator that yields :class:`Collective`
requests and receives their results. The hook runs the requests as real collectives on the
exchange's process groups (:meth:`Exchange.issue`); the Simulator runs every simulated worker's
requests together in one process (:func:`run_together`), so both run the same exchange code.
Dense buckets (dense compressors, warm-up steps) are summed with :meth:`Exchange.reduce`.

Registered by name like the compressors (``@register_exchange("name")``; ``CompressionState(...,
exchange="name")`` builds it for the state's process group):

* ``allgather``: one all-gather of every rank's payload (:class:`AllGatherExchange`);
* the others live in :mod:`gradsieve.exchanges`, one module each.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Generator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from gradsieve.compressor import Aggregated, BucketLayout, Compressed, Compressor
from gradsieve.memory import BucketMemory
from gradsieve.registry import Registry

__all__ = ["Collective", "Exchange", "AllGatherExchange", "Round", "Topology", "available_exchanges",
           "get_exchange", "register_exchange", "run_now", "run_together"]

_EXCHANGES = Registry("exchange")

# A phase of a round: yields collectives, receives their results, returns the phase's value.
Phase = Generator["Collective", Any, Any]


def register_exchange(name: str) -> Callable[[type], type]:
    """Class decorator that makes an exchange available under ``name``."""
    return _EXCHANGES.register(name)


def available_exchanges() -> List[str]:
    """Registered exchange names, sorted."""
    return _EXCHANGES.names()


def get_exchange(name: str, process_group: Optional[dist.ProcessGroup] = None, **options: Any) -> "Exchange":
    """Builds the exchange registered as ``name`` for ``process_group`` (default: the world).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return _EXCHANGES.lookup(name)(process_group=process_group, **options)


class Collective(NamedTuple):
    """One collective a phase asks for, as one member of ``group`` sees it.

    ``op``:

    * ``"all_gather"``: every member's ``tensor`` (the same size everywhere), stacked in member
      order: ``[len(group), numel]``;
    * ``"all_to_all"``: ``tensor`` cut into ``len(group)`` pieces of ``splits`` entries (the same
      ``splits`` on every member), piece ``i`` going to member ``i``; the result stacks what every
      member sent to this one: ``[len(group), splits[this member]]``;
    * ``"all_reduce"``: the sum of every member's ``tensor``;
    * ``"broadcast"``: member ``src``'s ``tensor`` (``src`` a position in ``group``).

    ``group``: the members, as ranks of the exchange's process group, in member order.
    ``channel``: collectives of one group issued from different threads use different channels
    (each its own process group), so that each channel's collectives run in the same order on
    every rank.
    ``key``: when given, an all-gather or all-to-all receives into a buffer the exchange keeps for
    that key (and the result's size, dtype and device) from one step to the next, instead of a new
    one; its result must then be consumed before the same key is issued again (one bucket's
    collective per step: the hook's synchronous path).
    """

    op: str
    group: Tuple[int, ...]
    tensor: torch.Tensor
    splits: Tuple[int, ...] = ()
    src: int = 0
    channel: int = 0
    key: Any = None


def finished(value: Any) -> Phase:
    """A phase that needs no collective: it returns ``value`` at once."""
    return value
    yield  # makes this function a generator  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Topology:
    """How the ranks sit on nodes: ``nodes`` nodes of ``local`` ranks each, rank ``r`` on node
    ``r // local`` with local index ``r % local`` (the numbering torchrun gives a job of equal
    nodes)."""

    nodes: int
    local: int

    def __post_init__(self) -> None:
        for name in ("nodes", "local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology: {name} must be an integer >= 1, got {value!r}")

    @property
    def world(self) -> int:
        return self.nodes * self.local

    def node_ranks(self, rank: int) -> Tuple[int, ...]:
        """The ranks on ``rank``'s node, in local order."""
        first = rank - rank % self.local
        return tuple(range(first, first + self.local))

    def cross_ranks(self, rank: int) -> Tuple[int, ...]:
        """The ranks with ``rank``'s local index, one per node, in node order."""
        return tuple(node * self.local + rank % self.local for node in range(self.nodes))

    @classmethod
    def of(cls, world: int, local: Optional[int] = None) -> "Topology":
        """The layout of ``world`` ranks with ``local`` ranks per node (default: torchrun's
        ``LOCAL_WORLD_SIZE``, else one node)."""
        if local is None:
            text = os.environ.get("LOCAL_WORLD_SIZE")
            if text is None:
                local = world
            else:
                try:
                    local = int(text)
                except ValueError:
                    raise ValueError(f"LOCAL_WORLD_SIZE must be an integer, got {text!r}") from None
        if not isinstance(local, int) or isinstance(local, bool) or local < 1 or world % local:
            raise ValueError(f"ranks per node (local) must be an integer >= 1 that divides the world size "
                             f"{world}, got {local!r}")
        return cls(world // local, local)


class Round:
    """One bucket's exchange on one rank, for one step (see the module's docstring). The base class
    is the flat exchange of the whole bucket among ``members`` by all-gather."""

    # finish() asks for a collective (issued when the part has landed, in launch order)
    gathers_back = False

    def __init__(self, buffer: torch.Tensor, layout: BucketLayout, members: Tuple[int, ...], rank: int) -> None:
        self.buffer = buffer
        self.layout = layout
        self.members = members
        self.rank = rank
        # Bytes this round handed to collectives besides the payload: index sets it broadcast
        # (across nodes), and collectives inside the node.
        self.index_bytes = 0
        self.node_bytes = 0

    def prepare(self) -> Phase:
        """Returns (the float32 gradient this rank compresses, its layout)."""
        return finished((self.buffer.float(), self.layout))

    def compress(self, compressor: Compressor, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout,
                 step: int) -> Phase:
        """Returns this rank's :class:`Compressed` for the part ``prepare`` gave."""
        return finished(compressor.compress(grad, memory, layout, step))

    def send(self, compressed: Compressed) -> Collective:
        """The collective that moves the payloads (its result is what :meth:`aggregate` reads)."""
        return Collective("all_gather", self.members, compressed.payload)

    def aggregate(self, compressor: Compressor, received: torch.Tensor, layout: BucketLayout,
                  step: int, out: Optional[torch.Tensor] = None) -> Aggregated:
        """The average of the group's parts and each member's flags (pure). ``out``: where the
        average may be written (this round's whole bucket, float32); a round whose part is not the
        whole bucket ignores it."""
        return compressor.aggregate(received, layout, step, out=out)

    def finish(self, result: torch.Tensor, usable: Any, malformed: Any = ()) -> Phase:
        """Returns (the bucket's float32 result, whether every rank's part was usable, the ranks
        whose malformed payloads other ranks decoded). ``result``: what the compressor gave for
        this rank's part (NaN where it is not usable); ``usable``: a bool, or a bool tensor on the
        device; ``malformed``: the rows of what :meth:`send` received whose payloads were
        malformed, as a tuple of rows or a bool tensor of rows. A round that gathers back returns
        its flags as device tensors (usable: bool[]; the ranks: bool[world] by sending rank); the
        flat round returns ``usable`` as given and no ranks."""
        return finished((result, usable, ()))

    @property
    def payload_group(self) -> int:
        """Ranks whose rounds give the same number here decode the same payloads (the Simulator
        decodes once per group)."""
        return 0

    def settled(self, kept: bool) -> None:
        """The step this round belongs to is applied (``kept``) or skipped, on every rank."""

    def sender(self, row: int) -> int:
        """The rank (of the exchange's process group) whose payload is row ``row`` of what
        :meth:`send` received."""
        return self.members[row]


class Exchange:
    """How buckets move. Subclasses implement :meth:`round` (or use the flat one) and may add
    process groups for their collectives (:meth:`group`)."""

    name: str = "?"
    # Speculative training (gradsieve.speculative) applies this rank's own payload before the
    # exchange ends: only an exchange of whole buckets' payloads allows that.
    speculative_ok: bool = False

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None, simulated_world: Optional[int] = None) -> None:
        self.process_group = process_group
        if simulated_world is not None and (not isinstance(simulated_world, int) or isinstance(simulated_world, bool)
                                            or simulated_world < 1):
            raise ValueError(f"exchange {self.name!r}: simulated_world must be an integer >= 1, got {simulated_world!r}")
        # The Simulator's exchange: this many workers in one process, no process group.
        self.simulated_world = simulated_world
        # The constructor's options besides the group (a pickled state builds the exchange again).
        self.options: Dict[str, Any] = {}
        self._groups: Dict[Tuple[Tuple[int, ...], int], Optional[dist.ProcessGroup]] = {}
        # Receive buffers kept per Collective.key (persistent per bucket).
        self._buffers: Dict[Any, torch.Tensor] = {}

    @property
    def world_size(self) -> int:
        if self.simulated_world is not None:
            return self.simulated_world
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        """This process's rank in the exchange's group (a simulated exchange has none)."""
        if self.simulated_world is not None:
            raise ValueError(f"exchange {self.name!r} is simulated: its rounds are made per worker")
        return dist.get_rank(self.process_group)

    def accepts(self, compressor: Compressor) -> None:
        """Raises ValueError when this exchange cannot move ``compressor``'s payloads."""

    def round(self, buffer: torch.Tensor, layout: BucketLayout, rank: int) -> Round:
        """Rank ``rank``'s exchange of one bucket for one step."""
        return self.round_among(buffer, layout, tuple(range(self.world_size)), rank)

    def round_among(self, buffer: torch.Tensor, layout: BucketLayout, members: Tuple[int, ...], rank: int) -> Round:
        """Rank ``rank``'s flat round of this exchange among ``members`` (a composed exchange's
        inner step)."""
        return Round(buffer, layout, members, rank)

    def reduce(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Starts summing ``tensor`` over the ranks; a future of the sum (a tensor of the same
        shape and dtype). Does not block."""
        work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    def config(self) -> Dict[str, Any]:
        """What must agree across ranks (compared with the compressor's configuration)."""
        return {"exchange": self.name}

    def state_dict(self) -> Dict[str, Any]:
        """Run-time state of the exchange that a checkpoint must carry (none by default)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"exchange {self.name!r} keeps no state, got {sorted(state)}")

    # ------------------------------------------------------------------------------ collectives
    def make_groups(self, groups: Sequence[Tuple[int, ...]], channels: int = 1) -> None:
        """Creates a process group for each of ``groups`` (ranks of the exchange's group) and
        channel. Every rank must call this with the same groups in the same order (each
        ``new_group`` is a collective of the whole world)."""
        if self.simulated_world is not None:
            return
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        for members in groups:
            for channel in range(channels):
                if len(members) == self.world_size and channel == 0:
                    self._groups[(members, 0)] = self.process_group
                elif len(members) > 1:
                    self._groups[(members, channel)] = dist.new_group([ranks[m] for m in members])

    def group(self, members: Tuple[int, ...], channel: int = 0) -> Optional[dist.ProcessGroup]:
        key = (members, channel)
        if key not in self._groups:
            if len(members) == self.world_size and members == tuple(range(self.world_size)) and channel == 0:
                return self.process_group
            raise ValueError(f"exchange {self.name!r}: no process group for ranks {members} (channel {channel})")
        return self._groups[key]

    def issue(self, collective: Collective) -> torch.futures.Future:
        """Starts ``collective`` on this rank (a member of its group) as a real collective; a
        future of its result. A failed or timed-out collective re-raises from the future."""
        op, members, tensor = collective.op, collective.group, collective.tensor
        if self.simulated_world is not None:
            raise ValueError(f"exchange {self.name!r} is simulated: run its phases with run_together")
        if len(members) == 1:  # nothing to move
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(_alone(collective))
            return done
        group = self.group(members, collective.channel)
        size = len(members)
        if op == "all_gather":
            out = self._receive_buffer(collective, size * tensor.numel())
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            work = gather(out, tensor.contiguous(), group=group, async_op=True)
            shaped = out.view(size, tensor.numel())
        elif op == "all_to_all":
            me = members.index(self.rank)
            out = self._receive_buffer(collective, size * collective.splits[me])
            work = dist.all_to_all_single(out, tensor.contiguous(), [collective.splits[me]] * size,
                                          list(collective.splits), group=group, async_op=True)
            shaped = out.view(size, collective.splits[me])
        elif op == "all_reduce":
            shaped = tensor.clone()
            work = dist.all_reduce(shaped, group=group, async_op=True)
        elif op == "broadcast":
            shaped = tensor.clone()
            root = dist.get_global_rank(group, collective.src) if group is not None else collective.src
            work = dist.broadcast(shaped, root, group=group, async_op=True)
        else:
            raise ValueError(f"exchange {self.name!r}: unknown collective {op!r}")

        def landed(fut: torch.futures.Future) -> torch.Tensor:
            # value() re-raises a failed or timed-out collective; without it the callback would
            # read a buffer the collective never filled.
            fut.value()
            return shaped

        return work.get_future().then(landed)

    def _receive_buffer(self, collective: Collective, numel: int) -> torch.Tensor:
        """Where a collective's result lands: the buffer kept for its key, or a new one."""
        tensor = collective.tensor
        if collective.key is None:
            return torch.empty(numel, dtype=tensor.dtype, device=tensor.device)
        key = (collective.key, collective.op, collective.group, collective.channel)
        kept = self._buffers.get(key)
        if kept is None or kept.numel() != numel or kept.dtype != tensor.dtype or kept.device != tensor.device:
            kept = torch.empty(numel, dtype=tensor.dtype, device=tensor.device)
            self._buffers[key] = kept
        return kept


def _alone(collective: Collective) -> torch.Tensor:
    """A collective's result in a group of one."""
    tensor = collective.tensor
    if collective.op in ("all_gather", "all_to_all"):
        return tensor.reshape(1, -1)
    return tensor.clone()


def run_now(exchange: Exchange, phase: Phase) -> Any:
    """Runs ``phase`` to its end on this rank, waiting for each collective it asks for."""
    try:
        collective = next(phase)
        while True:
            collective = phase.send(exchange.issue(collective).wait())
    except StopIteration as stop:
        return stop.value


def run_together(phases: Sequence[Phase]) -> List[Any]:
    """Runs one phase of every simulated worker (``phases[w]`` is worker ``w``'s, worker ids
    being ranks) in one process: each worker's collectives are answered when every member of
    their group has asked for them, with the results ``torch.distributed`` gives (sums in member
    order). Returns every worker's value."""
    results: List[Any] = [None] * len(phases)
    waiting: Dict[int, Collective] = {}

    def advance(worker: int, value: Any, first: bool = False) -> None:
        try:
            waiting[worker] = next(phases[worker]) if first else phases[worker].send(value)
        except StopIteration as stop:
            results[worker] = stop.value
            waiting.pop(worker, None)

    for worker in range(len(phases)):
        advance(worker, None, first=True)
    while waiting:
        worker, collective = min(waiting.items())
        members = collective.group
        asked = [waiting.get(m) for m in members]
        if any(c is None or c.op != collective.op or c.group != members for c in asked):
            raise RuntimeError(f"run_together: the members of {members} asked for different collectives "
                               f"({[None if c is None else c.op for c in asked]}): the workers' rounds diverged")
        answers = _answer(asked)
        for member, answer in zip(members, answers):
            advance(member, answer)
    return results


def _answer(asked: List[Collective]) -> List[torch.Tensor]:
    """Every member's result of one collective, computed from every member's request."""
    op = asked[0].op
    tensors = [c.tensor for c in asked]
    if op == "all_gather":
        stacked = torch.stack([t.reshape(-1) for t in tensors])
        return [stacked.clone() for _ in asked]
    if op == "all_to_all":
        splits = list(asked[0].splits)
        pieces = [torch.split(t.reshape(-1), splits) for t in tensors]
        return [torch.stack([pieces[i][j] for i in range(len(asked))]) for j in range(len(asked))]
    if op == "all_reduce":
        total = tensors[0].clone()
        for t in tensors[1:]:
            total += t
        return [total.clone() for _ in asked]
    if op == "broadcast":
        return [tensors[asked[0].src].clone() for _ in asked]
    raise ValueError(f"run_together: unknown collective {op!r}")


@register_exchange("allgather")
class AllGatherExchange(Exchange):
    """One all-gather of every rank's payload: each rank receives ``(P - 1) * nbytes`` bytes per
    bucket, so its traffic grows with the number of ranks P.

    Args:
        process_group: the group to exchange in (default: the whole world).
    """

    speculative_ok = True

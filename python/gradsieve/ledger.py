"""The book the hook keeps of each step whose buckets are landing.

A step is applied whole or skipped whole. Its buckets are compressed, exchanged and committed one
by one, so when one bucket turns out skipped (a non-finite gradient or a malformed payload on some
rank) the commits its earlier buckets made are undone, newest first, and its later buckets do not
commit: every bucket's memory is then as it was before the step. For that the ledger keeps, until
the step's last bucket lands, the memory each committed bucket had before (the tensors, not
copies: a commit replaces them). A compressor whose commit does more than replace its memory's
tensors (``traits.rollback_safe`` False) keeps its commits.

Synchronous exchanges may land out of order, on gloo's threads: the ledger counts the buckets
launched and landed per step under one lock, and a step ends when the last of its buckets lands,
whichever that is. At the end of a step it counts a skipped step, and raises after
``max_bad_steps`` steps in a row with malformed payloads, naming the senders.
"""

from __future__ import annotations

import threading
import collections
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Tuple

import torch

from gradsieve.compressor import Aggregated, BucketLayout, Compressed
from gradsieve.memory import BucketMemory, Snapshot

__all__ = ["BucketJob", "InOrder", "StepLedger"]


class BucketJob(NamedTuple):
    """One bucket of one step, compressed and launched."""

    at: int  # the hook's step
    step: int  # the compressed step (the hook's step less the warm-up)
    params: Tuple[torch.nn.Parameter, ...]
    layout: BucketLayout
    memory: BucketMemory
    compressed: Compressed
    last: bool  # DDP's last bucket of the step
    launched: float  # perf_counter() when its exchange started
    period: Optional[float]  # time since the previous step's last launch (last bucket only)
    # Committed early (speculative overlap_compress): the bucket's memory before this step's commit,
    # to go back to when the step is skipped; None: committed when it lands.
    before: Optional[Snapshot] = None
    round: Any = None  # the exchange's round of this bucket (gradsieve.exchange.Round)


class StepLedger:
    """Commits to undo, buckets still landing, and the run of steps with malformed payloads."""

    def __init__(self) -> None:
        # (hook step, memory, its snapshot before the commit), oldest first
        self.commits: List[Tuple[int, BucketMemory, Snapshot]] = []
        self.bad_step: Optional[int] = None  # the hook step found skipped while it lands
        # per hook step: [buckets launched, buckets landed, its last bucket launched]
        self.landing: Dict[int, List[Any]] = {}
        self.lock = threading.Lock()  # one synchronous decode at a time
        self.bad_streak = 0
        self.bad_this_step = False
        # The device path (settle_on_device): per hook step still landing, its flag (a bool
        # tensor: every bucket so far usable) and its malformed payloads by sending rank
        # (int32[world]); the rounds to tell whether it was kept; and the steps that ended, with
        # their flags on the way to the host, oldest first.
        self.ok: Dict[int, torch.Tensor] = {}
        self.bad: Dict[int, torch.Tensor] = {}
        self.rounds: Dict[int, List[Any]] = {}
        self.ended: List[Tuple[int, torch.Tensor, Any]] = []
        self._ranks: Dict[Any, torch.Tensor] = {}

    # ------------------------------------------------------------------------------ landing
    def launched(self, at: int, last: bool) -> None:
        """A synchronous bucket of hook step ``at`` was launched (before its exchange starts)."""
        with self.lock:
            counts = self.landing.setdefault(at, [0, 0, False])
            counts[0] += 1
            counts[2] = counts[2] or last

    def landed(self, state: Any, at: int, on_device: bool = False) -> None:
        """A synchronous bucket of hook step ``at`` has landed (under :attr:`lock`); ends the step
        when it was the last of its buckets to land (``on_device``: its flags go to the host)."""
        counts = self.landing[at]
        counts[1] += 1
        if counts[2] and counts[1] == counts[0]:
            del self.landing[at]
            if on_device:
                self.end_on_device(state, at)
            else:
                self.step_done(state, at)

    def settle(self, state: Any, job: BucketJob, gathered: torch.Tensor) -> Tuple[Optional[torch.Tensor], Aggregated]:
        """Decodes a bucket's exchange and commits its memory (or records the early commit): the
        result for the optimizer, or None when the bucket is skipped (this one, or one before it of
        the same step: the caller then undoes with :meth:`skip`). Malformed payloads are counted."""
        compressor = state.compressor
        aggregated = job.round.aggregate(compressor, gathered, job.layout, job.step)
        usable = bool(aggregated.usable.all())
        if usable and self.bad_step != job.at:
            if job.before is not None:
                self.commits.append((job.at, job.memory, job.before))
                return aggregated.average, aggregated
            self.keep(compressor, job.at, job.memory)
            return compressor.commit(job.memory, job.compressed, aggregated.average, job.layout), aggregated
        if not usable:
            self.count_malformed(state, aggregated, job.round.sender)
        return None, aggregated

    # ------------------------------------------------------------------------------ on the device
    def settle_on_device(self, state: Any, job: BucketJob, gathered: torch.Tensor,
                         out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Aggregated]:
        """:meth:`settle` without reading the device: decodes a bucket's exchange and commits its
        memory optimistically (the commit is kept so that :meth:`resolve` can undo it). Returns
        the compressor's result, the step's flag so far (a bool tensor on the device: every
        bucket of the step that has landed, this one included, was usable on every rank) and the
        :class:`Aggregated`. Needs a compressor whose commit can be undone (``rollback_safe``).
        ``out``: where the round may decode the average (the bucket)."""
        compressor = state.compressor
        aggregated = job.round.aggregate(compressor, gathered, job.layout, job.step, out=out)
        ok = self.step_ok(job.at, aggregated.usable.all())
        self.note_senders(job.at, ~aggregated.well_formed, job.round, state.exchange.world_size)
        self.keep(compressor, job.at, job.memory)
        result = compressor.commit(job.memory, job.compressed, aggregated.average, job.layout)
        self.rounds.setdefault(job.at, []).append(job.round)
        return result, ok, aggregated

    def step_ok(self, at: int, usable: torch.Tensor) -> torch.Tensor:
        """ANDs ``usable`` (a bool tensor) into hook step ``at``'s device flag; the flag."""
        before = self.ok.get(at)
        ok = usable if before is None else before & usable
        self.ok[at] = ok
        return ok

    def note_senders(self, at: int, malformed: torch.Tensor, round_: Any, world: int) -> None:
        """Counts, on the device, one malformed payload per True row of ``malformed`` (rows as
        ``round_`` received them) for its sending rank (of ``world`` ranks)."""
        key = (round_.members, world, malformed.numel(), str(malformed.device))
        ranks = self._ranks.get(key)
        if ranks is None:  # once per group of senders: a small copy to the device
            ranks = torch.tensor([round_.sender(row) for row in range(malformed.numel())],
                                 dtype=torch.int64).to(malformed.device)
            self._ranks[key] = ranks
        counts = self.bad.get(at)
        if counts is None:
            counts = torch.zeros(world, dtype=torch.int32, device=malformed.device)
        self.bad[at] = counts.index_add(0, ranks, malformed.to(torch.int32))

    def note_elsewhere(self, at: int, malformed_by_rank: torch.Tensor) -> None:
        """Counts, on the device, one malformed payload for each True entry of
        ``malformed_by_rank`` (bool[world], by sending rank): those other ranks decoded."""
        counts = self.bad.get(at)
        add = malformed_by_rank.to(torch.int32)
        self.bad[at] = add if counts is None else counts + add

    def end_on_device(self, state: Any, at: int) -> None:
        """The last bucket of hook step ``at`` has landed (device path): its flags start on
        their way to the host (a non-blocking copy), to be read by :meth:`resolve`."""
        ok = self.ok.pop(at)
        bad = self.bad.pop(at, None)
        if bad is None:
            bad = torch.zeros(state.exchange.world_size, dtype=torch.int32, device=ok.device)
        flags = torch.cat([ok.to(torch.int32).reshape(1), bad])
        event = None
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        self.ended.append((at, flags, event))

    def resolve(self, state: Any) -> None:
        """Reads the flags of the steps that ended on the device (once per step, from a host copy
        made when the step ended) and applies them: a skipped step's commits are undone, newest
        first, and it is counted with its malformed payloads; a kept step's commits stand. Each
        step's rounds hear whether it was kept. Raises after ``max_bad_steps`` steps in a row with
        malformed payloads."""
        while self.ended:
            at, flags, event = self.ended.pop(0)
            if event is not None and not event.query():
                event.synchronize()  # in practice done long ago: queued when the step ended
            read = flags.tolist()
            kept, counts = read[0] == 1, read[1:]
            if not kept:
                for step, memory, snapshot in reversed(self.commits):
                    if step == at:
                        memory.restore(snapshot)
                state.skipped_steps += 1
            self.commits = [c for c in self.commits if c[0] != at]
            for round_ in self.rounds.pop(at, []):
                round_.settled(kept)
            self.count_senders(state, [rank for rank, n in enumerate(counts) for _ in range(n)])
            self._end_of_step(state)

    # ------------------------------------------------------------------------------ undo
    def keep(self, compressor: Any, at: int, memory: BucketMemory) -> None:
        """Before a bucket of hook step ``at`` commits: keeps its memory as it is, so that the
        commit can be undone if a later bucket of the same step is skipped."""
        if compressor.traits.rollback_safe:
            self.commits.append((at, memory, memory.snapshot()))

    def skip(self, at: int) -> None:
        """Hook step ``at`` is skipped: the commits its earlier buckets made are undone, newest
        first, and its later buckets do not commit."""
        if self.bad_step == at:
            return
        self.bad_step = at
        for step, memory, snapshot in reversed(self.commits):
            if step == at:
                memory.restore(snapshot)
        self.commits = [c for c in self.commits if c[0] != at]

    def step_done(self, state: Any, at: int) -> None:
        """The last bucket of hook step ``at`` has landed: its commits stand; a skipped step is
        counted, and the run of steps with malformed payloads checked."""
        if self.bad_step == at:
            state.skipped_steps += 1
        self.commits = [c for c in self.commits if c[0] > at]
        self._end_of_step(state)

    # ------------------------------------------------------------------------------ bad payloads
    def count_malformed(self, state: Any, aggregated: Aggregated, sender: Callable[[int], int]) -> None:
        """After a skipped bucket: counts the payloads that were not well formed, by sending rank
        (``sender(row)``; the skip decision has synchronised with the device already; this reads a
        few flags more)."""
        malformed = ~aggregated.well_formed
        if not bool(malformed.any()):
            return
        self.count_senders(state, [sender(row) for row in malformed.nonzero().flatten().tolist()])

    def count_senders(self, state: Any, ranks) -> None:
        """Counts one malformed payload from each of ``ranks`` (none: nothing to count)."""
        if not ranks:
            return
        for rank in ranks:
            state.bad_payloads += 1
            state.bad_payload_ranks[rank] = state.bad_payload_ranks.get(rank, 0) + 1
        self.bad_this_step = True

    def _end_of_step(self, state: Any) -> None:
        if not self.bad_this_step:
            self.bad_streak = 0
            return
        self.bad_this_step = False
        self.bad_streak += 1
        if self.bad_streak >= state.max_bad_steps:
            ranks = sorted(state.bad_payload_ranks)
            raise RuntimeError(
                f"gradsieve: malformed payloads for {self.bad_streak} steps in a row (max_bad_steps="
                f"{state.max_bad_steps}) from rank(s) {ranks} (counts {state.bad_payload_ranks}): a peer "
                "is sending corrupted data")


class InOrder:
    """Issues the collectives that end rounds (the hierarchical exchange's all-gather inside the
    node) in the order the rounds were launched, the same on every rank, although their first
    collectives land in any order and on any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: Deque[List[Any]] = collections.deque()

    def enter(self) -> List[Any]:
        """A ticket for a round being launched now (on the thread that launches rounds)."""
        ticket: List[Any] = [False, None]
        with self.lock:
            self.queue.append(ticket)
        return ticket

    def ready(self, ticket: List[Any], issue: Optional[Callable[[], None]]) -> None:
        """The round of ``ticket`` may issue its last collective by calling ``issue`` (None: it
        failed and issues nothing); issues every ready round at the head of the queue, in order."""
        with self.lock:
            ticket[0], ticket[1] = True, issue
            while self.queue and self.queue[0][0]:
                head = self.queue.popleft()
                if head[1] is not None:
                    head[1]()

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

    # ------------------------------------------------------------------------------ landing
    def launched(self, at: int, last: bool) -> None:
        """A synchronous bucket of hook step ``at`` was launched (before its exchange starts)."""
        with self.lock:
            counts = self.landing.setdefault(at, [0, 0, False])
            counts[0] += 1
            counts[2] = counts[2] or last

    def landed(self, state: Any, at: int) -> None:
        """A synchronous bucket of hook step ``at`` has landed (under :attr:`lock`); ends the step
        when it was the last of its buckets to land."""
        counts = self.landing[at]
        counts[1] += 1
        if counts[2] and counts[1] == counts[0]:
            del self.landing[at]
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

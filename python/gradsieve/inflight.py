"""Exchanges left in flight by speculative training (:class:`gradsieve.SpeculativeOptimizer`).

In speculative mode the hook starts each bucket's exchange and does not wait for it: it hands DDP
this rank's own sent update at once. The exchanges of step t end later, before the memory they
depend on is read again:

* without ``overlap_compress``, before step t+1's first bucket is compressed, so the compressor
  sees the sequence of compress, aggregate and commit of synchronous training;
* with it, each bucket's memory is committed when its payload is sent (nothing in such a commit
  depends on the average), and step t's exchanges end after step t+1's last bucket has been
  compressed and launched. A skipped bucket is rolled back: its memory returns to what it was
  before step t, and every later exchange in flight (compressed from the memory being undone) is
  waited for and dropped, its step skipped on every rank too (``rolled_back`` counts them).

Either way the memory after each step is what synchronous training would hold after the same
steps were skipped. Each landed step's averages (None for a skipped bucket) wait here until the
optimizer wrapper takes them.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from gradsieve.compressor import BucketLayout
from gradsieve.ledger import BucketJob
from gradsieve.memory import MemoryBank
from gradsieve.signals import CommShare

__all__ = ["InFlight", "Landed", "SpeculativeExchanges"]


class InFlight(NamedTuple):
    """One bucket's exchange in flight."""

    job: BucketJob
    future: torch.futures.Future


class Landed(NamedTuple):
    """What one step's exchanges gave: ``dense`` (a warm-up step's all-reduce, applied at once)
    and, per bucket, its parameters and the average (None: the step is skipped)."""

    dense: bool
    buckets: List[Tuple[Tuple[torch.nn.Parameter, ...], Optional[torch.Tensor]]]


class SpeculativeExchanges:
    """The exchanges in flight, oldest first, and what has landed for the optimizer wrapper."""

    def __init__(self) -> None:
        self.exchanges: List[InFlight] = []
        self.landed: Dict[int, Landed] = {}
        self.own_ok: List[torch.Tensor] = []  # per bucket of this step: own update usable (bool[1])
        self.discarded: set = set()  # hook steps whose exchanges are all dropped

    # ------------------------------------------------------------------------------ the hook's side
    def before_compress(self, state: Any, at: int, layout: BucketLayout, early: bool) -> None:
        """Before a bucket of hook step ``at`` is compressed: the previous step's exchanges end
        first, unless its memory was committed early and no bucket in flight is this one (DDP may
        rebuild its buckets)."""
        if self.exchanges and self.exchanges[0].job.at != at:
            if not early or not any(x.job.layout == layout for x in self.exchanges if x.job.at != at):
                self.finish(state, before=at)

    def launch(self, state: Any, job: BucketJob, buffer: torch.Tensor, early: bool) -> torch.futures.Future:
        """Starts the bucket's exchange and leaves it in flight; with ``early`` commits its memory
        now. Returns a completed future of this rank's own sent update (in ``buffer``)."""
        compressor = state.compressor
        future = state.exchange.issue(job.round.send(job.compressed))
        if early:
            job = job._replace(before=job.memory.snapshot())
            compressor.commit(job.memory, job.compressed, None, job.layout)
        self.exchanges.append(InFlight(job, future))
        own = compressor.own_update(job.compressed, job.layout, job.step)
        self.own_ok.append(own.usable)
        buffer.copy_(own.average)
        if early and job.last:
            # overlap_compress: the previous step's exchanges had all of this step's compression
            # to end in; they end now, before the optimizer step that applies them.
            self.finish(state, before=job.at)
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done

    def keep_dense(self, at: int, params: Tuple[torch.nn.Parameter, ...], average: torch.Tensor) -> None:
        """A warm-up step's all-reduced bucket: the wrapper applies it to the global weights too."""
        self.landed.setdefault(at, Landed(True, [])).buckets.append((params, average))

    # ------------------------------------------------------------------------------ ending them
    def finish(self, state: Any, before: Optional[int] = None) -> None:
        """Waits for the exchanges in flight (of hook steps before ``before``; all when None),
        decodes them, commits the compressor's memory exactly as the synchronous hook does, and
        keeps each bucket's average (None when the step is skipped) for the optimizer wrapper."""
        ledger = state.ledger
        while self.exchanges and (before is None or self.exchanges[0].job.at < before):
            exchange = self.exchanges.pop(0)
            job = exchange.job
            begun = time.perf_counter()
            gathered = exchange.future.wait()
            waited = time.perf_counter() - begun
            state.wait_s += waited
            landed = self.landed.setdefault(job.at, Landed(False, []))
            if job.at in self.discarded:
                self._drop(state, exchange)
                state.decode_s += time.perf_counter() - begun
                continue
            average, _ = ledger.settle(state, job, gathered)
            landed.buckets.append((job.params, average))
            if average is None:
                # This bucket, or one before it of the same step, is skipped: so is the whole step.
                if job.before is not None:
                    self._roll_back(state, exchange)
                ledger.skip(job.at)
            if job.last:
                if job.period:
                    state.signal(CommShare(min(1.0, waited / job.period)))
                ledger.step_done(state, job.at)
            state.decode_s += time.perf_counter() - begun
        # A dropped step may still have buckets to come while the hook is in it (a finish before
        # compression, after DDP rebuilt its buckets); older ones can have nothing left.
        self.discarded = {a for a in self.discarded if a >= state.step - 1}

    def _drop(self, state: Any, exchange: InFlight) -> None:
        """Skips an exchange compressed from memory that was rolled back since, and undoes its
        own commit."""
        job = exchange.job
        self.landed.setdefault(job.at, Landed(False, [])).buckets.append((job.params, None))
        state.rolled_back += 1
        if job.last:
            state.skipped_steps += 1
        if job.before is not None:
            job.memory.restore(job.before)

    def _roll_back(self, state: Any, exchange: InFlight) -> None:
        """``exchange`` (committed early) is skipped: every later step in flight is dropped
        (newest first, each undoing its commit), then this bucket's memory goes back to what it
        was before ``exchange``'s step."""
        at = exchange.job.at
        later = [x for x in self.exchanges if x.job.at > at]
        self.discarded.update(x.job.at for x in later)
        self.exchanges = [x for x in self.exchanges if x.job.at <= at]
        for x in later:
            x.future.wait()
        for x in reversed(later):
            self._drop(state, x)
        exchange.job.memory.restore(exchange.job.before)

    # ------------------------------------------------------------------------------ the wrapper's side
    def take_landed(self) -> Dict[int, Landed]:
        """The averages that arrived since the last call, by hook step."""
        landed, self.landed = self.landed, {}
        return landed

    def take_own_ok(self) -> List[torch.Tensor]:
        """Per bucket of the step just done: whether this rank's own update is usable."""
        usable, self.own_ok = self.own_ok, []
        return usable

    def busy(self) -> bool:
        """Exchanges in flight, or averages not yet taken."""
        return bool(self.exchanges or self.landed)

    def held_bytes(self, memory: MemoryBank) -> int:
        """Bytes of compressor memory held only to roll back early commits still in flight."""
        def ident(t: torch.Tensor):
            storage = t.untyped_storage()
            return str(t.device), storage.data_ptr(), storage.nbytes()

        live = {ident(t) for m in memory.buckets.values() for t in m.tensors() if isinstance(t, torch.Tensor)}
        held = {}
        for exchange in self.exchanges:
            before = exchange.job.before
            for part in before or ():
                for t in part.values():
                    if isinstance(t, torch.Tensor) and ident(t) not in live:
                        held[ident(t)] = t.untyped_storage().nbytes()
        return sum(held.values())

"""The DDP communication hook and its state.

Three lines in a DDP script::

    state = gradsieve.CompressionState(compressor="topk", density=0.01)
    ddp_model.register_comm_hook(state, gradsieve.compression_hook)
    # ... train as usual; state.stats() tells how many bytes crossed the wire

For each bucket the hook asks the compressor for a packed payload (the same size on every rank),
moves the payloads with one all-gather, decodes the world's payloads into the bucket and divides by
the world size (:mod:`gradsieve.compressor` describes the three steps). Dense compressors and the
first ``warmup_steps`` steps use a plain all-reduce, as DDP rebuilds its buckets after the first
iteration. The returned future does not block the backward pass.
"""


import hashlib
import json
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from gradsieve.compressor import BucketLayout, Compressor
from gradsieve.memory import MemoryBank
from gradsieve.registry import compressor_class, get_compressor

__all__ = ["CompressionState", "compression_hook"]

HOOK_OPTIONS = ("warmup_steps",)


class _Exchange(NamedTuple):
    """One bucket's all-gather in flight under speculative training."""

    at: int  # the hook's step
    step: int  # compressed step
    params: Tuple[torch.nn.Parameter, ...]
    layout: BucketLayout
    memory: Any
    pending: Dict[str, torch.Tensor]
    future: torch.futures.Future
    last: bool
    period: Optional[float]
    # Early commit (overlap_compress): the bucket's memory as it was before this step's commit,
    # (entries, extra), to roll back to when the step is skipped; None: commit when it lands.
    before: Optional[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = None


class Landed(NamedTuple):
    """What one step's exchanges gave: ``dense`` (a warm-up step's all-reduce, applied at once)
    and, per bucket, its parameters and the average (None: the step is skipped)."""

    dense: bool
    buckets: List[Tuple[Tuple[torch.nn.Parameter, ...], Optional[torch.Tensor]]]


class CompressionState:
    """Per-rank state of :func:`compression_hook`: the compressor, its memory, statistics.

    Args:
        compressor: registry name (``gradsieve.available_compressors()``) or a compressor object.
        density: fraction of entries sent per step (sparse compressors; ignored by dense ones).
        process_group: the group to communicate in (default: the whole world).
        warmup_steps: steps of plain all-reduce before compression starts, >= 1 (DDP rebuilds its
            buckets after the first iteration; a few dense steps also help early training).
        **options: compressor options, validated by the registry (``scope``, ``values``, ...).

    Tuning: start from ``topk`` at density 0.01 with fp32 values; ``values="int8"`` cuts the value
    bytes by 4 at a small extra error that error feedback absorbs; ``dgc`` adds momentum
    correction (use a momentum-free optimizer with it); ``ef21`` for heterogeneous data.

    Each rank's memory is its own: save ``state.state_dict()`` on every rank and load each rank's
    back with :meth:`load_state_dict` (the process group is not saved). A non-finite gradient on any
    rank (an AMP overflow step) makes the bucket NaN on every rank, so ``GradScaler`` skips the step,
    and leaves every rank's memory as it was, in every bucket: a bucket's commit is undone when a
    later bucket of the same step is skipped (compressors with ``rollback_safe`` True, all but
    predictive).
    """

    __slots__ = [
        # hyperparameters
        "compressor",
        "process_group",
        "warmup_steps",
        "max_bad_steps",
        # internal state
        "memory",
        "step",
        "_param_keys",
        "_verified",
        "observing",
        # statistics
        "wire_bytes",
        "dense_bytes",
        "compressed_steps",
        "skipped_steps",
        "compress_s",
        "decode_s",
        "bad_payloads",
        "bad_payload_ranks",
        "_bad_streak",
        "_bad_this_step",
        "probe_s",
        "probe_count",
        "_last_probe",
        "_last_launch",
        # speculative training (gradsieve.speculative): the revert threshold while an optimizer
        # wrapper drives the exchange, exchanges in flight, and averages not yet applied
        "speculative",
        "overlap_compress",
        "rolled_back",
        "_discarded",
        "wait_s",
        "_inflight",
        "_landed",
        "_own_ok",
        # the commits of the step whose buckets are landing, undone if a later bucket of the same
        # step turns out skipped: (hook step, memory, (entries, extra) before the commit)
        "_step_commits",
        "_bad_step",
        # synchronous exchanges may land out of order and on gloo's threads: per hook step
        # [buckets launched, buckets landed, last bucket launched], and the lock of the decodes
        "_landing",
        "_lock",
    ]

    def __init__(
        self,
        compressor: Any = "topk",
        density: Optional[float] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        warmup_steps: int = 1,
        max_bad_steps: int = 3,
        **options: Any,
    ) -> None:
        if isinstance(compressor, Compressor):
            if density is not None or options:
                raise ValueError("CompressionState: give options to the compressor object, not here")
            self.compressor = compressor
        else:
            # Dense compressors have no density: the same call works for every name.
            if density is not None and "density" in compressor_class(compressor).OPTIONS:
                options["density"] = density
            self.compressor = get_compressor(compressor, **options)
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"CompressionState: warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        if not isinstance(max_bad_steps, int) or isinstance(max_bad_steps, bool) or max_bad_steps < 1:
            raise ValueError(f"CompressionState: max_bad_steps must be an integer >= 1, got {max_bad_steps!r}")
        self.process_group = process_group
        self.warmup_steps = warmup_steps
        # Steps in a row with a malformed payload before the hook raises (naming the sender).
        self.max_bad_steps = max_bad_steps
        self.bad_payloads = 0
        self.bad_payload_ranks: Dict[int, int] = {}
        self._bad_streak = 0
        self._bad_this_step = False
        self.memory = MemoryBank()
        self.step = 0
        self._param_keys: Dict[int, int] = {}
        self._verified: Dict[int, int] = {}
        # While True the hook only learns bucket layouts and all-reduces densely, counting and
        # changing nothing (a resumed run replays DDP's first iteration this way; see training.py).
        self.observing = False
        self.wire_bytes = 0
        self.dense_bytes = 0
        self.compressed_steps = 0
        self.skipped_steps = 0
        self.compress_s = 0.0
        self.decode_s = 0.0
        self.probe_s = 0.0
        self.probe_count = 0
        self._last_probe: Optional[int] = None
        self._last_launch: Optional[float] = None
        self.speculative: Optional[float] = None
        # speculative: commit memory when a payload is sent, so that the exchange also overlaps
        # the next step's compression (set by the wrapper; see finish_exchanges)
        self.overlap_compress = False
        self.rolled_back = 0  # speculative: exchanges dropped because an earlier one was skipped
        self._discarded: set = set()  # hook steps whose exchanges are all dropped
        self.wait_s = 0.0  # speculative: time blocked on exchanges that were not over yet
        self._inflight: List[_Exchange] = []
        self._landed: Dict[int, Landed] = {}
        self._own_ok: List[torch.Tensor] = []  # per bucket of this step: own update usable
        self._step_commits: List[Tuple[int, Any, Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]] = []
        self._bad_step: Optional[int] = None  # the hook step found skipped while it lands
        self._landing: Dict[int, List[Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ statistics
    def stats(self) -> Dict[str, Any]:
        """Totals since construction: ``wire_bytes`` (bytes this rank put on the wire, measured
        from the payload buffers), ``dense_bytes`` (what fp32 all-reduce would have sent),
        ``compression_ratio`` (their ratio), ``compress_s``/``decode_s`` (host time; on CUDA the
        kernels run asynchronously, so these time the launches), ``steps``, ``compressed_steps``,
        ``skipped_steps`` (non-finite steps or malformed payloads), ``wait_s`` (speculative
        training: time blocked on exchanges still in flight when they were needed), ``bad_payloads`` (payloads
        that were not well formed, by bucket) and ``bad_payload_ranks`` (``{sending rank:
        count}``); under speculative training with ``overlap_compress``, ``rolled_back``
        (exchanges dropped because an earlier step of theirs was skipped) and ``rollback_bytes``
        (memory held now to undo early commits); and the compressor's counters, e.g. ``adaptive``'s
        ``sent`` and ``wanted`` (entries put on the wire, and entries it would have sent without
        its capacity, summed over steps and buckets); ``memory_bytes``: the bytes of compressor
        memory this rank holds now (residuals, momenta, histories, predictors; measured from the
        tensors, see ``MemoryBank.nbytes`` for the split by name)."""
        counters: Dict[str, int] = {}
        for memory in self.memory.buckets.values():  # compressor counters ("stat_*" in extra)
            for key, value in memory.extra.items():
                if key.startswith("stat_"):
                    counters[key[5:]] = counters.get(key[5:], 0) + int(value)
        return {
            **counters,
            **self.compressor.stats(),
            "compressor": self.compressor.name,
            "steps": self.step,
            "compressed_steps": self.compressed_steps,
            "skipped_steps": self.skipped_steps,
            "wire_bytes": self.wire_bytes,
            "dense_bytes": self.dense_bytes,
            "compression_ratio": self.dense_bytes / self.wire_bytes if self.wire_bytes else float("nan"),
            "compress_s": self.compress_s,
            "decode_s": self.decode_s,
            "memory_bytes": self.memory.nbytes()["total"],
            "bad_payloads": getattr(self, "bad_payloads", 0),
            "bad_payload_ranks": dict(getattr(self, "bad_payload_ranks", {})),
            "probe_s": getattr(self, "probe_s", 0.0),
            "probes": getattr(self, "probe_count", 0),
            "wait_s": getattr(self, "wait_s", 0.0),
            "rolled_back": getattr(self, "rolled_back", 0),
            "rollback_bytes": self._rollback_bytes(),
        }

    def _rollback_bytes(self) -> int:
        """Bytes of compressor memory held only to roll back early commits still in flight."""
        def ident(t: torch.Tensor):
            storage = t.untyped_storage()
            return str(t.device), storage.data_ptr(), storage.nbytes()

        live = {ident(t) for m in self.memory.buckets.values() for t in (*m.entries.values(), *m.extra.values())
                if isinstance(t, torch.Tensor)}
        held = {}
        for exchange in getattr(self, "_inflight", []):
            for part in exchange.before or ():
                for t in part.values():
                    if isinstance(t, torch.Tensor) and ident(t) not in live:
                        held[ident(t)] = t.untyped_storage().nbytes()
        return sum(held.values())

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """This rank's state (not the process group): step, config, memory per parameter.

        Under speculative training, save the optimizer wrapper's state first
        (:meth:`gradsieve.SpeculativeOptimizer.state_dict` ends the exchanges in flight)."""
        if getattr(self, "_inflight", None) or getattr(self, "_landed", None):
            raise ValueError("CompressionState.state_dict: speculative exchanges are still in flight or "
                             "not applied; call the SpeculativeOptimizer's state_dict() (or "
                             "synchronize()) first")
        return {
            "config": self.compressor.config(),
            "warmup_steps": self.warmup_steps,
            "step": self.step,
            "memory": self.memory.state_dict(),
            "compressor_state": self.compressor.state_dict(),
            "stats": {k: getattr(self, k) for k in ("wire_bytes", "dense_bytes", "compressed_steps",
                                                     "skipped_steps", "compress_s", "decode_s",
                                                     "bad_payloads", "bad_payload_ranks", "probe_s",
                                                     "probe_count", "_last_probe", "wait_s",
                                                     "rolled_back")},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["config"] != self.compressor.config():
            raise ValueError(
                f"CompressionState.load_state_dict: the checkpoint was made with {state['config']}, "
                f"this state has {self.compressor.config()}"
            )
        self.warmup_steps = int(state["warmup_steps"])
        self.step = int(state["step"])
        self.memory.load_state_dict(state["memory"])
        self.compressor.load_state_dict(state.get("compressor_state", {}))
        for key, value in state.get("stats", {}).items():
            setattr(self, key, value)

    def __getstate__(self):
        skip = ("process_group", "_inflight", "_landed", "_own_ok", "_discarded", "_step_commits", "_bad_step",
                "_landing", "_lock")
        return {name: getattr(self, name) for name in self.__slots__ if name not in skip}

    def __setstate__(self, state):
        self.process_group = None
        self._inflight, self._landed, self._own_ok, self._discarded = [], {}, [], set()
        self._step_commits, self._bad_step, self._landing, self._lock = [], None, {}, threading.Lock()
        for name, value in state.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------------------ speculative
    def finish_exchanges(self, before: Optional[int] = None) -> None:
        """Speculative training: waits for the exchanges in flight (of hook steps before
        ``before``; all when None), decodes them, commits the compressor's memory exactly as the
        synchronous hook does, and keeps each bucket's average (None when the step is skipped)
        for the optimizer wrapper.

        Without ``overlap_compress`` the hook calls it before the next step's first bucket, so the
        compressor sees the sequence of compress, aggregate and commit of synchronous training.
        With it, each bucket's memory was committed when its payload was sent (nothing in a
        commit depends on the average then), the hook calls it after the next step's last
        bucket, and a skipped bucket is rolled back: its memory returns to what it was before
        that step, and every later exchange in flight (compressed from the memory being undone)
        is waited for and dropped, its step skipped on every rank too (``rolled_back`` counts
        them). Either way the memory after each step is what synchronous training would hold
        after the same steps were skipped."""
        while self._inflight and (before is None or self._inflight[0].at < before):
            exchange = self._inflight.pop(0)
            begun = time.perf_counter()
            gathered = exchange.future.wait()
            waited = time.perf_counter() - begun
            self.wait_s += waited
            landed = self._landed.setdefault(exchange.at, Landed(False, []))
            if exchange.at in self._discarded:
                self._drop(exchange)
                self.decode_s += time.perf_counter() - begun
                continue
            compressor = self.compressor
            average, flags = compressor.aggregate(gathered, exchange.layout, exchange.step)
            usable = bool(flags.all())
            if usable and self._bad_step != exchange.at:
                if exchange.before is None:
                    _keep_for_undo(self, exchange.at, exchange.memory)
                    average = compressor.commit(exchange.memory, exchange.pending, average, exchange.layout)
                else:
                    self._step_commits.append((exchange.at, exchange.memory, exchange.before))
                landed.buckets.append((exchange.params, average))
            else:
                # This bucket, or one before it of the same step, is skipped: so is the whole step.
                landed.buckets.append((exchange.params, None))
                if not usable:
                    _count_malformed(self, compressor)
                if exchange.before is not None:
                    self._roll_back(exchange)
                _skip_step(self, exchange.at)
            if exchange.last:
                if self._bad_step == exchange.at:
                    self.skipped_steps += 1
                _step_landed(self, exchange.at)
                if exchange.period:
                    compressor.note_timing(min(1.0, waited / exchange.period))
                _end_of_step(self)
            self.decode_s += time.perf_counter() - begun
        # A dropped step may still have buckets to come while the hook is in it (a finish before
        # compression, after DDP rebuilt its buckets); older ones can have nothing left.
        self._discarded = {a for a in self._discarded if a >= self.step - 1}

    def _drop(self, exchange: "_Exchange") -> None:
        """Skips an exchange compressed from memory that was rolled back since, and undoes its
        own commit."""
        self._landed.setdefault(exchange.at, Landed(False, [])).buckets.append((exchange.params, None))
        self.rolled_back += 1
        if exchange.last:
            self.skipped_steps += 1
        if exchange.before is not None:
            exchange.memory.entries, exchange.memory.extra = dict(exchange.before[0]), dict(exchange.before[1])

    def _roll_back(self, exchange: "_Exchange") -> None:
        """``exchange`` (committed early) is skipped: every later step in flight is dropped
        (newest first, each undoing its commit), then this bucket's memory goes back to what it
        was before ``exchange``'s step."""
        later = [x for x in self._inflight if x.at > exchange.at]
        self._discarded.update(x.at for x in later)
        self._inflight = [x for x in self._inflight if x.at <= exchange.at]
        for x in later:
            x.future.wait()
        for x in reversed(later):
            self._drop(x)
        memory = exchange.memory
        memory.entries, memory.extra = dict(exchange.before[0]), dict(exchange.before[1])

    def take_landed(self) -> Dict[int, "Landed"]:
        """The averages that arrived since the last call, by hook step (the wrapper's input)."""
        landed, self._landed = self._landed, {}
        return landed

    def report_metric(self, value: float, higher_is_better: bool = True) -> None:
        """Tells the compressor a validation metric (``predictive`` adapts its density to it).
        Every rank must report the same value at the same step: the next compressed step checks
        that the ranks agree on what follows from it, and fails on every rank if they do not."""
        self.compressor.report_metric(float(value), bool(higher_is_better))

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Lets the compressor warn about optimizer settings that clash with it (dgc: momentum)."""
        self.compressor.watch_optimizer(optimizer)

    def report_loss(self, loss: Any) -> None:
        """This rank's training loss of the step whose backward comes next (a float, or a 0-d
        tensor, which is not waited for). ``granular``'s ``auto`` policy uses it: its bandit is
        rewarded by the loss decrease, its rules measure the loss trend. Call it every step,
        before ``loss.backward()``; other compressors ignore it."""
        self.compressor.report_loss(loss)

    def probe(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
              batch: Any) -> bool:
        """Measures the curvature ``granular`` scores weights with, when it is due: call it every
        step after ``optimizer.step()``; every ``probe_every`` steps (the compressor's option) it
        estimates the Hessian diagonal of ``loss_fn(model, batch)`` with
        :func:`gradsieve.influence.hessian_diagonal` (``probes`` directions, 2 extra gradient
        evaluations each, weights, gradients, buffers and random state restored) and keeps it
        per parameter. Returns whether it probed. Compressors without ``probe_every`` ignore it.

        ``model``: the model (a DDP wrapper is unwrapped: the probe must not run DDP's
        reduction); ``loss_fn(model, batch)``: the scalar training loss."""
        every = getattr(self.compressor, "probe_every", 0)
        if not every or self.observing:
            return False
        if self._last_probe is not None and self.step - self._last_probe < every:
            return False
        from torch.nn.parallel import DistributedDataParallel

        from gradsieve.influence import hessian_diagonal

        if isinstance(model, DistributedDataParallel):
            model = model.module
        params = [p for p in model.parameters() if p.requires_grad and id(p) in self._param_keys]
        if not params:
            raise ValueError("CompressionState.probe: the hook has not seen this model's parameters "
                             "yet; call probe after a training step (after optimizer.step())")
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(1_000_003 * self.step + 17)
        diagonal = hessian_diagonal(model, loss_fn, batch, probes=self.compressor.probes,
                                    eps=self.compressor.eps, generator=generator, parameters=params)
        for p, d in zip(params, diagonal):
            self.compressor.store_hessian(self.memory.params, self._param_keys[id(p)], d)
        self._last_probe = self.step
        self.probe_count += 1
        self.probe_s += time.perf_counter() - started
        return True

    # ------------------------------------------------------------------------------ internals
    def layout_of(self, bucket: dist.GradBucket, world_size: int) -> BucketLayout:
        params = bucket.parameters()
        numels = tuple(p.numel() for p in params)
        for position, p in enumerate(params):
            self._param_keys.setdefault(id(p), (bucket.index() << 20) | position)
        if sum(numels) != bucket.buffer().numel():
            # Unknown layout: the bucket is one segment with a key of its own.
            return BucketLayout(bucket.buffer().numel(), (bucket.buffer().numel(),), (2,), world_size,
                                bucket.index(), ((bucket.index() << 20) | 0xFFFFF,))
        keys = tuple(self._param_keys[id(p)] for p in params)
        ndims = tuple(p.dim() for p in params)
        return BucketLayout(bucket.buffer().numel(), numels, ndims, world_size, bucket.index(), keys)


def _world(state: CompressionState) -> int:
    return dist.get_world_size(state.process_group)


def _all_gather(payload: torch.Tensor, world: int, group) -> torch.futures.Future:
    out = torch.empty(world * payload.numel(), dtype=payload.dtype, device=payload.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, payload, group=group, async_op=True)

    def gathered(fut: torch.futures.Future) -> torch.Tensor:
        # value() re-raises a failed or timed-out collective; without it the callback would read
        # a buffer the collective never filled.
        fut.value()
        return out.view(world, payload.numel())

    return work.get_future().then(gathered)


def _verify_config(state: CompressionState, layout: BucketLayout, nbytes: int, world: int,
                   device: torch.device) -> None:
    """At the first compressed step of a bucket layout, all ranks compare their configuration, so
    that a mismatch is a clear error on every rank instead of a hang or wrong numbers.

    No peer's bytes are ever unpickled: each rank hashes a canonical JSON text of its configuration
    and the 32-byte digests are all-gathered as a tensor. Only when they differ are the JSON texts
    themselves exchanged (as bytes, read with ``json.loads``) to name what differs."""
    mine = {"config": state.compressor.config(), "bucket_numel": layout.numel, "payload_bytes": nbytes,
            "warmup_steps": state.warmup_steps, "runtime": state.compressor.runtime(),
            "speculative": getattr(state, "speculative", None),
            "overlap_compress": bool(getattr(state, "overlap_compress", False))}
    text = json.dumps(mine, sort_keys=True).encode()
    digest = torch.tensor(list(hashlib.sha256(text).digest()), dtype=torch.uint8, device=device)
    digests = _gather_bytes(digest, world, state.process_group)
    if bool((digests == digest).all()):
        return
    # They differ: exchange the readable texts, padded to the longest.
    length = torch.tensor([len(text)], dtype=torch.int64, device=device)
    longest = int(_gather_bytes(length, world, state.process_group).max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    texts = _gather_bytes(padded, world, state.process_group).cpu()
    lines = []
    for rank in range(world):
        raw = bytes(texts[rank].tolist()).rstrip(b"\0")
        try:
            shown = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            shown = f"<unreadable configuration of {len(raw)} bytes>"
        lines.append(f"rank {rank}: {shown}")
    raise ValueError(f"gradsieve: ranks were configured differently for bucket {layout.index}: "
                     + "; ".join(lines))


def _gather_bytes(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's ``tensor`` (same size everywhere), as [world, numel]; blocking."""
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.contiguous(), group=group)
    return out.view(world, -1)


def _dense_hook(state: CompressionState, bucket: dist.GradBucket, world: int,
                count: bool = True, step: int = 0) -> torch.futures.Future:
    buffer = bucket.buffer()
    dtype = state.compressor.allreduce_dtype or buffer.dtype
    tensor = buffer.to(dtype) if dtype != buffer.dtype else buffer
    if count:
        state.wire_bytes += tensor.numel() * tensor.element_size()
        state.dense_bytes += buffer.numel() * 4
    work = dist.all_reduce(tensor, group=state.process_group, async_op=True)

    keep = count and getattr(state, "speculative", None) is not None

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        buffer.copy_(reduced.div_(world))
        if keep:  # speculative training: the wrapper applies it to the global weights too
            landed = state._landed.setdefault(step, Landed(True, []))
            landed.buckets.append((tuple(bucket.parameters()), buffer.clone()))
        return buffer

    return work.get_future().then(finish)


def _count_malformed(state: CompressionState, compressor) -> None:
    """After a skipped bucket: counts the payloads that were not well formed, by sender (the skip
    decision has synchronised with the device already; this reads a few flags more)."""
    malformed = getattr(compressor, "last_malformed", None)
    if malformed is None or not bool(malformed.any()):
        return
    for rank in malformed.nonzero().flatten().tolist():
        state.bad_payloads += 1
        state.bad_payload_ranks[rank] = state.bad_payload_ranks.get(rank, 0) + 1
    state._bad_this_step = True


def _keep_for_undo(state: CompressionState, at: int, memory) -> None:
    """Before a bucket of hook step ``at`` commits: keeps its memory as it is (the tensors, not a
    copy: commits replace them), so that the commit can be undone if a later bucket of the same
    step is skipped. A compressor whose commit does more than replace its memory's tensors
    (``rollback_safe`` False) keeps the commit."""
    if getattr(state.compressor, "rollback_safe", True):
        state._step_commits.append((at, memory, (dict(memory.entries), dict(memory.extra))))


def _skip_step(state: CompressionState, at: int) -> None:
    """Hook step ``at`` is skipped: the commits its earlier buckets made are undone, newest first,
    and its later buckets do not commit."""
    if state._bad_step == at:
        return
    state._bad_step = at
    for step, memory, (entries, extra) in reversed(state._step_commits):
        if step == at:
            memory.entries, memory.extra = dict(entries), dict(extra)
    state._step_commits = [c for c in state._step_commits if c[0] != at]


def _step_landed(state: CompressionState, at: int) -> None:
    """The last bucket of hook step ``at`` has landed: its commits stand."""
    state._step_commits = [c for c in state._step_commits if c[0] > at]


def _end_of_step(state: CompressionState) -> None:
    if not getattr(state, "_bad_this_step", False):
        state._bad_streak = 0
        return
    state._bad_this_step = False
    state._bad_streak += 1
    if state._bad_streak >= state.max_bad_steps:
        ranks = sorted(state.bad_payload_ranks)
        raise RuntimeError(
            f"gradsieve: malformed payloads for {state._bad_streak} steps in a row (max_bad_steps="
            f"{state.max_bad_steps}) from rank(s) {ranks} (counts {state.bad_payload_ranks}): a peer "
            "is sending corrupted data")


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compressed exchange of one gradient bucket.

    Register with ``ddp_model.register_comm_hook(state, gradsieve.compression_hook)``.
    """
    world = _world(state)
    if getattr(state, "observing", False):
        if not state.compressor.dense:
            state.layout_of(bucket, world)
        return _dense_hook(state, bucket, world, count=False)
    if bucket.is_last():
        step_now = state.step
        state.step += 1
    else:
        step_now = state.step
    compressor = state.compressor
    if compressor.dense or step_now < state.warmup_steps:
        if not compressor.dense:
            state.layout_of(bucket, world)  # learn parameter keys from DDP's first layout
        return _dense_hook(state, bucket, world, step=step_now)

    speculative = getattr(state, "speculative", None) is not None
    if speculative:
        if not compressor.returns_average:
            raise ValueError(f"gradsieve: speculative training needs a compressor whose result is the "
                             f"average of the payloads; {compressor.name!r} is not one")
    started = time.perf_counter()
    buffer = bucket.buffer()
    layout = state.layout_of(bucket, world)
    early = speculative and bool(getattr(state, "overlap_compress", False))
    if speculative and state._inflight and state._inflight[0].at != step_now:
        # The previous step's exchanges end before this step's memory is read, unless its memory
        # was committed early and this bucket is the one it was (DDP may rebuild its buckets).
        if not early or not any(x.layout == layout for x in state._inflight if x.at != step_now):
            state.finish_exchanges(before=step_now)
    memory = state.memory.get(layout.index, layout.keys, layout.param_numels,
                              compressor.memory_names, buffer.device, compressor.memory_dtypes)
    compressed_step = step_now - state.warmup_steps
    compressed = compressor.compress(buffer.float(), memory, layout, compressed_step)
    payload = compressed.payload
    verified = (payload.numel(), json.dumps(compressor.runtime(), sort_keys=True),
                getattr(state, "speculative", None), bool(getattr(state, "overlap_compress", False)))
    if speculative and sum(p.numel() for p in bucket.parameters()) != layout.numel:
        raise ValueError("gradsieve: speculative training needs DDP buckets made of whole parameters")
    if state._verified.get(layout.index) != verified:
        _verify_config(state, layout, payload.numel(), world, payload.device)
        state._verified[layout.index] = verified
    state.wire_bytes += payload.numel() * payload.element_size()
    state.dense_bytes += layout.numel * 4
    state.compress_s += time.perf_counter() - started
    launched = time.perf_counter()
    period = None
    if bucket.is_last():
        state.compressed_steps += 1
        if state._last_launch is not None:
            period = launched - state._last_launch
        state._last_launch = launched

    if speculative:
        # The exchange goes on while the next step runs; DDP gets this rank's own sent update
        # (the optimizer wrapper applies it to the working weights) and does not wait.
        future = _all_gather(payload, world, state.process_group)
        before = None
        if early:
            before = (dict(memory.entries), dict(memory.extra))
            compressor.commit(memory, compressed.pending, None, layout)
        state._inflight.append(_Exchange(step_now, compressed_step, tuple(bucket.parameters()), layout,
                                         memory, compressed.pending, future, bucket.is_last(), period,
                                         before))
        own, usable = compressor.own_update(compressed, layout, compressed_step)
        state._own_ok.append(usable)
        buffer.copy_(own)
        if early and bucket.is_last():
            # overlap_compress: the previous step's exchanges had all of this step's compression
            # to end in; they end now, before the optimizer step that applies them.
            state.finish_exchanges(before=step_now)
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done

    with state._lock:
        counts = state._landing.setdefault(step_now, [0, 0, False])
        counts[0] += 1
        counts[2] = counts[2] or bucket.is_last()

    def decode(fut: torch.futures.Future) -> torch.Tensor:
        # Exchanges can land out of order, on gloo's threads: one decode at a time, and the step
        # ends with the last of its buckets to land, whichever that is.
        with state._lock:
            begun = time.perf_counter()
            gathered = fut.value()
            average, flags = compressor.aggregate(gathered, layout, compressed_step)
            usable = bool(flags.all())
            if usable and state._bad_step != step_now:
                _keep_for_undo(state, step_now, memory)
                result = compressor.commit(memory, compressed.pending, average, layout)
            else:
                # This bucket, or one before it of the same step, is skipped: so is the whole
                # step, and the buckets of the step that committed already are undone.
                result = torch.full_like(average, float("nan"))
                if not usable:
                    _count_malformed(state, compressor)
                _skip_step(state, step_now)
            if bucket.is_last() and period:
                # The share of the step this rank waited for its last exchange: the signal of a
                # communication-bound step (granular's auto policy).
                compressor.note_timing(min(1.0, (begun - launched) / period))
            counts = state._landing[step_now]
            counts[1] += 1
            if counts[2] and counts[1] == counts[0]:
                del state._landing[step_now]
                if state._bad_step == step_now:
                    state.skipped_steps += 1
                _step_landed(state, step_now)
                _end_of_step(state)
            buffer.copy_(result)
            state.decode_s += time.perf_counter() - begun
        return buffer

    return _all_gather(payload, world, state.process_group).then(decode)

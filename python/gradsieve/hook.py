"""The DDP communication hook.

Three lines in a DDP script::

    state = gradsieve.CompressionState(compressor="topk", density=0.01)
    ddp_model.register_comm_hook(state, gradsieve.compression_hook)
    # ... train as usual; state.stats() tells how many bytes crossed the wire

For each bucket the hook asks the compressor for a packed payload (the same size on every rank),
hands it to the state's exchange (:mod:`gradsieve.exchange`), and when it lands decodes the
world's payloads into the bucket (:mod:`gradsieve.compressor` describes the steps;
:mod:`gradsieve.ledger` the commit or skip of each). Dense compressors and the first
``warmup_steps`` steps are summed densely, as DDP rebuilds its buckets after the first iteration.
Under speculative training (:mod:`gradsieve.inflight`) the exchange is left in flight and DDP gets
this rank's own update. The returned future does not block the backward pass.

A bucket's first call checks that every rank is configured alike (:mod:`gradsieve.config_check`).
After :meth:`CompressionState.load_state_dict`, DDP's first iteration is run in the saved run's
bucket layout (:mod:`gradsieve.resume`), so a restored run continues as the saved one would have.
"""

# No "from __future__ import annotations": DDP checks the hook's annotations as objects.
import functools
import time
from typing import Optional

import torch
import torch.distributed as dist

from gradsieve.config_check import verify_config
from gradsieve.exchange import run_now
from gradsieve.ledger import BucketJob
from gradsieve.signals import CommShare
from gradsieve.state import CompressionState

__all__ = ["CompressionState", "compression_hook"]


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compressed exchange of one gradient bucket.

    Register with ``ddp_model.register_comm_hook(state, gradsieve.compression_hook)``.
    """
    world = state.exchange.world_size
    state.layout_of(bucket, world)  # learns parameter keys from DDP's first layout
    if bucket.index() not in state._verified:
        # A bucket's first call, warm-up included: ranks configured differently (warm-up, exchange,
        # compressor) fail here, before any of them starts a collective the others do not.
        verify_config(state, bucket.index(), bucket.buffer().numel(), world, bucket.buffer().device)
        state._verified[bucket.index()] = ("first",)
    if state.first_iteration is not None:
        # DDP's first iterations after a restore: compressed in the saved run's bucket layout.
        return state.first_iteration.take(state, bucket, _exchange)
    return _exchange(state, bucket)


def _exchange(state: CompressionState, bucket) -> torch.futures.Future:
    """The bucket's step: dense in the warm-up and for dense compressors, else compressed and
    handed to the exchange."""
    world = state.exchange.world_size
    compressor = state.compressor
    at = state.step
    if state.ledger.ended:
        # The first bucket of a new step: the flags of the steps that ended on the device, read
        # from their host copies (a step's memory is undone here when it was skipped).
        with state.ledger.lock:
            state.ledger.resolve(state)
    if bucket.is_last():
        state.step += 1
    if compressor.traits.dense or at < state.warmup_steps:
        return _dense(state, bucket, world, at=at)
    speculative = state.speculative is not None
    early = speculative and bool(state.overlap_compress)
    job = _compress(state, bucket, at, world, speculative, early)
    if speculative:
        return state.inflight.launch(state, job, bucket.buffer(), early)
    state.ledger.launched(at, job.last)
    # The payloads land in a buffer kept for this bucket: decoded before its next step's exchange.
    collective = job.round.send(job.compressed)
    received = state.exchange.issue(collective._replace(key=("payload", job.layout.index)))
    if not job.round.gathers_back:
        return received.then(functools.partial(_land, state, job, bucket.buffer()))
    # The round ends with a collective of its own (the hierarchical exchange's all-gather inside
    # the node): issued from the landing callback, in the order the rounds were launched.
    out = torch.futures.Future(devices=[bucket.buffer().device] if bucket.buffer().is_cuda else None)
    ticket = state.in_order.enter()
    received.then(functools.partial(_land_first, state, job, bucket.buffer(), out, ticket))
    return out


def _compress(state: CompressionState, bucket: dist.GradBucket, at: int, world: int, speculative: bool,
              early: bool) -> BucketJob:
    """Compresses the bucket (checking the configuration across ranks when it is new) and counts
    its bytes; the exchange is not started yet."""
    compressor = state.compressor
    if speculative and not compressor.traits.returns_average:
        raise ValueError(f"gradsieve: speculative training needs a compressor whose result is the "
                         f"average of the payloads; {compressor.name!r} is not one")
    if speculative and not state.exchange.speculative_ok:
        raise ValueError(f"gradsieve: speculative training needs an exchange of whole buckets' payloads "
                         f"(allgather), got {state.exchange.name!r}")
    started = time.perf_counter()
    buffer = bucket.buffer()
    bucket_layout = state.layout_of(bucket, world)
    if speculative:
        state.inflight.before_compress(state, at, bucket_layout, early)
    verified = (bucket_layout.numel, compressor.runtime(), state.speculative, bool(state.overlap_compress))
    if state._verified.get(bucket_layout.index) != verified:
        verify_config(state, bucket_layout.index, bucket_layout.numel, world, buffer.device)
        state._verified[bucket_layout.index] = verified
    exchange = state.exchange
    round_ = exchange.round(buffer, bucket_layout, exchange.rank)
    grad, layout = run_now(exchange, round_.prepare())
    memory = state.memory.get(layout.index, layout.keys, layout.param_numels,
                              compressor.memory_names, buffer.device, compressor.memory_dtypes)
    step = at - state.warmup_steps
    compressed = run_now(exchange, round_.compress(compressor, grad, memory, layout, step))
    payload = compressed.payload
    if speculative and sum(p.numel() for p in bucket.parameters()) != layout.numel:
        raise ValueError("gradsieve: speculative training needs DDP buckets made of whole parameters")
    state.wire_bytes += payload.numel() * payload.element_size() + round_.index_bytes
    state.node_bytes += round_.node_bytes
    state.dense_bytes += bucket_layout.numel * buffer.element_size()  # DDP's all-reduce of the bucket
    state.compress_s += time.perf_counter() - started
    launched = time.perf_counter()
    period = None
    if bucket.is_last():
        state.compressed_steps += 1
        if state._last_launch is not None:
            period = launched - state._last_launch
        state._last_launch = launched
    return BucketJob(at, step, tuple(bucket.parameters()), layout, memory, compressed, bucket.is_last(),
                     launched, period, round=round_)


def on_device(state: CompressionState) -> bool:
    """Whether the hook decides a step's fate on the device (no host read per bucket): commits
    are optimistic and undone when the flags, read once per step, say the step was skipped. A
    compressor whose commit cannot be undone (``traits.rollback_safe`` False) reads each bucket's
    flags on the host instead."""
    return state.compressor.traits.rollback_safe


def _nan_where_skipped(ok: torch.Tensor, result: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``result``, or NaN everywhere when ``ok`` (a bool tensor) is False; written into ``out``
    when given (one pass either way)."""
    nan = _NAN.get((result.dtype, result.device))
    if nan is None:  # a 0-d tensor made on the device (a fill, not a copy from the host)
        nan = _NAN.setdefault((result.dtype, result.device),
                              torch.full((), float("nan"), dtype=result.dtype, device=result.device))
    if out is None:
        return torch.where(ok, result, nan)
    if out.dtype == result.dtype and out.shape == result.shape:
        if out.data_ptr() == result.data_ptr():  # decoded into the bucket already
            return out.masked_fill_(ok.logical_not(), nan)
        return torch.where(ok, result, nan, out=out)
    return out.copy_(torch.where(ok, result, nan))


_NAN: dict = {}


def _land(state: CompressionState, job: BucketJob, buffer: torch.Tensor, fut: torch.futures.Future) -> torch.Tensor:
    """A synchronous bucket's exchange has landed: decode, commit or skip, end the step when it is
    the last of its buckets. Exchanges can land out of order, on gloo's threads: one at a time."""
    ledger = state.ledger
    if on_device(state):
        with ledger.lock:
            begun = time.perf_counter()
            # A float32 bucket takes the average straight from the decode (its gradient was read).
            mine = job.round.buffer
            into = buffer if (buffer.dtype == torch.float32 and buffer.is_contiguous()
                              and mine.data_ptr() == buffer.data_ptr() and mine.numel() == buffer.numel()
                              and buffer.numel() == job.layout.numel) else None
            result, ok, _ = ledger.settle_on_device(state, job, fut.value(), out=into)
            _comm_share(state, job, begun)
            result, _, _ = run_now(state.exchange, job.round.finish(result, ok))
            _nan_where_skipped(ok, result, out=buffer)
            ledger.landed(state, job.at, on_device=True)
            state.decode_s += time.perf_counter() - begun
        return buffer
    with ledger.lock:
        begun = time.perf_counter()
        result, _ = _settle(state, job, fut.value(), begun)
        result, _, _ = run_now(state.exchange, job.round.finish(result, True))
        job.round.settled(ledger.bad_step != job.at)
        ledger.landed(state, job.at)
        buffer.copy_(result)
        state.decode_s += time.perf_counter() - begun
    return buffer


def _settle(state: CompressionState, job: BucketJob, received: torch.Tensor, begun: float):
    """Decodes and commits (or skips) this rank's part of a landed bucket (under the ledger's
    lock); its result (NaN when the step is skipped) and the :class:`Aggregated`."""
    ledger = state.ledger
    result, aggregated = ledger.settle(state, job, received)
    if result is None:
        # This bucket, or one before it of the same step, is skipped: so is the whole step,
        # and the buckets of the step that committed already are undone.
        result = torch.full_like(aggregated.average, float("nan"))
        ledger.skip(job.at)
    _comm_share(state, job, begun)
    return result, aggregated


def _comm_share(state: CompressionState, job: BucketJob, begun: float) -> None:
    if job.last and job.period:
        # The share of the step this rank waited for its last exchange: the signal of a
        # communication-bound step (granular's auto policy).
        state.signal(CommShare(min(1.0, (begun - job.launched) / job.period)))


def _land_first(state: CompressionState, job: BucketJob, buffer: torch.Tensor, out: torch.futures.Future,
                ticket: list, fut: torch.futures.Future) -> None:
    """A round that gathers back: its part has landed. Settles it and issues the round's last
    collective when every round launched before it has issued theirs."""
    try:
        with state.ledger.lock:
            begun = time.perf_counter()
            if on_device(state):
                result, usable, aggregated = state.ledger.settle_on_device(state, job, fut.value())
                _comm_share(state, job, begun)
                result = _nan_where_skipped(usable, result)
                malformed = ~aggregated.well_formed
            else:
                result, aggregated = _settle(state, job, fut.value(), begun)
                usable = state.ledger.bad_step != job.at
                malformed = () if usable else tuple((~aggregated.well_formed).nonzero().flatten().tolist())
            phase = job.round.finish(result, usable, malformed)
            collective = next(phase)
            state.decode_s += time.perf_counter() - begun

        def issue() -> None:
            state.exchange.issue(collective).then(
                functools.partial(_land_second, state, job, buffer, out, phase))

        state.in_order.ready(ticket, issue)
    except BaseException as err:  # noqa: B902  (DDP raises it from the bucket's future)
        state.in_order.ready(ticket, None)
        out.set_exception(err)


def _land_second(state: CompressionState, job: BucketJob, buffer: torch.Tensor, out: torch.futures.Future,
                 phase, fut: torch.futures.Future) -> None:
    """A round that gathers back has ended: the whole step is skipped unless every rank's part
    was usable; the bucket goes to DDP."""
    try:
        try:
            phase.send(fut.value())
            raise RuntimeError(f"exchange {state.exchange.name!r}: a round's finish asked for a second collective")
        except StopIteration as stop:
            bucket, every, elsewhere = stop.value
        ledger = state.ledger
        with ledger.lock:
            begun = time.perf_counter()
            if on_device(state):
                # every: a bool tensor; elsewhere: bool[world], by sending rank.
                ledger.note_elsewhere(job.at, elsewhere)
                ledger.step_ok(job.at, every)
                _nan_where_skipped(every, bucket, out=buffer)
                ledger.landed(state, job.at, on_device=True)
                state.decode_s += time.perf_counter() - begun
                out.set_result(buffer)
                return
            every = bool(every)
            ledger.count_senders(state, elsewhere.nonzero().flatten().tolist())
            if not every:
                ledger.skip(job.at)
                bucket = torch.full_like(bucket, float("nan"))
            job.round.settled(ledger.bad_step != job.at)
            ledger.landed(state, job.at)
            buffer.copy_(bucket)
            state.decode_s += time.perf_counter() - begun
        out.set_result(buffer)
    except BaseException as err:  # noqa: B902
        out.set_exception(err)


def _dense(state: CompressionState, bucket: dist.GradBucket, world: int, at: int = 0) -> torch.futures.Future:
    """The bucket summed densely (in the compressor's all-reduce dtype) and averaged."""
    buffer = bucket.buffer()
    dtype = state.compressor.traits.allreduce_dtype or buffer.dtype
    tensor = buffer.to(dtype) if dtype != buffer.dtype else buffer
    state.wire_bytes += tensor.numel() * tensor.element_size()
    state.dense_bytes += buffer.numel() * buffer.element_size()
    keep = state.speculative is not None

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(fut.value().div_(world))
        if keep:  # speculative training: the wrapper applies it to the global weights too
            state.inflight.keep_dense(at, tuple(bucket.parameters()), buffer.clone())
        return buffer

    return state.exchange.reduce(tensor).then(finish)

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
"""

# No "from __future__ import annotations": DDP checks the hook's annotations as objects.
import functools
import time

import torch
import torch.distributed as dist

from gradsieve.config_check import verify_config
from gradsieve.ledger import BucketJob
from gradsieve.signals import CommShare
from gradsieve.state import CompressionState

__all__ = ["CompressionState", "compression_hook"]


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compressed exchange of one gradient bucket.

    Register with ``ddp_model.register_comm_hook(state, gradsieve.compression_hook)``.
    """
    world = state.exchange.world_size
    compressor = state.compressor
    if state.observing:  # learn the layout, change and count nothing
        if not compressor.traits.dense:
            state.layout_of(bucket, world)
        return _dense(state, bucket, world, count=False)
    at = state.step
    if bucket.is_last():
        state.step += 1
    if compressor.traits.dense or at < state.warmup_steps:
        if not compressor.traits.dense:
            state.layout_of(bucket, world)  # learn parameter keys from DDP's first layout
        return _dense(state, bucket, world, at=at)
    speculative = state.speculative is not None
    early = speculative and bool(state.overlap_compress)
    job = _compress(state, bucket, at, world, speculative, early)
    if speculative:
        return state.inflight.launch(state, job, bucket.buffer(), early)
    state.ledger.launched(at, job.last)
    return state.exchange.start(job.compressed.payload).then(
        functools.partial(_land, state, job, bucket.buffer()))


def _compress(state: CompressionState, bucket: dist.GradBucket, at: int, world: int, speculative: bool,
              early: bool) -> BucketJob:
    """Compresses the bucket (checking the configuration across ranks when it is new) and counts
    its bytes; the exchange is not started yet."""
    compressor = state.compressor
    if speculative and not compressor.traits.returns_average:
        raise ValueError(f"gradsieve: speculative training needs a compressor whose result is the "
                         f"average of the payloads; {compressor.name!r} is not one")
    started = time.perf_counter()
    buffer = bucket.buffer()
    layout = state.layout_of(bucket, world)
    if speculative:
        state.inflight.before_compress(state, at, layout, early)
    memory = state.memory.get(layout.index, layout.keys, layout.param_numels,
                              compressor.memory_names, buffer.device, compressor.memory_dtypes)
    step = at - state.warmup_steps
    compressed = compressor.compress(buffer.float(), memory, layout, step)
    payload = compressed.payload
    if speculative and sum(p.numel() for p in bucket.parameters()) != layout.numel:
        raise ValueError("gradsieve: speculative training needs DDP buckets made of whole parameters")
    verified = (payload.numel(), compressor.runtime(), state.speculative, bool(state.overlap_compress))
    if state._verified.get(layout.index) != verified:
        verify_config(state, layout, payload.numel(), world, payload.device)
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
    return BucketJob(at, step, tuple(bucket.parameters()), layout, memory, compressed, bucket.is_last(),
                     launched, period)


def _land(state: CompressionState, job: BucketJob, buffer: torch.Tensor, fut: torch.futures.Future) -> torch.Tensor:
    """A synchronous bucket's exchange has landed: decode, commit or skip, end the step when it is
    the last of its buckets. Exchanges can land out of order, on gloo's threads: one at a time."""
    ledger = state.ledger
    with ledger.lock:
        begun = time.perf_counter()
        result, aggregated = ledger.settle(state, job, fut.value())
        if result is None:
            # This bucket, or one before it of the same step, is skipped: so is the whole step,
            # and the buckets of the step that committed already are undone.
            result = torch.full_like(aggregated.average, float("nan"))
            ledger.skip(job.at)
        if job.last and job.period:
            # The share of the step this rank waited for its last exchange: the signal of a
            # communication-bound step (granular's auto policy).
            state.signal(CommShare(min(1.0, (begun - job.launched) / job.period)))
        ledger.landed(state, job.at)
        buffer.copy_(result)
        state.decode_s += time.perf_counter() - begun
    return buffer


def _dense(state: CompressionState, bucket: dist.GradBucket, world: int, count: bool = True,
           at: int = 0) -> torch.futures.Future:
    """The bucket summed densely (in the compressor's all-reduce dtype) and averaged."""
    buffer = bucket.buffer()
    dtype = state.compressor.traits.allreduce_dtype or buffer.dtype
    tensor = buffer.to(dtype) if dtype != buffer.dtype else buffer
    if count and state.compressor.traits.dense:
        # A dense compressor's ranks check their configuration at a bucket's first step too.
        verified = ("dense", tensor.numel(), str(dtype))
        if state._verified.get(bucket.index()) != verified:
            verify_config(state, state.layout_of(bucket, world), tensor.numel() * tensor.element_size(), world,
                          tensor.device)
            state._verified[bucket.index()] = verified
    if count:
        state.wire_bytes += tensor.numel() * tensor.element_size()
        state.dense_bytes += buffer.numel() * 4
    keep = count and state.speculative is not None

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        buffer.copy_(fut.value().div_(world))
        if keep:  # speculative training: the wrapper applies it to the global weights too
            state.inflight.keep_dense(at, tuple(bucket.parameters()), buffer.clone())
        return buffer

    return state.exchange.reduce(tensor).then(finish)

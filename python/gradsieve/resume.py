"""DDP's first iteration after a restore, run in the bucket layout the saved run was in.

A fresh DDP starts from its initial bucket layout and rebuilds its buckets after the first
iteration, in the order the gradients became ready. A run saved after that rebuild compressed in
the rebuilt layout, and per-bucket compression (one k over a bucket, a threshold per bucket, a
chunking of the bucket) depends on the layout: so a restored run must compress its first
iteration in the saved layout to continue bit for bit.

The hook does that by itself after :meth:`CompressionState.load_state_dict`: while DDP's buckets
are not the saved layout's, it holds them (their futures stay open), and when DDP's last bucket
has come it builds the saved layout's buckets from the held gradients, runs the ordinary hook on
each, in order, and writes each parameter's result back into the bucket DDP gave it. DDP waits for
the buckets' futures only at the end of the backward pass, so holding them changes nothing else.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["SavedLayoutBucket", "FirstIteration"]


class SavedLayoutBucket:
    """Stands in for a ``dist.GradBucket`` of the saved layout: bucket ``index`` holding
    ``params`` (whose gradients are ``buffer``, flat, in that order)."""

    __slots__ = ("_index", "_buffer", "_params", "_last")

    def __init__(self, index: int, buffer: torch.Tensor, params: Sequence[torch.Tensor], last: bool) -> None:
        self._index, self._buffer, self._params, self._last = index, buffer, list(params), last

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> List[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return self._last


class FirstIteration:
    """Runs DDP's first iterations after a restore in the saved layout (see the module's text).

    Each of DDP's buckets that is the saved layout's bucket of the same index, with every bucket
    before it in this iteration, goes through the hook as it is. From the first one that is not,
    the rest of the iteration is held, and run in the saved layout when DDP's last bucket comes.
    An iteration that DDP ran wholly in the saved layout ends the restore. DDP rebuilds its buckets
    after its first iteration (after its second with ``static_graph``); when it is still not in the
    saved layout after ``MAX_ITERATIONS`` (a different ``bucket_cap_mb``, a changed model), the
    hook warns once and goes on in DDP's layout."""

    MAX_ITERATIONS = 3

    def __init__(self, layouts: Sequence[Sequence[int]]) -> None:
        self.layouts = [tuple(int(k) for k in keys) for keys in layouts]
        self.iterations = 0
        self._begin()

    def _begin(self) -> None:
        self.holding: int = -1  # the saved bucket index from which this iteration is held
        self.held: List[Tuple[torch.Tensor, Tuple[int, ...], Tuple[int, ...], torch.futures.Future]] = []
        self.grads: Dict[int, torch.Tensor] = {}
        self.params: Dict[int, torch.Tensor] = {}

    def take(self, state: Any, bucket: dist.GradBucket, run: Callable[[Any, Any], torch.futures.Future]
             ) -> torch.futures.Future:
        """One of DDP's buckets. ``run(state, bucket)``: the hook's ordinary path. Returns the
        bucket's future (for a held bucket, completed when the held part of the iteration is)."""
        index = bucket.index()
        params = tuple(bucket.parameters())
        numels = tuple(p.numel() for p in params)
        buffer = bucket.buffer()
        known = sum(numels) == buffer.numel()
        keys = tuple(state.param_key(p) for p in params) if known else None
        if self.holding < 0 and index < len(self.layouts) and keys == self.layouts[index]:
            out = run(state, bucket)
            if bucket.is_last():
                self._end(state, index == len(self.layouts) - 1)
            return out
        if not known:
            raise ValueError("gradsieve: resuming needs DDP buckets whose buffers hold their parameters' "
                             f"gradients (bucket {index} has {buffer.numel()} entries, its parameters "
                             f"{sum(numels)})")
        if self.holding < 0:
            self.holding = index
        offset = 0
        for key, p, numel in zip(keys, params, numels):
            self.grads[key] = buffer[offset:offset + numel]
            self.params[key] = p
            offset += numel
        out = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
        self.held.append((buffer, keys, numels, out))
        if bucket.is_last():
            held, rest = self.held, self.layouts[self.holding:]
            self._run(state, run, held, rest)
            # The run is in the saved layout: a checkpoint taken now records it.
            state._layouts = dict(enumerate(self.layouts))
            self._end(state, False)
        return out

    def _end(self, state: Any, in_saved_layout: bool) -> None:
        """An iteration is over: the restore ends when DDP ran it in the saved layout, or gives up."""
        self.iterations += 1
        self._begin()
        if in_saved_layout:
            state.first_iteration = None
        elif self.iterations >= self.MAX_ITERATIONS:
            state.first_iteration = None
            warnings.warn(f"gradsieve: after {self.iterations} iterations DDP's bucket layout is still not "
                          "the checkpoint's (was the model or bucket_cap_mb changed?); going on in DDP's "
                          "layout, so the resumed run is not bit for bit the saved one's continuation",
                          stacklevel=4)

    def _run(self, state: Any, run: Callable[[Any, Any], torch.futures.Future], held, layouts) -> None:
        first = len(self.layouts) - len(layouts)
        grads, params = self.grads, self.params
        saved = [k for keys in layouts for k in keys]
        if sorted(saved) != sorted(grads):
            missing = sorted(set(saved) - set(grads))[:4]
            extra = sorted(set(grads) - set(saved))[:4]
            error = ValueError(
                "gradsieve: the checkpoint's bucket layout does not hold this model's parameters "
                f"(parameter keys only in the checkpoint: {missing}, only in the model: {extra}); "
                "load a checkpoint saved from the same model")
            for *_, out in held:
                out.set_exception(error)
            return
        try:
            buckets = []
            for index, keys in enumerate(layouts, start=first):
                buffer = torch.cat([grads[k].reshape(-1) for k in keys])
                buckets.append(SavedLayoutBucket(index, buffer, [params[k] for k in keys],
                                                 index == len(self.layouts) - 1))
            futures = [run(state, bucket) for bucket in buckets]
        except BaseException as err:  # noqa: B902  (DDP raises it from the buckets' futures)
            for *_, out in held:
                out.set_exception(err)
            return
        torch.futures.collect_all(futures).then(lambda done: _scatter(buckets, layouts, held, done))


def _scatter(buckets: Sequence[SavedLayoutBucket], layouts, held, done: torch.futures.Future) -> None:
    """Writes the saved layout's results back into the buckets DDP gave, and completes them."""
    try:
        for fut in done.value():
            fut.value()  # raises a bucket's error
        result: Dict[int, torch.Tensor] = {}
        for bucket, keys in zip(buckets, layouts):
            offset = 0
            for key, p in zip(keys, bucket.parameters()):
                result[key] = bucket.buffer()[offset:offset + p.numel()]
                offset += p.numel()
        for buffer, keys, numels, _ in held:
            offset = 0
            for key, numel in zip(keys, numels):
                buffer[offset:offset + numel].copy_(result[key])
                offset += numel
    except BaseException as err:  # noqa: B902
        for *_, out in held:
            out.set_exception(err)
        return
    for buffer, _, _, out in held:
        out.set_result(buffer)

"""DDP's first iteration after a restore, run in the bucket layout the saved run was in.

A fresh DDP starts from its initial bucket layout and rebuilds its buckets after the first
iteration, in the order the gradients became ready. A run saved after that rebuild compressed in
the rebuilt layout, and per-bucket compression (one k over a bucket, a threshold per bucket, a
chunking of the bucket) depends on the layout: so a restored run must compress its first
iteration in the saved layout to continue bit for bit.

The hook does that by itself after :meth:`CompressionState.load_state_dict`: in the first
iteration it holds every bucket DDP hands it (their futures stay open), and when the last has come
it builds the saved layout's buckets from the held gradients, runs the ordinary hook on each, in
order, and writes each parameter's result back into the bucket DDP gave it. DDP waits for the
buckets' futures only at the end of the backward pass, so holding them changes nothing else.
"""

from __future__ import annotations

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
    """Holds DDP's buckets of the first iteration after a restore (see the module's text)."""

    def __init__(self, layouts: Sequence[Sequence[int]]) -> None:
        self.layouts = [tuple(int(k) for k in keys) for keys in layouts]
        self.held: List[Tuple[torch.Tensor, Tuple[int, ...], Tuple[int, ...], torch.futures.Future]] = []
        self.grads: Dict[int, torch.Tensor] = {}
        self.params: Dict[int, torch.Tensor] = {}

    def hold(self, state: Any, bucket: dist.GradBucket, run: Callable[[Any, Any], torch.futures.Future]
             ) -> torch.futures.Future:
        """Takes one of DDP's buckets; the future completes when the whole iteration is done.
        ``run(state, bucket)``: the hook's ordinary path."""
        buffer = bucket.buffer()
        params = tuple(bucket.parameters())
        numels = tuple(p.numel() for p in params)
        if sum(numels) != buffer.numel():
            raise ValueError("gradsieve: resuming needs DDP buckets whose buffers hold their parameters' "
                             f"gradients (bucket {bucket.index()} has {buffer.numel()} entries, its "
                             f"parameters {sum(numels)})")
        keys = tuple(state.param_key(p) for p in params)
        offset = 0
        for key, p, numel in zip(keys, params, numels):
            self.grads[key] = buffer[offset:offset + numel]
            self.params[key] = p
            offset += numel
        out = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
        self.held.append((buffer, keys, numels, out))
        if bucket.is_last():
            self._run(state, run)
        return out

    def _run(self, state: Any, run: Callable[[Any, Any], torch.futures.Future]) -> None:
        saved = [k for keys in self.layouts for k in keys]
        if sorted(saved) != sorted(self.grads):
            missing = sorted(set(saved) - set(self.grads))[:4]
            extra = sorted(set(self.grads) - set(saved))[:4]
            error = ValueError(
                "gradsieve: the checkpoint's bucket layout does not hold this model's parameters "
                f"(parameter keys only in the checkpoint: {missing}, only in the model: {extra}); "
                "load a checkpoint saved from the same model")
            for *_, out in self.held:
                out.set_exception(error)
            return
        try:
            buckets = []
            for index, keys in enumerate(self.layouts):
                buffer = torch.cat([self.grads[k].reshape(-1) for k in keys])
                buckets.append(SavedLayoutBucket(index, buffer, [self.params[k] for k in keys],
                                                 index == len(self.layouts) - 1))
            futures = [run(state, bucket) for bucket in buckets]
        except BaseException as err:  # noqa: B902  (DDP raises it from the buckets' futures)
            for *_, out in self.held:
                out.set_exception(err)
            return
        torch.futures.collect_all(futures).then(lambda done: self._scatter(buckets, done))

    def _scatter(self, buckets: Sequence[SavedLayoutBucket], done: torch.futures.Future) -> None:
        try:
            for fut in done.value():
                fut.value()  # raises a bucket's error
            result: Dict[int, torch.Tensor] = {}
            for bucket, keys in zip(buckets, self.layouts):
                offset = 0
                for key, p in zip(keys, bucket.parameters()):
                    result[key] = bucket.buffer()[offset:offset + p.numel()]
                    offset += p.numel()
            for buffer, keys, numels, _ in self.held:
                offset = 0
                for key, numel in zip(keys, numels):
                    buffer[offset:offset + numel].copy_(result[key])
                    offset += numel
        except BaseException as err:  # noqa: B902
            for *_, out in self.held:
                out.set_exception(err)
            return
        for buffer, _, _, out in self.held:
            out.set_result(buffer)

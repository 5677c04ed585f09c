"""Ways of moving a bucket between ranks: one class each, behind one small interface.

The hook hands an exchange a packed payload (uint8, the same size on every rank) and gets back a
future of what the compressor's ``aggregate`` reads (for the all-gather: every rank's payload,
``uint8[world, nbytes]``). Dense buckets (dense compressors, warm-up steps) are summed with
:meth:`Exchange.reduce`. An exchange knows no algorithm; the hook knows no collective.

Registered by name like the compressors (``@register_exchange("name")``; ``CompressionState(...,
exchange="name")`` builds it for the state's process group):

* ``allgather``: one all-gather of every rank's payload (:class:`AllGatherExchange`).

:class:`LocalExchange` is the Simulator's: the workers of one process hand it their payloads in
turn, and the last one resolves every worker's future with the stacked payloads, as the all-gather
would (rank order).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from gradsieve.registry import Registry

__all__ = ["Exchange", "AllGatherExchange", "LocalExchange", "available_exchanges", "get_exchange",
           "register_exchange"]

_EXCHANGES = Registry("exchange")


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


class Exchange:
    """How one bucket's payloads move. Subclasses implement :meth:`start` and :meth:`reduce`."""

    name: str = "?"

    @property
    def world_size(self) -> int:
        raise NotImplementedError

    def start(self, payload: torch.Tensor) -> torch.futures.Future:
        """Starts moving this rank's ``payload`` (uint8[nbytes], the same size on every rank) and
        returns a future of what ``Compressor.aggregate`` reads. Does not block. A failed or timed
        out collective re-raises from the future."""
        raise NotImplementedError

    def reduce(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Starts summing ``tensor`` over the ranks; a future of the sum (a tensor of the same
        shape and dtype). Does not block."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """What must agree across ranks (compared with the compressor's configuration)."""
        return {"exchange": self.name}


@register_exchange("allgather")
class AllGatherExchange(Exchange):
    """One all-gather of every rank's payload: each rank receives ``(P - 1) * nbytes`` bytes per
    bucket, so its traffic grows with the number of ranks P.

    Args:
        process_group: the group to exchange in (default: the whole world).
    """

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None) -> None:
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def start(self, payload: torch.Tensor) -> torch.futures.Future:
        world = self.world_size
        out = torch.empty(world * payload.numel(), dtype=payload.dtype, device=payload.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        work = gather(out, payload, group=self.process_group, async_op=True)

        def gathered(fut: torch.futures.Future) -> torch.Tensor:
            # value() re-raises a failed or timed-out collective; without it the callback would
            # read a buffer the collective never filled.
            fut.value()
            return out.view(world, payload.numel())

        return work.get_future().then(gathered)

    def reduce(self, tensor: torch.Tensor) -> torch.futures.Future:
        work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


class LocalExchange(Exchange):
    """The exchange of ``world_size`` workers living in one process (the Simulator): each worker
    calls :meth:`start` (or :meth:`reduce`) in rank order; the last call resolves every worker's
    future with the stacked payloads (or the sum, added in rank order)."""

    name = "local"

    def __init__(self, world_size: int) -> None:
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ValueError(f"LocalExchange: world_size must be an integer >= 1, got {world_size!r}")
        self._world = world_size
        self._waiting: List[torch.Tensor] = []
        self._futures: List[torch.futures.Future] = []
        self._kind: Optional[str] = None

    @property
    def world_size(self) -> int:
        return self._world

    def start(self, payload: torch.Tensor) -> torch.futures.Future:
        return self._add("gather", payload)

    def reduce(self, tensor: torch.Tensor) -> torch.futures.Future:
        return self._add("reduce", tensor)

    def _add(self, kind: str, tensor: torch.Tensor) -> torch.futures.Future:
        if self._kind not in (None, kind):
            raise ValueError(f"LocalExchange: a {kind} started while a {self._kind} waits for "
                             f"{self._world - len(self._waiting)} more worker(s)")
        if self._waiting and tensor.shape != self._waiting[0].shape:
            raise ValueError(f"LocalExchange: worker {len(self._waiting)} gave {tuple(tensor.shape)}, "
                             f"worker 0 gave {tuple(self._waiting[0].shape)}")
        self._kind = kind
        self._waiting.append(tensor)
        future: torch.futures.Future = torch.futures.Future()
        self._futures.append(future)
        if len(self._waiting) == self._world:
            parts, futures = self._waiting, self._futures
            self._waiting, self._futures, self._kind = [], [], None
            if kind == "gather":
                result = torch.stack(parts)
            else:
                result = parts[0].clone()
                for part in parts[1:]:
                    result += part
            for f in futures:
                f.set_result(result)
        return future


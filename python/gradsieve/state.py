"""Per-rank state of the DDP communication hook (:func:`gradsieve.compression_hook`)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from gradsieve import checkpointing
from gradsieve.compressor import BucketLayout, Compressor
from gradsieve.exchange import Exchange, get_exchange
from gradsieve.inflight import SpeculativeExchanges
from gradsieve.ledger import InOrder, StepLedger
from gradsieve.memory import MemoryBank
from gradsieve.registry import compressor_class, get_compressor
from gradsieve.resume import FirstIteration
from gradsieve.signals import Loss, Metric, OptimizerSet, Signal

__all__ = ["CompressionState"]


class CompressionState:
    """Per-rank state of :func:`gradsieve.compression_hook`: the compressor, the exchange, the
    compressor's memory, statistics.

    Args:
        compressor: registry name (``gradsieve.available_compressors()``) or a compressor object.
        density: fraction of entries sent per step (sparse compressors; ignored by dense ones).
        process_group: the group to communicate in (default: the whole world).
        warmup_steps: steps of plain all-reduce before compression starts, >= 1 (DDP rebuilds its
            buckets after the first iteration; a few dense steps also help early training).
        max_bad_steps: steps in a row with a malformed payload before the hook raises, naming the
            sender.
        exchange: how buckets move: a registered name (``gradsieve.available_exchanges()``,
            default ``"allgather"``; ``"hierarchical"`` for nodes of several ranks, ``"allreduce"``
            for an agreed index set) or an :class:`~gradsieve.exchange.Exchange` (built with its
            options, e.g. ``gradsieve.get_exchange("hierarchical", local=8)``).
        **options: compressor options, validated by the registry (``scope``, ``values``, ...).

    Tuning: start from ``topk`` at density 0.01 with fp32 values; ``values="int8"`` cuts the value
    bytes by 4 at a small extra error that error feedback absorbs; ``dgc`` adds momentum
    correction (use a momentum-free optimizer with it); ``ef21`` for heterogeneous data.

    Each rank's memory is its own: save ``state.state_dict()`` on every rank and load each rank's
    back with :meth:`load_state_dict` (the process group is not saved). A non-finite gradient on any
    rank (an AMP overflow step) makes the bucket NaN on every rank, so ``GradScaler`` skips the step,
    and leaves every rank's memory as it was, in every bucket (:mod:`gradsieve.ledger`).
    """

    __slots__ = [
        # hyperparameters
        "compressor",
        "process_group",
        "exchange",
        "warmup_steps",
        "max_bad_steps",
        # internal state
        "memory",
        "step",
        "_param_keys",
        "_verified",
        "_layouts",
        "first_iteration",
        "ledger",
        "in_order",
        # speculative training (gradsieve.speculative): the revert threshold while an optimizer
        # wrapper drives the exchange, whether memory commits when a payload is sent, and the
        # exchanges in flight
        "speculative",
        "overlap_compress",
        "inflight",
        # statistics
        "wire_bytes",
        "node_bytes",
        "dense_bytes",
        "compressed_steps",
        "skipped_steps",
        "compress_s",
        "decode_s",
        "bad_payloads",
        "bad_payload_ranks",
        "probe_s",
        "probe_count",
        "_last_probe",
        "_last_launch",
        "wait_s",
        "rolled_back",
    ]

    def __init__(
        self,
        compressor: Any = "topk",
        density: Optional[float] = None,
        process_group: Optional[dist.ProcessGroup] = None,
        warmup_steps: int = 1,
        max_bad_steps: int = 3,
        exchange: Union[str, Exchange] = "allgather",
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
        self.exchange = exchange if isinstance(exchange, Exchange) else get_exchange(exchange, process_group)
        self.exchange.accepts(self.compressor)
        self.warmup_steps = warmup_steps
        self.max_bad_steps = max_bad_steps
        self.memory = MemoryBank()
        self.step = 0
        self._param_keys: Dict[int, int] = {}
        self._verified: Dict[int, Any] = {}
        # The parameter keys of each bucket of DDP's current layout (None: a bucket whose buffer
        # is not its parameters' gradients), saved in checkpoints.
        self._layouts: Dict[int, Optional[Tuple[int, ...]]] = {}
        # After load_state_dict: DDP's first iteration, run in the saved layout (gradsieve.resume).
        self.first_iteration: Optional[FirstIteration] = None
        self.ledger = StepLedger()
        self.in_order = InOrder()
        self.speculative: Optional[float] = None
        self.overlap_compress = False
        self.inflight = SpeculativeExchanges()
        self.wire_bytes = 0
        self.node_bytes = 0  # handed to collectives inside the node (the hierarchical exchange)
        self.dense_bytes = 0
        self.compressed_steps = 0
        self.skipped_steps = 0
        self.compress_s = 0.0
        self.decode_s = 0.0
        self.bad_payloads = 0
        self.bad_payload_ranks: Dict[int, int] = {}
        self.probe_s = 0.0
        self.probe_count = 0
        self._last_probe: Optional[int] = None
        self._last_launch: Optional[float] = None
        self.wait_s = 0.0  # speculative: time blocked on exchanges that were not over yet
        self.rolled_back = 0  # speculative: exchanges dropped because an earlier one was skipped

    # ------------------------------------------------------------------------------ statistics
    def stats(self) -> Dict[str, Any]:
        """Totals since construction: ``wire_bytes`` (bytes this rank put on the wire, measured
        from the payload buffers; under the hierarchical exchange, what crossed nodes),
        ``node_bytes`` (what the exchange's collectives inside the node carried), ``dense_bytes`` (what DDP's own all-reduce of the
        buckets, in their dtype, would have sent),
        ``compression_ratio`` (their ratio), ``compress_s``/``decode_s`` (host time; on CUDA the
        kernels run asynchronously, so these time the launches), ``steps``, ``compressed_steps``,
        ``skipped_steps`` (non-finite steps or malformed payloads), ``wait_s`` (speculative
        training: time blocked on exchanges still in flight when they were needed),
        ``bad_payloads`` (payloads that were not well formed, by bucket) and ``bad_payload_ranks``
        (``{sending rank: count}``); under speculative training with ``overlap_compress``,
        ``rolled_back`` (exchanges dropped because an earlier step of theirs was skipped) and
        ``rollback_bytes`` (memory held now to undo early commits); ``probes`` and ``probe_s``
        (curvature probes); the compressor's counters (``traits.counters``, summed over buckets)
        and its own ``stats()``; ``memory_bytes``: the bytes of compressor memory this rank holds
        now (residuals, momenta, histories, predictors; measured from the tensors, see
        ``MemoryBank.nbytes`` for the split by name)."""
        self.flush()
        counters: Dict[str, int] = {}
        for memory in self.memory.buckets.values():
            for key, value in memory.counters.items():
                counters[key] = counters.get(key, 0) + int(value)
        return {
            **counters,
            **self.compressor.stats(),
            "compressor": self.compressor.name,
            "steps": self.step,
            "compressed_steps": self.compressed_steps,
            "skipped_steps": self.skipped_steps,
            "wire_bytes": self.wire_bytes,
            "node_bytes": self.node_bytes,
            "dense_bytes": self.dense_bytes,
            "compression_ratio": self.dense_bytes / self.wire_bytes if self.wire_bytes else float("nan"),
            "compress_s": self.compress_s,
            "decode_s": self.decode_s,
            "memory_bytes": self.memory.nbytes()["total"],
            "bad_payloads": self.bad_payloads,
            "bad_payload_ranks": dict(self.bad_payload_ranks),
            "probe_s": self.probe_s,
            "probes": self.probe_count,
            "wait_s": self.wait_s,
            "rolled_back": self.rolled_back,
            "rollback_bytes": self.inflight.held_bytes(self.memory),
        }

    def flush(self) -> None:
        """Applies the outcome of the steps whose flags are still on their way from the device:
        the hook reads them once per step, at the next step's first bucket; :meth:`stats` and
        :meth:`state_dict` call this first, and so may a script that reads the compressor's
        memory between steps. Until then a skipped step's memory is not yet undone and its skip
        not yet counted. Raises as the hook would after ``max_bad_steps`` steps in a row with
        malformed payloads."""
        if self.ledger.ended:
            with self.ledger.lock:
                self.ledger.resolve(self)

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> Dict[str, Any]:
        """This rank's state (not the process group): step, config, memory per parameter,
        statistics (:mod:`gradsieve.checkpointing`).

        Under speculative training, save the optimizer wrapper's state first
        (:meth:`gradsieve.SpeculativeOptimizer.state_dict` ends the exchanges in flight)."""
        self.flush()
        return checkpointing.state_dict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        checkpointing.load_state_dict(self, state)

    def __getstate__(self) -> Dict[str, Any]:
        # Pickling goes through the checkpoint, plus what the constructor was given.
        return {"compressor": self.compressor, "exchange": self.exchange.name,
                "exchange_options": dict(self.exchange.options), "max_bad_steps": self.max_bad_steps,
                "speculative": self.speculative, "overlap_compress": self.overlap_compress,
                "checkpoint": self.state_dict()}

    def __setstate__(self, saved: Dict[str, Any]) -> None:
        exchange = get_exchange(saved["exchange"], None, **saved.get("exchange_options", {}))
        self.__init__(saved["compressor"], warmup_steps=saved["checkpoint"]["warmup_steps"],
                      max_bad_steps=saved["max_bad_steps"], exchange=exchange)
        self.speculative, self.overlap_compress = saved["speculative"], saved["overlap_compress"]
        self.load_state_dict(saved["checkpoint"])

    # ------------------------------------------------------------------------------ signals
    def signal(self, signal: Signal) -> None:
        """Hands ``signal`` to the compressor when its traits ask for that kind."""
        self.compressor.receive(signal)

    def report_metric(self, value: float, higher_is_better: bool = True) -> None:
        """Tells the compressor a validation metric (``predictive`` adapts its density to it).
        Every rank must report the same value at the same step: the next compressed step checks
        that the ranks agree on what follows from it, and fails on every rank if they do not."""
        self.signal(Metric(float(value), bool(higher_is_better)))

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Lets the compressor warn about optimizer settings that clash with it (dgc: momentum)."""
        self.signal(OptimizerSet(optimizer))

    def report_loss(self, loss: Any) -> None:
        """This rank's training loss of the step whose backward comes next (a float, or a 0-d
        tensor, which is not waited for). ``granular``'s ``auto`` policy uses it: its bandit is
        rewarded by the loss decrease, its rules measure the loss trend. Call it every step,
        before ``loss.backward()``; other compressors ignore it."""
        self.signal(Loss(loss))

    def probe(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
              batch: Any) -> bool:
        """Measures the curvature a compressor with ``traits.probes`` (``granular``) scores
        weights with, when it is due (:func:`gradsieve.influence.probe`): call it every step after
        ``optimizer.step()``. Returns whether it probed; other compressors ignore it.

        ``model``: the model (a DDP wrapper is unwrapped: the probe must not run DDP's
        reduction); ``loss_fn(model, batch)``: the scalar training loss."""
        from gradsieve.influence import probe

        return probe(self, model, loss_fn, batch)

    # ------------------------------------------------------------------------------ layouts
    def param_key(self, param: torch.Tensor) -> int:
        """The key the hook knows ``param`` by (learned from the first layout it was seen in)."""
        return self._param_keys[id(param)]

    def bucket_layouts(self) -> Optional[List[Tuple[int, ...]]]:
        """The parameter keys of every bucket of DDP's latest layout, in bucket order; None when
        it is not known whole."""
        layouts = [self._layouts.get(index) for index in range(len(self._layouts))]
        if not layouts or any(keys is None for keys in layouts):
            return None
        return layouts

    def layout_of(self, bucket: dist.GradBucket, world_size: int) -> BucketLayout:
        """The bucket's layout; learns the parameters' keys from the first layout each is seen in
        (DDP's initial layout, which a fresh process rebuilds identically)."""
        params = bucket.parameters()
        numels = tuple(p.numel() for p in params)
        for position, p in enumerate(params):
            self._param_keys.setdefault(id(p), (bucket.index() << 20) | position)
        if bucket.index() == 0:
            self._layouts = {}
        if sum(numels) != bucket.buffer().numel():
            self._layouts[bucket.index()] = None
            # Unknown layout: the bucket is one segment with a key of its own.
            return BucketLayout(bucket.buffer().numel(), (bucket.buffer().numel(),), (2,), world_size,
                                bucket.index(), ((bucket.index() << 20) | 0xFFFFF,))
        keys = tuple(self._param_keys[id(p)] for p in params)
        self._layouts[bucket.index()] = keys
        ndims = tuple(p.dim() for p in params)
        return BucketLayout(bucket.buffer().numel(), numels, ndims, world_size, bucket.index(), keys)

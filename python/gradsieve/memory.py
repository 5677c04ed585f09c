"""Per-rank compressor memory (residuals, momenta, estimates).

Memory is logically per parameter and stored flat per DDP bucket, in the bucket's layout, so the
compressors work on one contiguous tensor. When a bucket's parameters change (DDP rebuilds its
buckets after the first iteration; a restored run starts from DDP's initial layout) the per-entry
memory is moved parameter by parameter into the new layout, so no residual is lost. Parameters
are identified by their position in the first bucket layout this rank saw (DDP's initial layout,
which a fresh process rebuilds identically), which is what makes a saved state loadable into a
new process. Memory that is not per entry (for example DGC's threshold factors) lives in
``extra``, a compressor's counters (entries sent, ...) in ``counters``; both are kept when a bucket
is rebuilt with the same parameters and reset otherwise.
``params`` holds small per-parameter memory that is not per entry (a predictor's weights): it
belongs to the parameter, survives every rebuild and is checkpointed by parameter key.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch


class Snapshot(NamedTuple):
    """One bucket's memory tensors at a point in time (see :meth:`BucketMemory.snapshot`)."""

    entries: Dict[str, torch.Tensor]
    extra: Dict[str, torch.Tensor]
    counters: Dict[str, torch.Tensor]


@dataclasses.dataclass
class BucketMemory:
    """One bucket's memory on one rank."""

    keys: Tuple[int, ...]  # parameter keys, in bucket order
    numels: Tuple[int, ...]
    entries: Dict[str, torch.Tensor]  # name -> float32 Tensor[bucket numel]
    extra: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # {parameter key: {name: tensor}}: the bank's per-parameter memory (shared by all buckets).
    params: Dict[int, Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    counters: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def snapshot(self) -> "Snapshot":
        """The bucket's memory as it is (the tensors, not copies: a commit replaces them)."""
        return Snapshot(dict(self.entries), dict(self.extra), dict(self.counters))

    def restore(self, snapshot: "Snapshot") -> None:
        """Puts a snapshot's tensors back (undoes the commits made since it was taken)."""
        self.entries, self.extra, self.counters = (dict(snapshot.entries), dict(snapshot.extra),
                                                   dict(snapshot.counters))

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor of the bucket's own memory (not the per-parameter memory)."""
        return (*self.entries.values(), *self.extra.values(), *self.counters.values())

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def offset_of(self, key: int) -> int:
        return sum(self.numels[: self.keys.index(key)])

    def slices(self) -> Iterable[Tuple[int, int, int]]:
        """(parameter key, offset, numel) in bucket order."""
        offset = 0
        for key, numel in zip(self.keys, self.numels):
            yield key, offset, numel
            offset += numel


class MemoryBank:
    """All buckets' memory of one rank, plus per-parameter memory restored from a checkpoint."""

    def __init__(self) -> None:
        self.buckets: Dict[int, BucketMemory] = {}
        # The memory that currently holds each parameter's entries. An old bucket's memory stays
        # alive only while some parameter has not moved out of it yet.
        self.owner: Dict[int, BucketMemory] = {}
        self.restored: Dict[int, Dict[str, torch.Tensor]] = {}
        # Bucket-coordinate memory from a checkpoint: {bucket index: (keys, tensors)}, for the
        # extra memory and for the counters.
        self.restored_extra: Dict[int, Tuple[Tuple[int, ...], Dict[str, torch.Tensor]]] = {}
        self.restored_counters: Dict[int, Tuple[Tuple[int, ...], Dict[str, torch.Tensor]]] = {}
        self.params: Dict[int, Dict[str, torch.Tensor]] = {}

    def get(
        self,
        index: int,
        keys: Sequence[int],
        numels: Sequence[int],
        names: Sequence[str],
        device: torch.device,
        dtypes: Optional[Mapping[str, torch.dtype]] = None,
    ) -> BucketMemory:
        """The memory of bucket ``index`` (parameters ``keys`` of ``numels`` entries): one tensor
        per name, float32 unless ``dtypes`` says otherwise, zeros for a parameter seen first."""
        keys, numels = tuple(keys), tuple(numels)
        current = self.buckets.get(index)
        if current is not None and current.keys == keys and current.numels == numels:
            return current
        memory = self._assemble(keys, numels, names, device, dtypes or {})
        memory.params = self.params
        if current is not None and sorted(current.keys) == sorted(keys):
            # Same parameters in a new order: keep the bucket-level memory.
            memory.extra, memory.counters = current.extra, current.counters
        saved = self.restored_extra.pop(index, None)
        if saved is not None and sorted(saved[0]) == sorted(keys):
            memory.extra = {name: t.to(device) for name, t in saved[1].items()}
        saved = self.restored_counters.pop(index, None)
        if saved is not None and sorted(saved[0]) == sorted(keys):
            memory.counters = {name: t.to(device) for name, t in saved[1].items()}
        self.buckets[index] = memory
        for key in keys:
            self.owner[key] = memory
        return memory

    def _assemble(self, keys, numels, names, device, dtypes) -> BucketMemory:
        total = sum(numels)
        entries = {name: torch.zeros(total, dtype=dtypes.get(name, torch.float32), device=device)
                   for name in names}
        offset = 0
        for key, numel in zip(keys, numels):
            source = self.owner.get(key)
            for name, tensor in entries.items():
                if source is not None and name in source.entries:
                    src = source.offset_of(key)
                    tensor[offset:offset + numel].copy_(source.entries[name][src:src + numel])
                elif key in self.restored and name in self.restored[key]:
                    saved = self.restored[key][name]
                    if saved.numel() != numel:
                        raise ValueError(
                            f"load_state_dict: parameter {key} had {saved.numel()} entries in the "
                            f"checkpoint, the model has {numel}"
                        )
                    tensor[offset:offset + numel].copy_(saved.reshape(-1).to(device, tensor.dtype))
            self.restored.pop(key, None)
            offset += numel
        return BucketMemory(keys, numels, entries)

    # -------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, object]:
        """``{"params": {parameter key: {name: tensor}}, "extra": {bucket: (keys, {name: tensor})},
        "counters": (the same), "per_param": {parameter key: {name: tensor}}}``, on the CPU."""
        def per_bucket(part: str):
            return {index: (memory.keys, {name: t.detach().cpu().clone()
                                          for name, t in getattr(memory, part).items()})
                    for index, memory in self.buckets.items()}

        per_param = {key: {name: t.detach().cpu().clone() for name, t in saved.items()}
                     for key, saved in self.params.items()}
        return {"params": self._param_state(), "extra": {**self.restored_extra, **per_bucket("extra")},
                "counters": {**self.restored_counters, **per_bucket("counters")}, "per_param": per_param}

    def _param_state(self) -> Dict[int, Dict[str, torch.Tensor]]:
        out: Dict[int, Dict[str, torch.Tensor]] = {
            key: {name: t.clone() for name, t in saved.items()} for key, saved in self.restored.items()
        }
        for key, memory in self.owner.items():
            offset = memory.offset_of(key)
            numel = memory.numels[memory.keys.index(key)]
            out[key] = {
                name: tensor[offset:offset + numel].detach().cpu().clone()
                for name, tensor in memory.entries.items()
            }
        return out

    def load_state_dict(self, saved: Dict[str, object]) -> None:
        self.buckets.clear()
        self.owner.clear()
        self.restored = {int(k): dict(v) for k, v in saved["params"].items()}
        self.restored_extra = {int(k): (tuple(keys), dict(t)) for k, (keys, t) in saved["extra"].items()}
        self.restored_counters = {int(k): (tuple(keys), dict(t))
                                  for k, (keys, t) in saved.get("counters", {}).items()}
        # Replaced in place: the buckets built from now on share this dict.
        self.params.clear()
        self.params.update({int(k): dict(v) for k, v in saved.get("per_param", {}).items()})

    def nbytes(self) -> Dict[str, int]:
        """Bytes of memory this bank holds, measured from its tensors' storages (each counted once,
        shared storage too): ``{name: bytes}`` for every memory name (per-entry memory, bucket
        ``extra`` and per-parameter memory such as a predictor's weights, by their own names), and
        ``"total"``. Memory held for a parameter not yet placed (after a restore) counts too."""
        seen = set()
        sizes: Dict[str, int] = {}

        def count(name: str, tensor) -> None:
            if not isinstance(tensor, torch.Tensor):
                return
            storage = tensor.untyped_storage()
            ident = (str(tensor.device), storage.data_ptr(), storage.nbytes())
            if storage.nbytes() == 0 or ident in seen:
                return
            seen.add(ident)
            sizes[name] = sizes.get(name, 0) + storage.nbytes()

        memories = list(self.buckets.values())
        memories += [m for m in self.owner.values() if all(m is not b for b in memories)]
        for memory in memories:
            for part in (memory.entries, memory.extra, memory.counters):
                for name, tensor in part.items():
                    count(name, tensor)
        for saved in self.params.values():
            for name, tensor in saved.items():
                count(name, tensor)
        for saved in self.restored.values():
            for name, tensor in saved.items():
                count(name, tensor)
        for _, tensors in (*self.restored_extra.values(), *self.restored_counters.values()):
            for name, tensor in tensors.items():
                count(name, tensor)
        sizes["total"] = sum(sizes.values())
        return sizes

    def total(self, name: str) -> Optional[torch.Tensor]:
        """One memory over all buckets, concatenated in bucket-index order (tests and tools)."""
        parts = [self.buckets[i].entries[name] for i in sorted(self.buckets) if name in self.buckets[i].entries]
        return torch.cat(parts) if parts else None

"""The cross-rank configuration check: ranks configured differently fail fast, on every rank,
naming the difference, instead of hanging or training on wrong numbers.

Every rank hashes a canonical JSON text of what must agree and the 32-byte digests are all-gathered
as a tensor. Only when they differ are the JSON texts themselves exchanged (as bytes, read with
``json.loads``) to name each key that differs and its value on every rank. No peer's bytes are
ever unpickled.

The hook checks its configuration (:func:`verify_config`) at the first call for each bucket, in the
warm-up too, and whenever the compressor's run-time state changes: before the first step where
ranks configured differently could start different collectives.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

__all__ = ["check_agreement", "differences", "verify_config"]

# At most this many differing keys are named, each value in at most SHOWN characters.
MAX_KEYS = 8
SHOWN = 120


def hook_config(state: Any, numel: int) -> Dict[str, Any]:
    """What a rank's hook does on the wire for a bucket of ``numel`` entries, as plain JSON values."""
    return {
        "compressor": state.compressor.config(), "bucket_numel": numel, "step": state.step,
        "warmup_steps": state.warmup_steps, "max_bad_steps": state.max_bad_steps,
        "runtime": state.compressor.runtime(), "speculative": state.speculative,
        "overlap_compress": bool(state.overlap_compress), "exchange": state.exchange.config(),
        "world_size": state.exchange.world_size,
    }


def verify_config(state: Any, index: int, numel: int, world: int, device: torch.device) -> None:
    """Raises ValueError on every rank when the ranks' hook configurations for bucket ``index`` of
    ``numel`` entries differ (compressor and its options, run-time state, bucket size, step, warm-up, exchange,
    speculative settings), naming each differing key; returns when they agree. Blocking (one small
    collective; three when they differ)."""
    check_agreement(hook_config(state, numel), state.process_group, device,
                    f"gradsieve: ranks were configured differently for bucket {index}", world)


def check_agreement(mine: Dict[str, Any], group: Optional[dist.ProcessGroup] = None,
                    device: Optional[torch.device] = None, what: str = "gradsieve: ranks differ",
                    world: Optional[int] = None) -> None:
    """Every rank of ``group`` calls this with its ``mine`` (JSON-serialisable). Returns when all
    are equal; otherwise raises ValueError on every rank: ``what``, then one line per differing key
    (nested keys joined with dots) with each rank's value."""
    if not isinstance(mine, dict):
        raise TypeError(f"check_agreement: mine must be a dict, got {type(mine).__name__}")
    world = dist.get_world_size(group) if world is None else world
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(group) == "nccl" else torch.device("cpu")
    text = json.dumps(mine, sort_keys=True, default=repr).encode()
    digest = torch.tensor(list(hashlib.sha256(text).digest()), dtype=torch.uint8, device=device)
    digests = _gather(digest, world, group)
    if bool((digests == digest).all()):
        return
    # They differ: exchange the readable texts, padded to the longest.
    length = torch.tensor([len(text)], dtype=torch.int64, device=device)
    longest = int(_gather(length, world, group).max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    texts = _gather(padded, world, group).cpu()
    seen: List[Any] = []
    for rank in range(world):
        raw = bytes(texts[rank].tolist()).rstrip(b"\0")
        try:
            seen.append(json.loads(raw.decode()))
        except (UnicodeDecodeError, ValueError):
            seen.append({"<unreadable>": f"{len(raw)} bytes"})
    raise ValueError(what + ":\n" + "\n".join(differences(seen)))


def differences(seen: List[Any]) -> List[str]:
    """One line per key whose value is not the same for every rank (``seen[rank]``):
    ``key: rank 0: A; rank 1: B`` (ranks with equal values grouped, as ``ranks 0,2``)."""
    flat = [_flatten(s) for s in seen]
    keys = sorted(set().union(*flat))
    missing = object()
    lines = []
    for key in keys:
        values = [f.get(key, missing) for f in flat]
        if all(v == values[0] for v in values):
            continue
        groups: Dict[str, List[int]] = {}
        for rank, value in enumerate(values):
            shown = "<absent>" if value is missing else json.dumps(value)
            if len(shown) > SHOWN:
                shown = shown[:SHOWN - 3] + "..."
            groups.setdefault(shown, []).append(rank)
        parts = [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {v}" for v, r in groups.items()]
        lines.append(f"  {key}: " + "; ".join(parts))
    if len(lines) > MAX_KEYS:
        lines = lines[:MAX_KEYS] + [f"  ... and {len(lines) - MAX_KEYS} more keys"]
    return lines or ["  (the texts differ but no key does)"]


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict) and value:
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "<value>": value}


def _gather(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's ``tensor`` (same size everywhere), as [world, numel]; blocking."""
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.contiguous(), group=group)
    return out.view(world, -1)

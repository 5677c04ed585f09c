"""The cross-rank configuration check: ranks configured differently fail fast, on every rank,
naming the difference, instead of hanging or training on wrong numbers.

At the first compressed step of a bucket layout, and whenever the compressor's run-time state
changes, every rank hashes a canonical JSON text of its configuration and the 32-byte digests are
all-gathered as a tensor. Only when they differ are the JSON texts themselves exchanged (as bytes,
read with ``json.loads``) to name what differs. No peer's bytes are ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict

import torch
import torch.distributed as dist

__all__ = ["verify_config"]


def verify_config(state: Any, layout: Any, world: int, device: torch.device) -> None:
    """Raises ValueError on every rank when the ranks' configurations for bucket ``layout`` differ
    (compressor and its options, run-time state, bucket size, warm-up, exchange, speculative
    settings); returns when they agree. Runs before the bucket's first collective, so that no
    collective of ranks configured differently is started. Blocking (two small collectives)."""
    mine: Dict[str, Any] = {
        "config": state.compressor.config(), "bucket_numel": layout.numel,
        "warmup_steps": state.warmup_steps, "runtime": state.compressor.runtime(),
        "speculative": state.speculative, "overlap_compress": bool(state.overlap_compress),
        "exchange": state.exchange.config()}
    text = json.dumps(mine, sort_keys=True).encode()
    digest = torch.tensor(list(hashlib.sha256(text).digest()), dtype=torch.uint8, device=device)
    group = state.process_group
    digests = _gather(digest, world, group)
    if bool((digests == digest).all()):
        return
    # They differ: exchange the readable texts, padded to the longest.
    length = torch.tensor([len(text)], dtype=torch.int64, device=device)
    longest = int(_gather(length, world, group).max())
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    texts = _gather(padded, world, group).cpu()
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


def _gather(tensor: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's ``tensor`` (same size everywhere), as [world, numel]; blocking."""
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.contiguous(), group=group)
    return out.view(world, -1)

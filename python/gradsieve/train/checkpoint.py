"""Checkpoints of ``gradsieve-train`` (``--checkpoint-every``, ``--checkpoint-dir``, ``--resume``).

Layout: ``DIR/<run number>-<run name>/step-<step>-rank<r>.pt`` holds everything rank ``r`` needs to
continue that run after ``step`` steps (model, optimizer, compressor state, RNG states, the batch
generator, the metrics so far), and ``done-rank<r>.pt`` the finished run's record and final model.
Every file is written to a temporary name in the same folder, flushed to disk and renamed: a crash
mid-write leaves the previous checkpoint, never a file that loads wrong. The two newest checkpoints
of each rank are kept.

``--resume`` continues each run from the newest step that every rank has a checkpoint of (the ranks
agree through two small all-reduces), skips runs that every rank finished, and starts the others
from scratch.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

KEEP = 2  # checkpoints kept per rank and run

# A test aid: GRADSIEVE_FAULT_AT_STEP="RANK:STEP" makes rank RANK exit abruptly (status 17) when it
# is about to run step STEP of a run that started from scratch in this process, on torchrun's first
# attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset). tests/test_resume.py kills workers this way.
FAULT_ENV = "GRADSIEVE_FAULT_AT_STEP"


def fault_point() -> Optional[tuple]:
    text = os.environ.get(FAULT_ENV)
    if not text or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) != 0:
        return None
    rank, step = text.split(":")
    return int(rank), int(step)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)[:80]


def _write_atomically(payload: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def _min_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class RunCheckpoints:
    """The checkpoints of one run (one entry of ``--compare``) on one rank."""

    def __init__(self, root: str, index: int, name: str, rank: int) -> None:
        self.dir = os.path.join(root, f"{index:02d}-{_safe(name)}")
        self.rank = rank
        os.makedirs(self.dir, exist_ok=True)

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step:09d}-rank{self.rank}.pt")

    @property
    def done_path(self) -> str:
        return os.path.join(self.dir, f"done-rank{self.rank}.pt")

    def steps(self) -> List[int]:
        pattern = re.compile(rf"^step-(\d+)-rank{self.rank}\.pt$")
        found = [int(m.group(1)) for m in map(pattern.match, os.listdir(self.dir)) if m]
        return sorted(found)

    def save(self, step: int, payload: Dict[str, Any]) -> None:
        _write_atomically(payload, self.path(step))
        for old in self.steps()[:-KEEP]:
            try:
                os.remove(self.path(old))
            except FileNotFoundError:
                pass

    def save_done(self, payload: Dict[str, Any]) -> None:
        _write_atomically(payload, self.done_path)

    def load(self, path: str) -> Dict[str, Any]:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a damaged file: say which
            raise RuntimeError(f"checkpoint {path} cannot be read: {err}") from None

    def finished(self, device: torch.device) -> Optional[Dict[str, Any]]:
        """The saved result of this run when every rank finished it, else None (collective)."""
        if _min_over_ranks(int(os.path.exists(self.done_path)), device) == 0:
            return None
        return self.load(self.done_path)

    def newest_common(self, device: torch.device) -> Optional[int]:
        """The newest step every rank has a checkpoint of, or None (collective)."""
        mine = self.steps()
        candidate = mine[-1] if mine else 0
        while True:
            step = _min_over_ranks(candidate, device)
            if step == 0:
                return None
            if _min_over_ranks(int(step in mine), device) == 1:
                return step
            candidate = max([s for s in mine if s < step], default=0)

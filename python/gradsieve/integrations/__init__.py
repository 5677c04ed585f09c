"""The hook in training frameworks: PyTorch Lightning, Hugging Face Accelerate and the Transformers
``Trainer`` (``docs/integrations.md``).

* :mod:`gradsieve.integrations.lightning`: ``GradsieveCallback``, a Lightning callback;
* :mod:`gradsieve.integrations.accelerate`: ``register(accelerator, prepared_model, state)``;
* :mod:`gradsieve.integrations.transformers`: ``GradsieveCallback``, a ``TrainerCallback``.

Each of those modules imports its framework, so ``import gradsieve`` and this package need none of
them (``pip install "gradsieve[integrations]"`` installs all three). This package holds what they
share: finding the DDP module, registering the hook once, and checkpoints that carry every rank's
:class:`~gradsieve.CompressionState` where a framework writes one file from rank 0 (uint8 tensors
of ``torch.save`` bytes, read back with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import importlib
import io
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradsieve import CompressionState, compression_hook

__all__ = ["ALL_RANKS_FORMAT", "AllRanksState", "all_ranks_state", "check_state", "ddp_module", "import_framework",
           "rank_state", "register_hook", "state_bytes", "state_from_bytes"]

# Marks the dictionary all_ranks_state returns (and the checkpoints that hold it).
ALL_RANKS_FORMAT = "gradsieve.all-ranks-state.v1"


def import_framework(module: str, package: str, integration: str) -> Any:
    """Imports ``module``; when it is missing, an ImportError names the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"gradsieve.integrations.{integration} needs the {package!r} package, which could not "
                          f"be imported ({error}); install it with: pip install {package} "
                          f"(or pip install \"gradsieve[integrations]\")") from error


def check_state(state: Any, where: str) -> CompressionState:
    if not isinstance(state, CompressionState):
        raise TypeError(f"{where}: state must be a gradsieve.CompressionState, got {type(state).__name__}")
    return state


def ddp_module(model: Any) -> Optional[DistributedDataParallel]:
    """``model`` when it is a DistributedDataParallel, or the DDP module a ``torch.compile``
    wrapper holds (``_orig_mod``); None otherwise."""
    for _ in range(2):
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
    return None


def register_hook(ddp: DistributedDataParallel, state: CompressionState, where: str) -> bool:
    """Registers :func:`gradsieve.compression_hook` with ``state`` on ``ddp``. Returns False when
    this state's hook is registered there already (nothing done); raises ValueError when another
    communication hook is (DDP takes one)."""
    hooks = getattr(ddp, "_comm_hooks", [])  # DDP's record of register_comm_hook calls
    if any(hook is compression_hook and hook_state is state for hook, hook_state in hooks):
        return False
    if any(hook is compression_hook for hook, _ in hooks):
        raise ValueError(f"{where}: the DDP module already has gradsieve's hook with another CompressionState; DDP "
                         f"takes only one communication hook, so register one state per DDP module")
    if hooks:
        names = ", ".join(getattr(hook, "__qualname__", repr(hook)) for hook, _ in hooks)
        raise ValueError(f"{where}: the DDP module already has the communication hook {names}, and DDP takes only "
                         f"one; register gradsieve's hook alone (remove the other, e.g. a comm_hook given to "
                         f"the framework's DDP options)")
    ddp.register_comm_hook(state, compression_hook)
    return True


# ---------------------------------------------------------------------------------- checkpoints
def state_bytes(state: CompressionState) -> bytes:
    """``torch.save`` of ``state.state_dict()``."""
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes, where: str) -> Dict[str, Any]:
    """The state dictionary in ``data`` (written by :func:`state_bytes`), read with
    ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others on bad content
        raise ValueError(f"{where}: the saved hook state does not load with torch.load(weights_only=True) "
                         f"({type(error).__name__}: {error})") from error


def _collective_device() -> torch.device:
    backend = str(dist.get_backend())
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_ranks_state(state: CompressionState) -> Dict[str, Any]:
    """Every rank's ``state.state_dict()``, on every rank: ``{"format", "world_size", "ranks":
    [uint8 tensor of torch.save bytes, one per global rank]}``. A collective of the whole world when
    torch.distributed is initialized: every rank must call it at the same point."""
    own = torch.frombuffer(bytearray(state_bytes(state)), dtype=torch.uint8)
    if not (dist.is_available() and dist.is_initialized()):
        return {"format": ALL_RANKS_FORMAT, "world_size": 1, "ranks": [own]}
    world = dist.get_world_size()
    device = _collective_device()
    size = torch.tensor([own.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:own.numel()] = own.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    ranks: List[torch.Tensor] = [g[:int(s.item())].cpu().clone() for g, s in zip(gathered, sizes)]
    return {"format": ALL_RANKS_FORMAT, "world_size": world, "ranks": ranks}


def rank_state(saved: Any, where: str) -> Dict[str, Any]:
    """This rank's state dictionary from what :func:`all_ranks_state` returned. ValueError when
    ``saved`` is not such a dictionary or was saved by another number of ranks."""
    if not isinstance(saved, dict) or saved.get("format") != ALL_RANKS_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{where}: expected the hook states of every rank (format {ALL_RANKS_FORMAT!r}), "
                         f"got {found!r}")
    ranks = saved.get("ranks")
    if not isinstance(ranks, (list, tuple)) or len(ranks) != saved.get("world_size"):
        entries = len(ranks) if isinstance(ranks, (list, tuple)) else type(ranks).__name__
        raise ValueError(f"{where}: the checkpoint's hook states are malformed: world_size "
                         f"{saved.get('world_size')!r}, {entries} entries")
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if len(ranks) != world:
        raise ValueError(f"{where}: the checkpoint holds the hook states of {len(ranks)} ranks, this run has {world}; "
                         f"each rank's compressor memory is its own, so resume with {len(ranks)} ranks")
    entry = ranks[rank]
    if not isinstance(entry, torch.Tensor) or entry.dtype != torch.uint8 or entry.dim() != 1:
        raise ValueError(f"{where}: rank {rank}'s saved hook state must be a 1-D uint8 tensor, got "
                         f"{type(entry).__name__} {getattr(entry, 'dtype', '')}")
    return state_from_bytes(entry.cpu().numpy().tobytes(), f"{where} (rank {rank})")


class AllRanksState:
    """A checkpointable view of ``state`` for frameworks that save one file from the main process
    and load it on every rank (Accelerate's ``register_for_checkpointing``): :meth:`state_dict`
    gathers every rank's state (a collective), :meth:`load_state_dict` loads this rank's entry into
    ``state``."""

    def __init__(self, state: CompressionState, where: str = "AllRanksState") -> None:
        self.state = check_state(state, where)
        self.where = where

    def state_dict(self) -> Dict[str, Any]:
        return all_ranks_state(self.state)

    def load_state_dict(self, saved: Dict[str, Any]) -> None:
        self.state.load_state_dict(rank_state(saved, f"{self.where}: loading the checkpoint"))

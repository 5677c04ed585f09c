"""gradsieve's hook with Hugging Face Accelerate: :func:`register`.

::

    from gradsieve.integrations.accelerate import register
    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = gradsieve.CompressionState("topk", density=0.01)
    register(accelerator, model, state)

The hook goes on the ``DistributedDataParallel`` module that ``accelerator.prepare`` returns; the
model given to ``prepare`` is a plain module without ``register_comm_hook``. With one process, or
when the Accelerator found no distributed set-up, ``prepare`` returns the module unwrapped and
:func:`register` raises a ValueError that says which case it is. ``docs/integrations.md``: how to
start several processes on CPU (``accelerate launch --cpu`` starts one).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradsieve import CompressionState
from gradsieve.integrations import AllRanksState, check_state, ddp_module, import_framework, register_hook

_accelerate = import_framework("accelerate", "accelerate", "accelerate")

__all__ = ["register"]


def _not_ddp(accelerator: Any, model: Any) -> ValueError:
    kind = str(accelerator.distributed_type).split(".")[-1]
    got = (f"register: the model is a {type(model).__name__}, not the DistributedDataParallel module the hook "
           f"goes on (the Accelerator's distributed type is {kind}, {accelerator.num_processes} process(es))")
    # Under torchrun without GPUs, accelerate 1.16 (without cpu=True) starts a gloo process group of all the
    # processes but does not wrap the model: each process trains alone.
    if dist.is_available() and dist.is_initialized():
        launched = dist.get_world_size()
    else:
        text = os.environ.get("WORLD_SIZE", "1")
        launched = int(text) if text.isdigit() else 1
    if kind == "NO" and launched > 1:
        return ValueError(f"{got}: this process was started as one of {launched} processes, but the Accelerator "
                          f"found no distributed set-up and trains alone. Without GPUs, make it with "
                          f"Accelerator(cpu=True) or set ACCELERATE_USE_CPU=1 in the environment")
    if kind == "NO":
        return ValueError(f"{got}: one process trains alone, so nothing is exchanged. Start several, e.g. "
                          f"torchrun --standalone --nproc-per-node 2 script.py (on CPU with ACCELERATE_USE_CPU=1); "
                          f"`accelerate launch --cpu` starts a single process whatever --num_processes says")
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        return ValueError(f"{got}: the hook is a DistributedDataParallel communication hook; {kind} reduces "
                          f"gradients its own way and is not supported")
    return ValueError(f"{got}: pass the model that accelerator.prepare returned")


def register(accelerator: Any, model: Any, state: CompressionState, checkpoint: bool = True) -> DistributedDataParallel:
    """Registers :func:`gradsieve.compression_hook` with ``state`` on the DDP module of ``model``
    (what ``accelerator.prepare`` returned; a ``torch.compile`` wrapper of it too) and returns that
    module. Calling it again with the same state does nothing more.

    With ``checkpoint`` (default), also ``accelerator.register_for_checkpointing`` a view of
    ``state`` whose state dictionary holds every rank's hook state: ``accelerator.save_state``
    (called on every process, as Accelerate requires) then saves each rank's compressor memory, and
    ``accelerator.load_state`` gives each rank its own back. (Registering ``state`` itself would
    save the main process's memory only and load it into every rank.) ``load_state`` fails with a
    ValueError when the checkpoint was saved by another number of processes.

    Raises:
        TypeError: ``accelerator`` is not an ``accelerate.Accelerator`` or ``state`` not a
            ``gradsieve.CompressionState``.
        ValueError: ``model`` is not a DDP module (the message says why, from the Accelerator's
            distributed type and the launch), or it has another communication hook.
    """
    if not isinstance(accelerator, _accelerate.Accelerator):
        raise TypeError(f"register: accelerator must be an accelerate.Accelerator, got {type(accelerator).__name__}")
    check_state(state, "register")
    if not isinstance(checkpoint, bool):
        raise TypeError(f"register: checkpoint must be True or False, got {checkpoint!r}")
    ddp = ddp_module(model)
    if ddp is None:
        raise _not_ddp(accelerator, model)
    if register_hook(ddp, state, "register") and checkpoint:
        accelerator.register_for_checkpointing(AllRanksState(state, "gradsieve.integrations.accelerate"))
    return ddp

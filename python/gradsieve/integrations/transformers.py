"""gradsieve's hook in the Hugging Face Transformers ``Trainer``: :class:`GradsieveCallback`.

::

    from gradsieve.integrations.transformers import GradsieveCallback
    state = gradsieve.CompressionState("topk", density=0.01)
    trainer.add_callback(GradsieveCallback(trainer, state))

A ``TrainerCallback`` is handed the unwrapped model; the DDP module the hook goes on is the
Trainer's ``model_wrapped``, which ``Trainer.train`` sets (through ``accelerator.prepare``) before
it calls ``on_train_begin``. So the callback is given the Trainer, and registers the hook in
``on_train_begin``, before the first backward pass.

Checkpoints: at each of the Trainer's checkpoints every rank writes its own hook state to
``gradsieve_rank{r}.pt`` in the checkpoint folder, as the Trainer writes ``rng_state_{r}.pth``.
A run that resumes (``trainer.train(resume_from_checkpoint=...)``) loads them when training
begins (see :class:`GradsieveCallback`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch

from gradsieve import CompressionState
from gradsieve.integrations import check_state, ddp_module, import_framework, register_hook

_transformers = import_framework("transformers", "transformers", "transformers")
_trainer_callback = import_framework("transformers.trainer_callback", "transformers", "transformers")

__all__ = ["GradsieveCallback", "FILE", "FORMAT"]

# The file each rank writes to a checkpoint folder ({rank}: its global rank), and its format mark.
FILE = "gradsieve_rank{rank}.pt"
FORMAT = "gradsieve.trainer-rank-state.v1"
# The Trainer's checkpoint folders: "<output_dir>/checkpoint-<global step>".
CHECKPOINT_PREFIX = "checkpoint"


class GradsieveCallback(_trainer_callback.TrainerCallback):
    """Registers :func:`gradsieve.compression_hook` on the Trainer's DDP module when training
    begins, and saves and restores each rank's hook state with the Trainer's checkpoints.

    Args:
        trainer: the ``transformers.Trainer`` this callback is added to
            (``trainer.add_callback(GradsieveCallback(trainer, state))``).
        state: this rank's :class:`gradsieve.CompressionState`.
        resume_from: a checkpoint folder to load the hook state from when training begins.
            Default: when the Trainer resumes (its global step is above 0 as training begins), the
            folder ``<output_dir>/checkpoint-<global step>``, which is the one
            ``resume_from_checkpoint=True`` picks; if that folder holds no hook state for this
            rank, a warning says so and the hook starts with empty memory. Give the folder here
            when resuming from a checkpoint elsewhere.

    A saved hook state loads only into a run with the same number of ranks, at the same global
    step (ValueError otherwise). Files are read with ``torch.load(weights_only=True)``.
    """

    def __init__(self, trainer: Any, state: CompressionState, resume_from: Optional[str] = None) -> None:
        if not isinstance(trainer, _transformers.Trainer):
            raise TypeError(f"GradsieveCallback: trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        self.state = check_state(state, "GradsieveCallback")
        if resume_from is not None and not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(f"GradsieveCallback: resume_from must be a folder path, got {type(resume_from).__name__}")
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self.loaded_from: Optional[str] = None  # the file the hook state was loaded from, if any

    # -------------------------------------------------------------------------------- the hook
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        wrapped = self.trainer.model_wrapped
        ddp = ddp_module(wrapped)
        if ddp is None:
            launched = os.environ.get("WORLD_SIZE", "1")
            hint = ("this process is one of WORLD_SIZE=" + launched + " processes but the Trainer runs alone: "
                    "without GPUs, give TrainingArguments(use_cpu=True) or set ACCELERATE_USE_CPU=1"
                    if launched.isdigit() and int(launched) > 1 else
                    "start several processes (torchrun --nproc-per-node N script.py); FSDP and DeepSpeed are not "
                    "supported")
            raise ValueError(f"GradsieveCallback: the Trainer's model_wrapped is a {type(wrapped).__name__}, not a "
                             f"DistributedDataParallel module (parallel mode {args.parallel_mode}, world size "
                             f"{args.world_size}): {hint}")
        if state.global_step > 0 or self.resume_from is not None:
            self._load(args, state.global_step)
        register_hook(ddp, self.state, "GradsieveCallback")

    # -------------------------------------------------------------------------------- checkpoints
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, FILE.format(rank=args.process_index))
        record = {"format": FORMAT, "global_step": state.global_step, "world_size": args.world_size,
                  "rank": args.process_index, "state": self.state.state_dict()}
        # Written under another name and renamed, so a crash leaves no partial file.
        partial = path + ".partial"
        torch.save(record, partial)
        os.replace(partial, path)

    def _load(self, args: Any, global_step: int) -> None:
        folder = self.resume_from or os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{global_step}")
        path = os.path.join(folder, FILE.format(rank=args.process_index))
        if not os.path.isfile(path):
            if self.resume_from is not None:
                raise FileNotFoundError(f"GradsieveCallback: resume_from={self.resume_from!r} holds no hook state for "
                                        f"rank {args.process_index} ({path})")
            warnings.warn(f"GradsieveCallback: the Trainer resumes at step {global_step}, but {path} does not exist; "
                          f"the hook starts with empty memory (give GradsieveCallback(..., resume_from=FOLDER) "
                          f"when the checkpoint is elsewhere)", stacklevel=2)
            return
        try:
            record: Dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError or others on bad content
            raise ValueError(f"GradsieveCallback: {path} does not load with torch.load(weights_only=True) "
                             f"({type(error).__name__}: {error})") from error
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ValueError(f"GradsieveCallback: {path} is not a hook state written by this callback")
        if record["world_size"] != args.world_size:
            raise ValueError(f"GradsieveCallback: {path} was saved by a run of {record['world_size']} ranks, this run "
                             f"has {args.world_size}; each rank's compressor memory is its own, so resume with "
                             f"{record['world_size']} ranks")
        if record["global_step"] != global_step:
            raise ValueError(f"GradsieveCallback: {path} was saved at step {record['global_step']}, but the Trainer "
                             f"resumes at step {global_step}")
        self.state.load_state_dict(record["state"])
        self.loaded_from = path

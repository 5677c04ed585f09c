"""gradsieve's hook in PyTorch Lightning: :class:`GradsieveCallback`.

::

    from gradsieve.integrations.lightning import GradsieveCallback
    state = gradsieve.CompressionState("topk", density=0.01)
    trainer = L.Trainer(strategy="ddp", callbacks=[GradsieveCallback(state)], ...)

Lightning's ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers a hook only when the
root device is CUDA; on CPU (gloo) it is not registered and DDP all-reduces densely. The callback
registers the hook itself when fitting starts, on any device, once the strategy has wrapped the
model in DDP and before the first backward pass.

Imports ``lightning.pytorch`` (the ``lightning`` package), or ``pytorch_lightning`` when only that
is installed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

from gradsieve import CompressionState
from gradsieve.integrations import all_ranks_state, check_state, ddp_module, rank_state, register_hook

try:
    import lightning.pytorch as _pl
except ImportError as _missing:
    try:
        import pytorch_lightning as _pl
    except ImportError:
        raise ImportError(f"gradsieve.integrations.lightning needs the 'lightning' package, which could not be "
                          f"imported ({_missing}); install it with: pip install lightning "
                          f"(or pip install \"gradsieve[integrations]\")") from _missing

__all__ = ["GradsieveCallback", "LOGGED"]

# The statistics logged by default, as "gradsieve/<name>".
LOGGED = ("wire_bytes", "dense_bytes", "compression_ratio", "compressed_steps", "skipped_steps", "bad_payloads",
          "compress_s", "decode_s", "memory_bytes")


class GradsieveCallback(_pl.Callback):
    """Registers :func:`gradsieve.compression_hook` on the DDP module of a Lightning run, logs
    ``state.stats()`` and carries every rank's hook state in Lightning's checkpoints.

    Args:
        state: a :class:`gradsieve.CompressionState`, or a function without arguments that returns
            one, called in each process once the process group is up (an exchange that needs the
            process group when it is built, such as ``"hierarchical"``, must be made that way).
        log: the ``state.stats()`` keys logged after every training batch through the
            LightningModule's ``log`` (on step, this rank's numbers: the logger writes rank 0's),
            named ``prefix + key``; non-numeric keys and NaN values (the compression ratio before
            any byte was sent) are left out. Empty: nothing is logged.
        prefix: the prefix of the logged names.

    Checkpoints: Lightning calls a callback's ``state_dict`` on every rank and writes the
    checkpoint from rank 0, so :meth:`state_dict` gathers every rank's ``state.state_dict()`` (a
    collective: every rank must save together, as Lightning's own checkpointing does). Loading
    gives each rank its own entry when fitting starts and fails with a ValueError when the
    checkpoint was saved by another number of ranks.

    The strategy must wrap the model in ``DistributedDataParallel`` (``"ddp"``, ``"ddp_spawn"``,
    ``"ddp_fork"``, ``DDPStrategy``); other strategies (FSDP, DeepSpeed, one device) raise a
    ValueError when fitting starts. Under ``ddp_spawn`` the state the workers use is a copy of the
    one given (read ``state.stats()`` through the logged metrics, or use ``"ddp"``).
    """

    def __init__(self, state: Union[CompressionState, Callable[[], CompressionState]],
                 log: Sequence[str] = LOGGED, prefix: str = "gradsieve/") -> None:
        super().__init__()
        if isinstance(state, CompressionState):
            self.state: Optional[CompressionState] = state
            self._make: Optional[Callable[[], CompressionState]] = None
        elif callable(state):
            self.state, self._make = None, state
        else:
            raise TypeError(f"GradsieveCallback: state must be a gradsieve.CompressionState or a function that "
                            f"returns one, got {type(state).__name__}")
        if isinstance(log, str) or not all(isinstance(key, str) for key in log):
            raise TypeError(f"GradsieveCallback: log must be a sequence of state.stats() keys, got {log!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"GradsieveCallback: prefix must be a string, got {type(prefix).__name__}")
        self.log_keys = tuple(log)
        self.prefix = prefix
        self._pending: Optional[Dict[str, Any]] = None  # a checkpoint's hook states, until fitting starts

    # -------------------------------------------------------------------------------- the hook
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.state is None and self._make is not None:
            self.state = check_state(self._make(), "GradsieveCallback: the state function's result")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ddp = ddp_module(trainer.strategy.model)
        if ddp is None:
            raise ValueError(f"GradsieveCallback: the strategy {type(trainer.strategy).__name__} did not wrap the "
                             f"model in DistributedDataParallel (got {type(trainer.strategy.model).__name__}); the "
                             f"hook needs a DDP strategy (strategy=\"ddp\"); FSDP and DeepSpeed are not supported")
        state = check_state(self.state, "GradsieveCallback")
        if self._pending is not None:
            state.load_state_dict(rank_state(self._pending, "GradsieveCallback: loading the checkpoint"))
            self._pending = None
        register_hook(ddp, state, "GradsieveCallback")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.log_keys or self.state is None:
            return
        stats = self.state.stats()
        values = {}
        for key in self.log_keys:
            value = stats.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            values[self.prefix + key] = float(value)
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True, batch_size=1)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # A checkpoint loaded for validate/test/predict is not kept for a later fit.
        self._pending = None

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        if self.state is None:
            return {}
        return all_ranks_state(self.state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Applied when fitting starts (after the strategy has set up the run): each rank takes its own.
        self._pending = state_dict

"""What a compressor may be told from outside its buckets, one small type per kind of signal.

A compressor declares the kinds it wants in its traits (``Traits.signals``); the hook's state, the
Simulator and speculative training hand it only those, through :meth:`Compressor.observe`. Every
rank must send the same signals at the same step (the training loss and the communication share
are each rank's own: a compressor that reads them shares them through its payload, so that every
rank decides alike).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

__all__ = ["Signal", "Metric", "Loss", "CommShare", "OptimizerSet", "ObservationLag"]


class Signal:
    """Base of every signal type."""


@dataclasses.dataclass(frozen=True)
class Metric(Signal):
    """A validation metric every rank measured alike (``CompressionState.report_metric``)."""

    value: float
    higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Loss(Signal):
    """This rank's training loss of the step whose backward comes next: a float, or a 0-d tensor
    that is not waited for (``CompressionState.report_loss``)."""

    loss: Any


@dataclasses.dataclass(frozen=True)
class CommShare(Signal):
    """The share of the last step this rank waited for its last bucket's exchange (measured by the
    hook), in [0, 1]."""

    share: float


@dataclasses.dataclass(frozen=True)
class OptimizerSet(Signal):
    """The optimizer the run uses (``CompressionState.watch_optimizer``), for compressors that must
    warn about a setting that clashes with them."""

    optimizer: torch.optim.Optimizer


def warn_if_momentum_twice(name: str, what: str, optimizer: torch.optim.Optimizer) -> None:
    """Warns when ``optimizer`` has a momentum of its own (SGD momentum, Adam's betas) while
    compressor ``name`` applies one too (``what`` says which), so that updates get it twice."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) or "betas" in group:
            warnings.warn(
                f"{name} keeps its own momentum ({what}); the optimizer "
                f"{type(optimizer).__name__} has momentum too, so updates get momentum twice. "
                "Use torch.optim.SGD with momentum=0.",
                stacklevel=5,
            )
            return


@dataclasses.dataclass(frozen=True)
class ObservationLag(Signal):
    """Steps by which what a compressor observes at aggregation may lag the step it compresses:
    1 when speculative training commits early and aggregates a step after the next one is
    compressed. A run-time policy fed by the exchange then reads each step's observations this
    many steps later, the same on every rank whenever exchanges happen to end."""

    steps: int


"""Inputs for checking gradsieve's ops: the same data in the test suite (``tests/``) and in the
GPU machine's op driver (``scripts/cuda_op_driver.py``)."""

from __future__ import annotations

import math

import torch

__all__ = ["make_input"]


def make_input(n: int, dtype: torch.dtype = torch.float32, device="cpu", kind: str = "normal",
               seed: int = 0) -> torch.Tensor:
    """Tensor[n] of test data, drawn on the CPU and rounded to ``dtype``:

    * ``normal``: standard normal (distinct magnitudes);
    * ``ties``: seven values (-1.5 .. 1.5 in steps of 0.5) with signed zeros sprinkled in;
    * ``special``: normal with NaN, +inf, -inf and signed zeros sprinkled in.
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
        if n:
            x[torch.randint(0, n, (max(1, n // 7),), generator=g)] = -0.0
    else:
        x = torch.randn(n, generator=g)
        if kind == "special" and n:
            picks = torch.randint(0, n, (max(1, n // 50),), generator=g)
            specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0])
            x[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return x.to(dtype).to(device)

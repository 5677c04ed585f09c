import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import gradsieve  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and gradsieve.cuda_kernels_built()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a GPU and a CUDA build of gradsieve"
)


@pytest.fixture(scope="module")
def quiet_fake_tensor_log():
    """Silences FakeTensor's log for a module whose tests make Meta kernels raise on purpose (it
    logs a full C++ stack trace for each)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def devices():
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def make_input(n, dtype=torch.float32, device="cpu", kind="normal", seed=0):
    """Test data: 'normal' (distinct magnitudes), 'ties' (few distinct values, signed zeros),
    'special' (normal with NaN, +-inf and signed zeros sprinkled in)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
        if n:
            x[torch.randint(0, n, (max(1, n // 7),), generator=g)] = -0.0
    else:
        x = torch.randn(n, generator=g)
        if kind == "special" and n:
            picks = torch.randint(0, n, (max(1, n // 50),), generator=g)
            specials = torch.tensor([math_nan(), float("inf"), float("-inf"), -0.0, 0.0])
            x[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return x.to(dtype).to(device)


def math_nan():
    return float("nan")

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import gradsieve  # noqa: E402
from inputs import make_input  # noqa: E402,F401  (the tests import it from here)

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

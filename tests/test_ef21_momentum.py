"""EF21-SGDM (``ef21`` with ``momentum``, issue 31): against plain EF21 fed the momentum sequence
(top-k is positively homogeneous and EF21 tracks whatever it is given), agreed indices, and
``momentum=0`` leaving plain EF21 (and its memory) as it was."""

import warnings

import pytest
import torch

import gradsieve
from gradsieve.memory import MemoryBank

WORLD = 3
N = 2000


def grads_for(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(N, generator=gen) + 0.3 * rank for rank in range(WORLD)] for _ in range(steps)]


def test_momentum_is_ef21_of_the_momentum_sequence():
    sgdm = gradsieve.Simulator("ef21", world_size=WORLD, density=0.01, momentum=0.9)
    plain = gradsieve.Simulator("ef21", world_size=WORLD, density=0.01)
    velocity = [torch.zeros(N) for _ in range(WORLD)]
    for step, grads in enumerate(grads_for(12)):
        velocity = [v * 0.9 + g for v, g in zip(velocity, grads)]
        got = sgdm.step(grads)
        want = plain.step(velocity)
        assert torch.equal(got, want), step
        for rank in range(WORLD):
            assert torch.equal(sgdm.memory(rank, "momentum"), velocity[rank])
            assert torch.equal(sgdm.memory(rank, "estimate"), plain.memory(rank, "estimate"))


def test_momentum_zero_is_plain_ef21():
    assert gradsieve.get_compressor("ef21").memory_names == ("estimate", "global_estimate")
    assert gradsieve.get_compressor("ef21", momentum=0.0).memory_names == ("estimate", "global_estimate")
    assert "momentum" in gradsieve.get_compressor("ef21", momentum=0.5).memory_names
    a = gradsieve.Simulator("ef21", world_size=WORLD, density=0.01)
    b = gradsieve.Simulator("ef21", world_size=WORLD, density=0.01, momentum=0.0)
    for grads in grads_for(5, seed=1):
        assert torch.equal(a.step(grads), b.step(grads))


def test_momentum_at_agreed_indices():
    compressor = gradsieve.get_compressor("ef21", density=0.05, momentum=0.8)
    layout = gradsieve.BucketLayout(N, (N,), (2,), 1, 0, (0,))
    memory = MemoryBank().get(0, layout.keys, layout.param_numels, compressor.memory_names,
                              torch.device("cpu"), compressor.memory_dtypes)
    gen = torch.Generator().manual_seed(5)
    velocity, estimate = torch.zeros(N), torch.zeros(N)
    for step in range(4):
        grad = torch.randn(N, generator=gen)
        indices = torch.randperm(N, generator=gen)[:100].sort().values
        velocity = velocity * 0.8 + grad
        assert torch.equal(compressor.accumulate(grad, memory, layout, step), velocity - estimate)
        c = compressor.compress_at(grad, memory, layout, step, indices)
        sent = (velocity - estimate)[indices]
        assert torch.equal(c.payload, sent)
        average = torch.zeros(N).index_add_(0, indices, sent)
        compressor.commit(memory, c, average, layout)
        estimate = estimate.clone()
        estimate[indices] += sent
        assert torch.equal(memory.entries["momentum"], velocity)
        assert torch.equal(memory.entries["estimate"], estimate)


def test_ef21_momentum_warns_about_optimizer_momentum():
    model = torch.nn.Linear(4, 2)
    state = gradsieve.CompressionState("ef21", density=0.5, momentum=0.9)
    with pytest.warns(UserWarning, match="ef21 keeps its own momentum .*momentum twice"):
        state.watch_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.watch_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        # Plain EF21 adds no momentum: the optimizer's is the only one.
        gradsieve.CompressionState("ef21", density=0.5).watch_optimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

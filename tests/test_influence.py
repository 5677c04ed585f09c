"""The Hessian-diagonal probe of influence-scored sparse updates: Hutchinson with measured +/-eps
perturbations against the exact diagonal of a small model."""

import pytest
import torch
from torch.func import functional_call

from gradsieve.influence import hessian_diagonal, influence


def small_problem(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    return model, (x, y)


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def exact_diagonal(model, batch):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss_of(w):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(w, sizes), shapes)}
        x, y = batch
        return torch.nn.functional.cross_entropy(functional_call(model.double(), params, (x.double(),)), y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    model.float()
    return hessian.diagonal().float()


def test_the_estimate_correlates_with_the_exact_diagonal():
    model, batch = small_problem()
    exact = exact_diagonal(model, batch)
    estimate = hessian_diagonal(model, loss_fn, batch, probes=300, eps=1e-2,
                                generator=torch.Generator().manual_seed(0))
    flat = torch.cat([e.reshape(-1) for e in estimate])
    correlation = torch.corrcoef(torch.stack([flat, exact]))[0, 1]
    assert correlation > 0.9, float(correlation)


def test_more_probes_get_closer():
    model, batch = small_problem(1)
    exact = exact_diagonal(model, batch)
    errors = []
    for probes in (4, 64):
        est = hessian_diagonal(model, loss_fn, batch, probes=probes, eps=1e-2,
                               generator=torch.Generator().manual_seed(3))
        errors.append(float((torch.cat([e.reshape(-1) for e in est]) - exact).norm()))
    assert errors[1] < 0.5 * errors[0], errors


def test_weights_and_grads_are_left_as_they_were():
    model, batch = small_problem()
    loss_fn(model, batch).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    hessian_diagonal(model, loss_fn, batch, probes=3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_the_influence_formula():
    g = torch.tensor([1.0, -2.0, 0.0])
    h = torch.tensor([4.0, -2.0, 8.0])
    torch.testing.assert_close(influence(g, h, 0.1), torch.tensor([0.1 + 0.02, 0.2 + 0.01, 0.04]))


@pytest.mark.parametrize("kwargs,message", [
    ({"probes": 0}, "probes must be an integer >= 1, got 0"),
    ({"eps": 0.0}, "eps must be a positive number, got 0.0"),
    ({"eps": float("nan")}, "eps must be a positive number, got nan"),
])
def test_bad_arguments_are_named(kwargs, message):
    model, batch = small_problem()
    with pytest.raises(ValueError, match=message):
        hessian_diagonal(model, loss_fn, batch, **kwargs)

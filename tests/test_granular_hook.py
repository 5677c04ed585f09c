"""granular through the DDP hook on 2 gloo workers: the probe (state.probe), the auto policy
choosing the same level on every rank from rank-local losses, and the hook's timing signal."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from distributed import run_workers
from test_hook import batch, flat_params, small_model

pytestmark = pytest.mark.slow  # training runs on gloo workers


def loss_fn(model, data):
    x, y = data
    return torch.nn.functional.cross_entropy(model(x), y)


def worker_probe(rank, world, probe_every):
    model = small_model()
    ddp = DDP(model)
    state = gradsieve.CompressionState("granular", density=0.1, probe_every=probe_every, probes=2)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    errors, probed, unchanged = [], [], []
    try:
        state.probe(ddp, loss_fn, batch(rank, 0))
    except ValueError as e:
        errors.append(str(e))
    for step in range(7):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss_fn(ddp, (x, y)).backward()
        opt.step()
        before = flat_params(model)
        grads = [p.grad.clone() for p in model.parameters()]
        probed.append(state.probe(ddp, loss_fn, (x, y)))
        unchanged.append(torch.equal(before, flat_params(model))
                         and all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters())))
    hessians = {key: saved["hessian"].clone() for key, saved in state.memory.params.items()}
    return {"errors": errors, "probed": probed, "unchanged": unchanged, "hessians": hessians,
            "stats": state.stats(), "finite": bool(torch.isfinite(flat_params(model)).all())}


def test_probe_runs_every_probe_every_steps_and_restores_the_model(tmp_path):
    for r in run_workers(worker_probe, 2, tmp_path, 3):
        assert r["errors"] and "after a training step" in r["errors"][0]
        # state.step counts hook steps: 1 after the first; due at steps 1, 4, 7.
        assert r["probed"] == [True, False, False, True, False, False, True]
        assert all(r["unchanged"]) and r["finite"]
        assert len(r["hessians"]) == 4  # every parameter
        assert all(bool(torch.isfinite(h).all()) for h in r["hessians"].values())
        assert r["stats"]["probes"] == 3 and r["stats"]["probe_s"] > 0
        assert r["stats"]["memory_bytes"] == 12 * 1002  # residual, score, Hessian diagonal


def test_probe_is_off_with_probe_every_zero(tmp_path):
    for r in run_workers(worker_probe, 2, tmp_path, 0):
        assert not any(r["probed"]) and not r["hessians"] and not r["errors"]


def worker_levels(rank, world, options):
    model = small_model()
    ddp = DDP(model)
    state = gradsieve.CompressionState("granular", density=0.1, **options)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    levels, outputs = [], []
    for step in range(24):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = loss_fn(ddp, (x, y))
        state.report_loss(loss.detach())  # each rank its own loss: the policy sees their mean
        loss.backward()
        opt.step()
        levels.append(state.stats().get("level"))
        outputs.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return {"levels": levels, "grads": outputs, "params": flat_params(model),
            "bandit": state.compressor.bandit.state_dict(), "comm": state.compressor.last_signals.get("comm")}


@pytest.mark.parametrize("options", [
    {"granularity": "auto", "policy": "bandit", "ucb_c": 0.2},
    {"granularity": "auto", "policy": "rules", "horizon": 20, "window": 4, "steady": 0.2, "comm_bound": 1.0},
])
def test_every_rank_plays_the_same_level_at_every_step(tmp_path, options):
    a, b = run_workers(worker_levels, 2, tmp_path, options)
    assert a["levels"] == b["levels"]
    assert len(set(a["levels"][1:])) >= 2  # it does switch
    assert a["bandit"] == b["bandit"]
    for ga, gb in zip(a["grads"], b["grads"]):
        assert torch.equal(ga, gb)
    assert torch.equal(a["params"], b["params"])
    # The hook measured its communication share and every rank read the same mean.
    assert a["comm"] == b["comm"] and 0.0 <= a["comm"] <= 1.0

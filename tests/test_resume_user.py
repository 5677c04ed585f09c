"""Resuming in a user's own DDP script: saving ``state.state_dict()`` with the model, the optimizer
and the data generator, and loading it in a fresh process (``state.load_state_dict`` and nothing
else), continues bit for bit like the run that was never interrupted, for every compressor, with
one bucket and with several."""

import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from distributed import run_workers

STEPS, SAVE_AT = 7, 3
OPTIONS = {"granular": {"probe_every": 2}}


def model_of(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.ReLU(),
                               torch.nn.Linear(48, 10))


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def user_script(rank, world, name, bucket_cap_mb, path, resume, ddp_options=None):
    """What a user writes: a DDP loop with the hook; at SAVE_AT it saves everything (this rank's
    hook state included) to ``path``; with ``resume`` a fresh process loads it and goes on. Returns
    the parameters at the end and each step's loss."""
    state = gradsieve.CompressionState(name, density=0.05, **OPTIONS.get(name, {}))
    model = model_of(seed=7 if resume else 0)  # a resumed model starts elsewhere: loading must fix it
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb, **(ddp_options or {}))
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9 if name != "dgc" else 0.0)
    data = torch.Generator().manual_seed(100 + rank)
    start = 0
    if resume:
        saved = torch.load(os.path.join(path, f"rank{rank}.ckpt"), weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        data.set_state(saved["data"])
        state.load_state_dict(saved["gradsieve"])
        start = saved["step"]
    losses = []
    for step in range(start, STEPS):
        if step == SAVE_AT and not resume:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "data": data.get_state(),
                        "gradsieve": state.state_dict(), "step": step}, os.path.join(path, f"rank{rank}.ckpt"))
        batch = (torch.randn(16, 20, generator=data), torch.randint(0, 10, (16,), generator=data))
        opt.zero_grad()
        loss = loss_of(ddp, batch)
        state.report_loss(loss)
        loss.backward()
        opt.step()
        state.probe(model, loss_of, batch)
        losses.append(float(loss))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), losses, state.stats()


@pytest.mark.parametrize("bucket_cap_mb", [25, 0.004], ids=["one-bucket", "several-buckets"])
@pytest.mark.parametrize("name", [n if n == "topk" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in gradsieve.available_compressors()])
def test_resume_in_a_user_script_is_bit_for_bit(tmp_path, name, bucket_cap_mb):
    straight = run_workers(user_script, 2, tmp_path, name, bucket_cap_mb, str(tmp_path), False)
    resumed = run_workers(user_script, 2, tmp_path, name, bucket_cap_mb, str(tmp_path), True)
    for (params, losses, stats), (params2, losses2, stats2) in zip(straight, resumed):
        assert losses2 == losses[SAVE_AT:]
        assert torch.equal(params, params2), (params - params2).abs().max()
        assert stats2["compressed_steps"] == stats["compressed_steps"]


@pytest.mark.parametrize("ddp_options", [{"gradient_as_bucket_view": True}, {"static_graph": True},
                                         {"find_unused_parameters": True}],
                         ids=["bucket-view", "static-graph", "unused-parameters"])
def test_resume_with_ddp_options(tmp_path, ddp_options):
    straight = run_workers(user_script, 2, tmp_path, "topk", 0.004, str(tmp_path), False, ddp_options)
    resumed = run_workers(user_script, 2, tmp_path, "topk", 0.004, str(tmp_path), True, ddp_options)
    for (params, losses, _), (params2, losses2, _) in zip(straight, resumed):
        assert losses2 == losses[SAVE_AT:]
        assert torch.equal(params, params2), (params - params2).abs().max()


def resumed_elsewhere(rank, world, path):
    """Resumes a checkpoint of a several-bucket run with one big bucket: DDP never reaches the
    saved layout."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, _, stats = user_script(rank, world, "topk", 25, path, True)
    return [str(w.message) for w in caught if "bucket layout" in str(w.message)], bool(params.isfinite().all()), stats


def test_resume_in_another_bucket_layout_warns_and_goes_on(tmp_path):
    run_workers(user_script, 2, tmp_path, "topk", 0.004, str(tmp_path), False)
    for messages, finite, stats in run_workers(resumed_elsewhere, 2, tmp_path, str(tmp_path)):
        assert len(messages) == 1 and "not bit for bit" in messages[0], messages
        assert finite and stats["compressed_steps"] == STEPS - 1

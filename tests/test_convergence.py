"""Compressed training on real data (scikit-learn's bundled digits) through the DDP hook."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from distributed import run_workers

pytestmark = pytest.mark.slow  # training runs on gloo workers

sklearn_datasets = pytest.importorskip("sklearn.datasets")

STEPS = 600
BATCH = 32


def digits():
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train_digits(rank, world, compressor, options, optimizer="sgd", revert_threshold=None):
    (x, y), (x_test, y_test) = digits()
    x, y = x[rank::world], y[rank::world]  # each worker its own shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ddp = DDP(model)
    state = gradsieve.CompressionState(compressor, **options)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    if optimizer == "sgd":
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    else:
        make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
        opt = make(ddp.parameters(), lr=0.003)
    state.watch_optimizer(opt)
    if revert_threshold is not None:
        opt = gradsieve.SpeculativeOptimizer(opt, state, revert_threshold=revert_threshold)
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        pick = torch.randint(0, len(y), (BATCH,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x[pick]), y[pick])
        state.report_loss(loss.detach())  # granular's auto policy; ignored by the others
        loss.backward()
        opt.step()
        state.probe(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x[pick], y[pick]))
    if revert_threshold is not None:
        with torch.no_grad(), opt.global_weights():  # the model every rank agrees on
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        return accuracy, {**state.stats(), "speculative": opt.stats()}
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, state.stats()


def worker(rank, world):
    runs = {
        "none": ("none", {}),
        "topk": ("topk", {"density": 0.01}),
        "dgc": ("dgc", {"density": 0.01, "momentum": 0.9}),
        "regtopk": ("regtopk", {"density": 0.01, "mu": 4.0}),
    }
    return {name: train_digits(rank, world, c, o) for name, (c, o) in runs.items()}


def test_topk_dgc_regtopk_at_density_001_match_dense_accuracy_on_digits(tmp_path):
    results = run_workers(worker, 2, tmp_path)
    accuracy = {name: acc for name, (acc, _) in results[0].items()}
    assert all(results[1][name][0] == acc for name, acc in accuracy.items())  # ranks agree
    assert accuracy["none"] > 0.9, accuracy
    for name in ("topk", "dgc", "regtopk"):
        assert accuracy[name] >= accuracy["none"] - 0.02, accuracy
        stats = results[0][name][1]
        # 1% of the entries as (int32 index, fp32 value) plus a header: ~50x fewer bytes.
        assert stats["compression_ratio"] > 30, stats


def worker_adam(rank, world):
    runs = {"none": {}, "adaptive": {"density": 0.01}}
    return {(label, optimizer): train_digits(rank, world, label.split(":")[0], options, optimizer)
            for optimizer in ("adam", "adamw") for label, options in runs.items()}


def test_adaptive_with_adam_and_adamw_matches_dense_accuracy_on_digits(tmp_path):
    """The adaptive compressor was proposed with an adaptive learning rate (Adam): its momentum
    blend sits in front of Adam's moments. At density 0.01 (int8 values, capacity 2%) it stays
    within 2 points of dense training with the same optimizer and steps (defaults: no quantization
    momentum, capacity 1%, about 1 point below here; the proposed beta=0.7 is 0.5 and 1.8 points
    below, recorded in experiments/adaptive/RESULTS.md rather than tested this close to the
    bound)."""
    results = run_workers(worker_adam, 2, tmp_path)
    accuracy = {key: acc for key, (acc, _) in results[0].items()}
    assert all(results[1][key][0] == acc for key, acc in accuracy.items())  # ranks agree
    for optimizer in ("adam", "adamw"):
        assert accuracy["none", optimizer] > 0.9, accuracy
        for label in ("adaptive",):
            assert accuracy[label, optimizer] >= accuracy["none", optimizer] - 0.02, accuracy
            stats = results[0][label, optimizer][1]
            assert stats["compression_ratio"] > 25 and stats["sent"] <= stats["wanted"], stats


def worker_predictive(rank, world):
    runs = {"none": ("none", {}), "predictive": ("predictive", {"density": 0.01, "seed": 0})}
    return {name: train_digits(rank, world, c, o) for name, (c, o) in runs.items()}


def test_predictive_at_density_001_matches_dense_accuracy_on_digits(tmp_path):
    """The learned selection (int8 values, error feedback) within 2 points of dense in the same
    steps."""
    results = run_workers(worker_predictive, 2, tmp_path)
    accuracy = {name: acc for name, (acc, _) in results[0].items()}
    assert all(results[1][name][0] == acc for name, acc in accuracy.items())  # ranks agree
    assert accuracy["none"] > 0.9, accuracy
    assert accuracy["predictive"] >= accuracy["none"] - 0.02, accuracy
    stats = results[0]["predictive"][1]
    # 1% of the entries as (int32 index, int8 value) plus the scales: ~80x fewer bytes.
    assert stats["compression_ratio"] > 50, stats
    assert stats["skipped_steps"] == 0, stats


def worker_granular(rank, world):
    runs = {"none": ("none", {}), "weight": ("granular", {"density": 0.01}),
            "hybrid": ("granular", {"density": 0.01, "granularity": "hybrid"}),
            "auto": ("granular", {"density": 0.01, "granularity": "auto", "horizon": STEPS - 1}),
            "auto-bandit": ("granular", {"density": 0.01, "granularity": "auto", "policy": "bandit"})}
    return {name: train_digits(rank, world, c, o) for name, (c, o) in runs.items()}


def test_granular_levels_at_a_1_percent_byte_budget_match_dense_accuracy_on_digits(tmp_path):
    """Granular's weight, hybrid and auto (rules and bandit), Hessian probes every 25 steps, at 1%
    of the dense bytes, within 2 points of dense in the same steps."""
    results = run_workers(worker_granular, 2, tmp_path)
    accuracy = {name: acc for name, (acc, _) in results[0].items()}
    print(accuracy, {name: s.get("level_steps") for name, (_, s) in results[0].items()})
    assert all(results[1][name][0] == acc for name, acc in accuracy.items())  # ranks agree
    assert accuracy["none"] > 0.9, accuracy
    for name in ("weight", "hybrid", "auto", "auto-bandit"):
        assert accuracy[name] >= accuracy["none"] - 0.02, accuracy
        stats = results[0][name][1]
        # 1% of the fp32 bytes after one dense warm-up step: 600 / (1 + 599 / 99.4) = 85.
        assert 84 < stats["compression_ratio"] <= 86, stats
        assert stats["probes"] == 24 and stats["skipped_steps"] == 0, stats
    assert all(n > 0 for n in results[0]["auto"][1]["level_steps"].values())  # coarse first, then finer


def worker_granular_speculative(rank, world):
    runs = {"none": ("none", {}), "weight": ("granular", {"density": 0.01}),
            "hybrid": ("granular", {"density": 0.01, "granularity": "hybrid"}),
            "auto": ("granular", {"density": 0.01, "granularity": "auto", "horizon": STEPS - 1})}
    return {name: train_digits(rank, world, c, o, revert_threshold=None if c == "none" else 0.01)
            for name, (c, o) in runs.items()}


def test_speculative_granular_at_a_1_percent_byte_budget_matches_dense_accuracy_on_digits(tmp_path):
    """Granular's speculative mode (revert_threshold 0.01, the global weights evaluated) for
    weight, hybrid and auto, within 2 points of dense in the same steps."""
    results = run_workers(worker_granular_speculative, 2, tmp_path)
    accuracy = {name: acc for name, (acc, _) in results[0].items()}
    print(accuracy, {name: s.get("speculative") for name, (_, s) in results[0].items()})
    assert all(results[1][name][0] == acc for name, acc in accuracy.items())  # global weights agree
    assert accuracy["none"] > 0.9, accuracy
    for name in ("weight", "hybrid", "auto"):
        assert accuracy[name] >= accuracy["none"] - 0.02, accuracy
        stats = results[0][name][1]
        assert 84 < stats["compression_ratio"] <= 86, stats
        spec = stats["speculative"]
        assert spec["global_steps"] == STEPS and spec["global_skipped"] == 0, spec
        assert spec["layer_reverts"] > 0 and spec["layers_kept"] > 0, spec

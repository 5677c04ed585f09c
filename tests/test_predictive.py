"""The ``predictive`` compressor: its predictor learns what the world finds important,
adaptive k follows the metric, and its memory (predictor included) behaves like every other
compressor's: restored bit for bit, untouched by a dropped step."""

import copy
import math

import pytest
import torch

import gradsieve
from gradsieve import ops
from gradsieve.compressors.predictive import (features, initial_weights, logits, num_weights,
                                              train_step)


# ---------------------------------------------------------------------------------- the predictor
class Aligned:
    """Gradients of 4 workers: ``aligned`` entries with the same direction on every worker and
    every step; ``cancel`` entries much larger on each worker but opposite between pairs of
    workers (they cancel in the average); the rest small noise. The global top-k (of the true
    average) is made of aligned entries; local magnitude sees mostly the cancelling ones."""

    def __init__(self, n=20_000, seed=0, iid=False):
        self.gen = torch.Generator().manual_seed(seed)
        self.n, self.iid = n, iid
        perm = torch.randperm(n, generator=self.gen)
        self.aligned, self.cancel = perm[:400], perm[400:2400]
        self.sign = torch.sign(torch.randn(400, generator=self.gen))

    def __call__(self):
        gs = [torch.randn(self.n, generator=self.gen) * 0.3 for _ in range(4)]
        if self.iid:
            return [torch.randn(self.n, generator=self.gen) for _ in range(4)]
        x = torch.randn(len(self.cancel), generator=self.gen) * 4
        y = torch.randn(len(self.cancel), generator=self.gen) * 4
        for g, c in zip(gs, (x, -x, y, -y)):
            g[self.aligned] = self.sign * (1.0 + 0.5 * torch.randn(400, generator=self.gen))
            g[self.cancel] = c
        return gs


def precision_run(task, steps, **options):
    """Per step: precision at k of worker 0's predictive selection and of the magnitude top-k of
    a ``topk`` worker 0 on the same gradients, both against the top-k of the true average."""
    k = math.ceil(0.01 * task.n)
    pred = gradsieve.Simulator("predictive", world_size=4, density=0.01, values="fp32", **options)
    topk = gradsieve.Simulator("topk", world_size=4, density=0.01, values="fp32")
    out = []
    for _ in range(steps):
        gs = task()
        best = set(ops.topk_abs(torch.stack(gs).mean(0), k)[1].tolist())
        accumulator = (topk.memory(0, "residual") if topk.steps else torch.zeros(task.n)) + gs[0]
        magnitude = set(ops.topk_abs(accumulator, k)[1].tolist())
        pred.step(gs)
        topk.step(gs)
        chosen = set(pred.last_compressed[0].scratch["indices"].tolist())
        out.append((len(best & chosen) / k, len(best & magnitude) / k))
    return out


@pytest.mark.slow
def test_predictor_learns_what_the_world_finds_important():
    """The learned selection's hypothesis on a task built for it: local history (a consistent direction)
    predicts global importance where local magnitude cannot. ``magnitude=0``: all of k by the
    learned score; the default sends half of k by magnitude and gains about half as much."""
    run = precision_run(Aligned(), 300, magnitude=0.0)
    late = run[-100:]
    predictor = sum(p for p, _ in late) / len(late)
    magnitude = sum(m for _, m in late) / len(late)
    assert magnitude < 0.2  # the cancelling entries dominate local magnitude
    assert predictor > magnitude + 0.25, (predictor, magnitude)
    early = sum(p for p, _ in run[:10]) / 10
    assert early < 0.2  # it starts as magnitude top-k and learns
    default = precision_run(Aligned(), 300)[-100:]
    assert sum(p for p, _ in default) / len(default) > magnitude + 0.1


def test_predictor_on_iid_noise_is_no_worse_than_chance():
    """Nothing to learn (independent noise everywhere): it must not do worse than a random pick."""
    task = Aligned(n=5_000, iid=True)
    run = precision_run(task, 150)
    predictor = sum(p for p, _ in run[-100:]) / 100
    assert predictor >= 0.01  # chance: k / n = 0.01


def test_initial_predictor_ranks_like_topk():
    """Before any training the score orders entries by |residual + grad|: the first step sends
    exactly what topk sends."""
    torch.manual_seed(1)
    grads = [torch.randn(3000) for _ in range(2)]
    a = gradsieve.Simulator("predictive", world_size=2, density=0.02, values="fp32").step(grads)
    b = gradsieve.Simulator("topk", world_size=2, density=0.02).step(grads)
    assert torch.equal(a, b)


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_magnitude_share_one_is_topk_at_every_step(values):
    """``magnitude=1`` takes all of k by |residual + grad|: whatever the predictor learns, every
    step sends what topk sends, int8 rounding and residual included."""
    a = gradsieve.Simulator("predictive", world_size=2, density=0.02, values=values, magnitude=1.0)
    b = gradsieve.Simulator("topk", world_size=2, density=0.02, values=values)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        shared = torch.randn(3000, generator=g)
        grads = [shared + torch.randn(3000, generator=g) for _ in range(2)]
        assert torch.equal(a.step(grads), b.step(grads))


def test_magnitude_share_sends_the_largest_and_then_the_best_scores():
    """With a share m, the round(m * k) largest |a| are always sent; the rest of k follows the
    learned ranking (after training, not the same entries as magnitude top-k)."""
    sim = gradsieve.Simulator("predictive", world_size=2, density=0.02, values="fp32", magnitude=0.5)
    g = torch.Generator().manual_seed(4)
    n, k = 5000, 100
    for step in range(40):
        shared = torch.randn(n, generator=g)
        grads = [shared + 3 * torch.randn(n, generator=g) for _ in range(2)]
        residual = sim.memory(0, "residual").clone() if step else torch.zeros(n)
        sim.step(grads)
        sent = set(sim.last_compressed[0].scratch["indices"].tolist())
        accumulator = residual + grads[0]
        assert len(sent) == k
        assert set(accumulator.abs().topk(k // 2).indices.tolist()) <= sent
    assert sent != set(accumulator.abs().topk(k).indices.tolist())


@pytest.mark.parametrize("history_dtype,per_entry", [("fp32", 20), ("bf16", 14)])
def test_memory_bytes_are_measured_per_name(history_dtype, per_entry):
    sim = gradsieve.Simulator("predictive", world_size=2, density=0.01, history_dtype=history_dtype,
                              param_sizes=(3000, 1000))
    for _ in range(3):
        sim.step([torch.randn(4000) for _ in range(2)])
    held = sim.memory_bytes(0)
    assert held["residual"] == held["received"] == 4 * 4000
    assert held["history0"] == (4 if history_dtype == "fp32" else 2) * 4000
    assert held["weights"] > 0 and held["adam_m"] == held["adam_v"] == held["weights"]
    assert per_entry * 4000 < held["total"] < per_entry * 4000 + 64 * 1024
    assert held["total"] == sum(v for k, v in held.items() if k != "total")


def test_train_step_gradient_matches_autograd():
    torch.manual_seed(2)
    history, hidden = 3, 8
    w = initial_weights(history, hidden, seed=5, key=3) + 0.1 * torch.randn(num_weights(history, hidden))
    x, y = torch.randn(64, history + 2), (torch.rand(64) < 0.3).float()
    new, m, v, loss = train_step(w, torch.zeros_like(w), torch.zeros_like(w), 1, x, y, hidden, lr=0.01)
    wa = w.clone().requires_grad_(True)
    out, _ = logits(wa, x, hidden)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
    ref.backward()
    torch.testing.assert_close(m, 0.1 * wa.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, ref.detach())
    # Adam's first step moves every weight with a gradient by about lr.
    moved = (new - w).abs()[wa.grad.abs() > 1e-2]  # eps is negligible there
    torch.testing.assert_close(moved, torch.full_like(moved, 0.01), rtol=1e-3, atol=1e-6)


def test_features_match_the_fused_op():
    torch.manual_seed(3)
    n, history, hidden = 1000, 3, 8
    grad, residual = torch.randn(n), torch.randn(n)
    hist = [torch.randn(n) for _ in range(history)]
    w = initial_weights(history, hidden, 0, 0) + 0.2 * torch.randn(num_weights(history, hidden))
    a, score, scale = ops.predictive_score(grad, residual, hist, 1, w, hidden, False)
    ordered = [hist[(1 - j) % history] for j in range(history)]
    out, _ = logits(w, features(a, grad, ordered, scale), hidden)
    torch.testing.assert_close(score, torch.nn.functional.softplus(out), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- error feedback
def test_error_compensation_keeps_every_gradient():
    """fp32 values: sum of everything delivered + every residual == sum of every gradient."""
    torch.manual_seed(4)
    sim = gradsieve.Simulator("predictive", world_size=3, density=0.02, values="fp32")
    total, delivered = torch.zeros(4000), torch.zeros(4000)
    for _ in range(30):
        grads = [torch.randn(4000) for _ in range(3)]
        total += sum(grads)
        delivered += 3 * sim.step(grads)
    residuals = sum(sim.memory(r, "residual") for r in range(3))
    torch.testing.assert_close(delivered + residuals, total, rtol=0, atol=1e-4)


def test_int8_rounding_stays_in_the_residual():
    torch.manual_seed(5)
    sim = gradsieve.Simulator("predictive", world_size=2, density=0.05)  # int8 by default
    total, delivered = torch.zeros(2000), torch.zeros(2000)
    for _ in range(20):
        grads = [torch.randn(2000) for _ in range(2)]
        total += sum(grads)
        delivered += 2 * sim.step(grads)
    residuals = sum(sim.memory(r, "residual") for r in range(2))
    torch.testing.assert_close(delivered + residuals, total, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------- memory
def _run(sim, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [sim.step([torch.randn(3000, generator=gen) for _ in range(sim.world_size)]) for _ in range(steps)]


@pytest.mark.parametrize("options", [
    {},
    {"history_dtype": "bf16", "ranking": "product", "label": "average", "history": 5, "hidden": 4},
    {"scope": "layer", "compress_1d": False, "index": "csr16"},
])
def test_checkpoint_restore_continues_bit_for_bit(options):
    sizes, ndims = (2000, 40, 960), (2, 1, 2)
    sim = gradsieve.Simulator("predictive", world_size=2, density=0.02, param_sizes=sizes, param_ndims=ndims,
                              **options)
    _run(sim, 7, seed=0)
    saved = copy.deepcopy(sim.state_dict())
    straight = _run(sim, 6, seed=1)
    again = gradsieve.Simulator("predictive", world_size=2, density=0.02, param_sizes=sizes, param_ndims=ndims,
                                **options)
    again.load_state_dict(saved)  # no training job in flight: it is recomputed from the batch
    resumed = _run(again, 6, seed=1)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert saved["banks"][0]["per_param"][0]["weights"].numel() == num_weights(sim.compressor.history,
                                                                              sim.compressor.hidden)


def test_a_dropped_step_changes_no_memory_and_no_predictor():
    sim = gradsieve.Simulator("predictive", world_size=2, density=0.02)
    _run(sim, 5, seed=0)
    before = copy.deepcopy(sim.state_dict())
    bad = [torch.randn(3000), torch.randn(3000)]
    bad[1][17] = float("inf")
    assert torch.isnan(sim.step(bad)).all()
    after = sim.state_dict()
    for b, a in zip(before["banks"], after["banks"]):
        for key in b["params"]:
            for name in b["params"][key]:
                assert torch.equal(b["params"][key][name], a["params"][key][name])
        for key in b["per_param"]:
            for name in b["per_param"][key]:
                assert torch.equal(b["per_param"][key][name], a["per_param"][key][name]), name
    # And the next good step is the one an undisturbed run would take.
    clean = gradsieve.Simulator("predictive", world_size=2, density=0.02)
    clean.load_state_dict(before)
    good = [torch.randn(3000), torch.randn(3000)]
    assert torch.equal(sim.step(good), clean.step(good))


def test_memory_layout_and_bf16_history():
    sim = gradsieve.Simulator("predictive", world_size=1, density=0.05, history=4, history_dtype="bf16")
    _run(sim, 3, seed=0)
    bucket = sim.banks[0].buckets[0]
    assert set(bucket.entries) == {"residual", "received", "history0", "history1", "history2", "history3"}
    assert bucket.entries["history0"].dtype == torch.bfloat16
    assert bucket.entries["residual"].dtype == torch.float32
    # The history holds the last gradients, slot t mod H for step t.
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3000, generator=gen) for _ in range(3)]
    for t, g in enumerate(grads):
        assert torch.equal(bucket.entries[f"history{t}"], g.to(torch.bfloat16))


# ------------------------------------------------------------------------------------- adaptive k
def test_adaptive_k_follows_a_scripted_metric_sequence():
    sim = gradsieve.Simulator("predictive", world_size=2, density=0.01, k_min=0.0025, k_max=0.04)
    script = [  # (accuracy, density after it)
        (0.50, 0.01),     # first report: nothing to compare with
        (0.60, 0.005),    # +20%: fast, send less
        (0.61, 0.005),    # +1.7%: between plateau and fast, unchanged
        (0.611, 0.01),    # +0.16%: a plateau, send more
        (0.60, 0.02),     # fell: send more
        (0.59, 0.04),
        (0.58, 0.04),     # capped at k_max
        (0.70, 0.02),     # fast again
        (0.90, 0.01), (0.99, 0.005), (1.20, 0.0025), (1.50, 0.0025),  # floored at k_min
        (float("nan"), 0.0025),  # ignored
    ]
    sizes = []
    for metric, density in script:
        sim.report_metric(metric, higher_is_better=True)
        assert sim.compressor.density_now == density, metric
        _run(sim, 1, seed=len(sizes))
        sizes.append(sim.last_compressed[0].payload.numel())
    assert sim.compressor.stats() == {"density": 0.0025, "density_changes": 8}
    assert [e["to"] for e in sim.compressor.density_log] == [0.005, 0.01, 0.02, 0.04, 0.02, 0.01, 0.005, 0.0025]
    # The payload follows the density: 3000 entries at 0.01 -> 30 slots, at 0.04 -> 120.
    assert sizes[5] > sizes[3] > sizes[1]


def test_adaptive_k_for_a_loss_and_off_by_default():
    sim = gradsieve.Simulator("predictive", world_size=1, density=0.01, k_min=0.005, k_max=0.02)
    for loss, density in [(2.0, 0.01), (1.5, 0.005), (1.5, 0.01), (1.6, 0.02)]:
        sim.report_metric(loss, higher_is_better=False)
        assert sim.compressor.density_now == density
    pinned = gradsieve.Simulator("predictive", world_size=1, density=0.01)
    for value in (0.1, 0.1, 0.1, 0.9):
        pinned.report_metric(value)
    assert pinned.compressor.density_now == 0.01 and pinned.compressor.density_log == []


def test_adaptive_k_state_is_checkpointed():
    sim = gradsieve.Simulator("predictive", world_size=1, density=0.01, k_min=0.005, k_max=0.02)
    sim.report_metric(0.5)
    sim.report_metric(0.9)
    saved = copy.deepcopy(sim.state_dict())
    again = gradsieve.Simulator("predictive", world_size=1, density=0.01, k_min=0.005, k_max=0.02)
    again.load_state_dict(saved)
    assert again.compressor.density_now == 0.005 and len(again.compressor.density_log) == 1
    again.report_metric(0.9)  # compared with 0.9, the last report before the checkpoint
    assert again.compressor.density_now == 0.01


@pytest.mark.parametrize("options,message", [
    ({"history": 0}, r"history must be an integer in \[1, 16\], got 0"),
    ({"hidden": 65}, r"hidden must be an integer in \[1, 64\], got 65"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"sample": 4}, r"sample must be an integer in \[8, 2\^20\], got 4"),
    ({"ranking": "magnitude"}, "ranking must be one of"),
    ({"k_min": 0.02}, r"density 0.01 must lie in \[k_min, k_max\]"),
    ({"k_factor": 1.0}, "k_factor must be > 1"),
    ({"k_fast": 0.001}, "k_fast .* must be >= k_plateau"),
    ({"label_decay": 1.0}, r"label_decay must be in \[0, 1\)"),
    ({"magnitude": 1.5}, r"magnitude must be in \[0, 1\], got 1.5"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        gradsieve.get_compressor("predictive", density=0.01, **options)

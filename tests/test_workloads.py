"""The built-in workloads: model sizes, the textcls data and model, defaults and targets."""

import math
import os
import subprocess
import sys

import pytest
import torch

from gradsieve.train import workloads
from gradsieve.train.workloads import DEFAULTS, MODEL_SIZES, WORKLOADS, WorkloadError, make_workload

# (workload, size, fewest parameters, most parameters); cifar10 needs its data (test_train fakes it).
SIZES = [
    ("digits", None, 30_000, 50_000),
    ("linreg", None, 100, 100),
    ("charlm", "tiny", 120_704, 120_704),
    ("charlm", "small", 2_000_000, 3_000_000),
    ("charlm", "base", 9_000_000, 12_000_000),
    ("charlm", "large", 25_000_000, 50_000_000),
    ("textcls", "small", 200_000, 300_000),
    ("textcls", "base", 900_000, 1_100_000),
    ("textcls", "large", 3_500_000, 4_500_000),
    ("textcls", "xl", 15_000_000, 18_000_000),
]


def test_every_size_is_listed():
    assert {(w, s) for w, s, _, _ in SIZES} == (
        {(w, s) for w in WORKLOADS if w != "cifar10" for s in MODEL_SIZES[w] or (None,)})


@pytest.mark.parametrize("name,size,fewest,most", SIZES)
def test_each_size_builds_and_trains_one_step(name, size, fewest, most):
    workload = make_workload(name, 0, 2, 0, model_size=size)
    assert workload.model_size == workloads.resolve_model_size(name, size)
    torch.manual_seed(0)
    model = workload.model()
    params = sum(p.numel() for p in model.parameters())
    assert fewest <= params <= most
    if name == "textcls":
        # The communication-bound case: the embedding table is (nearly) all of the gradient.
        assert model.embed.weight.numel() > 0.95 * params
        assert not model.embed.sparse
    x, y = workload.batch(torch.Generator().manual_seed(0), 2)
    loss = workload.loss(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None and p.grad.layout == torch.strided and torch.isfinite(p.grad).all()


def test_charlm_default_is_tiny_and_unchanged():
    default = make_workload("charlm", 0, 2, 0)
    tiny = make_workload("charlm", 0, 2, 0, model_size="tiny")
    assert default.model_size == "tiny" and len(default.valid_starts) == 256
    assert torch.equal(default.valid_starts, tiny.valid_starts)
    torch.manual_seed(0)
    a = default.model().state_dict()
    torch.manual_seed(0)
    b = workloads.CharTransformer(64).state_dict()  # the model as first released
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # tiny keeps nn.TransformerEncoder's copied layers; the larger sizes start each layer afresh.
    assert torch.equal(a["blocks.layers.0.linear1.weight"], a["blocks.layers.1.linear1.weight"])
    torch.manual_seed(0)
    small = make_workload("charlm", 0, 2, 0, model_size="small").model().state_dict()
    first, second = small["blocks.layers.0.linear1.weight"], small["blocks.layers.1.linear1.weight"]
    assert not torch.equal(first, second)


def test_charlm_larger_sizes_evaluate_on_fewer_windows_of_the_same_draw():
    tiny = make_workload("charlm", 0, 2, 0)
    for size in ("small", "base", "large"):
        w = make_workload("charlm", 0, 2, 0, model_size=size)
        n = workloads.CHARLM_SIZES[size].eval_windows
        assert n < 256 and torch.equal(w.valid_starts, tiny.valid_starts[:n])


def test_textcls_batches_are_deterministic_given_the_generator():
    a, b = make_workload("textcls", 0, 2, 0), make_workload("textcls", 0, 2, 0)
    xa, ya = a.batch(torch.Generator().manual_seed(5), 32)
    xb, yb = b.batch(torch.Generator().manual_seed(5), 32)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (32, 2 * a.snippet - 1) and xa.dtype == torch.int64
    assert 0 <= int(xa.min()) and int(xa.max()) < a.buckets
    assert 0 <= int(ya.min()) and int(ya.max()) < len(a.class_names)
    xc, _ = a.batch(torch.Generator().manual_seed(6), 32)
    assert not torch.equal(xa, xc)
    # Every rank holds the same held-out set and builds the same model from the same seed.
    other = make_workload("textcls", 1, 2, 0)
    assert torch.equal(a.x_test, other.x_test) and torch.equal(a.y_test, other.y_test)
    torch.manual_seed(0)
    ma = a.model().state_dict()
    torch.manual_seed(0)
    mb = other.model().state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_textcls_features_do_not_depend_on_python_hash_seed():
    code = ("from gradsieve.train.workloads import make_workload; "
            "w = make_workload('textcls', 0, 2, 0); print(int(w.x_test.sum()), int(w.starts.sum()))")
    here = make_workload("textcls", 0, 2, 0)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(int(here.x_test.sum())), str(int(here.starts.sum()))]


def test_textcls_held_out_snippets_do_not_overlap_training_ones():
    w = make_workload("textcls", 0, 1, 0)  # one rank: the whole training pool
    _, hashes = workloads.stdlib_token_hashes()
    span = w.snippet
    offset = 0
    for label, h in enumerate(hashes):
        n, cut = len(h), int(0.9 * len(h))
        train = w.starts[w.y == label]
        test = w.test_starts[w.y_test == label]
        assert len(train) == w.train_per_file and len(test) == w.eval_per_file
        assert int(train.min()) >= offset and int(train.max()) + span <= offset + cut
        assert int(test.min()) >= offset + cut and int(test.max()) + span <= offset + n
        offset += n
    covered = (w.starts[:, None] + torch.arange(span)).flatten().unique()
    held_out = (w.test_starts[:, None] + torch.arange(span)).flatten().unique()
    assert len(set(covered.tolist()) & set(held_out.tolist())) == 0


def test_textcls_classes_are_balanced_and_heterogeneous_shards_skewed():
    even = [make_workload("textcls", r, 2, 0) for r in range(2)]
    skewed = [make_workload("textcls", r, 2, 0, heterogeneous=True) for r in range(2)]
    classes = len(even[0].class_names)
    assert torch.equal(even[0].y_test.bincount(), torch.full((classes,), even[0].eval_per_file))
    for w in even:
        assert 0.4 < float((w.y % 2 == 0).float().mean()) < 0.6
    # Rank 0 holds mostly the even-numbered files, rank 1 mostly the odd ones.
    assert float((skewed[0].y % 2 == 0).float().mean()) > 0.75
    assert float((skewed[1].y % 2 == 1).float().mean()) > 0.75
    assert len(skewed[0].y) == len(skewed[1].y) == even[0].shard_size


def test_textcls_learns_with_its_defaults():
    """100 steps of 2 emulated workers (the mean of their losses: what dense DDP averages) with
    the default optimizer, learning rate and batch: the held-out accuracy passes 60% (dense
    gradsieve-train reaches 82% there; 75% is the default target)."""
    defaults = DEFAULTS["textcls"]
    ranks = [make_workload("textcls", r, 2, 0) for r in range(2)]
    generators = [torch.Generator().manual_seed(r) for r in range(2)]
    torch.manual_seed(0)
    model = ranks[0].model()
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults.lr)
    loss_before, accuracy_before = ranks[0].evaluate(model, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of 2 workers gets on 2 cores; faster for these small ops
    try:
        for _ in range(100):
            optimizer.zero_grad()
            batches = [w.batch(g, defaults.batch_size) for w, g in zip(ranks, generators)]
            loss = sum(w.loss(model(x), y) for w, (x, y) in zip(ranks, batches)) / 2
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    loss_after, accuracy_after = ranks[0].evaluate(model, torch.device("cpu"))
    print(f"held-out loss {loss_before:.3f} -> {loss_after:.3f}, "
          f"accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}")
    assert accuracy_before < 0.1
    assert accuracy_after > 0.6
    assert loss_after < loss_before - 0.2


@pytest.mark.parametrize("name,size,message", [
    ("charlm", "huge", "charlm: unknown model size 'huge'; sizes: tiny, small, base, large"),
    ("textcls", "tiny", "textcls: unknown model size 'tiny'; sizes: small, base, large, xl"),
    ("digits", "small", "digits has one model and takes no model size, got 'small'"),
])
def test_bad_model_size_names_the_allowed_ones(name, size, message):
    with pytest.raises(WorkloadError) as err:
        make_workload(name, 0, 2, 0, model_size=size)
    assert message in str(err.value)
    with pytest.raises(WorkloadError) as err:
        workloads.check_available(name, None, size)
    assert message in str(err.value)


def test_sizes_defaults_and_targets_cover_every_workload():
    assert set(MODEL_SIZES) == set(WORKLOADS) == set(DEFAULTS) == set(workloads.BUILDERS)
    for name in WORKLOADS:
        d = DEFAULTS[name]
        assert d.target_metric in ("accuracy", "loss")
        assert math.isfinite(d.target_value) and d.target_value > 0
        if d.target_metric == "accuracy":
            assert d.target_value < 1
        sizes = MODEL_SIZES[name]
        default_size = workloads.resolve_model_size(name, None)
        assert default_size == workloads.DEFAULT_MODEL_SIZE.get(name)
        assert default_size in sizes if sizes else default_size is None
        for size in sizes or (None,):
            assert workloads.defaults_for(name, size).target_value == d.target_value
    assert DEFAULTS["linreg"].target_metric == "loss"  # the gap to the optimum; no accuracy
    assert workloads.defaults_for("charlm").lr == DEFAULTS["charlm"].lr
    assert workloads.defaults_for("charlm", "large").lr < DEFAULTS["charlm"].lr


def test_check_available_accepts_the_builtin_workloads():
    for name in ("digits", "charlm", "textcls", "linreg"):
        workloads.check_available(name, None)
        for size in MODEL_SIZES[name]:
            workloads.check_available(name, None, size)

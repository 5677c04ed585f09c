"""Speculative sparse training (gradsieve.SpeculativeOptimizer) on 2 gloo workers: global weights
bit-identical on every rank, working weights within revert_threshold after every correction,
speculative=False and revert_threshold=0 equal to synchronous training bit for bit, checkpoint and
restore bit for bit; and the wrapper's errors."""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from distributed import run_workers
from test_hook import batch, flat_params, small_model

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}
GRANULAR = {"density": 0.1, "probe_every": 0}


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def make(rank, optimizer, mode, threshold, options, bucket_cap_mb=25.0, seed=0, warmup_steps=1,
         compressor="granular", overlap=None):
    model = small_model(seed)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = gradsieve.CompressionState(compressor, warmup_steps=warmup_steps, **options)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = OPTIMIZERS[optimizer](ddp.parameters())
    if mode != "sync":
        opt = gradsieve.SpeculativeOptimizer(opt, state, revert_threshold=threshold,
                                             speculative=mode == "spec", overlap_compress=overlap)
    return model, ddp, state, opt


def run_steps(rank, ddp, opt, steps, start=0, record=None):
    for step in range(start, start + steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        if record is not None:
            record(step)


def worker_properties(rank, world, optimizer, threshold, options, bucket_cap_mb):
    model, ddp, state, opt = make(rank, optimizer, "spec", threshold, options, bucket_cap_mb)
    globals_, after_correction, working_differs, inflight = [], [], [], []
    correct = opt._correct

    def checked_correct():
        correct()
        # Independent of the wrapper's own bookkeeping: plain torch on the two copies.
        after_correction.append([float(torch.linalg.vector_norm(p.detach() - g) / torch.linalg.vector_norm(g))
                                 for p, g in zip(model.parameters(), opt.global_parameters())])

    opt._correct = checked_correct

    def record(step):
        globals_.append(flat(opt.global_parameters()))
        working_differs.append(not torch.equal(flat_params(model), globals_[-1]))
        inflight.append(len(state.inflight.exchanges))

    run_steps(rank, ddp, opt, 16, record=record)
    return {"globals": globals_, "after": after_correction, "differs": working_differs,
            "inflight": inflight, "stats": opt.stats(), "hook": state.stats(),
            "finite": bool(torch.isfinite(flat_params(model)).all())}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_global_weights_identical_and_working_weights_within_threshold(tmp_path, optimizer):
    threshold = 0.02
    results = run_workers(worker_properties, 2, tmp_path, optimizer, threshold, GRANULAR, 25.0)
    a, b = results
    assert len(a["globals"]) == 16
    for step, (ga, gb) in enumerate(zip(a["globals"], b["globals"])):
        assert torch.equal(ga, gb), f"global weights differ between ranks after step {step}"
    for r in results:
        assert r["finite"]
        # Warm-up step 0 is synchronous; every later step left its exchange in flight.
        assert r["inflight"][0] == 0 and all(n == 1 for n in r["inflight"][1:])
        assert len(r["after"]) == 14  # a correction at every step after the first compressed one
        assert all(d <= threshold for after in r["after"] for d in after)
        stats = r["stats"]
        assert stats["corrections"] == 14 and stats["global_steps"] == 15  # the last in flight
        # The threshold is met both ways: some layers reverted, some kept their speculative
        # weights (so the model differed from the global weights after some steps).
        assert stats["layer_reverts"] > 0 and stats["layers_kept"] > 0
        assert any(r["differs"][1:])
        assert 0 < stats["max_drift"] <= threshold


@pytest.mark.slow
def test_several_buckets_and_a_bucket_rebuild(tmp_path):
    results = run_workers(worker_properties, 2, tmp_path, "momentum", 0.05, GRANULAR, 0.001)
    a, b = results
    assert all(torch.equal(x, y) for x, y in zip(a["globals"], b["globals"]))
    for r in results:
        assert r["finite"] and all(d <= 0.05 for after in r["after"] for d in after)
        assert max(r["inflight"]) > 1  # several buckets in flight at once


def worker_compare(rank, world, optimizer, mode, threshold, options, compressor="granular"):
    model, ddp, state, opt = make(rank, optimizer, mode, threshold, options, compressor=compressor)
    trail = []
    run_steps(rank, ddp, opt, 10, record=lambda step: trail.append(flat_params(model)))
    out = {"trail": trail, "hook": state.stats()}
    if mode == "spec":
        out["global"] = flat(opt.global_parameters())
        out["stats"] = opt.stats()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_threshold_zero_is_synchronous_training_bit_for_bit(tmp_path, optimizer):
    sync = run_workers(worker_compare, 2, tmp_path, optimizer, "sync", 0.0, GRANULAR)
    spec = run_workers(worker_compare, 2, tmp_path, optimizer, "spec", 0.0, GRANULAR)
    for s, p in zip(sync, spec):
        for step, (x, y) in enumerate(zip(s["trail"], p["trail"])):
            assert torch.equal(x, y), f"step {step}"
        assert torch.equal(p["global"], p["trail"][-1])
        assert p["stats"]["global_steps"] == 10 and p["stats"]["corrections"] == 0
        assert s["hook"]["wire_bytes"] == p["hook"]["wire_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_speculative_false_is_synchronous_training_bit_for_bit(tmp_path, optimizer):
    sync = run_workers(worker_compare, 2, tmp_path, optimizer, "sync", 0.0, GRANULAR)
    off = run_workers(worker_compare, 2, tmp_path, optimizer, "off", 0.05, GRANULAR)
    for s, p in zip(sync, off):
        assert all(torch.equal(x, y) for x, y in zip(s["trail"], p["trail"]))


@pytest.mark.slow
def test_speculation_changes_the_trajectory_and_topk_works_too(tmp_path):
    # The counterpart of the two tests above: with a threshold the run is not the synchronous one.
    sync = run_workers(worker_compare, 2, tmp_path, "sgd", "sync", 0.0, {"density": 0.1}, "topk")
    spec = run_workers(worker_compare, 2, tmp_path, "sgd", "spec", 0.05, {"density": 0.1}, "topk")
    for s, p in zip(sync, spec):
        assert torch.equal(s["trail"][0], p["trail"][0])  # the warm-up step is synchronous
        assert not torch.equal(s["trail"][-1], p["trail"][-1])
        assert bool(torch.isfinite(p["global"]).all())
    assert torch.equal(spec[0]["global"], spec[1]["global"])


AUTO = {"density": 0.1, "probe_every": 0, "granularity": "auto", "policy": "bandit"}


def worker_checkpoint(rank, world, tmp, phase, optimizer):
    threshold = 0.03
    if phase == "straight":
        model, ddp, state, opt = make(rank, optimizer, "spec", threshold, AUTO)
        run_steps(rank, ddp, opt, 10)
        return {"working": flat_params(model), "global": flat(opt.global_parameters()),
                "opt": opt.optimizer.state_dict(), "gopt": opt.global_optimizer.state_dict(),
                "bandit": state.compressor.bandit.state_dict(), "residual": state.memory.total("residual")}
    if phase == "first":
        model, ddp, state, opt = make(rank, optimizer, "spec", threshold, AUTO)
        run_steps(rank, ddp, opt, 5)
        errors = []
        try:
            state.state_dict()  # exchanges in flight: the wrapper's state must be saved first
        except ValueError as e:
            errors.append(str(e))
        saved = {"opt": opt.state_dict(), "hook": state.state_dict(), "model": model.state_dict()}
        torch.save(saved, f"{tmp}/spec{rank}.pt")
        return errors
    saved = torch.load(f"{tmp}/spec{rank}.pt", weights_only=False)
    model, ddp, state, opt = make(rank, optimizer, "spec", threshold, AUTO, seed=123)
    model.load_state_dict(saved["model"])
    state.load_state_dict(saved["hook"])
    opt.load_state_dict(saved["opt"])
    run_steps(rank, ddp, opt, 5, start=5)
    return {"working": flat_params(model), "global": flat(opt.global_parameters()),
            "opt": opt.optimizer.state_dict(), "gopt": opt.global_optimizer.state_dict(),
            "bandit": state.compressor.bandit.state_dict(), "residual": state.memory.total("residual")}


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_checkpoint_restore_continues_bit_for_bit(tmp_path, optimizer):
    straight = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "straight", optimizer)
    errors = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "first", optimizer)
    assert all(e and "SpeculativeOptimizer" in e[0] for e in errors)
    resumed = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "second", optimizer)
    for a, b in zip(straight, resumed):
        for key in a:
            assert same(a[key], b[key]), key
    assert not torch.equal(straight[0]["working"], straight[1]["working"])  # each rank's own
    assert torch.equal(straight[0]["global"], straight[1]["global"])


def worker_memory(rank, world, optimizer):
    model, ddp, state, opt = make(rank, optimizer, "spec", 0.05, GRANULAR)
    run_steps(rank, ddp, opt, 4)
    return opt.stats()["memory_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,per_param", [("sgd", 4), ("momentum", 8), ("adam", 12)])
def test_extra_memory_is_a_copy_of_the_weights_and_of_the_optimizer_state(tmp_path, optimizer, per_param):
    numel = sum(p.numel() for p in small_model().parameters())
    tensors = len(list(small_model().parameters()))
    extra = 4 * tensors if optimizer == "adam" else 0  # Adam's step counters (0-d float32)
    for measured in run_workers(worker_memory, 2, tmp_path, optimizer):
        assert measured == per_param * numel + extra


def worker_scheduler(rank, world):
    model, ddp, state, opt = make(rank, "sgd", "spec", 0.05, GRANULAR)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(5):
        run_steps(rank, ddp, opt, 1, start=step)
        scheduler.step()
    opt.synchronize()
    return opt.optimizer.param_groups[0]["lr"], opt.global_optimizer.param_groups[0]["lr"]


@pytest.mark.slow
def test_a_scheduler_reaches_the_global_optimizer(tmp_path):
    for working, global_lr in run_workers(worker_scheduler, 2, tmp_path):
        assert working == pytest.approx(0.025)
        assert global_lr == working


def worker_global_weights(rank, world):
    model, ddp, state, opt = make(rank, "sgd", "spec", 0.05, GRANULAR)
    run_steps(rank, ddp, opt, 6)
    working = flat_params(model)
    with opt.global_weights():
        inside = flat_params(model)
    return working, inside, flat_params(model), flat(opt.global_parameters()), len(state.inflight.exchanges)


@pytest.mark.slow
def test_global_weights_context_swaps_and_restores(tmp_path):
    (w0, in0, after0, g0, n0), (w1, in1, after1, g1, n1) = run_workers(worker_global_weights, 2, tmp_path)
    assert torch.equal(in0, in1) and torch.equal(in0, g0) and torch.equal(g0, g1)
    assert torch.equal(w0, after0) and torch.equal(w1, after1)
    assert n0 == n1 == 0  # synchronize() ended the exchange in flight


def worker_mismatch(rank, world):
    model = small_model()
    ddp = DDP(model)
    state = gradsieve.CompressionState("granular", **GRANULAR)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if rank == 0:
        opt = gradsieve.SpeculativeOptimizer(opt, state, revert_threshold=0.05)
    try:
        run_steps(rank, ddp, opt, 3)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_ranks_that_disagree_on_speculation_fail_with_a_clear_error(tmp_path):
    for message in run_workers(worker_mismatch, 2, tmp_path):
        assert message is not None and "configured differently" in message and "speculative" in message


# ------------------------------------------------------------------------------ single process
def test_wrapper_errors_name_the_argument():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = torch.optim.SGD(params, lr=0.1)
    state = gradsieve.CompressionState("granular", density=0.1)
    with pytest.raises(ValueError, match="revert_threshold.*-1"):
        gradsieve.SpeculativeOptimizer(sgd, state, revert_threshold=-1)
    with pytest.raises(ValueError, match="revert_threshold.*nan"):
        gradsieve.SpeculativeOptimizer(sgd, state, revert_threshold=float("nan"))
    with pytest.raises(ValueError, match="optimizer must be"):
        gradsieve.SpeculativeOptimizer(params, state)
    with pytest.raises(ValueError, match="state must be"):
        gradsieve.SpeculativeOptimizer(sgd, "granular")
    with pytest.raises(ValueError, match="speculative must be"):
        gradsieve.SpeculativeOptimizer(sgd, state, speculative="yes")
    with pytest.raises(ValueError, match="'none' is dense"):
        gradsieve.SpeculativeOptimizer(sgd, gradsieve.CompressionState("none"))
    with pytest.raises(ValueError, match="'ef21' does not return the average"):
        gradsieve.SpeculativeOptimizer(sgd, gradsieve.CompressionState("ef21", density=0.1))
    wrapped = gradsieve.SpeculativeOptimizer(sgd, state)
    with pytest.raises(ValueError, match="already wrapped"):
        gradsieve.SpeculativeOptimizer(wrapped, state)
    with pytest.raises(ValueError, match="closures"):
        wrapped.step(lambda: 0.0)
    with pytest.raises(ValueError, match="before wrapping"):
        wrapped.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    other = gradsieve.SpeculativeOptimizer(torch.optim.SGD(params, lr=0.1),
                                           gradsieve.CompressionState("granular", density=0.1),
                                           revert_threshold=0.5)
    with pytest.raises(ValueError, match="revert_threshold=0.01"):
        other.load_state_dict(wrapped.state_dict())
    assert isinstance(wrapped, torch.optim.Optimizer) and wrapped.param_groups is sgd.param_groups


def test_revert_is_per_layer_and_copies_the_optimizer_state():
    # The correction alone, on hand-made weights: layer 0 drifted 10%, layer 1 0.1%.
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt = gradsieve.SpeculativeOptimizer(sgd, gradsieve.CompressionState("topk", density=0.5),
                                         revert_threshold=0.01)
    opt.global_optimizer.state[opt._global[0]] = {"momentum_buffer": torch.full((4,), 7.0)}
    sgd.state[params[0]] = {"momentum_buffer": torch.full((4,), -1.0)}
    sgd.state[params[1]] = {"momentum_buffer": torch.full((4,), -2.0)}
    with torch.no_grad():
        params[0].add_(0.1)
        params[1][0] += 0.004
    opt._correct()
    assert torch.equal(params[0].detach(), torch.ones(4))  # reverted
    assert torch.equal(sgd.state[params[0]]["momentum_buffer"], torch.full((4,), 7.0))
    assert params[1].detach()[0] == pytest.approx(1.004)  # kept: 0.2% < 1%
    assert torch.equal(sgd.state[params[1]]["momentum_buffer"], torch.full((4,), -2.0))
    assert opt.counters["layer_reverts"] == 1 and opt.counters["layers_kept"] == 1
    assert opt.last_drifts[0] == 0.0 and opt.last_drifts[1] == pytest.approx(0.002, rel=1e-3)


@pytest.mark.parametrize("compressor,options", [
    ("topk", {"density": 0.05}),
    ("topk", {"density": 0.05, "values": "int8", "index": "csr16"}),
    ("regtopk", {"density": 0.05}),
    ("granular", {"density": 0.05, "granularity": "weight", "values": "int8"}),
    ("granular", {"density": 0.05, "granularity": "layer"}),
    ("granular", {"density": 0.05, "granularity": "hybrid"}),
])
def test_own_update_is_what_left_the_residual(compressor, options):
    # With empty memory, error feedback keeps grad - sent: the own update is grad - residual.
    from gradsieve.compressor import BucketLayout
    from gradsieve.memory import MemoryBank

    comp = gradsieve.get_compressor(compressor, **options)
    layout = BucketLayout(600, (400, 150, 50), (2, 2, 1), 2)
    memory = MemoryBank().get(0, layout.keys, layout.param_numels, comp.memory_names, torch.device("cpu"),
                              comp.memory_dtypes)
    grad = torch.randn(600, generator=torch.Generator().manual_seed(3))
    compressed = comp.compress(grad, memory, layout, 0)
    own, finite, well_formed = comp.own_update(compressed, layout, 0)
    assert (finite & well_formed).tolist() == [True]
    assert torch.allclose(own, grad - compressed.pending["residual"], atol=1e-6)
    assert 0 < int((own != 0).sum()) < 600


def worker_overflow(rank, world, overlap, bucket_cap_mb=25.0):
    model, ddp, state, opt = make(rank, "momentum", "spec", 0.05, GRANULAR, bucket_cap_mb, overlap=overlap)
    seen = []
    for step in range(8):
        x, y = batch(rank, step)
        if step == 4 and rank == 1:
            x[0, 0] = float("inf")  # this rank's gradient is not finite
        residual = state.memory.total("residual").clone() if state.memory.buckets else None
        before = flat_params(model)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        seen.append({"moved": not torch.equal(before, flat_params(model)), "residual": residual,
                     "stats": dict(opt.counters)})
    opt.synchronize()
    return {"seen": seen, "global": flat(opt.global_parameters()), "hook": state.stats(),
            "finite": bool(torch.isfinite(flat_params(model)).all()), "buckets": list(state.memory.buckets)}


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_on_every_rank_and_memory_kept(tmp_path):
    a, b = run_workers(worker_overflow, 2, tmp_path, False)
    assert torch.equal(a["global"], b["global"]) and bool(torch.isfinite(a["global"]).all())
    for r in (a, b):
        assert r["finite"]
        # The exchange of step 4 ends in step 5's backward: the global step is skipped on both
        # ranks and nothing is committed (residuals are read before each step: the one before
        # step 5 holds step 3's commit, the one before step 6 the same).
        assert r["seen"][4]["stats"]["global_skipped"] == 0 and r["seen"][5]["stats"]["global_skipped"] == 1
        assert r["seen"][7]["stats"]["global_skipped"] == 1
        assert r["hook"]["skipped_steps"] == 1 and r["hook"]["rolled_back"] == 0
        assert torch.equal(r["seen"][5]["residual"], r["seen"][6]["residual"])
        assert not torch.equal(r["seen"][4]["residual"], r["seen"][5]["residual"])
    # Only the rank whose update was not finite skipped its own speculative step.
    # (Its weights may still move at that step: the correction for step 3 comes first.)
    assert b["seen"][4]["stats"]["own_skipped"] == 1 and b["seen"][7]["stats"]["own_skipped"] == 1
    assert a["seen"][7]["stats"]["own_skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("bucket_cap_mb", [25.0, 0.001])
def test_a_non_finite_step_rolls_back_the_early_commit(tmp_path, bucket_cap_mb):
    """overlap_compress: step 4's memory was committed when its payload was sent, and step 5 was
    compressed from it. When step 4's exchange lands skipped (at the end of step 5's backward),
    step 5's exchange is dropped as well and the memory goes back to what it was before step 4:
    synchronous training with steps 4 and 5 skipped holds the same. One bucket, and several."""
    a, b = run_workers(worker_overflow, 2, tmp_path, True, bucket_cap_mb)
    assert torch.equal(a["global"], b["global"]) and bool(torch.isfinite(a["global"]).all())
    for r in (a, b):
        assert r["finite"]
        assert r["seen"][4]["stats"]["global_skipped"] == 0 and r["seen"][5]["stats"]["global_skipped"] == 2
        assert r["seen"][7]["stats"]["global_skipped"] == 2
        buckets = len(r["buckets"])
        assert r["hook"]["skipped_steps"] == 2 and r["hook"]["rolled_back"] == buckets
        assert (buckets > 1) == (bucket_cap_mb < 1)
        # Read before steps 4, 5, 6, 7: before 4 (step 3 committed), before 5 (step 4 committed
        # early), before 6 (rolled back to before 4), before 7 (step 6 committed on top).
        assert torch.equal(r["seen"][4]["residual"], r["seen"][6]["residual"])
        assert not torch.equal(r["seen"][4]["residual"], r["seen"][5]["residual"])
        assert not torch.equal(r["seen"][6]["residual"], r["seen"][7]["residual"])
        assert bool(torch.isfinite(r["seen"][7]["residual"]).all())
    # Rank 1's own updates of steps 4 (its gradient) and 5 (compressed from step 4's residual)
    # were not finite: it skipped both; rank 0 skipped none.
    assert b["seen"][4]["stats"]["own_skipped"] == 1 and b["seen"][7]["stats"]["own_skipped"] == 2
    assert a["seen"][7]["stats"]["own_skipped"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("compressor,options", [
    ("dgc", {"density": 0.1, "momentum": 0.9}),
    ("adaptive", {"density": 0.1}),
    ("predictive", {"density": 0.1}),
    ("regtopk", {"density": 0.1}),
])
def test_other_averaging_compressors_run_speculatively(tmp_path, compressor, options):
    a, b = run_workers(worker_compare, 2, tmp_path, "sgd", "spec", 0.05, options, compressor)
    assert torch.equal(a["global"], b["global"]) and bool(torch.isfinite(a["global"]).all())
    assert not torch.equal(a["trail"][-1], b["trail"][-1])  # each rank's own working weights
    assert a["stats"]["global_steps"] == 9 and a["stats"]["corrections"] == 8


# ------------------------------------------------------------------------------ overlap_compress
def memory_snapshot(state):
    """Every bucket's memory entries, by bucket and name (what a commit writes)."""
    return {(index, name): t.clone() for index, m in sorted(state.memory.buckets.items())
            for name, t in sorted(m.entries.items())}


def worker_overlap(rank, world, compressor, options, overlap, bucket_cap_mb, sync_every=0):
    model, ddp, state, opt = make(rank, "momentum", "spec", 0.05, options, bucket_cap_mb,
                                  compressor=compressor, overlap=overlap)
    compress = state.compressor.compress
    earlier_in_flight = []  # at each compression: is an exchange of an earlier step still in flight?

    def watched(grad, memory, layout, step):
        hook_step = step + state.warmup_steps
        earlier_in_flight.append(any(x.job.at < hook_step for x in state.inflight.exchanges))
        return compress(grad, memory, layout, step)

    state.compressor.compress = watched
    trail, globals_, held, consumed = [], [], [], []

    def record(step):
        previous = getattr(state.compressor, "previous", None)  # granular: last observation used
        consumed.append(previous[0] if previous else None)
        trail.append(flat_params(model))
        globals_.append(flat(opt.global_parameters()))
        held.append(state.stats()["rollback_bytes"])
        if sync_every and step % sync_every == 0:
            opt.synchronize()

    run_steps(rank, ddp, opt, 12, record=record)
    opt.synchronize()
    return {"trail": trail, "globals": globals_, "memory": memory_snapshot(state), "held": held,
            "earlier_in_flight": earlier_in_flight, "stats": opt.stats(), "hook": state.stats(),
            "consumed": consumed,
            "level_steps": list(getattr(state.compressor, "level_steps", []))}


@pytest.mark.slow
@pytest.mark.parametrize("compressor,options", [
    ("granular", GRANULAR),
    ("granular", {**GRANULAR, "granularity": "hybrid"}),
    ("topk", {"density": 0.1}),
    ("dgc", {"density": 0.1, "momentum": 0.9}),
    ("adaptive", {"density": 0.1}),
])
def test_overlap_compress_moves_the_wait_and_changes_no_number(tmp_path, compressor, options):
    """Committing memory when a payload is sent changes when the previous exchange is waited for
    (after this step's compression instead of before it) and nothing else, when no step is
    skipped: working and global weights at every step and the final memory are bit-identical,
    with several buckets."""
    late = run_workers(worker_overlap, 2, tmp_path, compressor, options, False, 0.001)
    early = run_workers(worker_overlap, 2, tmp_path, compressor, options, None, 0.001)
    for off, on in zip(late, early):
        assert on["stats"]["overlap_compress"] and not off["stats"]["overlap_compress"]
        assert all(torch.equal(x, y) for x, y in zip(off["trail"], on["trail"]))
        assert all(torch.equal(x, y) for x, y in zip(off["globals"], on["globals"]))
        assert same(off["memory"], on["memory"]) and len(on["memory"]) >= 2
        # The overlap is real: compressions ran with an earlier step's exchange still in flight.
        assert sum(on["earlier_in_flight"]) >= 10 and not any(off["earlier_in_flight"])
        assert on["hook"]["rolled_back"] == 0 and on["hook"]["skipped_steps"] == 0
        # Between steps the memory of one step is held to roll back (the old tensors).
        assert max(on["held"]) > 0 and not any(off["held"])
    assert torch.equal(early[0]["globals"][-1], early[1]["globals"][-1])


@pytest.mark.slow
def test_rollback_memory_is_one_step_of_compressor_memory(tmp_path):
    numel = sum(p.numel() for p in small_model().parameters())
    for r in run_workers(worker_overlap, 2, tmp_path, "granular", GRANULAR, None, 25.0):
        # granular's memory: residual and score, float32 each; warm-up and first compressed step
        # hold nothing yet.
        assert r["held"][0] == 0 and all(h == 8 * numel for h in r["held"][2:]), r["held"]
        assert r["hook"]["memory_bytes"] == 8 * numel


@pytest.mark.slow
def test_the_auto_policy_does_not_depend_on_when_exchanges_end(tmp_path):
    """With overlap_compress the bandit reads each step's observations one step later (they land
    after the next step is compressed); ending exchanges early (synchronize, an evaluation's
    global_weights) must not change what it decides."""
    plain = run_workers(worker_overlap, 2, tmp_path, "granular", AUTO, None, 25.0)
    synced = run_workers(worker_overlap, 2, tmp_path, "granular", AUTO, None, 25.0, 3)
    for a, b in zip(plain, synced):
        # After hook step s (compressed step s - 1) the policy has used the observations up to
        # compressed step s - 3, whether or not exchanges were ended early.
        assert a["consumed"] == b["consumed"] == [None, None, None] + list(range(0, 9)), a["consumed"]
        assert a["level_steps"] == b["level_steps"] and sum(a["level_steps"]) == 11
        assert all(torch.equal(x, y) for x, y in zip(a["globals"], b["globals"]))
    assert plain[0]["level_steps"] == plain[1]["level_steps"]


def worker_corrupted_overlap(rank, world, overlap):
    from test_hostile import corrupting
    model, ddp, state, opt = make(rank, "sgd", "spec", 0.05, {"density": 0.1}, compressor="topk",
                                  overlap=overlap)
    state.max_bad_steps = 2
    corrupting(state, 1, set(range(2, 20)))
    run_steps(rank, ddp, opt, 12)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, None])
def test_a_peer_that_keeps_sending_garbage_is_named_with_overlap_too(tmp_path, overlap):
    # With overlap_compress every bad step also drops the step after it; the dropped steps
    # neither count as bad nor end the streak.
    with pytest.raises(Exception, match=r"malformed payloads for 2 steps in a row \(max_bad_steps=2\) "
                                        r"from rank\(s\) \[1\]"):
        run_workers(worker_corrupted_overlap, 2, tmp_path, overlap)


def test_overlap_compress_errors_and_defaults():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="overlap_compress must be True, False or None, got 'yes'"):
        gradsieve.SpeculativeOptimizer(sgd, gradsieve.CompressionState("granular", density=0.1),
                                       overlap_compress="yes")
    with pytest.raises(ValueError, match="overlap_compress=True.*'regtopk'"):
        gradsieve.SpeculativeOptimizer(sgd, gradsieve.CompressionState("regtopk", density=0.1),
                                       overlap_compress=True)
    for name, expected in (("regtopk", False), ("predictive", False), ("granular", True), ("topk", True)):
        state = gradsieve.CompressionState(name, density=0.1)
        wrapped = gradsieve.SpeculativeOptimizer(torch.optim.SGD(params, lr=0.1), state)
        assert wrapped.overlap_compress is expected and state.overlap_compress is expected
        if gradsieve.signals.ObservationLag in state.compressor.traits.signals:  # granular's policy
            assert state.compressor.observation_lag == int(expected)
    # Threshold 0 waits for every exchange in its own step: nothing to overlap.
    state = gradsieve.CompressionState("granular", density=0.1)
    wrapped = gradsieve.SpeculativeOptimizer(sgd, state, revert_threshold=0, overlap_compress=True)
    assert not wrapped.overlap_compress and not state.overlap_compress

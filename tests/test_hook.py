"""The DDP communication hook on real gloo process groups (2 CPU workers)."""

import gc
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
import reference
from distributed import recording_hook, run_workers

STEPS = 6


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return model.to(dtype)


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 20, generator=g).to(dtype), torch.randint(0, 10, (16,), generator=g)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def train(rank, model, state, steps, hook=None, lr=0.1, start=0, dtype=torch.float32):
    ddp = DDP(model)
    ddp.register_comm_hook(state, hook or gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    for step in range(start, start + steps):
        x, y = batch(rank, step, dtype)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
        opt.step()
    return ddp, opt


# ------------------------------------------------------------------------------------------ workers
def worker_density_one(rank, world):
    dense = train(rank, small_model(), gradsieve.CompressionState("none"), STEPS)[0]
    sparse = train(rank, small_model(), gradsieve.CompressionState("topk", density=1.0), STEPS)[0]
    return flat_params(dense.module), flat_params(sparse.module)


def worker_bookkeeping(rank, world, compressor, options):
    recorder = recording_hook()
    state = gradsieve.CompressionState(compressor, warmup_steps=1, **options)
    train(rank, small_model(), state, STEPS, hook=recorder)
    residual = state.memory.total("residual")
    (bucket,) = state.memory.buckets.values()  # the model fits in one bucket
    return {"inputs": recorder.inputs, "outputs": recorder.outputs, "residual": residual,
            "stats": state.stats(), "keys": bucket.keys, "numels": bucket.numels}


def bucket_recorder(model):
    """compression_hook that also keeps, for every bucket it sees: the step (``hook.step``, set by
    the training loop), DDP's bucket index, the bucket's parameters (their positions in
    ``model.parameters()``, in bucket order), its input (this rank's gradient) and its output."""
    position = {id(p): i for i, p in enumerate(model.parameters())}
    calls = []

    def hook(state, bucket):
        call = {"step": hook.step, "index": bucket.index(),
                "params": tuple(position[id(p)] for p in bucket.parameters()),
                "input": bucket.buffer().detach().clone()}
        calls.append(call)

        def keep(fut):
            call["output"] = fut.value().detach().clone()
            return fut.value()

        return gradsieve.compression_hook(state, bucket).then(keep)

    hook.step, hook.calls = 0, calls
    return hook


def memory_by_parameter(state, calls):
    """{parameter position: {"key", "numel", memory name: tensor}} as state.memory holds it: each
    bucket's parameter keys (BucketMemory.keys, bucket order) are matched with the parameters DDP
    put in that bucket at its last call; a parameter's memory is read from the memory
    MemoryBank.owner names for its key, at the offset the key has in that memory's keys/numels."""
    last = {call["index"]: call["params"] for call in calls}
    found = {}
    for index, memory in state.memory.buckets.items():
        assert len(memory.keys) == len(last[index]), (memory.keys, last[index])
        for key, p in zip(memory.keys, last[index]):
            owner = state.memory.owner[key]
            at = owner.keys.index(key)
            offset, numel = sum(owner.numels[:at]), owner.numels[at]
            found[p] = {"key": key, "numel": numel,
                        **{name: t[offset:offset + numel].clone() for name, t in owner.entries.items()}}
    return found


def train_recorded(rank, model, state, steps, start=0):
    """Tiny buckets (several of them; DDP rebuilds them after its first iteration)."""
    recorder = bucket_recorder(model)
    ddp = DDP(model, bucket_cap_mb=0.001)
    ddp.register_comm_hook(state, recorder)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(start, start + steps):
        recorder.step = step
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return {"buckets": len(state.memory.buckets), "finite": bool(torch.isfinite(flat_params(model)).all()),
            "stats": state.stats(), "calls": recorder.calls,
            "memory": memory_by_parameter(state, recorder.calls)}


def bucket_layouts(calls):
    """{step: [(bucket index, parameter positions)]} of one rank's recorded bucket calls."""
    layouts = {}
    for call in calls:
        layouts.setdefault(call["step"], []).append((call["index"], call["params"]))
    return {step: sorted(buckets) for step, buckets in layouts.items()}


def worker_rebuild(rank, world, compressor="topk", resume=False):
    model = small_model()
    state = gradsieve.CompressionState(compressor, density=0.1, warmup_steps=1)
    result = train_recorded(rank, model, state, 8)
    if resume:
        # A resumed run: DDP starts again from its first layout (one bucket) and rebuilds after that
        # step; the hook compresses that step in the saved (rebuilt) layout.
        saved, weights = state.state_dict(), model.state_dict()
        del model, state
        gc.collect()
        model = small_model(seed=123)
        model.load_state_dict(weights)
        state = gradsieve.CompressionState(compressor, density=0.1, warmup_steps=1)
        state.load_state_dict(saved)
        result["resumed"] = train_recorded(rank, model, state, 4, start=8)
    return result


def worker_checkpoint(rank, world, tmp, phase, compressor, options=None):
    options = options or {"density": 0.05}
    if phase == "straight":
        model = small_model()
        train(rank, model, gradsieve.CompressionState(compressor, **options), 10)
        return flat_params(model)
    if phase == "first":
        model = small_model()
        state = gradsieve.CompressionState(compressor, **options)
        ddp, opt = train(rank, model, state, 4)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
                   f"{tmp}/ckpt{rank}.pt")
        return None
    saved = torch.load(f"{tmp}/ckpt{rank}.pt", weights_only=False)
    model = small_model(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    state = gradsieve.CompressionState(compressor, **options)
    state.load_state_dict(saved["hook"])
    ddp = DDP(model)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt.load_state_dict(saved["opt"])
    for step in range(4, 10):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return flat_params(model)


def worker_overflow(rank, world, compressor):
    model = small_model()
    ddp = DDP(model)
    state = gradsieve.CompressionState(compressor, density=0.1)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    seen = []
    for step in range(5):
        x, y = batch(rank, step)
        if step == 3 and rank == 1:
            x[0, 0] = float("inf")  # this rank's gradient overflows
        opt.zero_grad()
        names = gradsieve.get_compressor(compressor).memory_names
        before = {n: state.memory.total(n).clone() for n in names} if state.memory.buckets else None
        scaler.scale(torch.nn.functional.cross_entropy(ddp(x), y)).backward()
        state.flush()  # the step's flags are read (and a skipped step's commits undone) here
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        params_before = flat_params(model)
        scaler.step(opt)
        scaler.update()
        seen.append({
            "step": step,
            "grads_finite": grads_finite,
            "params_changed": not torch.equal(params_before, flat_params(model)),
            "memory_finite": all(bool(torch.isfinite(state.memory.total(n)).all()) for n in names)
            if state.memory.buckets else True,
            "memory": {n: state.memory.total(n).clone() for n in names} if state.memory.buckets else None,
            "memory_before": before,
        })
    return seen


def worker_mismatch(rank, world, compressor, option, values):
    state = gradsieve.CompressionState(compressor, **{option: values[rank]})
    train(rank, small_model(), state, 3)


def worker_state_mismatch(rank, world, compressor, setting, values):
    """Trains 3 steps with ``CompressionState(compressor, setting=values[rank])``; returns the
    error's message and the step the rank was in when it came (None, None when none did)."""
    state = gradsieve.CompressionState(compressor, **{setting: values[rank]})
    ddp = DDP(small_model(), bucket_cap_mb=0.001)  # several buckets
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        x, y = batch(rank, step)
        opt.zero_grad()
        try:
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
        except Exception as err:  # noqa: BLE001  (the message is what is checked)
            return str(err), step
        opt.step()
    return None, None


def worker_ratio(rank, world, dtype, compressor):
    options = {"density": 0.25, "values": "bf16"} if compressor == "topk" else {}
    state = gradsieve.CompressionState(compressor, **options)
    train(rank, small_model(dtype=dtype), state, 3, dtype=dtype)
    return state.stats()


@pytest.mark.parametrize("dtype,compressor,ratio", [
    (torch.bfloat16, "none", 1.0),  # DDP's all-reduce of a bf16 bucket sends 2 bytes an entry, as this does
    (torch.bfloat16, "bf16", 1.0),
    (torch.float32, "bf16", 2.0),
    (torch.bfloat16, "topk", None),
])
def test_compression_ratio_is_against_the_buckets_dtype(tmp_path, dtype, compressor, ratio):
    stats = run_workers(worker_ratio, 2, tmp_path, dtype, compressor)[0]
    entries = sum(p.numel() for p in small_model().parameters())
    assert stats["dense_bytes"] == 3 * entries * torch.tensor([], dtype=dtype).element_size()
    if ratio is not None:
        assert stats["compression_ratio"] == ratio
    else:  # the first step dense, then a quarter of the entries as bf16 values and int32 indices
        assert 1.1 < stats["compression_ratio"] < 1.3


def worker_no_pickle(rank, world, mismatch):
    import torch.distributed as dist

    def forbidden(*args, **kwargs):
        raise AssertionError("all_gather_object would unpickle a peer's bytes")

    dist.all_gather_object = forbidden  # this worker process only
    density = 0.02 if mismatch and rank == 1 else 0.01
    state = gradsieve.CompressionState("adaptive", density=density)
    train(rank, small_model(), state, 3)
    return state.stats()["compressed_steps"]


def worker_dtype(rank, world, dtype, compressor, values, options=None):
    """4 steps (the first dense) of a model in ``dtype``, keeping each bucket's input and output
    and the compressor's memory after every step (None before the first compressed step)."""
    model = small_model(dtype=dtype)
    state = gradsieve.CompressionState(compressor, **{"density": 0.2, "values": values, **(options or {})})
    recorder = recording_hook()
    ddp = DDP(model)
    ddp.register_comm_hook(state, recorder)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    memory = []
    for step in range(4):
        x, y = batch(rank, step, dtype)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
        opt.step()
        memory.append({name: state.memory.total(name).clone() for name in state.compressor.memory_names}
                      if state.memory.buckets else None)
    return {"finite": bool(torch.isfinite(flat_params(model)).all()), "stats": state.stats(),
            "inputs": recorder.inputs, "outputs": recorder.outputs, "memory": memory,
            "buckets": len(state.memory.buckets)}


def assert_dense_mean(results, step, dtype):
    """A dense step's output on every rank: the mean of the ranks' buckets, added and divided in
    ``dtype`` (within one unit in the last place of ``dtype``)."""
    grads = [r["inputs"][step] for r in results]
    assert all(g.dtype == dtype for g in grads)
    total = grads[0].clone()
    for g in grads[1:]:
        total = total + g
    expected = total / len(grads)
    finfo = torch.finfo(dtype)
    for r in results:
        torch.testing.assert_close(r["outputs"][step], expected, rtol=finfo.eps, atol=finfo.tiny * finfo.eps)


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_density_one_topk_equals_dense_allreduce(tmp_path):
    for dense, sparse in run_workers(worker_density_one, 2, tmp_path):
        assert torch.equal(dense, sparse)


@pytest.mark.slow
@pytest.mark.parametrize("compressor,options", [
    ("topk", {"density": 0.05}),
    ("topk", {"density": 0.05, "values": "int8", "chunk": 16}),
    ("topk", {"density": 0.05, "scope": "layer", "compress_1d": False}),
    ("dgc", {"density": 0.05, "momentum": 0.9}),
    ("dgc", {"density": 0.05, "momentum": 0.5, "clip_norm": 1.0, "density_warmup_steps": 4}),
    ("ef21", {"density": 0.05}),
    ("ef21", {"density": 0.05, "values": "bf16"}),
    ("adaptive", {"density": 0.05}),
    ("adaptive", {"density": 0.05, "beta": 0.7}),
    ("adaptive", {"density": 0.05, "capacity": 1.0, "error_feedback": False, "values": "fp32", "beta": 0.7}),
    ("adaptive", {"density": 0.05, "scope": "layer", "compress_1d": False, "index": "csr16",
                  "compare": "average"}),
    ("topk", {"density": 0.05, "values": "int8", "index": "csr16"}),
    ("dgc", {"density": 0.05, "index": "csr16"}),
    ("predictive", {"density": 0.05}),
    ("predictive", {"density": 0.05, "scope": "layer", "compress_1d": False, "history_dtype": "bf16",
                    "ranking": "product", "label": "average", "index": "csr16"}),
    ("granular", {"density": 0.1}),
    ("granular", {"density": 0.1, "granularity": "layer", "values": "fp32"}),
    ("granular", {"density": 0.1, "granularity": "hybrid", "index": "csr16", "rho": 0.5}),
    # The rules policy on progress alone (no losses are reported; no step counts as
    # communication-bound): layer, layer, hybrid, weight, weight.
    ("granular", {"density": 0.1, "granularity": "auto", "horizon": 5, "comm_bound": 1.0}),
])
def test_hook_equals_simulator(tmp_path, compressor, options):
    results = run_workers(worker_bookkeeping, 2, tmp_path, compressor, options)
    world = len(results)
    # The recorded buckets: one per step (the model fits in one bucket); the first is warm-up.
    assert all(len(r["inputs"]) == STEPS for r in results)
    # The simulator gets the hook's bucket layout (DDP's rebuilt order) and parameter keys.
    ndim_of = {p.numel(): p.dim() for p in small_model().parameters()}
    numels, keys = results[0]["numels"], results[0]["keys"]
    sim = gradsieve.Simulator(compressor, world_size=world, param_sizes=numels,
                              param_ndims=[ndim_of[n] for n in numels], param_keys=keys, **options)
    for step in range(1, STEPS):
        expected = sim.step([r["inputs"][step] for r in results])
        for r in results:
            assert torch.equal(r["outputs"][step], expected), f"step {step}"
    if compressor == "topk":  # error-feedback bookkeeping through the hook
        sent = sum(r["outputs"][s] for r in results for s in range(1, STEPS))
        residual = sum(r["residual"] for r in results)
        grads = sum(r["inputs"][s] for r in results for s in range(1, STEPS))
        torch.testing.assert_close(sent + residual, grads, rtol=0, atol=1e-5)
    stats = results[0]["stats"]
    assert stats["compressed_steps"] == STEPS - 1 and stats["wire_bytes"] > 0
    if options.get("capacity") == 1.0:
        # The literal original rule reserves room for every entry: more bytes than dense fp32.
        assert stats["compression_ratio"] < 1.0 and 0 < stats["sent"] == stats["wanted"]
    else:
        assert stats["compression_ratio"] > 1.0


def test_error_feedback_bookkeeping_in_simulator():
    torch.manual_seed(0)
    sim = gradsieve.Simulator("topk", world_size=4, density=0.01)
    total, delivered = torch.zeros(5000), torch.zeros(5000)
    for _ in range(50):
        grads = [torch.randn(5000) for _ in range(4)]
        total += sum(grads)
        delivered += 4 * sim.step(grads)
    residuals = sum(sim.memory(r, "residual") for r in range(4))
    torch.testing.assert_close(delivered + residuals, total, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("compressor", ["topk", "adaptive", "predictive", "granular"])
def test_bucket_rebuild_after_first_iteration(tmp_path, compressor):
    numel = sum(p.numel() for p in small_model().parameters())
    # Per-entry memory after the rebuild (the old buckets' memory is gone), measured: topk keeps a
    # residual, adaptive a residual, momentum and average, predictive a residual, the received
    # average and 3 history slots (plus its small per-parameter predictors).
    per_entry = {"topk": 4, "adaptive": 12, "predictive": 20, "granular": 8}[compressor]
    results = run_workers(worker_rebuild, 2, tmp_path, compressor, compressor == "topk")
    for r in results:
        assert r["finite"] and r["buckets"] > 1
        assert r["stats"]["compressed_steps"] == 7
        held = r["stats"]["memory_bytes"]
        if compressor == "predictive":
            assert per_entry * numel < held < per_entry * numel + 64 * 1024, (held, numel)
        else:
            assert held - per_entry * numel in range(0, 256), (held, numel)
    # Where each parameter's memory is: bucket by bucket, the memory of the same parameter in an
    # independent computation fed the same per-rank gradients.
    sizes = [p.numel() for p in small_model().parameters()]
    ndims = [p.dim() for p in small_model().parameters()]
    world = len(results)
    calls = [{(c["step"], c["index"]): c for c in r["calls"]} for r in results]
    layout = bucket_layouts(results[0]["calls"])
    assert all(bucket_layouts(r["calls"]) == layout for r in results)
    # Step 0 (warm-up, dense) runs in DDP's first layout, steps 1-7 in the rebuilt one.
    assert layout[0] != layout[1] and len(layout[1]) > 1
    assert all(layout[step] == layout[1] for step in range(1, 8))
    for index, _ in layout[0]:
        mean = sum(calls[r][0, index]["input"] for r in range(world)) / world
        assert all(torch.equal(calls[r][0, index]["output"], mean) for r in range(world))
    keys = {p: m["key"] for p, m in results[0]["memory"].items()}
    assert sorted(keys) == list(range(len(sizes))) and len(set(keys.values())) == len(sizes)
    for r in results:
        assert {p: m["key"] for p, m in r["memory"].items()} == keys
        assert all(r["memory"][p]["numel"] == sizes[p] for p in keys)
    # Simulators, one per rebuilt bucket (its parameters in bucket order, with the hook's keys):
    # every step's output, and every memory of every parameter at the end.
    names = gradsieve.get_compressor(compressor, density=0.1).memory_names
    sims = {index: gradsieve.Simulator(compressor, world_size=world, param_sizes=[sizes[p] for p in params],
                                       param_ndims=[ndims[p] for p in params],
                                       param_keys=[keys[p] for p in params], density=0.1)
            for index, params in layout[1]}
    for step in range(1, 8):
        for index, _ in layout[step]:
            expected = sims[index].step([calls[r][step, index]["input"] for r in range(world)])
            for r in range(world):
                assert torch.equal(calls[r][step, index]["output"], expected), (step, index)
    for index, params in layout[1]:
        offset = 0
        for p in params:
            for r in range(world):
                for name in names:
                    want = sims[index].memory(r, name)[offset:offset + sizes[p]]
                    assert torch.equal(results[r]["memory"][p][name], want), (p, name)
            offset += sizes[p]
    if compressor != "topk":
        return
    # Error feedback in plain torch, each parameter's residual kept by parameter, whatever bucket
    # it is in: through the rebuild, and through a resumed run whose first step DDP runs in its first
    # layout (one bucket).
    ef = reference.ErrorFeedbackTopK(world, 0.1)

    def replay(calls, steps, layout):
        for step in steps:
            for index, params in layout[step]:
                expected = ef.step([calls[r][step, index]["input"] for r in range(world)], params,
                                   [sizes[p] for p in params])
                for r in range(world):
                    assert torch.equal(calls[r][step, index]["output"], expected), (step, index)

    def residuals_match(memory):
        for r in range(world):
            for p in keys:
                assert torch.equal(memory[r][p]["residual"], ef.residuals[r][p]), (r, p)

    replay(calls, range(1, 8), layout)
    residuals_match([r["memory"] for r in results])
    resumed = [r["resumed"] for r in results]
    resumed_calls = [{(c["step"], c["index"]): c for c in r["calls"]} for r in resumed]
    resumed_layout = bucket_layouts(resumed[0]["calls"])
    assert resumed_layout[8] == layout[0] and all(resumed_layout[s] == layout[1] for s in range(9, 12))
    # DDP hands the resumed run's first step over in its first layout; the hook compresses it in
    # the saved (rebuilt) layout: read each parameter's input and output out of the first layout's
    # buckets and replay the step in the rebuilt one.
    for r in range(world):
        by_param = {}
        for index, params in layout[0]:
            call, offset = resumed_calls[r][8, index], 0
            for p in params:
                by_param[p] = (call["input"][offset:offset + sizes[p]], call["output"][offset:offset + sizes[p]])
                offset += sizes[p]
        for index, params in layout[1]:
            resumed_calls[r][8, index] = {"input": torch.cat([by_param[p][0] for p in params]),
                                          "output": torch.cat([by_param[p][1] for p in params])}
    replay(resumed_calls, range(8, 12), {**resumed_layout, 8: layout[1]})
    residuals_match([r["memory"] for r in resumed])
    for r in resumed:
        assert r["finite"] and r["stats"]["compressed_steps"] == 11
        assert {p: m["key"] for p, m in r["memory"].items()} == keys  # stable parameter keys
        assert r["stats"]["memory_bytes"] - per_entry * numel in range(0, 256)  # moved, not copied


@pytest.mark.slow
@pytest.mark.parametrize("compressor,options", [
    ("topk", None), ("dgc", None), ("ef21", None),
    # fp32 values: int8 scales are per chunk of entries in bucket order, and the first step after a
    # restore runs in DDP's initial bucket order (it rebuilds after that step), so int8 rounding
    # may differ on that one step.
    ("adaptive", {"density": 0.05, "values": "fp32"}),
    ("adaptive", {"density": 0.05, "values": "fp32", "capacity": 1.0, "error_feedback": False, "beta": 0.7}),
    ("predictive", {"density": 0.05, "values": "fp32"}),
    ("granular", {"density": 0.05, "values": "fp32"}),
    ("granular", {"density": 0.05, "values": "fp32", "granularity": "auto", "horizon": 9, "comm_bound": 1.0}),
])
def test_checkpoint_restore_matches_uninterrupted_run(tmp_path, compressor, options):
    args = (compressor, options)
    straight = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "straight", *args)
    run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "first", *args)
    resumed = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "second", *args)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("compressor", ["topk", "dgc", "ef21", "adaptive", "predictive", "granular"])
def test_amp_overflow_skips_step_and_keeps_memory(tmp_path, compressor):
    for seen in run_workers(worker_overflow, 2, tmp_path, compressor):
        overflow = seen[3]
        assert not overflow["grads_finite"]  # every rank sees the overflow, not only rank 1
        assert not overflow["params_changed"]  # GradScaler skipped the step
        for name, before in overflow["memory_before"].items():
            assert torch.equal(before, overflow["memory"][name])  # memory untouched
        assert all(s["memory_finite"] for s in seen)
        assert seen[4]["params_changed"]  # training goes on after the skipped step


@pytest.mark.slow
@pytest.mark.parametrize("compressor,option,values", [
    ("topk", "density", (0.01, 0.02)),
    ("adaptive", "beta", (1.0, 0.5)),  # same payload size: only the configuration check sees it
    ("adaptive", "compare", ("grad", "average")),
    ("predictive", "hidden", (8, 4)),  # same payload size
    ("granular", "granularity", ("weight", "hybrid")),  # same payload size
])
def test_mismatched_ranks_raise_clear_error(tmp_path, compressor, option, values):
    with pytest.raises(Exception, match="configured differently"):
        run_workers(worker_mismatch, 2, tmp_path, compressor, option, values)


@pytest.mark.parametrize("compressor,setting,values,line", [
    # The ranks disagree on which step is the first compressed one: before the check ran at the
    # first call of every bucket, rank 0 compressed at step 1 while rank 1 all-reduced, and hung.
    ("topk", "warmup_steps", (1, 3), "warmup_steps: rank 0: 1; rank 1: 3"),
    ("topk", "exchange", ("allgather", "allreduce"), "exchange.exchange: rank 0: \"allgather\"; rank 1: \"allreduce\""),
    ("none", "max_bad_steps", (3, 4), "max_bad_steps: rank 0: 3; rank 1: 4"),
])
def test_mismatch_fails_at_the_first_step_naming_the_setting(tmp_path, compressor, setting, values, line):
    for message, step in run_workers(worker_state_mismatch, 2, tmp_path, compressor, setting, values):
        assert step == 0, (step, message)
        assert message.startswith("gradsieve: ranks were configured differently for bucket"), message
        assert "  " + line in message.splitlines()[1:], message
        assert len(message.splitlines()) <= 4, message  # only the differing keys, a line each


def worker_metric(rank, world, metrics):
    """Adaptive k through the hook: each rank reports its metrics between steps."""
    state = gradsieve.CompressionState("predictive", density=0.05, k_min=0.025, k_max=0.1)
    model = small_model()
    ddp = DDP(model)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    densities = []
    for step in range(6):
        if step >= 2:
            state.report_metric(metrics[rank][step - 2])
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        densities.append(state.stats()["density"])
    return densities, flat_params(model)


@pytest.mark.slow
def test_adaptive_k_switches_together_or_fails_clearly(tmp_path):
    same = [[0.5, 0.9, 0.9, 0.905]] * 2  # -> fast (0.025), plateau (0.05), between (0.05)
    (d0, p0), (d1, p1) = run_workers(worker_metric, 2, tmp_path, same)
    assert d0 == d1 == [0.05, 0.05, 0.05, 0.025, 0.05, 0.05]
    assert torch.equal(p0, p1)
    differ = [[0.5, 0.9, 0.9, 0.905], [0.5, 0.5, 0.9, 0.905]]  # rank 1 sees a plateau, not progress
    with pytest.raises(Exception, match=r"configured differently(.|\n)*runtime.density: rank 0: 0.025; rank 1: 0.1"):
        run_workers(worker_metric, 2, tmp_path, differ)


@pytest.mark.slow
def test_configuration_check_never_unpickles(tmp_path):
    """The check compares digests as a tensor, and on a mismatch exchanges JSON texts as bytes:
    all_gather_object (pickle) is never called, and the error still shows both configurations."""
    assert run_workers(worker_no_pickle, 2, tmp_path, False) == [2, 2]
    with pytest.raises(Exception, match=r"configured differently(.|\n)*"
                                        r"compressor.density: rank 0: 0.01; rank 1: 0.02"):
        run_workers(worker_no_pickle, 2, tmp_path, True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,compressor,values,options", [
    (torch.float16, "topk", "fp16", {}),
    (torch.bfloat16, "topk", "bf16", {}),
    (torch.bfloat16, "dgc", "int8", {"momentum": 0.9}),  # sampled threshold
    (torch.bfloat16, "dgc", "int8", {"momentum": 0.9, "sample_fraction": 0.0}),  # exact top-k
])
def test_half_precision_models(tmp_path, dtype, compressor, values, options):
    results = run_workers(worker_dtype, 2, tmp_path, dtype, compressor, values, options)
    for r in results:
        assert r["finite"] and r["stats"]["compressed_steps"] == 3 and r["buckets"] == 1
    assert_dense_mean(results, 0, dtype)  # warm-up
    # Compressed steps: the plain-torch reference of the compressor, fed the recorded half-precision
    # buckets; its float32 average rounded once to the model's dtype, and its memory, exactly.
    world, numel = len(results), results[0]["inputs"][0].numel()
    if compressor == "topk":
        ef = reference.ErrorFeedbackTopK(world, 0.2, values)
        for step in range(1, 4):
            expected = ef.step([r["inputs"][step] for r in results]).to(dtype)
            for rank, r in enumerate(results):
                assert torch.equal(r["outputs"][step], expected), f"step {step}"
                want = ef.bucket_residual(rank, ["bucket"], [numel])
                assert torch.equal(r["memory"][step]["residual"], want)
        return
    dgc = reference.MomentumCorrectedTopK(world, numel, 0.2, options["momentum"], values)
    for step in range(1, 4):
        before = dgc.accumulate([r["inputs"][step] for r in results])
        momenta = [u.clone() for u in dgc.u]
        chosen = None
        if options.get("sample_fraction") != 0.0:
            # A sampled threshold sends the entries at or above it (the top-k of those when more
            # than k pass): read which from the memory (u is zeroed where an entry was sent, v
            # keeps its rounding) and check that they are the largest |v| and at most k.
            chosen = []
            for rank, r in enumerate(results):
                memory = r["memory"][step]
                sent = (memory["momentum_u"] == 0) & (momenta[rank] != 0)
                sent |= memory["velocity_v"] != before[rank]
                magnitude = before[rank].abs()
                assert 0 < int(sent.sum()) <= dgc.k, int(sent.sum())
                assert magnitude[sent].min() >= magnitude[~sent].max()
                chosen.append(sent.nonzero().flatten())
        expected = dgc.send(chosen).to(dtype)
        for rank, r in enumerate(results):
            assert torch.equal(r["outputs"][step], expected), f"step {step}"
            assert torch.equal(r["memory"][step]["momentum_u"], dgc.u[rank])
            assert torch.equal(r["memory"][step]["velocity_v"], dgc.v[rank])


def worker_dense(rank, world, name, dtype):
    model = small_model(dtype=dtype)
    state = gradsieve.CompressionState(name)
    recorder = recording_hook()
    train(rank, model, state, 3, hook=recorder, dtype=dtype)
    return flat_params(model), state.stats(), recorder.inputs, recorder.outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
def test_dense_compressors(tmp_path, name):
    results = run_workers(worker_dense, 2, tmp_path, name, torch.float32)
    assert torch.equal(results[0][0], results[1][0])
    bytes_per_entry = 4 if name == "none" else 2
    numel = sum(p.numel() for p in small_model().parameters())
    assert results[0][1]["wire_bytes"] == 3 * numel * bytes_per_entry
    for step in range(3):
        grads = [r[2][step] for r in results]
        mean = (grads[0] + grads[1]) / 2
        for r in results:
            out = r[3][step]
            assert out.dtype == torch.float32 and out.numel() == numel
            if name == "none":
                assert torch.equal(out, mean), f"step {step}"  # the exact float32 mean
                continue
            # The mean of the gradients rounded to the wire's type, added and halved in that type:
            # within one unit in its last place, a value of that type, and not the float32 mean.
            wire = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
            expected = ((grads[0].to(wire) + grads[1].to(wire)) / 2).float()
            finfo = torch.finfo(wire)
            torch.testing.assert_close(out, expected, rtol=finfo.eps, atol=finfo.tiny * finfo.eps)
            assert torch.equal(out, out.to(wire).float())
            assert not torch.equal(out, mean)


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"density": 0.2},
    {"density": 0.2, "values": "int8", "chunk": 16, "index": "csr16"},
    {"density": 1.0},
])
def test_world_size_one(tmp_path, options):
    values = options.get("values", "fp32")
    (r,) = run_workers(worker_dtype, 1, tmp_path, torch.float32, "topk", values, options)
    assert r["finite"] and r["stats"]["compressed_steps"] == 3
    inputs, outputs = r["inputs"], r["outputs"]
    numel = inputs[0].numel()
    assert torch.equal(outputs[0], inputs[0])  # warm-up: the all-reduce of one rank
    # Error-feedback top-k in plain torch, its residual tracked on its own: exactly the outputs.
    ef = reference.ErrorFeedbackTopK(1, options["density"], values, options.get("chunk", 256))
    for step in range(1, 4):
        assert torch.equal(outputs[step], ef.step([inputs[step]])), f"step {step}"
        residual = r["memory"][step]["residual"]
        assert torch.equal(residual, ef.bucket_residual(0, ["bucket"], [numel]))
        if options["density"] == 1.0:  # everything is sent: the gradient itself, nothing kept
            assert torch.equal(outputs[step], inputs[step]) and not residual.any()
        else:
            assert 0 < int((outputs[step] != 0).sum()) <= reference.entries_for(options["density"], numel)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="unknown compressor 'tpok'; available: .*topk"):
        gradsieve.CompressionState("tpok")
    with pytest.raises(ValueError, match="unknown option.*densty.*allowed: .*density"):
        gradsieve.get_compressor("topk", densty=0.1)
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0.0"):
        gradsieve.CompressionState("topk", density=0.0)
    with pytest.raises(ValueError, match="values must be one of"):
        gradsieve.get_compressor("topk", values="int3")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        gradsieve.get_compressor("dgc", momentum=1.0)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1"):
        gradsieve.CompressionState("topk", warmup_steps=0)
    with pytest.raises(ValueError, match="scope must be one of"):
        gradsieve.Simulator("topk", world_size=2, scope="model")
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        gradsieve.Simulator("topk", world_size=0)


def test_dgc_warns_about_optimizer_momentum():
    state = gradsieve.CompressionState("dgc", density=0.01)
    model = small_model()
    with pytest.warns(UserWarning, match="momentum twice"):
        state.watch_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    # Without momentum correction dgc adds no momentum: Adam's moments are the only ones.
    plain = gradsieve.CompressionState("dgc", density=0.01, momentum=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.watch_optimizer(torch.optim.Adam(model.parameters(), lr=0.1))


def test_dgc_density_warmup_schedule():
    dgc = gradsieve.get_compressor("dgc", density=0.001, density_warmup_steps=8)
    assert [dgc.density_at(s) for s in range(10)] == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625,
                                                      0.004, 0.004, 0.001, 0.001]


def test_registry_lists_and_rejects():
    assert {"bf16", "dgc", "ef21", "fp16", "none", "topk"} <= set(gradsieve.available_compressors())
    with pytest.raises(ValueError, match="taken"):
        gradsieve.register_compressor("topk")(type("Other", (), {}))


def test_ef21_converges_on_heterogeneous_least_squares_where_topk_stalls():
    # Each worker's quadratic has its own minimum; the average's minimum is the target.
    torch.manual_seed(0)
    d, workers = 50, 4
    centers = [torch.randn(d) * 3 for _ in range(workers)]
    target = sum(centers) / workers

    def run(name):
        sim = gradsieve.Simulator(name, world_size=workers, density=0.04)
        x = torch.zeros(d)
        for _ in range(1000):
            x = x - 0.1 * sim.step([x - c for c in centers])
        return float((x - target).norm())

    assert run("ef21") < 1e-3
    # Error-feedback top-k keeps oscillating far from the optimum (|x - target| ~ 5 here).
    assert run("topk") > 1.0


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 7, 667])
def test_payload_decodes_for_any_world_size_and_odd_k(values, world, k):
    # A payload of odd length (int8, fp16, bf16 values with odd k) once failed to decode at world
    # size 1: a [1, L] slice keeps the row stride L, which view(int32) rejects.
    from gradsieve.wire import PayloadFormat

    numel = 5000
    fmt = PayloadFormat(k, values, chunk=3 if values == "int8" else 256)
    g = torch.Generator().manual_seed(k * 10 + world)
    payloads, expected = [], torch.zeros(numel)
    for _ in range(world):
        indices = torch.randperm(numel, generator=g)[:k]
        chosen = torch.randn(k, generator=g)
        payload, sent = fmt.pack(torch.tensor(True), indices, chosen)
        assert payload.numel() == fmt.nbytes
        expected.index_add_(0, indices, sent)
        payloads.append(payload)
    gathered = torch.stack(payloads)
    out = torch.zeros(numel)
    finite, well_formed = fmt.decode_sum(gathered, out)
    flags = finite & well_formed
    assert flags.tolist() == [True] * world
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

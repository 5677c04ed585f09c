"""The compressor contract, checked for every registered compressor (``available_compressors()``):
a new compressor is covered by registering it, without editing any list here.

In one process: the declared contract (traits, options, memory), ``compress`` never changes the
memory, the Simulator's error-feedback account (``undelivered``). On 2 gloo ranks with DDP (one
run per compressor, several buckets that DDP rebuilds after the first iteration): the hook equals
the Simulator bit for bit (sparse) or the true average (dense); the error-feedback account holds
through the hook; a checkpoint taken mid-run and restored into a fresh process state continues bit
for bit; a step with one non-finite bucket leaves the memory as it was; a rank configured with
other options fails with a clear error on every rank.
"""


import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from gradsieve.compressor import Aggregated, Compressed, Traits
from gradsieve.exchanges.hierarchical import shard_sizes
from gradsieve.memory import MemoryBank
from gradsieve.registry import compressor_class
from gradsieve.signals import Signal
from distributed import run_workers

NAMES = gradsieve.available_compressors()
STEPS = 6  # the first is the dense warm-up
SAVE_AT = 3  # the checkpoint is taken after this many steps
BUCKET_CAP_MB = 0.001  # several buckets, rebuilt by DDP after the first iteration


def options_for(name):
    """Each compressor at its defaults, sparse ones at a density that sends something of every
    bucket of the small model."""
    return {"density": 0.1} if "density" in compressor_class(name).OPTIONS else {}


def other_config(name):
    """(name, options) that differ from ``(name, options_for(name))`` in one declared option
    (validated); for a compressor without options, another registered compressor of its kind."""
    options = other_options(name)
    if options is not None:
        return name, options
    dense = compressor_class(name).traits.dense
    other = next(n for n in NAMES if n != name and compressor_class(n).traits.dense == dense)
    return other, options_for(other)


def other_options(name):
    """Options that differ from ``options_for(name)`` in one declared option (validated), or None
    for a compressor without options."""
    declared = compressor_class(name).OPTIONS
    mine = options_for(name)
    for key, option in declared.items():
        current = mine.get(key, option.default)
        if option.choices is not None:
            candidates = [c for c in option.choices if c != current]
        elif option.kind is bool:
            candidates = [not current]
        else:
            candidates = [current * 2, current / 2, current + 1, 0.5, 1]
        for value in candidates:
            try:
                value = option.validate(name, key, value)
            except ValueError:
                continue
            if value != current:
                return {**mine, key: value}
    return None


# ------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("name", NAMES)
def test_declared_contract(name):
    cls = compressor_class(name)
    compressor = gradsieve.get_compressor(name, **options_for(name))
    assert compressor.name == name and isinstance(compressor.traits, Traits)
    assert all(isinstance(kind, type) and issubclass(kind, Signal) for kind in compressor.traits.signals)
    fields = [field for _, field in compressor.traits.reports]
    assert len(set(fields)) == len(fields)  # one record name per reported statistic
    assert isinstance(compressor.memory_names, tuple)
    assert compressor.config() == {"compressor": name, **compressor.options}
    assert set(compressor.options) == set(cls.OPTIONS)
    for key, option in cls.OPTIONS.items():  # every default passes its own check
        assert option.validate(name, key, option.default) == option.default
    if compressor.traits.probes:
        assert compressor.probe_plan() is None or compressor.probe_plan().every > 0
    if compressor.traits.dense:
        assert not compressor.memory_names


def _layout(world):
    return gradsieve.BucketLayout(1000, (600, 330, 70), (2, 2, 1), world, 0, (7, 3, 11))


@pytest.mark.parametrize("name", [n for n in NAMES if not compressor_class(n).traits.dense])
def test_compress_leaves_memory_alone_and_aggregate_is_typed(name):
    """A step can be dropped whole: compress changes no memory tensor, in place or by rebinding;
    aggregate and own_update return the typed result, with flags per worker."""
    compressor = gradsieve.get_compressor(name, **options_for(name))
    layout = _layout(2)
    gen = torch.Generator().manual_seed(0)
    banks = [MemoryBank() for _ in range(2)]
    for step in range(3):
        memories = [b.get(0, layout.keys, layout.param_numels, compressor.memory_names, torch.device("cpu"),
                          compressor.memory_dtypes) for b in banks]
        before = [{k: t.clone() for k, t in m.entries.items()} for m in memories]
        ids = [{k: id(t) for k, t in m.entries.items()} for m in memories]
        compressed = [compressor.compress(torch.randn(1000, generator=gen), m, layout, step) for m in memories]
        for m, b, i in zip(memories, before, ids):
            assert {k: id(t) for k, t in m.entries.items()} == i
            assert all(torch.equal(m.entries[k], t) for k, t in b.items())
        assert all(isinstance(c, Compressed) and c.payload.dtype == torch.uint8 for c in compressed)
        assert len({c.payload.numel() for c in compressed}) == 1  # one size on every rank
        aggregated = compressor.aggregate(torch.stack([c.payload for c in compressed]), layout, step)
        assert isinstance(aggregated, Aggregated)
        assert aggregated.average.shape == (1000,) and aggregated.average.dtype == torch.float32
        assert aggregated.usable.tolist() == [True, True]
        own = compressor.own_update(compressed[0], layout, step)
        assert isinstance(own, Aggregated) and own.usable.tolist() == [True]
        for m, c in zip(memories, compressed):
            compressor.commit(m, c, aggregated.average, layout)


def keeps_account(name):
    """Whether the compressor, at ``options_for(name)``, keeps an error-feedback account
    (``undelivered`` is not None: not ef21, not dgc with its momentum)."""
    compressor = gradsieve.get_compressor(name, **options_for(name))
    memory = MemoryBank().get(0, (0,), (10,), compressor.memory_names, torch.device("cpu"),
                              compressor.memory_dtypes)
    return compressor.undelivered(memory) is not None


@pytest.mark.parametrize("name", [n for n in NAMES if keeps_account(n)])
def test_error_feedback_account_in_simulator(name):
    """Nothing is lost, only delayed: over the run, what every worker's gradients added up to
    equals what reached the average plus what the workers still hold (``undelivered``)."""
    sim = gradsieve.Simulator(name, world_size=3, param_sizes=[600, 330, 70], param_ndims=[2, 2, 1],
                              **options_for(name))
    check_simulator_account(sim, steps=6, seed=1)


def check_simulator_account(sim, steps, seed, local=1):
    """Runs ``sim`` (one bucket of 1000 entries) for ``steps`` random steps and checks that the
    workers' gradients add up to what reached the average plus what they still hold; under the
    hierarchical exchange of ``local`` ranks per node a rank holds its shard of the node's
    average, ``local`` times its share."""
    world = sim.world_size
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(1000, dtype=torch.float64)
    delivered = torch.zeros(1000, dtype=torch.float64)
    for _ in range(steps):
        grads = [torch.randn(1000, generator=gen) for _ in range(world)]
        total += sum(g.double() for g in grads)
        delivered += world * sim.step(grads).double()
    held = torch.zeros(1000, dtype=torch.float64)
    sizes = shard_sizes(1000, local)
    for rank, bank in enumerate(sim.banks):
        part = sim.compressor.undelivered(bank.buckets[0]).double()
        lo = sum(sizes[:rank % local])
        held[lo:lo + part.numel()] += local * part
    torch.testing.assert_close(delivered + held, total, rtol=0, atol=1e-4)
    assert float(delivered.abs().sum()) > 0


def test_other_options_differ_for_every_compressor():
    for name in NAMES:
        other = other_options(name)
        if compressor_class(name).OPTIONS:
            assert other is not None and other != options_for(name), name
            gradsieve.get_compressor(name, **other)  # valid


# ------------------------------------------------------------------------------ the hook
def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _memory(state):
    return {index: {part: {k: t.clone() for k, t in getattr(m, part).items()}
                    for part in ("entries", "extra", "counters")}
            for index, m in state.memory.buckets.items()}


def _attach(model, state, record=None):
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)

    def hook(state, bucket):
        if record is None:
            return gradsieve.compression_hook(state, bucket)
        layout = state.layout_of(bucket, state.exchange.world_size)
        entry = {"step": state.step, "index": bucket.index(), "layout": layout,
                 "input": bucket.buffer().detach().clone()}
        record.append(entry)

        def keep(fut):
            entry["output"] = fut.value().detach().clone()
            return fut.value()

        return gradsieve.compression_hook(state, bucket).then(keep)

    ddp.register_comm_hook(state, hook)
    return ddp


def _train(ddp, opt, rank, steps):
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()


def worker_conformance(rank, world, name, options, other_name, other, exchange="allgather", exchange_options=None):
    out = {}

    def make_state(name, **options):
        built = gradsieve.get_exchange(exchange, **(exchange_options or {}))
        return gradsieve.CompressionState(name, exchange=built, **options)

    # 1. A straight run, recorded, with a checkpoint taken on the way.
    model = _model()
    state = make_state(name, **options)
    record = []
    ddp = _attach(model, state, record)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _train(ddp, opt, rank, range(SAVE_AT))
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
             "state": state.state_dict()}
    _train(ddp, opt, rank, range(SAVE_AT, STEPS))
    out["record"] = list(record)
    out["params"] = _flat(model)
    out["buckets"] = len(state.memory.buckets)
    out["undelivered"] = {index: state.compressor.undelivered(m) for index, m in state.memory.buckets.items()}
    out["stats"] = state.stats()

    # 2. The checkpoint restored into a fresh model, DDP and state: DDP starts from its initial
    # bucket layout (and rebuilds it after one iteration); loading the state is all it takes.
    resumed = _model(seed=123)
    resumed.load_state_dict(saved["model"])
    state2 = make_state(name, **options)
    state2.load_state_dict(saved["state"])
    ddp2 = _attach(resumed, state2)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1)
    opt2.load_state_dict(saved["opt"])
    _train(ddp2, opt2, rank, range(SAVE_AT, STEPS))
    out["resumed_params"] = _flat(resumed)

    # 3. One more step of the straight run where one parameter's gradient is non-finite on rank 1:
    # only its bucket is bad; the whole step is skipped and the memory stays as it was.
    before = _memory(state)
    bad = list(model.parameters())[2]  # the second layer's weight
    handle = bad.register_hook(lambda g: g * float("nan")) if rank == 1 else None
    record.clear()
    x, y = _batch(rank, STEPS)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    if handle is not None:
        handle.remove()
    state.flush()  # the step's flags are read (and its commits undone) here, not per bucket
    out["skip_outputs_finite"] = {r["index"]: bool(torch.isfinite(r["output"]).all()) for r in record}
    out["skip_memory_same"] = {
        index: all(torch.equal(t, getattr(state.memory.buckets[index], part)[k])
                   and set(getattr(state.memory.buckets[index], part)) == set(parts[part])
                   for part in parts for k, t in parts[part].items())
        for index, parts in before.items()}
    out["bad_bucket"] = next(r["index"] for r in record if bad.numel() in r["layout"].param_numels)
    out["skipped_steps"] = state.stats()["skipped_steps"] - out["stats"]["skipped_steps"]

    # 4. A rank configured otherwise fails clearly, on every rank.
    mine, my_options = (other_name, other) if rank == 1 else (name, options)
    mismatched = make_state(mine, **my_options)
    ddp3 = _attach(_model(), mismatched)
    opt3 = torch.optim.SGD(ddp3.parameters(), lr=0.1)
    try:
        _train(ddp3, opt3, rank, range(3))
        out["mismatch"] = None
    except Exception as err:  # noqa: BLE001  (the message is what is checked)
        out["mismatch"] = str(err)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_compressor_through_the_hook(tmp_path, name):
    check_through_the_hook(tmp_path, name, 2)


SPARSE = [n for n in NAMES if not compressor_class(n).traits.dense]


def low_bit_wire(name, values="int4", chunk=32, stochastic=False):
    """``options_for(name)`` with a wire below a byte per value and the chunk-local index
    (stochastic rounding where the compressor has the option)."""
    options = {**options_for(name), "values": values, "chunk": chunk, "index": "local"}
    if stochastic and "rounding" in compressor_class(name).OPTIONS:
        options["rounding"] = "stochastic"
    return options


def test_low_bit_wire_through_the_hook(tmp_path):
    """topk with int4 values (chunk 32) and the local index: the hook equals the Simulator, keeps
    the error-feedback account, resumes, skips a bad step and catches a mismatch."""
    check_through_the_hook(tmp_path, "topk", 2, options=low_bit_wire("topk"))


@pytest.mark.slow
@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("values,chunk,stochastic", [("int4", 32, False), ("int2", 8, True), ("sign", 16, False)])
def test_every_sparse_compressor_with_a_low_bit_wire_through_the_hook(tmp_path, name, values, chunk, stochastic):
    check_through_the_hook(tmp_path, name, 2, options=low_bit_wire(name, values, chunk, stochastic))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["topk", "dgc", "granular"])
def test_low_bit_wire_through_the_hierarchical_exchange(tmp_path, name):
    check_through_the_hook(tmp_path, name, 4, "hierarchical", {"local": 2},
                           options=low_bit_wire(name, "int2", 8, stochastic=True))


@pytest.mark.parametrize("name", [n for n in NAMES if keeps_account(n)])
@pytest.mark.parametrize("values,chunk,stochastic", [("int4", 32, False), ("int2", 8, True), ("sign", 16, False)])
@pytest.mark.parametrize("exchange,exchange_options", [("allgather", None), ("hierarchical", {"local": 2})])
def test_low_bit_wire_keeps_the_account_in_the_simulator(name, values, chunk, stochastic, exchange,
                                                         exchange_options):
    """Every sparse compressor that keeps an account, with each codec below a byte and the local
    index, on 4 simulated workers: what was delivered plus what is held is what came in."""
    sim = gradsieve.Simulator(name, world_size=4, param_sizes=[600, 330, 70], param_ndims=[2, 2, 1],
                              exchange=exchange, exchange_options=exchange_options,
                              **low_bit_wire(name, values, chunk, stochastic))
    check_simulator_account(sim, steps=5, seed=4, local=(exchange_options or {}).get("local", 1))


@pytest.mark.parametrize("nodes,local", [(1, 2), (2, 1)])
def test_hierarchical_exchange_through_the_hook(tmp_path, nodes, local):
    """The hierarchical exchange on one node of 2 and on 2 nodes of 1, topk."""
    check_through_the_hook(tmp_path, "topk", nodes * local, "hierarchical", {"local": local})


@pytest.mark.slow
@pytest.mark.parametrize("name", SPARSE)
def test_hierarchical_exchange_on_two_nodes_of_two(tmp_path, name):
    """Every sparse compressor through the hierarchical exchange on 2 nodes of 2 ranks."""
    check_through_the_hook(tmp_path, name, 4, "hierarchical", {"local": 2})


def test_allreduce_exchange_through_the_hook(tmp_path):
    """The agreed-index all-reduce exchange with topk on 2 ranks."""
    check_through_the_hook(tmp_path, "topk", 2, "allreduce", {"select": "mix"})


@pytest.mark.slow
@pytest.mark.parametrize("name,select", [("dgc", "leader"), ("ef21", "previous"), ("topk", "leader")])
def test_allreduce_exchange_through_the_hook_for_each_compressor(tmp_path, name, select):
    check_through_the_hook(tmp_path, name, 2, "allreduce", {"select": select})


@pytest.mark.slow
def test_hierarchical_with_allreduce_across_nodes_through_the_hook(tmp_path):
    check_through_the_hook(tmp_path, "topk", 4, "hierarchical", {"local": 2, "cross": "allreduce"})


def check_through_the_hook(tmp_path, name, world, exchange="allgather", exchange_options=None, options=None):
    options = options_for(name) if options is None else options
    traits = compressor_class(name).traits
    results = run_workers(worker_conformance, world, tmp_path, name, options, *other_config(name), exchange,
                          exchange_options)
    a, b = results[:2]
    local = (exchange_options or {}).get("local", 1) if exchange == "hierarchical" else 1

    # The hook equals the Simulator fed the same per-rank buckets, bucket by bucket.
    assert a["buckets"] > 1 or traits.dense
    steps = {}
    for rank, r in enumerate(results):
        for entry in r["record"]:
            steps.setdefault((entry["step"], entry["index"]), [None] * world)[rank] = entry
    compressed = sorted(k for k in steps if k[0] >= 1)  # step 0 is the dense warm-up
    assert {s for s, _ in compressed} == set(range(1, STEPS))
    sims = {}
    for step, index in compressed:
        entries = steps[(step, index)]
        layout = entries[0]["layout"]
        assert all(e["layout"] == layout for e in entries)
        inputs = [e["input"] for e in entries]
        if traits.dense:
            # The true average of the ranks' gradients, to the all-reduce dtype's rounding.
            # Each input is rounded to the dtype, summed and divided there: the error is within a
            # few units of rounding of the summands' magnitude.
            true = sum(x.double() for x in inputs) / world
            scale = sum(x.double().abs() for x in inputs) / world
            unit = {None: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[traits.allreduce_dtype]
            for e in entries:
                error = (e["output"].double() - true).abs()
                assert bool((error <= 3 * unit * scale + 1e-30).all()), (step, index, float(error.max()))
            continue
        sim = sims.setdefault(index, gradsieve.Simulator(
            name, world_size=world, param_sizes=layout.param_numels, param_ndims=layout.param_ndims,
            param_keys=layout.param_keys, exchange=exchange, exchange_options=exchange_options, **options))
        expected = sim.step(inputs)
        for e in entries:
            assert torch.equal(e["output"], expected), (step, index)

    # The error-feedback account through the hook: per bucket, the ranks' gradients of the
    # compressed steps add up to what the hook delivered (world x its output) plus what the
    # ranks still hold. Independent of the decode: a hook returning zeros fails it. Under the
    # hierarchical exchange a rank holds its shard of the node's average: L times its share.
    if not traits.dense and a["undelivered"] and all(v is not None for v in a["undelivered"].values()):
        for index in a["undelivered"]:
            grads = sum(steps[k][r]["input"].double() for k in compressed if k[1] == index for r in range(world))
            delivered = sum(world * steps[k][0]["output"].double() for k in compressed if k[1] == index)
            numel = grads.numel()
            held = torch.zeros(numel, dtype=torch.float64)
            for rank, r in enumerate(results):
                part = r["undelivered"][index].double()
                lo = sum(shard_sizes(numel, local)[:rank % local])
                held[lo:lo + part.numel()] += local * part
            torch.testing.assert_close(delivered + held, grads, rtol=0, atol=1e-5)
            assert float(delivered.abs().sum()) > 0

    # Both ranks hold the same model; the restored run continues bit for bit.
    assert torch.equal(a["params"], b["params"])
    for r in results:
        assert torch.equal(r["resumed_params"], r["params"])

    # One bad bucket: its average is non-finite on every rank (so GradScaler skips the step; the
    # buckets that landed before it may have returned theirs), the step counts as skipped and
    # every bucket's memory is as it was.
    for r in results:
        assert not r["skip_outputs_finite"][r["bad_bucket"]]
        if traits.dense:
            continue
        assert r["skipped_steps"] == 1
        if traits.rollback_safe:
            assert all(r["skip_memory_same"].values()), r["skip_memory_same"]
        else:
            assert r["skip_memory_same"][r["bad_bucket"]]

    # A rank with other options (or another compressor) fails clearly on every rank.
    for r in results:
        assert r["mismatch"] is not None and "configured differently" in r["mismatch"], r["mismatch"]


# ------------------------------------------------------------------------------ exchanges
def _requests(rank, world):
    """The same collectives, as rank ``rank`` of ``world`` asks for them."""
    everyone = tuple(range(world))
    splits = tuple(range(1, world + 1))
    return [
        gradsieve.Collective("all_gather", everyone, torch.arange(7, dtype=torch.uint8) + 10 * rank),
        gradsieve.Collective("all_to_all", everyone, torch.arange(sum(splits), dtype=torch.float32) + 100 * rank,
                             splits=splits),
        gradsieve.Collective("all_reduce", everyone, torch.full((5,), float(rank + 1))),
        gradsieve.Collective("broadcast", everyone, torch.full((3,), float(rank)), src=world - 1),
        gradsieve.Collective("all_gather", (rank,), torch.full((2,), float(rank))),
    ]


def worker_collectives(rank, world):
    exchange = gradsieve.get_exchange("allgather")
    return [exchange.issue(c).wait() for c in _requests(rank, world)]


def test_collectives_on_ranks_are_what_the_simulator_answers(tmp_path):
    """Each kind of collective a round may ask for gives on 3 gloo ranks what run_together gives
    the Simulator's workers."""
    world = 3
    results = run_workers(worker_collectives, world, tmp_path)

    def phase(rank):
        got = []
        for c in _requests(rank, world):
            got.append((yield c))
        return got

    expected = gradsieve.run_together([phase(rank) for rank in range(world)])
    for rank in range(world):
        for got, want in zip(results[rank], expected[rank]):
            assert torch.equal(got, want)
    assert expected[0][1].tolist() == [[0.0], [100.0], [200.0]]  # each rank's first piece to rank 0


def test_run_together_refuses_diverged_rounds():
    def phase(op):
        yield gradsieve.Collective(op, (0, 1), torch.zeros(2))

    with pytest.raises(RuntimeError, match="asked for different collectives"):
        gradsieve.run_together([phase("all_gather"), phase("all_reduce")])
    with pytest.raises(ValueError, match="unknown exchange 'ring'; available: allgather, allreduce, hierarchical"):
        gradsieve.CompressionState("topk", exchange="ring")


def test_a_registered_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="register_compressor: the name 'topk' is taken by TopKCompressor"):
        gradsieve.register_compressor("topk")(type("Other", (gradsieve.Compressor,), {}))
    with pytest.raises(ValueError, match="register_exchange: the name 'allgather' is taken by AllGatherExchange"):
        gradsieve.register_exchange("allgather")(type("Other", (gradsieve.Exchange,), {}))
    assert gradsieve.available_compressors() == NAMES and gradsieve.available_exchanges()[0] == "allgather"

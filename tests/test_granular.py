"""granular: byte budgets of the levels, what each level selects, error feedback, the
auto policy on scripted signals, the bandit, checkpoints, the layer payload under hostile bytes,
and the probe through the hook's state."""

import math
import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradsieve
from gradsieve.compressors.granular import LEVELS, SIDE_BYTES, DiscountedUCB, steadiness
from gradsieve.wire import LayerFormat

SIZES = [3000, 50, 2000, 20, 500]
NDIMS = [2, 1, 2, 1, 2]
NUMEL = sum(SIZES)


def sim_for(world=3, **options):
    # The Simulator takes no probes by itself (store_probe does): probe_every is 0 unless a test
    # asks, so that granular does not warn of the missing probe.
    options.setdefault("probe_every", 0)
    return gradsieve.Simulator("granular", world_size=world, param_sizes=SIZES, param_ndims=NDIMS, **options)


def grads(world, seed, numel=NUMEL):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * torch.linspace(0.1, 3.0, numel) for _ in range(world)]


def offsets():
    out, at = [], 0
    for n in SIZES:
        out.append(slice(at, at + n))
        at += n
    return out


# ------------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("level", ["weight", "layer", "hybrid"])
@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("density", [0.003, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("extra", [{}, {"index": "csr16"}, {"checksum": True}])
def test_every_level_fits_the_byte_budget_and_fills_it(level, values, density, extra):
    sim = sim_for(world=2, granularity=level, values=values, density=density, **extra)
    sim.step(grads(2, 0))
    payload = sim.last_compressed[0].payload
    compressor = sim.compressor
    layout = sim.layout(NUMEL)
    budget = compressor.budget_bytes(NUMEL)
    assert budget == 4 * math.ceil(density * NUMEL - 1e-9)
    assert payload.numel() <= budget
    assert payload.numel() == SIDE_BYTES + (compressor.layer_format(layout) if level == "layer"
                                            else compressor.weight_format(layout)).nbytes
    # Maximal: one more entry (or one more dense value) would not fit.
    if level == "layer":
        fmt = compressor.layer_format(layout)
        bigger = LayerFormat(fmt.numels, fmt.capacity + 1, fmt.values, max(1, min(256, fmt.capacity + 1)),
                             fmt.checksum)
    else:
        fmt = compressor.weight_format(layout)
        bigger = gradsieve.wire.PayloadFormat(fmt.entries + 1, fmt.values, max(1, min(256, fmt.entries + 1)),
                                              fmt.index, NUMEL, fmt.checksum)
    full = (fmt.capacity if level == "layer" else fmt.entries) == NUMEL  # the whole bucket fits
    assert full or SIDE_BYTES + bigger.nbytes > budget


def test_layer_level_sends_about_four_times_the_values_of_weight_at_int8_bytes():
    sim = sim_for(granularity="weight", values="int8", density=0.05)
    layout = sim.layout(NUMEL)
    k = sim.compressor.weight_format(layout).entries
    capacity = sim.compressor.layer_format(layout).capacity
    assert 0.75 * NUMEL * 0.05 < k < 0.8 * NUMEL * 0.05  # 5 bytes and a bit per entry
    assert 3.7 * NUMEL * 0.05 < capacity <= 4 * NUMEL * 0.05  # 1 byte and a bit per value (headers)
    assert sim.compressor.layer_format(layout).nbytes + SIDE_BYTES <= sim.compressor.budget_bytes(NUMEL)


# ------------------------------------------------------------------------------------------ levels
def reference_acc(gs, residuals):
    return [r + g for r, g in zip(residuals, gs)]


def test_weight_level_without_probes_is_error_feedback_topk():
    sim = sim_for(world=3, granularity="weight", values="fp32", density=0.05, probe_every=0)
    k = sim.compressor.weight_format(sim.layout(NUMEL)).entries
    residuals = [torch.zeros(NUMEL) for _ in range(3)]
    for step in range(6):
        gs = grads(3, step)
        accs = reference_acc(gs, residuals)
        expected = torch.zeros(NUMEL)
        for r, acc in enumerate(accs):
            top = acc.abs().topk(k).indices
            expected[top] += acc[top]
            residuals[r] = acc.clone()
            residuals[r][top] = 0
        got = sim.step(gs)
        torch.testing.assert_close(got, expected / 3, rtol=0, atol=1e-6)
        for r in range(3):
            torch.testing.assert_close(sim.memory(r, "residual"), residuals[r], rtol=0, atol=0)


def test_layer_level_sends_whole_parameters_by_mean_influence_without_indices():
    sim = sim_for(world=1, granularity="layer", values="fp32", density=0.2, probe_every=0)
    capacity = sim.compressor.layer_format(sim.layout(NUMEL)).capacity
    g = grads(1, 3)[0]
    spans = offsets()
    means = [g[s].abs().double().mean().item() for s in spans]
    chosen, room = [], capacity
    for p in sorted(range(len(SIZES)), key=lambda p: -means[p]):
        if SIZES[p] <= room:
            chosen.append(p)
            room -= SIZES[p]
    expected = torch.zeros(NUMEL)
    for p in chosen:
        expected[spans[p]] = g[spans[p]]
    got = sim.step([g])
    assert torch.equal(got, expected)
    assert chosen and sum(SIZES[p] for p in chosen) <= capacity
    # Nothing of a carried parameter is left; the rest waits in the residual.
    residual = sim.memory(0, "residual")
    assert torch.equal(residual, g - expected)


def test_hybrid_level_draws_its_entries_from_the_most_influential_parameters():
    sim = sim_for(world=1, granularity="hybrid", values="fp32", density=0.02, probe_every=0, hybrid_share=0.3)
    g = grads(1, 5)[0]
    spans = offsets()
    means = [g[s].abs().double().mean().item() for s in spans]
    order = sorted(range(len(SIZES)), key=lambda p: -means[p])
    allowed, held = [], 0
    for p in order:
        if held >= 0.3 * NUMEL:
            break
        allowed.append(p)
        held += SIZES[p]
    got = sim.step([g])
    k = sim.compressor.weight_format(sim.layout(NUMEL)).entries
    sent = got.nonzero().flatten()
    assert sent.numel() == k
    inside = torch.zeros(NUMEL, dtype=torch.bool)
    for p in allowed:
        inside[spans[p]] = True
    assert bool(inside[sent].all())
    # They are the top-k of |g| inside those parameters.
    candidates = torch.where(inside, g.abs(), torch.zeros_like(g))
    assert set(sent.tolist()) == set(candidates.topk(k).indices.tolist())


@pytest.mark.parametrize("level", ["weight", "layer", "hybrid", "auto"])
@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_nothing_is_lost_only_delayed(level, values):
    sim = sim_for(world=3, granularity=level, values=values, density=0.05, policy="bandit")
    total, delivered = torch.zeros(NUMEL), torch.zeros(NUMEL)
    for step in range(12):
        sim.report_loss(1.0 / (step + 1))
        gs = grads(3, 100 + step)
        total += sum(gs)
        delivered += 3 * sim.step(gs)
    residuals = sum(sim.memory(r, "residual") for r in range(3))
    torch.testing.assert_close(delivered + residuals, total, rtol=0, atol=2e-4)


def test_curvature_changes_the_choice_and_rho_rolls_the_score():
    bank_h = torch.zeros(NUMEL)
    bank_h[:10] = 1e6  # strongly curved entries
    sim = gradsieve.Simulator("granular", world_size=1, param_sizes=[NUMEL], granularity="weight",
                              values="fp32", density=0.01, eps=1e-3, rho=0.5)
    sim.compressor.store_probe(sim.banks[0].params, 0, bank_h)
    g = torch.full((NUMEL,), 0.01)
    got = sim.step([g])
    assert bool((got[:10] != 0).all())  # the curvature term (0.5 * 1e6 * 1e-6) wins
    # score = (1 - rho) * (|a| eps + 0.5 |h| eps^2)
    expected = 0.5 * (torch.full((NUMEL,), 0.01) * 1e-3 + 0.5 * bank_h * 1e-6)
    torch.testing.assert_close(sim.memory(0, "score"), expected, rtol=1e-6, atol=0)


def test_a_skipped_step_changes_no_memory():
    sim = sim_for(world=2, granularity="layer", density=0.05)
    sim.step(grads(2, 0))
    before = {n: sim.memory(r, n).clone() for r in range(2) for n in ("residual", "score")}
    bad = grads(2, 1)
    bad[1][7] = float("nan")
    out = sim.step(bad)
    assert bool(out.isnan().all()) and sim.skipped_steps == 1
    after = {n: sim.memory(r, n) for r in range(2) for n in ("residual", "score")}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_memory_is_eight_bytes_per_entry_plus_the_probed_diagonal():
    sim = sim_for(world=1, density=0.05)
    sim.step(grads(1, 0))
    assert sim.memory_bytes(0)["total"] == 8 * NUMEL
    sim.compressor.store_probe(sim.banks[0].params, 0, torch.ones(SIZES[0]))
    assert sim.memory_bytes(0)["total"] == 8 * NUMEL + 4 * SIZES[0]


# ------------------------------------------------------------------------------------------ policy
def test_rules_follow_progress_confidence_and_resources():
    compressor = gradsieve.get_compressor("granular", granularity="auto", horizon=30, window=5,
                                          steady=0.01, comm_bound=0.5, probe_every=0)
    sim = gradsieve.Simulator(compressor, world_size=2, param_sizes=SIZES, param_ndims=NDIMS)
    levels = []
    for step in range(30):
        # A noisy loss until step 12, then a steady straight decline; communication-bound from 22.
        noisy = step < 12
        sim.report_loss(2.0 - 0.01 * step + (0.3 * (-1) ** step if noisy else 0.0))
        sim.note_timing(0.9 if step >= 22 else 0.1)
        sim.step(grads(2, step))
        levels.append(compressor.stats()["level"])
    # Steps 0-9: first third, noisy -> layer. 10-19: second third -> hybrid, one finer (weight)
    # once the last 5 losses are steady (those of steps 12-16 are seen at step 17). 20-29: weight;
    # the timing of step t travels in its payload and is seen at step t + 1: from 23 on, one
    # coarser (hybrid).
    assert levels[:10] == ["layer"] * 10
    assert levels[10:17] == ["hybrid"] * 7
    assert levels[17:23] == ["weight"] * 6
    assert levels[23:] == ["hybrid"] * 7
    assert compressor.stats()["level_steps"] == {"layer": 10, "hybrid": 14, "weight": 6}


def test_steadiness_measure():
    assert steadiness([3.0, 2.9, 2.8, 2.7, 2.6]) < 1e-9
    assert steadiness([3.0, 2.0, 3.0, 2.0, 3.0]) > 0.1
    assert steadiness([1.0, 1.0]) == math.inf


def test_bandit_converges_to_the_best_arm_on_a_synthetic_stream():
    rng = random.Random(0)
    means = [0.2, 0.5, 0.3]
    bandit = DiscountedUCB(3, c=0.5, gamma=0.99)
    picks = []
    for _ in range(2000):
        arm = bandit.choose()
        picks.append(arm)
        bandit.update(arm, means[arm] + rng.gauss(0.0, 0.3))
    tail = picks[-500:]
    assert tail.count(1) / len(tail) > 0.8
    # ...and follows a change of the best arm (discounting forgets the old rewards).
    means = [0.8, 0.5, 0.3]
    for _ in range(1500):
        arm = bandit.choose()
        picks.append(arm)
        bandit.update(arm, means[arm] + rng.gauss(0.0, 0.3))
    assert picks[-500:].count(0) / 500 > 0.8


def test_bandit_plays_the_level_whose_loss_falls_most_per_byte():
    # A scripted world: the loss falls by 0.01 after a weight step, 0.002 after the others.
    compressor = gradsieve.get_compressor("granular", granularity="auto", policy="bandit", ucb_c=0.3,
                                          probe_every=0)
    sim = gradsieve.Simulator(compressor, world_size=2, param_sizes=SIZES, param_ndims=NDIMS)
    loss = 5.0
    played = []
    for step in range(150):
        sim.report_loss(loss)
        sim.step(grads(2, step))
        level = compressor.stats()["level"]
        played.append(level)
        loss -= 0.01 if level == "weight" else 0.002
    # Every arm is tried, coarse first (a reward arrives one step after the step it rewards).
    assert played[:5] == ["layer", "layer", "hybrid", "hybrid", "weight"]
    assert played[-50:].count("weight") > 40


def test_bandit_without_losses_learns_nothing_and_stays_deterministic():
    a = sim_for(world=2, granularity="auto", policy="bandit")
    b = sim_for(world=2, granularity="auto", policy="bandit")
    with pytest.warns(UserWarning, match="received no training loss"):
        for step in range(8):
            a.step(grads(2, step))
            b.step(grads(2, step))
    assert a.compressor.stats() == b.compressor.stats()
    assert a.compressor.bandit.counts == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("options", [
    {"granularity": "auto", "policy": "bandit"},
    {"granularity": "auto", "policy": "rules", "horizon": 12, "window": 3, "steady": 0.5},
    {"granularity": "hybrid", "values": "fp32", "rho": 0.7},
])
def test_checkpoint_restore_continues_bit_for_bit(options):
    def run(sim, steps, start=0):
        outs = []
        for step in range(start, start + steps):
            sim.report_loss(3.0 - 0.05 * step + 0.01 * (step % 3))
            outs.append(sim.step(grads(2, step)))
        return outs

    straight = sim_for(world=2, **options)
    expected = run(straight, 12)
    first = sim_for(world=2, **options)
    run(first, 5)
    saved = first.state_dict()
    second = sim_for(world=2, **options)
    second.load_state_dict(saved)
    got = run(second, 7, start=5)
    for a, b in zip(expected[5:], got):
        assert torch.equal(a, b)
    assert repr(straight.compressor.state_dict()) == repr(second.compressor.state_dict())


# ------------------------------------------------------------------------------------------ wire
@pytest.mark.parametrize("values", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("checksum", [False, True])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_layer_payload_under_hostile_bytes(values, checksum, data):
    numels = (7, 30, 3, 64)
    fmt = LayerFormat(numels, 40, values, 16 if values == "int8" else 1, checksum)
    good, _ = fmt.pack(torch.tensor(True), (0, 1, 2), torch.randn(40))
    raw = bytearray(good.numpy().tobytes())
    mode = data.draw(st.sampled_from(["random", "flip", "field"]))
    if mode == "random":
        raw = bytearray(data.draw(st.binary(min_size=len(raw), max_size=len(raw))))
    elif mode == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
    else:
        at = data.draw(st.sampled_from([4, fmt.header_bytes, fmt.header_bytes + 4]))
        raw[at:at + 4] = data.draw(st.integers(-2**31, 2**31 - 1)).to_bytes(4, "little", signed=True)
    gathered = torch.frombuffer(bytearray(bytes(raw) + good.numpy().tobytes()), dtype=torch.uint8).view(2, -1)
    guard = torch.full((sum(numels) + 32,), 7.0)
    out = guard[16:16 + sum(numels)]
    out.zero_()
    finite, well_formed = fmt.decode_sum(gathered.clone(), out)
    assert torch.equal(guard[:16], torch.full((16,), 7.0)) and torch.equal(guard[-16:], torch.full((16,), 7.0))
    assert bool(well_formed[1])
    if not bool(well_formed[0]):
        # Only the well-formed payload is in out.
        alone = torch.zeros(sum(numels))
        fmt.decode_sum(good.view(1, -1), alone)
        assert torch.equal(out, alone)
    if checksum and bytes(raw) != bytes(good.numpy().tobytes()) and mode == "flip":
        assert not bool(well_formed[0])


def test_layer_pack_rejects_bad_choices():
    fmt = LayerFormat((4, 4), 6)
    with pytest.raises(ValueError, match="ascending"):
        fmt.pack(torch.tensor(True), (1, 0), torch.zeros(8))
    with pytest.raises(ValueError, match="capacity"):
        fmt.pack(torch.tensor(True), (0, 1), torch.zeros(8))


def test_a_payload_of_another_level_is_malformed():
    sim = sim_for(world=2, granularity="weight", density=0.05)
    sim.step(grads(2, 0))
    payload = sim.last_compressed[0].payload.clone()
    payload[:4].view(torch.int32)[0] = LEVELS.index("hybrid")  # same size, another level
    gathered = torch.stack([payload, sim.last_compressed[1].payload])
    aggregated = sim.compressor.aggregate(gathered, sim.layout(NUMEL), 1)
    assert aggregated.usable.tolist() == [False, True]
    assert aggregated.well_formed.tolist() == [False, True]


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("options,message", [
    ({"granularity": "neuron"}, "granularity"),
    ({"density": 0.0}, "density"),
    ({"rho": 1.0}, "rho"),
    ({"eps": -1.0}, "eps"),
    ({"probe_every": -1}, "probe_every"),
    ({"policy": "greedy"}, "policy"),
    ({"hybrid_share": 0.0}, "hybrid_share"),
    ({"ucb_gamma": 0.0}, "ucb_gamma"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        gradsieve.get_compressor("granular", **options)


# ------------------------------------------------------------------------------ the per-step calls
def steps_of(sim, count, report_loss=False, probe=False):
    for step in range(count):
        if report_loss:
            sim.report_loss(2.0 - 0.01 * step)
        sim.step(grads(sim.world_size, step))
        if probe:
            for worker in range(sim.world_size):
                sim.compressor.store_probe(sim.banks[worker].params, 0, torch.ones(SIZES[0]))


@pytest.mark.parametrize("policy", ["bandit", "rules"])
def test_auto_without_report_loss_warns_once_naming_the_call(policy):
    sim = sim_for(world=2, granularity="auto", policy=policy, probe_every=0)
    with pytest.warns(UserWarning, match=r"granularity='auto'.*received no training loss: "
                                         r"call state\.report_loss\(loss\)") as caught:
        steps_of(sim, 6)
    assert len([w for w in caught if "granular" in str(w.message)]) == 1  # once
    assert "probe" not in str(caught[0].message)  # probe_every=0: no probe is needed


def test_probe_every_without_a_probe_warns_once_naming_the_call():
    sim = sim_for(world=2, granularity="weight", probe_every=25)  # granular's default
    with pytest.warns(UserWarning, match=r"probe_every=25 but no curvature probe has arrived: "
                                         r"call state\.probe\(model, loss_fn, batch\)") as caught:
        steps_of(sim, 6)
    assert len([w for w in caught if "granular" in str(w.message)]) == 1
    assert "report_loss" not in str(caught[0].message)  # weight does not use the loss


@pytest.mark.parametrize("options,report_loss,probe", [
    ({"granularity": "auto", "policy": "bandit", "probe_every": 25}, True, True),
    ({"granularity": "auto", "policy": "rules", "probe_every": 0}, True, False),
    ({"granularity": "hybrid", "probe_every": 25}, False, True),  # a fixed level needs no loss
    ({"granularity": "layer", "probe_every": 0}, False, False),  # nothing needed
])
def test_no_warning_when_what_the_options_need_arrives(options, report_loss, probe):
    sim = sim_for(world=2, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps_of(sim, 6, report_loss=report_loss, probe=probe)


def _train_through_the_hook(make_calls, steps=6):
    """A one-rank gloo group in this process: granular (auto, bandit, probes every 2 steps) through
    the DDP hook, the loop making the per-step calls or not."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
        ddp = DDP(model)
        state = gradsieve.CompressionState("granular", density=0.1, granularity="auto", policy="bandit",
                                           probe_every=2)
        ddp.register_comm_hook(state, gradsieve.compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

        def loss_fn(module, data):
            return torch.nn.functional.cross_entropy(module(data[0]), data[1])

        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            loss = loss_fn(ddp, (x, y))
            if make_calls:
                state.report_loss(loss.detach())
            loss.backward()
            opt.step()
            if make_calls:
                state.probe(ddp, loss_fn, (x, y))
        return state
    finally:
        dist.destroy_process_group()


def test_through_the_hook_a_loop_without_the_calls_is_warned_and_one_with_them_is_not():
    with pytest.warns(UserWarning, match=r"report_loss.*state\.probe") as caught:
        _train_through_the_hook(make_calls=False)
    assert len([w for w in caught if "granular" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = _train_through_the_hook(make_calls=True)
    assert state.stats()["probes"] == 3

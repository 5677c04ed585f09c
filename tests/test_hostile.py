"""Hostile and corrupted payloads: decoding never raises and never writes outside the bucket,
whatever the bytes; a malformed payload is flagged, its step skipped on every rank, counted by
sender, and after ``max_bad_steps`` steps in a row the hook raises naming the sender."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradsieve
from distributed import run_workers
from gradsieve.compressors.granular import SIDE_BYTES
from gradsieve.wire import CODECS, HEADER_BYTES, VALUE_CODECS, PayloadFormat
from test_hook import batch, flat_params, small_model

GUARD = 64
SENTINEL = 12345.0


def make_payloads(fmt: PayloadFormat, world: int, numel: int, g: torch.Generator):
    payloads, expected = [], torch.zeros(numel)
    for _ in range(world):
        indices = torch.randperm(numel, generator=g)[:fmt.entries]
        values = torch.randn(fmt.entries, generator=g)
        payload, sent = fmt.pack(torch.tensor(True), indices, values)
        expected.index_add_(0, indices, sent)
        payloads.append(payload)
    return torch.stack(payloads), expected


def guarded_decode(fmt: PayloadFormat, gathered: torch.Tensor, numel: int):
    """Decodes into the middle of a larger buffer; returns (out, finite, well_formed) after checking
    that the guard regions on both sides were not written."""
    big = torch.full((numel + 2 * GUARD,), SENTINEL)
    out = big[GUARD:GUARD + numel]
    out.zero_()
    finite, well_formed = fmt.decode_sum(gathered, out)
    assert torch.equal(big[:GUARD], torch.full((GUARD,), SENTINEL))
    assert torch.equal(big[-GUARD:], torch.full((GUARD,), SENTINEL))
    return out, finite, well_formed


FORMATS = st.tuples(st.sampled_from(list(VALUE_CODECS)), st.sampled_from(["int32", "csr16", "local"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=FORMATS, numel=st.integers(1, 70_000), density=st.floats(0.0005, 0.3), world=st.integers(1, 3),
       seed=st.integers(0, 2**31), flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)),
                                                   min_size=0, max_size=12))
def test_random_corruption_never_crashes_or_writes_outside(fmt, numel, density, world, seed, flips):
    values, index = fmt
    k = max(1, min(numel, int(density * numel)))
    chunk = 7 if CODECS[values].scaled else 256
    form = PayloadFormat(k, values, chunk, index, numel)
    g = torch.Generator().manual_seed(seed)
    gathered, expected = make_payloads(form, world, numel, g)
    clean = gathered.clone()
    for position, byte in flips:
        rank, where = position % world, (position // world) % form.nbytes
        gathered[rank, where] = byte
    out, finite, well_formed = guarded_decode(form, gathered, numel)
    if torch.equal(gathered, clean):  # untouched (or flipped to the same bytes): exact
        assert finite.all() and well_formed.all()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=FORMATS, seed=st.integers(0, 2**31))
def test_random_bytes_never_crash_or_write_outside(fmt, seed):
    values, index = fmt
    numel = 3000
    form = PayloadFormat(40, values, 8 if CODECS[values].scaled else 256, index, numel)
    g = torch.Generator().manual_seed(seed)
    gathered = torch.randint(0, 256, (2, form.nbytes), generator=g, dtype=torch.uint8)
    guarded_decode(form, gathered, numel)


def corrupt(form, gathered, what):
    # A copy of rank 1's row (its views as int32 need an aligned start, which odd sizes lack).
    rank = gathered[1].clone()
    header = rank[:HEADER_BYTES].view(torch.int32)
    if what == "count-above-slots":
        header[1] = form.slots + 1
    elif what == "count-negative":
        header[1] = -3
    elif what == "flag-not-0-or-1":
        header[0] = 7
    elif what == "index-at-numel":
        rank[HEADER_BYTES:HEADER_BYTES + 4].view(torch.int32)[0] = form.numel
    elif what == "index-negative":
        rank[HEADER_BYTES:HEADER_BYTES + 4].view(torch.int32)[0] = -1
    elif what == "csr16-count-too-many":
        rank[HEADER_BYTES:HEADER_BYTES + 4].view(torch.int32)[0] += 5
    elif what == "csr16-count-negative":
        rank[HEADER_BYTES:HEADER_BYTES + 4].view(torch.int32)[0] = -2
    elif what == "nan-scale":
        start = HEADER_BYTES + form.index_bytes
        rank[start:start + 4].view(torch.float32)[0] = float("nan")
    elif what == "inf-value":
        start = HEADER_BYTES + form.index_bytes
        rank[start:start + 4].view(torch.float32)[0] = float("inf")
    gathered[1] = rank


@pytest.mark.parametrize("values,index,what", [
    ("fp32", "int32", "count-above-slots"), ("fp32", "int32", "count-negative"),
    ("fp32", "int32", "flag-not-0-or-1"), ("fp32", "int32", "index-at-numel"),
    ("int8", "int32", "index-negative"), ("fp32", "csr16", "csr16-count-too-many"),
    ("int8", "csr16", "csr16-count-negative"), ("int8", "int32", "nan-scale"),
    ("fp32", "int32", "inf-value"), ("int8", "csr16", "count-above-slots"),
    ("int4", "int32", "nan-scale"), ("int2", "csr16", "nan-scale"), ("sign", "int32", "nan-scale"),
    ("int4", "csr16", "csr16-count-too-many"), ("sign", "int32", "index-at-numel"),
])
def test_each_kind_of_malformed_payload_is_flagged(values, index, what):
    numel = 100_000
    form = PayloadFormat(300, values, 64, index, numel)
    gathered, _ = make_payloads(form, 2, numel, torch.Generator().manual_seed(0))
    corrupt(form, gathered, what)
    _, finite, well_formed = guarded_decode(form, gathered, numel)
    assert well_formed.tolist() == [True, False], what


def test_a_non_finite_gradient_is_not_a_malformed_payload():
    numel = 1000
    form = PayloadFormat(20, "int8", 8, "int32", numel)
    values = torch.randn(20)
    values[3] = float("nan")
    payload, _ = form.pack(torch.tensor(False), torch.randperm(numel)[:20], values)
    _, finite, well_formed = guarded_decode(form, payload.view(1, -1), numel)
    assert finite.tolist() == [False] and well_formed.tolist() == [True]


def test_a_payload_of_the_wrong_size_is_refused_by_name():
    form = PayloadFormat(20, "fp32", 256, "int32", 1000)
    with pytest.raises(ValueError, match=r"decode_sum: expected uint8 payloads of \d+ bytes"):
        form.decode_sum(torch.zeros(2, form.nbytes + 4, dtype=torch.uint8), torch.zeros(1000))


# ------------------------------------------------------------------------------- through the hook
def corrupting(state, rank, bad_steps):
    """Rank ``rank``'s payload gets an index far outside the bucket on the steps ``bad_steps``."""
    compress = state.compressor.compress

    def compress_and_corrupt(grad, memory, layout, step):
        out = compress(grad, memory, layout, step)
        if torch.distributed.get_rank() == rank and state.step - 1 in bad_steps:
            out.payload[HEADER_BYTES:HEADER_BYTES + 4].view(torch.int32)[0] = 10**9
        return out

    state.compressor.compress = compress_and_corrupt


def worker_corrupted(rank, world, bad_steps, max_bad_steps, steps, exchange="allgather", local=None, sender=1):
    model = small_model()
    built = gradsieve.get_exchange(exchange, **({"local": local} if local else {}))
    state = gradsieve.CompressionState("topk", density=0.1, max_bad_steps=max_bad_steps, exchange=built)
    corrupting(state, sender, set(bad_steps))
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model)
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    residuals = []
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
        state.flush()  # the step's flags are read, and a skipped step's commits undone, here
        residuals.append(state.memory.total("residual").clone() if state.memory.buckets else None)
    return flat_params(model), state.stats(), residuals


@pytest.mark.slow
def test_a_corrupted_payload_skips_the_step_on_every_rank_and_is_counted(tmp_path):
    results = run_workers(worker_corrupted, 2, tmp_path, [3, 4], 3, 8)
    (p0, s0, r0), (p1, s1, r1) = results
    assert torch.equal(p0, p1) and torch.isfinite(p0).all()
    for stats in (s0, s1):
        assert stats["bad_payloads"] == 2 and stats["bad_payload_ranks"] == {1: 2}, stats
        assert stats["skipped_steps"] == 2
    for residuals in (r0, r1):  # memory unchanged on the skipped steps
        assert torch.equal(residuals[3], residuals[2]) and torch.equal(residuals[4], residuals[2])


@pytest.mark.slow
def test_too_many_corrupted_steps_in_a_row_raise_naming_the_sender(tmp_path):
    with pytest.raises(Exception, match=r"malformed payloads for 2 steps in a row \(max_bad_steps=2\) "
                                        r"from rank\(s\) \[1\]"):
        run_workers(worker_corrupted, 2, tmp_path, list(range(2, 8)), 2, 8)


@pytest.mark.slow
def test_under_the_hierarchical_exchange_every_rank_counts_and_names_the_sender(tmp_path):
    """2 nodes of 2: rank 3's payloads reach only ranks 1 and 3 (its shard's cross-node group);
    ranks 0 and 2 learn of them through the node's all-gather: every rank skips the same steps,
    counts rank 3, and raises after max_bad_steps naming it."""
    results = run_workers(worker_corrupted, 4, tmp_path, [3, 4], 3, 8, "hierarchical", 2, 3)
    params = [r[0] for r in results]
    assert all(torch.equal(p, params[0]) for p in params) and torch.isfinite(params[0]).all()
    for _, stats, _ in results:
        assert stats["bad_payload_ranks"] == {3: 2} and stats["skipped_steps"] == 2, stats
    with pytest.raises(Exception, match=r"malformed payloads for 2 steps in a row \(max_bad_steps=2\) "
                                        r"from rank\(s\) \[3\]"):
        run_workers(worker_corrupted, 4, tmp_path, list(range(2, 8)), 2, 8, "hierarchical", 2, 3)


def test_max_bad_steps_is_checked():
    with pytest.raises(ValueError, match="max_bad_steps must be an integer >= 1, got 0"):
        gradsieve.CompressionState("topk", max_bad_steps=0)


# ------------------------------------------------------------------------------------- checksum
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=FORMATS, seed=st.integers(0, 2**31), position=st.integers(0, 2**31), bit=st.integers(0, 7))
def test_the_checksum_catches_any_flipped_bit(fmt, seed, position, bit):
    values, index = fmt
    numel = 20_000
    form = PayloadFormat(60, values, 16 if CODECS[values].scaled else 256, index, numel, checksum=True)
    gathered, expected = make_payloads(form, 2, numel, torch.Generator().manual_seed(seed))
    out, finite, well_formed = guarded_decode(form, gathered.clone(), numel)
    assert finite.all() and well_formed.all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    where = position % form.nbytes
    gathered[1, where] ^= 1 << bit
    _, _, well_formed = guarded_decode(form, gathered, numel)
    assert well_formed.tolist() == [True, False], where


def test_without_the_checksum_a_flipped_value_bit_goes_through():
    """What the checksum is for: a well-formed but wrong value passes every bounds check."""
    numel = 1000
    form = PayloadFormat(10, "fp32", 256, "int32", numel)
    gathered, _ = make_payloads(form, 1, numel, torch.Generator().manual_seed(0))
    gathered[0, HEADER_BYTES + 4 * 10] ^= 1  # lowest bit of the first value
    _, finite, well_formed = guarded_decode(form, gathered, numel)
    assert finite.all() and well_formed.all()


def test_the_checksum_costs_8_bytes_and_changes_no_result():
    grads = [torch.randn(5000) for _ in range(2)]
    plain = gradsieve.Simulator("topk", world_size=2, density=0.01, values="int8")
    summed = gradsieve.Simulator("topk", world_size=2, density=0.01, values="int8", checksum=True)
    for _ in range(3):
        assert torch.equal(plain.step(grads), summed.step(grads))
    assert summed.wire_bytes - plain.wire_bytes == 3 * 2 * 8


# ----------------------------------------------------------------- one bad bucket of several
def deep_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(20, 20), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(20, 10))


def bucket_memory(state):
    return {index: {name: t.clone() for name, t in memory.entries.items()}
            for index, memory in sorted(state.memory.buckets.items())}


def worker_one_bad_bucket(rank, world, compressor, bad_step, which, speculative):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = deep_model()
    state = gradsieve.CompressionState(compressor, density=0.1)
    compress = state.compressor.compress
    buckets = set()

    def compress_and_corrupt(grad, memory, layout, step):
        out = compress(grad, memory, layout, step)
        buckets.add(layout.index)
        target = min(buckets) if which == "first" else max(buckets)
        if rank == 1 and step == bad_step and layout.index == target:
            at = HEADER_BYTES + (SIDE_BYTES if compressor == "granular" else 0)  # its first index
            out.payload[at:at + 4].view(torch.int32)[0] = 10**9
        return out

    state.compressor.compress = compress_and_corrupt
    ddp = DDP(model, bucket_cap_mb=0.0015)  # 4 buckets
    ddp.register_comm_hook(state, gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if speculative is not None:
        opt = gradsieve.SpeculativeOptimizer(opt, state, revert_threshold=0.5,
                                             overlap_compress=speculative == "overlap")
    memories = []
    for step in range(8):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        if speculative is not None or all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
        state.flush()
        memories.append(bucket_memory(state))
    if speculative is not None:
        opt.synchronize()
    stats = state.stats()
    return len(state.memory.buckets), memories, stats["skipped_steps"], stats["bad_payloads"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("compressor", ["topk", "dgc", "ef21", "regtopk", "adaptive", "granular"])
def test_one_bad_bucket_skips_the_whole_step_and_keeps_every_bucket_memory(tmp_path, compressor, which):
    """A payload of one bucket of several is malformed (the first bucket to land or the last): the
    step is skipped on every rank, and no bucket's memory changes, also for the buckets whose
    exchange landed before the bad one and had committed (their commits are undone)."""
    bad = 3  # compressed step 3 is loop step 4 (one warm-up step)
    for buckets, memories, skipped, bad_payloads in run_workers(
            worker_one_bad_bucket, 2, tmp_path, compressor, bad, which, None):
        assert buckets >= 3
        assert skipped == 1 and bad_payloads == 1
        before, after = memories[bad], memories[bad + 1]
        for index in before:
            for name in before[index]:
                assert torch.equal(before[index][name], after[index][name]), (index, name)
        # and the step after it commits again
        assert any(not torch.equal(after[i][n], memories[bad + 2][i][n]) for i in after for n in after[i])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "overlap"])
@pytest.mark.parametrize("which", ["first", "last"])
@pytest.mark.parametrize("compressor", ["topk", "granular"])
def test_one_bad_bucket_under_speculative_training_keeps_every_bucket_memory(tmp_path, compressor, which,
                                                                             mode):
    """The same under SpeculativeOptimizer. Loop step 4 (compressed step 3) has the bad bucket.
    Without overlap_compress its exchange commits when it lands, in loop step 5's backward, so the
    memory after loop step 5 equals the memory after loop step 4. With it, loop step 4 committed
    when it sent and loop step 5 was compressed from that memory: both are undone (loop step 5 is
    dropped, 2 skipped steps), and the memory after loop step 5 equals that after loop step 3."""
    bad = 3
    for buckets, memories, skipped, bad_payloads in run_workers(
            worker_one_bad_bucket, 2, tmp_path, compressor, bad, which, mode):
        assert buckets >= 3 and bad_payloads == 1
        assert skipped == (1 if mode == "sync" else 2)
        want = memories[bad + 1] if mode == "sync" else memories[bad]
        got = memories[bad + 2]
        for index in want:
            for name in want[index]:
                assert torch.equal(want[index][name], got[index][name]), (index, name)

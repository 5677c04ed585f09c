"""Values at agreed indices (``SparseCompressor.accumulate`` and ``compress_at``), the compressor
side of an exchange that all-reduces one index set's values per bucket: topk, dgc and ef21 against
plain-torch references (:mod:`reference`), purity, the tie to ``compress`` when the index set is
the one ``compress`` chooses, the error-feedback account, and the edge cases (int8 refused, other
compressors refused, empty and full sets, strided, non-finite and half-precision gradients)."""

import pytest
import torch

import gradsieve
import reference
from conftest import requires_cuda
from gradsieve.compressor import Compressed, SparseCompressor
from gradsieve.memory import MemoryBank
from gradsieve.registry import compressor_class

AGREED = ["dgc", "ef21", "topk"]
VALUES = ["fp32", "fp16", "bf16"]
WORLD = 2
SIZES = (600, 330, 70)  # one bucket of three parameters, the last one 1-D
PAYLOAD_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
        torch.float64: torch.int64}


def layout_of(world=WORLD):
    return gradsieve.BucketLayout(sum(SIZES), SIZES, (2, 2, 1), world, 0, (7, 3, 11))


def memory_for(compressor, layout, device="cpu"):
    return MemoryBank().get(0, layout.keys, layout.param_numels, compressor.memory_names,
                            torch.device(device), compressor.memory_dtypes)


def random_indices(numel, k, gen):
    return torch.randperm(numel, generator=gen)[:k].sort().values


def average_of(compressed, indices, numel):
    """What the exchange builds: the sum over the workers of the values at the indices,
    scattered, divided by the number of workers."""
    total = sum(c.payload.float() for c in compressed)
    return torch.zeros(numel).index_add_(0, indices, total / len(compressed))


def copy_memory(memory):
    return {part: {k: t.clone() for k, t in getattr(memory, part).items()} for part in ("entries", "extra")}


def assert_memory_is(memory, saved):
    for part, tensors in saved.items():
        current = getattr(memory, part)
        assert set(current) == set(tensors), part
        for name, tensor in tensors.items():
            assert torch.equal(current[name], tensor), (part, name)


def assert_same(a, b):
    """Bit for bit, tensors nested in tuples and dicts (dtype and NaN positions included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        bits = BITS.get(a.dtype)
        assert torch.equal(a.view(bits), b.view(bits)) if bits is not None else torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def stepped(name, values="fp32", steps=2, seed=0, **options):
    """A compressor and one worker's memory after ``steps`` agreed-index steps (non-zero state)."""
    compressor = gradsieve.get_compressor(name, density=0.1, values=values, **options)
    layout = layout_of()
    memory = memory_for(compressor, layout)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        indices = random_indices(layout.numel, 50, gen)
        c = compressor.compress_at(torch.randn(layout.numel, generator=gen), memory, layout, step, indices)
        compressor.commit(memory, c, average_of([c], indices, layout.numel), layout)
    return compressor, layout, memory, gen


# ------------------------------------------------------------------ the update, against references
DGC_SETTINGS = [(0.9, 0.0), (0.0, 0.0), (0.5, 1.0)]  # (momentum, clip_norm)


@pytest.mark.parametrize("values", VALUES)
def test_topk_matches_reference(values):
    compressor = gradsieve.get_compressor("topk", density=0.1, values=values)
    layout = layout_of()
    memories = [memory_for(compressor, layout) for _ in range(WORLD)]
    residuals = [torch.zeros(layout.numel) for _ in range(WORLD)]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        indices = random_indices(layout.numel, [0, 37, 200, layout.numel][step], gen)
        grads = [torch.randn(layout.numel, generator=gen) * 10 ** step for _ in range(WORLD)]
        compressed = []
        for rank in range(WORLD):
            c = compressor.compress_at(grads[rank], memories[rank], layout, step, indices)
            acc, sent, new = reference.agreed_topk(residuals[rank], grads[rank], indices, values)
            assert c.payload.dtype == PAYLOAD_DTYPES[values] and c.payload.shape == (indices.numel(),)
            assert torch.equal(c.payload.float(), sent)
            assert torch.equal(c.scratch["wire_values"], sent)
            assert torch.equal(c.scratch["indices"], indices)
            assert torch.equal(c.pending["residual"], new)
            assert torch.equal(compressor.accumulate(grads[rank], memories[rank], layout, step), acc)
            residuals[rank] = new
            compressed.append(c)
        average = average_of(compressed, indices, layout.numel)
        for memory, c in zip(memories, compressed):
            assert compressor.commit(memory, c, average, layout) is average
        for memory, residual in zip(memories, residuals):
            assert torch.equal(memory.entries["residual"], residual)


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("momentum,clip_norm", DGC_SETTINGS)
def test_dgc_matches_reference(values, momentum, clip_norm):
    compressor = gradsieve.get_compressor("dgc", density=0.1, values=values, momentum=momentum,
                                          clip_norm=clip_norm, density_warmup_steps=8)
    layout = layout_of()
    memories = [memory_for(compressor, layout) for _ in range(WORLD)]
    state = [(torch.zeros(layout.numel), torch.zeros(layout.numel)) for _ in range(WORLD)]
    gen = torch.Generator().manual_seed(2)
    # Exact without clipping; with clipping the reference's norm is taken in float64.
    check = torch.equal if clip_norm == 0 else \
        (lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6) is None)
    for step in range(4):
        indices = random_indices(layout.numel, [13, 0, 250, layout.numel][step], gen)
        grads = [torch.randn(layout.numel, generator=gen) for _ in range(WORLD)]
        compressed = []
        for rank in range(WORLD):
            c = compressor.compress_at(grads[rank], memories[rank], layout, step, indices)
            acc, sent, new_u, new_v = reference.agreed_dgc(*state[rank], grads[rank], indices, momentum,
                                                           clip_norm, WORLD, values)
            assert c.payload.dtype == PAYLOAD_DTYPES[values]
            assert check(compressor.accumulate(grads[rank], memories[rank], layout, step), acc)
            assert check(c.payload.float(), sent) and check(c.scratch["wire_values"], sent)
            assert check(c.pending["momentum_u"], new_u) and check(c.pending["velocity_v"], new_v)
            assert set(c.pending) == {"momentum_u", "velocity_v"}  # the threshold factor stays
            state[rank] = (c.pending["momentum_u"], c.pending["velocity_v"])
            compressed.append(c)
        average = average_of(compressed, indices, layout.numel)
        for memory, c, (u, v) in zip(memories, compressed, state):
            compressor.commit(memory, c, average, layout)
            assert torch.equal(memory.entries["momentum_u"], u) and torch.equal(memory.entries["velocity_v"], v)
    # The warm-up density stays available to size the set.
    assert compressor.density_at(0) == 0.25 and compressor.density_at(8) == 0.1


@pytest.mark.parametrize("values", VALUES)
def test_ef21_matches_reference(values):
    compressor = gradsieve.get_compressor("ef21", density=0.1, values=values)
    layout = layout_of()
    memories = [memory_for(compressor, layout) for _ in range(WORLD)]
    estimates = [torch.zeros(layout.numel) for _ in range(WORLD)]
    global_estimate = torch.zeros(layout.numel)
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        indices = random_indices(layout.numel, [100, layout.numel, 0, 7][step], gen)
        grads = [torch.randn(layout.numel, generator=gen) + rank for rank in range(WORLD)]
        compressed, sents = [], []
        for rank in range(WORLD):
            c = compressor.compress_at(grads[rank], memories[rank], layout, step, indices)
            change, sent, new = reference.agreed_ef21(estimates[rank], grads[rank], indices, values)
            assert c.payload.dtype == PAYLOAD_DTYPES[values]
            assert torch.equal(compressor.accumulate(grads[rank], memories[rank], layout, step), change)
            assert torch.equal(c.payload.float(), sent) and torch.equal(c.scratch["wire_values"], sent)
            estimates[rank] = new
            compressed.append(c)
            sents.append(sent)
        average = torch.zeros(layout.numel).index_add_(0, indices, sum(sents) / WORLD)
        global_estimate = global_estimate + average
        for memory, c, estimate in zip(memories, compressed, estimates):
            result = compressor.commit(memory, c, average_of(compressed, indices, layout.numel), layout)
            assert torch.equal(memory.entries["estimate"], estimate)
            assert torch.equal(memory.entries["global_estimate"], global_estimate)
            assert torch.equal(result, global_estimate)


# ------------------------------------------------------------------ purity
@pytest.mark.parametrize("name", AGREED)
def test_accumulate_and_compress_at_leave_memory_alone(name):
    compressor, layout, memory, gen = stepped(name, values="bf16", steps=2)
    saved = copy_memory(memory)
    ids = {k: id(t) for k, t in memory.entries.items()}
    grad = torch.randn(layout.numel, generator=gen)
    acc = compressor.accumulate(grad, memory, layout, 2)
    assert all(acc.data_ptr() != t.data_ptr() for t in memory.entries.values())
    assert_memory_is(memory, saved)
    kept = acc.clone()
    compressor.compress_at(grad, memory, layout, 2, random_indices(layout.numel, 90, gen), accumulated=acc)
    compressor.compress_at(grad, memory, layout, 2, random_indices(layout.numel, 90, gen))
    assert_memory_is(memory, saved)
    assert {k: id(t) for k, t in memory.entries.items()} == ids
    assert_same(acc, kept)  # the caller's accumulator is not written either


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("name", AGREED)
def test_given_accumulator_gives_the_same_result(name, values):
    compressor, layout, memory, gen = stepped(name, values=values, steps=2, clip_norm=0.5) if name == "dgc" \
        else stepped(name, values=values, steps=2)
    grad = torch.randn(layout.numel, generator=gen)
    indices = random_indices(layout.numel, 120, gen)
    acc = compressor.accumulate(grad, memory, layout, 2)
    assert_same(compressor.compress_at(grad, memory, layout, 2, indices, accumulated=acc),
                compressor.compress_at(grad, memory, layout, 2, indices))


@pytest.mark.parametrize("name", AGREED)
def test_payload_is_its_own_tensor(name):
    """The exchange may all-reduce into the payload: nothing in pending or scratch changes."""
    compressor, layout, memory, gen = stepped(name, steps=1)
    c = compressor.compress_at(torch.randn(layout.numel, generator=gen), memory, layout, 1,
                               random_indices(layout.numel, 40, gen))
    saved = {k: v.clone() for k, v in {**c.pending, **c.scratch}.items()}
    c.payload.add_(1.0)
    assert_same({**c.pending, **c.scratch}, saved)


# ------------------------------------------------------------------ the tie to compress
TIE_OPTIONS = [{}, {"scope": "layer"}, {"compress_1d": False}]


@pytest.mark.parametrize("options", TIE_OPTIONS, ids=["bucket", "layer", "dense_1d"])
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("name", AGREED)
def test_compress_at_the_indices_compress_chooses_leaves_the_same_memory(name, values, options):
    """Given exactly the entries compress selects, compress_at sends the same values and leaves
    the same memory, step after step (dgc: exact top-k, no warm-up)."""
    extra = {"sample_fraction": 0.0, "clip_norm": 1.0} if name == "dgc" else {}
    compressor = gradsieve.get_compressor(name, density=0.05, values=values, **options, **extra)
    layout = layout_of()
    old, new = memory_for(compressor, layout), memory_for(compressor, layout)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        grad = torch.randn(layout.numel, generator=gen)
        selection = compressor.select(grad, old, compressor.segments(layout, step), layout, step)
        indices = selection.indices
        assert bool((indices[1:] > indices[:-1]).all())  # ascending, distinct
        by_compress = compressor.compress(grad, old, layout, step)
        at = compressor.compress_at(grad, new, layout, step, indices)
        assert torch.equal(at.scratch["wire_values"], by_compress.scratch["wire_values"])
        memory_entries = [k for k in by_compress.pending if k in compressor.memory_names]
        assert_same({k: at.pending[k] for k in memory_entries}, {k: by_compress.pending[k] for k in memory_entries})
        average = compressor.own_update(by_compress, layout, step).average
        assert torch.equal(average, average_of([at], indices, layout.numel))
        compressor.commit(old, by_compress, average, layout)
        compressor.commit(new, at, average, layout)
        assert_same(new.entries, old.entries)


# ------------------------------------------------------------------ the error-feedback account
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("name,options", [("topk", {}), ("dgc", {"momentum": 0.0})])
def test_error_feedback_account(name, options, values):
    """Over several steps of random index sets: the workers' gradients add up to what was sent
    plus what they hold (``undelivered``)."""
    world = 3
    compressor = gradsieve.get_compressor(name, density=0.1, values=values, **options)
    layout = layout_of(world)
    memories = [memory_for(compressor, layout) for _ in range(world)]
    gen = torch.Generator().manual_seed(5)
    total = torch.zeros(layout.numel, dtype=torch.float64)
    delivered = torch.zeros(layout.numel, dtype=torch.float64)
    for step in range(8):
        k = int(torch.randint(0, layout.numel + 1, (1,), generator=gen))
        indices = random_indices(layout.numel, k, gen)
        grads = [torch.randn(layout.numel, generator=gen) for _ in range(world)]
        compressed = [compressor.compress_at(g, m, layout, step, indices) for g, m in zip(grads, memories)]
        average = average_of(compressed, indices, layout.numel)
        for memory, c in zip(memories, compressed):
            compressor.commit(memory, c, average, layout)
            delivered.index_add_(0, indices, c.scratch["wire_values"].double())
        total += sum(g.double() for g in grads)
    held = sum(compressor.undelivered(m).double() for m in memories)
    torch.testing.assert_close(delivered + held, total, rtol=0, atol=1e-4)
    assert float(delivered.abs().sum()) > 0


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("name", AGREED)
def test_int8_values_are_refused(name):
    compressor = gradsieve.get_compressor(name, density=0.1, values="int8")
    layout = layout_of()
    memory = memory_for(compressor, layout)
    grad = torch.randn(layout.numel)
    with pytest.raises(ValueError, match=rf"compressor '{name}': values must be fp32, fp16 or bf16 .*got 'int8'"):
        compressor.compress_at(grad, memory, layout, 0, torch.arange(5))
    with pytest.raises(ValueError, match="values must be fp32, fp16 or bf16"):
        compressor.check_agreed_indices()
    assert compressor.accumulate(grad, memory, layout, 0).shape == (layout.numel,)  # the accumulator exists


def test_only_topk_dgc_ef21_send_at_agreed_indices():
    for name in gradsieve.available_compressors():
        cls = compressor_class(name)
        assert getattr(cls, "agreed_indices", False) == (name in AGREED), name
        if name in AGREED or not issubclass(cls, SparseCompressor):
            continue
        compressor = gradsieve.get_compressor(name, density=0.1)
        layout = layout_of()
        memory = memory_for(compressor, layout)
        message = rf"compressor '{name}' cannot send its values at agreed indices"
        with pytest.raises(ValueError, match=message):
            compressor.accumulate(torch.randn(layout.numel), memory, layout, 0)
        with pytest.raises(ValueError, match=message):
            compressor.compress_at(torch.randn(layout.numel), memory, layout, 0, torch.arange(3))
    # regtopk is a topk subclass with its own selection rule: it does not inherit the flag.
    assert issubclass(compressor_class("regtopk"), compressor_class("topk"))


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("name", AGREED)
def test_empty_and_full_index_sets(name, values):
    compressor, layout, memory, gen = stepped(name, values=values, steps=1)
    grad = torch.randn(layout.numel, generator=gen)
    acc = compressor.accumulate(grad, memory, layout, 1)
    empty = compressor.compress_at(grad, memory, layout, 1, torch.empty(0, dtype=torch.int64))
    assert empty.payload.shape == (0,) and empty.payload.dtype == PAYLOAD_DTYPES[values]
    assert empty.scratch["wire_values"].shape == (0,)
    full = compressor.compress_at(grad, memory, layout, 1, torch.arange(layout.numel))
    assert torch.equal(full.payload.float(), reference.wire_values(acc, values))
    if name == "topk":
        assert torch.equal(empty.pending["residual"], acc)
        assert torch.equal(full.pending["residual"], acc - reference.wire_values(acc, values))
    if name == "dgc":
        assert torch.equal(empty.pending["velocity_v"], acc)
        assert not full.pending["momentum_u"].any()
    for c, k in ((empty, 0), (full, layout.numel)):
        compressor.commit(memory_for(compressor, layout), c, torch.zeros(layout.numel), layout)
        assert c.scratch["indices"].numel() == k


@pytest.mark.parametrize("name", AGREED)
def test_strided_and_shaped_gradients(name):
    compressor, layout, memory, gen = stepped(name, values="fp16", steps=1)
    flat = torch.randn(layout.numel, generator=gen)
    indices = random_indices(layout.numel, 77, gen)
    expected = compressor.compress_at(flat, memory, layout, 1, indices)
    strided = torch.zeros(2 * layout.numel)
    strided[::2] = flat
    transposed = flat.reshape(40, 25).t().contiguous().t()  # a non-contiguous [40, 25] view of flat
    assert not strided[::2].is_contiguous() and not transposed.is_contiguous()
    for grad in (strided[::2], transposed):
        assert_same(compressor.compress_at(grad, memory, layout, 1, indices), expected)
        assert_same(compressor.accumulate(grad, memory, layout, 1), compressor.accumulate(flat, memory, layout, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", AGREED)
def test_non_finite_gradient_is_flagged_not_raised(name, bad):
    compressor, layout, memory, gen = stepped(name, values="bf16", steps=1)
    grad = torch.randn(layout.numel, generator=gen)
    indices = random_indices(layout.numel, 60, gen)
    fine = compressor.compress_at(grad, memory, layout, 1, indices)
    assert fine.scratch["finite"].dtype == torch.bool and fine.scratch["finite"].dim() == 0
    assert bool(fine.scratch["finite"])
    grad[int(indices[3])] = bad
    grad[5] = bad  # perhaps outside the set: the flag covers the whole gradient
    c = compressor.compress_at(grad, memory, layout, 1, indices)
    assert isinstance(c, Compressed) and not bool(c.scratch["finite"])
    assert not bool(torch.isfinite(c.payload.float()).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("name", AGREED)
def test_half_precision_gradients_read_as_float32(name, values, dtype):
    """A float16/bfloat16 gradient gives what the same numbers in float32 give (the hook always
    passes float32)."""
    compressor, layout, memory, gen = stepped(name, values=values, steps=1)
    half = torch.randn(layout.numel, generator=gen).to(dtype)
    indices = random_indices(layout.numel, 64, gen)
    assert_same(compressor.compress_at(half, memory, layout, 1, indices),
                compressor.compress_at(half.float(), memory, layout, 1, indices))


def test_bad_arguments_are_named():
    compressor = gradsieve.get_compressor("topk", density=0.1)
    layout = layout_of()
    memory = memory_for(compressor, layout)
    grad = torch.randn(layout.numel)
    with pytest.raises(ValueError, match=r"compress_at: indices must be a 1-D int64 tensor, got torch.int32"):
        compressor.compress_at(grad, memory, layout, 0, torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"compress_at: indices must be a 1-D int64 tensor, got list"):
        compressor.compress_at(grad, memory, layout, 0, [1, 2])
    with pytest.raises(ValueError, match=r"compress_at: accumulated must be float32 of shape \(1000,\)"):
        compressor.compress_at(grad, memory, layout, 0, torch.arange(4), accumulated=torch.zeros(999))
    with pytest.raises(ValueError, match=r"accumulate: grad must be float32, float16 or bfloat16 with 1000 "
                                         r"entries, got torch.float32 with 999"):
        compressor.accumulate(torch.zeros(999), memory, layout, 0)
    with pytest.raises(ValueError, match=r"compress_at: grad must be .* got torch.float64"):
        compressor.compress_at(grad.double(), memory, layout, 0, torch.arange(4))


# ------------------------------------------------------------------ CUDA
@requires_cuda
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("name", AGREED)
def test_cuda_matches_cpu(name, values):
    """The same steps on CUDA and on the CPU give the same payloads and memory, bit for bit."""
    options = {"clip_norm": 1.0} if name == "dgc" else {}
    compressor = gradsieve.get_compressor(name, density=0.1, values=values, **options)
    layout = layout_of()
    memories = {d: memory_for(compressor, layout, d) for d in ("cpu", "cuda")}
    gen = torch.Generator().manual_seed(6)
    for step in range(3):
        grad = torch.randn(layout.numel, generator=gen) * 100
        indices = random_indices(layout.numel, 150, gen)
        out = {}
        for device, memory in memories.items():
            acc = compressor.accumulate(grad.to(device), memory, layout, step)
            c = compressor.compress_at(grad.to(device), memory, layout, step, indices.to(device), accumulated=acc)
            average = torch.zeros(layout.numel, device=device).index_add_(0, indices.to(device), c.payload.float())
            compressor.commit(memory, c, average, layout)
            out[device] = (acc.cpu(), c.payload.cpu(), c.scratch["wire_values"].cpu(), bool(c.scratch["finite"]))
        assert_same(out["cuda"], out["cpu"])
        assert_same({k: t.cpu() for k, t in memories["cuda"].entries.items()}, memories["cpu"].entries)

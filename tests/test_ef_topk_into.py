"""ef_topk_into: ef_topk_ out of place with the gradient's finite flag, against the in-place op on a
copy (the path topk took before: clone the residual, ef_topk_ per segment, isfinite over the
gradient); and topk's compress through it against that old path, bit for bit."""

import pytest
import torch

import gradsieve
from conftest import requires_cuda
from gradsieve.compressor import BucketLayout, ef_select
from gradsieve.memory import BucketMemory


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def reference(residual, grad, k, scale):
    acc = residual.clone()
    values, indices = gradsieve.ef_topk_(acc, grad, k, scale)
    return values, indices, acc, torch.isfinite(grad).all()


def inputs(n, dtype, special, seed=0):
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g)
    if n > 8:
        grad[n // 3: n // 3 + 5] = grad[:5]  # ties
        residual[n // 3: n // 3 + 5] = residual[:5]
        if special:
            grad[n // 2] = float("nan")
            grad[n // 2 + 1] = float("inf")
    return residual, grad.to(dtype)


@pytest.mark.parametrize("n,k", [(0, 0), (1, 0), (1, 1), (1000, 0), (1000, 10), (1000, 1000), (70_001, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("special", [False, True])
def test_matches_ef_topk_on_a_copy(n, k, dtype, special):
    residual, grad = inputs(n, dtype, special)
    before = residual.clone()
    want = reference(residual, grad, k, 0.5)
    out = torch.full((n,), 7.0)
    got = gradsieve.ef_topk_into(out, residual, grad, k, 0.5)
    assert torch.equal(residual, before)  # only read
    assert torch.equal(bits(got[0]), bits(want[0])) and torch.equal(got[1], want[1])
    assert torch.equal(bits(out), bits(want[2]))
    assert got[2].dtype == torch.bool and got[2].shape == () and bool(got[2]) == bool(want[3])


def test_non_contiguous_inputs_and_out_into_a_slice():
    g = torch.Generator().manual_seed(3)
    residual = torch.randn(400, generator=g)[::2]
    grad = torch.randn(200, 2, generator=g)[:, 0]
    big = torch.zeros(300)
    got = gradsieve.ef_topk_into(big[50:250], residual, grad, 20)
    want = reference(residual, grad, 20, 1.0)
    assert torch.equal(got[1], want[1]) and torch.equal(big[50:250], want[2])
    assert torch.equal(big[:50], torch.zeros(50)) and torch.equal(big[250:], torch.zeros(50))


def test_out_may_be_the_residual():
    residual, grad = inputs(500, torch.float32, False)
    want = reference(residual, grad, 9, 1.0)
    got = gradsieve.ef_topk_into(residual, residual, grad, 9)
    assert torch.equal(got[1], want[1]) and torch.equal(residual, want[2])


@pytest.mark.parametrize("call,message", [
    (lambda: gradsieve.ef_topk_into(torch.empty(3, dtype=torch.float64), torch.zeros(3), torch.zeros(3), 1),
     "out must be a float32 tensor, got Double"),
    (lambda: gradsieve.ef_topk_into(torch.empty(4), torch.zeros(3), torch.zeros(3), 1),
     r"out must have as many elements as grad \(3\), got 4"),
    (lambda: gradsieve.ef_topk_into(torch.empty(6)[::2], torch.zeros(3), torch.zeros(3), 1),
     "out must be contiguous"),
    (lambda: gradsieve.ef_topk_into(torch.empty(3), torch.zeros(3), torch.zeros(3), 4),
     "k must be"),
    (lambda: gradsieve.ef_topk_into(torch.empty(3), torch.zeros(3), torch.zeros(3), 1, float("inf")),
     "scale must be finite"),
])
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_opcheck():
    residual, grad = inputs(300, torch.float32, False)
    torch.library.opcheck(torch.ops.gradsieve.ef_topk_into.default, (torch.empty(300), residual, grad, 7, 1.0))


def old_topk_compress(compressor, grad, memory, layout, step):
    """topk's compress as it was: clone the residual, ef_topk_ per segment, isfinite pass."""
    segments = compressor.segments(layout, step)
    fmt = compressor._format(sum(s.k for s in segments), layout.numel)
    finite = torch.isfinite(grad).all()
    residual = memory.entries["residual"].clone()
    indices, values = ef_select(residual, grad, segments, gradsieve.ops)
    payload, sent = fmt.pack(finite, indices, values, None, compressor.traits.ascending)
    if compressor.values != "fp32":
        residual.index_add_(0, indices, values - sent)
    return payload, residual


@pytest.mark.parametrize("options", [{}, {"values": "int8", "index": "csr16"}, {"scope": "layer"},
                                     {"compress_1d": False, "values": "bf16"}])
@pytest.mark.parametrize("nan", [False, True])
def test_topk_compress_is_bit_for_bit_the_old_path(options, nan):
    topk = gradsieve.get_compressor("topk", density=0.05, **options)
    layout = BucketLayout(3 * 300 + 40 + 7, (300, 300, 40, 300, 7), (2, 2, 1, 2, 1), 2)
    g = torch.Generator().manual_seed(5)
    memory = BucketMemory((0, 1, 2, 3, 4), layout.param_numels,
                          {"residual": torch.randn(layout.numel, generator=g)})
    for step in range(3):
        grad = torch.randn(layout.numel, generator=g)
        if nan and step == 1:
            grad[333] = float("nan")
        want_payload, want_residual = old_topk_compress(topk, grad, memory, layout, step)
        got = topk.compress(grad, memory, layout, step)
        assert torch.equal(got.payload, want_payload), step
        assert torch.equal(bits(got.pending["residual"]), bits(want_residual)), step
        memory.entries["residual"] = got.pending["residual"]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("special", [False, True])
def test_cuda_matches_cpu(dtype, special):
    residual, grad = inputs(100_003, dtype, special)
    want = gradsieve.ef_topk_into(torch.empty(100_003), residual, grad, 1000)
    out = torch.empty(100_003, device="cuda")
    got = gradsieve.ef_topk_into(out, residual.cuda(), grad.cuda(), 1000)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(bits(got[0].cpu()), bits(want[0]))
    assert torch.equal(bits(out.cpu()), bits(reference(residual, grad, 1000, 1.0)[2]))
    assert bool(got[2].cpu()) == bool(want[2])


# ------------------------------------------------------------------ the one-read select on the CPU
def sampled_cases():
    """Inputs of 2^18 entries and more (the CPU select's sampled path), with the cases where the
    sample misleads and the full select must run instead."""
    n = 1 << 20
    stride = n // 4096
    g = torch.Generator().manual_seed(9)
    ties = torch.randint(-3, 4, (n,), generator=g).float()  # few distinct magnitudes: ties at the cut
    special = torch.randn(n, generator=g)
    special[::997] = float("nan")
    special[5::1231] = float("inf")
    misled = torch.rand(n, generator=g)
    misled[::stride] = 100.0 + torch.rand(4096, generator=g)  # every sampled key is huge: too few candidates
    flat = torch.full((n,), 0.5)  # every key equal: too many candidates
    return {"normal": torch.randn(n, generator=g), "ties": ties, "special": special, "misled": misled, "flat": flat,
            "odd": torch.randn(n + 12345, generator=g)}


@pytest.mark.parametrize("case", ["normal", "ties", "special", "misled", "flat", "odd"])
@pytest.mark.parametrize("fraction", [0.0001, 0.001, 0.01, 1 / 16])
def test_the_one_read_select_matches_the_reference(case, fraction):
    import reference as ref

    x = sampled_cases()[case]
    k = max(1, int(fraction * x.numel()))
    values, indices = gradsieve.topk_abs(x, k)
    want = torch.from_numpy(ref.topk_indices(x, k))
    assert torch.equal(indices, want), case
    assert torch.equal(values.view(torch.int32), x[want].view(torch.int32))
    out = torch.empty_like(x)
    got = gradsieve.ef_topk_into(out, torch.zeros_like(x), x, k)
    assert torch.equal(got[1], want)

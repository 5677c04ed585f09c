"""The decode kernels' own flags: ``sparse_accumulate_`` and ``regtopk_select_`` given ``bad`` skip
a position outside its range and flag its payload, on the tensors' device, instead of raising (CPU)
or stopping the CUDA context (the kernels used to trap). Without ``bad`` they raise a named error
before writing anything, on CPU and CUDA alike.

Every result is compared with an independent reference: the reference decode of tests/reference.py
(float64, NumPy) over the entries that lie inside, and the flags computed here in plain torch."""

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import gradsieve
import reference as ref
from conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
VALUE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GUARD = 32
SENTINEL = 777.0


def hostile_payloads(n: int, payloads: int, per: int, g: torch.Generator, outside_rate: float):
    """indices int64[payloads * per] in [-2n - 3, 2n + 3), about ``outside_rate`` of them outside."""
    m = payloads * per
    inside = torch.randint(0, max(n, 1), (m,), generator=g)
    wild = torch.randint(-2 * n - 3, 2 * n + 3, (m,), generator=g)
    pick = torch.rand(m, generator=g) < outside_rate
    return torch.where(pick, wild, inside)


def expected_flags(indices: torch.Tensor, n: int, payloads: int) -> torch.Tensor:
    outside = (indices < 0) | (indices >= n)
    return outside.view(payloads, -1).any(dim=1).to(torch.int32) if indices.numel() else \
        torch.zeros(payloads, dtype=torch.int32)


def make_values(m: int, dtype: torch.dtype, g: torch.Generator):
    if dtype == torch.int8:
        chunk = 5
        values = torch.randint(-127, 128, (m,), generator=g, dtype=torch.int8)
        scales = torch.rand(-(-m // chunk), generator=g)
        return values, scales, chunk
    return torch.randn(m, generator=g).to(dtype), None, 0


def guarded(n: int, dtype: torch.dtype, device: str, g: torch.Generator):
    """(big, out): out is the middle n entries of big, the GUARD entries on each side hold SENTINEL."""
    big = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
    big[GUARD:GUARD + n] = torch.randn(n, generator=g).to(dtype)
    big = big.to(device)
    return big, big[GUARD:GUARD + n]


def check_guards(big: torch.Tensor) -> None:
    edge = torch.full((GUARD,), SENTINEL, dtype=big.dtype)
    assert torch.equal(big[:GUARD].cpu(), edge) and torch.equal(big[-GUARD:].cpu(), edge), \
        "sparse_accumulate_ wrote outside out"


# ----------------------------------------------------------------------------- sparse_accumulate_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 3000), payloads=st.integers(1, 5), per=st.integers(0, 400),
       outside_rate=st.sampled_from([0.0, 0.001, 0.05, 0.5, 1.0]), seed=st.integers(0, 2**31))
def test_sparse_accumulate_skips_and_flags_each_payload(device, values_dtype, out_dtype, index_dtype, n,
                                                         payloads, per, outside_rate, seed):
    g = torch.Generator().manual_seed(seed)
    indices = hostile_payloads(n, payloads, per, g, outside_rate).to(index_dtype)
    values, scales, chunk = make_values(indices.numel(), values_dtype, g)
    big, out = guarded(n, out_dtype, device, g)
    before = out.cpu().clone()
    bad = torch.zeros(payloads, dtype=torch.int32, device=device)
    gradsieve.sparse_accumulate_(out, indices.to(device), values.to(device),
                                 None if scales is None else scales.to(device), chunk, bad=bad)
    check_guards(big)
    assert bad.cpu().tolist() == expected_flags(indices.long(), n, payloads).tolist()
    # The entries inside, added by the float64 reference.
    keep = ((indices >= 0) & (indices < n)).numpy()
    v = values.double() if scales is None else \
        values.double() * scales.double().repeat_interleave(chunk)[:indices.numel()]
    want = ref.as_float64(before).copy()
    np.add.at(want, indices.long().numpy()[keep], v.numpy()[keep])
    # Each addend is rounded to out's dtype, then every sum: a few roundings of what met there.
    magnitude = np.abs(ref.as_float64(before)).copy()
    np.add.at(magnitude, indices.long().numpy()[keep], np.abs(v.numpy()[keep]))
    hits = np.zeros(n)
    np.add.at(hits, indices.long().numpy()[keep], 1.0)
    eps = torch.finfo(out_dtype).eps
    got = ref.as_float64(out.cpu())
    assert np.all(np.abs(got - want) <= 2 * eps * (hits + 1) * magnitude + 1e-30)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_accumulate_flags_add_to_what_is_there(device):
    """The op only ever sets flags: one already set stays set, one clear stays clear when its
    payload is fine (the caller zero-fills; several decodes may share one flag tensor)."""
    out = torch.zeros(6, device=device)
    bad = torch.tensor([1, 0, 0], dtype=torch.int32, device=device)
    indices = torch.tensor([0, 1, 2, 3, 6, 5], device=device)
    gradsieve.sparse_accumulate_(out, indices, torch.ones(6, device=device), bad=bad)
    assert bad.cpu().tolist() == [1, 0, 1]
    assert out.cpu().tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("indices, position, value", [([0, 10, 3], 1, 10), ([9, 0, -1], 2, -1),
                                                      ([5, 2**31 - 1], 1, 2**31 - 1)])
def test_sparse_accumulate_without_flags_raises_before_writing(device, index_dtype, indices, position, value):
    """On CUDA this used to stop the context with a device-side trap; now it is the CPU's error, and
    the device stays usable."""
    out = torch.arange(10, dtype=torch.float32, device=device)
    idx = torch.tensor(indices, dtype=index_dtype, device=device)
    with pytest.raises(RuntimeError, match=re.escape(
            f"gradsieve.sparse_accumulate_: indices must lie in [0, 10) (out.numel()), "
            f"got indices[{position}] = {value}")):
        gradsieve.sparse_accumulate_(out, idx, torch.ones(len(indices), device=device))
    assert out.cpu().tolist() == list(range(10))
    gradsieve.sparse_accumulate_(out, torch.tensor([1], device=device), torch.ones(1, device=device))
    assert out.cpu().tolist()[1] == 2.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make_bad, message", [
    (lambda d: torch.zeros(2, device=d), "bad must be an int32 tensor (one flag per payload), got Float"),
    (lambda d: torch.zeros(4, dtype=torch.int32, device=d)[::2], "bad must be contiguous"),
    (lambda d: torch.zeros(0, dtype=torch.int32, device=d), "bad must have at least one element, got 0"),
    (lambda d: torch.zeros(4, dtype=torch.int32, device=d),
     "bad.numel() (4) must divide the number of indices (6)"),
])
def test_sparse_accumulate_bad_is_checked_by_name(device, make_bad, message):
    with pytest.raises(RuntimeError, match=re.escape(f"gradsieve.sparse_accumulate_: {message}")):
        gradsieve.sparse_accumulate_(torch.zeros(8, device=device), torch.arange(6, device=device),
                                     torch.ones(6, device=device), bad=make_bad(device))


@requires_cuda
def test_sparse_accumulate_bad_on_another_device_is_named():
    with pytest.raises(RuntimeError, match=r"gradsieve.sparse_accumulate_: bad .*device"):
        gradsieve.sparse_accumulate_(torch.zeros(8, device="cuda"), torch.arange(6, device="cuda"),
                                     torch.ones(6, device="cuda"), bad=torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int8", [False, True])
def test_sparse_accumulate_opcheck_with_flags(device, int8):
    g = torch.Generator().manual_seed(3)
    indices = hostile_payloads(50, 3, 20, g, 0.1).to(device)
    values, scales, chunk = make_values(60, torch.int8 if int8 else torch.float32, g)
    opcheck(torch.ops.gradsieve.sparse_accumulate_.default,
            (torch.zeros(50, device=device), indices, values.to(device),
             None if scales is None else scales.to(device), chunk,
             torch.zeros(3, dtype=torch.int32, device=device)))


@requires_cuda
@pytest.mark.parametrize("values_dtype", VALUE_DTYPES, ids=str)
def test_sparse_accumulate_flags_cpu_cuda_parity(values_dtype):
    g = torch.Generator().manual_seed(11)
    indices = hostile_payloads(5000, 4, 3000, g, 0.01)
    values, scales, chunk = make_values(indices.numel(), values_dtype, g)
    results = {}
    for device in ("cpu", "cuda"):
        out = torch.zeros(5000, device=device)
        bad = torch.zeros(4, dtype=torch.int32, device=device)
        gradsieve.sparse_accumulate_(out, indices.to(device), values.to(device),
                                     None if scales is None else scales.to(device), chunk, bad=bad)
        results[device] = (out.cpu(), bad.cpu())
    assert torch.equal(results["cpu"][1], results["cuda"][1])
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- regtopk_select_
def regtopk_case(n: int, m: int, g: torch.Generator, outside_rate: float):
    grad = torch.randn(n, generator=g)
    residual = torch.randn(n, generator=g)
    prev = hostile_payloads(n, 1, m, g, outside_rate)
    sent = torch.randn(m, generator=g)
    agg = torch.randn(m, generator=g) * (torch.rand(m, generator=g) < 0.8)
    return residual, grad, prev, sent, agg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 2000), m=st.integers(0, 300), k_frac=st.floats(0.0, 1.0),
       outside_rate=st.sampled_from([0.0, 0.01, 0.3, 1.0]), seed=st.integers(0, 2**31))
def test_regtopk_select_skips_and_flags_outside_previous_positions(device, index_dtype, n, m, k_frac,
                                                                    outside_rate, seed):
    """With flags, an outside previous position is as if it had not been listed: the result equals
    the op's result with it removed (whose own correctness tests/test_regtopk.py checks against its
    float64 reference), and the flag says whether one was there."""
    g = torch.Generator().manual_seed(seed)
    residual, grad, prev, sent, agg = regtopk_case(n, m, g, outside_rate)
    k = int(k_frac * n)
    inside = (prev >= 0) & (prev < n)
    want_residual = residual.clone()
    want_v, want_i = gradsieve.regtopk_select_(want_residual, grad, prev[inside], sent[inside], agg[inside],
                                               2.0, k, 4)
    got_residual = residual.to(device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    got_v, got_i = gradsieve.regtopk_select_(got_residual, grad.to(device), prev.to(index_dtype).to(device),
                                             sent.to(device), agg.to(device), 2.0, k, 4, bad=bad)
    assert bad.cpu().tolist() == [int(not bool(inside.all()))]
    assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_v.cpu(), want_v)
    assert torch.equal(got_residual.cpu(), want_residual)


@pytest.mark.parametrize("device", DEVICES)
def test_regtopk_select_without_flags_raises_before_writing(device):
    residual = torch.zeros(10, device=device)
    with pytest.raises(RuntimeError, match=re.escape(
            "gradsieve.regtopk_select_: prev_indices must lie in [0, 10) (grad.numel()), "
            "got prev_indices[1] = 12")):
        gradsieve.regtopk_select_(residual, torch.ones(10, device=device),
                                  torch.tensor([3, 12], device=device), torch.ones(2, device=device),
                                  torch.ones(2, device=device), 1.0, 2, 2)
    assert residual.cpu().tolist() == [0.0] * 10
    gradsieve.regtopk_select_(residual, torch.ones(10, device=device), torch.tensor([3], device=device),
                              torch.ones(1, device=device), torch.ones(1, device=device), 1.0, 2, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_regtopk_select_bad_is_checked_by_name(device):
    z = lambda: torch.zeros(4, device=device)  # noqa: E731
    with pytest.raises(RuntimeError, match=re.escape(
            "gradsieve.regtopk_select_: bad.numel() (3) must divide the number of prev_indices (4)")):
        gradsieve.regtopk_select_(torch.zeros(8, device=device), torch.ones(8, device=device),
                                  torch.arange(4, device=device), z(), z(), 1.0, 2, 2,
                                  bad=torch.zeros(3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_regtopk_select_opcheck_with_flags(device):
    residual, grad, prev, sent, agg = regtopk_case(40, 12, torch.Generator().manual_seed(5), 0.2)
    opcheck(torch.ops.gradsieve.regtopk_select_.default,
            (residual.to(device), grad.to(device), prev.to(device), sent.to(device), agg.to(device),
             2.0, 7, 3, None, torch.zeros(1, dtype=torch.int32, device=device)))


# ----------------------------------------------------------------------------- the compressor
def test_regtopk_memory_with_outside_positions_is_counted_and_heals():
    """A corrupted memory (positions outside the bucket, as a damaged checkpoint would hold) is not
    an error in the middle of training: those entries are scored as not sent, the counter
    ``prev_outside`` (in stats()) counts the step, and the step's commit replaces the memory with
    valid positions."""
    sim = gradsieve.Simulator("regtopk", world_size=2, density=0.1)
    g = torch.Generator().manual_seed(0)
    grads = lambda: [torch.randn(500, generator=g) for _ in range(2)]  # noqa: E731
    sim.step(grads())
    memory = sim.banks[0].buckets[0]
    memory.extra["prev_indices"] = memory.extra["prev_indices"].clone()
    memory.extra["prev_indices"][3] = 10_000
    assert int(memory.counters["prev_outside"]) == 0
    sim.step(grads())
    assert int(memory.counters["prev_outside"]) == 1
    assert bool(((memory.extra["prev_indices"] >= 0) & (memory.extra["prev_indices"] < 500)).all())

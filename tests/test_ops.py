"""Correctness of the gradsieve ops against the independent references in reference.py."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradsieve
import reference
from conftest import DTYPES, devices, make_input

SIZES = [0, 1, 2, 3, 17, 1000, 4097, 65537, 200_003]
KINDS = ["normal", "ties", "special"]
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
property_sizes = st.sampled_from([0, 1, 2, 5, 31, 257, 4096, 4099, 65536, 65537, 131_101, 1_048_583])


def pick_k(n, frac):
    return min(n, max(0, int(round(frac * n))))


# ---------------------------------------------------------------------------------------- topk_abs
def check_topk(x, k):
    values, indices = gradsieve.topk_abs(x, k)
    expected = reference.topk_indices(x, k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    assert values.shape == (k,) and indices.shape == (k,)
    np.testing.assert_array_equal(indices.cpu().numpy(), expected)
    torch.testing.assert_close(values.cpu(), x.reshape(-1).cpu()[indices.cpu()], equal_nan=True,
                               rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_topk_abs_matches_reference(n, kind, dtype, device):
    x = make_input(n, dtype, device, kind, seed=n)
    for frac in (0.0, 0.001, 0.01, 0.5, 1.0):
        check_topk(x, pick_k(n, frac))


@PROPERTY
@given(n=property_sizes, frac=st.floats(0, 1), kind=st.sampled_from(KINDS),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_topk_abs_property(n, frac, kind, dtype, seed):
    check_topk(make_input(n, dtype, "cpu", kind, seed), pick_k(n, frac))


def test_topk_abs_few_million():
    x = make_input(3_000_001, torch.float32, "cpu", "special", seed=7)
    check_topk(x, 3000)


def test_topk_abs_tie_rule_and_nan():
    x = torch.tensor([1.0, -2.0, 2.0, float("nan"), -0.0, 2.0, float("-inf")])
    values, indices = gradsieve.topk_abs(x, 4)
    assert indices.tolist() == [1, 2, 3, 6]  # NaN, -inf, then the first two of the three 2s
    assert values[0] == -2.0 and math.isnan(values[2]) and values[3] == float("-inf")
    _, indices = gradsieve.topk_abs(torch.tensor([0.0, -0.0, 0.0]), 2)
    assert indices.tolist() == [0, 1]


def test_topk_abs_any_shape_and_non_contiguous():
    base = torch.randn(64, 33)
    x = base[:, ::2]  # non-contiguous
    assert not x.is_contiguous()
    check_topk(x, 40)
    check_topk(base.t(), 100)
    check_topk(torch.tensor(3.5), 1)  # 0-d


# ------------------------------------------------------------------------------------ quantile_abs
def check_quantile(x, q):
    got = gradsieve.quantile_abs(x, q)
    want = reference.quantile_abs(x, q)
    assert got.dim() == 0 and got.dtype == x.dtype and got.device == x.device
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_quantile_abs_matches_torch_quantile(n, kind, dtype, device):
    x = make_input(n, dtype, device, kind, seed=n + 1)
    for q in (0.0, 0.001, 0.25, 0.5, 0.99, 0.999, 1.0):
        check_quantile(x, q)


@PROPERTY
@given(n=property_sizes, q=st.floats(0, 1), kind=st.sampled_from(KINDS),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_quantile_abs_property(n, q, kind, dtype, seed):
    check_quantile(make_input(n, dtype, "cpu", kind, seed), q)


def test_quantile_abs_non_contiguous_and_empty():
    x = torch.randn(50, 40)[::3, 1::2]
    check_quantile(x, 0.9)
    assert math.isnan(gradsieve.quantile_abs(torch.empty(0), 0.5).item())


# -------------------------------------------------------------------------------------- ef_topk_
def check_ef_topk(n, k, grad_dtype, scale, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(n, generator=g).to(device)
    grad = torch.randn(n, generator=g).to(grad_dtype).to(device)
    old = residual.clone()
    values, indices = gradsieve.ef_topk_(residual, grad, k, scale)
    acc = old + scale * grad.float()  # the eager reference (two roundings)
    np.testing.assert_array_equal(indices.cpu().numpy(), reference.topk_indices(acc, k))
    assert values.dtype == torch.float32
    expected_residual = acc.clone()
    expected_residual[indices] = 0.0
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(values, acc[indices], rtol=0, atol=0)
    # The invariant, exactly: new residual + scatter(values) == old residual + scale * grad.
    rebuilt = residual.clone()
    rebuilt[indices] += values
    assert torch.equal(rebuilt, acc)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 3, 1000, 65537, 300_007])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 1.0])
@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_ef_topk_matches_eager_reference(n, frac, grad_dtype, scale, device):
    check_ef_topk(n, pick_k(n, frac), grad_dtype, scale, seed=n, device=device)


@PROPERTY
@given(n=property_sizes, frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES),
       scale=st.sampled_from([1.0, 0.5, -2.0, 1e-3]), seed=st.integers(0, 2**16))
def test_ef_topk_property(n, frac, dtype, scale, seed):
    check_ef_topk(n, pick_k(n, frac), dtype, scale, seed)


def test_ef_topk_non_contiguous_residual_and_grad():
    residual_base = torch.zeros(40, 20)
    residual = residual_base[:, ::2]
    grad = torch.randn(20, 40).t()[:, ::2]
    values, indices = gradsieve.ef_topk_(residual, grad, 25)
    acc = grad.reshape(-1)
    np.testing.assert_array_equal(indices.numpy(), reference.topk_indices(acc, 25))
    assert torch.count_nonzero(residual) == residual.numel() - 25
    assert torch.equal(residual_base[:, 1::2], torch.zeros(40, 10))  # untouched columns


def test_ef_topk_nan_grad_is_visible():
    residual = torch.zeros(5)
    values, indices = gradsieve.ef_topk_(residual, torch.tensor([1.0, float("nan"), 0.5, 2, 0]), 1)
    assert indices.tolist() == [1] and math.isnan(values.item())


# ------------------------------------------------------------------------------- threshold_select
def check_threshold(x, threshold, capacity):
    t = torch.tensor(threshold, device=x.device)  # float32: the reference sees the same rounding
    values, indices, count = gradsieve.threshold_select(x, t, capacity)
    want_v, want_i, want_c = reference.threshold_select(x, t.item(), capacity)
    assert count.dim() == 0 and count.dtype == torch.int64 and int(count) == want_c
    np.testing.assert_array_equal(indices.cpu().numpy(), want_i)
    np.testing.assert_array_equal(values.cpu().double().numpy(), want_v)
    assert values.dtype == x.dtype and values.shape == (capacity,)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_threshold_select_matches_reference(n, kind, dtype, device):
    x = make_input(n, dtype, device, kind, seed=n + 2)
    for threshold in (-1.0, 0.0, 0.5, 1.0, 2.5, 1e9, float("nan")):
        for capacity in (0, 1, max(1, n // 100), n // 2 + 1, n + 5):
            check_threshold(x, threshold, capacity)


@PROPERTY
@given(n=property_sizes, threshold=st.floats(-1, 4), cap_frac=st.floats(0, 1.2),
       kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_threshold_select_property(n, threshold, cap_frac, kind, dtype, seed):
    check_threshold(make_input(n, dtype, "cpu", kind, seed), threshold, int(cap_frac * n))


def test_threshold_select_overflow_keeps_largest():
    x = torch.tensor([3.0, -1.0, 5.0, 2.0, -5.0, 0.5])
    values, indices, count = gradsieve.threshold_select(x, torch.tensor(1.0), 3)
    assert int(count) == 5  # more passed than fit: the caller can see the overflow
    assert indices.tolist() == [0, 2, 4] and values.tolist() == [3.0, 5.0, -5.0]


# --------------------------------------------------------------------------- quantize/dequantize
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 65537])
@pytest.mark.parametrize("chunk", [1, 3, 256, 4096])
def test_quantize_int8_round_to_nearest(n, chunk, dtype, device):
    x = make_input(n, dtype, device, "normal", seed=n + chunk)
    q, scales = gradsieve.quantize_int8(x, chunk)
    want_q, want_scales = reference.quantize_int8(x.cpu(), chunk)
    assert q.dtype == torch.int8 and q.shape == x.shape and scales.dtype == torch.float32
    torch.testing.assert_close(scales.cpu(), want_scales, rtol=0, atol=0)
    assert torch.equal(q.cpu(), want_q)
    assert int(q.abs().max()) <= 127 if n else True
    restored = gradsieve.dequantize_int8(q, scales, chunk, torch.float32)
    step = scales.repeat_interleave(chunk)[:n].cpu()
    err = (x.float().reshape(-1) - restored.reshape(-1)).abs().cpu()
    # scale / 2, plus the float32 rounding of x / scale and q * scale (up to 127 steps: ~1e-5).
    assert bool((err <= step * (0.5 + 2e-5)).all())


def test_quantize_int8_zero_and_nonfinite_chunks():
    x = torch.tensor([0.0, 0.0, 1.0, float("inf"), float("nan"), 2.0, 4.0, -4.0])
    q, scales = gradsieve.quantize_int8(x, 2)
    assert scales[0] == 0 and q[:2].tolist() == [0, 0]
    assert math.isnan(scales[1]) and math.isnan(scales[2])  # non-finite chunks stay visible
    assert q[6:].tolist() == [127, -127]
    restored = gradsieve.dequantize_int8(q, scales, 2)
    assert restored[:2].tolist() == [0.0, 0.0] and torch.isnan(restored[2:6]).all()


def test_quantize_int8_stochastic_unbiased_and_reproducible():
    x = torch.randn(4096)
    q1, s1 = gradsieve.quantize_int8(x, 512, True, torch.Generator().manual_seed(11))
    q2, s2 = gradsieve.quantize_int8(x, 512, True, torch.Generator().manual_seed(11))
    q3, _ = gradsieve.quantize_int8(x, 512, True, torch.Generator().manual_seed(12))
    assert torch.equal(q1, q2) and torch.equal(s1, s2) and not torch.equal(q1, q3)
    gen = torch.Generator().manual_seed(0)
    trials = 400
    total = torch.zeros_like(x)
    for _ in range(trials):
        q, s = gradsieve.quantize_int8(x, 512, True, gen)
        total += gradsieve.dequantize_int8(q, s, 512)
    mean = total / trials
    step = s1.repeat_interleave(512)
    # Each draw's error is within one step and has mean 0: the average of 400 draws is within
    # 5 standard errors (step / 2 / sqrt(400) bounds the standard deviation) of x.
    assert bool(((mean - x).abs() <= 5 * step / 2 / math.sqrt(trials) + 1e-7).all())
    floor_err = (gradsieve.dequantize_int8(q1, s1, 512) - x).abs()
    assert bool((floor_err <= step * (1 + 1e-6)).all())


def test_dequantize_dtypes_and_shape():
    x = torch.randn(6, 5)
    q, s = gradsieve.quantize_int8(x, 4)
    for dtype in DTYPES:
        out = gradsieve.dequantize_int8(q, s, 4, dtype)
        assert out.dtype == dtype and out.shape == (6, 5)


# ---------------------------------------------------------------------------- sparse_accumulate_
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("m", [0, 1, 100, 50_000])
def test_sparse_accumulate_float_payloads(m, index_dtype, out_dtype, device):
    g = torch.Generator().manual_seed(m)
    out = torch.randn(1000, generator=g).to(out_dtype).to(device)
    indices = torch.randint(0, 1000, (m,), generator=g).to(index_dtype).to(device)  # duplicates
    values = torch.randn(m, generator=g).to(device)
    want = reference.sparse_accumulate(out, indices, values)
    gradsieve.sparse_accumulate_(out, indices, values)
    tol = 1e-4 if out_dtype == torch.float32 else 0.1 + 0.02 * math.sqrt(max(m, 1))
    np.testing.assert_allclose(reference.as_float64(out), want, atol=tol, rtol=1e-2)


def test_sparse_accumulate_is_exact_and_ordered_on_cpu():
    out = torch.zeros(10, dtype=torch.float64).float()
    indices = torch.tensor([3, 3, 3, 9, 0], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 4.0, -1.0, 0.5])
    gradsieve.sparse_accumulate_(out, indices, values)
    assert out.tolist() == [0.5, 0, 0, 7.0, 0, 0, 0, 0, 0, -1.0]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_sparse_accumulate_int8_payload_decodes(device, chunk):
    # The expectation is NumPy's: entry j of the payload adds float32(q[j]) * scales[j // chunk]
    # at indices[j] (distinct here, so the sum is that one product), the chunk counted in payload
    # positions, the last one partial (3000 entries).
    m, n = 3000, 100_000
    g = torch.Generator().manual_seed(chunk)
    indices = torch.randperm(n, generator=g)[:m]
    # Codes and scales drawn directly (not made by a quantizer): the decode alone is under test,
    # with scales of many magnitudes, so a code read with the wrong chunk's scale shows.
    q = torch.randint(-127, 128, (m,), generator=g).to(torch.int8)
    scales = torch.rand(-(-m // chunk), generator=g) * torch.exp2(
        torch.randint(-20, 20, (-(-m // chunk),), generator=g).float())
    out = torch.zeros(n, device=device)
    gradsieve.sparse_accumulate_(out, indices.to(device), q.to(device), scales.to(device), chunk)
    want = np.zeros(n, np.float32)
    want[indices.numpy()] = reference.decode_int8(q, scales, chunk)
    np.testing.assert_array_equal(out.cpu().numpy(), want)

    # A quantized payload (gradsieve's quantize_int8) decodes to its codes times their scales, and
    # within half a step (max |x| / 127 of the chunk, from NumPy) of the values quantized.
    x = torch.randn(m, generator=g) * torch.exp2(torch.randint(-8, 8, (m,), generator=g).float())
    q, scales = gradsieve.quantize_int8(x.to(device), chunk)
    out = torch.zeros(n, device=device)
    gradsieve.sparse_accumulate_(out, indices.to(device), q, scales, chunk)
    decoded = out.cpu().numpy()[indices.numpy()]
    np.testing.assert_array_equal(decoded, reference.decode_int8(q, scales, chunk))
    a = x.numpy()
    padded = np.zeros(-(-m // chunk) * chunk, np.float32)
    padded[:m] = np.abs(a)
    step = (padded.reshape(-1, chunk).max(axis=1) / np.float32(127))[np.arange(m) // chunk]
    assert (np.abs(decoded.astype(np.float64) - a) <= step.astype(np.float64) / 2 * (1 + 1e-6)).all()
    assert np.count_nonzero(out.cpu().numpy()) == np.count_nonzero(decoded)  # nothing elsewhere


def test_sparse_accumulate_large_payload_parallel_path_matches_serial():
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 5000, (200_000,), generator=g)
    values = torch.randn(200_000, generator=g)
    out = torch.zeros(5000)
    gradsieve.sparse_accumulate_(out, indices, values)
    serial = torch.zeros(5000)
    for lo in range(0, 200_000, 20_000):  # below the parallel threshold: the sequential loop
        gradsieve.sparse_accumulate_(serial, indices[lo:lo + 20_000], values[lo:lo + 20_000])
    np.testing.assert_allclose(out.numpy(), reference.sparse_accumulate(torch.zeros(5000), indices,
                                                                        values), atol=1e-3)
    np.testing.assert_allclose(out.numpy(), serial.numpy(), atol=1e-3)


def test_sparse_accumulate_non_contiguous_out():
    base = torch.zeros(10, 4)
    out = base[:, 1]
    gradsieve.sparse_accumulate_(out, torch.tensor([0, 9, 9]), torch.tensor([1.0, 2.0, 3.0]))
    assert base[:, 1].tolist() == [1.0] + [0.0] * 8 + [5.0]
    assert base[:, [0, 2, 3]].abs().sum() == 0

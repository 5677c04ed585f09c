"""RegTop-k (arXiv 2409.14893): the fused op ``regtopk_select_`` and the ``regtopk`` compressor.

1. the op against an independent NumPy reference (score in float64, stable tie-break), its edge
   cases, hypothesis properties, argument errors, opcheck, torch.compile, CUDA (skipped without a
   GPU) and CPU/CUDA parity;
2. the compressor in the simulator (tiny mu is top-k exactly, error-feedback bookkeeping, the
   paper's two-worker example, bucket reorders, skipped non-finite steps, wire rounding);
3. the compressor in the DDP hook on 2 gloo workers (hook == simulator, checkpoint restore).
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from conftest import DTYPES, HAS_CUDA, devices, make_input, requires_cuda
from distributed import recording_hook, run_workers
from gradsieve.compressor import BucketLayout
from gradsieve.memory import MemoryBank

OP = torch.ops.gradsieve.regtopk_select_
# Meta kernels raise on purpose in these tests; FakeTensor would log a stack trace for each.
pytestmark = pytest.mark.usefixtures("quiet_fake_tensor_log")
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Two float32 roundings (the weight, then the product) separate the op's score from the float64
# reference: entries whose float64 scores are this close to the cut may be swapped.
NEAR_TIE_RTOL = 1e-6


# =============================================================================== reference
def reference_scores(residual, grad, prev_indices, prev_sent, prev_agg, mu, world_size, q=None):
    """The accumulated gradient (float32, as eager torch computes residual + grad) and the
    RegTop-k score of every entry in float64, written from the paper's formula."""
    a = residual.detach().reshape(-1).cpu().float() + grad.detach().reshape(-1).cpu().float()
    a64 = a.double().numpy()
    idx = prev_indices.reshape(-1).cpu().numpy().astype(np.int64)
    sent = prev_sent.reshape(-1).cpu().double().numpy()
    agg = prev_agg.reshape(-1).cpu().double().numpy()
    unsent = 1.0 if q is None else math.tanh(abs(1.0 + q) / mu)
    with np.errstate(all="ignore"):
        ratio = agg / (sent / world_size)  # 1 + Delta = g_agg / (omega * sent)
        known = (sent != 0) & ~np.isnan(ratio)
        weight = np.where(known, np.tanh(np.abs(ratio) / mu), unsent)
        score = unsent * np.abs(a64)
        listed = weight * np.abs(a64[idx])
    # An index listed twice keeps its lower score (NaN counts as the largest): fmin skips NaN.
    score[idx] = np.nan
    np.fmin.at(score, idx, listed)
    return a, score


def reference_order(score):
    """All indices, best first: NaN first, then by score descending, the lower index first."""
    nan = np.isnan(score)
    return np.lexsort((np.arange(score.size), -np.where(nan, 0.0, score), ~nan))


def check_op(residual, grad, prev_indices, prev_sent, prev_agg, mu, k, world_size, q=None):
    """Runs the op on copies and checks it against the reference; returns (values, indices)."""
    a, score = reference_scores(residual, grad, prev_indices, prev_sent, prev_agg, mu, world_size, q)
    res = residual.clone()
    values, indices = gradsieve.regtopk_select_(res, grad, prev_indices, prev_sent, prev_agg, mu,
                                                k, world_size, q)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == (k,) and indices.shape == (k,) and values.device == grad.device
    got = indices.cpu().numpy()
    assert np.all(np.diff(got) > 0), "indices ascending and distinct"
    want = np.sort(reference_order(score)[:k])
    if not np.array_equal(got, want):
        cut = score[reference_order(score)[k - 1]]
        swapped = np.setxor1d(got, want)
        assert np.isfinite(cut) and np.allclose(score[swapped], cut, rtol=NEAR_TIE_RTOL, atol=0), \
            f"selection differs from the reference beyond near-ties: {swapped[:10]}"
    # Exact bookkeeping on what was chosen: a's values, the residual keeps the rest.
    torch.testing.assert_close(values.cpu(), a[indices.cpu()], rtol=0, atol=0, equal_nan=True)
    expected = a.clone()
    expected[indices.cpu()] = 0.0
    torch.testing.assert_close(res.reshape(-1).cpu(), expected, rtol=0, atol=0, equal_nan=True)
    return values, indices


def make_case(n, dtype=torch.float32, m_frac=0.1, seed=0, kind="normal", device="cpu",
              index_dtype=torch.int64, duplicates=False):
    """(residual, grad, prev_indices, prev_sent, prev_agg): grad from conftest.make_input; among the
    previous entries some were sent as 0, some cancelled (agg 0), some aggregated to exactly what
    was sent (ratio world_size)."""
    g = torch.Generator().manual_seed(seed + 17)
    grad = make_input(n, dtype, "cpu", kind, seed)
    residual = torch.randn(n, generator=g)
    m = min(n, int(round(m_frac * n)))
    if duplicates and n:
        idx = torch.randint(0, n, (m,), generator=g)
    else:
        idx = torch.randperm(n, generator=g)[:m]
    sent = torch.randn(m, generator=g)
    agg = torch.randn(m, generator=g) * 0.3
    sent[::7] = 0.0
    agg[3::11] = 0.0
    agg[5::13] = sent[5::13]
    return tuple(t.to(device) for t in (residual, grad, idx.to(index_dtype), sent, agg))


def empty_previous(device="cpu"):
    return (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device),
            torch.empty(0, device=device))


def pick_k(n, frac):
    return min(n, max(0, int(round(frac * n))))


# =============================================================================== 1 the op
SIZES = [0, 1, 2, 17, 1001, 65537, 200_003]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, dtype, device):
    case = make_case(n, dtype, seed=n, device=device)
    for frac, mu, world, q in ((0.0, 1.0, 2, None), (0.01, 4.0, 8, None), (0.3, 0.5, 3, 1e8),
                               (1.0, 2.0, 1, 0.5)):
        check_op(*case, mu, pick_k(n, frac), world, q)


@PROPERTY
@given(n=st.sampled_from([0, 1, 2, 5, 31, 257, 4099, 65537, 131_101, 1_048_583]),
       k_frac=st.floats(0, 1), m_frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(["normal", "ties", "special"]),
       mu=st.sampled_from([1e-6, 0.25, 1.0, 4.0, 100.0]), world=st.sampled_from([1, 2, 7]),
       q=st.sampled_from([None, 0.0, 0.5, 1e8, math.inf]),
       index_dtype=st.sampled_from([torch.int32, torch.int64]), duplicates=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property(n, k_frac, m_frac, dtype, kind, mu, world, q, index_dtype, duplicates, seed):
    case = make_case(n, dtype, m_frac, seed, kind, index_dtype=index_dtype, duplicates=duplicates)
    check_op(*case, mu, pick_k(n, k_frac), world, q)


def test_weight_formula_and_world_size():
    # Entry 0 was sent as 1.0 last step; entry 1 (|a| = 0.8) was not sent.
    # world 2, agg 0.5: 1 + Delta = 0.5 / (1.0 / 2) = 1, weight tanh(1) = 0.76: entry 1 wins.
    grad = torch.tensor([1.0, 0.8, 0.1])
    prev = (torch.tensor([0]), torch.tensor([1.0]))
    _, idx = gradsieve.regtopk_select_(torch.zeros(3), grad, *prev, torch.tensor([0.5]), 1.0, 1, 2)
    assert idx.tolist() == [1]
    # agg 1.0: 1 + Delta = 2, weight tanh(2) = 0.96: entry 0 wins.
    _, idx = gradsieve.regtopk_select_(torch.zeros(3), grad, *prev, torch.tensor([1.0]), 1.0, 1, 2)
    assert idx.tolist() == [0]
    # world 4, agg 0.5: 1 + Delta = 2 again.
    _, idx = gradsieve.regtopk_select_(torch.zeros(3), grad, *prev, torch.tensor([0.5]), 1.0, 1, 4)
    assert idx.tolist() == [0]
    # A larger mu flattens the weights: tanh(2 / 4) = 0.46 loses to 0.8 again.
    _, idx = gradsieve.regtopk_select_(torch.zeros(3), grad, *prev, torch.tensor([1.0]), 4.0, 1, 2)
    assert idx.tolist() == [1]
    # The sign of the ratio does not matter (|1 + Delta|).
    _, idx = gradsieve.regtopk_select_(torch.zeros(3), grad, *prev, torch.tensor([-1.0]), 1.0, 1, 2)
    assert idx.tolist() == [0]


def test_cancelled_entry_gets_weight_zero_and_values_are_unchanged():
    residual = torch.tensor([0.0, 0.25, 0.0, 0.0])
    grad = torch.tensor([3.0, -2.0, 0.5, 1.0])
    values, indices = gradsieve.regtopk_select_(residual, grad, torch.tensor([0]),
                                                torch.tensor([3.0]), torch.tensor([0.0]),
                                                1e-3, 3, 2)
    assert indices.tolist() == [1, 2, 3]  # entry 0 scores 0: even 0.5 beats it
    assert values.tolist() == [-1.75, 0.5, 1.0]  # a's values, not the scores
    assert residual.tolist() == [3.0, 0.0, 0.0, 0.0]


def test_first_step_and_tiny_mu_are_plain_topk():
    for n, k in ((1, 1), (1001, 10), (65537, 500)):
        residual, grad, idx, sent, agg = make_case(n, seed=n, m_frac=0.2)
        agg = torch.where(agg == 0, torch.full_like(agg, 0.1), agg)  # tanh(0 / mu) stays 0
        expected_residual = residual.clone()
        want_v, want_i = gradsieve.ef_topk_(expected_residual, grad, k)
        for previous, mu in ((empty_previous(), 3.0), ((idx, sent, agg), 1e-30),
                             ((idx.int(), sent, agg), 1e-12)):
            res = residual.clone()
            values, indices = gradsieve.regtopk_select_(res, grad, *previous, mu, k, 4)
            assert torch.equal(indices, want_i) and torch.equal(values, want_v)
            assert torch.equal(res, expected_residual)


def test_zero_sent_nan_ratio_and_infinite_ratio():
    grad = torch.tensor([1.0, 0.9, 0.8, 0.7])
    # Sent as 0 (agg 0 too: 0 / 0): counts as not sent, weight 1, entry 0 keeps its rank.
    _, idx = gradsieve.regtopk_select_(torch.zeros(4), grad, torch.tensor([0]), torch.tensor([0.0]),
                                       torch.tensor([0.0]), 1.0, 1, 2)
    assert idx.tolist() == [0]
    # inf / inf: NaN ratio, counts as not sent.
    inf = torch.tensor([math.inf])
    _, idx = gradsieve.regtopk_select_(torch.zeros(4), grad, torch.tensor([0]), inf, inf, 1.0, 1, 2)
    assert idx.tolist() == [0]
    # Sent tiny (a subnormal), agg 1: the ratio overflows to inf, tanh(inf) = 1.
    _, idx = gradsieve.regtopk_select_(torch.zeros(4), grad, torch.tensor([0]),
                                       torch.tensor([1e-45]), torch.tensor([1.0]), 1e-3, 1, 2)
    assert idx.tolist() == [0]
    # A NaN agg counts as not sent too (no NaN score from the weight).
    _, idx = gradsieve.regtopk_select_(torch.zeros(4), grad, torch.tensor([0]), torch.tensor([1.0]),
                                       torch.tensor([math.nan]), 1.0, 1, 2)
    assert idx.tolist() == [0]


def test_q_sets_the_weight_of_unsent_entries():
    grad = torch.tensor([1.0, 0.9])
    prev = (torch.tensor([1]), torch.tensor([1.0]), torch.tensor([100.0]))  # weight 1
    # q None (or inf or huge): entry 0 weighs 1 and wins.
    for q in (None, math.inf, 1e8):
        _, idx = gradsieve.regtopk_select_(torch.zeros(2), grad, *prev, 1.0, 1, 2, q)
        assert idx.tolist() == [0], q
    # q = 0: entry 0 weighs tanh(1) = 0.76, 0.76 < 0.9: entry 1 wins.
    _, idx = gradsieve.regtopk_select_(torch.zeros(2), grad, *prev, 1.0, 1, 2, 0.0)
    assert idx.tolist() == [1]


def test_duplicate_previous_indices_take_the_lower_score():
    grad = torch.tensor([1.0, 0.5])
    idx = torch.tensor([0, 0])
    sent = torch.tensor([1.0, 1.0])
    for agg in ([0.0, 5.0], [5.0, 0.0]):  # one listing cancels (score 0), one does not
        _, got = gradsieve.regtopk_select_(torch.zeros(2), grad, idx, sent, torch.tensor(agg),
                                           1.0, 1, 2)
        assert got.tolist() == [1], agg


def test_k_zero_and_k_all():
    residual, grad, *previous = make_case(101, seed=3)
    res = residual.clone()
    values, indices = gradsieve.regtopk_select_(res, grad, *previous, 1.0, 0, 2)
    assert values.numel() == 0 and indices.numel() == 0
    assert torch.equal(res, residual + grad)  # still accumulated
    res = residual.clone()
    values, indices = gradsieve.regtopk_select_(res, grad, *previous, 1.0, 101, 2)
    assert indices.tolist() == list(range(101)) and torch.equal(values, residual + grad)
    assert torch.count_nonzero(res) == 0


def test_nan_and_inf_rank_first():
    grad = torch.tensor([1.0, math.nan, 2.0, math.inf, -math.inf, 3.0])
    # Entry 4 (-inf) was cancelled last step: 0 * inf is a NaN score, which ties with entry 1's
    # NaN; entry 3 (inf, weight 1) is next.
    prev = (torch.tensor([4]), torch.tensor([1.0]), torch.tensor([0.0]))
    values, indices = gradsieve.regtopk_select_(torch.zeros(6), grad, *prev, 1.0, 2, 2)
    assert indices.tolist() == [1, 4] and math.isnan(values[0]) and values[1] == -math.inf
    values, indices = gradsieve.regtopk_select_(torch.zeros(6), grad, *prev, 1.0, 3, 2)
    assert indices.tolist() == [1, 3, 4]
    check_op(*make_case(1001, torch.float16, kind="special", seed=5), 1.0, 40, 2)


def test_non_contiguous_inputs():
    residual_base = torch.randn(40, 20)
    residual = residual_base[:, ::2]
    untouched = residual_base[:, 1::2].clone()
    grad = torch.randn(20, 40).t()[:, ::2]
    n = residual.numel()
    idx = torch.randperm(n)[:60].repeat_interleave(2)[::2]
    sent = torch.randn(120)[::2]
    agg = torch.randn(60, 2)[:, 1]
    assert not (residual.is_contiguous() or grad.is_contiguous() or sent.is_contiguous()
                or agg.is_contiguous())
    before = residual.clone()
    check_op(before, grad, idx, sent, agg, 1.5, 37, 3)
    values, indices = gradsieve.regtopk_select_(residual, grad, idx, sent, agg, 1.5, 37, 3)
    want = before.reshape(-1) + grad.reshape(-1)
    want[indices] = 0.0
    assert torch.equal(residual.reshape(-1), want)
    assert torch.equal(residual_base[:, 1::2], untouched)  # written back into the view only


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 1001, 65537])
def test_kept_is_the_in_place_op_out_of_place(n, dtype, device):
    """With ``kept`` the op reads the memory from kept, leaves it as it was and writes what the
    in-place op leaves in its residual to ``residual`` (whatever that held), with the same
    selection; non-contiguous kept and residual too."""
    residual, grad, idx, sent, agg = make_case(n, dtype, m_frac=0.1, seed=n + 5, kind="special", device=device)
    for k in sorted({0, n // 7, n}):
        in_place = residual.clone()
        want_v, want_i = gradsieve.regtopk_select_(in_place, grad, idx, sent, agg, 2.0, k, 3, 1e8)
        kept = residual.clone()
        out = torch.full_like(residual, float("nan"))
        got_v, got_i = gradsieve.regtopk_select_(out, grad, idx, sent, agg, 2.0, k, 3, 1e8, kept=kept)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(out, in_place, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(kept, residual, rtol=0, atol=0, equal_nan=True)  # left alone
        strided_kept, strided_out = _copy(residual), _copy(out)
        strided_out.fill_(7.0)
        got_v, got_i = gradsieve.regtopk_select_(strided_out, grad, idx, sent, agg, 2.0, k, 3, 1e8,
                                                 kept=strided_kept)
        assert torch.equal(got_i, want_i)
        torch.testing.assert_close(strided_out, in_place, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [None, "nan", "inf", "-inf"])
def test_finite_flag_from_the_same_pass(dtype, device, bad):
    """``finite`` says whether grad is finite, as torch.isfinite(grad).all(); the selection and
    the residual are the op's without it; a flag already False stays False."""
    n = 70_001
    residual, grad, idx, sent, agg = make_case(n, dtype, m_frac=0.05, seed=3, device=device)
    if bad is not None:
        grad = grad.clone()
        grad[n // 3] = float(bad)
    want_res = residual.clone()
    want_v, want_i = gradsieve.regtopk_select_(want_res, grad, idx, sent, agg, 2.0, 700, 2)
    flag = torch.ones(1, dtype=torch.bool, device=device)
    got_res = residual.clone()
    got_v, got_i = gradsieve.regtopk_select_(got_res, grad, idx, sent, agg, 2.0, 700, 2, finite=flag)
    assert bool(flag) == bool(torch.isfinite(grad).all()) == (bad is None)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0, equal_nan=True)
    stays = torch.zeros(1, dtype=torch.bool, device=device)
    gradsieve.regtopk_select_(residual.clone(), grad, idx, sent, agg, 2.0, 700, 2, finite=stays)
    assert not bool(stays)


def test_compressor_takes_the_finite_flag_from_the_select():
    """regtopk's compress reads the gradient's finiteness from its select (no isfinite pass) and
    the payload's header says so."""
    compressor = gradsieve.get_compressor("regtopk", density=0.05)
    layout = BucketLayout.flat(1000, 2)
    memory = MemoryBank().get(0, layout.keys, layout.param_numels, compressor.memory_names,
                              torch.device("cpu"), compressor.memory_dtypes)
    for value, finite in ((1.0, True), (float("nan"), False)):
        grad = torch.randn(1000)
        grad[17] = value
        selection = compressor.select(grad, memory, compressor.segments(layout, 0), layout, 0)
        assert selection.scratch["finite"].shape == () and bool(selection.scratch["finite"]) == finite
        payload = compressor.compress(grad, memory, layout, 0).payload
        assert int(payload[:4].view(torch.int32)[0]) == int(finite)


def test_any_shape_and_zero_dim():
    x = torch.tensor(2.5)
    res = torch.tensor(0.5)
    values, indices = gradsieve.regtopk_select_(res, x, torch.tensor([0]), torch.tensor([1.0]),
                                                torch.tensor([0.0]), 1.0, 1, 2)
    assert indices.tolist() == [0] and values.tolist() == [3.0] and res.item() == 0.0
    _, _, idx, sent, agg = make_case(42, m_frac=0.5, seed=9)
    check_op(torch.randn(42), torch.randn(6, 7), idx.view(3, 7), sent.view(7, 3), agg, 1.0, 5, 2)


# ------------------------------------------------------------------------------- argument errors
def _z(shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def _call(d, residual=None, grad=None, idx=None, sent=None, agg=None, mu=1.0, k=1, world=2, q=None, kept=None,
          finite=None):
    residual = _z(5, device=d) if residual is None else residual
    grad = _z(5, device=d) if grad is None else grad
    idx = _z(2, torch.int64, d) if idx is None else idx
    sent = _z(2, device=d) if sent is None else sent
    agg = _z(2, device=d) if agg is None else agg
    return gradsieve.regtopk_select_(residual, grad, idx, sent, agg, mu, k, world, q, kept=kept, finite=finite)


P = "gradsieve.regtopk_select_: "
ERROR_CASES = [
    ("grad-int32", lambda d: _call(d, grad=_z(5, torch.int32, d)),
     P + "grad must be float32, float16 or bfloat16, got Int"),
    ("grad-float64", lambda d: _call(d, grad=_z(5, torch.float64, d)),
     P + "grad must be float32, float16 or bfloat16, got Double"),
    ("residual-float16", lambda d: _call(d, residual=_z(5, torch.float16, d)),
     P + "residual must be a float32 tensor, got Half"),
    ("residual-int64", lambda d: _call(d, residual=_z(5, torch.int64, d)),
     P + "residual must be a float32 tensor, got Long"),
    ("residual-numel", lambda d: _call(d, residual=_z(4, device=d)),
     P + "residual must have as many elements as grad (5), got 4"),
    ("prev_indices-float32", lambda d: _call(d, idx=_z(2, device=d)),
     P + "prev_indices must be int32 or int64, got Float"),
    ("prev_indices-int16", lambda d: _call(d, idx=_z(2, torch.int16, d)),
     P + "prev_indices must be int32 or int64, got Short"),
    ("prev_sent-float64", lambda d: _call(d, sent=_z(2, torch.float64, d)),
     P + "prev_sent must be a float32 tensor, got Double"),
    ("prev_sent-float16", lambda d: _call(d, sent=_z(2, torch.float16, d)),
     P + "prev_sent must be a float32 tensor, got Half"),
    ("prev_sent-numel", lambda d: _call(d, sent=_z(3, device=d)),
     P + "prev_sent must have as many elements as prev_indices (2), got 3"),
    ("prev_agg-bfloat16", lambda d: _call(d, agg=_z(2, torch.bfloat16, d)),
     P + "prev_agg must be a float32 tensor, got BFloat16"),
    ("prev_agg-numel", lambda d: _call(d, agg=_z(1, device=d)),
     P + "prev_agg must have as many elements as prev_indices (2), got 1"),
    ("k-negative", lambda d: _call(d, k=-1), P + "k must be in [0, 5] (the number of elements), got -1"),
    ("k-above-numel", lambda d: _call(d, k=6), P + "k must be in [0, 5] (the number of elements), got 6"),
    ("mu-zero", lambda d: _call(d, mu=0.0), P + "mu must be a finite number > 0, got 0"),
    ("mu-negative", lambda d: _call(d, mu=-1.5), P + "mu must be a finite number > 0, got -1.5"),
    ("mu-inf", lambda d: _call(d, mu=math.inf), P + "mu must be a finite number > 0, got inf"),
    ("mu-nan", lambda d: _call(d, mu=math.nan), P + "mu must be a finite number > 0, got nan"),
    ("world_size-zero", lambda d: _call(d, world=0), P + "world_size must be >= 1, got 0"),
    ("world_size-negative", lambda d: _call(d, world=-3), P + "world_size must be >= 1, got -3"),
    ("q-negative", lambda d: _call(d, q=-1.0), P + "q must be >= 0 (inf allowed) or None, got -1"),
    ("q-nan", lambda d: _call(d, q=math.nan), P + "q must be >= 0 (inf allowed) or None, got nan"),
    ("kept-float16", lambda d: _call(d, kept=_z(5, torch.float16, d)),
     P + "kept must be a float32 tensor, got Half"),
    ("kept-numel", lambda d: _call(d, kept=_z(4, device=d)),
     P + "kept must have as many elements as grad (5), got 4"),
    ("finite-int", lambda d: _call(d, finite=_z(1, torch.int32, d)),
     P + "finite must be a bool tensor of one element, got Int with 1 elements"),
    ("finite-two", lambda d: _call(d, finite=torch.ones(2, dtype=torch.bool, device=d)),
     P + "finite must be a bool tensor of one element, got Bool with 2 elements"),
]



@pytest.mark.parametrize("device", ["cpu", "meta"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in ERROR_CASES])
def test_argument_errors(call, message, device):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(device)


def _device_mismatch_cases(dev, other):
    ref = str(torch.empty(0, device=dev).device)
    oth = str(torch.empty(0, device=other).device)
    return [
        (lambda: _call(dev, residual=_z(5, device=other)),
         P + f"residual must be on the same device as grad ({ref}), got {oth}"),
        (lambda: _call(dev, idx=_z(2, torch.int64, other)),
         P + f"prev_indices must be on the same device as grad ({ref}), got {oth}"),
        (lambda: _call(dev, sent=_z(2, device=other)),
         P + f"prev_sent must be on the same device as grad ({ref}), got {oth}"),
        (lambda: _call(dev, agg=_z(2, device=other)),
         P + f"prev_agg must be on the same device as grad ({ref}), got {oth}"),
        (lambda: _call(dev, kept=_z(5, device=other)),
         P + f"kept must be on the same device as grad ({ref}), got {oth}"),
        (lambda: _call(dev, finite=torch.ones(1, dtype=torch.bool, device=other)),
         P + f"finite must be on the same device as grad ({ref}), got {oth}"),
    ]


@pytest.mark.parametrize("dev, other", [("meta", "cpu"), ("cpu", "meta")] + (
    [("cuda", "cpu"), ("cpu", "cuda")] if HAS_CUDA else []))
def test_device_mismatch(dev, other):
    for call, message in _device_mismatch_cases(dev, other):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


def test_more_than_int32_elements_rejected_on_meta():
    big = torch.empty(2**31, dtype=torch.float16, device="meta")
    with pytest.raises(RuntimeError, match=re.escape(
            P + "grad must have at most 2^31 - 1 elements, got 2147483648")):
        _call("meta", residual=_z(2**31, device="meta"), grad=big)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("indices, position, bad", [([0, 10, 3], 1, 10), ([9, 0, -1], 2, -1)])
def test_out_of_range_previous_index(indices, position, bad, index_dtype):
    residual = torch.arange(10, dtype=torch.float32)
    before = residual.clone()
    with pytest.raises(RuntimeError, match=re.escape(
            P + f"prev_indices must lie in [0, 10) (grad.numel()), got prev_indices[{position}] = {bad}")):
        gradsieve.regtopk_select_(residual, torch.ones(10), torch.tensor(indices, dtype=index_dtype),
                                  torch.ones(3), torch.ones(3), 1.0, 2, 2)
    assert torch.equal(residual, before)  # checked before anything is written
    with pytest.raises(RuntimeError, match=re.escape("got prev_indices[0] = 0")):
        gradsieve.regtopk_select_(torch.zeros(0), torch.zeros(0), torch.tensor([0]),
                                  torch.ones(1), torch.ones(1), 1.0, 0, 2)


# ----------------------------------------------------------------------- opcheck, torch.compile
STATIC_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_static")


def sample_inputs(device, special=False):
    """(name, args) samples: every dtype at an odd size, sizes 0 and 1, a 0-d grad, int32
    indices, duplicates, and non-contiguous tensors; k 0, a third, all."""
    kind = "special" if special else "normal"
    cases = [(f"{d}-1001".replace("torch.", ""), make_case(1001, d, 0.05, 1, kind, device))
             for d in DTYPES]
    cases += [
        ("float32-0", make_case(0, seed=2, device=device)),
        ("float32-1", make_case(1, m_frac=1.0, seed=3, kind=kind, device=device)),
        ("float32-int32-dups", make_case(999, m_frac=0.2, seed=4, kind=kind, device=device,
                                         index_dtype=torch.int32, duplicates=True)),
        ("ties", make_case(500, m_frac=0.3, seed=5, kind="ties", device=device)),
    ]
    r, g, i, s, a = make_case(1, torch.float16, m_frac=1.0, seed=6, kind=kind, device=device)
    cases.append(("float16-0d", (r.reshape(()), g.reshape(()), i, s, a)))
    r, g, i, s, a = make_case(2002, torch.bfloat16, m_frac=0.1, seed=7, kind=kind, device=device)
    cases.append(("strided", (r[::2], g[::2], (i // 2).repeat_interleave(2)[::2],
                              s.repeat_interleave(2)[::2], a.repeat_interleave(2)[::2])))
    samples = []
    for name, (r, g, i, s, a) in cases:
        n = g.numel()
        for k, mu, world, q in zip(sorted({0, (n + 2) // 3, n}), (1.0, 4.0, 1e-3), (2, 5, 1),
                                   (None, 1e8, 0.5)):
            samples.append((f"{name}-k{k}-mu{mu}", (_copy(r), g, i, s, a, mu, k, world, q)))
    return samples


def _copy(t):
    """A copy with t's layout (clone() makes a strided view contiguous): the in-place op gets its
    own residual per sample."""
    if t.is_contiguous():
        return t.clone()
    base = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    base[::2] = t.reshape(-1)
    return base[::2].view(t.shape) if t.dim() <= 1 else base[::2].reshape(t.shape)


@pytest.mark.parametrize("index", range(len(sample_inputs("cpu"))),
                         ids=[name for name, _ in sample_inputs("cpu")])
def test_opcheck(index):
    _, args = sample_inputs("cpu")[index]
    torch.library.opcheck(OP.default, args, test_utils=STATIC_OPCHECK_UTILS)


@pytest.mark.parametrize("index", [0, 5, 14], ids=[sample_inputs("cpu")[i][0] for i in (0, 5, 14)])
def test_opcheck_with_kept_and_finite(index):
    _, (r, g, i, s, a, mu, k, world, q) = sample_inputs("cpu")[index]
    torch.library.opcheck(OP.default, (torch.empty_like(r), g, i, s, a, mu, k, world, q, None, _copy(r),
                                       torch.ones(1, dtype=torch.bool)),
                          test_utils=STATIC_OPCHECK_UTILS)


def test_opcheck_dynamic_shapes():
    residual, grad, idx, sent, agg = make_case(301, m_frac=0.1, seed=8)
    result = torch.library.opcheck(OP.default, (residual, grad, idx, sent, agg, 2.0, 20, 4, None),
                                   test_utils="test_aot_dispatch_dynamic", raise_exception=False)
    assert result["test_aot_dispatch_dynamic"] == "SUCCESS", \
        str(result["test_aot_dispatch_dynamic"]).splitlines()[0]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches_eager(device, dynamic):
    def fn(residual, grad, idx, sent, agg):
        values, indices = gradsieve.regtopk_select_(residual, grad, idx, sent * 2, agg, 0.5, 11, 4)
        return values * 3, indices, residual.sum()

    residual, grad, idx, sent, agg = make_case(301, torch.float16, m_frac=0.1, seed=9, device=device)
    eager = (residual.clone(), grad, idx, sent, agg)
    compiled = (residual.clone(), grad, idx, sent, agg)
    want = fn(*eager)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)(*compiled)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(compiled[0], eager[0])  # the residual is mutated the same way


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic, fresh_dynamo):
    _compiled_matches_eager("cpu", dynamic)


# ------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compile_fullgraph_matches_eager(dynamic, fresh_dynamo):
    _compiled_matches_eager("cuda", dynamic)


@requires_cuda
@pytest.mark.parametrize("index", range(len(sample_inputs("cpu", True))),
                         ids=[name for name, _ in sample_inputs("cpu", True)])
def test_cuda_parity(index):
    """CUDA equals CPU: the same selection (up to swaps at float64 near-ties of the cut, as the
    two backends' float64 tanh may differ in the last bit), the same values and residual."""
    _, cpu_args = sample_inputs("cpu", True)[index]
    _, cuda_args = sample_inputs("cuda", True)[index]
    residual, grad, idx, sent, agg, mu, k, world, q = sample_inputs("cpu", True)[index][1]
    _, score = reference_scores(residual, grad, idx, sent, agg, mu, world, q)
    want_v, want_i = OP(*cpu_args)
    got_v, got_i = OP(*cuda_args)
    assert got_v.device.type == "cuda" and got_i.device.type == "cuda"
    if torch.equal(got_i.cpu(), want_i):
        torch.testing.assert_close(got_v.cpu(), want_v, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(cuda_args[0].cpu(), cpu_args[0], rtol=0, atol=0, equal_nan=True)
    else:
        swapped = np.setxor1d(got_i.cpu().numpy(), want_i.numpy())
        cut = np.nanmin(score[want_i.numpy()])
        assert np.allclose(score[swapped], cut, rtol=NEAR_TIE_RTOL, atol=0)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4097, 300_007])
def test_cuda_matches_reference(n, dtype):
    case = make_case(n, dtype, m_frac=0.05, seed=n, device="cuda")
    for frac, mu, world, q in ((0.01, 4.0, 8, None), (0.5, 0.5, 3, 0.25)):
        check_op(*case, mu, pick_k(n, frac), world, q)
    dup = make_case(n, dtype, m_frac=0.3, seed=n + 1, device="cuda", duplicates=True,
                    index_dtype=torch.int32)
    check_op(*dup, 1.0, pick_k(n, 0.1), 2)


# =============================================================================== 2 the compressor
def test_options_and_registry():
    assert "regtopk" in gradsieve.available_compressors()
    comp = gradsieve.get_compressor("regtopk")
    assert comp.mu == 4.0 and comp.q == 1e8 and comp.memory_names == ("residual",)
    with pytest.raises(ValueError, match=re.escape("option mu must be a finite number > 0, got 0.0")):
        gradsieve.get_compressor("regtopk", mu=0)
    with pytest.raises(ValueError, match=re.escape("option mu must be a finite number > 0, got inf")):
        gradsieve.get_compressor("regtopk", mu=math.inf)
    with pytest.raises(ValueError, match=re.escape("option q must be a number >= 0, got -1.0")):
        gradsieve.get_compressor("regtopk", q=-1)
    with pytest.raises(ValueError, match=re.escape("option q must be a number >= 0, got nan")):
        gradsieve.get_compressor("regtopk", q=math.nan)
    assert gradsieve.get_compressor("regtopk", q=math.inf).q == math.inf


SEGMENT_OPTIONS = [
    ({}, None, None),
    ({"scope": "layer"}, (300, 20, 500, 7), (2, 1, 2, 1)),
    ({"compress_1d": False}, (300, 20, 500, 7), (2, 1, 2, 1)),
    ({"values": "int8", "chunk": 16}, None, None),
    ({"values": "fp16", "scope": "layer"}, (300, 20, 500, 7), (2, 1, 2, 1)),
]


@pytest.mark.parametrize("options, sizes, ndims", SEGMENT_OPTIONS)
def test_tiny_mu_is_topk_exactly(options, sizes, ndims):
    torch.manual_seed(0)
    layout = dict(param_sizes=sizes, param_ndims=ndims)
    reg = gradsieve.Simulator("regtopk", world_size=3, density=0.05, mu=1e-20, **layout, **options)
    top = gradsieve.Simulator("topk", world_size=3, density=0.05, **layout, **options)
    for step in range(12):
        grads = [torch.randn(827) for _ in range(3)]
        assert torch.equal(reg.step(grads), top.step(grads)), step
    for rank in range(3):
        assert torch.equal(reg.memory(rank, "residual"), top.memory(rank, "residual"))


@pytest.mark.parametrize("options, sizes, ndims", SEGMENT_OPTIONS)
def test_error_feedback_bookkeeping(options, sizes, ndims):
    torch.manual_seed(1)
    sim = gradsieve.Simulator("regtopk", world_size=4, density=0.02, mu=1.0, param_sizes=sizes,
                              param_ndims=ndims, **options)
    total, delivered = torch.zeros(827), torch.zeros(827)
    for _ in range(40):
        grads = [torch.randn(827) + 0.3 * w for w in range(4)]  # heterogeneous workers
        total += sum(grads)
        delivered += 4 * sim.step(grads)
    residuals = sum(sim.memory(r, "residual") for r in range(4))
    torch.testing.assert_close(delivered + residuals, total, rtol=0, atol=1e-4)
    # It differs from top-k on heterogeneous data (else this test would say nothing of RegTop-k).
    top = gradsieve.Simulator("topk", world_size=4, density=0.02, param_sizes=sizes,
                              param_ndims=ndims, **options)
    torch.manual_seed(1)
    differs = False
    for _ in range(40):
        grads = [torch.randn(827) + 0.3 * w for w in range(4)]
        differs |= not torch.equal(top.step(grads), sim.step(grads))
    assert differs


def test_memory_holds_last_steps_wire_values_and_average():
    sim = gradsieve.Simulator("regtopk", world_size=2, density=0.1, values="bf16")
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(200, generator=g) for _ in range(2)]
    average = sim.step(grads)
    extra = sim.banks[0].buckets[0].extra
    idx, sent, agg = extra["prev_indices"], extra["prev_sent"], extra["prev_agg"]
    assert idx.numel() == 20 and torch.equal(agg, average[idx])
    chosen = grads[0][idx]  # the first step's a is the gradient
    assert torch.equal(sent, chosen.to(torch.bfloat16).float()) and not torch.equal(sent, chosen)
    # The rounding stays in the residual.
    torch.testing.assert_close(sim.memory(0, "residual")[idx], chosen - sent, rtol=0, atol=0)
    assert extra["prev_layout"].tolist() == [1, 0, 200, 20]


def logistic_toy(compressor, steps, **options):
    """The paper's motivating example: two workers, logistic loss, x_n = (+-100, 1), y = 1,
    Top-1 (density 0.5 of two entries), learning rate 0.9, from w = (0, 1)."""
    x = torch.tensor([[100.0, 1.0], [-100.0, 1.0]])
    sim = gradsieve.Simulator(compressor, world_size=2, **options)
    w = torch.tensor([0.0, 1.0])
    losses = []
    for _ in range(steps):
        p = torch.sigmoid(x @ w)
        w = w - 0.9 * sim.step([(p[n] - 1.0) * x[n] for n in range(2)])
        losses.append(float(torch.nn.functional.softplus(-(x @ w)).mean()))
    return w, losses


def test_paper_two_worker_example():
    _, central = logistic_toy("none", 40)
    w_top, top = logistic_toy("topk", 40, density=0.5)
    _, reg = logistic_toy("regtopk", 40, density=0.5, mu=1.0)
    # Top-k: both workers send their first entry (+-26.9), which cancels; nothing moves.
    assert torch.equal(w_top, torch.tensor([0.0, 1.0])) and top[-1] == top[0]
    # RegTop-k learns that the first entry cancels and sends the second: it tracks gradient descent.
    assert reg[-1] < 0.05 and reg[-1] < 1.1 * central[-1] and central[-1] < 0.5 * top[-1]


def test_non_finite_step_leaves_memory_as_it_was():
    g = torch.Generator().manual_seed(4)
    steps = [[torch.randn(300, generator=g) for _ in range(2)] for _ in range(4)]
    bad = [steps[1][0].clone(), steps[1][1].clone()]
    bad[1][7] = math.inf
    a = gradsieve.Simulator("regtopk", world_size=2, density=0.05, mu=0.5)
    b = gradsieve.Simulator("regtopk", world_size=2, density=0.05, mu=0.5)
    out_a = [a.step(s) for s in steps]
    out_b = [b.step(steps[0]), b.step(steps[1])]
    extra = {k: v.clone() for k, v in b.banks[0].buckets[0].extra.items()}
    assert torch.isnan(b.step(bad)).all() and b.skipped_steps == 1
    for key, value in b.banks[0].buckets[0].extra.items():
        assert torch.equal(value, extra[key]), key
    out_b += [b.step(steps[2]), b.step(steps[3])]
    for x, y in zip(out_a, out_b):
        assert torch.equal(x, y)


SIZES_BY_KEY = {10: 30, 11: 50, 12: 20, 13: 9}
NDIMS_BY_KEY = {10: 2, 11: 2, 12: 1, 13: 2}


def _reordered_run(compressor, orders, drop_extra_at=None):
    """Two workers exchanging per-parameter gradients; step s uses the bucket order orders[s].
    Returns each step's average as {parameter key: tensor}."""
    banks = [MemoryBank() for _ in range(2)]
    g = torch.Generator().manual_seed(5)
    results = []
    for step, order in enumerate(orders):
        layout = BucketLayout(sum(SIZES_BY_KEY.values()), tuple(SIZES_BY_KEY[k] for k in order),
                              tuple(NDIMS_BY_KEY[k] for k in order), 2, 0, tuple(order))
        # The first entries of every parameter are large and opposite on the two workers: top-k
        # keeps sending them (they cancel); RegTop-k learns to skip them.
        grads = []
        for w in range(2):
            grad = {key: torch.randn(SIZES_BY_KEY[key], generator=g) for key in SIZES_BY_KEY}
            for key in SIZES_BY_KEY:
                grad[key][:2] += 10.0 * (2 * w - 1)
            grads.append(grad)
        memories = [bank.get(0, layout.keys, layout.param_numels, compressor.memory_names,
                             torch.device("cpu")) for bank in banks]
        if step == drop_extra_at:
            for memory in memories:
                memory.extra.clear()
        compressed = [compressor.compress(torch.cat([grad[k] for k in order]), memory, layout, step)
                      for grad, memory in zip(grads, memories)]
        average, finite, well_formed = compressor.aggregate(torch.stack([c.payload for c in compressed]),
                                                            layout, step)
        assert bool((finite & well_formed).all())
        for memory, c in zip(memories, compressed):
            compressor.commit(memory, c, average, layout)
        parts = average.split(layout.param_numels)
        results.append({key: part for key, part in zip(order, parts)})
    return results


ORDERS = {"a": (10, 11, 12, 13), "b": (12, 10, 13, 11), "c": (13, 12, 11, 10),
          "b1": (11, 10, 12, 13), "c1": (13, 12, 10, 11)}


@pytest.mark.parametrize("options, others", [
    ({}, "b c"),
    ({"scope": "layer"}, "b c"),
    # The dense 1-D parameter 12 cuts the bucket into segments; these orders keep the segments'
    # parameters (a different grouping would change k per segment, for top-k as well).
    ({"compress_1d": False}, "b1 c1"),
])
def test_bucket_reorder_moves_previous_entries(options, others):
    """DDP may rebuild a bucket with the same parameters in another order: the stored positions
    follow their parameters, so the run equals one without reorders."""
    compressor = gradsieve.get_compressor("regtopk", density=0.1, mu=1.0, **options)
    a = ORDERS["a"]
    b, c = (ORDERS[name] for name in others.split())
    steady = _reordered_run(compressor, [a] * 6)
    for orders in ([a, a, b, b, c, a], [a, b, c, b, a, c]):
        moved = _reordered_run(compressor, orders)
        for step, (x, y) in enumerate(zip(steady, moved)):
            for key in SIZES_BY_KEY:
                assert torch.equal(x[key], y[key]), (orders, step, key)
    # Control: forgetting last step's entries (plain top-k for one step) changes the result.
    forgot = _reordered_run(compressor, [a] * 6, drop_extra_at=3)
    assert all(torch.equal(steady[s][k], forgot[s][k]) for s in range(3) for k in SIZES_BY_KEY)
    assert any(not torch.equal(steady[3][k], forgot[3][k]) for k in SIZES_BY_KEY)


def test_other_parameters_fall_back_to_plain_topk_for_one_step():
    compressor = gradsieve.get_compressor("regtopk", density=0.1, mu=1e-20)
    memory = MemoryBank().get(0, (1,), (100,), ("residual",), torch.device("cpu"))
    layout = BucketLayout(100, (100,), (2,), 2, 0, (1,))
    compressed = compressor.compress(torch.randn(100), memory, layout, 0)
    compressor.commit(memory, compressed, torch.zeros(100), layout)  # all cancelled
    same = compressor._previous(memory, layout, compressor.segments(layout, 1), torch.device("cpu"))
    assert same[0][0].numel() == 10 and torch.equal(same[0][2], torch.zeros(10))
    other = BucketLayout(100, (60, 40), (2, 2), 2, 0, (1, 2))  # the record is stale for this one
    prev = compressor._previous(memory, other, compressor.segments(other, 1), torch.device("cpu"))
    assert all(p.numel() == 0 for p in prev[0])
    # With the record, the cancelled entries score 0 and are not sent again; without, they are.
    grad = torch.randn(100)
    _, top_i = gradsieve.topk_abs(memory.entries["residual"] + grad, 10)
    assert torch.equal(compressor.select(grad, memory, compressor.segments(other, 1), other, 1)[0],
                       top_i)
    sent_again = compressor.select(grad, memory, compressor.segments(layout, 1), layout, 1)[0]
    assert not set(sent_again.tolist()) & set(same[0][0].tolist())


# =============================================================================== 3 the DDP hook
HOOK_STEPS = 6


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(16, 20, generator=g) + rank, torch.randint(0, 10, (16,), generator=g)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(model, state, rank, steps, start=0, hook=None, opt_state=None):
    ddp = DDP(model)
    ddp.register_comm_hook(state, hook or gradsieve.compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for step in range(start, start + steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    return opt


def worker_record(rank, world, options):
    hook = recording_hook()
    state = gradsieve.CompressionState("regtopk", warmup_steps=1, **options)
    train(small_model(), state, rank, HOOK_STEPS, hook=hook)
    (bucket,) = state.memory.buckets.values()  # the model fits in one bucket
    return {"inputs": hook.inputs, "outputs": hook.outputs, "keys": bucket.keys, "numels": bucket.numels,
            "prev": bucket.extra["prev_indices"].numel()}


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"density": 0.05, "mu": 1.0},
    {"density": 0.05, "mu": 2.0, "values": "int8", "chunk": 16, "scope": "layer"},
])
def test_hook_equals_simulator(tmp_path, options):
    results = run_workers(worker_record, 2, tmp_path, options)
    assert all(len(r["inputs"]) == HOOK_STEPS and r["prev"] > 0 for r in results)
    ndim_of = {p.numel(): p.dim() for p in small_model().parameters()}
    numels, keys = results[0]["numels"], results[0]["keys"]
    sim = gradsieve.Simulator("regtopk", world_size=2, param_sizes=numels,
                              param_ndims=[ndim_of[n] for n in numels], param_keys=keys, **options)
    for step in range(1, HOOK_STEPS):  # step 0 is the dense warm-up
        expected = sim.step([r["inputs"][step] for r in results])
        for r in results:
            assert torch.equal(r["outputs"][step], expected), f"step {step}"


def worker_checkpoint(rank, world, tmp, phase):
    options = {"density": 0.05, "mu": 1.0}
    if phase == "first":
        # An uninterrupted run of 10 steps, then a run of 4 steps that saves a checkpoint.
        model = small_model()
        train(model, gradsieve.CompressionState("regtopk", **options), rank, 10)
        straight = flat_params(model)
        model = small_model()
        state = gradsieve.CompressionState("regtopk", **options)
        opt = train(model, state, rank, 4)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
                   f"{tmp}/ckpt{rank}.pt")
        return straight
    # A new process: DDP starts from its initial bucket order again (the saved positions were in
    # the rebuilt order), so the restored previous entries are moved to their parameters.
    saved = torch.load(f"{tmp}/ckpt{rank}.pt", weights_only=False)
    model = small_model(seed=123)  # a different init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    state = gradsieve.CompressionState("regtopk", **options)
    state.load_state_dict(saved["hook"])
    train(model, state, rank, 6, start=4, opt_state=saved["opt"])
    return flat_params(model)


@pytest.mark.slow
def test_checkpoint_restore_matches_uninterrupted_run(tmp_path):
    straight = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "first")
    resumed = run_workers(worker_checkpoint, 2, tmp_path, str(tmp_path), "second")
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)

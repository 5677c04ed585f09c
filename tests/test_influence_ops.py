"""The ``influence_update`` and ``segment_mean`` ops (granular's influence score, per-segment means).

1. ``influence_update`` against the NumPy float32 reference of tests/reference.py, bit for bit
   (every operation rounded on its own in the contract's order): n in {0, 1, 2, 7, 1000, 65537,
   200003}, float32/float16/bfloat16 grad, hessian None or given, normal/tied/special values,
   strided and transposed inputs, a hypothesis property; gradsieve.influence.influence agrees;
   NaN/inf propagation; inputs left unchanged.
2. ``segment_mean`` against the NumPy float64 reference, within 1 ulp (both sum in float64 and
   round once, in different orders): empty, single, many and chunk-spanning segments, empty
   segments, strided input, a hypothesis property, the same bits for any number of CPU threads.
3. Every argument check of both ops, on CPU, through the Python functions and from the Meta
   kernels; opcheck; fake tensors; torch.compile.
4. CUDA: bitwise parity of influence_update, segment_mean within 1 ulp of the CPU and the
   reference and deterministic, device mismatches, opcheck (skipped without a GPU).
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import gradsieve
from conftest import DTYPES, devices, make_input, requires_cuda
from gradsieve.influence import influence
from reference import influence_update_reference, segment_mean_reference

INFLUENCE = torch.ops.gradsieve.influence_update
SEGMENT_MEAN = torch.ops.gradsieve.segment_mean
PI = "gradsieve.influence_update: "
PS = "gradsieve.segment_mean: "
KINDS = ["normal", "ties", "special"]
# (eps, rho): granular's small perturbations, an exact power of two, rho at both ends of [0, 1).
SETTINGS = [(1e-3, 0.9), (0.5, 0.0), (3e-2, 0.25), (1.0, 0.999)]
STATIC_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_static")


def assert_bitwise(what, got, want):
    """got (a tensor) holds exactly the float32 bits of want (NaN anywhere want has NaN)."""
    got = got.detach().cpu()
    want = torch.from_numpy(np.ascontiguousarray(want, dtype=np.float32))
    assert got.dtype == torch.float32 and got.shape == want.shape, (what, got.dtype, got.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN at other entries"
    same = got.view(torch.int32) == want.view(torch.int32)
    if not bool((same | nan).all()):
        i = int(torch.nonzero(~(same | nan))[0])
        raise AssertionError(f"{what}[{i}] = {float(got[i])!r}, reference {float(want[i])!r}")


def ulp_distance(got, want):
    """|ulps| between float32 tensors (int64; -0.0 and 0.0 are 0 apart; meaningless at NaN)."""
    def ordered(t):
        bits = t.contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return (ordered(got) - ordered(want)).abs()


def assert_within_one_ulp(what, got, want):
    got = got.detach().cpu()
    want = torch.as_tensor(np.ascontiguousarray(want, dtype=np.float32))
    assert got.dtype == torch.float32 and got.shape == want.shape, (what, got.dtype, got.shape)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN at other entries"
    far = (ulp_distance(got, want) > 1) & ~nan
    if bool(far.any()):
        i = int(torch.nonzero(far)[0])
        raise AssertionError(f"{what}[{i}] = {float(got[i])!r}, reference {float(want[i])!r}")


# ===================================================================== 1 influence_update
def make_influence(n, dtype=torch.float32, kind="normal", seed=0, hessian=True, device="cpu"):
    """(grad, residual, score, hessian or None): grad of `kind` in dtype, a residual of half its
    size, a score >= 0 and a signed Hessian diagonal (|h| is what counts)."""
    grad = make_input(n, dtype, device, kind, seed)
    residual = make_input(n, torch.float32, device, "normal", seed + 1) * 0.5
    score = make_input(n, torch.float32, device, "normal", seed + 2).abs() * 1e-3
    h = make_input(n, torch.float32, device, "normal", seed + 3) * 4.0 if hessian else None
    return grad, residual, score, h


def check_influence(grad, residual, score, hessian, eps, rho):
    """The op against the reference, bit for bit; returns (acc, score_out)."""
    acc, out = INFLUENCE(grad, residual, score, hessian, eps, rho)
    n = grad.numel()
    assert acc.shape == out.shape == (n,) and acc.device == out.device == grad.device
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    want_acc, want_out = influence_update_reference(cpu(grad), cpu(residual), cpu(score),
                                                    cpu(hessian), eps, rho)
    assert_bitwise("acc", acc, want_acc)
    assert_bitwise("score_out", out, want_out)
    return acc, out


@pytest.mark.parametrize("with_hessian", [False, True], ids=["no-hessian", "hessian"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 65537, 200_003])
def test_influence_matches_reference(n, dtype, kind, with_hessian):
    inputs = make_influence(n, dtype, kind, seed=n + 3, hessian=with_hessian)
    for eps, rho in SETTINGS:
        check_influence(*inputs, eps, rho)


def test_influence_by_hand():
    acc, out = gradsieve.influence_update(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]),
                                          torch.tensor([4.0, 0.0]), torch.tensor([2.0, -8.0]),
                                          eps=0.5, rho=0.5)
    # a = [1.5, -2]; influence = |a| / 2 + |h| / 8 = [1, 2]; score = (score + influence) / 2.
    assert acc.tolist() == [1.5, -2.0] and out.tolist() == [2.5, 1.0]
    _, first_order = gradsieve.influence_update(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]),
                                                torch.tensor([4.0, 0.0]), None, 0.5, 0.5)
    assert first_order.tolist() == [2.375, 0.5]


@pytest.mark.parametrize("dtype", DTYPES)
def test_influence_is_the_seeds_formula_of_the_accumulator(dtype):
    """rho = 0: score_out is gradsieve.influence.influence(acc, hessian, eps), the eager formula,
    bit for bit (the same float32 operations in the same order)."""
    grad, residual, score, hessian = make_influence(5001, dtype, "normal", seed=21)
    for eps in (1e-3, 0.37, 2.0):
        acc, out = INFLUENCE(grad, residual, score, hessian, eps, 0.0)
        assert torch.equal(acc, residual + grad.float())
        assert torch.equal(out, influence(acc, hessian, eps))
        _, out = INFLUENCE(grad, residual, score, None, eps, 0.0)
        assert torch.equal(out, influence(acc, torch.zeros_like(acc), eps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_influence_strided_inputs_and_inputs_unchanged(dtype):
    n = 3001
    grad, residual, score, hessian = make_influence(2 * n, dtype, "special", seed=4)
    before = [t.clone() for t in (grad, residual, score, hessian)]
    views = (grad[::2], residual[1::2], score[::2], hessian[1::2])
    got = check_influence(*views, 1e-2, 0.8)
    flat = [t.contiguous() for t in views]
    for g, w in zip(got, INFLUENCE(*flat, 1e-2, 0.8)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    for t, b in zip((grad, residual, score, hessian), before):
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)
    # The columns of a transposed 2-D buffer are 1-D and strided too.
    columns = make_input(4 * 777, seed=5).view(4, 777).t()
    check_influence(columns[:, 0].to(dtype), columns[:, 1], columns[:, 2].abs(), columns[:, 3], 0.1, 0.5)
    check_influence(columns[:, 0].to(dtype), columns[:, 1], columns[:, 2].abs(), None, 0.1, 0.5)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_influence_matches_reference_property(data):
    n = data.draw(st.integers(0, 5000), label="n")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    with_hessian = data.draw(st.booleans(), label="hessian")
    eps = data.draw(st.floats(1e-8, 1e3, allow_nan=False, allow_infinity=False), label="eps")
    rho = data.draw(st.floats(0.0, 1.0, exclude_max=True, allow_nan=False), label="rho")
    scale = data.draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]), label="scale")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    grad, residual, score, hessian = make_influence(n, dtype, kind, seed, with_hessian)
    check_influence(grad, residual * scale, score * scale, hessian, eps, rho)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_hessian", [False, True], ids=["no-hessian", "hessian"])
def test_influence_nonfinite_values_propagate(device, with_hessian):
    grad, residual, score, hessian = make_influence(100, seed=6, hessian=with_hessian, device=device)
    grad[5], grad[6], grad[7] = math.nan, math.inf, -math.inf
    score[8] = math.inf
    if with_hessian:
        hessian[9] = -math.inf
    acc, out = INFLUENCE(grad, residual, score, hessian, 1e-3, 0.9)
    acc, out = acc.cpu(), out.cpu()
    assert math.isnan(acc[5]) and acc[6] == math.inf and acc[7] == -math.inf
    assert math.isnan(out[5]) and out[6] == math.inf and out[7] == math.inf and out[8] == math.inf
    bad = [5, 6, 7, 8] + ([9] if with_hessian else [])
    if with_hessian:
        assert out[9] == math.inf
    keep = torch.ones(100, dtype=torch.bool)
    keep[bad] = False
    assert bool(torch.isfinite(out[keep]).all()) and bool(torch.isfinite(acc[keep]).all())
    # rho = 0 times an infinite score is NaN (IEEE), as the reference says.
    check_influence(grad.cpu(), residual.cpu(), score.cpu(), None if hessian is None else hessian.cpu(), 1e-3, 0.0)


def test_influence_empty():
    z = torch.zeros(0)
    for hessian in (None, z):
        acc, out = gradsieve.influence_update(z.bfloat16(), z, z, hessian, 1e-3, 0.5)
        assert acc.shape == out.shape == (0,) and acc.dtype == out.dtype == torch.float32


# ===================================================================== 2 segment_mean
def random_numels(total, segments, seed, empty_fraction=0.2):
    """`segments` non-negative lengths summing to `total`, about a fifth of them 0."""
    rng = np.random.default_rng(seed)
    if segments == 0:
        return []
    cuts = np.sort(rng.integers(0, total + 1, segments - 1))
    numels = np.diff(np.concatenate([[0], cuts, [total]]))
    empty = rng.random(segments) < empty_fraction
    moved = int(numels[empty].sum())
    numels[empty] = 0
    numels[int(np.argmax(~empty)) if (~empty).any() else 0] += moved
    return [int(v) for v in numels]


def check_segment_mean(x, numels):
    got = SEGMENT_MEAN(x, numels)
    assert got.shape == (len(numels),) and got.dtype == torch.float32 and got.device == x.device
    assert_within_one_ulp("mean", got, segment_mean_reference(x.cpu(), numels))
    return got


LAYOUTS = {
    "one": lambda n: [n],
    "halves": lambda n: [n // 2, n - n // 2],
    "leading-and-trailing-empty": lambda n: [0, 0, n, 0],
    "many": lambda n: random_numels(n, max(1, n // 37), seed=n),
    "sizes-1": lambda n: [1] * n,
}


def layout_cases(sizes):
    """(n, layout) pairs; one segment per entry only up to n = 1000 (the reference loops in
    Python)."""
    return [(n, layout) for n in sizes for layout in LAYOUTS if layout != "sizes-1" or n <= 1000]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,layout", layout_cases([0, 1, 7, 1000, 65536, 65537, 200_003]))
def test_segment_mean_matches_reference(n, layout, kind):
    x = make_input(n, torch.float32, "cpu", kind, seed=n + 1)
    check_segment_mean(x, LAYOUTS[layout](n))


def test_segment_mean_by_hand_and_empty_segments():
    x = torch.tensor([1.0, 2.0, 3.0, -4.0, 5.0])
    got = gradsieve.segment_mean(x, [2, 0, 3])
    assert got.tolist() == [1.5, 0.0, float(np.float32(4.0 / 3.0))]
    assert gradsieve.segment_mean(x, (0, 5, 0)).tolist() == [0.0, float(np.float32(1.4)), 0.0]
    assert gradsieve.segment_mean(torch.zeros(0), [0, 0, 0]).tolist() == [0.0, 0.0, 0.0]
    empty = gradsieve.segment_mean(torch.zeros(0), [])
    assert empty.shape == (0,) and empty.dtype == torch.float32
    # Values whose float32 sum would round badly: the float64 sum keeps every bit here.
    big = torch.tensor([2.0**24, 1.0, 1.0, -(2.0**24)])
    assert gradsieve.segment_mean(big, [4]).item() == 0.5


def test_segment_mean_nonfinite():
    x = make_input(1000, seed=2)
    x[10], x[500], x[501] = math.nan, math.inf, -math.inf
    got = gradsieve.segment_mean(x, [100, 400, 1, 1, 498])
    assert math.isnan(got[0]) and got[2] == math.inf and got[3] == -math.inf
    assert math.isfinite(got[1]) and math.isfinite(got[4])
    assert math.isnan(gradsieve.segment_mean(x, [1000])[0])  # inf - inf


def test_segment_mean_strided_input():
    base = make_input(2 * 70_001, seed=3)
    numels = random_numels(70_001, 13, seed=3)
    got = check_segment_mean(base[::2], numels)
    assert torch.equal(got, SEGMENT_MEAN(base[::2].contiguous(), numels))
    columns = make_input(3 * 1001, seed=4).view(3, 1001).t()
    check_segment_mean(columns[:, 1], [1, 500, 0, 500])


def test_segment_mean_deterministic_for_any_thread_count():
    """The CPU sums fixed chunks of 65536 entries, added in order: the same bits on 1 or 2
    threads (segments spanning several chunks, and many small ones)."""
    x = make_input(400_009, seed=11) * 1e3 + 0.1
    numels = [300_000, 7, 0, 100_002]
    small = random_numels(400_009, 5000, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (SEGMENT_MEAN(x, numels), SEGMENT_MEAN(x, small))
        torch.set_num_threads(max(2, threads))
        many = (SEGMENT_MEAN(x, numels), SEGMENT_MEAN(x, small))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_segment_mean_matches_reference_property(data):
    numels = data.draw(st.lists(st.one_of(st.integers(0, 3), st.integers(0, 2000),
                                          st.sampled_from([65535, 65536, 65537, 131_073])),
                                max_size=40), label="numels")
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    scale = data.draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]), label="scale")
    offset = data.draw(st.sampled_from([0.0, 1.0, -100.0]), label="offset")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    x = make_input(sum(numels), torch.float32, "cpu", kind, seed) * scale + offset
    check_segment_mean(x, numels)


# ===================================================================== 3 the contract
def influence_bad_arguments():
    """(args, message) of every check; the good call is (grad[5], residual[5], score[5],
    hessian[5], eps 1e-3, rho 0.9)."""
    n = 5
    good = dict(grad=torch.zeros(n), residual=torch.zeros(n), score=torch.zeros(n),
                hessian=torch.zeros(n), eps=1e-3, rho=0.9)

    def case(name, message, **changed):
        args = {**good, **changed}
        return pytest.param(tuple(args.values()), message, id=name)

    return [
        case("grad-int32", "grad must be float32, float16 or bfloat16, got Int",
             grad=torch.zeros(n, dtype=torch.int32)),
        case("grad-float64", "grad must be float32, float16 or bfloat16, got Double",
             grad=torch.zeros(n, dtype=torch.float64)),
        case("grad-2d", "grad must be 1-D, got a tensor of 2 dims", grad=torch.zeros(1, n)),
        case("grad-0d", "grad must be 1-D, got a tensor of 0 dims", grad=torch.zeros(())),
        case("residual-float16", "residual must be a float32 tensor, got Half",
             residual=torch.zeros(n, dtype=torch.float16)),
        case("residual-2d", "residual must be 1-D, got a tensor of 2 dims", residual=torch.zeros(n, 1)),
        case("residual-numel", "residual must have as many elements as grad (5), got 4",
             residual=torch.zeros(4)),
        case("score-bfloat16", "score must be a float32 tensor, got BFloat16",
             score=torch.zeros(n, dtype=torch.bfloat16)),
        case("score-2d", "score must be 1-D, got a tensor of 2 dims", score=torch.zeros(1, n)),
        case("score-numel", "score must have as many elements as grad (5), got 6", score=torch.zeros(6)),
        case("hessian-float64", "hessian must be a float32 tensor, got Double",
             hessian=torch.zeros(n, dtype=torch.float64)),
        case("hessian-2d", "hessian must be 1-D, got a tensor of 2 dims", hessian=torch.zeros(n, 1)),
        case("hessian-numel", "hessian must have as many elements as grad (5), got 0",
             hessian=torch.zeros(0)),
        case("eps-0", "eps must be a finite number > 0, got 0", eps=0.0),
        case("eps-negative", "eps must be a finite number > 0, got -0.001", eps=-1e-3),
        case("eps-inf", "eps must be a finite number > 0, got inf", eps=math.inf),
        case("eps-nan", "eps must be a finite number > 0, got nan", eps=math.nan),
        case("rho-1", "rho must be in [0, 1), got 1", rho=1.0),
        case("rho-negative", "rho must be in [0, 1), got -0.5", rho=-0.5),
        case("rho-nan", "rho must be in [0, 1), got nan", rho=math.nan),
    ]


def meta(args):
    return [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("args,message", influence_bad_arguments())
def test_influence_bad_arguments(args, message, quiet_fake_tensor_log):
    with pytest.raises(RuntimeError, match=re.escape(PI + message)):
        INFLUENCE(*args)
    with pytest.raises(RuntimeError, match=re.escape(PI + message)):
        gradsieve.influence_update(*args)
    with pytest.raises(RuntimeError, match=re.escape(PI + message)):
        INFLUENCE(*meta(args))


@pytest.mark.parametrize("dev,other", [("meta", "cpu"), ("cpu", "meta")])
@pytest.mark.parametrize("where", ["residual", "score", "hessian"])
def test_influence_device_mismatch_meta_and_cpu(where, dev, other, quiet_fake_tensor_log):
    names = ("grad", "residual", "score", "hessian")
    args = {name: t.to(other if name == where else dev) for name, t in zip(names, make_influence(5))}
    with pytest.raises(RuntimeError, match=re.escape(
            PI + f"{where} must be on the same device as grad ({dev}), got {other}")):
        INFLUENCE(*args.values(), 1e-3, 0.9)


def test_influence_too_many_elements_rejected_on_meta(quiet_fake_tensor_log):
    big = torch.empty(2**31, dtype=torch.bfloat16, device="meta")
    state = torch.empty(2**31, device="meta")
    with pytest.raises(RuntimeError, match=re.escape(
            PI + "grad must have at most 2^31 - 1 elements, got 2147483648")):
        INFLUENCE(big, state, state, None, 1e-3, 0.5)


def segment_bad_arguments():
    x = torch.zeros(10)
    return [
        pytest.param((x, [3, 2, 5, -1, 1]), "numels[3] must be >= 0, got -1", id="numel-negative"),
        pytest.param((x, [-7]), "numels[0] must be >= 0, got -7", id="numel-negative-first"),
        pytest.param((x, [4, 5]), "numels must sum to x.numel() (10), got 9", id="sum-short"),
        pytest.param((x, [4, 5, 2]), "numels must sum to x.numel() (10), got 11", id="sum-long"),
        pytest.param((x, []), "numels must sum to x.numel() (10), got 0", id="numels-empty"),
        pytest.param((torch.zeros(0), [1]), "numels must sum to x.numel() (0), got 1", id="x-empty"),
        pytest.param((x, [2**62, 2**62, 2**62]), "numels must sum to x.numel() (10), got more than 2^31 - 1",
                     id="sum-huge"),
        pytest.param((torch.zeros(10, dtype=torch.float16), [10]), "x must be a float32 tensor, got Half",
                     id="x-float16"),
        pytest.param((torch.zeros(10, dtype=torch.float64), [10]), "x must be a float32 tensor, got Double",
                     id="x-float64"),
        pytest.param((torch.zeros(2, 5), [10]), "x must be 1-D, got a tensor of 2 dims", id="x-2d"),
        pytest.param((torch.zeros(()), [1]), "x must be 1-D, got a tensor of 0 dims", id="x-0d"),
    ]


@pytest.mark.parametrize("args,message", segment_bad_arguments())
def test_segment_mean_bad_arguments(args, message, quiet_fake_tensor_log):
    with pytest.raises(RuntimeError, match=re.escape(PS + message)):
        SEGMENT_MEAN(*args)
    with pytest.raises(RuntimeError, match=re.escape(PS + message)):
        gradsieve.segment_mean(*args)
    with pytest.raises(RuntimeError, match=re.escape(PS + message)):
        SEGMENT_MEAN(*meta(args))


def influence_samples(device="cpu"):
    """opcheck compares outputs without equal_nan: finite inputs only."""
    samples = []
    for i, dtype in enumerate(DTYPES):
        samples.append((*make_influence(1001, dtype, "ties", seed=i, device=device), 1e-3, 0.9))
    samples.append((*make_influence(1, seed=7, hessian=False, device=device), 0.5, 0.0))
    samples.append((*make_influence(0, seed=8, device=device), 0.5, 0.5))
    grad, residual, score, hessian = make_influence(1200, torch.bfloat16, seed=9, device=device)
    samples.append((grad[::2], residual[1::2], score[::2], hessian[::2], 3e-2, 0.25))
    return samples


def segment_samples(device="cpu"):
    samples = [(make_input(n, torch.float32, device, "normal", seed=n), numels)
               for n, numels in ((1001, [1001]), (1001, [0, 500, 1, 0, 500]),
                                 (70_000, random_numels(70_000, 40, seed=1)), (0, [0, 0]), (0, []))]
    samples.append((make_input(2002, torch.float32, device, "ties", seed=3)[::2], [1000, 1]))
    return samples


@pytest.mark.parametrize("index", range(len(influence_samples())))
def test_influence_opcheck(index):
    torch.library.opcheck(INFLUENCE.default, influence_samples()[index],
                          test_utils=STATIC_OPCHECK_UTILS)


@pytest.mark.parametrize("index", range(len(segment_samples())))
def test_segment_mean_opcheck(index):
    torch.library.opcheck(SEGMENT_MEAN.default, segment_samples()[index],
                          test_utils=STATIC_OPCHECK_UTILS)


@pytest.mark.parametrize("op,sample", [(INFLUENCE, lambda: influence_samples()[0]),
                                       (SEGMENT_MEAN, lambda: segment_samples()[1])],
                         ids=["influence_update", "segment_mean"])
def test_opcheck_dynamic_shapes(op, sample):
    result = torch.library.opcheck(op.default, sample(), test_utils="test_aot_dispatch_dynamic",
                                   raise_exception=False)
    assert result["test_aot_dispatch_dynamic"] == "SUCCESS", \
        str(result["test_aot_dispatch_dynamic"]).splitlines()[0]


def test_fake_kernel_shapes(quiet_fake_tensor_log):
    with FakeTensorMode():
        grad = torch.empty(1234, dtype=torch.float16)
        state = torch.empty(1234)
        for hessian in (None, state):
            acc, out = INFLUENCE(grad, state, state, hessian, 1e-3, 0.5)
            assert acc.shape == out.shape == (1234,) and acc.dtype == out.dtype == torch.float32
        with pytest.raises(RuntimeError, match=re.escape(PI + "rho must be in [0, 1), got 1")):
            INFLUENCE(grad, state, state, None, 1e-3, 1.0)
        means = SEGMENT_MEAN(state, [1000, 0, 234])
        assert means.shape == (3,) and means.dtype == torch.float32
        with pytest.raises(RuntimeError, match=re.escape(PS + "numels must sum to x.numel() (1234)")):
            SEGMENT_MEAN(state, [1000])


def test_compile_fullgraph_matches_eager():
    def fn(grad, residual, score, hessian):
        acc, out = gradsieve.influence_update(grad, residual, score, hessian, 1e-3, 0.9)
        means = gradsieve.segment_mean(out, [100, 0, 200])
        return acc * 2, out, means + 0

    args = make_influence(300, torch.bfloat16, seed=12)
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, fn(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ===================================================================== 4 CUDA
@requires_cuda
@pytest.mark.parametrize("with_hessian", [False, True], ids=["no-hessian", "hessian"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003, (1 << 21) + 5])
def test_cuda_influence_bitwise_reference_and_cpu(n, dtype, with_hessian):
    for kind in KINDS:
        cpu = make_influence(n, dtype, kind, seed=n + 1, hessian=with_hessian)
        cuda = [None if t is None else t.cuda() for t in cpu]
        for eps, rho in SETTINGS:
            got = check_influence(*cuda, eps, rho)
            want = INFLUENCE(*cpu, eps, rho)
            for name, g, w in zip(("acc", "score_out"), got, want):
                assert_bitwise(f"{name} (CPU op)", g, w.numpy())


@requires_cuda
@pytest.mark.parametrize("n,layout", layout_cases([0, 1, 7, 1000, 65537, 200_003]))
def test_cuda_segment_mean_reference_cpu_and_deterministic(n, layout):
    for kind in KINDS:
        x = make_input(n, torch.float32, "cpu", kind, seed=n + 2)
        numels = LAYOUTS[layout](n)
        got = check_segment_mean(x.cuda(), numels)
        assert_within_one_ulp("mean (CPU op)", got, SEGMENT_MEAN(x, numels).numpy())
        again = SEGMENT_MEAN(x.cuda(), numels)
        torch.testing.assert_close(got, again, rtol=0, atol=0, equal_nan=True)  # deterministic


@requires_cuda
def test_cuda_segment_mean_many_segments_and_large():
    x = make_input((1 << 22) + 3, torch.float32, "cpu", "normal", seed=5)
    for numels in (random_numels(x.numel(), 100_000, seed=5), [x.numel()], [1] * 1000 + [x.numel() - 1000]):
        got = check_segment_mean(x.cuda(), numels)
        assert_within_one_ulp("mean (CPU op)", got, SEGMENT_MEAN(x, numels).numpy())


@requires_cuda
def test_cuda_strided_and_current_stream():
    grad, residual, score, hessian = make_influence(2 * 5001, torch.bfloat16, "special", seed=2, device="cuda")
    views = (grad[::2], residual[::2], score[1::2], hessian[::2])
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = INFLUENCE(*views, 1e-3, 0.9)
        means = SEGMENT_MEAN(residual[::2], [2000, 0, 3001])
    stream.synchronize()
    for g, w in zip(got, INFLUENCE(*[t.contiguous() for t in views], 1e-3, 0.9)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    check_influence(*views, 1e-3, 0.9)
    assert_within_one_ulp("mean", means, segment_mean_reference(residual[::2].cpu(), [2000, 0, 3001]))


@requires_cuda
@pytest.mark.parametrize("where", ["residual", "score", "hessian"])
def test_cuda_influence_device_mismatch(where, quiet_fake_tensor_log):
    args = dict(zip(("grad", "residual", "score", "hessian"), make_influence(5, device="cuda")))
    args[where] = args[where].cpu()
    with pytest.raises(RuntimeError, match=re.escape(
            PI + f"{where} must be on the same device as grad (cuda:0), got cpu")):
        INFLUENCE(*args.values(), 1e-3, 0.9)


@requires_cuda
def test_cuda_opcheck():
    for sample in influence_samples("cuda"):
        torch.library.opcheck(INFLUENCE.default, sample, test_utils=STATIC_OPCHECK_UTILS)
    for sample in segment_samples("cuda"):
        torch.library.opcheck(SEGMENT_MEAN.default, sample, test_utils=STATIC_OPCHECK_UTILS)

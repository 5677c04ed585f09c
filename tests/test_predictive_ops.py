"""The ``predictive_score`` op (the score of the ``predictive`` compressor).

1. Against the NumPy float64 reference of tests/reference.py: H in {1, 3, 5}, hidden in {1, 8, 16},
   both score forms, float32 and bfloat16 history, every ring position, n in {0, 1, 7, 1000,
   100003}; an all-zero accumulator, strided inputs, a hypothesis property over shapes and values.
   The tolerance is per entry: rtol 1e-5 plus 1e-5 times the sum of the magnitudes of the logit's
   terms (the float32 sums round in proportion to it).
2. Non-finite gradients (no error, NaN/inf scores), inputs left unchanged, determinism (the same
   bits for any number of CPU threads).
3. Every argument check, on CPU and from the Meta kernel; opcheck; fake tensors; torch.compile.
4. CUDA: the reference, CPU/CUDA parity, device mismatches (skipped without a GPU).
The compressor built on the op is tested in test_predictive.py.
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
from conftest import devices, make_input, requires_cuda
from reference import predictive_score_magnitude, predictive_score_reference

OP = torch.ops.gradsieve.predictive_score
P = "gradsieve.predictive_score: "
HISTORY_DTYPES = [torch.float32, torch.bfloat16]
RTOL = 1e-5
ATOL = 1e-5


def weight_count(history, hidden):
    return hidden * (history + 4) + 1


def make_case(n, history, hidden, history_dtype=torch.float32, seed=0, device="cpu", scale=1.0):
    """(grad, residual, history list, weights): gradients of magnitude ~scale, a residual of half
    that, history of previous gradients (a fifth of them zero), weights ~N(0, 0.5)."""
    grad = make_input(n, torch.float32, device, "normal", seed) * scale
    residual = make_input(n, torch.float32, device, "normal", seed + 1) * (0.5 * scale)
    ring = []
    for j in range(history):
        h = make_input(n, torch.float32, device, "normal", seed + 2 + j) * scale
        h[j % 5::5] = 0.0
        ring.append(h.to(history_dtype))
    weights = make_input(weight_count(history, hidden), torch.float32, device, "normal", seed + 99) * 0.5
    return grad, residual, ring, weights


def check_against_reference(grad, residual, history, newest, weights, hidden, product):
    """The op's three outputs against the reference; returns them."""
    acc, score, scale = OP(grad, residual, history, newest, weights, hidden, product)
    n = grad.numel()
    assert acc.dtype == score.dtype == scale.dtype == torch.float32
    assert acc.shape == score.shape == (n,) and scale.shape == ()
    assert acc.device == score.device == scale.device == grad.device
    cpu = lambda t: t.cpu()  # noqa: E731
    args = (cpu(grad), cpu(residual), [cpu(h) for h in history], newest, cpu(weights), hidden, product)
    want_acc, want_score, want_scale = predictive_score_reference(*args)
    magnitude = predictive_score_magnitude(*args)
    assert torch.equal(acc.cpu(), torch.from_numpy(want_acc).float())  # one float32 addition
    assert math.isclose(float(scale), want_scale, rel_tol=1e-6), (float(scale), want_scale)
    got = score.cpu().double().numpy()
    bound = ATOL * (1.0 + magnitude) + RTOL * np.abs(want_score)
    err = np.abs(got - want_score)
    if n:
        worst = int(np.argmax(err - bound))
        assert bool((err <= bound).all()), \
            f"score[{worst}] = {got[worst]!r}, reference {want_score[worst]!r} (bound {bound[worst]:.3g})"
        assert bool((score >= 0).all())
    return acc, score, scale


# ===================================================================== 1 the reference
@pytest.mark.parametrize("history_dtype", HISTORY_DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("product", [False, True], ids=["softplus", "product"])
@pytest.mark.parametrize("hidden", [1, 8, 16])
@pytest.mark.parametrize("history", [1, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
def test_matches_reference(n, history, hidden, product, history_dtype):
    grad, residual, ring, weights = make_case(n, history, hidden, history_dtype, seed=n + history)
    for newest in range(history):  # every position of the ring
        check_against_reference(grad, residual, ring, newest, weights, hidden, product)


def test_ring_order_by_hand():
    """h_0 is history[newest], h_1 the one before it (cyclically): with W1 reading only x_2 (the
    newest) the score sees history[newest] and nothing else."""
    n, history, hidden = 4, 3, 1
    grad = torch.tensor([1.0, -1.0, 2.0, 0.0])
    ring = [torch.full((n,), float(j + 1)) for j in range(history)]
    weights = torch.zeros(weight_count(history, hidden))
    weights[2] = 1.0  # W1[0, 2]: x_2 = sgn(a) sgn(h_0) log1p(|h_0| / s)
    weights[hidden * (history + 2) + hidden] = 1.0  # w2[0]
    s = 1.0  # mean of |1| + |-1| + |2| + 0
    for newest in range(history):
        _, score, scale = OP(grad, torch.zeros(n), ring, newest, weights, hidden, False)
        z = math.log1p((newest + 1) / s)  # positive entries only (ReLU)
        want = [math.log1p(math.exp(z)), math.log(2.0), math.log1p(math.exp(z)), math.log(2.0)]
        assert float(scale) == s
        torch.testing.assert_close(score, torch.tensor(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("product", [False, True])
def test_zero_accumulator_and_empty(product):
    history, hidden = 3, 8
    grad, residual, ring, weights = make_case(500, history, hidden, seed=4)
    # a = 0 everywhere: s falls back to 1; the features of grad and history still count.
    acc, score, scale = check_against_reference(grad, -grad, ring, 1, weights, hidden, product)
    assert float(scale) == 1.0 and bool((acc == 0).all())
    if product:
        assert bool((score == 0).all())  # sigmoid * |a| with a = 0
    zero = torch.zeros(500)
    _, score, scale = check_against_reference(zero, zero, ring, 0, weights, hidden, product)
    assert float(scale) == 1.0 and bool(torch.isfinite(score).all())
    empty = torch.zeros(0)
    acc, score, scale = OP(empty, empty, [empty] * history, 2, weights, hidden, product)
    assert acc.shape == score.shape == (0,) and float(scale) == 1.0


@pytest.mark.parametrize("history_dtype", HISTORY_DTYPES, ids=["fp32", "bf16"])
def test_strided_inputs_and_inputs_unchanged(history_dtype):
    history, hidden, n = 4, 8, 3001
    grad, residual, ring, weights = make_case(2 * n, history, hidden, history_dtype, seed=7)
    weights = make_input(2 * weight_count(history, hidden), seed=8) * 0.5
    views = (grad[::2], residual[1::2], [h[::2] for h in ring], 3, weights[::2], hidden, True)
    before = [t.clone() for t in (grad, residual, weights, *ring)]
    got = check_against_reference(*views)
    flat = (views[0].contiguous(), views[1].contiguous(), [h.contiguous() for h in views[2]], 3,
            views[4].contiguous(), hidden, True)
    for g, w in zip(got, OP(*flat)):
        assert torch.equal(g, w)
    for t, b in zip((grad, residual, weights, *ring), before):
        assert torch.equal(t, b)
    # A transposed 2-D buffer's column is 1-D and strided too.
    columns = make_input(n * 3, seed=9).view(3, n).t()
    check_against_reference(columns[:, 0], columns[:, 1], [columns[:, 2]], 0,
                            weights[: weight_count(1, hidden)], hidden, False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_matches_reference_property(data):
    n = data.draw(st.integers(0, 3000), label="n")
    history = data.draw(st.integers(1, 16), label="H")
    hidden = data.draw(st.integers(1, 64), label="hidden")
    newest = data.draw(st.integers(0, history - 1), label="newest")
    product = data.draw(st.booleans(), label="product")
    history_dtype = data.draw(st.sampled_from(HISTORY_DTYPES), label="history dtype")
    scale = data.draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3]), label="gradient scale")
    weight_scale = data.draw(st.sampled_from([0.1, 1.0, 4.0]), label="weight scale")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    grad, residual, ring, _ = make_case(n, history, hidden, history_dtype, seed, scale=scale)
    weights = make_input(weight_count(history, hidden), seed=seed + 7) * weight_scale
    if data.draw(st.booleans(), label="ties"):  # repeated and zero magnitudes
        grad = make_input(n, kind="ties", seed=seed) * scale
    check_against_reference(grad, residual, ring, newest, weights, hidden, product)


# ===================================================================== 2 special values
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("product", [False, True])
def test_nonfinite_gradient_returns(device, product):
    history, hidden = 3, 8
    grad, residual, ring, weights = make_case(1000, history, hidden, seed=3, device=device)
    for bad in (math.nan, math.inf, -math.inf):
        g = grad.clone()
        g[17] = bad
        acc, score, scale = OP(g, residual, ring, 0, weights, hidden, product)
        assert acc.shape == score.shape == (1000,) and scale.shape == ()
        assert not math.isfinite(float(scale))
        assert not bool(torch.isfinite(score).all())  # the caller sees the step is broken
    # Non-finite history entries reach only their own entries.
    h = ring[1].clone()
    h[5] = math.nan
    _, score, scale = OP(grad, residual, [ring[0], h, ring[2]], 2, weights, hidden, product)
    assert math.isfinite(float(scale)) and int(torch.isnan(score).sum()) <= 1


def test_deterministic_for_any_thread_count():
    """Pass 1's sum is taken over fixed chunks, added in order: the same bits on 1 or 2 threads
    (n spans several chunks of 65536)."""
    history, hidden = 5, 16
    grad, residual, ring, weights = make_case(300_007, history, hidden, torch.bfloat16, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(grad, residual, ring, 4, weights, hidden, False)
        torch.set_num_threads(max(2, threads))
        many = OP(grad, residual, ring, 4, weights, hidden, False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


# ===================================================================== 3 the contract
def bad_arguments():
    """(name, args, message) of every check; the good call is (grad[5], residual[5], 3 history
    vectors, newest 1, weights for hidden 8, hidden 8, product False)."""
    n, hidden = 5, 8
    grad, residual = torch.zeros(n), torch.zeros(n)
    ring = [torch.zeros(n) for _ in range(3)]
    weights = torch.zeros(weight_count(3, hidden))
    good = dict(grad=grad, residual=residual, history=ring, newest=1, weights=weights, hidden=hidden)

    def case(name, message, **changed):
        args = {**good, **changed}
        return pytest.param(tuple(args[k] for k in good) + (False,), message, id=name)

    return [
        case("grad-float64", "grad must be a float32 tensor, got Double", grad=torch.zeros(n, dtype=torch.float64)),
        case("grad-bfloat16", "grad must be a float32 tensor, got BFloat16", grad=torch.zeros(n, dtype=torch.bfloat16)),
        case("residual-float16", "residual must be a float32 tensor, got Half",
             residual=torch.zeros(n, dtype=torch.float16)),
        case("weights-int32", "weights must be a float32 tensor, got Int",
             weights=torch.zeros(weight_count(3, hidden), dtype=torch.int32)),
        case("grad-2d", "grad must be 1-D, got a tensor of 2 dims", grad=torch.zeros(1, n)),
        case("residual-numel", "residual must have as many elements as grad (5), got 4", residual=torch.zeros(4)),
        case("history-empty", "history must hold 1 to 16 tensors, got 0", history=[]),
        case("history-17", "history must hold 1 to 16 tensors, got 17", history=[torch.zeros(n)] * 17),
        case("history-float16", "history[0] must be float32 or bfloat16, got Half",
             history=[torch.zeros(n, dtype=torch.float16)] * 3),
        case("history-mixed", "history[1] must have the dtype of history[0] (Float), got BFloat16",
             history=[torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n)]),
        case("history-numel", "history[2] must have as many elements as grad (5), got 6",
             history=[torch.zeros(n), torch.zeros(n), torch.zeros(6)]),
        case("history-2d", "history[0] must be 1-D, got a tensor of 2 dims", history=[torch.zeros(1, n)] * 3),
        case("newest-negative", "newest must be in [0, 3) (the number of history tensors), got -1", newest=-1),
        case("newest-H", "newest must be in [0, 3) (the number of history tensors), got 3", newest=3),
        case("weights-numel", "weights must have hidden*(H+4)+1 = 57 entries (hidden 8, H 3), got 40",
             weights=torch.zeros(40)),
        case("hidden-0", "hidden must be in [1, 64], got 0", hidden=0),
        case("hidden-65", "hidden must be in [1, 64], got 65", hidden=65,
             weights=torch.zeros(weight_count(3, 65))),
    ]


@pytest.mark.parametrize("args,message", bad_arguments())
def test_bad_arguments(args, message, quiet_fake_tensor_log):
    with pytest.raises(RuntimeError, match=re.escape(P + message)):
        OP(*args)
    with pytest.raises(RuntimeError, match=re.escape(P + message)):
        gradsieve.ops.predictive_score(*args)
    meta = [[t.to("meta") for t in a] if isinstance(a, list) else
            a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=re.escape(P + message)):
        OP(*meta)


STATIC_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                        "test_aot_dispatch_static")


def opcheck_samples(device="cpu"):
    """Inputs for opcheck (whose output comparison has no equal_nan: every score is finite)."""
    samples = []
    for n, history, hidden, dtype, newest, product in (
            (1001, 3, 8, torch.float32, 1, False), (1001, 1, 1, torch.bfloat16, 0, True),
            (257, 16, 64, torch.float32, 15, False), (1, 2, 4, torch.bfloat16, 1, False),
            (0, 3, 2, torch.float32, 2, True)):
        grad, residual, ring, weights = make_case(n, history, hidden, dtype, seed=n + hidden, device=device)
        samples.append((grad, residual, ring, newest, weights, hidden, product))
    grad, residual, ring, weights = make_case(1200, 2, 8, torch.bfloat16, seed=5, device=device)
    samples.append((grad[::2], residual[::2], [h[::2] for h in ring], 0, weights, 8, True))
    return samples


@pytest.mark.parametrize("index", range(len(opcheck_samples())))
def test_opcheck(index):
    torch.library.opcheck(OP.default, opcheck_samples()[index], test_utils=STATIC_OPCHECK_UTILS)


def test_opcheck_dynamic_shapes():
    result = torch.library.opcheck(OP.default, opcheck_samples()[0],
                                   test_utils="test_aot_dispatch_dynamic", raise_exception=False)
    assert result["test_aot_dispatch_dynamic"] == "SUCCESS", \
        str(result["test_aot_dispatch_dynamic"]).splitlines()[0]


def test_fake_kernel_shapes(quiet_fake_tensor_log):
    with FakeTensorMode():
        grad, residual = torch.empty(1234), torch.empty(1234)
        ring = [torch.empty(1234, dtype=torch.bfloat16) for _ in range(4)]
        acc, score, scale = OP(grad, residual, ring, 3, torch.empty(weight_count(4, 16)), 16, True)
        assert acc.shape == score.shape == (1234,) and scale.shape == ()
        assert acc.dtype == score.dtype == scale.dtype == torch.float32
        with pytest.raises(RuntimeError, match=re.escape(P + "newest must be in [0, 4)")):
            OP(grad, residual, ring, 4, torch.empty(weight_count(4, 16)), 16, True)


def test_compile_fullgraph_matches_eager():
    def fn(grad, residual, h0, h1, weights):
        acc, score, scale = gradsieve.ops.predictive_score(grad, residual, [h0, h1], 1, weights, 8, False)
        values, indices = gradsieve.topk_abs(score, 10)  # the compressor's selection
        return acc * 2, values, indices, scale + 0

    grad, residual, ring, weights = make_case(300, 2, 8, seed=12)
    torch._dynamo.reset()
    try:
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(grad, residual, *ring, weights)
    finally:
        torch._dynamo.reset()
    for a, b in zip(got, fn(grad, residual, *ring, weights)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ===================================================================== 4 CUDA
@requires_cuda
@pytest.mark.parametrize("history_dtype", HISTORY_DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("product", [False, True], ids=["softplus", "product"])
@pytest.mark.parametrize("history,hidden", [(1, 1), (3, 8), (5, 16), (9, 3), (16, 64)])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
def test_cuda_matches_reference_and_cpu(n, history, hidden, product, history_dtype):
    cpu = make_case(n, history, hidden, history_dtype, seed=n + hidden)
    cuda = (cpu[0].cuda(), cpu[1].cuda(), [h.cuda() for h in cpu[2]], cpu[3].cuda())
    for newest in sorted({0, history - 1, history // 2}):
        got = check_against_reference(cuda[0], cuda[1], cuda[2], newest, cuda[3], hidden, product)
        want = OP(cpu[0], cpu[1], cpu[2], newest, cpu[3], hidden, product)
        assert torch.equal(got[0].cpu(), want[0])  # the accumulator: one float32 addition
        assert math.isclose(float(got[2]), float(want[2]), rel_tol=1e-6)  # two float64 sums
        magnitude = predictive_score_magnitude(*cpu[:3], newest, cpu[3], hidden, product)
        bound = torch.from_numpy(2 * ATOL * (1.0 + magnitude)).float() + RTOL * want[1].abs()
        assert bool(((got[1].cpu() - want[1]).abs() <= bound).all())
        again = OP(cuda[0], cuda[1], cuda[2], newest, cuda[3], hidden, product)
        for a, b in zip(got, again):
            assert torch.equal(a, b)  # deterministic


@requires_cuda
@pytest.mark.parametrize("history,hidden", [(3, 8), (12, 4)])
def test_cuda_grid_stride(history, hidden):
    """More entries than one sweep of the capped grid (8 blocks per SM, 256 threads, 2 or 4 entries
    each) covers."""
    n = (1 << 21) + 5
    cpu = make_case(n, history, hidden, seed=history)
    cuda = (cpu[0].cuda(), cpu[1].cuda(), [h.cuda() for h in cpu[2]], cpu[3].cuda())
    check_against_reference(cuda[0], cuda[1], cuda[2], history - 1, cuda[3], hidden, True)


@requires_cuda
def test_cuda_strided_and_current_stream():
    history, hidden = 4, 8
    grad, residual, ring, weights = make_case(2 * 5001, history, hidden, torch.bfloat16, seed=2, device="cuda")
    views = (grad[::2], residual[::2], [h[::2] for h in ring], 2, weights, hidden, False)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = OP(*views)
    stream.synchronize()
    flat = (views[0].contiguous(), views[1].contiguous(), [h.contiguous() for h in views[2]], 2,
            weights, hidden, False)
    for a, b in zip(got, OP(*flat)):
        assert torch.equal(a, b)
    check_against_reference(*views)


@requires_cuda
@pytest.mark.parametrize("where", ["residual", "history", "weights"])
def test_cuda_device_mismatch(where, quiet_fake_tensor_log):
    grad, residual, ring, weights = make_case(5, 3, 8, device="cuda")
    if where == "residual":
        residual, message = residual.cpu(), "residual must be on the same device as grad (cuda:0), got cpu"
    elif where == "history":
        ring = [ring[0], ring[1].cpu(), ring[2]]
        message = "history[1] must be on the same device as grad (cuda:0), got cpu"
    else:
        weights, message = weights.cpu(), "weights must be on the same device as grad (cuda:0), got cpu"
    with pytest.raises(RuntimeError, match=re.escape(P + message)):
        OP(grad, residual, ring, 1, weights, 8, False)


@requires_cuda
def test_cuda_opcheck():
    for sample in opcheck_samples("cuda"):
        torch.library.opcheck(OP.default, sample, test_utils=STATIC_OPCHECK_UTILS)

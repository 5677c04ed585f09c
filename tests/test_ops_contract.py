"""The operator contract of torch.ops.gradsieve, beyond numerical correctness (test_ops.py):

1. ``torch.library.opcheck`` (schema, autograd registration, fake tensors, AOT dispatch) over
   sample inputs of every op;
2. ``torch.compile(fullgraph=True, backend="aot_eager")`` gives the eager results (the Meta kernels
   trace);
3. every argument check of csrc/ops/validation.cpp raises ``gradsieve.<op>: <arg> must be ...``,
   on CPU and from the Meta kernels;
4. CPU/CUDA parity over the same sample inputs (skipped without a GPU);
5. the package imports and reports whether it has CUDA kernels.

Each op has one ``sample_inputs_<op>(device, special)`` helper that feeds both opcheck and the CUDA
parity tests. ``special=True`` adds inputs whose outputs hold NaN (NaN/inf entries, empty quantile);
opcheck compares with ``torch.testing.assert_close`` without ``equal_nan``, so it gets
``special=False`` only.
"""

import math
import re
from typing import Any, Callable, List, NamedTuple, Tuple

import pytest
import torch

import gradsieve
from conftest import DTYPES, HAS_CUDA, make_input, requires_cuda

# Meta kernels raise on purpose in these tests; FakeTensor would log a stack trace for each.
pytestmark = pytest.mark.usefixtures("quiet_fake_tensor_log")

OPS = torch.ops.gradsieve
OP_NAMES = [
    "topk_abs",
    "quantile_abs",
    "ef_topk_",
    "threshold_select",
    "quantize_int8",
    "dequantize_int8",
    "sparse_accumulate_",
]
# The opcheck utilities run on every sample. test_aot_dispatch_dynamic (symbolic shapes) runs
# separately below on samples large enough not to be specialised.
STATIC_OPCHECK_UTILS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
)


class Sample(NamedTuple):
    name: str
    args: Tuple[Any, ...]


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _float_inputs(device: str, special: bool, seed: int) -> List[Tuple[str, torch.Tensor]]:
    """Float inputs of every dtype at an odd size, sizes 0 and 1, 0-d, and two non-contiguous
    layouts. Data is drawn on the CPU from a fixed seed, so every device sees the same values."""
    kind = "special" if special else "normal"
    out = [(f"{_dname(d)}-1001-{kind}", make_input(1001, d, device, kind, seed)) for d in DTYPES]
    out += [
        ("float32-ties-1001", make_input(1001, torch.float32, device, "ties", seed)),
        ("float32-0", make_input(0, torch.float32, device, kind, seed)),
        ("float32-1", make_input(1, torch.float32, device, kind, seed)),
        ("float16-0d", make_input(1, torch.float16, device, kind, seed).reshape(())),
        ("bfloat16-ties-strided", make_input(2002, torch.bfloat16, device, "ties", seed)[::2]),
        ("float32-transposed",
         make_input(37 * 27, torch.float32, device, kind, seed).view(37, 27).t()),
    ]
    return out


def _counts(n: int) -> List[int]:
    """k / capacity values to try for n elements: 0, a third, all."""
    return sorted({0, (n + 2) // 3, n})


# ------------------------------------------------------------------------------- sample inputs
def sample_inputs_topk_abs(device: str, special: bool = False) -> List[Sample]:
    samples = []
    for name, x in _float_inputs(device, special, seed=1):
        for k in _counts(x.numel()):
            samples.append(Sample(f"{name}-k{k}", (x, k)))
    return samples


def sample_inputs_quantile_abs(device: str, special: bool = False) -> List[Sample]:
    samples = []
    for name, x in _float_inputs(device, special, seed=2):
        if x.numel() == 0 and not special:
            continue  # the quantile of nothing is NaN
        for q in (0.0, 0.37, 1.0):
            samples.append(Sample(f"{name}-q{q}", (x, q)))
    return samples


def sample_inputs_ef_topk_(device: str, special: bool = False) -> List[Sample]:
    samples = []
    for name, grad in _float_inputs(device, special, seed=3):
        n = grad.numel()
        residual = make_input(2 * n, torch.float32, device, "normal", seed=30)
        # A non-contiguous residual with a non-contiguous grad, a flat one otherwise.
        residual = residual[::2] if not grad.is_contiguous() else residual[:n]
        for k, scale in zip(_counts(n), (1.0, -0.5, 1e-3)):
            # The in-place op gets a fresh residual per sample.
            samples.append(Sample(f"{name}-k{k}-s{scale}", (residual.clone(), grad, k, scale)))
    return samples


def sample_inputs_threshold_select(device: str, special: bool = False) -> List[Sample]:
    samples = []
    for name, x in _float_inputs(device, special, seed=4):
        n = x.numel()
        thresholds = [
            ("t0.8", torch.tensor(0.8, device=device)),
            ("t0", torch.tensor(0.0, device=device)),
            ("t0.1-f64", torch.tensor(0.1, dtype=torch.float64, device=device)),
            ("tnan", torch.tensor(float("nan"), device=device)),
        ]
        for (tname, t), capacity in zip(thresholds, (n // 4 + 1, n // 2, n + 3, 4)):
            samples.append(Sample(f"{name}-{tname}-c{capacity}", (x, t, capacity)))
        samples.append(Sample(f"{name}-c0", (x, torch.tensor(0.5, device=device), 0)))
    return samples


def sample_inputs_quantize_int8(device: str, special: bool = False) -> List[Sample]:
    samples = []
    for name, x in _float_inputs(device, special, seed=5):
        for chunk in (1, 64, 4096):
            samples.append(Sample(f"{name}-chunk{chunk}", (x, chunk, False, None)))
    return samples


def sample_inputs_dequantize_int8(device: str, special: bool = False) -> List[Sample]:
    g = torch.Generator().manual_seed(6)

    def codes(shape):
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)

    def scales(n, chunk):
        s = torch.rand(max(0, -(-n // chunk)), generator=g) * 0.05
        if special and s.numel() > 1:
            s[1] = float("nan")  # a chunk that held NaN/Inf
        if s.numel() > 2:
            s[2] = 0.0  # a zero chunk
        return s.to(device)

    layouts = [
        ("1001", codes((1001,)).to(device)),
        ("0", codes((0,)).to(device)),
        ("1", codes((1,)).to(device)),
        ("0d", codes(()).to(device)),
        ("strided", codes((2002,)).to(device)[::2]),
        ("transposed", codes((37, 27)).to(device).t()),
    ]
    samples = []
    for i, (name, q) in enumerate(layouts):
        for j, chunk in enumerate((1, 64, 4096)):
            dtype = DTYPES[(i + j) % len(DTYPES)]
            samples.append(Sample(f"{name}-chunk{chunk}-{_dname(dtype)}",
                                  (q, scales(q.numel(), chunk), chunk, dtype)))
    # A non-contiguous scales tensor.
    samples.append(Sample("1001-chunk64-strided-scales",
                          (layouts[0][1], scales(32, 1)[::2], 64, torch.float32)))
    return samples


def sample_inputs_sparse_accumulate_(device: str, special: bool = False) -> List[Sample]:
    g = torch.Generator().manual_seed(7)

    def rand_indices(m, out_n, dtype, unique=False):
        idx = torch.randperm(out_n, generator=g)[:m] if unique else \
            torch.randint(0, out_n, (m,), generator=g)  # duplicates
        return idx.to(dtype).to(device)

    def vals(m, dtype):
        return torch.randn(m, generator=g).to(dtype).to(device)

    def int8_payload(m, chunk):
        q = torch.randint(-127, 128, (m,), generator=g, dtype=torch.int8).to(device)
        s = (torch.rand(-(-m // chunk), generator=g) * 0.05).to(device)
        return q, s

    def out(n, dtype):
        return torch.randn(n, generator=g).to(dtype).to(device)

    samples = []
    for dtype in DTYPES:
        samples.append(Sample(f"out-{_dname(dtype)}-m1001-int64-dups",
                              (out(1000, dtype), rand_indices(1001, 1000, torch.int64),
                               vals(1001, torch.float32), None, 0)))
    samples += [
        Sample("out-float16-int32-values-bfloat16",
               (out(1000, torch.float16), rand_indices(1001, 1000, torch.int32),
                vals(1001, torch.bfloat16), None, 0)),
        Sample("empty-out-empty-payload",
               (out(0, torch.float32), rand_indices(0, 1, torch.int64),
                vals(0, torch.float32), None, 0)),
        Sample("m0", (out(10, torch.float32), rand_indices(0, 10, torch.int32),
                      vals(0, torch.float16), None, 0)),
        Sample("m1-out1", (out(1, torch.float32), rand_indices(1, 1, torch.int64),
                           vals(1, torch.float32), None, 0)),
        Sample("out-bfloat16-strided-values-float16-strided",
               (out(2000, torch.bfloat16)[::2], rand_indices(1001, 1000, torch.int64),
                vals(2002, torch.float16)[::2], None, 0)),
        Sample("out-float32-transposed-2d-indices",
               (out(37 * 27, torch.float32).view(37, 27).t(),
                rand_indices(600, 37 * 27, torch.int64).view(20, 30),
                vals(600, torch.float32).view(30, 20), None, 0)),
    ]
    for chunk, m, idx_dtype, out_dtype in ((64, 1001, torch.int64, torch.float32),
                                           (1, 1, torch.int32, torch.float16),
                                           (4096, 1001, torch.int32, torch.bfloat16),
                                           (7, 0, torch.int64, torch.float32)):
        q, s = int8_payload(m, chunk)
        samples.append(Sample(f"int8-chunk{chunk}-m{m}-{_dname(out_dtype)}",
                              (out(5000, out_dtype), rand_indices(m, 5000, idx_dtype, unique=True),
                               q, s, chunk)))
    return samples


SAMPLE_INPUTS: dict = {name: globals()[f"sample_inputs_{name}"] for name in OP_NAMES}


def _opcheck_params():
    params = []
    for op in OP_NAMES:
        for i, sample in enumerate(SAMPLE_INPUTS[op]("cpu")):
            params.append(pytest.param(op, i, id=f"{op}-{sample.name}"))
    return params



# ------------------------------------------------------------------------------------- 1 opcheck
@pytest.mark.parametrize("op, index", _opcheck_params())
def test_opcheck(op, index):
    sample = SAMPLE_INPUTS[op]("cpu")[index]  # fresh tensors: in-place ops get their own copies
    torch.library.opcheck(getattr(OPS, op).default, sample.args, test_utils=STATIC_OPCHECK_UTILS)


def _first_large_sample(op):
    # Sizes 0 and 1 are specialised by the symbolic-shape machinery; pick a real dynamic size.
    for sample in SAMPLE_INPUTS[op]("cpu"):
        tensors = [a for a in sample.args if isinstance(a, torch.Tensor) and a.dim() > 0]
        if all(t.numel() >= 2 for t in tensors) and all(t.is_contiguous() for t in tensors):
            return sample
    raise AssertionError(op)


@pytest.mark.parametrize("op", OP_NAMES)
def test_opcheck_dynamic_shapes(op):
    sample = _first_large_sample(op)
    result = torch.library.opcheck(getattr(OPS, op).default, sample.args,
                                   test_utils="test_aot_dispatch_dynamic", raise_exception=False)
    assert result["test_aot_dispatch_dynamic"] == "SUCCESS", \
        str(result["test_aot_dispatch_dynamic"]).splitlines()[0]


# ------------------------------------------------------------------------------- 2 torch.compile
def _compile_case(op: str, n: int) -> Tuple[Callable, Callable[[], Tuple]]:
    """A small function calling ``op`` and a maker of fresh arguments for it (n elements): the
    same data on every call, with new copies of the tensors an op mutates."""
    g = torch.Generator().manual_seed(n)

    def randn(m, dtype=torch.float32):
        return torch.randn(m, generator=g).to(dtype)

    if op == "topk_abs":
        def fn(x):
            values, indices = gradsieve.topk_abs(x * 2, 9)
            return values + 1, indices
        data = randn(n, torch.bfloat16)
        return fn, lambda: (data,)
    if op == "quantile_abs":
        def fn(x):
            return gradsieve.quantile_abs(x, 0.9) * 3
        data = randn(n, torch.float16)
        return fn, lambda: (data,)
    if op == "ef_topk_":
        def fn(residual, grad):
            values, indices = gradsieve.ef_topk_(residual, grad, 11, 0.5)
            return values, indices, residual.sum()
        data = (randn(n), randn(n, torch.float16))
        return fn, lambda: (data[0].clone(), data[1])
    if op == "threshold_select":
        def fn(x, t):
            values, indices, count = gradsieve.threshold_select(x, t, n // 4)
            return values, indices, count + 0
        data = randn(n)
        return fn, lambda: (data, torch.tensor(1.0))
    if op == "quantize_int8":
        def fn(x):
            q, scales = gradsieve.quantize_int8(x, 32)
            return q, scales * 127
        data = randn(n)
        return fn, lambda: (data,)
    if op == "dequantize_int8":
        def fn(q, scales):
            return gradsieve.dequantize_int8(q, scales, 32, torch.bfloat16) + 1
        data = (torch.randint(-127, 128, (n,), generator=g, dtype=torch.int8),
                torch.rand(-(-n // 32), generator=g))
        return fn, lambda: data
    if op == "sparse_accumulate_":
        def fn(out, indices, q, scales):
            gradsieve.sparse_accumulate_(out, indices, q * 2, None)  # float payload
            gradsieve.sparse_accumulate_(out, indices, q.to(torch.int8), scales, 16)  # int8
            return out * 1
        idx = torch.randint(0, n, (n // 2,), generator=g)
        q = torch.randint(-127, 128, (n // 2,), generator=g).float()
        scales = torch.rand(-(-(n // 2) // 16), generator=g)
        return fn, lambda: (torch.zeros(n), idx, q, scales)
    raise AssertionError(op)


def _assert_same(got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        else:
            assert a == b


def _check_compiled_matches_eager(op, n, **compile_kwargs):
    fn, make_args = _compile_case(op, n)
    eager_args = make_args()
    compiled_args = make_args()
    want = fn(*eager_args)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager", **compile_kwargs)(*compiled_args)
    _assert_same(got, want)
    _assert_same(compiled_args, eager_args)  # in-place ops mutate the same way


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("op", OP_NAMES)
def test_compile_fullgraph_matches_eager(op, fresh_dynamo):
    _check_compiled_matches_eager(op, 301, dynamic=False)


def test_compile_compressor_pipeline(fresh_dynamo):
    """Error feedback, int8 coding and the decode step traced as one graph."""

    def step(residual, grad, dense):
        values, indices = gradsieve.ef_topk_(residual, grad, 64)
        q, scales = gradsieve.quantize_int8(values, 16)
        gradsieve.sparse_accumulate_(dense, indices, q, scales, 16)
        threshold = gradsieve.quantile_abs(residual, 0.99)
        tv, ti, count = gradsieve.threshold_select(residual, threshold, 8)
        return dense, tv, ti, count

    g = torch.Generator().manual_seed(0)
    residual, grad = torch.randn(1001, generator=g), torch.randn(1001, generator=g)
    eager = (residual.clone(), grad, torch.zeros(1001))
    compiled = (residual.clone(), grad, torch.zeros(1001))
    want = step(*eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)(*compiled)
    _assert_same(got, want)
    _assert_same(compiled, eager)


@pytest.mark.parametrize("op", OP_NAMES)
def test_compile_dynamic_shapes(op, fresh_dynamo):
    _check_compiled_matches_eager(op, 301, dynamic=True)


def test_compile_default_second_input_size(fresh_dynamo):
    fn = torch.compile(lambda x: gradsieve.topk_abs(x, 3), fullgraph=True, backend="aot_eager")
    for n in (100, 200):
        x = torch.randn(n)
        _assert_same(fn(x), gradsieve.topk_abs(x, 3))


# -------------------------------------------------------------------------------- 3 error checks
def _z(shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def _i8(shape, device):
    return _z(shape, torch.int8, device)


# (case id, call given the device, the exact message). None of these checks reads tensor data, so
# each runs on CPU and through the Meta kernels.
ERROR_CASES = [
    # topk_abs
    ("topk_abs-k-negative", lambda d: gradsieve.topk_abs(_z(5, device=d), -1),
     "gradsieve.topk_abs: k must be in [0, 5] (the number of elements), got -1"),
    ("topk_abs-k-above-numel", lambda d: gradsieve.topk_abs(_z((2, 3), device=d), 7),
     "gradsieve.topk_abs: k must be in [0, 6] (the number of elements), got 7"),
    ("topk_abs-k-on-empty", lambda d: gradsieve.topk_abs(_z(0, device=d), 1),
     "gradsieve.topk_abs: k must be in [0, 0] (the number of elements), got 1"),
    ("topk_abs-x-int32", lambda d: gradsieve.topk_abs(_z(5, torch.int32, d), 1),
     "gradsieve.topk_abs: x must be float32, float16 or bfloat16, got Int"),
    ("topk_abs-x-float64", lambda d: gradsieve.topk_abs(_z(5, torch.float64, d), 1),
     "gradsieve.topk_abs: x must be float32, float16 or bfloat16, got Double"),
    # quantile_abs
    ("quantile_abs-q-negative", lambda d: gradsieve.quantile_abs(_z(5, device=d), -0.25),
     "gradsieve.quantile_abs: q must be in [0, 1], got -0.25"),
    ("quantile_abs-q-above-one", lambda d: gradsieve.quantile_abs(_z(5, device=d), 1.5),
     "gradsieve.quantile_abs: q must be in [0, 1], got 1.5"),
    ("quantile_abs-q-nan", lambda d: gradsieve.quantile_abs(_z(5, device=d), float("nan")),
     "gradsieve.quantile_abs: q must be in [0, 1], got nan"),
    ("quantile_abs-q-inf", lambda d: gradsieve.quantile_abs(_z(5, device=d), float("inf")),
     "gradsieve.quantile_abs: q must be in [0, 1], got inf"),
    ("quantile_abs-x-int64", lambda d: gradsieve.quantile_abs(_z(5, torch.int64, d), 0.5),
     "gradsieve.quantile_abs: x must be float32, float16 or bfloat16, got Long"),
    ("quantile_abs-x-float64", lambda d: gradsieve.quantile_abs(_z(5, torch.float64, d), 0.5),
     "gradsieve.quantile_abs: x must be float32, float16 or bfloat16, got Double"),
    # ef_topk_
    ("ef_topk_-grad-int32", lambda d: gradsieve.ef_topk_(_z(5, device=d), _z(5, torch.int32, d), 1),
     "gradsieve.ef_topk_: grad must be float32, float16 or bfloat16, got Int"),
    ("ef_topk_-grad-float64",
     lambda d: gradsieve.ef_topk_(_z(5, device=d), _z(5, torch.float64, d), 1),
     "gradsieve.ef_topk_: grad must be float32, float16 or bfloat16, got Double"),
    ("ef_topk_-residual-float16",
     lambda d: gradsieve.ef_topk_(_z(5, torch.float16, d), _z(5, torch.float16, d), 1),
     "gradsieve.ef_topk_: residual must be a float32 tensor, got Half"),
    ("ef_topk_-residual-float64",
     lambda d: gradsieve.ef_topk_(_z(5, torch.float64, d), _z(5, device=d), 1),
     "gradsieve.ef_topk_: residual must be a float32 tensor, got Double"),
    ("ef_topk_-residual-int32",
     lambda d: gradsieve.ef_topk_(_z(5, torch.int32, d), _z(5, device=d), 1),
     "gradsieve.ef_topk_: residual must be a float32 tensor, got Int"),
    ("ef_topk_-numel-mismatch", lambda d: gradsieve.ef_topk_(_z(4, device=d), _z(5, device=d), 1),
     "gradsieve.ef_topk_: residual must have as many elements as grad (5), got 4"),
    ("ef_topk_-k-negative", lambda d: gradsieve.ef_topk_(_z(5, device=d), _z(5, device=d), -2),
     "gradsieve.ef_topk_: k must be in [0, 5] (the number of elements), got -2"),
    ("ef_topk_-k-above-numel",
     lambda d: gradsieve.ef_topk_(_z((2, 3), device=d), _z(6, device=d), 7),
     "gradsieve.ef_topk_: k must be in [0, 6] (the number of elements), got 7"),
    ("ef_topk_-scale-inf",
     lambda d: gradsieve.ef_topk_(_z(5, device=d), _z(5, device=d), 1, float("inf")),
     "gradsieve.ef_topk_: scale must be finite, got inf"),
    ("ef_topk_-scale-minus-inf",
     lambda d: gradsieve.ef_topk_(_z(5, device=d), _z(5, device=d), 1, float("-inf")),
     "gradsieve.ef_topk_: scale must be finite, got -inf"),
    ("ef_topk_-scale-nan",
     lambda d: gradsieve.ef_topk_(_z(5, device=d), _z(5, device=d), 1, float("nan")),
     "gradsieve.ef_topk_: scale must be finite, got nan"),
    # threshold_select
    ("threshold_select-x-int32",
     lambda d: gradsieve.threshold_select(_z(5, torch.int32, d), _z((), device=d), 1),
     "gradsieve.threshold_select: x must be float32, float16 or bfloat16, got Int"),
    ("threshold_select-x-float64",
     lambda d: gradsieve.threshold_select(_z(5, torch.float64, d), _z((), device=d), 1),
     "gradsieve.threshold_select: x must be float32, float16 or bfloat16, got Double"),
    ("threshold_select-threshold-1d",
     lambda d: gradsieve.threshold_select(_z(5, device=d), _z(1, device=d), 1),
     "gradsieve.threshold_select: threshold must be a 0-d tensor, got [1]"),
    ("threshold_select-threshold-2d",
     lambda d: gradsieve.threshold_select(_z(5, device=d), _z((2, 3), device=d), 1),
     "gradsieve.threshold_select: threshold must be a 0-d tensor, got [2, 3]"),
    ("threshold_select-threshold-int64",
     lambda d: gradsieve.threshold_select(_z(5, device=d), _z((), torch.int64, d), 1),
     "gradsieve.threshold_select: threshold must be a floating-point tensor, got Long"),
    ("threshold_select-capacity-negative",
     lambda d: gradsieve.threshold_select(_z(5, device=d), _z((), device=d), -1),
     "gradsieve.threshold_select: capacity must be >= 0, got -1"),
    # quantize_int8
    ("quantize_int8-x-int8", lambda d: gradsieve.quantize_int8(_i8(5, d), 2),
     "gradsieve.quantize_int8: x must be float32, float16 or bfloat16, got Char"),
    ("quantize_int8-x-float64", lambda d: gradsieve.quantize_int8(_z(5, torch.float64, d), 2),
     "gradsieve.quantize_int8: x must be float32, float16 or bfloat16, got Double"),
    ("quantize_int8-chunk-zero", lambda d: gradsieve.quantize_int8(_z(5, device=d), 0),
     "gradsieve.quantize_int8: chunk must be > 0, got 0"),
    ("quantize_int8-chunk-negative", lambda d: gradsieve.quantize_int8(_z(5, device=d), -3),
     "gradsieve.quantize_int8: chunk must be > 0, got -3"),
    # dequantize_int8
    ("dequantize_int8-q-float32", lambda d: gradsieve.dequantize_int8(_z(5, device=d), _z(3, device=d), 2),
     "gradsieve.dequantize_int8: q must be an int8 tensor, got Float"),
    ("dequantize_int8-q-uint8",
     lambda d: gradsieve.dequantize_int8(_z(5, torch.uint8, d), _z(3, device=d), 2),
     "gradsieve.dequantize_int8: q must be an int8 tensor, got Byte"),
    ("dequantize_int8-chunk-zero", lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(3, device=d), 0),
     "gradsieve.dequantize_int8: chunk must be > 0, got 0"),
    ("dequantize_int8-chunk-negative",
     lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(3, device=d), -1),
     "gradsieve.dequantize_int8: chunk must be > 0, got -1"),
    ("dequantize_int8-scales-float64",
     lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(3, torch.float64, d), 2),
     "gradsieve.dequantize_int8: scales must be a float32 tensor, got Double"),
    ("dequantize_int8-scales-float16",
     lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(3, torch.float16, d), 2),
     "gradsieve.dequantize_int8: scales must be a float32 tensor, got Half"),
    ("dequantize_int8-scales-too-few", lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(2, device=d), 2),
     "gradsieve.dequantize_int8: scales must have ceil(q.numel() / chunk) = 3 elements, got 2"),
    ("dequantize_int8-scales-too-many",
     lambda d: gradsieve.dequantize_int8(_i8((2, 3), d), _z(7, device=d), 1),
     "gradsieve.dequantize_int8: scales must have ceil(q.numel() / chunk) = 6 elements, got 7"),
    ("dequantize_int8-dtype-float64",
     lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(3, device=d), 2, torch.float64),
     "gradsieve.dequantize_int8: dtype must be float32, float16 or bfloat16, got Double"),
    ("dequantize_int8-dtype-int32",
     lambda d: gradsieve.dequantize_int8(_i8(5, d), _z(3, device=d), 2, torch.int32),
     "gradsieve.dequantize_int8: dtype must be float32, float16 or bfloat16, got Int"),
    # sparse_accumulate_
    ("sparse_accumulate_-out-int32",
     lambda d: gradsieve.sparse_accumulate_(_z(5, torch.int32, d), _z(2, torch.int64, d), _z(2, device=d)),
     "gradsieve.sparse_accumulate_: out must be float32, float16 or bfloat16, got Int"),
    ("sparse_accumulate_-out-float64",
     lambda d: gradsieve.sparse_accumulate_(_z(5, torch.float64, d), _z(2, torch.int64, d), _z(2, device=d)),
     "gradsieve.sparse_accumulate_: out must be float32, float16 or bfloat16, got Double"),
    ("sparse_accumulate_-indices-float32",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, device=d), _z(2, device=d)),
     "gradsieve.sparse_accumulate_: indices must be int32 or int64, got Float"),
    ("sparse_accumulate_-indices-int16",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int16, d), _z(2, device=d)),
     "gradsieve.sparse_accumulate_: indices must be int32 or int64, got Short"),
    ("sparse_accumulate_-values-size-mismatch",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(3, torch.int64, d), _z(2, device=d)),
     "gradsieve.sparse_accumulate_: values must have as many elements as indices (3), got 2"),
    ("sparse_accumulate_-values-float64",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int64, d), _z(2, torch.float64, d)),
     "gradsieve.sparse_accumulate_: values must be float32, float16, bfloat16 or int8, got Double"),
    ("sparse_accumulate_-values-int32",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int64, d), _z(2, torch.int32, d)),
     "gradsieve.sparse_accumulate_: values must be float32, float16, bfloat16 or int8, got Int"),
    ("sparse_accumulate_-int8-without-scales",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int64, d), _i8(2, d), None, 2),
     "gradsieve.sparse_accumulate_: scales must be given when values are int8, got None"),
    ("sparse_accumulate_-int8-chunk-zero",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int64, d), _i8(2, d),
                                            _z(1, device=d), 0),
     "gradsieve.sparse_accumulate_: chunk must be > 0 when values are int8, got 0"),
    ("sparse_accumulate_-int8-scales-float64",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int64, d), _i8(2, d),
                                            _z(1, torch.float64, d), 2),
     "gradsieve.sparse_accumulate_: scales must be float32, got Double"),
    ("sparse_accumulate_-int8-scales-wrong-size",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(3, torch.int64, d), _i8(3, d),
                                            _z(3, device=d), 2),
     "gradsieve.sparse_accumulate_: scales must have ceil(values.numel() / chunk) = 2 elements, "
     "got 3"),
    ("sparse_accumulate_-scales-with-float-values",
     lambda d: gradsieve.sparse_accumulate_(_z(5, device=d), _z(2, torch.int64, d), _z(2, device=d),
                                            _z(1, device=d), 2),
     "gradsieve.sparse_accumulate_: scales must be None unless values are int8, got a tensor with "
     "values of dtype Float"),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in ERROR_CASES])
def test_argument_errors(call, message, device):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(device)


def test_error_cases_cover_every_op():
    assert {i.split("-")[0] for i, _, _ in ERROR_CASES} == set(OP_NAMES)


@pytest.mark.parametrize("op, make", [
    ("topk_abs", lambda x: gradsieve.topk_abs(x, 1)),
    ("quantile_abs", lambda x: gradsieve.quantile_abs(x, 0.5)),
    ("ef_topk_", lambda x: gradsieve.ef_topk_(_z(2**31, device="meta"), x, 1)),
    ("threshold_select", lambda x: gradsieve.threshold_select(x, _z((), device="meta"), 1)),
    ("quantize_int8", lambda x: gradsieve.quantize_int8(x, 4)),
    ("sparse_accumulate_",
     lambda x: gradsieve.sparse_accumulate_(x, _z(1, torch.int64, "meta"), _z(1, device="meta"))),
])
def test_more_than_int32_elements_rejected_on_meta(op, make):
    """The 2^31 - 1 element limit, checked without allocating (Meta kernels)."""
    arg = {"ef_topk_": "grad", "sparse_accumulate_": "out"}.get(op, "x")
    x = torch.empty(2**31, dtype=torch.float16, device="meta")
    with pytest.raises(RuntimeError, match=re.escape(
            f"gradsieve.{op}: {arg} must have at most 2^31 - 1 elements, got 2147483648")):
        make(x)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("indices, bad_position, bad_index", [
    ([0, 10, 3], 1, 10),
    ([9, 0, -1], 2, -1),
    ([5, 2**31 - 1], 1, 2**31 - 1),
])
def test_sparse_accumulate_out_of_range_index_cpu(indices, bad_position, bad_index, index_dtype):
    out = torch.arange(10, dtype=torch.float32)
    before = out.clone()
    idx = torch.tensor(indices, dtype=index_dtype)
    with pytest.raises(RuntimeError, match=re.escape(
            f"gradsieve.sparse_accumulate_: indices must lie in [0, 10) (out.numel()), "
            f"got indices[{bad_position}] = {bad_index}")):
        gradsieve.sparse_accumulate_(out, idx, torch.ones(len(indices)))
    assert torch.equal(out, before)  # checked before anything is written
    q = torch.ones(len(indices), dtype=torch.int8)
    with pytest.raises(RuntimeError, match=re.escape(f"got indices[{bad_position}] = {bad_index}")):
        gradsieve.sparse_accumulate_(out, idx, q, torch.ones(1), 4)
    assert torch.equal(out, before)


def _device_mismatch_cases(dev, other):
    """(call, message): the first tensor argument on ``dev``, one other argument on ``other``."""
    ref = str(torch.empty(0, device=dev).device)  # "cuda:0" for "cuda"
    oth = str(torch.empty(0, device=other).device)
    z = lambda shape, dtype=torch.float32, device=dev: _z(shape, dtype, device)  # noqa: E731
    return [
        (lambda: gradsieve.ef_topk_(z(5, device=other), z(5), 1),
         f"gradsieve.ef_topk_: residual must be on the same device as grad ({ref}), got {oth}"),
        (lambda: gradsieve.threshold_select(z(5), z((), device=other), 1),
         f"gradsieve.threshold_select: threshold must be on the same device as x ({ref}), "
         f"got {oth}"),
        (lambda: gradsieve.dequantize_int8(z(5, torch.int8), z(3, device=other), 2),
         f"gradsieve.dequantize_int8: scales must be on the same device as q ({ref}), got {oth}"),
        (lambda: gradsieve.sparse_accumulate_(z(5), z(2, torch.int64, other), z(2)),
         f"gradsieve.sparse_accumulate_: indices must be on the same device as out ({ref}), "
         f"got {oth}"),
        (lambda: gradsieve.sparse_accumulate_(z(5), z(2, torch.int64), z(2, device=other)),
         f"gradsieve.sparse_accumulate_: values must be on the same device as out ({ref}), "
         f"got {oth}"),
        (lambda: gradsieve.sparse_accumulate_(z(5), z(2, torch.int64), z(2, torch.int8),
                                              z(1, device=other), 2),
         f"gradsieve.sparse_accumulate_: scales must be on the same device as out ({ref}), "
         f"got {oth}"),
    ]


@pytest.mark.parametrize("dev, other", [("meta", "cpu"), ("cpu", "meta")])
def test_device_mismatch_meta_and_cpu(dev, other):
    for call, message in _device_mismatch_cases(dev, other):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


@requires_cuda
@pytest.mark.parametrize("dev, other", [("cuda", "cpu"), ("cpu", "cuda")])
def test_device_mismatch_cuda_and_cpu(dev, other):
    for call, message in _device_mismatch_cases(dev, other):
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


@requires_cuda
@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in ERROR_CASES])
def test_argument_errors_cuda(call, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call("cuda")


# ------------------------------------------------------------------------------ 4 CPU/CUDA parity
def _assert_identical(got: torch.Tensor, want: torch.Tensor):
    """Bit-for-bit up to NaN payloads: same dtype and shape, equal values (NaN == NaN) and equal
    signs of zeros."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if want.is_floating_point():
        finite = ~torch.isnan(want)
        assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))


def _parity_params(op):
    return [pytest.param(i, id=s.name) for i, s in enumerate(SAMPLE_INPUTS[op]("cpu", True))]


def _cpu_and_cuda(op, index):
    return SAMPLE_INPUTS[op]("cpu", True)[index], SAMPLE_INPUTS[op]("cuda", True)[index]


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("topk_abs"))
def test_cuda_parity_topk_abs(index):
    cpu, cuda = _cpu_and_cuda("topk_abs", index)
    for got, want in zip(gradsieve.topk_abs(*cuda.args), gradsieve.topk_abs(*cpu.args)):
        assert got.device.type == "cuda"
        _assert_identical(got, want)


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("quantile_abs"))
def test_cuda_parity_quantile_abs(index):
    cpu, cuda = _cpu_and_cuda("quantile_abs", index)
    got = gradsieve.quantile_abs(*cuda.args)
    assert got.device.type == "cuda"
    _assert_identical(got, gradsieve.quantile_abs(*cpu.args))


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("ef_topk_"))
def test_cuda_parity_ef_topk_(index):
    cpu, cuda = _cpu_and_cuda("ef_topk_", index)
    got = gradsieve.ef_topk_(*cuda.args)
    want = gradsieve.ef_topk_(*cpu.args)
    for a, b in zip(got, want):
        _assert_identical(a, b)
    _assert_identical(cuda.args[0], cpu.args[0])  # the residual, exactly (no fused multiply-add)


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("threshold_select"))
def test_cuda_parity_threshold_select(index):
    cpu, cuda = _cpu_and_cuda("threshold_select", index)
    for got, want in zip(gradsieve.threshold_select(*cuda.args),
                         gradsieve.threshold_select(*cpu.args)):
        _assert_identical(got, want)


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("quantize_int8"))
def test_cuda_parity_quantize_int8_round_to_nearest(index):
    cpu, cuda = _cpu_and_cuda("quantize_int8", index)
    for got, want in zip(gradsieve.quantize_int8(*cuda.args), gradsieve.quantize_int8(*cpu.args)):
        _assert_identical(got, want)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_quantize_int8_stochastic_reproducible_and_unbiased(dtype):
    # The CPU and CUDA generators differ, so stochastic codes are compared only on CUDA itself.
    chunk = 512
    x = make_input(8192, dtype, "cuda", "normal", seed=21)
    _, nearest_scales = gradsieve.quantize_int8(x, chunk)
    gen = lambda seed: torch.Generator(device="cuda").manual_seed(seed)  # noqa: E731
    q1, s1 = gradsieve.quantize_int8(x, chunk, True, gen(11))
    q2, s2 = gradsieve.quantize_int8(x, chunk, True, gen(11))
    q3, s3 = gradsieve.quantize_int8(x, chunk, True, gen(12))
    assert torch.equal(q1, q2) and torch.equal(s1, s2) and not torch.equal(q1, q3)
    assert torch.equal(s1, nearest_scales) and torch.equal(s3, nearest_scales)
    # Each code is floor(x / scale) or the next integer.
    r = x.float() / s1.repeat_interleave(chunk)[: x.numel()]
    assert bool(((q1.float() - torch.floor(r)).abs() <= 1).all())
    assert bool(((q1.float() - r).abs() < 1 + 1e-5).all())
    # Unbiased: the mean of many draws converges to x (5 standard errors; each draw's error is
    # bounded by one step, so its standard deviation is at most step / 2).
    trials = 400
    g = gen(0)
    total = torch.zeros(x.numel(), device="cuda")
    for _ in range(trials):
        q, s = gradsieve.quantize_int8(x, chunk, True, g)
        total += gradsieve.dequantize_int8(q, s, chunk).reshape(-1)
    mean = total / trials
    step = s1.repeat_interleave(chunk)[: x.numel()]
    bound = 5 * step / 2 / math.sqrt(trials) + 1e-6
    assert bool(((mean - x.float().reshape(-1)).abs() <= bound).all())
    # And the default CUDA generator (no generator given) works and also rounds stochastically.
    q_default, _ = gradsieve.quantize_int8(x, chunk, True)
    assert q_default.device.type == "cuda" and bool(((q_default.float() - r).abs() < 1 + 1e-5).all())


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("dequantize_int8"))
def test_cuda_parity_dequantize_int8(index):
    cpu, cuda = _cpu_and_cuda("dequantize_int8", index)
    _assert_identical(gradsieve.dequantize_int8(*cuda.args), gradsieve.dequantize_int8(*cpu.args))


@requires_cuda
@pytest.mark.parametrize("index", _parity_params("sparse_accumulate_"))
def test_cuda_parity_sparse_accumulate_(index):
    cpu, cuda = _cpu_and_cuda("sparse_accumulate_", index)
    assert gradsieve.sparse_accumulate_(*cuda.args) is None
    gradsieve.sparse_accumulate_(*cpu.args)
    got, want = cuda.args[0].cpu(), cpu.args[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    # CUDA adds with atomics, so with duplicate indices the order of the additions, and the last
    # bits of the sums, differ: a few ulps of the largest magnitude.
    eps = torch.finfo(want.dtype).eps
    atol = 8 * eps * max(1.0, float(want.float().abs().max())) if want.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@requires_cuda
def test_cuda_parity_sparse_accumulate_unique_indices_exact():
    """Without duplicates no two atomics touch one element: CUDA equals CPU exactly."""
    g = torch.Generator().manual_seed(5)
    for out_dtype in DTYPES:
        out = torch.randn(10_000, generator=g).to(out_dtype)
        indices = torch.randperm(10_000, generator=g)[:3001]
        values = torch.randn(3001, generator=g)
        out_cuda = out.cuda()
        gradsieve.sparse_accumulate_(out_cuda, indices.cuda(), values.cuda())
        gradsieve.sparse_accumulate_(out, indices, values)
        _assert_identical(out_cuda, out)


@requires_cuda
@pytest.mark.parametrize("op", OP_NAMES)
def test_cuda_compile_fullgraph_matches_eager(op, fresh_dynamo):
    fn, make_args = _compile_case(op, 301)
    to_cuda = lambda args: tuple(a.cuda() if isinstance(a, torch.Tensor) else a  # noqa: E731
                                 for a in args)
    eager_args, compiled_args = to_cuda(make_args()), to_cuda(make_args())
    want = fn(*eager_args)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)(*compiled_args)
    if op == "sparse_accumulate_":  # atomics: compare within float tolerance
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        _assert_same(got, want)
        _assert_same(compiled_args, eager_args)


# ---------------------------------------------------------------------------------- 5 the package
def test_import_and_cuda_kernels_built():
    import importlib

    module = importlib.import_module("gradsieve")
    built = module.cuda_kernels_built()
    assert isinstance(built, bool)
    assert HAS_CUDA == (built and torch.cuda.is_available())
    for name in OP_NAMES:
        assert callable(getattr(module, name)) and name in module.__all__
        assert hasattr(OPS, name)
        for key in ("CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradsieve::{name}", key), \
                (name, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradsieve::{name}", "CUDA") \
            == built


def test_every_registered_op_has_cpu_meta_and_cuda_kernels_and_a_python_face():
    """All ops of the namespace, the ones added after OP_NAMES too (adaptive_select,
    csr16_indices, predictive_score, ...): a CPU and a Meta kernel, a CUDA kernel exactly when
    the CUDA kernels are built, and a documented function in gradsieve's namespace."""
    import gradsieve

    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("gradsieve::"))
    assert set(OP_NAMES) <= set(names) and len(names) > len(OP_NAMES), names
    built = gradsieve.cuda_kernels_built()
    for name in names:
        for key in ("CPU", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradsieve::{name}", key), (name, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradsieve::{name}", "CUDA") == built, name
        function = getattr(gradsieve, name)
        assert name in gradsieve.__all__ and function.__doc__, name

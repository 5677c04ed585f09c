"""Calls every gradsieve op on small and awkward inputs and checks each result on the CPU.

Written to run under compute-sanitizer (memcheck, racecheck, synccheck, initcheck; stage 3 of
scripts/gpu_check.sh), so it stays small: sizes 0, 1, 7, 255, 1000, 4097, 65537 (and 2^20 + 3 in
float32 for the grid-stride paths), float32/float16/bfloat16, k = 0, 1, n / 3 and n, odd chunks,
non-contiguous inputs, NaN/Inf and tied magnitudes, threshold_select overflow, sparse_accumulate_
with duplicate indices and int8 payloads, adaptive_select with and without overflow (bitwise:
every float operation is rounded on its own), csr16_indices with malformed payloads,
predictive_score with 1 to 16 history vectors (float32 and bfloat16) and 1 to 64 hidden units,
influence_update with and without a Hessian diagonal, segment_mean over empty, tiny, many and
chunk-spanning segments, and hostile positions: sparse_accumulate_ and regtopk_select_ given
indices outside their range (just outside and at the int32/int64 extremes) must skip and flag them
with ``bad`` and raise the named error without it, and the wire decode of random bytes must never
write outside its buffer and must flag the same payloads as on the CPU.
Every result is compared with a reference written here in plain torch on the CPU (float64 where it
matters), so the driver is also a correctness smoke test of the CUDA kernels (adaptive_select,
csr16_indices and influence_update are also compared bitwise with their CPU ops, predictive_score
within its float32 tolerance, segment_mean within 1 ulp); with ``--device cpu`` it checks the CPU
kernels the same way.

It prints one line per op and exits 1 if any case differs from its reference or raises.

    python scripts/cuda_op_driver.py --device cuda            # about a minute under memcheck
    python scripts/cuda_op_driver.py --device cuda --small    # racecheck / synccheck / initcheck
    python scripts/cuda_op_driver.py --device cpu             # a few seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

import gradsieve

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from inputs import make_input  # noqa: E402  (tests/inputs.py: the test suite's data)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SIZES = (0, 1, 7, 255, 1000, 4097, 65537)
SMALL_SIZES = (0, 1, 7, 255, 4097)
LARGE = (1 << 20) + 3  # float32 only, full mode: more tiles and blocks than the GPU runs at once
# Two float32 roundings (the weight, then the product) separate regtopk_select_'s score from the
# float64 reference: entries this close to the cut may be swapped (the rule of tests/test_regtopk.py).
NEAR_TIE_RTOL = 1e-6

Case = Tuple[str, Callable[[], None]]


# =============================================================================== inputs
def on_device(x: torch.Tensor, device: str, layout: str) -> torch.Tensor:
    """x on the device, as a contiguous tensor or as a non-contiguous view holding the same
    values in the same logical (flattened) order."""
    if layout == "contiguous":
        return x.to(device)
    if layout == "strided":  # every other element of a buffer twice as long
        base = torch.empty(2 * x.numel(), dtype=x.dtype, device=device)
        base[::2] = x.to(device)
        base[1::2] = 7.0
        return base[::2]
    if layout == "transposed":  # x = t.t() for a (cols, rows) buffer t
        rows, cols = factor(x.numel())
        return x.reshape(rows, cols).t().contiguous().to(device).t()
    raise ValueError(layout)


def factor(n: int) -> Tuple[int, int]:
    for rows in range(int(math.isqrt(n)), 0, -1):
        if n % rows == 0:
            return rows, n // rows
    return 1, n


def counts(n: int) -> List[int]:
    """k or capacity values to try for n elements: 0, 1, a third, all."""
    return sorted({0, min(1, n), (n + 2) // 3, n})


def flat64(x: torch.Tensor) -> torch.Tensor:
    """x flattened on the CPU in float64 (exact for float32, float16 and bfloat16)."""
    return x.detach().reshape(-1).cpu().double()


# =============================================================================== references
def order_best_first(score: torch.Tensor) -> torch.Tensor:
    """All indices of a float64 score (>= 0 or NaN), best first: NaN, then larger scores, then
    the lower index among equal scores."""
    nan = torch.isnan(score)
    key = torch.where(nan, torch.full_like(score, -1.0), score)
    order = torch.sort(-key + 0.0, stable=True).indices  # + 0.0: -0.0 sorts as 0.0
    return order[torch.sort((~nan[order]).to(torch.int8), stable=True).indices]


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k best entries of a float64 score, in ascending index order (int64)."""
    return torch.sort(order_best_first(score)[:k]).values


def expect_equal(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise-equal values (NaN equal to NaN), same dtype and shape."""
    got = got.detach().cpu()
    want = want.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{what}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def expect_selection(what: str, got: torch.Tensor, score: torch.Tensor, k: int,
                     near_tie_rtol: float = 0.0) -> None:
    """got (int64 [k], ascending, distinct) is the top-k of score; with near_tie_rtol, entries
    whose scores are that close to the cut may be swapped."""
    got = got.cpu()
    if got.dtype != torch.int64 or got.shape != (k,):
        raise AssertionError(f"{what}: got {got.dtype}{list(got.shape)}, want int64[{k}]")
    if k > 1 and not bool((got[1:] > got[:-1]).all()):
        raise AssertionError(f"{what}: indices are not ascending and distinct")
    want = top_indices(score, k)
    if torch.equal(got, want):
        return
    swapped = torch.tensor(sorted(set(got.tolist()) ^ set(want.tolist())), dtype=torch.int64)
    if near_tie_rtol and k:
        cut = score[order_best_first(score)[k - 1]]
        near = (score[swapped] - cut).abs() <= near_tie_rtol * cut
        if math.isfinite(float(cut)) and bool(near.all()):
            return
    raise AssertionError(f"{what}: selection differs from the reference at indices {swapped[:8].tolist()}")


def ref_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The order statistic of |x| at rank floor(q * (n - 1)); NaN if x is empty or holds a NaN."""
    a = flat64(x).abs()
    if a.numel() == 0 or bool(torch.isnan(a).any()):
        return torch.tensor(math.nan, dtype=x.dtype)
    return torch.quantile(a, q, interpolation="lower").to(x.dtype)


def ref_threshold_select(x: torch.Tensor, threshold: float, capacity: int):
    a = flat64(x)
    nan = torch.isnan(a)
    if math.isnan(threshold):
        passing = nan
    elif threshold <= 0:
        passing = torch.ones_like(nan)
    else:
        passing = (a.abs() >= threshold) | nan
    count = int(passing.sum())
    if count <= capacity:
        idx = torch.nonzero(passing).reshape(-1)
    else:
        idx = top_indices(a.abs(), capacity)
    values = torch.zeros(capacity, dtype=x.dtype)
    indices = torch.zeros(capacity, dtype=torch.int64)
    values[: idx.numel()] = x.detach().reshape(-1).cpu()[idx]
    indices[: idx.numel()] = idx
    return values, indices, torch.tensor(count)


def ref_quantize(x: torch.Tensor, chunk: int):
    """Round-to-nearest per-chunk absmax quantization: codes (int8, x's shape), scales."""
    flat = x.detach().reshape(-1).cpu().float()
    n = flat.numel()
    chunks = -(-n // chunk)
    blocks = torch.zeros(chunks * chunk)
    blocks[:n] = flat
    blocks = blocks.view(chunks, chunk)
    finite = torch.isfinite(blocks).all(dim=1)
    scales = torch.where(finite, blocks.abs().amax(dim=1) / 127.0, torch.full((chunks,), math.nan))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp(-127, 127)
    codes = torch.where((scales > 0)[:, None], codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n].to(torch.int8).view(x.shape), scales


def regtopk_reference(residual, grad, prev_indices, prev_sent, prev_agg, mu, world_size, q):
    """(a, score): a = residual + grad in float32 (as the op computes it) and the RegTop-k score of
    every entry in float64, from the formula of ops.regtopk_select_'s docstring."""
    a = residual.detach().reshape(-1).cpu().float() + grad.detach().reshape(-1).cpu().float()
    mag = a.double().abs()
    idx = prev_indices.reshape(-1).cpu().long()
    sent = flat64(prev_sent)
    agg = flat64(prev_agg)
    unsent = 1.0 if q is None else math.tanh(abs(1.0 + q) / mu)
    ratio = agg / (sent / world_size)  # 1 + Delta = g_agg / (omega * sent)
    known = (sent != 0) & ~torch.isnan(ratio)
    weight = torch.where(known, torch.tanh(ratio.abs() / mu), torch.full_like(ratio, unsent))
    score = unsent * mag
    if idx.numel():
        listed = weight * mag[idx]
        # An index listed twice keeps its lower score; NaN counts as the largest.
        lowest = torch.full_like(score, math.inf).scatter_reduce(
            0, idx, torch.where(torch.isnan(listed), math.inf, listed), "amin")
        numbers = torch.zeros_like(score).index_add(0, idx, (~torch.isnan(listed)).double())
        hit = torch.zeros(score.numel(), dtype=torch.bool)
        hit[idx] = True
        score = torch.where(hit, torch.where(numbers > 0, lowest, math.nan), score)
    return a, score


def ref_adaptive_select(grad, average, momentum, residual, alpha, beta, q, compare_average,
                        error_feedback, capacity):
    """The six outputs of adaptive_select from its docstring's formulas, computed in float64 and
    rounded to float32 after every operation (exact: a float64 sum, difference, product or
    quotient of two float32 values rounds to the correctly rounded float32 result)."""
    def f32(t: torch.Tensor) -> torch.Tensor:  # round to float32, go on in float64
        return t.to(torch.float32).double()

    def c(v: float) -> float:  # a scalar as the op uses it: rounded to float32
        return float(torch.tensor(v, dtype=torch.float32))

    a = f32(flat64(residual) + flat64(grad))
    ma = f32(f32(c(alpha) * a.abs()) + f32(c(1.0 - alpha) * flat64(average)))
    threshold = ref_quantile(ma.float(), q)
    key = ma if compare_average else a.abs()
    m = torch.where(key >= float(threshold), a, torch.zeros_like(a))  # NaN threshold: none pass
    blend = f32(f32(c(beta) * m) + f32(c(1.0 - beta) * flat64(momentum)))
    left = f32(a - m) if error_feedback else torch.zeros_like(a)
    residual_out = f32(left + f32(blend / c(beta)))
    nonzero = blend != 0  # NaN included
    count = int(nonzero.sum())
    if count <= capacity:
        idx = torch.nonzero(nonzero).reshape(-1)
    else:
        idx = top_indices(blend.abs(), capacity)
    values = torch.zeros(capacity, dtype=torch.float32)
    indices = torch.zeros(capacity, dtype=torch.int64)
    values[: idx.numel()] = blend.float()[idx]
    indices[: idx.numel()] = idx
    return ma.float(), residual_out.float(), values, indices, torch.tensor(count), threshold


def ref_predictive_score(grad, residual, history, newest, weights, hidden, product):
    """predictive_score from its docstring's formulas in float64: (accumulator as float32, score,
    s, bound). a is one float32 addition and s the float64 mean rounded to float32, as the op
    keeps them; `bound` is the score's tolerance: rtol 1e-5 plus 2e-5 times the sum of the
    magnitudes of the logit's terms (times |a| for the product form), to which the float32 sums'
    rounding errors are proportional."""
    a32 = residual.detach().reshape(-1).cpu().float() + grad.detach().reshape(-1).cpu().float()
    a, g = a32.double(), flat64(grad)
    n = a.numel()
    s = float((a.abs().sum() / n).float()) if n else 1.0
    s = 1.0 if s == 0.0 else s
    count = len(history)
    features = count + 2
    h = torch.stack([flat64(history[(newest - j) % count]) for j in range(count)])
    x = torch.cat([torch.log1p(a.abs() / s)[None], torch.log1p(g.abs() / s)[None],
                   torch.sign(a) * torch.sign(h) * torch.log1p(h.abs() / s)])
    w = flat64(weights)
    w1 = w[: hidden * features].view(hidden, features)
    b1 = w[hidden * features: hidden * features + hidden]
    w2 = w[hidden * features + hidden: hidden * features + 2 * hidden]
    b2 = w[hidden * features + 2 * hidden]
    z = torch.clamp_min(b1[:, None] + w1 @ x, 0.0)  # keeps a NaN
    logit = b2 + w2 @ z
    terms = b2.abs() + w2.abs() @ (b1.abs()[:, None] + w1.abs() @ x.abs())
    if product:
        score, terms = torch.sigmoid(logit) * a.abs(), terms * a.abs()
    else:
        score = torch.where(logit > 20.0, logit, torch.log1p(torch.exp(logit.clamp(max=20.0))))
    return a32, score, s, 1e-5 * score.abs() + 2e-5 * (1.0 + terms)


def ref_influence_update(grad, residual, score, hessian, eps, rho):
    """(acc, score_out) of influence_update from its docstring's order of operations, computed in
    float64 and rounded to float32 after every operation (exact, as in ref_adaptive_select)."""
    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).double()

    def c(v: float) -> float:
        return float(torch.tensor(v, dtype=torch.float32))

    a = f32(flat64(residual) + flat64(grad))
    influence = f32(a.abs() * c(eps))
    if hessian is not None:
        u = f32(0.5 * flat64(hessian).abs())
        u = f32(u * c(eps))
        u = f32(u * c(eps))
        influence = f32(influence + u)
    out = f32(f32(c(rho) * flat64(score)) + f32(c(1.0 - rho) * influence))
    return a.float(), out.float()


def ref_segment_mean(x: torch.Tensor, numels: List[int]) -> torch.Tensor:
    """Each segment's float64 sum over its length, rounded once to float32 (0 when empty)."""
    a = flat64(x)
    out = torch.zeros(len(numels), dtype=torch.float32)
    start = 0
    for j, m in enumerate(numels):
        if m:
            out[j] = float(a[start:start + m].sum() / m)
        start += m
    return out


def ref_csr16_indices(counts: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor,
                      numel: int) -> torch.Tensor:
    """csr16_indices from its docstring: slot j of rank w lies in the first block whose running
    sum of max(counts, 0) exceeds j; -1 beyond valid, beyond the counts, or at >= numel."""
    counts, offsets, valid = counts.cpu().long(), offsets.cpu().long(), valid.cpu().long()
    world, slots = offsets.shape
    blocks = counts.shape[1]
    out = torch.full((world, slots), -1, dtype=torch.int64)
    if blocks == 0 or slots == 0 or world == 0:
        return out
    ends = counts.clamp(min=0).cumsum(1).contiguous()
    j = torch.arange(slots).expand(world, slots).contiguous()
    block = torch.searchsorted(ends, j, right=True)
    pos = block * 65536 + (offsets & 0xFFFF)
    ok = (j < valid.clamp(0, slots)[:, None]) & (block < blocks) & (pos < numel)
    return torch.where(ok, pos, out)


# =============================================================================== cases per op
def cases_topk_abs(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                x_cpu = make_input(n, dtype, kind=kind, seed=next(seeds))
                x = on_device(x_cpu, device, "contiguous")
                for k in counts(n):
                    def run(x=x, x_cpu=x_cpu, k=k):
                        values, indices = gradsieve.topk_abs(x, k)
                        expect_selection("indices", indices, flat64(x_cpu).abs(), k)
                        expect_equal("values", values, x_cpu.reshape(-1)[indices.cpu()])
                    yield f"n={n} {dtype} {kind} k={k}", run


def cases_quantile_abs(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                x_cpu = make_input(n, dtype, kind=kind, seed=next(seeds))
                x = on_device(x_cpu, device, "contiguous")
                for q in (0.0, 0.5, 0.999, 1.0):
                    def run(x=x, x_cpu=x_cpu, q=q):
                        expect_equal("quantile", gradsieve.quantile_abs(x, q), ref_quantile(x_cpu, q))
                    yield f"n={n} {dtype} {kind} q={q}", run


def cases_ef_topk(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                if kind == "ties":
                    continue
                grad_cpu = make_input(n, dtype, kind=kind, seed=next(seeds))
                residual_cpu = make_input(n, torch.float32, kind="normal", seed=next(seeds)) * 0.25
                for k in counts(n):
                    for scale in (1.0, 0.5):  # exact products: an FMA gives the same sum
                        def run(grad_cpu=grad_cpu, residual_cpu=residual_cpu, k=k, scale=scale):
                            check_ef_topk(device, residual_cpu, grad_cpu, k, scale, "contiguous")
                        yield f"n={n} {dtype} {kind} k={k} scale={scale}", run


def check_ef_topk(device, residual_cpu, grad_cpu, k, scale, layout):
    residual = on_device(residual_cpu, device, layout)
    grad = on_device(grad_cpu, device, layout)
    acc = residual_cpu.reshape(-1) + scale * grad_cpu.reshape(-1).float()
    values, indices = gradsieve.ef_topk_(residual, grad, k, scale)
    expect_selection("indices", indices, acc.double().abs(), k)
    expect_equal("values", values, acc[indices.cpu()])
    acc[indices.cpu()] = 0.0
    expect_equal("residual", residual.reshape(-1), acc)


def cases_regtopk_select(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                if kind == "ties":
                    continue
                for index_dtype, duplicates in ((torch.int64, False), (torch.int32, True)):
                    seed = next(seeds)
                    g = torch.Generator().manual_seed(seed)
                    grad_cpu = make_input(n, dtype, kind=kind, seed=seed)
                    residual_cpu = make_input(n, torch.float32, kind="normal", seed=seed + 1) * 0.25
                    m = n // 10
                    if duplicates and n:
                        prev = torch.randint(0, n, (m + 1,), generator=g)
                    else:
                        prev = torch.randperm(n, generator=g)[:m]
                    sent = torch.randn(prev.numel(), generator=g)
                    agg = torch.randn(prev.numel(), generator=g)
                    if prev.numel() > 2:
                        sent[0] = 0.0  # weighted as not sent
                        agg[1] = 0.0  # cancelled: weight 0
                    prev = prev.to(index_dtype)
                    for k in counts(n):
                        for mu, world, q in ((4.0, 8, None), (0.5, 1, 0.25)):
                            def run(grad_cpu=grad_cpu, residual_cpu=residual_cpu, prev=prev,
                                    sent=sent, agg=agg, k=k, mu=mu, world=world, q=q):
                                check_regtopk(device, residual_cpu, grad_cpu, prev, sent, agg, mu,
                                              k, world, q, "contiguous")
                            yield (f"n={n} {dtype} {kind} m={prev.numel()} {index_dtype} k={k} "
                                   f"mu={mu} world={world} q={q}"), run


def check_regtopk(device, residual_cpu, grad_cpu, prev, sent, agg, mu, k, world, q, layout):
    a, score = regtopk_reference(residual_cpu, grad_cpu, prev, sent, agg, mu, world, q)
    residual = on_device(residual_cpu, device, layout)
    values, indices = gradsieve.regtopk_select_(
        residual, on_device(grad_cpu, device, layout), prev.to(device), sent.to(device),
        agg.to(device), mu, k, world, q)
    expect_selection("indices", indices, score, k, near_tie_rtol=NEAR_TIE_RTOL)
    expect_equal("values", values, a[indices.cpu()])
    a[indices.cpu()] = 0.0
    expect_equal("residual", residual.reshape(-1), a)


def cases_threshold_select(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                x_cpu = make_input(n, dtype, kind=kind, seed=next(seeds))
                x = on_device(x_cpu, device, "contiguous")
                for threshold in (0.0, 1.0, 1e9, math.nan):
                    # capacity n // 4 overflows at thresholds 0 and 1
                    for capacity in sorted({0, n // 4, n + 5}):
                        def run(x=x, x_cpu=x_cpu, threshold=threshold, capacity=capacity):
                            check_threshold(x, x_cpu, threshold, capacity)
                        yield f"n={n} {dtype} {kind} threshold={threshold} capacity={capacity}", run


def check_threshold(x, x_cpu, threshold, capacity):
    t = torch.tensor(threshold, dtype=torch.float32, device=x.device)
    values, indices, count = gradsieve.threshold_select(x, t, capacity)
    want_v, want_i, want_c = ref_threshold_select(x_cpu, float(t), capacity)
    expect_equal("count", count, want_c)
    expect_equal("indices", indices, want_i)
    expect_equal("values", values, want_v)


def cases_quantize_int8(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                if kind == "ties":
                    continue
                x_cpu = make_input(n, dtype, kind=kind, seed=next(seeds))
                x = on_device(x_cpu, device, "contiguous")
                for chunk in (1, 3, 256, 4096, 5000):
                    def run(x=x, x_cpu=x_cpu, chunk=chunk):
                        check_quantize(x, x_cpu, chunk)
                    yield f"n={n} {dtype} {kind} chunk={chunk}", run


def check_quantize(x, x_cpu, chunk):
    q, scales = gradsieve.quantize_int8(x, chunk)
    want_q, want_scales = ref_quantize(x_cpu, chunk)
    expect_equal("scales", scales, want_scales)
    finite_entries = torch.isfinite(want_scales).repeat_interleave(chunk)[: x_cpu.numel()]
    expect_equal("codes", q.reshape(-1).cpu()[finite_entries], want_q.reshape(-1)[finite_entries])
    if q.shape != x.shape:
        raise AssertionError(f"codes: shape {list(q.shape)}, want {list(x.shape)}")
    # Stochastic rounding: the same scales, codes floor or ceil of x / scale, reproducible.
    make_gen = lambda: torch.Generator(device=x.device).manual_seed(1234)  # noqa: E731
    q1, s1 = gradsieve.quantize_int8(x, chunk, True, make_gen())
    q2, _ = gradsieve.quantize_int8(x, chunk, True, make_gen())
    expect_equal("stochastic scales", s1, want_scales)
    expect_equal("stochastic codes, same seed", q1, q2)
    step = want_scales.repeat_interleave(chunk)[: x_cpu.numel()]
    usable = step > 0
    ratio = x_cpu.reshape(-1).float()[usable] / step[usable]
    codes = q1.reshape(-1).cpu()[usable].float()
    if not bool(((codes - ratio).abs() < 1 + 1e-5).all()):
        raise AssertionError("stochastic codes: a code is more than one step from x / scale")
    # The inverse, in every dtype.
    for dtype in DTYPES:
        want = (want_q.reshape(-1).float() * step).to(dtype).view(x.shape)
        expect_equal(f"dequantize to {dtype}", gradsieve.dequantize_int8(q, scales, chunk, dtype), want)


def cases_sparse_accumulate(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        if n == 0:
            continue
        for out_dtype in DTYPES:
            for values_dtype in DTYPES + (torch.int8,):
                # m = 3n: many duplicate indices; int32 and int64 indices alternate
                for position, m in enumerate(sorted({0, 1, 100, 3 * n})):
                    index_dtype = (torch.int32, torch.int64)[position % 2]
                    seed = next(seeds)

                    def run(n=n, out_dtype=out_dtype, values_dtype=values_dtype,
                            index_dtype=index_dtype, m=m, seed=seed):
                        check_sparse_accumulate(device, n, out_dtype, values_dtype, index_dtype, m,
                                                seed, "contiguous")
                    yield f"n={n} out={out_dtype} values={values_dtype} {index_dtype} m={m}", run


def payload_values(m: int, values_dtype: torch.dtype, int8_chunk: int, g: torch.Generator):
    """(values, scales, chunk, contributions) of a sparse payload of m entries: int8 with per-chunk
    scales (chunk = int8_chunk) or floating point (no scales, chunk 0); contributions in float64."""
    if values_dtype == torch.int8:
        values = torch.randint(-127, 128, (m,), generator=g).to(torch.int8)
        scales = torch.rand(-(-m // int8_chunk), generator=g)
        return values, scales, int8_chunk, values.double() * scales.double().repeat_interleave(int8_chunk)[:m]
    values = torch.randn(m, generator=g).to(values_dtype)
    return values, None, 0, values.double()


def check_sparse_accumulate(device, n, out_dtype, values_dtype, index_dtype, m, seed, layout):
    g = torch.Generator().manual_seed(seed)
    out_cpu = torch.randn(n, generator=g).to(out_dtype)
    indices = torch.randint(0, n, (m,), generator=g).to(index_dtype)
    values, scales, chunk, contributions = payload_values(m, values_dtype, 3, g)
    want = flat64(out_cpu).index_add(0, indices.long(), contributions)
    out = on_device(out_cpu, device, layout)
    gradsieve.sparse_accumulate_(out, indices.to(device), values.to(device),
                                 None if scales is None else scales.to(device), chunk)
    # Duplicates add up in an order of the backend's choosing, each sum rounded to out's dtype:
    # allow a few roundings of the magnitudes involved.
    magnitude = flat64(out_cpu).abs().index_add(0, indices.long(), contributions.abs())
    hits = torch.zeros(n, dtype=torch.float64).index_add(0, indices.long(),
                                                         torch.ones(m, dtype=torch.float64))
    eps = torch.finfo(out_dtype).eps
    bound = 2 * eps * (hits + 1) * magnitude + 1e-30
    err = (flat64(out) - want).abs()
    if out.dtype != out_dtype or not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound))
        raise AssertionError(f"out[{worst}] = {float(flat64(out)[worst])}, reference {float(want[worst])}")


# (alpha, beta, q, compare_average, error_feedback): exact and inexact weights, both comparisons,
# momentum carried (beta < 1: most Q nonzero, capacity n / 3 overflows) or not (beta = 1: about
# (1 - q) n nonzero, so q = 0.9 fits in n / 3 and q = 0 overflows it).
ADAPTIVE_SETTINGS = ((1.0, 1.0, 0.9, False, True), (0.1, 0.9, 0.99, True, True),
                     (0.3, 1.0, 0.0, True, False), (0.05, 0.7, 1.0, False, False))


def adaptive_inputs(n: int, dtype: torch.dtype, kind: str, seed: int):
    """grad (dtype, of `kind`; for every other seed, special values without NaN, which would
    make the threshold NaN), average (>= 0), momentum (ties: many zeros), residual."""
    grad = make_input(n, dtype, kind=kind, seed=seed)
    if kind == "special" and seed % 2:
        grad = grad.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    average = make_input(n, torch.float32, kind="normal", seed=seed + 1).abs()
    momentum = make_input(n, torch.float32, kind="ties", seed=seed + 2) * 0.5
    residual = make_input(n, torch.float32, kind="normal", seed=seed + 3) * 0.25
    return grad, average, momentum, residual


def check_adaptive_select(device, inputs, setting, capacity, layout):
    """The op on the device against the reference and, on CUDA, bitwise against the CPU op."""
    on = [on_device(t, device, layout) for t in inputs]
    got = gradsieve.adaptive_select(*on, *setting, capacity)
    want = ref_adaptive_select(*inputs, *setting, capacity)
    names = ("average_out", "residual_out", "values", "indices", "count", "threshold")
    for name, g, w in zip(names, got, want):
        expect_equal(name, g, w)
    if device != "cpu":
        for name, g, w in zip(names, got, gradsieve.adaptive_select(*inputs, *setting, capacity)):
            expect_equal(f"{name} (CPU op)", g, w)


def cases_adaptive_select(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    rotation = 0  # every setting meets every capacity over the inputs
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                inputs = adaptive_inputs(n, dtype, kind, next(seeds))
                rotation += 1
                for position, capacity in enumerate(counts(n)):
                    setting = ADAPTIVE_SETTINGS[(rotation + position) % len(ADAPTIVE_SETTINGS)]
                    def run(inputs=inputs, setting=setting, capacity=capacity):
                        check_adaptive_select(device, inputs, setting, capacity, "contiguous")
                    yield f"n={n} {dtype} {kind} {setting} capacity={capacity}", run
    for layout, n in (("strided", 1000), ("transposed", 1023)):
        inputs = adaptive_inputs(n, torch.bfloat16, "special", next(seeds))
        def run(inputs=inputs, layout=layout, n=n):
            check_adaptive_select(device, inputs, ADAPTIVE_SETTINGS[1], n // 3, layout)
        yield f"{layout} n={n}", run


# (H, hidden, product, newest): the smallest and largest scorer, bf16 and float32 history alike.
PREDICTIVE_SETTINGS = ((1, 1, False, 0), (3, 8, True, 2), (5, 16, False, 1), (16, 64, True, 7),
                       (9, 3, False, 8))


def predictive_inputs(n: int, history_dtype: torch.dtype, kind: str, count: int, hidden: int,
                      seed: int):
    """grad (float32, of `kind`), residual, `count` history vectors (a fifth of them zero) and
    weights ~N(0, 0.5)."""
    grad = make_input(n, torch.float32, kind=kind, seed=seed)
    residual = make_input(n, torch.float32, kind="normal", seed=seed + 1) * 0.5
    history = []
    for j in range(count):
        h = make_input(n, torch.float32, kind="normal", seed=seed + 2 + j)
        h[j % 5::5] = 0.0
        history.append(h.to(history_dtype))
    weights = make_input(hidden * (count + 4) + 1, torch.float32, kind="normal", seed=seed + 99) * 0.5
    return grad, residual, history, weights


def expect_scores(what: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    """float32 [n] within `bound` of the float64 `want`, non-finite exactly where want is."""
    got = got.detach().cpu()
    if got.dtype != torch.float32 or got.shape != want.shape:
        raise AssertionError(f"{what}: got {got.dtype}{list(got.shape)}, want float32{list(want.shape)}")
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite):
        raise AssertionError(f"{what}: non-finite at other entries than the reference")
    err = (got.double() - want).abs()
    bad = finite & ~(err <= bound)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{what}[{i}] = {float(got[i])!r}, reference {float(want[i])!r}")


def expect_scale(what: str, got: torch.Tensor, want: float) -> None:
    value = float(got)
    if got.shape != () or got.dtype != torch.float32:
        raise AssertionError(f"{what}: got {got.dtype}{list(got.shape)}, want a 0-d float32")
    if math.isfinite(want) and not math.isclose(value, want, rel_tol=1e-6):
        raise AssertionError(f"{what} = {value!r}, reference {want!r}")
    if not math.isfinite(want) and math.isfinite(value):
        raise AssertionError(f"{what} = {value!r}, reference {want!r} (not finite)")


def check_predictive_score(device, inputs, newest, hidden, product, layout):
    """The op on the device against the reference and, on CUDA, against the CPU op (the same
    tolerance: the two differ only by the last bits of log1p and exp)."""
    grad, residual, history, weights = inputs
    on = (on_device(grad, device, layout), on_device(residual, device, layout),
          [on_device(h, device, layout) for h in history], newest, on_device(weights, device, layout),
          hidden, product)
    acc, score, scale = gradsieve.ops.predictive_score(*on)
    want_acc, want_score, want_scale, bound = ref_predictive_score(*inputs[:3], newest, weights, hidden, product)
    expect_equal("accumulator", acc, want_acc)
    expect_scale("scale", scale, want_scale)
    expect_scores("score", score, want_score, bound)
    if device != "cpu":
        cpu_acc, cpu_score, cpu_scale = gradsieve.ops.predictive_score(grad, residual, history, newest,
                                                                       weights, hidden, product)
        expect_equal("accumulator (CPU op)", acc, cpu_acc)
        expect_scale("scale (CPU op)", scale, float(cpu_scale))
        expect_scores("score (CPU op)", score, cpu_score.double(), bound)


def cases_predictive_score(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    rotation = 0  # every setting meets every size and history dtype over the inputs
    for n in sizes:
        for history_dtype in (torch.float32, torch.bfloat16):
            for kind in kinds:
                count, hidden, product, newest = PREDICTIVE_SETTINGS[rotation % len(PREDICTIVE_SETTINGS)]
                rotation += 1
                inputs = predictive_inputs(n, history_dtype, kind, count, hidden, next(seeds))
                def run(inputs=inputs, newest=newest, hidden=hidden, product=product):
                    check_predictive_score(device, inputs, newest, hidden, product, "contiguous")
                yield f"n={n} history={count}x{history_dtype} {kind} hidden={hidden} product={product}", run
    for count, hidden, product, newest in PREDICTIVE_SETTINGS:
        inputs = predictive_inputs(1000, torch.bfloat16, "normal", count, hidden, next(seeds))
        def run(inputs=inputs, newest=newest, hidden=hidden, product=product):
            check_predictive_score(device, inputs, newest, hidden, product, "strided")
        yield f"strided n=1000 history={count} hidden={hidden}", run


# (eps, rho, with a Hessian diagonal): granular's small eps, exact powers of two, rho at both ends.
INFLUENCE_SETTINGS = ((1e-3, 0.9, True), (0.5, 0.0, False), (3e-2, 0.25, True), (1.0, 0.999, False))


def influence_inputs(n: int, dtype: torch.dtype, kind: str, seed: int, hessian: bool):
    """grad (dtype, of `kind`), residual, score (>= 0, with ties), hessian (signed) or None."""
    grad = make_input(n, dtype, kind=kind, seed=seed)
    residual = make_input(n, torch.float32, kind="normal", seed=seed + 1) * 0.5
    score = make_input(n, torch.float32, kind="ties", seed=seed + 2).abs() * 1e-3
    h = make_input(n, torch.float32, kind="normal", seed=seed + 3) * 4.0 if hessian else None
    return grad, residual, score, h


def check_influence_update(device, inputs, eps, rho, layout):
    """The op on the device against the reference and, on CUDA, bitwise against the CPU op."""
    on = [None if t is None else on_device(t, device, layout) for t in inputs]
    got = gradsieve.influence_update(*on, eps, rho)
    want = ref_influence_update(*inputs, eps, rho)
    for name, g, w in zip(("acc", "score_out"), got, want):
        expect_equal(name, g, w)
    if device != "cpu":
        for name, g, w in zip(("acc", "score_out"), got, gradsieve.influence_update(*inputs, eps, rho)):
            expect_equal(f"{name} (CPU op)", g, w)


def cases_influence_update(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    rotation = 0  # every setting meets every dtype over the sizes
    for n in sizes:
        for dtype in DTYPES:
            for kind in kinds:
                eps, rho, hessian = INFLUENCE_SETTINGS[rotation % len(INFLUENCE_SETTINGS)]
                rotation += 1
                inputs = influence_inputs(n, dtype, kind, next(seeds), hessian)
                def run(inputs=inputs, eps=eps, rho=rho):
                    check_influence_update(device, inputs, eps, rho, "contiguous")
                yield f"n={n} {dtype} {kind} eps={eps} rho={rho} hessian={hessian}", run
    for dtype in DTYPES:
        for eps, rho, hessian in INFLUENCE_SETTINGS[:2]:
            inputs = influence_inputs(1000, dtype, "special", next(seeds), hessian)
            def run(inputs=inputs, eps=eps, rho=rho):
                check_influence_update(device, inputs, eps, rho, "strided")
            yield f"strided n=1000 {dtype} hessian={hessian}", run


def segment_layouts(n: int, seed: int) -> List[Tuple[str, List[int]]]:
    """Ways to cut n entries into segments: one, with empty ones around, many random ones (about a
    fifth empty), and one entry each (small n)."""
    g = torch.Generator().manual_seed(seed)
    layouts = [("one", [n]), ("empty-around", [0, n // 3, 0, n - n // 3, 0])]
    if n:
        count = max(1, n // 37)
        cuts = torch.sort(torch.randint(0, n + 1, (count - 1,), generator=g)).values.tolist()
        layouts.append(("random", [b - a for a, b in zip([0] + cuts, cuts + [n])]))
    if n <= 255:
        layouts.append(("ones", [1] * n))
    return layouts


def check_segment_mean(device, x_cpu, numels, layout):
    """The op on the device within 1 ulp of the float64 reference and, on CUDA, of the CPU op and
    deterministic."""
    got = gradsieve.segment_mean(on_device(x_cpu, device, layout), numels)
    expect_ulps("mean", got, ref_segment_mean(x_cpu, numels), 1)
    if device != "cpu":
        expect_ulps("mean (CPU op)", got, gradsieve.segment_mean(x_cpu, numels), 1)
        expect_equal("mean (again)", gradsieve.segment_mean(on_device(x_cpu, device, layout), numels), got)


def expect_ulps(what: str, got: torch.Tensor, want: torch.Tensor, ulps: int) -> None:
    """float32 within `ulps` units in the last place of want (NaN exactly where want has NaN)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.dtype != torch.float32 or got.shape != want.shape:
        raise AssertionError(f"{what}: got {got.dtype}{list(got.shape)}, want float32{list(want.shape)}")
    nan = torch.isnan(want)
    if not torch.equal(torch.isnan(got), nan):
        raise AssertionError(f"{what}: NaN at other entries than the reference")

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    far = ((ordered(got) - ordered(want)).abs() > ulps) & ~nan
    if bool(far.any()):
        i = int(torch.nonzero(far)[0])
        raise AssertionError(f"{what}[{i}] = {float(got[i])!r}, reference {float(want[i])!r}")


def cases_segment_mean(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        for kind in kinds:
            seed = next(seeds)
            x_cpu = make_input(n, torch.float32, kind=kind, seed=seed)
            for name, numels in segment_layouts(n, seed):
                def run(x_cpu=x_cpu, numels=numels):
                    check_segment_mean(device, x_cpu, numels, "contiguous")
                yield f"n={n} {kind} {name} ({len(numels)} segments)", run
    yield "no segments", lambda: check_segment_mean(device, torch.zeros(0), [], "contiguous")
    x_cpu = make_input(1000, torch.float32, kind="special", seed=next(seeds))
    yield "strided n=1000", lambda: check_segment_mean(device, x_cpu, [1, 0, 600, 399], "strided")


def csr16_payload(numel: int, world: int, slots: int, seed: int):
    """A well-formed payload: per rank, valid <= slots sorted distinct positions in [0, numel) as
    counts per block and 16-bit offsets (the unsigned bits in int16), junk in the unused slots."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-numel // 65536)
    counts = torch.zeros(world, blocks, dtype=torch.int32)
    offsets = torch.randint(-32768, 32768, (world, slots), generator=g).to(torch.int16)
    valid = torch.zeros(world, dtype=torch.int32)
    for w in range(world):
        used = int(torch.randint(0, min(slots, numel) + 1, (1,), generator=g))
        if w == 0:
            used = min(slots, numel)  # one full rank
        pos = torch.sort(torch.randperm(numel, generator=g)[:used] if numel <= 1 << 22 else
                         torch.unique(torch.randint(0, numel, (used,), generator=g))).values
        used = pos.numel()
        counts[w] = torch.bincount(pos // 65536, minlength=blocks).to(torch.int32)
        low = pos % 65536
        offsets[w, :used] = (low - 65536 * (low >= 32768)).to(torch.int16)
        valid[w] = used
    return counts, offsets, valid


def check_csr16(device, counts, offsets, valid, numel, layout="contiguous"):
    if layout == "sliced":  # offsets as the first columns of a wider buffer (as wire.py reads them)
        wide = torch.zeros(offsets.shape[0], offsets.shape[1] + 3, dtype=torch.int16, device=device)
        wide[:, : offsets.shape[1]] = offsets.to(device)
        on_offsets = wide[:, : offsets.shape[1]]
    else:
        on_offsets = offsets.to(device)
    got = gradsieve.csr16_indices(counts.to(device), on_offsets, valid.to(device), numel)
    expect_equal("indices", got, ref_csr16_indices(counts, offsets, valid, numel))
    if device != "cpu":
        want = gradsieve.csr16_indices(counts, offsets, valid, numel)
        expect_equal("indices (CPU op)", got, want)


def cases_csr16_indices(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    numels = sorted(set(sizes) | {3 * 65536 + 5, 2**31 - 1})
    for numel in numels:
        for world, slots in ((1, 0), (1, 300), (3, 257), (0, 4)):
            seed = next(seeds)
            counts, offsets, valid = csr16_payload(numel, world, slots, seed)
            g = torch.Generator().manual_seed(seed + 1)
            blocks = counts.shape[1]
            # Malformed variants: what a corrupt or hostile payload may hold.
            variants = {"well-formed": (counts, offsets, valid)}
            if world and blocks:
                bad = counts.clone()
                bad[:, torch.randint(0, blocks, (1,), generator=g)] = -5  # negative counts
                variants["negative counts"] = (bad, offsets, valid)
                more = counts.clone()
                more[:, -1] += 1000  # sums too large
                variants["counts too large"] = (more, offsets, valid)
                huge = counts.clone()
                huge[:, 0] = 2**31 - 1  # sums beyond int32
                variants["huge counts"] = (huge, offsets, valid)
            if world:
                variants["counts too small"] = (counts // 2, offsets, valid)
                variants["valid beyond slots"] = (counts, offsets, valid + slots + 7)
                variants["negative valid"] = (counts, offsets, valid - 10**6)
                junk = torch.randint(-32768, 32768, offsets.shape, generator=g).to(torch.int16)
                variants["junk offsets"] = (counts, junk, torch.full_like(valid, slots))
            for name, (c, o, v) in variants.items():
                def run(c=c, o=o, v=v, numel=numel):
                    check_csr16(device, c, o, v, numel)
                yield f"numel={numel} world={world} slots={slots} {name}", run
    counts, offsets, valid = csr16_payload(70000, 2, 50, next(seeds))
    yield "sliced offsets", lambda: check_csr16(device, counts, offsets, valid, 70000, "sliced")


def cases_non_contiguous(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    """Every op on strided and transposed views (n = 1000 and 1023)."""
    for layout, n in (("strided", 1000), ("transposed", 1023)):
        for dtype in DTYPES:
            seed = next(seeds)
            x_cpu = make_input(n, dtype, kind="special", seed=seed)
            x = on_device(x_cpu, device, layout)
            residual_cpu = make_input(n, torch.float32, kind="normal", seed=seed + 1)
            k = n // 3
            tag = f"{layout} n={n} {dtype}"

            def topk(x=x, x_cpu=x_cpu, k=k):
                values, indices = gradsieve.topk_abs(x, k)
                expect_selection("indices", indices, flat64(x_cpu).abs(), k)
                expect_equal("values", values, x_cpu.reshape(-1)[indices.cpu()])

            def quantile(x=x, x_cpu=x_cpu, layout=layout):
                expect_equal("quantile", gradsieve.quantile_abs(x, 0.5), ref_quantile(x_cpu, 0.5))
                finite = x_cpu.nan_to_num(0.0, 3.0, -3.0)
                got = gradsieve.quantile_abs(on_device(finite, device, layout), 0.3)
                expect_equal("quantile of finite", got, ref_quantile(finite, 0.3))

            def ef(x_cpu=x_cpu, residual_cpu=residual_cpu, k=k, layout=layout):
                check_ef_topk(device, residual_cpu, x_cpu, k, 1.0, layout)

            def reg(x_cpu=x_cpu, residual_cpu=residual_cpu, k=k, layout=layout, seed=seed):
                prev = torch.randperm(x_cpu.numel(), generator=torch.Generator().manual_seed(seed))[:50]
                sent, agg = torch.linspace(-2, 2, 50), torch.linspace(1, -1, 50)
                check_regtopk(device, residual_cpu, x_cpu.nan_to_num(0.0, 3.0, -3.0), prev, sent,
                              agg, 2.0, k, 4, None, layout)

            def threshold(x=x, x_cpu=x_cpu):
                check_threshold(x, x_cpu, 1.0, 100)  # overflows: about 300 entries pass

            def quantize(x=x, x_cpu=x_cpu):
                check_quantize(x, x_cpu, 7)

            def accumulate(n=n, dtype=dtype, layout=layout, seed=seed):
                check_sparse_accumulate(device, n, dtype, torch.float32, torch.int64, 2 * n, seed, layout)

            yield f"topk_abs {tag}", topk
            yield f"quantile_abs {tag}", quantile
            yield f"ef_topk_ {tag}", ef
            yield f"regtopk_select_ {tag}", reg
            yield f"threshold_select {tag}", threshold
            yield f"quantize_int8 {tag}", quantize
            yield f"sparse_accumulate_ {tag}", accumulate


def cases_large(device: str, seeds: Iterator[int]) -> Iterator[Case]:
    """float32 at 2^20 + 3: grid-stride loops and multi-tile scans."""
    n = LARGE
    x_cpu = make_input(n, torch.float32, kind="special", seed=next(seeds))
    x = x_cpu.to(device)
    residual_cpu = make_input(n, torch.float32, kind="normal", seed=next(seeds))
    k = n // 100

    def topk():
        values, indices = gradsieve.topk_abs(x, k)
        expect_selection("indices", indices, flat64(x_cpu).abs(), k)
        expect_equal("values", values, x_cpu[indices.cpu()])

    def ef():
        check_ef_topk(device, residual_cpu, x_cpu, k, 1.0, "contiguous")

    def reg():
        prev = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:k]
        g = torch.Generator().manual_seed(6)
        check_regtopk(device, residual_cpu, x_cpu.nan_to_num(0.0, 3.0, -3.0), prev,
                      torch.randn(k, generator=g), torch.randn(k, generator=g), 4.0, k, 8, None,
                      "contiguous")

    def threshold():
        check_threshold(x, x_cpu, 2.5, 1000)  # about 13000 pass: overflow

    def quantize():
        check_quantize(x, x_cpu, 3)

    def accumulate():
        check_sparse_accumulate(device, n, torch.float32, torch.int8, torch.int32, 8 * k, 7, "contiguous")

    yield f"topk_abs n={n}", topk
    yield f"ef_topk_ n={n}", ef
    yield f"regtopk_select_ n={n}", reg
    yield f"threshold_select n={n}", threshold
    yield f"quantize_int8 n={n}", quantize
    yield f"sparse_accumulate_ n={n}", accumulate

    adaptive = adaptive_inputs(n, torch.float32, "special", next(seeds))
    adaptive16 = adaptive_inputs(n, torch.bfloat16, "normal", next(seeds))
    for inputs, setting, capacity in (
            (adaptive, (0.1, 0.9, 0.99, True, True), k),         # momentum: overflow
            (adaptive16, (1.0, 1.0, 0.99, False, True), n // 50),  # about n / 100 pass: no overflow
            (adaptive16, (0.3, 1.0, 0.5, True, False), k)):       # about n / 2 pass: overflow
        def run(inputs=inputs, setting=setting, capacity=capacity):
            check_adaptive_select(device, inputs, setting, capacity, "contiguous")
        yield f"adaptive_select n={n} {inputs[0].dtype} {setting} capacity={capacity}", run
    for history_dtype, (count, hidden, product, newest) in ((torch.float32, (3, 8, False, 1)),
                                                            (torch.bfloat16, (12, 4, True, 11))):
        inputs = predictive_inputs(n, history_dtype, "normal", count, hidden, next(seeds))
        def run(inputs=inputs, newest=newest, hidden=hidden, product=product):
            check_predictive_score(device, inputs, newest, hidden, product, "contiguous")
        yield f"predictive_score n={n} history={count}x{history_dtype} hidden={hidden}", run
    for dtype, (eps, rho, hessian) in ((torch.float32, INFLUENCE_SETTINGS[0]),
                                       (torch.bfloat16, INFLUENCE_SETTINGS[1])):
        inputs = influence_inputs(n, dtype, "special", next(seeds), hessian)
        def run(inputs=inputs, eps=eps, rho=rho):
            check_influence_update(device, inputs, eps, rho, "contiguous")
        yield f"influence_update n={n} {dtype} hessian={hessian}", run
    x_means = make_input(n, torch.float32, kind="normal", seed=next(seeds))
    for name, numels in segment_layouts(n, next(seeds))[:3]:
        def run(numels=numels):
            check_segment_mean(device, x_means, numels, "contiguous")
        yield f"segment_mean n={n} {name} ({len(numels)} segments)", run
    csr16 = csr16_payload(2**31 - 1, 2, 20000, next(seeds))
    yield "csr16_indices numel=2^31-1", lambda: check_csr16(device, *csr16, 2**31 - 1)


# ------------------------------------------------------------------ hostile positions
EXTREMES = (-2**63, -2**31, -1, 2**31 - 1, 2**63 - 1)


def wild_positions(n: int, m: int, index_dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """m positions, most in [0, n), a tenth just outside ([-3, 0) or [n, n + 3)), a few extreme."""
    inside = torch.randint(0, max(n, 1), (m,), generator=g)
    near = torch.where(torch.rand(m, generator=g) < 0.5, -1 - torch.randint(0, 3, (m,), generator=g),
                       n + torch.randint(0, 3, (m,), generator=g))
    info = torch.iinfo(index_dtype)
    extreme = torch.tensor([v for v in EXTREMES if info.min <= v <= info.max])
    far = extreme[torch.randint(0, extreme.numel(), (m,), generator=g)]
    roll = torch.rand(m, generator=g)
    return torch.where(roll < 0.1, near, torch.where(roll < 0.13, far, inside)).to(index_dtype)


def check_hostile_accumulate(device, n, payloads, per, values_dtype, index_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m = payloads * per
    indices = wild_positions(n, m, index_dtype, g)
    values, scales, chunk, contributions = payload_values(m, values_dtype, 5, g)
    inside = (indices >= 0) & (indices < n)
    guard = 64
    big = torch.full((n + 2 * guard,), 777.0, device=device)
    out = big[guard:guard + n]
    out.zero_()
    bad = torch.zeros(payloads, dtype=torch.int32, device=device)
    gradsieve.sparse_accumulate_(out, indices.to(device), values.to(device),
                                 None if scales is None else scales.to(device), chunk, bad=bad)
    edges = torch.cat([big[:guard], big[-guard:]]).cpu()
    if not bool((edges == 777.0).all()):
        raise AssertionError("wrote outside out")
    want_bad = (~inside).view(payloads, per).any(dim=1).to(torch.int32) if m else bad.cpu() * 0
    expect_equal("bad", bad.cpu(), want_bad)
    want = torch.zeros(n, dtype=torch.float64).index_add(0, indices[inside].long(),
                                                         contributions[inside])
    err = (flat64(out) - want).abs()
    magnitude = torch.zeros(n, dtype=torch.float64).index_add(0, indices[inside].long(),
                                                              contributions[inside].abs())
    if not bool((err <= 1e-5 * magnitude + 1e-30).all()):
        raise AssertionError(f"largest error {float(err.max())}")


def check_hostile_raises(device, call, message):
    try:
        call()
    except RuntimeError as error:
        if message not in str(error):
            raise AssertionError(f"raised {str(error).splitlines()[0]!r}, expected {message!r}")
        return
    raise AssertionError(f"did not raise {message!r}")


def check_hostile_regtopk(device, n, m, index_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=g)
    residual_cpu = torch.randn(n, generator=g) * 0.25
    prev = wild_positions(n, m, index_dtype, g)
    sent, agg = torch.randn(m, generator=g), torch.randn(m, generator=g)
    inside = (prev >= 0) & (prev < n)
    a, score = regtopk_reference(residual_cpu, grad, prev[inside], sent[inside], agg[inside], 2.0, 4,
                                 None)
    k = n // 3
    residual = residual_cpu.to(device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    values, indices = gradsieve.regtopk_select_(residual, grad.to(device), prev.to(device),
                                                sent.to(device), agg.to(device), 2.0, k, 4, bad=bad)
    expect_equal("bad", bad.cpu(), torch.tensor([int(not bool(inside.all()))], dtype=torch.int32))
    expect_selection("indices", indices, score, k, near_tie_rtol=NEAR_TIE_RTOL)
    expect_equal("values", values, a[indices.cpu()])
    a[indices.cpu()] = 0.0
    expect_equal("residual", residual, a)


def check_hostile_decode(device, values, index, seed):
    from gradsieve.wire import PayloadFormat

    numel = 3000
    form = PayloadFormat(40, values, 8 if values == "int8" else 256, index, numel)
    g = torch.Generator().manual_seed(seed)
    gathered = torch.randint(0, 256, (3, form.nbytes), generator=g, dtype=torch.uint8)
    results = {}
    for where in ("cpu", device):
        big = torch.full((numel + 128,), 777.0, device=where)
        out = big[64:64 + numel]
        out.zero_()
        finite, well_formed = form.decode_sum(gathered.to(where), out)
        edges = torch.cat([big[:64], big[-64:]]).cpu()
        if not bool((edges == 777.0).all()):
            raise AssertionError(f"decode_sum on {where} wrote outside out")
        results[where] = (out.cpu(), finite.cpu(), well_formed.cpu())
    expect_equal("finite", results[device][1], results["cpu"][1])
    expect_equal("well_formed", results[device][2], results["cpu"][2])


def cases_hostile(device: str, sizes, kinds, seeds: Iterator[int]) -> Iterator[Case]:
    for n in sizes:
        if n == 0:
            continue
        for values_dtype in (torch.float32, torch.bfloat16, torch.int8):
            for index_dtype in (torch.int32, torch.int64):
                for payloads, per in ((1, 0), (1, 1), (3, 100), (2, 2 * n)):
                    seed = next(seeds)
                    yield (f"sparse_accumulate_ flags n={n} {values_dtype} {index_dtype} "
                           f"{payloads}x{per}"), (
                        lambda n=n, p=payloads, e=per, v=values_dtype, i=index_dtype, s=seed:
                        check_hostile_accumulate(device, n, p, e, v, i, s))
        for index_dtype in (torch.int32, torch.int64):
            for m in (1, n // 10 + 1, 2 * n):
                seed = next(seeds)
                yield f"regtopk_select_ flags n={n} m={m} {index_dtype}", (
                    lambda n=n, m=m, i=index_dtype, s=seed: check_hostile_regtopk(device, n, m, i, s))
        yield f"sparse_accumulate_ raises n={n}", lambda n=n: check_hostile_raises(
            device, lambda: gradsieve.sparse_accumulate_(
                torch.zeros(n, device=device), torch.tensor([0, n], device=device),
                torch.ones(2, device=device)),
            f"indices must lie in [0, {n}) (out.numel()), got indices[1] = {n}")
        yield f"regtopk_select_ raises n={n}", lambda n=n: check_hostile_raises(
            device, lambda: gradsieve.regtopk_select_(
                torch.zeros(n, device=device), torch.ones(n, device=device),
                torch.tensor([-1], device=device), torch.ones(1, device=device),
                torch.ones(1, device=device), 1.0, 1, 2),
            "prev_indices must lie in [0, ")
    for values in ("fp32", "fp16", "bf16", "int8"):
        for index in ("int32", "csr16"):
            for _ in range(4):
                seed = next(seeds)
                yield f"decode_sum random bytes {values} {index}", (
                    lambda v=values, i=index, s=seed: check_hostile_decode(device, v, i, s))


OPS: Dict[str, Callable] = {
    "topk_abs": cases_topk_abs,
    "quantile_abs": cases_quantile_abs,
    "ef_topk_": cases_ef_topk,
    "regtopk_select_": cases_regtopk_select,
    "threshold_select": cases_threshold_select,
    "quantize_int8": cases_quantize_int8,  # with dequantize_int8 and stochastic rounding
    "sparse_accumulate_": cases_sparse_accumulate,
    "non-contiguous": cases_non_contiguous,
    "adaptive_select": cases_adaptive_select,
    "csr16_indices": cases_csr16_indices,  # with malformed payloads
    "predictive_score": cases_predictive_score,
    "influence_update": cases_influence_update,
    "segment_mean": cases_segment_mean,
    "hostile": cases_hostile,  # positions outside their range, flags, random payload bytes
}


def run_cases(group: str, device: str, cases: Iterator[Case], show: int) -> Tuple[int, int]:
    """Runs the cases of one group; prints its line (and the first `show` failures)."""
    started = time.perf_counter()
    total = failed = 0
    for name, run in cases:
        total += 1
        try:
            run()
        except Exception as error:  # a mismatch or an op that raised: report it, keep going
            failed += 1
            if failed <= show:
                detail = str(error).strip().splitlines()
                print(f"  FAIL {group} {name}: {type(error).__name__}: {detail[0] if detail else ''}")
                if not isinstance(error, AssertionError):
                    traceback.print_exc(limit=3, file=sys.stdout)
    if device == "cuda":
        torch.cuda.synchronize()
    verdict = "ok" if not failed else f"FAILED {failed} of"
    seconds = time.perf_counter() - started
    print(f"{group:19} {device:5} {verdict} {total} cases ({seconds:.1f} s)", flush=True)
    return total, failed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true",
                        help="sizes up to 4097 only (racecheck and synccheck are slower than memcheck)")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated groups to run (default: all of {', '.join(OPS)})")
    parser.add_argument("--show", type=int, default=5, help="failures printed per op (default 5)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not (torch.cuda.is_available() and gradsieve.cuda_kernels_built()):
        print("cuda_op_driver: --device cuda needs a GPU and a CUDA build of gradsieve "
              f"(GPU: {torch.cuda.is_available()}, CUDA kernels: {gradsieve.cuda_kernels_built()})")
        return 2
    groups = [name for name in args.ops.split(",") if name]
    unknown = [name for name in groups if name not in OPS]
    if unknown:
        parser.error(f"unknown --ops {unknown}; known: {', '.join(OPS)}")
    sizes = SMALL_SIZES if args.small else SIZES
    kinds = ("ties", "special") if args.small else ("normal", "ties", "special")
    seeds = iter(range(1_000_000))
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"cuda_op_driver: gradsieve {gradsieve.__version__}, torch {torch.__version__}, {where}, "
          f"sizes {list(sizes)}{'' if args.small else f' and {LARGE} (float32)'}", flush=True)

    total = failed = 0
    for group in groups:
        cases = OPS[group](args.device, sizes, kinds, seeds)
        t, f = run_cases(group, args.device, cases, args.show)
        total, failed = total + t, failed + f
    if not args.small and len(groups) == len(OPS):
        t, f = run_cases("large", args.device, cases_large(args.device, seeds), args.show)
        total, failed = total + t, failed + f
    print(f"cuda_op_driver: {total - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

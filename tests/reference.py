"""Independent references for the gradsieve ops, in NumPy and plain torch (no gradsieve code)."""

import math

import numpy as np
import torch


def as_float64(x: torch.Tensor) -> np.ndarray:
    """x flattened as float64 NumPy (exact for float32, float16 and bfloat16)."""
    return x.detach().reshape(-1).to("cpu", torch.float64).numpy()


def topk_indices(x: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the k largest |x|, NaN largest, the lower index first among ties, ascending."""
    a = as_float64(x)
    nan = np.isnan(a)
    mag = np.where(nan, 0.0, np.abs(a))
    order = np.lexsort((np.arange(a.size), -mag, ~nan))  # NaN first, then by magnitude, then index
    return np.sort(order[:k]).astype(np.int64)


def kth_largest_magnitude(x: torch.Tensor, k: int) -> float:
    a = as_float64(x)
    if np.isnan(a).any():
        return math.nan
    return float(np.sort(np.abs(a))[a.size - k])


def quantile_abs(x: torch.Tensor, q: float) -> torch.Tensor:
    a = x.detach().reshape(-1).cpu().abs().double()
    if a.numel() == 0 or torch.isnan(a).any():
        return torch.tensor(math.nan, dtype=x.dtype)
    if a.numel() <= 2**24:  # torch.quantile's own size limit
        return torch.quantile(a, q, interpolation="lower").to(x.dtype)
    return a.sort().values[int(math.floor(q * (a.numel() - 1)))].to(x.dtype)


def threshold_select(x: torch.Tensor, threshold: float, capacity: int):
    a = as_float64(x)
    mag = np.where(np.isnan(a), np.inf, np.abs(a))
    if math.isnan(threshold):
        passing = np.isnan(a)
    elif threshold <= 0:
        passing = np.ones(a.size, dtype=bool)
    else:
        passing = (mag >= threshold) | np.isnan(a)
    count = int(passing.sum())
    if count <= capacity:
        idx = np.flatnonzero(passing)
    else:
        idx = topk_indices(x, capacity)
    values = np.zeros(capacity)
    indices = np.zeros(capacity, dtype=np.int64)
    values[: idx.size] = a[idx]
    indices[: idx.size] = idx
    return values, indices, count


def quantize_int8(x: torch.Tensor, chunk: int):
    """Round-to-nearest per-chunk absmax quantization in plain torch."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    chunks = (n + chunk - 1) // chunk
    padded = torch.zeros(chunks * chunk)
    padded[:n] = flat
    blocks = padded.view(chunks, chunk)
    finite = torch.isfinite(blocks).all(dim=1)
    amax = blocks.abs().amax(dim=1)
    scales = torch.where(finite, amax / 127.0, torch.full_like(amax, math.nan))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp(-127, 127)
    codes = torch.where((scales > 0)[:, None], codes, torch.zeros_like(codes))
    return codes.reshape(-1)[:n].to(torch.int8).view(x.shape), scales


def sparse_accumulate(out: torch.Tensor, indices, values, scales=None, chunk=0) -> np.ndarray:
    """out.flatten() + the sum of the payload, in float64."""
    dense = as_float64(out).copy()
    v = values.detach().reshape(-1).cpu().double().numpy()
    if scales is not None:
        v = v * np.repeat(scales.cpu().double().numpy(), chunk)[: v.size]
    np.add.at(dense, indices.reshape(-1).cpu().numpy().astype(np.int64), v)
    return dense


def _predictive_features(grad, residual, history, newest):
    """(a, s, x) of predictive_score: a = residual + grad rounded to float32 (as the op stores
    it), s = mean |a| in float64 rounded to float32 (as the op uses it; 1 for n == 0 or s == 0),
    and the F = H + 2 features [F, n] in float64 from the bf16/fp32 values as stored."""
    a = (as_float64(residual).astype(np.float32) + as_float64(grad).astype(np.float32)).astype(np.float64)
    g = as_float64(grad)
    n = a.size
    with np.errstate(invalid="ignore", over="ignore"):
        s = float(np.float32(np.abs(a).sum() / n)) if n else 1.0
    if s == 0.0:
        s = 1.0
    count = len(history)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        x = np.empty((count + 2, n))
        x[0] = np.log1p(np.abs(a) / s)
        x[1] = np.log1p(np.abs(g) / s)
        for j in range(count):
            h = as_float64(history[(newest - j) % count])
            x[2 + j] = np.sign(a) * np.sign(h) * np.log1p(np.abs(h) / s)
    return a, s, x


def _predictive_weights(weights, hidden, features):
    w = as_float64(weights)
    w1 = w[: hidden * features].reshape(hidden, features)
    b1 = w[hidden * features: hidden * features + hidden]
    w2 = w[hidden * features + hidden: hidden * features + 2 * hidden]
    return w1, b1, w2, w[hidden * features + 2 * hidden]


def predictive_score_reference(grad, residual, history, newest, weights, hidden, product):
    """predictive_score's contract in NumPy float64: (accumulator, score, scale) as float64
    arrays and a float."""
    a, s, x = _predictive_features(grad, residual, history, newest)
    w1, b1, w2, b2 = _predictive_weights(weights, hidden, x.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.maximum(0.0, b1[:, None] + w1 @ x)  # np.maximum keeps a NaN
        logit = b2 + w2 @ z
        if product:
            score = np.abs(a) / (1.0 + np.exp(-logit))
        else:
            score = np.where(logit > 20.0, logit, np.log1p(np.exp(np.minimum(logit, 20.0))))
    return a, score, s


def predictive_score_magnitude(grad, residual, history, newest, weights, hidden, product):
    """Per entry, the sum of the magnitudes of every term of the logit, |b2| + sum_u |w2_u|
    (|b1_u| + sum_f |W1[u, f] x_f|), times |a| with ``product``: float32 rounding errors of the
    op's sums are proportional to it (the bound of the tests' tolerance)."""
    a, _, x = _predictive_features(grad, residual, history, newest)
    w1, b1, w2, b2 = _predictive_weights(weights, hidden, x.shape[0])
    with np.errstate(invalid="ignore", over="ignore"):
        terms = abs(b2) + np.abs(w2) @ (np.abs(b1)[:, None] + np.abs(w1) @ np.abs(x))
        return terms * np.abs(a) if product else terms


def influence_update_reference(grad, residual, score, hessian, eps, rho):
    """influence_update's contract in NumPy float32, each operation rounded on its own in the op's
    order (NumPy's float32 ufuncs never fuse): (acc, score_out) as float32 arrays."""
    f = np.float32
    a32 = lambda t: as_float64(t).astype(np.float32)  # noqa: E731  (exact for the op's dtypes)
    g, r, s = a32(grad), a32(residual), a32(score)
    with np.errstate(invalid="ignore", over="ignore"):
        a = r + g
        t = np.abs(a) * f(eps)
        if hessian is None:
            influence = t
        else:
            u = f(0.5) * np.abs(a32(hessian))
            u = u * f(eps)
            u = u * f(eps)
            influence = t + u
        carried = f(rho) * s
        fresh = f(1.0 - rho) * influence
        return a, carried + fresh


def segment_mean_reference(x, numels):
    """segment_mean's contract: each segment's float64 sum over its length, rounded once to
    float32; 0 for an empty segment."""
    a = as_float64(x)
    out = np.zeros(len(numels), np.float32)
    start = 0
    with np.errstate(invalid="ignore", over="ignore"):
        for j, m in enumerate(numels):
            if m:
                out[j] = np.float32(a[start:start + m].sum() / m)
            start += m
    return out

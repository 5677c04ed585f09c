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


# ------------------------------------------------------------------ the wire and error feedback
def decode_int8(q, scales, chunk: int) -> np.ndarray:
    """int8 codes as a receiver decodes them, in NumPy float32: entry ``j`` is ``float32(q[j]) *
    scales[j // chunk]``, one correctly rounded float32 product (the chunk is counted in payload
    positions, the last chunk may be partial)."""
    codes = q.detach().reshape(-1).cpu().numpy().astype(np.float32)
    s = scales.detach().reshape(-1).cpu().numpy().astype(np.float32)
    return codes * s[np.arange(codes.size) // chunk]


def entries_for(density: float, numel: int) -> int:
    """k of a sparse compressor: ceil(density * numel) of the decimal density as written (0.1 of
    330 is 33, not 34 from the float product), at most numel."""
    from fractions import Fraction

    return min(numel, math.ceil(Fraction(repr(float(density))) * numel))


WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def wire_values(values: torch.Tensor, kind: str, chunk: int = 256, capacity=None) -> torch.Tensor:
    """float32 values (in the order they go on the wire) as a receiver decodes them: fp32 as they
    are; fp16/bf16 rounded to that type; int8 by per-chunk absmax quantization
    (:func:`quantize_int8`, round half to even) with chunk min(chunk, K), K the payload's capacity
    (default: the number of values), the values padded with zeros to a whole number of chunks,
    decoded as code * scale in float32."""
    values = values.detach().reshape(-1).float().cpu()
    if kind == "fp32":
        return values.clone()
    if kind in WIRE_DTYPES:
        return values.to(WIRE_DTYPES[kind]).float()
    if kind != "int8":
        raise ValueError(kind)
    k = values.numel()
    capacity = k if capacity is None else capacity
    chunk = max(1, min(chunk, capacity))
    padded = torch.zeros(max(-(-capacity // chunk), -(-k // chunk)) * chunk)
    padded[:k] = values
    codes, scales = quantize_int8(padded, chunk)
    return torch.from_numpy(decode_int8(codes, scales, chunk))[:k]


class ErrorFeedbackTopK:
    """Error-feedback top-k (Stich et al. 2018) on ``world`` workers, in plain torch and NumPy (no
    gradsieve code): what the ``topk`` compressor's average and residuals must be.

    Each worker keeps a float32 residual per parameter (any hashable name), so a caller may
    regroup parameters into buckets between steps. One bucket step, on every worker ``r``::

        acc_r  = residual_r (the bucket's parameters, in the given order) + grad_r   (float32)
        idx_r  = the k = ceil(density * numel) entries of largest |acc_r|, ascending
                 (:func:`topk_indices`: the lower index wins a tie)
        sent_r = acc_r[idx_r] as the wire decodes them (:func:`wire_values`)
        residual_r = acc_r, with acc_r - sent_r (the wire's rounding) at idx_r

    The result is the float32 sum of the sent values over the workers, in rank order, divided by
    ``world``. When any gradient holds a NaN or an inf the step is skipped: the result is NaN and
    no residual changes.
    """

    def __init__(self, world: int, density: float, values: str = "fp32", chunk: int = 256):
        self.world, self.density, self.values, self.chunk = world, density, values, chunk
        self.residuals = [{} for _ in range(world)]

    def bucket_residual(self, rank: int, params, numels) -> torch.Tensor:
        return torch.cat([self.residuals[rank].get(p, torch.zeros(n)) for p, n in zip(params, numels)])

    def step(self, grads, params=("bucket",), numels=None) -> torch.Tensor:
        flat = [g.detach().reshape(-1).cpu().float() for g in grads]
        numel = flat[0].numel()
        numels = list(numels) if numels is not None else [numel]
        if sum(numels) != numel or len(numels) != len(params):
            raise ValueError("ErrorFeedbackTopK.step: params/numels do not describe the bucket")
        if not all(bool(torch.isfinite(g).all()) for g in flat):
            return torch.full((numel,), math.nan)
        k = entries_for(self.density, numel)
        total = torch.zeros(numel)
        for rank, g in enumerate(flat):
            acc = self.bucket_residual(rank, params, numels) + g
            idx = torch.from_numpy(topk_indices(acc, k))
            chosen = acc[idx]
            sent = wire_values(chosen, self.values, self.chunk)
            acc[idx] = chosen - sent
            total.index_add_(0, idx, sent)
            offset = 0
            for p, n in zip(params, numels):
                self.residuals[rank][p] = acc[offset:offset + n].clone()
                offset += n
        return total / self.world


class MomentumCorrectedTopK:
    """DGC's momentum correction and factor masking (Lin et al. 2018) on ``world`` workers of one
    bucket, in plain torch and NumPy, without clipping or density warm-up. Per worker ``r``::

        u_r = u_r * momentum + grad_r;   v_r = v_r + u_r        (float32, in this order)

    then a set S_r of entries is sent: the exact top-k of |v_r| (k = ceil(density * numel), the
    lower index wins a tie) unless the caller gives the sets (a sampled threshold picks them), as
    the wire decodes them (:func:`wire_values`, ascending index order); at S_r, u_r becomes 0 and
    v_r the wire's rounding (v - sent). The result is the float32 sum of the sent values over the
    workers, in rank order, divided by ``world``.

    :meth:`accumulate` does the first line and returns every worker's v; :meth:`send` the rest.
    """

    def __init__(self, world: int, numel: int, density: float, momentum: float,
                 values: str = "fp32", chunk: int = 256):
        self.world, self.density, self.momentum = world, density, momentum
        self.values, self.chunk = values, chunk
        self.k = entries_for(density, numel)
        self.u = [torch.zeros(numel) for _ in range(world)]
        self.v = [torch.zeros(numel) for _ in range(world)]

    def accumulate(self, grads):
        for rank, g in enumerate(grads):
            self.u[rank] = self.u[rank] * self.momentum + g.detach().reshape(-1).cpu().float()
            self.v[rank] = self.v[rank] + self.u[rank]
        return [v.clone() for v in self.v]

    def send(self, chosen=None) -> torch.Tensor:
        total = torch.zeros(self.v[0].numel())
        for rank in range(self.world):
            v = self.v[rank]
            if chosen is None:
                idx = torch.from_numpy(topk_indices(v, self.k))
            else:
                idx = torch.as_tensor(chosen[rank], dtype=torch.int64).sort().values
            picked = v[idx]
            sent = wire_values(picked, self.values, self.chunk, capacity=self.k)
            self.u[rank][idx] = 0.0
            v[idx] = picked - sent
            total.index_add_(0, idx, sent)
        return total / self.world


# ------------------------------------------------------------------ values at agreed indices
def agreed_topk(residual, grad, indices, values: str):
    """Error-feedback top-k sending at a given index set (the set is not chosen here), one
    worker, in plain torch: ``acc = residual + grad`` (float32); the values ``acc[indices]`` go
    on the wire as :func:`wire_values` decodes them (fp32/fp16/bf16); the new residual is ``acc``
    with, at the indices, ``acc - sent`` (0 for fp32). Returns ``(acc, sent, new residual)``."""
    acc = residual.detach().reshape(-1).cpu().float() + grad.detach().reshape(-1).cpu().float()
    idx = torch.as_tensor(indices, dtype=torch.int64).cpu()
    chosen = acc[idx]
    sent = wire_values(chosen, values)
    new = acc.clone()
    new[idx] = chosen - sent
    return acc, sent, new


def agreed_dgc(u, v, grad, indices, momentum: float, clip_norm: float, world: int, values: str):
    """DGC sending at a given index set, one worker, in plain torch: with ``clip_norm`` > 0 the
    gradient is scaled by ``min(1, (clip_norm / sqrt(world)) / (||grad||_2 + 1e-12))`` (the norm
    taken in float64 here); then ``u = momentum * u + g``, ``v = v + u`` (float32); the values
    ``v[indices]`` go on the wire as :func:`wire_values` decodes them; at the indices ``u``
    becomes 0 and ``v`` becomes ``v - sent`` (0 for fp32). Returns ``(v before sending, sent,
    new u, new v)``."""
    g = grad.detach().reshape(-1).cpu().float()
    if clip_norm > 0:
        norm = float(np.linalg.norm(as_float64(g)))
        g = g * float(min(1.0, (clip_norm / math.sqrt(world)) / (norm + 1e-12)))
    u = u.detach().reshape(-1).cpu().float() * momentum + g
    acc = v.detach().reshape(-1).cpu().float() + u
    idx = torch.as_tensor(indices, dtype=torch.int64).cpu()
    chosen = acc[idx]
    sent = wire_values(chosen, values)
    new_u, new_v = u.clone(), acc.clone()
    new_u[idx] = 0.0
    new_v[idx] = chosen - sent
    return acc, sent, new_u, new_v


def agreed_ef21(estimate, grad, indices, values: str):
    """EF21 sending at a given index set, one worker, in plain torch: the change
    ``grad - estimate`` (float32) at the indices goes on the wire as :func:`wire_values` decodes
    it, and the estimate moves by what was sent there. Returns ``(change, sent, new estimate)``;
    the global estimate moves by the average of every worker's sent values (the caller's sum)."""
    change = grad.detach().reshape(-1).cpu().float() - estimate.detach().reshape(-1).cpu().float()
    idx = torch.as_tensor(indices, dtype=torch.int64).cpu()
    sent = wire_values(change[idx], values)
    new = estimate.detach().reshape(-1).cpu().float().clone()
    new[idx] = new[idx] + sent
    return change, sent, new

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

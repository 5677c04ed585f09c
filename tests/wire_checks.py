"""Helpers of the wire tests (test_value_codecs.py, test_local_index.py): seeded inputs, bitwise
comparisons of floats and bytes, and an ``out`` with guard regions on both sides."""

import zlib

import numpy as np
import torch

GUARD = 16
SENTINEL = -1234.5


def seeded(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_values(rng: np.random.Generator, k: int) -> np.ndarray:
    """float32 values of varied magnitude, with zeros, a -0.0 and a repeated maximum."""
    values = rng.standard_normal(k) * 10.0 ** rng.uniform(-3, 3)
    values[rng.random(k) < 0.1] = 0.0
    if k > 2:
        values[rng.integers(0, k)] = -0.0
        values[rng.integers(0, k)] = -np.abs(values).max()
    return values.astype(np.float32)


def bits(x) -> np.ndarray:
    """float32 tensor or array as uint32 bits, NaNs made one pattern (their payload bits are
    the hardware's choice)."""
    a = np.array(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    a = a.reshape(-1).copy()
    a[np.isnan(a)] = np.float32("nan")
    return a.view(np.uint32)


def assert_same_floats(got, want, what=""):
    g, w = bits(got), bits(want)
    assert g.shape == w.shape, what
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (f"{what}: {bad.size} entries differ, first at {bad[:5].tolist()}: "
                           f"{g[bad[:5]].view(np.float32).tolist()} vs {w[bad[:5]].view(np.float32).tolist()}")


def assert_same_bytes(got: torch.Tensor, want: np.ndarray, what=""):
    g = got.cpu().numpy()
    assert g.dtype == np.uint8 and g.shape == want.shape, (what, g.shape, want.shape)
    bad = np.flatnonzero(g != want)
    assert bad.size == 0, f"{what}: {bad.size} bytes differ, first at {bad[:8].tolist()}"


def guarded(numel, fill):
    big = torch.full((numel + 2 * GUARD,), SENTINEL)
    out = big[GUARD:GUARD + numel]
    out.fill_(fill)
    return big, out


def check_guards(big):
    assert torch.equal(big[:GUARD], torch.full((GUARD,), SENTINEL)), "wrote before out"
    assert torch.equal(big[-GUARD:], torch.full((GUARD,), SENTINEL)), "wrote after out"


def decode_both(fmt, gathered: np.ndarray, divisor):
    """decode_sum (into zeros) and decode_average (into garbage), both between guards; checks that
    they agree bit for bit (average == zero + sum, then / divisor) and have the same flags."""
    g = torch.from_numpy(np.ascontiguousarray(gathered))
    big, out = guarded(fmt.numel, 0.0)
    finite, well_formed = fmt.decode_sum(g, out)
    check_guards(big)
    big_avg, avg = guarded(fmt.numel, float("nan"))
    finite_avg, well_formed_avg = fmt.decode_average(g, avg, divisor)
    check_guards(big_avg)
    assert finite.dtype == torch.bool and well_formed.dtype == torch.bool
    assert finite.tolist() == finite_avg.tolist() and well_formed.tolist() == well_formed_avg.tolist()
    assert_same_floats(avg, out / divisor, "decode_average vs decode_sum / divisor")
    return out, avg, finite, well_formed

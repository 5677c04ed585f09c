"""Seeded stochastic rounding of the integer codecs (int8, int4, int2): the fused pack against the
torch reference (bit for bit), the draws against an independent plain-Python SplitMix64, the
rounding's range and unbiasedness, the option's errors, and the compressor option end to end."""

from __future__ import annotations

import struct

import pytest
import torch

import gradsieve
from conftest import requires_cuda
from gradsieve import ops, wire
from gradsieve.wire import PayloadFormat

INTEGER = ("int8", "int4", "int2")
MASK = (1 << 64) - 1


def splitmix_draw(seed: int, slot: int, value: float) -> float:
    """radix_key.h's rounding_draw with Python integers (exact modulo 2^64)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    counter = (bits << 32) | (slot & 0xFFFFFFFF)
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 40) / 16777216.0


@pytest.mark.parametrize("seed", [0, 1, 12345, (1 << 63) - 1, -1, -(1 << 63)])
def test_draws_are_splitmix64(seed):
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(40, generator=gen), torch.tensor([0.0, -0.0, 1e-30, -7.5])])
    got = wire.rounding_draws(seed, values)
    want = [splitmix_draw(seed % (1 << 64), j, float(v)) for j, v in enumerate(values.tolist())]
    assert got.dtype == torch.float32
    assert got.tolist() == want
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


def independent_codes(values, codec: str, chunk: int, seed: int):
    """Codes of values (a list of floats) by the rule: scale = max|x| / qmax per chunk (float32),
    code = clamp(floor(x / scale + u), +-qmax) in float32, 0 under a zero scale."""
    import numpy as np

    qmax = {"int8": 127, "int4": 7, "int2": 1}[codec]
    x = np.asarray(values, dtype=np.float32)
    codes = []
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        scale = np.float32(np.abs(part).max()) / np.float32(qmax)
        for j, v in enumerate(part, start):
            if not scale > 0:
                codes.append(0)
                continue
            r = np.float32(np.float32(v / scale) + np.float32(splitmix_draw(seed, j, float(v))))
            codes.append(int(max(-qmax, min(qmax, np.floor(r)))))
    return codes


@pytest.mark.parametrize("codec", INTEGER)
@pytest.mark.parametrize("chunk", [1, 5, 32])
def test_codes_follow_the_rule(codec, chunk):
    gen = torch.Generator().manual_seed(11)
    k, numel, seed = 70, 1000, 987654321
    indices = torch.randperm(numel, generator=gen)[:k].sort().values
    values = torch.randn(k, generator=gen)
    values[::9] = 0.0
    fmt = PayloadFormat(k, codec, chunk, "int32", numel)
    codes, scales = wire.quantize(values, fmt.codec, chunk, seed)
    assert codes.tolist() == independent_codes(values.tolist(), codec, chunk, seed)
    payload, sent = fmt.pack(torch.tensor(True), indices, values, ordered=True, seed=seed)
    assert torch.equal(sent, wire.dequantize(codes, scales, fmt.codec, chunk))


@pytest.mark.parametrize("codec", INTEGER)
@pytest.mark.parametrize("index", wire.INDEX_FORMATS)
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("checksum", [False, True])
def test_fused_pack_is_the_reference(codec, index, padding, checksum):
    gen = torch.Generator().manual_seed(5)
    k, numel = 300, 70_000
    indices = torch.randperm(numel, generator=gen)[:k]
    values = torch.randn(k, generator=gen) * torch.rand(k, generator=gen).pow(4) * 10
    values[7] = 0.0
    valid = (torch.rand(k, generator=gen) > 0.3) if padding else None
    fmt = PayloadFormat(k, codec, 16, index, numel, checksum)
    for seed in (0, 77, -5):
        fused = fmt.pack(torch.tensor(True), indices, values, valid, seed=seed)
        reference = fmt.pack_reference(torch.tensor(True), indices, values, valid, seed=seed)
        assert torch.equal(fused[0], reference[0])
        assert torch.equal(fused[1], reference[1])
        out = torch.zeros(numel)
        finite, well_formed = fmt.decode_sum(fused[0].unsqueeze(0), out)
        assert bool(finite.all()) and bool(well_formed.all())
        expected = torch.zeros(numel).index_add_(0, indices, fused[1])
        assert torch.equal(out, expected)


@pytest.mark.parametrize("codec", INTEGER)
def test_rounding_is_floor_or_ceil_and_unbiased(codec):
    """Every code is floor or ceil of x / scale (within +-qmax), and over many seeds the mean
    decoded value is x within the sampling error."""
    gen = torch.Generator().manual_seed(2)
    k = 64
    values = torch.randn(k, generator=gen)
    fmt = PayloadFormat(k, codec, k, "int32", k)
    indices = torch.arange(k)
    scale = float(values.abs().max()) / fmt.codec.qmax
    ratio = values / scale
    trials = 400
    total = torch.zeros(k, dtype=torch.float64)
    for seed in range(trials):
        _, sent = fmt.pack(torch.tensor(True), indices, values, ordered=True, seed=seed)
        codes = torch.round(sent / scale)
        assert bool(((codes == ratio.floor()) | (codes == ratio.ceil())).all())
        total += sent.double()
    mean = total / trials
    # Each draw is a Bernoulli step of one scale: the mean's standard error is at most scale / (2 sqrt(n)).
    assert float((mean - values.double()).abs().max()) < 5 * scale / (2 * trials ** 0.5)
    _, nearest = fmt.pack(torch.tensor(True), indices, values, ordered=True)
    assert not torch.equal(nearest, fmt.pack(torch.tensor(True), indices, values, ordered=True, seed=1)[1])


def test_seed_needs_an_integer_codec():
    for codec in ("fp32", "fp16", "bf16", "sign"):
        fmt = PayloadFormat(4, codec, 4, "int32", 10)
        with pytest.raises(ValueError, match=rf"seed \(stochastic rounding\) needs values .*got '{codec}'"):
            fmt.pack(torch.tensor(True), torch.arange(4), torch.ones(4), seed=1)
        with pytest.raises(RuntimeError, match=rf"pack_payload: seed \(stochastic rounding\) needs wire .*got '{codec}'"):
            ops.pack_payload(torch.tensor(True), torch.arange(4), torch.ones(4), None, codec, 4, "int32", 10,
                             seed=1)
    fmt = PayloadFormat(4, "int4", 4, "int32", 10)
    for bad in (1 << 63, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int"):
            fmt.pack(torch.tensor(True), torch.arange(4), torch.ones(4), seed=bad)


@pytest.mark.parametrize("codec", INTEGER)
def test_opcheck_with_a_seed(codec):
    args = (torch.tensor(True), torch.arange(0, 40, 2), torch.randn(20), torch.rand(20) > 0.2, codec, 8,
            "local", 64, False, 123)
    torch.library.opcheck(torch.ops.gradsieve.pack_payload.default, args)


def test_compressor_option():
    with pytest.raises(ValueError, match=r"compressor 'topk': rounding='stochastic' needs values 'int8', "
                                         r"'int4' or 'int2', got values='fp32'"):
        gradsieve.get_compressor("topk", rounding="stochastic")
    with pytest.raises(ValueError, match="rounding"):
        gradsieve.get_compressor("topk", values="int4", rounding="up")
    compressor = gradsieve.get_compressor("topk", values="int4", rounding="stochastic")
    assert compressor.config()["rounding"] == "stochastic"


def run_simulator(steps: int = 6, **options):
    sim = gradsieve.Simulator("topk", world_size=2, density=0.05, values="int4", chunk=8, **options)
    gen = torch.Generator().manual_seed(9)
    outs = []
    for _ in range(steps):
        outs.append(sim.step([torch.randn(2000, generator=gen) for _ in range(2)]).clone())
    return outs


def test_compressor_rounds_stochastically_and_reproducibly():
    stochastic = run_simulator(rounding="stochastic")
    again = run_simulator(rounding="stochastic")
    assert all(torch.equal(a, b) for a, b in zip(stochastic, again))
    other_seed = run_simulator(rounding="stochastic", rounding_seed=1)
    nearest = run_simulator()
    assert not all(torch.equal(a, b) for a, b in zip(stochastic, other_seed))
    assert not all(torch.equal(a, b) for a, b in zip(stochastic, nearest))


@requires_cuda
@pytest.mark.parametrize("codec", INTEGER)
@pytest.mark.parametrize("index", wire.INDEX_FORMATS)
def test_cuda_rounds_as_the_cpu(codec, index):
    gen = torch.Generator().manual_seed(8)
    k, numel = 5000, 400_000
    indices = torch.randperm(numel, generator=gen)[:k]
    values = torch.randn(k, generator=gen)
    valid = torch.rand(k, generator=gen) > 0.1
    fmt = PayloadFormat(k, codec, 32, index, numel)
    cpu = fmt.pack(torch.tensor(True), indices, values, valid, seed=2024)
    gpu = fmt.pack(torch.tensor(True, device="cuda"), indices.cuda(), values.cuda(), valid.cuda(), seed=2024)
    assert torch.equal(cpu[0], gpu[0].cpu())
    assert torch.equal(cpu[1], gpu[1].cpu())

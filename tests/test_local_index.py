"""Chunk-local indices (index="local", spec part 2) against the independent NumPy reference of
tests/wire_reference.py: the choice of the layout (b, offsets or bitmap mode) and the sizes, the
bytes and ``sent`` of ``PayloadFormat.pack`` / ``pack_reference`` (ordered and with a ``valid``
mask) for every codec, the sums and flags of ``decode_sum`` / ``decode_average`` bit for bit,
hand-built payloads of both modes (the spec's worked example among them), each well-formedness rule
of the local index (offsets mode: the descriptor, the unary part's set bits, padding bits included,
the chunks and positions they give), hostile bytes (never a raise, never a write outside ``out``,
the flags of the reference) and the bits an entry's index takes at density 0.01."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wire_reference as W
from wire_checks import (GUARD, SENTINEL, assert_same_bytes, assert_same_floats, bits, check_guards, decode_both,
                         make_values, seeded)
from conftest import requires_cuda
from gradsieve.wire import PayloadFormat

CODECS = ["fp32", "fp16", "int8", "int4", "int2", "sign"]
ALL_CODECS = CODECS + ["bf16"]
SCALED = ["int8", "int4", "int2", "sign"]

# (K, numel): offsets mode at densities 0.0005 to 0.2, then bitmap mode (density >= 0.3)
OFFSETS_CONFIGS = [(1, 1000), (5, 1000), (50, 1000), (35, 70_000), (700, 70_000), (150, 300_000),
                   (1500, 300_000), (200, 1000), (40, 200)]
BITMAP_CONFIGS = [(300, 1000), (1000, 1000), (70, 200)]
CONFIGS = OFFSETS_CONFIGS + BITMAP_CONFIGS


def local_format(k, codec, chunk, numel, checksum=False) -> PayloadFormat:
    return PayloadFormat(k, codec, chunk, "local", numel, checksum)


def index_at(checksum: bool) -> int:
    return W.header_bytes(checksum)


def refresh_checksum(row: np.ndarray, checksum: bool) -> None:
    """Rewrites a changed payload's checksum, so that the index rules are what flags it."""
    if checksum:
        row[8:12] = 0
        row[8:12] = np.array([W.checksum(row)], "<i4").view(np.uint8)


def sorted_distinct(rng, numel, count, spread=None, last=False) -> np.ndarray:
    """``count`` ascending distinct positions below ``spread`` (default numel); ``last``: the
    bucket's last position among them (in the last, maybe partial, chunk)."""
    spread = numel if spread is None else spread
    idx = rng.choice(spread, count, replace=False).astype(np.int64)
    if last and count:
        idx[0] = numel - 1
        idx = np.unique(idx)
        while idx.size < count:  # numel - 1 may have been drawn already
            idx = np.unique(np.concatenate([idx, rng.choice(numel, count - idx.size)]))
    return np.sort(idx)


# ------------------------------------------------------------------------- layout and sizes
def test_the_configurations_cover_both_modes():
    assert not any(W.local_layout(k, n)[1] for k, n in OFFSETS_CONFIGS)
    assert all(W.local_layout(k, n)[1] for k, n in BITMAP_CONFIGS)


def test_layouts_worked_out_by_hand():
    # offsets_bytes(b) = 4 * ceil((K + nchunks) / 32) + 4 * ceil(K * b / 32), nchunks = ceil(numel / 2^b)
    # density 0.01 over 1e6: b=6 (15625 chunks: 25625 unary bits in 3204 bytes; 60000 bits of offsets
    # in 7500 bytes: 10704); b=5 takes 5160 + 6252, b=7 2228 + 8752
    fmt = local_format(10_000, "fp32", 256, 1_000_000)
    assert (fmt.local_bits, fmt.local_bitmap) == (6, False)
    assert fmt.nbytes == 8 + 4 + 3204 + 7500 + 4 * 10_000
    # K=300 over 1000: a bitmap of 128 bytes beats any b (b=1: 800 unary bits, 100 bytes, + 40)
    fmt = local_format(300, "int4", 7, 1000)
    assert (fmt.local_bits, fmt.local_bitmap) == (0, True)
    assert fmt.nbytes == 8 + 4 + 128 + 4 * 43 + 150
    # K=200 over 1000 (density 0.2): b=2 (250 chunks: 450 bits in 60 bytes; 400 bits in 52) beats
    # the bitmap's 128 and b=1 (88 + 28), b=3 (44 + 76)
    fmt = local_format(200, "fp32", 256, 1000)
    assert (fmt.local_bits, fmt.local_bitmap) == (2, False)
    assert fmt.nbytes == 8 + 4 + 60 + 52 + 4 * 200
    # K=70 over 200 (density 0.35): the bitmap (28 bytes) beats b=1 (170 bits: 24 + 12) and b=2
    # (120 bits: 16; 140 bits: 20)
    fmt = local_format(70, "fp32", 256, 200)
    assert (fmt.local_bits, fmt.local_bitmap) == (0, True) and fmt.nbytes == 8 + 4 + 28 + 4 * 70
    # K=3 over 1000 (the spec's worked example): b=6 (16 chunks: 19 bits in 4 bytes; 18 bits in 4);
    # every b <= 5 has 32 chunks or more: 8 bytes of unary part alone
    fmt = local_format(3, "sign", 256, 1000, True)
    assert (fmt.local_bits, fmt.local_bitmap) == (6, False)
    assert fmt.nbytes == 16 + 4 + 4 + 4 + 4 + 1
    # K=13 over 1000: b=6 (29 unary bits in 4 bytes; 78 bits of offsets in 12); b=7 (21 bits; 91
    # bits) takes as many bytes, b=5 (45 bits: 8; 65 bits: 12) more
    fmt = local_format(13, "fp32", 256, 1000)
    assert (fmt.local_bits, fmt.local_bitmap) == (6, False) and fmt.nbytes == 8 + 4 + 4 + 12 + 4 * 13
    # K=3 over 10: offsets take 8 bytes at best (4 + 4), the bitmap 4
    assert (local_format(3, "fp32", 256, 10).local_bits, local_format(3, "fp32", 256, 10).local_bitmap) == (0, True)
    # K=0 over 10: b=1 (5 chunks: 5 bits in 4 bytes; no offsets) takes 4 bytes, the bitmap 4 too: a
    # tie is offsets mode, and the smallest b
    fmt = local_format(0, "fp32", 256, 10)
    assert (fmt.local_bits, fmt.local_bitmap) == (1, False) and fmt.nbytes == 8 + 4 + 4
    # numel 0: no chunk, no bitmap word; b=1 and nothing but the descriptor
    fmt = local_format(0, "int8", 256, 0)
    assert (fmt.local_bits, fmt.local_bitmap) == (1, False) and fmt.nbytes == 8 + 4
    # K=4 over 70000: b=12 (18 chunks: 22 bits in 4 bytes; 48 bits in 8); b=13, 14, 15 (9, 5, 3
    # chunks) take 12 bytes too, b=11 (35 chunks: 39 bits in 8; 44 bits in 8) 16
    fmt = local_format(4, "fp16", 256, 70_000)
    assert (fmt.local_bits, fmt.local_bitmap) == (12, False) and fmt.nbytes == 8 + 4 + 4 + 8 + 8


def test_layout_is_the_reference():
    for k in list(range(0, 40)) + list(range(40, 3000, 37)):
        for numel in list(range(max(k, 1), max(k, 1) + 3)) + [31, 32, 33, 64, 100, 999, 1000, 1024, 1025,
                                                              5000, 65_535, 65_536, 70_001, 300_000]:
            if numel < k:
                continue
            fmt = local_format(k, "fp32", 256, numel)
            b, bitmap = W.local_layout(k, numel)
            assert (fmt.local_bits, fmt.local_bitmap) == (b, bitmap), (k, numel)


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", ALL_CODECS)
def test_nbytes_is_the_reference(codec, checksum):
    ks = [0, 1, 2, 3, 5, 8, 13, 31, 32, 33, 100, 256, 300, 1000, 3000, 10_000]
    numels = [0, 1, 10, 31, 32, 33, 100, 1000, 1025, 65_536, 70_000, 300_000, 1_000_000]
    for k, numel, chunk in itertools.product(ks, numels, [1, 4, 7, 256]):
        if k > max(numel, 1):
            continue
        fmt = local_format(k, codec, chunk, numel, checksum)
        assert fmt.nbytes == W.payload_nbytes(k, codec, chunk, "local", numel, checksum), (k, numel, chunk)
        assert fmt.slots == k
        assert (fmt.local_bits, fmt.local_bitmap) == W.local_layout(k, numel), (k, numel)


def test_index_bits_per_entry_at_density_one_percent():
    """The local index beats csr16 (about 16 bits an entry) at any density; at 0.01 over 1e6 it
    takes 10708 bytes, 8.57 bits an entry (under 9), descriptor and unary part included."""
    numel = 1_000_000
    table = {}
    for density in [0.0005, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5]:
        k = int(density * numel)
        local = local_format(k, "fp32", 256, numel).nbytes - 8 - 4 * k
        csr16 = PayloadFormat(k, "fp32", 256, "csr16", numel).nbytes - 8 - 4 * k
        assert local == W.index_bytes(k, "local", numel)
        assert local < csr16, density
        table[density] = local * 8 / k
    assert local_format(10_000, "fp32", 256, numel).nbytes == 8 + 10708 + 4 * 10_000
    assert table[0.01] < 9, table
    assert table[0.2] < 4.3, table  # offsets mode, b=2: 1 + 1/(0.2 * 4) + 2 bits an entry
    assert table[0.5] < 2.01, table  # bitmap mode: numel / K bits an entry


# -------------------------------------------------------------------------------------- pack
def check_pack(fmt, finite, idx, values, want_payload, want_sent, valid=None, ordered=False, what=""):
    fin = torch.tensor(finite)
    i, v = torch.from_numpy(idx), torch.from_numpy(values)
    m = None if valid is None else torch.from_numpy(valid)
    for name, method in (("pack", fmt.pack), ("pack_reference", fmt.pack_reference)):
        payload, sent = method(fin, i, v, m, ordered=ordered)
        assert payload.dtype == torch.uint8 and sent.dtype == torch.float32
        assert_same_bytes(payload, want_payload, f"{name} {what}")
        assert_same_floats(sent, want_sent, f"{name} sent {what}")


def pack_cases(fmt, rng, k, codec, chunk, numel, checksum, what):
    finite = bool(rng.integers(0, 2))
    values = make_values(rng, k)

    # ascending distinct positions (the last one among them), every slot in use
    idx = sorted_distinct(rng, numel, k, last=True)
    want = W.encode_payload(finite, idx, values, k, codec, chunk, "local", numel, checksum)
    check_pack(fmt, finite, idx, values, *want, ordered=True, what="ordered " + what)
    check_pack(fmt, finite, idx, values, *want, what="default " + what)

    # unordered, some slots invalid: pack puts the valid ones first, ascending
    idx = rng.permutation(numel)[:k].astype(np.int64)
    valid = rng.random(k) < 0.7
    want = W.encode_unordered(finite, idx, values, valid, codec, chunk, "local", numel, checksum)
    check_pack(fmt, finite, idx, values, *want, valid=valid, what="valid " + what)

    # the same in wire order (padding slots: index 0, value 0)
    count = int(valid.sum())
    wire_idx = np.zeros(k, np.int64)
    wire_idx[:count] = np.sort(idx[valid])
    wire_values = np.zeros(k, np.float32)
    wire_values[:count] = values[valid][np.argsort(idx[valid], kind="stable")]
    want = W.encode_payload(finite, wire_idx, wire_values, count, codec, chunk, "local", numel, checksum)
    check_pack(fmt, finite, wire_idx, wire_values, *want, valid=np.arange(k) < count, ordered=True,
               what="valid ordered " + what)


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_pack_is_the_reference(codec, checksum):
    for k, numel in CONFIGS:
        chunk = int(seeded("chunk", codec, k, numel).choice([4, 7, 256]))
        rng = seeded("pack", codec, checksum, k, numel)
        fmt = local_format(k, codec, chunk, numel, checksum)
        pack_cases(fmt, rng, k, codec, chunk, numel, checksum, f"k={k} numel={numel} chunk={chunk}")


@pytest.mark.slow
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", ALL_CODECS)
def test_pack_is_the_reference_large(codec, checksum):
    for k, numel in [(3000, 300_000), (10_000, 1_000_000), (3000, 10_000)]:
        rng = seeded("pack-large", codec, checksum, k, numel)
        fmt = local_format(k, codec, 256, numel, checksum)
        pack_cases(fmt, rng, k, codec, 256, numel, checksum, f"k={k} numel={numel}")
        ok, _ = check_decode(fmt, reference_world(rng, 2, k, codec, 256, numel, checksum, numel), f"k={k}")
        assert ok.all()


# ------------------------------------------------------------------------------------ decode
def reference_world(rng, world, k, codec, chunk, numel, checksum, spread):
    """``world`` well-formed payloads from the reference encoder, positions drawn from the first
    ``spread`` (so that ranks meet), counts from 0 to k, either finite flag."""
    rows = []
    for _ in range(world):
        count = min(int(rng.integers(0, k + 1)) if rng.random() < 0.5 else k, numel)
        idx = np.zeros(k, np.int64)
        idx[:count] = sorted_distinct(rng, numel, count, spread=min(max(spread, count), numel))
        rows.append(W.encode_payload(bool(rng.integers(0, 2)), idx, make_values(rng, k), count, codec,
                                     chunk, "local", numel, checksum)[0])
    return np.stack(rows) if rows else np.zeros((0, W.payload_nbytes(k, codec, chunk, "local", numel, checksum)),
                                                np.uint8)


def assert_sum_is_the_reference(fmt, gathered: np.ndarray, out: torch.Tensor, what=""):
    """out is the reference sum of the (well-formed) ``gathered``; the padding slots of a chunk
    with a non-finite scale may add 0 * scale (NaN) at position 0 (the codec rule the spec keeps
    for slots not in use)."""
    args = (gathered, fmt.values, fmt.chunk, "local", fmt.numel, fmt.checksum, fmt.entries)
    strict = W.decode_payloads(*args)[0]
    if not np.array_equal(bits(out), bits(strict)):
        assert_same_floats(out, W.decode_payloads(*args, padding="zero_times_scale")[0], what)


def check_decode(fmt, gathered, what=""):
    world = max(gathered.shape[0], 1)
    want_sum, want_finite, want_ok = W.decode_payloads(gathered, fmt.values, fmt.chunk, "local", fmt.numel,
                                                       fmt.checksum, fmt.entries)
    out, avg, finite, well_formed = decode_both(fmt, gathered, world)
    assert finite.tolist() == want_finite.tolist(), what
    assert well_formed.tolist() == want_ok.tolist(), what
    if want_ok.all():
        assert_sum_is_the_reference(fmt, gathered, out, "decode_sum " + what)
        assert_same_floats(avg, (out.numpy() / np.float32(world)).astype(np.float32), "decode_average " + what)
    return want_ok, out


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_decode_is_the_reference(codec, checksum):
    configs = [(1, 1000, 1000), (5, 1000, 20), (50, 1000, 1000), (35, 70_000, 70_000), (35, 70_000, 300),
               (700, 70_000, 2000), (150, 300_000, 300_000), (300, 1000, 400), (200, 1000, 1000),
               (1000, 1000, 1000), (40, 200, 200)]
    for (k, numel, spread), world in itertools.product(configs, [1, 2, 3]):
        rng = seeded("decode", codec, checksum, k, numel, spread, world)
        chunk = int(rng.choice([4, 7, 256]))
        fmt = local_format(k, codec, chunk, numel, checksum)
        gathered = reference_world(rng, world, k, codec, chunk, numel, checksum, spread)
        ok, _ = check_decode(fmt, gathered, f"k={k} numel={numel} spread={spread} world={world}")
        assert ok.all()


# ---------------------------------------------------------------------------------- edge cases
EDGES = [(0, 1000), (0, 10), (0, 1), (0, 0), (1, 1), (1, 2), (2, 2), (3, 10), (10, 10),
         (31, 31), (32, 32), (33, 33), (5, 33), (33, 1000), (100, 100), (13, 65_537), (4, 70_000)]


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_edge_cases(codec, checksum):
    """K=0, tiny buckets, K=numel, numel=0 with K=0 (offsets mode with no chunk), counts from 0
    to K, the bucket's last position."""
    for k, numel in EDGES:
        chunk = 3
        fmt = local_format(k, codec, chunk, numel, checksum)
        assert fmt.nbytes == W.payload_nbytes(k, codec, chunk, "local", numel, checksum), (k, numel)
        assert (fmt.local_bits, fmt.local_bitmap) == W.local_layout(k, numel), (k, numel)
        rng = seeded("edge", codec, checksum, k, numel)
        for count in sorted({0, min(k, numel), min(k, numel, 1), int(rng.integers(0, min(k, numel) + 1))}):
            what = f"k={k} numel={numel} count={count}"
            idx = np.zeros(k, np.int64)
            idx[:count] = sorted_distinct(rng, numel, count, last=True)
            values = make_values(rng, k)
            values[count:] = 0  # (see test_padding_values_are_not_encoded)
            valid = np.arange(k) < count
            want = W.encode_payload(True, idx, values, count, codec, chunk, "local", numel, checksum)
            check_pack(fmt, True, idx, values, *want, valid=valid, ordered=True, what=what)
            if count == k:
                check_pack(fmt, True, idx, values, *want, ordered=True, what=what)
            perm = rng.permutation(k)
            want_u = W.encode_unordered(True, idx[perm], values[perm], valid[perm], codec, chunk, "local",
                                        numel, checksum)
            check_pack(fmt, True, idx[perm], values[perm], *want_u, valid=valid[perm], what="unordered " + what)
            ok, _ = check_decode(fmt, np.stack([want[0], want_u[0]]), what)
            assert ok.all(), what


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", CODECS)
def test_empty_bucket_with_slots(codec, checksum):
    """numel 0 and K > 0: bitmap mode with no word (0 bytes beat 4 * ceil(K * b / 32)). Every
    such payload is malformed, as with the other index formats: its slots past the count decode at
    index 0, which an empty bucket does not have."""
    for k in (1, 3):
        fmt = local_format(k, codec, 3, 0, checksum)
        assert (fmt.local_bits, fmt.local_bitmap) == (0, True)
        assert fmt.nbytes == W.payload_nbytes(k, codec, 3, "local", 0, checksum)
        idx, values, valid = np.zeros(k, np.int64), np.zeros(k, np.float32), np.zeros(k, bool)
        want = W.encode_payload(True, idx, values, 0, codec, 3, "local", 0, checksum)
        check_pack(fmt, True, idx, values, *want, valid=valid, ordered=True, what=f"k={k} numel=0")
        check_pack(fmt, True, idx, values, *want, valid=valid, what=f"k={k} numel=0 unordered")
        ok, _ = check_decode(fmt, want[0][None], "numel 0 count 0")
        assert ok.tolist() == [False]
    fmt = local_format(1, codec, 3, 0, checksum)
    row = W.encode_payload(True, [0], [1.0], 0, codec, 3, "local", 0, checksum)[0]
    row[4:8] = np.array([1], "<i4").view(np.uint8)
    refresh_checksum(row, checksum)
    ok, _ = check_decode(fmt, row[None], "numel 0 count 1")
    assert ok.tolist() == [False]


# ---------------------------------------------------------------------------- hand-built
def header(flag, count):
    return list(np.array([flag, count], "<i4").view(np.uint8))


def le32(*ints):
    return list(np.array(ints, "<i4").view(np.uint8))


def hand_check(fmt, raw, want: dict, well_formed=True):
    raw = np.array(raw, np.uint8)
    assert raw.size == fmt.nbytes == W.payload_nbytes(fmt.entries, fmt.values, fmt.chunk, "local", fmt.numel,
                                                      fmt.checksum)
    expected = np.zeros(fmt.numel, np.float32)
    for position, value in want.items():
        expected[position] = value
    ref_sum, ref_finite, ref_ok = W.decode_payloads(raw[None], fmt.values, fmt.chunk, "local", fmt.numel,
                                                    fmt.checksum, fmt.entries)
    assert ref_ok.tolist() == [well_formed]
    if well_formed:
        assert_same_floats(ref_sum, expected, "reference")
    out, _, finite, ok = decode_both(fmt, raw[None], 1)
    assert ok.tolist() == [well_formed]
    if well_formed:
        assert_same_floats(out, expected, fmt.values)


def test_hand_built_offsets_payload():
    """The spec's worked example. K=3 over 1000: b=6, 16 chunks of 64. Positions 5, 7 (chunk 0),
    600 (chunk 9, field 24): unary bits 0, 1 and 2 + 9 = 11 (bytes 0b11, 0b1000, 0, 0); fields 5,
    7, 24 at bits 0, 6, 12; fp32 values."""
    fmt = local_format(3, "fp32", 256, 1000)
    assert (fmt.local_bits, fmt.local_bitmap) == (6, False)
    raw = (header(1, 3) + le32(6) + [0b0000_0011, 0b0000_1000, 0, 0]
           + list((5 | 7 << 6 | 24 << 12).to_bytes(4, "little"))
           + list(np.array([1.5, -2.0, 4.0], "<f4").view(np.uint8)))
    hand_check(fmt, raw, {5: 1.5, 7: -2.0, 600: 4.0})
    # what pack (and the reference) write is this payload
    assert W.encode_payload(True, [5, 7, 600], [1.5, -2.0, 4.0], 3, "fp32", 256, "local", 1000,
                            False)[0].tolist() == raw
    payload, sent = fmt.pack(torch.tensor(True), torch.tensor([600, 5, 7]), torch.tensor([4.0, 1.5, -2.0]))
    assert payload.tolist() == raw
    assert sent.tolist() == [4.0, 1.5, -2.0]


def test_hand_built_offsets_payload_with_an_empty_chunk_and_padding():
    """K=4 over 70000: b=12, 18 chunks of 4096 (the last partial). Positions 5, 4095 (chunk 0),
    8292 (chunk 2, field 100), 69999 (chunk 17, field 367); chunks 1 and 3..16 empty: unary bits
    0, 1, 2 + 2 = 4, 3 + 17 = 20 (bytes 0x13, 0, 0x10, 0); int2 codes 1, -1, -2, 1, scale 2 (chunk
    4). Then the same with a count of 3: the 4th slot is padding (no bit, field 0)."""
    fmt = local_format(4, "int2", 4, 70_000)
    assert (fmt.local_bits, fmt.local_bitmap) == (12, False)
    unary = [0x13, 0x00, 0x10, 0x00]
    fields = list((5 | 4095 << 12 | 100 << 24 | 367 << 36).to_bytes(8, "little"))
    raw = header(1, 4) + le32(12) + unary + fields + list(np.array([2.0], "<f4").view(np.uint8)) + [0b01_10_11_01]
    hand_check(fmt, raw, {5: 2.0, 4095: -2.0, 8292: -4.0, 69999: 2.0})
    payload, _ = fmt.pack(torch.tensor(True), torch.tensor([5, 4095, 8292, 69999]),
                          torch.tensor([2.0, -2.0, -4.0, 2.0]), ordered=True)
    assert payload[:24].tolist() == raw[:24]  # the values get scale 4 (max |x| / qmax): index only

    unary = [0x13, 0x00, 0x00, 0x00]
    fields = list((5 | 4095 << 12 | 100 << 24).to_bytes(8, "little"))
    raw = (header(1, 3) + le32(12) + unary + fields + list(np.array([4.0 / 1.0], "<f4").view(np.uint8))
           + [0b00_11_11_01])  # values 4, -4, -4 (then a padding slot): scale 4, codes 1 -1 -1 0
    hand_check(fmt, raw, {5: 4.0, 4095: -4.0, 8292: -4.0})
    assert W.encode_payload(True, [5, 4095, 8292, 0], [4.0, -4.0, -4.0, 0.0], 3, "int2", 4, "local", 70_000,
                            False)[0].tolist() == raw
    payload, _ = fmt.pack(torch.tensor(True), torch.tensor([5, 4095, 8292, 0]), torch.tensor([4.0, -4.0, -4.0, 0.0]),
                          torch.tensor([True, True, True, False]), ordered=True)
    assert payload.tolist() == raw


def test_hand_built_bitmap_payload():
    """K=3 over 10: bitmap mode, one word. Positions 0, 7, 9: bytes 0x81 0x02; int4 codes 3, -1,
    -8 (0xF3 0x08), scale 0.5."""
    fmt = local_format(3, "int4", 4, 10)
    assert (fmt.local_bits, fmt.local_bitmap) == (0, True)
    raw = header(1, 3) + le32(256) + [0x81, 0x02, 0, 0] + list(np.array([0.5], "<f4").view(np.uint8)) + [0xF3, 0x08]
    hand_check(fmt, raw, {0: 1.5, 7: -0.5, 9: -4.0})
    # pack: scale 1.5 / 7; 1.5 -> 7, -0.5 -> round(-2.333) = -2, 1.0 -> round(4.667) = 5
    payload, _ = fmt.pack(torch.tensor(True), torch.tensor([9, 0, 7]), torch.tensor([1.0, 1.5, -0.5]))
    assert payload[:16].tolist() == raw[:16]
    assert payload[16:20].view(torch.float32).item() == float(np.float32(1.5) / np.float32(7))
    assert payload[20:].tolist() == [0xE7, 0x05]


def test_hand_built_bitmap_payload_over_two_words_with_padding():
    """K=70 over 200 (density 0.35): bitmap of 7 words; sign codec; count 3 of 70: positions 33,
    64, 199 (the last position, bit 7 of byte 24)."""
    fmt = local_format(70, "sign", 256, 200)
    assert (fmt.local_bits, fmt.local_bitmap) == (0, True)
    bitmap = [0] * 28
    bitmap[4] = 0x02  # 33
    bitmap[8] = 0x01  # 64
    bitmap[24] = 0x80  # 199
    raw = header(1, 3) + le32(256) + bitmap + list(np.array([0.75], "<f4").view(np.uint8)) + [0b010] + [0] * 8
    hand_check(fmt, raw, {33: 0.75, 64: -0.75, 199: 0.75})
    valid = torch.zeros(70, dtype=torch.bool)
    valid[[3, 17, 69]] = True
    idx = torch.zeros(70, dtype=torch.int64)
    idx[[3, 17, 69]] = torch.tensor([199, 33, 64])
    x = torch.zeros(70)
    x[[3, 17, 69]] = torch.tensor([1.0, 0.25, -1.0])
    payload, sent = fmt.pack(torch.tensor(True), idx, x, valid)
    assert payload.tolist() == raw
    assert sent[[3, 17, 69]].tolist() == [0.75, 0.75, -0.75] and not sent[~valid].any()


# ------------------------------------------------------------------------------- malformed
def built_payload(mode, codec, checksum, k, numel, count=None):
    """A well-formed payload whose last slot in use is at numel - 1, and its indices."""
    rng = seeded(mode, codec, checksum, k, numel, count)
    count = k if count is None else count
    idx = np.zeros(k, np.int64)
    idx[:count] = sorted_distinct(rng, numel, count, last=True)
    row = W.encode_payload(True, idx, make_values(rng, k), count, codec, 4, "local", numel, checksum)[0]
    return row, idx


def offsets_payload(codec, checksum, k=13, numel=1000, count=None):
    """Offsets mode (K=13 over 1000: b=6, 16 chunks of 64, the last, 960..1023, partial; a unary
    part of 29 bits and 3 padding bits in 4 bytes; 78 bits of offsets in 12 bytes)."""
    return built_payload("offsets-payload", codec, checksum, k, numel, count)


def unary_bits(row: np.ndarray, at: int, nbytes: int) -> np.ndarray:
    """The bits of the unary part (bit q: bit q % 8 of byte q // 8)."""
    return np.unpackbits(row[at + 4:at + 4 + nbytes], bitorder="little")


def set_unary_bits(row: np.ndarray, at: int, bitarr: np.ndarray) -> None:
    row[at + 4:at + 4 + bitarr.size // 8] = np.packbits(bitarr, bitorder="little")


def bitmap_payload(codec, checksum, k=300, numel=1000, count=None):
    return built_payload("bitmap-payload", codec, checksum, k, numel, count)


OFFSETS_MALFORMED = ["descriptor-plus-one", "descriptor-minus-one", "descriptor-bitmap", "descriptor-zero",
                     "descriptor-negative", "unary-extra-bit", "unary-extra-bit-after-the-used",
                     "unary-cleared-bit", "unary-padding-bit", "unary-padding-bit-popcount-right",
                     "unary-into-missing-chunk", "header-count-above", "header-count-below",
                     "position-past-numel"]
SHORT = ("unary-extra-bit-after-the-used", "unary-into-missing-chunk", "header-count-above")


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", ["fp32", "int4", "sign"])
@pytest.mark.parametrize("what", OFFSETS_MALFORMED)
def test_malformed_offsets_payload(what, codec, checksum):
    k, numel = 13, 1000
    fmt = local_format(k, codec, 4, numel, checksum)
    b = fmt.local_bits
    assert (b, fmt.local_bitmap) == (6, False)
    nchunks, unary_bytes, fields_bytes = 16, 4, 12
    count = k - 2 if what in SHORT else k
    row, idx = offsets_payload(codec, checksum, k, numel, count)
    assert idx[count - 1] == numel - 1  # the last slot in use: chunk 15, bit count - 1 + 15
    at = index_at(checksum)
    descriptor = row[at:at + 4].view("<i4")
    unary = unary_bits(row, at, unary_bytes)
    assert np.flatnonzero(unary).tolist() == (np.arange(count) + (idx[:count] >> b)).tolist()
    fields_at = at + 4 + unary_bytes
    fields = W.unpack_fields(row[fields_at:fields_at + fields_bytes], b, k)
    if what == "descriptor-plus-one":
        descriptor[0] = b + 1
    elif what == "descriptor-minus-one":
        descriptor[0] = b - 1
    elif what == "descriptor-bitmap":
        descriptor[0] = 256
    elif what == "descriptor-zero":
        descriptor[0] = 0
    elif what == "descriptor-negative":
        descriptor[0] = -9
    elif what == "unary-extra-bit":
        unary[np.flatnonzero(unary == 0)[0]] = 1  # the first clear bit: the later slots shift a chunk
    elif what == "unary-extra-bit-after-the-used":
        # bit 28, the last of the K + nchunks bits, past the used slots' bits: every slot in use decodes
        # as before, only the number of set bits (12 for a count of 11) is wrong
        assert unary[28] == 0 and unary[:28].sum() == count
        unary[28] = 1
    elif what == "unary-cleared-bit":
        unary[np.flatnonzero(unary)[count // 2]] = 0  # the last slot has no (j+1)-th set bit
    elif what == "unary-padding-bit":
        assert unary[29:].sum() == 0
        unary[30] = 1  # a padding bit is read: 14 set bits for 13 slots
    elif what == "unary-padding-bit-popcount-right":
        unary[np.flatnonzero(unary)[-1]] = 0
        unary[31] = 1  # 13 set bits; the last slot's: q = 31, chunk 31 - 12 = 19 >= 16
    elif what == "unary-into-missing-chunk":
        # the last slot in use (count 11: slot 10, chunk 15, bit 25) moved to the next chunk: bit 26,
        # chunk 16 >= nchunks; the number of set bits is right
        assert unary[25] == 1 and unary[26] == 0
        unary[25], unary[26] = 0, 1
    elif what == "header-count-above":
        row[4:8] = np.array([count + 1], "<i4").view(np.uint8)  # 11 set bits, 12 slots in use
    elif what == "header-count-below":
        row[4:8] = np.array([k - 1], "<i4").view(np.uint8)  # 13 set bits, 12 slots in use
    elif what == "position-past-numel":
        fields[k - 1] = numel - 15 * 64  # chunk 15, field 40: position 1000 = numel
        row[fields_at:fields_at + fields_bytes] = W.pack_fields(fields, b, fields_bytes)
    if what.startswith("unary"):
        set_unary_bits(row, at, unary)
    refresh_checksum(row, checksum)
    ok, _ = check_decode(fmt, np.stack([offsets_payload(codec, checksum, k, numel, 5)[0], row]), what)
    assert ok.tolist() == [True, False], what


BITMAP_MALFORMED = ["descriptor-offsets", "descriptor-zero", "descriptor-257", "extra-bit", "missing-bit",
                    "bit-past-numel", "bit-past-numel-popcount-right", "header-count-above", "header-count-below"]


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("codec", ["fp16", "int8", "int2"])
@pytest.mark.parametrize("what", BITMAP_MALFORMED)
def test_malformed_bitmap_payload(what, codec, checksum):
    k, numel = 300, 1000
    fmt = local_format(k, codec, 4, numel, checksum)
    assert fmt.local_bitmap and fmt.local_bits == 0
    count = k - 10
    row, idx = bitmap_payload(codec, checksum, k, numel, count)
    at = index_at(checksum)
    descriptor = row[at:at + 4].view("<i4")
    bitmap = row[at + 4:at + 4 + 128]
    clear = int(np.setdiff1d(np.arange(numel), idx[:count])[3])
    if what == "descriptor-offsets":
        descriptor[0] = W.local_layout(k, numel)[0] or 5
    elif what == "descriptor-zero":
        descriptor[0] = 0
    elif what == "descriptor-257":
        descriptor[0] = 257
    elif what == "extra-bit":
        bitmap[clear // 8] |= np.uint8(1 << (clear % 8))
    elif what == "missing-bit":
        p = int(idx[count // 2])
        bitmap[p // 8] &= np.uint8(~(1 << (p % 8)) & 0xFF)
    elif what == "bit-past-numel":
        bitmap[1010 // 8] |= np.uint8(1 << (1010 % 8))
    elif what == "bit-past-numel-popcount-right":
        p = int(idx[0])
        bitmap[p // 8] &= np.uint8(~(1 << (p % 8)) & 0xFF)
        bitmap[127] |= np.uint8(0x80)  # bit 1023
    elif what == "header-count-above":
        row[4:8] = np.array([count + 1], "<i4").view(np.uint8)
    elif what == "header-count-below":
        row[4:8] = np.array([count - 1], "<i4").view(np.uint8)
    refresh_checksum(row, checksum)
    ok, _ = check_decode(fmt, np.stack([bitmap_payload(codec, checksum, k, numel, 7)[0], row]), what)
    assert ok.tolist() == [True, False], what


@pytest.mark.parametrize("codec", ["fp32", "int4"])
def test_moved_entries_stay_well_formed(codec):
    """Changes that keep every rule: an entry moved to the next chunk (a 1 of the unary part swapped
    with the 0 that follows it) or to the previous one (with the 0 before it), a field changed, a
    bitmap bit moved. Well formed, and decoded where the reference decodes them."""
    k, numel = 13, 1000
    b = 6
    fmt = local_format(k, codec, 4, numel)
    assert (fmt.local_bits, fmt.local_bitmap) == (b, False)
    row, idx = offsets_payload(codec, False, k, numel)
    at = index_at(False)
    unary = unary_bits(row, at, 4)
    ones = np.flatnonzero(unary)
    assert (ones - np.arange(k)).tolist() == (idx >> b).tolist()
    # a slot whose chunk is below 14 (its position a chunk later is below numel), followed by a 0
    later = [j for j in range(k) if (idx[j] >> b) < 14 and unary[ones[j] + 1] == 0][0]
    moved = row.copy()
    bitarr = unary.copy()
    bitarr[ones[later]], bitarr[ones[later] + 1] = 0, 1
    set_unary_bits(moved, at, bitarr)
    want = idx.copy()
    want[later] += 1 << b
    assert W.parse_local(moved[at:at + 20], k, numel, k)[0].tolist() == want.tolist()
    # a slot in a chunk above 0, preceded by a 0: a chunk earlier
    earlier = [j for j in range(k) if (idx[j] >> b) > 0 and unary[ones[j] - 1] == 0][0]
    back = row.copy()
    bitarr = unary.copy()
    bitarr[ones[earlier]], bitarr[ones[earlier] - 1] = 0, 1
    set_unary_bits(back, at, bitarr)
    want = idx.copy()
    want[earlier] -= 1 << b
    assert W.parse_local(back[at:at + 20], k, numel, k)[0].tolist() == want.tolist()
    field = row.copy()
    fields = W.unpack_fields(field[at + 8:at + 20], b, k)
    fields[0] = 0
    field[at + 8:at + 20] = W.pack_fields(fields, b, 12)
    gathered = np.stack([row, moved, back, field])
    ok, out = check_decode(fmt, gathered)
    assert ok.tolist() == [True] * 4

    k = 300
    fmt = local_format(k, codec, 4, numel)
    row, idx = bitmap_payload(codec, False, k, numel)
    bitmap = row[at + 4:at + 4 + 128]
    p = int(idx[10])
    q = int(np.setdiff1d(np.arange(numel), idx)[-1])  # a clear position below numel
    bitmap[p // 8] &= np.uint8(~(1 << (p % 8)) & 0xFF)
    bitmap[q // 8] |= np.uint8(1 << (q % 8))
    ok, _ = check_decode(fmt, row[None])
    assert ok.tolist() == [True]


def test_bytes_the_spec_does_not_read_are_ignored():
    """The spec's well-formedness rules name the descriptor, every bit of the unary part (its
    padding included), the chunks and positions of the slots in use, the set bits and the bits past
    numel of a bitmap; bytes it never reads (the offsets' padding bits, the fields of padding slots)
    are not among them: a payload with them set stays well formed and decodes the same. A set bit
    in the unary part's padding is read: that payload is not well formed."""
    k, numel = 13, 1000  # b=6: 29 unary bits in 4 bytes, 78 bits of fields in 12 bytes
    fmt = local_format(k, "fp32", 256, numel)
    assert fmt.local_bits == 6
    row, _ = offsets_payload("fp32", False, k, numel, count=10)
    at = index_at(False)
    fields = W.unpack_fields(row[at + 8:at + 20], 6, k)
    fields[10:] = [5, 63, 7]  # padding slots
    changed = row.copy()
    changed[at + 8:at + 20] = W.pack_fields(fields, 6, 12)
    changed[at + 8 + 9] |= 0xC0  # bits 78.. of the fields' part
    changed[at + 8 + 10:at + 8 + 12] = 0xFF
    unary_padding = row.copy()
    unary_padding[at + 4 + 3] |= 0x20  # bit 29: the unary part's first padding bit
    ok, out = check_decode(fmt, np.stack([row, changed]))
    assert ok.tolist() == [True, True]
    clean, _, _, _ = decode_both(fmt, row[None], 1)
    assert_same_floats(out, clean * 2, "ignored bytes")
    ok, _ = check_decode(fmt, np.stack([changed, unary_padding]))
    assert ok.tolist() == [True, False]
    # K=5 over 70000: b=12, 23 unary bits in 4 bytes, 60 bits of fields in 8 (4 bits of padding)
    k, numel = 5, 70_000
    fmt = local_format(k, "int8", 4, numel)
    assert fmt.local_bits == 12
    rng = seeded("ignored")
    idx = np.sort(rng.choice(numel, k, replace=False))
    row = W.encode_payload(True, idx, make_values(rng, k), k, "int8", 4, "local", numel, False)[0]
    assert row[at + 8 + 7] >> 4 == 0
    row[at + 8 + 7] |= 0xF0
    unary_padding = row.copy()
    unary_padding[at + 4 + 2] |= 0x80  # bit 23
    ok, _ = check_decode(fmt, np.stack([row, unary_padding]))
    assert ok.tolist() == [True, False]


@pytest.mark.parametrize("codec", CODECS)
def test_padding_values_are_not_encoded(codec):
    """The spec encodes x = 0 at padding slots (slots at or past the count): a value given at a
    slot that ``valid`` marks as padding changes neither the scale, nor the codes, nor the bytes,
    with ordered=True as without."""
    for k, numel in [(5, 1000), (300, 1000)]:
        fmt = local_format(k, codec, 256, numel)
        rng = seeded("padding-values", codec, k, numel)
        count = k - 2
        idx = np.zeros(k, np.int64)
        idx[:count] = sorted_distinct(rng, numel, count)
        values = make_values(rng, k)
        values[count:] = 1000.0  # larger than any entry: it would set the scale
        valid = np.arange(k) < count
        want = W.encode_payload(True, idx, values, count, codec, 256, "local", numel, False)
        check_pack(fmt, True, idx, values, *want, valid=valid, what=f"k={k}")
        check_pack(fmt, True, idx, values, *want, valid=valid, ordered=True, what=f"ordered k={k}")


# ----------------------------------------------------------------------------------- hostile
SHAPES = [(1, 70_001), (5, 70_001), (13, 1000), (40, 70_001), (3, 10), (33, 33), (40, 200), (300, 1000),
          (0, 10), (0, 0)]
RANDOM_BYTES = dict(codec=st.sampled_from(ALL_CODECS), checksum=st.booleans(), shape=st.sampled_from(SHAPES),
                    chunk=st.sampled_from([4, 7]), world=st.integers(1, 3), seed=st.integers(0, 2**31))
CHANGED_BYTES = dict(codec=st.sampled_from(ALL_CODECS), checksum=st.booleans(), shape=st.sampled_from(SHAPES),
                     chunk=st.sampled_from([3, 8]), world=st.integers(1, 3), seed=st.integers(0, 2**31),
                     flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=6))


def random_bytes(codec, checksum, shape, chunk, world, seed):
    k, numel = shape
    fmt = local_format(k, codec, chunk, numel, checksum)
    rng = np.random.default_rng(seed)
    gathered = rng.integers(0, 256, (world, fmt.nbytes), dtype=np.uint8)
    at = index_at(checksum)
    if seed % 2:  # plausible headers and descriptor, so the checks past them are reached
        gathered[:, :8] = np.array([(seed // 2) % 2, seed % (k + 1)], "<i4").view(np.uint8)
        gathered[:, at:at + 4] = np.array([W.local_descriptor(k, numel)], "<i4").view(np.uint8)
        b, bitmap = W.local_layout(k, numel)
        if seed % 3 == 0:  # and sparse index bytes: few bits
            end = at + W.index_bytes(k, "local", numel)
            gathered[:, at + 4:end] &= rng.integers(0, 256, (world, end - at - 4), dtype=np.uint8) & np.uint8(0x11)
        elif seed % 3 == 1 and not bitmap:  # a unary part with as many set bits as slots in use
            count = seed % (k + 1)
            nbits = 8 * W.local_unary_bytes(k, numel, b)
            spread = nbits if seed % 5 == 0 else k + W.local_nchunks(numel, b)  # padding bits too, or not
            for r in range(world):
                bitarr = np.zeros(nbits, np.uint8)
                bitarr[rng.choice(spread, count, replace=False)] = 1
                gathered[r, at + 4:at + 4 + nbits // 8] = np.packbits(bitarr, bitorder="little")
                refresh_checksum(gathered[r], checksum)
    check_decode(fmt, gathered)


def changed_bytes(codec, checksum, shape, chunk, world, seed, flips):
    k, numel = shape
    fmt = local_format(k, codec, chunk, numel, checksum)
    rng = np.random.default_rng(seed)
    gathered = reference_world(rng, world, k, codec, chunk, numel, checksum, numel)
    for position, byte in flips:
        gathered[position % world, (position // world) % fmt.nbytes] = byte
    if seed % 2:  # the index's bytes are the ones to check
        for r in range(world):
            refresh_checksum(gathered[r], checksum)
    check_decode(fmt, gathered)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_BYTES)
def test_random_bytes(codec, checksum, shape, chunk, world, seed):
    random_bytes(codec, checksum, shape, chunk, world, seed)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_BYTES)
def test_random_bytes_long(codec, checksum, shape, chunk, world, seed):
    random_bytes(codec, checksum, shape, chunk, world, seed)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CHANGED_BYTES)
def test_changed_bytes_of_valid_payloads(codec, checksum, shape, chunk, world, seed, flips):
    changed_bytes(codec, checksum, shape, chunk, world, seed, flips)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CHANGED_BYTES)
def test_changed_bytes_of_valid_payloads_long(codec, checksum, shape, chunk, world, seed, flips):
    changed_bytes(codec, checksum, shape, chunk, world, seed, flips)


# -------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("codec", CODECS)
def test_cuda_pack_and_decode_match_the_reference(codec):
    for (k, numel), chunk in itertools.product(CONFIGS + [(10_000, 1_000_000), (0, 10), (3, 10)], [7, 256]):
        rng = seeded("cuda", codec, k, numel, chunk)
        fmt = local_format(k, codec, chunk, numel, True)
        idx = torch.from_numpy(rng.permutation(numel)[:k].astype(np.int64))
        x = torch.from_numpy(make_values(rng, k))
        valid = torch.from_numpy(rng.random(k) < 0.8)
        want = W.encode_unordered(True, idx.numpy(), x.numpy(), valid.numpy(), codec, chunk, "local", numel, True)
        payload, sent = fmt.pack(torch.tensor(True).cuda(), idx.cuda(), x.cuda(), valid.cuda())
        assert_same_bytes(payload, want[0], f"cuda pack k={k} numel={numel}")
        assert_same_floats(sent, want[1], "cuda sent")
        wire = np.argsort(np.where(valid.numpy(), idx.numpy(), numel + 1), kind="stable")
        count = int(valid.sum())
        wire_idx = torch.zeros(k, dtype=torch.int64)
        wire_idx[:count] = idx[wire[:count]]
        wire_x = torch.zeros(k)
        wire_x[:count] = x[wire[:count]]
        payload, sent = fmt.pack(torch.tensor(True).cuda(), wire_idx.cuda(), wire_x.cuda(),
                                 (torch.arange(k) < count).cuda(), ordered=True)
        assert_same_bytes(payload, want[0], "cuda pack ordered")
        gathered = reference_world(rng, 3, k, codec, chunk, numel, True, min(numel, 4 * k + 1))
        gathered[1] = rng.integers(0, 256, fmt.nbytes, dtype=np.uint8)  # a hostile rank
        changed = gathered[2].copy()
        changed[rng.integers(0, fmt.nbytes)] ^= np.uint8(1 << int(rng.integers(0, 8)))
        refresh_checksum(changed, True)
        gathered = np.concatenate([gathered, changed[None]])
        want_sum, want_finite, want_ok = W.decode_payloads(gathered, codec, chunk, "local", numel, True, k)
        g = torch.from_numpy(gathered).cuda()
        big = torch.full((numel + 2 * GUARD,), SENTINEL, device="cuda")
        out = big[GUARD:GUARD + numel]
        finite, well_formed = fmt.decode_average(g, out, 4)
        check_guards(big.cpu())
        assert finite.cpu().tolist() == want_finite.tolist()
        assert well_formed.cpu().tolist() == want_ok.tolist()
        cpu = torch.empty(numel)
        fmt.decode_average(g.cpu(), cpu, 4)
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-5, equal_nan=True)
        # well-formed ranks only: the CPU sum is the reference's, the CUDA sum close to it
        ok_rows = np.ascontiguousarray(gathered[want_ok])
        if ok_rows.shape[0]:
            out.zero_()
            fmt.decode_sum(torch.from_numpy(ok_rows).cuda(), out)
            cpu = torch.zeros(numel)
            fmt.decode_sum(torch.from_numpy(ok_rows), cpu)
            assert_sum_is_the_reference(fmt, ok_rows, cpu, "cpu decode_sum")
            torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-5, equal_nan=True)

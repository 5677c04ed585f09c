"""The payload's value codecs (fp32, fp16, bf16, int8, int4, int2, sign) without padding, against
the independent NumPy reference of tests/wire_reference.py: sizes, the bytes and ``sent`` of
``PayloadFormat.pack`` (fused and reference paths, ordered and with a ``valid`` mask), the sums
and flags of ``decode_sum`` and ``decode_average`` bit for bit, the sub-byte bit layout on
hand-built payloads, no padding, the rounding bounds, non-finite chunks, and hostile bytes
(never a raise, never a write outside ``out``, the two decodes agreeing)."""

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

CODECS = ["fp32", "fp16", "bf16", "int8", "int4", "int2", "sign"]
SCALED = ["int8", "int4", "int2", "sign"]
INT_CODECS = ["int8", "int4", "int2"]
INDEXES = ["int32", "csr16"]
KS = [1, 5, 13, 256, 300]
CHUNKS = [4, 7, 256]
NUMELS = [1000, 70_000]  # 70000: two csr16 blocks


def payload_format(k, codec, chunk, index, numel, checksum) -> PayloadFormat:
    return PayloadFormat(k, codec, chunk, index, numel, checksum)


# ------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("codec", CODECS)
def test_nbytes_is_the_reference(codec, index, checksum):
    for k, chunk, numel in itertools.product(KS + [0, 2, 3, 7, 8, 9], CHUNKS + [1, 8], NUMELS):
        fmt = payload_format(k, codec, chunk, index, numel, checksum)
        assert fmt.nbytes == W.payload_nbytes(k, codec, chunk, index, numel, checksum), (k, chunk, numel)
        assert fmt.slots == k  # no padding for any codec


def test_no_padding():
    fmt = PayloadFormat(13, "int8", 8, "int32", 1000)
    assert fmt.nbytes == 8 + 4 * 13 + 4 * 2 + 13  # ceil(13/8) = 2 scales, 13 value bytes
    assert W.payload_nbytes(13, "int8", 8, "int32", 1000, False) == fmt.nbytes
    assert PayloadFormat(5, "int2", 256, "int32", 1000).nbytes == 8 + 20 + 4 + 2
    assert PayloadFormat(3, "int4", 256, "int32", 1000).nbytes == 8 + 12 + 4 + 2
    assert PayloadFormat(9, "sign", 4, "int32", 1000).nbytes == 8 + 36 + 4 * 3 + 2
    assert PayloadFormat(8, "sign", 8, "int32", 1000).nbytes == 8 + 32 + 4 + 1
    # csr16: 1 block count, 5 offsets padded to 12 bytes; then 2 scales, 5 bytes; checksum 8 more
    assert PayloadFormat(5, "int8", 3, "csr16", 1000, True).nbytes == 16 + 4 + 12 + 8 + 5
    # int8 values of 13 entries in chunks of 8: the payload ends with the 13 codes
    idx = torch.arange(13, dtype=torch.int64) * 3
    values = torch.linspace(-2, 2, 13)
    payload, _ = fmt.pack(torch.tensor(True), idx, values, ordered=True)
    want, _ = W.encode_payload(True, idx.numpy(), values.numpy(), 13, "int8", 8, "int32", 1000, False)
    assert payload.numel() == 81
    assert_same_bytes(payload, want)
    assert payload[60:68].view(torch.float32).tolist() == [float(np.float32(2.0) / np.float32(127))] * 2
    assert payload[68:].view(torch.int8).abs().max() == 127


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


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("codec", CODECS)
def test_pack_is_the_reference(codec, index, checksum):
    numels = NUMELS if index == "csr16" else NUMELS[:1]
    for k, chunk, numel in itertools.product(KS, CHUNKS, numels):
        rng = seeded(codec, index, checksum, k, chunk, numel)
        fmt = payload_format(k, codec, chunk, index, numel, checksum)
        what = f"k={k} chunk={chunk} numel={numel}"
        finite = bool(rng.integers(0, 2))
        values = make_values(rng, k)

        # ascending distinct indices, every slot in use
        idx = np.sort(rng.choice(numel, k, replace=False)).astype(np.int64)
        want = W.encode_payload(finite, idx, values, k, codec, chunk, index, numel, checksum)
        check_pack(fmt, finite, idx, values, *want, ordered=True, what="ordered " + what)
        check_pack(fmt, finite, idx, values, *want, what="default " + what)

        # some slots invalid, unordered: pack puts the valid ones first, ascending
        idx = rng.permutation(numel)[:k].astype(np.int64)
        valid = rng.random(k) < 0.7
        want = W.encode_unordered(finite, idx, values, valid, codec, chunk, index, numel, checksum)
        check_pack(fmt, finite, idx, values, *want, valid=valid, what="valid " + what)

        # the same already in wire order (padding slots: index 0, value 0)
        count = int(valid.sum())
        wire_idx = np.zeros(k, np.int64)
        wire_idx[:count] = np.sort(idx[valid])
        wire_values = np.zeros(k, np.float32)
        wire_values[:count] = values[valid][np.argsort(idx[valid], kind="stable")]
        wire_valid = np.arange(k) < count
        want = W.encode_payload(finite, wire_idx, wire_values, count, codec, chunk, index, numel, checksum)
        check_pack(fmt, finite, wire_idx, wire_values, *want, valid=wire_valid, ordered=True,
                   what="valid ordered " + what)


# ------------------------------------------------------------------------------------ decode
def reference_world(rng, world, k, codec, chunk, index, numel, checksum, spread):
    """``world`` well-formed payloads from the reference encoder, indices drawn from the first
    ``spread`` positions (so that ranks meet), counts from 0 to k, either finite flag."""
    rows = []
    for _ in range(world):
        count = int(rng.integers(0, k + 1)) if rng.random() < 0.5 else k
        idx = np.zeros(k, np.int64)
        idx[:count] = np.sort(rng.choice(spread, count, replace=False))
        rows.append(W.encode_payload(bool(rng.integers(0, 2)), idx, make_values(rng, k), count, codec,
                                     chunk, index, numel, checksum)[0])
    return np.stack(rows)


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("codec", CODECS)
def test_decode_is_the_reference(codec, index, checksum):
    configs = [(1, 4, 1000, 1000), (13, 4, 1000, 20), (13, 7, 70_000, 70_000), (300, 7, 70_000, 400),
               (256, 256, 1000, 300)]
    for (k, chunk, numel, spread), world in itertools.product(configs, [1, 2, 3]):
        rng = seeded("decode", codec, index, checksum, k, chunk, numel, world)
        fmt = payload_format(k, codec, chunk, index, numel, checksum)
        gathered = reference_world(rng, world, k, codec, chunk, index, numel, checksum, spread)
        want_sum, want_finite, want_ok = W.decode_payloads(gathered, codec, chunk, index, numel, checksum, k)
        assert want_ok.all()
        out, avg, finite, well_formed = decode_both(fmt, gathered, world)
        what = f"k={k} chunk={chunk} numel={numel} world={world}"
        assert finite.tolist() == want_finite.tolist(), what
        assert well_formed.tolist() == want_ok.tolist(), what
        assert_same_floats(out, want_sum, "decode_sum " + what)
        assert_same_floats(avg, (want_sum / np.float32(world)).astype(np.float32), "decode_average " + what)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("index, k, numel", [("csr16", 300, 5000), ("local", 300, 5000), ("local", 300, 1000),
                                           ("local", 50, 70_000)])
def test_what_pack_sends_is_what_decode_adds(codec, index, k, numel):
    rng = seeded("roundtrip", codec, index, k, numel)
    fmt = payload_format(k, codec, 7, index, numel, True)
    rows, want = [], torch.zeros(numel)
    for _ in range(3):
        idx = torch.from_numpy(rng.permutation(numel)[:k].astype(np.int64))
        valid = torch.from_numpy(rng.random(k) < 0.8)
        payload, sent = fmt.pack(torch.tensor(True), idx, torch.from_numpy(make_values(rng, k)), valid)
        assert torch.equal(sent[~valid], torch.zeros(int((~valid).sum())))
        want.index_add_(0, idx[valid], sent[valid])
        rows.append(payload)
    out, _, finite, well_formed = decode_both(fmt, torch.stack(rows).numpy(), 3)
    assert finite.all() and well_formed.all()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ sub-byte bit layout
def hand_payload(k, codec, chunk, flag, count, indices, scales, value_bytes, numel=10):
    raw = np.array([flag, count] + list(indices), dtype="<i4").view(np.uint8)
    raw = np.concatenate([raw, np.array(scales, dtype="<f4").view(np.uint8), np.array(value_bytes, np.uint8)])
    assert raw.size == W.payload_nbytes(k, codec, chunk, "int32", numel, False)
    return raw


HAND = [
    # int4: codes 3, -1 (0xF), -8 (0x8): bytes 0xF3, 0x08; scale 0.5
    ("int4", 3, 4, [1, 4, 7], [0.5], [0xF3, 0x08], {1: 1.5, 4: -0.5, 7: -4.0}),
    # int2: codes 1, -1 (0b11), -2 (0b10), 0, 1: byte 0b00_10_11_01, byte 0b01; scale 2
    ("int2", 5, 8, [0, 2, 3, 5, 9], [2.0], [0x2D, 0x01], {0: 2.0, 2: -2.0, 3: -4.0, 5: 0.0, 9: 2.0}),
    # sign: bits 0,1,1,0,0,0,0,1 | 1,0: bytes 0x86, 0x01; scale 0.25 (chunk 16: one scale)
    ("sign", 10, 16, list(range(10)), [0.25], [0x86, 0x01],
     {0: .25, 1: -.25, 2: -.25, 3: .25, 4: .25, 5: .25, 6: .25, 7: -.25, 8: -.25, 9: .25}),
    # sign, two chunks of 3 and one of 2 (8 bits in one byte): 0b1010_0110 = 0xA6
    ("sign", 8, 3, [0, 1, 2, 3, 4, 5, 6, 7], [1.0, 2.0, 4.0], [0xA6],
     {0: 1.0, 1: -1.0, 2: -1.0, 3: 2.0, 4: 2.0, 5: -2.0, 6: 4.0, 7: -4.0}),
    # int8 is the same layout with 8-bit fields
    ("int8", 3, 2, [1, 2, 3], [0.5, 1.0], [0x80, 0x7F, 0xFF], {1: -64.0, 2: 63.5, 3: -1.0}),
]


@pytest.mark.parametrize("codec, k, chunk, indices, scales, value_bytes, want", HAND)
def test_hand_built_payload_decodes_as_written(codec, k, chunk, indices, scales, value_bytes, want):
    gathered = hand_payload(k, codec, chunk, 1, k, indices, scales, value_bytes)[None]
    expected = np.zeros(10, np.float32)
    for position, value in want.items():
        expected[position] = value
    ref_sum, ref_finite, ref_ok = W.decode_payloads(gathered, codec, chunk, "int32", 10, False, k)
    assert ref_ok.all() and ref_finite.all()
    assert_same_floats(ref_sum, expected, "reference")
    out, _, finite, well_formed = decode_both(PayloadFormat(k, codec, chunk, "int32", 10), gathered, 1)
    assert finite.tolist() == [True] and well_formed.tolist() == [True]
    assert_same_floats(out, expected, codec)


@pytest.mark.parametrize("codec, values, chunk, scales, value_bytes, sent", [
    # scale 3.5 / 7 = 0.5; codes 7, -1, 2 -> 0xF7, 0x02
    ("int4", [3.5, -0.5, 1.0], 4, [0.5], [0xF7, 0x02], [3.5, -0.5, 1.0]),
    # scale 1: 2.5 and 0.5 round half to even (2 and 0), -3.5 to -4: 0x27, 0x0C (codes 7 2 -4 0)
    ("int4", [7.0, 2.5, -3.5, 0.5], 4, [1.0], [0x27, 0x0C], [7.0, 2.0, -4.0, 0.0]),
    # int2: scale = max|x| = 4 (qmax 1); 1.9 -> 0, 2.0 -> 0 (half to even), -2.1 -> -1, -4 -> -1
    ("int2", [1.9, 2.0, -2.1, -4.0, 4.0], 8, [4.0], [0xF0, 0x01], [0.0, 0.0, -4.0, -4.0, 4.0]),
    # sign: scale = (1 + 3 + 0 + 2) / 3 nonzero = 2; bits 0 1 0 0 (0 and -0.0 give bit 0); then
    # a chunk of zeros: scale 0
    ("sign", [1.0, -3.0, 0.0, 2.0, 0.0, -0.0], 4, [2.0, 0.0], [0x02], [2.0, -2.0, 2.0, 2.0, 0.0, 0.0]),
    # int8, chunk 2: scales 2/127 and 0 (a zero chunk), the last chunk partial; -0.5 / (2/127)
    # = -31.75 -> -32 (0xE0)
    ("int8", [2.0, -0.5, 0.0, 0.0, -0.5], 2,
     [np.float32(2.0) / np.float32(127), 0.0, np.float32(0.5) / np.float32(127)],
     [127, 0xE0, 0, 0, 0x81], None),
])
def test_hand_built_encoding(codec, values, chunk, scales, value_bytes, sent):
    k = len(values)
    idx = np.arange(k, dtype=np.int64)
    x = np.array(values, np.float32)
    want_payload = hand_payload(k, codec, chunk, 1, k, idx, scales, value_bytes)
    payload, ref_sent = W.encode_payload(True, idx, x, k, codec, chunk, "int32", 10, False)
    assert payload.tolist() == want_payload.tolist()
    if sent is not None:
        assert_same_floats(ref_sent, np.array(sent, np.float32), "reference sent")
    check_pack(PayloadFormat(k, codec, chunk, "int32", 10), True, idx, x, want_payload, ref_sent,
               ordered=True, what=codec)


def test_bits_past_the_last_entry_are_ignored_and_any_code_pattern_is_accepted():
    """int2 K=5: the 6 unused high bits of the last byte set, and -2 (0b10) codes: well formed."""
    gathered = hand_payload(5, "int2", 8, 1, 5, [0, 1, 2, 3, 4], [1.0], [0xAA, 0xFE])[None]
    want = np.array([-2.0, -2.0, -2.0, -2.0, -2.0] + [0.0] * 5, np.float32)
    ref_sum, _, ref_ok = W.decode_payloads(gathered, "int2", 8, "int32", 10, False, 5)
    assert ref_ok.all()
    assert_same_floats(ref_sum, want, "reference")
    out, _, finite, well_formed = decode_both(PayloadFormat(5, "int2", 8, "int32", 10), gathered, 1)
    assert well_formed.tolist() == [True]
    assert_same_floats(out, want, "int2")
    # int4 -8 (0x8) is accepted too; sign with high bits set past K
    gathered = hand_payload(3, "sign", 8, 1, 3, [0, 1, 2], [1.0], [0xFA])[None]
    out, _, _, well_formed = decode_both(PayloadFormat(3, "sign", 8, "int32", 10), gathered, 1)
    assert well_formed.tolist() == [True]
    assert out[:3].tolist() == [1.0, -1.0, 1.0]


def test_only_the_first_count_slots_are_decoded():
    """A sign payload's padding slots would decode to +scale: they must add nothing."""
    gathered = hand_payload(4, "sign", 4, 1, 2, [3, 4, 0, 0], [1.5], [0x01])[None]
    out, _, finite, well_formed = decode_both(PayloadFormat(4, "sign", 4, "int32", 10), gathered, 1)
    assert well_formed.tolist() == [True]
    want = np.zeros(10, np.float32)
    want[3], want[4] = -1.5, 1.5
    assert_same_floats(out, want, "sign padding")


# ------------------------------------------------------------------------- rounding bounds
@pytest.mark.parametrize("codec", INT_CODECS)
def test_round_to_nearest_is_within_half_a_scale(codec):
    qmax = {"int8": 127, "int4": 7, "int2": 1}[codec]
    for k, chunk in [(300, 7), (256, 256), (13, 4)]:
        rng = seeded("bound", codec, k, chunk)
        fmt = PayloadFormat(k, codec, chunk, "int32", 1000)
        x = make_values(rng, k)
        payload, sent = fmt.pack(torch.tensor(True), torch.arange(k), torch.from_numpy(x), ordered=True)
        _, scales_at, values_at, _ = W.offsets(k, codec, chunk, "int32", 1000, False)
        scales = payload[scales_at:values_at].view(torch.float32).numpy().astype(np.float64)
        codes = W.unpack_codes(payload[values_at:].numpy(), codec, k)
        assert np.abs(codes).max() <= qmax
        per_slot = scales[np.arange(k) // chunk]
        err = np.abs(x.astype(np.float64) - sent.numpy().astype(np.float64))
        assert (err <= per_slot / 2 * (1 + 1e-6)).all(), err.max()


def test_sign_sends_the_sign_times_the_mean_magnitude():
    for k, chunk in [(300, 7), (256, 256), (13, 4)]:
        rng = seeded("sign", k, chunk)
        fmt = PayloadFormat(k, "sign", chunk, "csr16", 70_000)
        x = make_values(rng, k)
        idx = torch.from_numpy(np.sort(rng.choice(70_000, k, replace=False)))
        payload, sent = fmt.pack(torch.tensor(True), idx, torch.from_numpy(x), ordered=True)
        _, scales_at, values_at, _ = W.offsets(k, "sign", chunk, "csr16", 70_000, False)
        scales = payload[scales_at:values_at].view(torch.float32).numpy()
        per_slot = scales[np.arange(k) // chunk]
        assert_same_floats(sent, np.where(x < 0, -per_slot, per_slot), "sign sent")
        for s in range(len(scales)):
            chunk_x = x[s * chunk:(s + 1) * chunk].astype(np.float64)
            nonzero = np.count_nonzero(chunk_x)
            mean = np.abs(chunk_x).sum() / nonzero if nonzero else 0.0
            assert abs(scales[s] - mean) <= 1e-4 * mean


# -------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("codec", SCALED)
def test_a_non_finite_chunk_gets_a_nan_scale_and_zero_codes(codec, finite):
    k, chunk, numel = 20, 4, 1000
    rng = seeded("nan", codec)
    x = make_values(rng, k)
    x[5] = np.nan  # chunk 1
    x[13] = np.inf  # chunk 3
    x[18] = -np.inf  # chunk 4
    idx = np.sort(rng.choice(numel, k, replace=False)).astype(np.int64)
    fmt = PayloadFormat(k, codec, chunk, "int32", numel)
    want_payload, want_sent = W.encode_payload(finite, idx, x, k, codec, chunk, "int32", numel, False)
    check_pack(fmt, finite, idx, x, want_payload, want_sent, ordered=True, what=codec)
    payload, sent = fmt.pack(torch.tensor(finite), torch.from_numpy(idx), torch.from_numpy(x), ordered=True)
    assert int(payload[:4].view(torch.int32)) == int(finite)
    _, scales_at, values_at, _ = W.offsets(k, codec, chunk, "int32", numel, False)
    scales = payload[scales_at:values_at].view(torch.float32)
    assert torch.isnan(scales).tolist() == [False, True, False, True, True]
    codes = W.unpack_codes(payload[values_at:].numpy(), codec, k)
    bad = np.isin(np.arange(k) // chunk, [1, 3, 4])
    assert (codes[bad] == 0).all()
    assert torch.isnan(sent).numpy().tolist() == bad.tolist()
    # decoded: under flag 0 a well-formed NaN payload; under flag 1 a malformed one
    want_sum, want_finite, want_ok = W.decode_payloads(payload.numpy()[None], codec, chunk, "int32",
                                                       numel, False, k)
    out, _, got_finite, got_ok = decode_both(fmt, payload.numpy()[None], 1)
    assert got_finite.tolist() == want_finite.tolist() == [finite]
    assert got_ok.tolist() == want_ok.tolist() == [not finite]
    if not finite:
        assert_same_floats(out, want_sum, codec)


@pytest.mark.parametrize("codec", SCALED)
def test_padding_slots_in_a_non_finite_chunk(codec):
    """count < K with a NaN in the chunk of the padding slots, under a flag of 0: well formed; the
    entries in use add NaN or their values (position 0 may get NaN, see
    assert_sum_is_the_reference)."""
    k, chunk, numel = 10, 4, 100
    fmt = PayloadFormat(k, codec, chunk, "int32", numel)
    idx = torch.tensor([3, 5, 7, 11, 13, 17, 19, 0, 0, 0])
    x = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, float("nan"), 2.0, 0.0, 0.0, 0.0])
    valid = torch.arange(k) < 7
    payload, sent = fmt.pack(torch.tensor(False), idx, x, valid, ordered=True)
    want = W.encode_payload(False, idx.numpy(), x.numpy(), 7, codec, chunk, "int32", numel, False)
    assert_same_bytes(payload, want[0], codec)
    assert_same_floats(sent, want[1], codec)
    assert torch.isnan(sent).tolist() == [False] * 4 + [True] * 3 + [False] * 3
    out, _, finite, well_formed = decode_both(fmt, payload.numpy()[None], 1)
    assert finite.tolist() == [False] and well_formed.tolist() == [True]
    assert_sum_is_the_reference(fmt, payload.numpy()[None], out, codec)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16"])
def test_float_codecs_carry_non_finite_values(codec):
    k, numel = 6, 100
    x = np.array([1.0, np.nan, -np.inf, 70000.0, 1e-8, -2.5], np.float32)  # 70000 overflows fp16
    idx = np.arange(k, dtype=np.int64) * 7
    fmt = PayloadFormat(k, codec, 256, "int32", numel)
    values_at = W.offsets(k, codec, 256, "int32", numel, False)[2]
    for finite in (False, True):
        want = W.encode_payload(finite, idx, x, k, codec, 256, "int32", numel, False)
        for method in (fmt.pack, fmt.pack_reference):
            payload, sent = method(torch.tensor(finite), torch.from_numpy(idx), torch.from_numpy(x), ordered=True)
            # A NaN's bits are the conversion's choice (torch's bf16 gives 0x7FC0 or 0xFFFF)
            assert_same_bytes(payload[:values_at], want[0][:values_at], codec)
            assert_same_floats(W.float_decode(payload[values_at:].numpy(), codec, k),
                               W.float_decode(want[0][values_at:], codec, k), codec)
            assert_same_floats(sent, want[1], codec)
        want_sum, want_finite, want_ok = W.decode_payloads(want[0][None], codec, 256, "int32", numel, False, k)
        assert want_ok.tolist() == [not finite]
        out, _, got_finite, got_ok = decode_both(fmt, want[0][None], 1)
        assert got_finite.tolist() == want_finite.tolist() and got_ok.tolist() == want_ok.tolist()
        if not finite:
            assert_same_floats(out, want_sum, codec)


# ----------------------------------------------------------------------------------- hostile
HOSTILE_CODECS = CODECS


def assert_sum_is_the_reference(fmt, gathered: np.ndarray, out: torch.Tensor, what=""):
    """out is the reference sum of the (well-formed) ``gathered``. The spec leaves open whether
    the padding slots of a chunk with a non-finite scale (only under a flag of 0) add NaN at
    position 0 (0 * scale, as the decoder of the int8 padding did); either reading is taken."""
    args = (gathered, fmt.values, fmt.chunk, fmt.index, fmt.numel, fmt.checksum, fmt.entries)
    strict = W.decode_payloads(*args)[0]
    if not np.array_equal(bits(out), bits(strict)):
        assert_same_floats(out, W.decode_payloads(*args, padding="zero_times_scale")[0], what)


def check_hostile(fmt, gathered: np.ndarray):
    world = gathered.shape[0]
    want_sum, want_finite, want_ok = W.decode_payloads(gathered, fmt.values, fmt.chunk, fmt.index,
                                                       fmt.numel, fmt.checksum, fmt.entries)
    out, avg, finite, well_formed = decode_both(fmt, gathered, world)
    assert finite.tolist() == want_finite.tolist()
    assert well_formed.tolist() == want_ok.tolist()
    if want_ok.all():
        assert_sum_is_the_reference(fmt, gathered, out, "decode_sum")


RANDOM_BYTES = dict(codec=st.sampled_from(HOSTILE_CODECS), index=st.sampled_from(INDEXES),
                    checksum=st.booleans(), k=st.sampled_from([1, 5, 13, 40]), chunk=st.sampled_from([4, 7]),
                    world=st.integers(1, 3), seed=st.integers(0, 2**31))
CHANGED_BYTES = dict(codec=st.sampled_from(HOSTILE_CODECS), index=st.sampled_from(INDEXES),
                     checksum=st.booleans(), k=st.sampled_from([1, 5, 13, 40]), chunk=st.sampled_from([3, 8]),
                     world=st.integers(1, 3), seed=st.integers(0, 2**31),
                     flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_BYTES)
def test_random_bytes(codec, index, checksum, k, chunk, world, seed):
    random_bytes(codec, index, checksum, k, chunk, world, seed)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RANDOM_BYTES)
def test_random_bytes_long(codec, index, checksum, k, chunk, world, seed):
    random_bytes(codec, index, checksum, k, chunk, world, seed)


def random_bytes(codec, index, checksum, k, chunk, world, seed):
    fmt = PayloadFormat(k, codec, chunk, index, 70_001, checksum)
    rng = np.random.default_rng(seed)
    gathered = rng.integers(0, 256, (world, fmt.nbytes), dtype=np.uint8)
    if seed % 2:  # plausible headers, so the checks past the header are reached
        gathered[:, :8] = np.array([(seed // 2) % 2, 0, 0, 0, seed % (k + 1), 0, 0, 0], np.uint8)
    check_hostile(fmt, gathered)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CHANGED_BYTES)
def test_changed_bytes_of_valid_payloads(codec, index, checksum, k, chunk, world, seed, flips):
    changed_bytes(codec, index, checksum, k, chunk, world, seed, flips)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CHANGED_BYTES)
def test_changed_bytes_of_valid_payloads_long(codec, index, checksum, k, chunk, world, seed, flips):
    changed_bytes(codec, index, checksum, k, chunk, world, seed, flips)


def changed_bytes(codec, index, checksum, k, chunk, world, seed, flips):
    numel = 70_001
    fmt = PayloadFormat(k, codec, chunk, index, numel, checksum)
    rng = np.random.default_rng(seed)
    gathered = reference_world(rng, world, k, codec, chunk, index, numel, checksum, numel)
    for position, byte in flips:
        gathered[position % world, (position // world) % fmt.nbytes] = byte
    check_hostile(fmt, gathered)


@pytest.mark.parametrize("codec", SCALED)
def test_the_checksum_catches_any_flipped_bit(codec):
    k, chunk, numel = 13, 4, 70_001
    fmt = PayloadFormat(k, codec, chunk, "csr16", numel, True)
    rng = seeded("checksum", codec)
    clean = reference_world(rng, 1, k, codec, chunk, "csr16", numel, True, numel)
    _, scales_at, _, _ = W.offsets(k, codec, chunk, "csr16", numel, True)
    out = torch.zeros(numel)
    for where in list(range(0, scales_at, 3)) + list(range(scales_at, fmt.nbytes)):  # all scales, values
        gathered = clean.copy()
        gathered[0, where] ^= np.uint8(1 << int(rng.integers(0, 8)))
        _, well_formed = fmt.decode_sum(torch.from_numpy(gathered), out)
        assert well_formed.tolist() == [False], where


@pytest.mark.parametrize("codec", SCALED)
@pytest.mark.parametrize("what", ["count-above", "count-negative", "flag", "index-outside",
                                  "nan-scale-claimed-finite", "inf-scale-not-finite"])
def test_each_kind_of_malformed_payload(codec, what):
    k, chunk, numel = 13, 4, 1000
    fmt = PayloadFormat(k, codec, chunk, "int32", numel)
    rng = seeded("malformed", codec, what)
    gathered = reference_world(rng, 2, k, codec, chunk, "int32", numel, False, numel)
    gathered[1, :8] = np.array([1, k], "<i4").view(np.uint8)
    header = gathered[1, :8].view("<i4")
    _, scales_at, _, _ = W.offsets(k, codec, chunk, "int32", numel, False)
    malformed = True
    if what == "count-above":
        header[1] = k + 1
    elif what == "count-negative":
        header[1] = -1
    elif what == "flag":
        header[0] = 2
    elif what == "index-outside":
        gathered[1, 8 + 4 * 12:8 + 4 * 13] = np.array([numel], "<i4").view(np.uint8)  # the last slot
    elif what == "nan-scale-claimed-finite":
        gathered[1, scales_at + 4 * 3:scales_at + 4 * 4] = np.array([np.nan], "<f4").view(np.uint8)
    else:  # a flag of 0 (not finite) with an infinite scale is well formed
        header[0] = 0
        gathered[1, scales_at:scales_at + 4] = np.array([np.inf], "<f4").view(np.uint8)
        malformed = False
    want = W.decode_payloads(gathered, codec, chunk, "int32", numel, False, k)
    assert want[2].tolist() == [True, not malformed]
    check_hostile(fmt, gathered)


# -------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("index", INDEXES)
@pytest.mark.parametrize("codec", SCALED)
def test_cuda_pack_and_decode_match_cpu(codec, index):
    for k, chunk in [(13, 4), (300, 7), (256, 256)]:
        rng = seeded("cuda", codec, index, k, chunk)
        numel = 70_000
        fmt = PayloadFormat(k, codec, chunk, index, numel, True)
        idx = torch.from_numpy(rng.permutation(numel)[:k].astype(np.int64))
        x = torch.from_numpy(make_values(rng, k))
        valid = torch.from_numpy(rng.random(k) < 0.8)
        want = W.encode_unordered(True, idx.numpy(), x.numpy(), valid.numpy(), codec, chunk, index, numel, True)
        payload, sent = fmt.pack(torch.tensor(True).cuda(), idx.cuda(), x.cuda(), valid.cuda())
        assert_same_bytes(payload, want[0], "cuda pack")
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
        gathered = reference_world(rng, 2, k, codec, chunk, index, numel, True, 400)
        gathered[1] = rng.integers(0, 256, fmt.nbytes, dtype=np.uint8)  # a hostile rank
        want_sum, want_finite, want_ok = W.decode_payloads(gathered, codec, chunk, index, numel, True, k)
        g = torch.from_numpy(gathered).cuda()
        big = torch.full((numel + 2 * GUARD,), SENTINEL, device="cuda")
        out = big[GUARD:GUARD + numel]
        finite, well_formed = fmt.decode_average(g, out, 2)
        check_guards(big.cpu())
        assert finite.cpu().tolist() == want_finite.tolist()
        assert well_formed.cpu().tolist() == want_ok.tolist()
        cpu = torch.empty(numel)
        fmt.decode_average(g.cpu(), cpu, 2)
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-5, atol=1e-5, equal_nan=True)

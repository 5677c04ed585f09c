"""An independent NumPy reference of the payload layout and its value codecs (fp32, fp16, bf16,
int8, int4, int2, sign), written from the wire spec only (no torch, no gradsieve code).

Layout (little-endian)::

    header  int32[2]   finite flag (0/1), count C of slots in use (the first C)
            int32[2]   checksum=True only: Fletcher-style checksum of the payload with bytes 8..11
                       zeroed, then 0
    index   int32[K]                                            (index="int32")
        or  int32[blocks] + int16[K] padded to 4 bytes          (index="csr16")
        or  int32 descriptor + chunk-local offsets or a bitmap  (index="local", see below)
    scales  float32[ceil(K / chunk)]                            (scaled codecs only)
    values  ceil(K * B / 8) bytes                               (B bits per entry)

Sub-byte and int8 codes: slot j's B-bit field starts at bit j * B of the values section, bit b
being bit b % 8 of byte b // 8 (LSB first); int codes are two's complement in B bits; sign: bit 1
means negative.

Decoding (:func:`decode_payloads`) adds, in float32, rank 0's slots in slot order, then rank 1's,
... into a float32 buffer starting at +0.0: the order a sequential decoder adds in, so that a sum
can be compared bit for bit.

index="local" (chunk-local indices; a function of K and numel only, :func:`local_layout`)::

    int32 descriptor   b (offsets mode) or 256 (bitmap mode)
    offsets mode       a unary part of 4 * ceil((K + nchunks) / 32) bytes (nchunks = ceil(numel /
                       2^b); bit q is bit q % 8 of byte q // 8): slot j carrying position p sets
                       bit j + (p >> b), every other bit 0 (chunk by chunk: count[c] ones, then a
                       zero); then K fields of b bits (LSB first; p & (2^b - 1); 0 at padding
                       slots) padded to 4 bytes
    bitmap mode        ceil(numel / 32) * 4 bytes, bit p set iff position p carries an entry

Decoding slot j < used of an offsets-mode index: q_j = the position of the (j+1)-th set bit of the
unary part (all of its bits, its padding included), chunk q_j - j, position chunk * 2^b + field_j.
Well formed iff the descriptor is b, the unary part has exactly ``used`` set bits and every slot in
use gets a chunk below nchunks and a position below numel.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

F32 = np.float32

# codec -> (bits per entry, scaled, qmax)
CODECS = {
    "fp32": (32, False, None),
    "fp16": (16, False, None),
    "bf16": (16, False, None),
    "int8": (8, True, 127),
    "int4": (4, True, 7),
    "int2": (2, True, 1),
    "sign": (1, True, None),
}
INDEXES = ("int32", "csr16", "local")
HEADER = 8
BLOCK = 1 << 16
LOCAL_BITMAP = 256  # the descriptor of a local index in bitmap mode (offsets mode: b)
LOCAL_MAX_BITS = 15


# ------------------------------------------------------------------------------------ sizes
def bits_per_entry(codec: str) -> int:
    """B: the bits one entry's value takes on the wire (scales not counted)."""
    return CODECS[codec][0]


def is_scaled(codec: str) -> bool:
    return CODECS[codec][1]


def header_bytes(checksum: bool) -> int:
    return HEADER + (8 if checksum else 0)


def blocks_of(numel: int) -> int:
    return -(-numel // BLOCK)


def local_nchunks(numel: int, b: int) -> int:
    """Chunks of 2^b positions covering [0, numel)."""
    return -(-numel // (1 << b))


def local_unary_bytes(K: int, numel: int, b: int) -> int:
    """unary_bytes(b): K + nchunks(b) bits (K ones at most, one zero closing each chunk) padded
    to 4 bytes."""
    return 4 * -(-(K + local_nchunks(numel, b)) // 32)


def local_offsets_bytes(K: int, numel: int, b: int) -> int:
    """offsets_bytes(b): the unary part plus K b-bit fields padded to 4 bytes."""
    return local_unary_bytes(K, numel, b) + 4 * -(-K * b // 32)


def local_bitmap_bytes(numel: int) -> int:
    return 4 * -(-numel // 32)


def local_layout(K: int, numel: int) -> Tuple[int, bool]:
    """(b, bitmap) of a local index: b is the smallest of the b in 1..15 with the fewest
    offsets bytes (0 in bitmap mode); bitmap mode iff its bytes are strictly fewer."""
    best = min(range(1, LOCAL_MAX_BITS + 1), key=lambda b: (local_offsets_bytes(K, numel, b), b))
    if local_bitmap_bytes(numel) < local_offsets_bytes(K, numel, best):
        return 0, True
    return best, False


def local_descriptor(K: int, numel: int) -> int:
    b, bitmap = local_layout(K, numel)
    return LOCAL_BITMAP if bitmap else b


def local_index_bytes(K: int, numel: int) -> int:
    b, bitmap = local_layout(K, numel)
    return 4 + (local_bitmap_bytes(numel) if bitmap else local_offsets_bytes(K, numel, b))


def index_bytes(K: int, index: str, numel: int) -> int:
    if index == "int32":
        return 4 * K
    if index == "csr16":
        return 4 * blocks_of(numel) + -(-2 * K // 4) * 4
    if index == "local":
        return local_index_bytes(K, numel)
    raise ValueError(index)


def num_scales(K: int, codec: str, chunk: int) -> int:
    return -(-K // chunk) if is_scaled(codec) else 0


def value_bytes(K: int, codec: str) -> int:
    return -(-K * bits_per_entry(codec) // 8)


def offsets(K: int, codec: str, chunk: int, index: str, numel: int, checksum: bool):
    """(index_at, scales_at, values_at, nbytes)."""
    index_at = header_bytes(checksum)
    scales_at = index_at + index_bytes(K, index, numel)
    values_at = scales_at + 4 * num_scales(K, codec, chunk)
    return index_at, scales_at, values_at, values_at + value_bytes(K, codec)


def payload_nbytes(K: int, codec: str, chunk: int, index: str, numel: int, checksum: bool) -> int:
    return offsets(K, codec, chunk, index, numel, checksum)[3]


def wire_bits_per_entry(K: int, codec: str, chunk: int, index: str, numel: int, checksum: bool) -> float:
    """The whole payload's bits divided by K (header, index and scales included)."""
    return 8.0 * payload_nbytes(K, codec, chunk, index, numel, checksum) / max(K, 1)


# --------------------------------------------------------------------------------- checksum
def checksum(payload: np.ndarray) -> int:
    """``(sum_i (n - i) * byte_i mod 65521) * 65536 + (sum_i byte_i mod 65521)`` as a signed
    int32 (the bit pattern of the uint32)."""
    x = np.asarray(payload, dtype=np.uint8).astype(np.int64)
    n = x.size
    low = int(x.sum()) % 65521
    high = int((x * np.arange(n, 0, -1, dtype=np.int64)).sum()) % 65521
    value = high * 65536 + low
    return value - (1 << 32) if value >= 1 << 31 else value


# ---------------------------------------------------------------------------- float codecs
def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN -> 0x7FC0 with its sign dropped)."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(np.asarray(x, dtype=np.float32)), np.uint16(0x7FC0), rounded).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float_encode(x: np.ndarray, codec: str) -> Tuple[bytes, np.ndarray]:
    """(raw bytes, the float32 values a receiver decodes)."""
    x = np.asarray(x, dtype=np.float32)
    if codec == "fp32":
        return x.astype("<f4").tobytes(), x.copy()
    if codec == "fp16":
        with np.errstate(over="ignore"):
            h = x.astype("<f2")
        return h.tobytes(), h.astype(np.float32)
    if codec == "bf16":
        b = to_bf16_bits(x)
        return b.astype("<u2").tobytes(), from_bf16_bits(b)
    raise ValueError(codec)


def float_decode(raw: np.ndarray, codec: str, K: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if codec == "fp32":
        return raw[:4 * K].view("<f4").astype(np.float32)
    if codec == "fp16":
        return raw[:2 * K].view("<f2").astype(np.float32)
    if codec == "bf16":
        return from_bf16_bits(raw[:2 * K].view("<u2"))
    raise ValueError(codec)


# --------------------------------------------------------------------------- scaled codecs
def encode_chunk(x: np.ndarray, codec: str) -> Tuple[np.float32, np.ndarray]:
    """One chunk's (scale, codes) (codes int64; sign: 1 for negative), x float32 with padding
    slots already 0."""
    x = np.asarray(x, dtype=np.float32)
    n = x.size
    codes = np.zeros(n, dtype=np.int64)
    if not np.isfinite(x).all():
        return F32(np.nan), codes
    if codec == "sign":
        total = F32(0.0)
        for v in x:  # sequentially, in slot order, in float32
            total = F32(total + F32(abs(v)))
        nonzero = int(np.count_nonzero(x))
        scale = F32(total / F32(nonzero)) if nonzero else F32(0.0)
        codes[:] = x < 0  # -0.0 < 0 is False: bit 0
        return scale, codes
    qmax = CODECS[codec][2]
    amax = F32(np.max(np.abs(x))) if n else F32(0.0)
    scale = F32(amax / F32(qmax))
    if not scale > 0:
        return scale, codes
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint((x / scale).astype(np.float32))  # float32 division, round half to even
    codes[:] = np.clip(q, -qmax, qmax).astype(np.int64)
    return scale, codes


def decode_codes(codes: np.ndarray, scales: np.ndarray, codec: str, chunk: int) -> np.ndarray:
    """float32 value of each slot: float(code) * scale (intB), (bit ? -1 : 1) * scale (sign)."""
    codes = np.asarray(codes, dtype=np.int64)
    s = np.asarray(scales, dtype=np.float32)[np.arange(codes.size) // chunk] if codes.size else \
        np.zeros(0, np.float32)
    if codec == "sign":
        factor = np.where(codes != 0, F32(-1.0), F32(1.0)).astype(np.float32)
    else:
        factor = codes.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return (factor * s).astype(np.float32)


def pack_fields(fields: np.ndarray, b: int, nbytes: int) -> np.ndarray:
    """b-bit fields, LSB first (field j at bit j * b), into nbytes bytes (the rest 0)."""
    fields = np.asarray(fields, dtype=np.int64).reshape(-1)
    out = np.zeros(nbytes, dtype=np.uint8)
    if fields.size and b:
        assert ((fields >= 0) & (fields < (1 << b))).all()
        bitarr = ((fields[:, None] >> np.arange(b, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
        packed = np.packbits(bitarr, bitorder="little")
        out[:packed.size] = packed
    return out


def unpack_fields(raw: np.ndarray, b: int, n: int) -> np.ndarray:
    """The first n b-bit fields (LSB first) of raw."""
    if n == 0 or b == 0:
        return np.zeros(n, dtype=np.int64)
    bitarr = np.unpackbits(np.asarray(raw, dtype=np.uint8), bitorder="little")[:n * b]
    assert bitarr.size == n * b
    return (bitarr.reshape(n, b).astype(np.int64) << np.arange(b, dtype=np.int64)).sum(axis=1)


def pack_codes(codes: np.ndarray, B: int, K: int) -> np.ndarray:
    """B-bit fields, LSB first, into ceil(K * B / 8) bytes (unused high bits 0)."""
    fields = np.asarray(codes, dtype=np.int64)[:K] & ((1 << B) - 1)  # two's complement in B bits
    return pack_fields(fields, B, -(-K * B // 8))


def unpack_codes(raw: np.ndarray, codec: str, K: int) -> np.ndarray:
    """The K codes of a values section (int codes sign-extended; sign: the bit)."""
    B = bits_per_entry(codec)
    codes = unpack_fields(np.asarray(raw, dtype=np.uint8)[:-(-K * B // 8)], B, K)
    if codec != "sign":
        codes = np.where(codes >= 1 << (B - 1), codes - (1 << B), codes)
    return codes.astype(np.int64)


# ------------------------------------------------------------------------------ local index
def encode_local(indices: np.ndarray, count: int, K: int, numel: int) -> np.ndarray:
    """The local index section (descriptor included) of K slots in wire order, the first
    ``count`` carrying entries at ``indices[:count]`` (ascending, distinct, in [0, numel))."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    used = indices[:count]
    assert ((used >= 0) & (used < numel)).all(), "positions outside the bucket"
    assert (np.diff(used) > 0).all(), "local indices go on the wire ascending and distinct"
    b, bitmap = local_layout(K, numel)
    section = np.zeros(local_index_bytes(K, numel), dtype=np.uint8)
    section[0:4] = np.array([LOCAL_BITMAP if bitmap else b], dtype="<i4").view(np.uint8)
    if bitmap:
        bitarr = np.zeros(8 * local_bitmap_bytes(numel), dtype=np.uint8)
        bitarr[used] = 1
        section[4:] = np.packbits(bitarr, bitorder="little")
        return section
    unary_bytes = local_unary_bytes(K, numel, b)
    unary = np.zeros(8 * unary_bytes, dtype=np.uint8)
    slots = np.arange(count, dtype=np.int64)
    unary[slots + (used >> b)] = 1  # slot j in chunk p >> b: bit j + chunk
    section[4:4 + unary_bytes] = np.packbits(unary, bitorder="little")
    fields = np.zeros(K, dtype=np.int64)
    fields[:count] = used & ((1 << b) - 1)  # padding slots: field 0
    fields_bytes = 4 * -(-K * b // 32)
    section[4 + unary_bytes:] = pack_fields(fields, b, fields_bytes)
    return section


def parse_local(section: np.ndarray, K: int, numel: int, used: int) -> Tuple[np.ndarray, bool]:
    """(positions int64[K] with -1 where a slot has none, whether the index is well formed) of a
    local index section, whatever its bytes. Only the first ``used`` slots get positions."""
    section = np.ascontiguousarray(section, dtype=np.uint8)
    assert section.size == local_index_bytes(K, numel)
    b, bitmap = local_layout(K, numel)
    positions = np.full(K, -1, dtype=np.int64)
    descriptor = int(section[0:4].view("<i4")[0])
    if descriptor != (LOCAL_BITMAP if bitmap else b):
        return positions, False  # nothing can be read by a layout it does not claim
    ok = True
    if bitmap:
        bitarr = np.unpackbits(section[4:], bitorder="little")
        if bitarr[numel:].any():  # a bit set at p >= numel
            ok = False
        setbits = np.flatnonzero(bitarr[:numel])
        if int(np.count_nonzero(bitarr)) != used:  # the number of set bits (all of them)
            ok = False
        n = min(used, setbits.size)
        positions[:n] = setbits[:n]  # slot j: the (j+1)-th set bit below numel
        if n < used:
            ok = False  # slots in use without a position
        return positions, ok
    nchunks = local_nchunks(numel, b)
    unary_bytes = local_unary_bytes(K, numel, b)
    setbits = np.flatnonzero(np.unpackbits(section[4:4 + unary_bytes], bitorder="little"))  # padding too
    if setbits.size != used:
        ok = False
    fields = unpack_fields(section[4 + unary_bytes:], b, K)
    n = min(used, setbits.size)  # slots past the last set bit: no (j+1)-th set bit, no position
    chunk_of = setbits[:n].astype(np.int64) - np.arange(n, dtype=np.int64)  # q_j - j
    pos = (chunk_of << b) + fields[:n]
    has = (chunk_of < nchunks) & (pos < numel)  # no such chunk, or past the bucket: no position
    positions[:n] = np.where(has, pos, -1)
    if n < used or not has.all():
        ok = False
    return positions, ok


# ----------------------------------------------------------------------------------- encode
def encode_payload(finite: bool, indices, values, count: int, codec: str, chunk: int, index: str,
                   numel: int, checksum_on: bool) -> Tuple[np.ndarray, np.ndarray]:
    """One payload from K slots in wire order.

    ``indices`` (int64[K]) and ``values`` (float32[K]) are the slots as they go on the wire; the
    first ``count`` carry entries (for csr16 and local in ascending index order); the rest are
    padding: their value is taken as 0 (whatever is given), their index written as given (int32)
    or as its offset in its block (csr16; callers give 0), or not at all (local: field 0, no
    bit). Returns ``(payload uint8[nbytes], sent float32[K])``, ``sent`` being what a receiver
    decodes for each slot, 0 at padding slots.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    K = indices.size
    assert values.size == K and 0 <= count <= K
    index_at, scales_at, values_at, nbytes = offsets(K, codec, chunk, index, numel, checksum_on)
    payload = np.zeros(nbytes, dtype=np.uint8)
    payload[0:8] = np.array([1 if finite else 0, count], dtype="<i4").view(np.uint8)
    if index == "int32":
        payload[index_at:index_at + 4 * K] = indices.astype("<i4").view(np.uint8)
    elif index == "local":
        payload[index_at:scales_at] = encode_local(indices, count, K, numel)
    else:
        blocks = blocks_of(numel)
        counts = np.zeros(blocks, dtype=np.int64)
        for j in range(count):
            counts[indices[j] // BLOCK] += 1
        payload[index_at:index_at + 4 * blocks] = counts.astype("<i4").view(np.uint8)
        low = (indices % BLOCK).astype("<u2")
        at = index_at + 4 * blocks
        payload[at:at + 2 * K] = low.view(np.uint8)
    x = values.copy()
    x[count:] = 0
    if is_scaled(codec):
        S = num_scales(K, codec, chunk)
        scales = np.zeros(S, dtype=np.float32)
        codes = np.zeros(K, dtype=np.int64)
        for s in range(S):
            lo, hi = s * chunk, min(K, (s + 1) * chunk)
            scales[s], codes[lo:hi] = encode_chunk(x[lo:hi], codec)
        payload[scales_at:scales_at + 4 * S] = scales.astype("<f4").view(np.uint8)
        raw = pack_codes(codes, bits_per_entry(codec), K)
        payload[values_at:values_at + raw.size] = raw
        sent = decode_codes(codes, scales, codec, chunk)
    else:
        raw, sent = float_encode(x, codec)
        payload[values_at:values_at + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    sent = sent.astype(np.float32)
    sent[count:] = 0
    if checksum_on:
        payload[8:12] = np.array([checksum(payload)], dtype="<i4").view(np.uint8)
    return payload, sent


def wire_order(indices, valid, numel: int) -> np.ndarray:
    """The permutation ``pack`` applies: valid slots first in ascending index order (stable),
    then the padding slots in their given order."""
    indices = np.asarray(indices, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    key = np.where(valid, indices, numel + 1)
    return np.argsort(key, kind="stable")


def encode_unordered(finite: bool, indices, values, valid, codec: str, chunk: int, index: str,
                     numel: int, checksum_on: bool) -> Tuple[np.ndarray, np.ndarray]:
    """What ``PayloadFormat.pack(finite, indices, values, valid)`` must give: the slots put in
    wire order (:func:`wire_order`), padding slots with index 0 and value 0; ``sent`` in the
    order of the given ``indices``."""
    indices = np.asarray(indices, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    order = wire_order(indices, valid, numel)
    count = int(valid.sum())
    w_idx = np.where(np.arange(order.size) < count, indices[order], 0)
    w_val = np.where(np.arange(order.size) < count, values[order], F32(0)).astype(np.float32)
    payload, sent_wire = encode_payload(finite, w_idx, w_val, count, codec, chunk, index, numel,
                                        checksum_on)
    sent = np.zeros(order.size, dtype=np.float32)
    sent[order] = sent_wire
    return payload, sent


# ----------------------------------------------------------------------------------- decode
def parse_payload(row: np.ndarray, codec: str, chunk: int, index: str, numel: int, checksum_on: bool,
                  K: int) -> dict:
    """One payload's fields, whatever the bytes, and whether it is well formed."""
    row = np.ascontiguousarray(row, dtype=np.uint8)
    index_at, scales_at, values_at, nbytes = offsets(K, codec, chunk, index, numel, checksum_on)
    assert row.size == nbytes
    flag, count = (int(v) for v in row[0:8].view("<i4"))
    ok = flag in (0, 1) and 0 <= count <= K
    # Slots past the count decode at index 0, which an empty bucket does not have.
    ok &= not (numel == 0 and K > 0)
    used = min(max(count, 0), K)
    if checksum_on:
        zeroed = row.copy()
        zeroed[8:12] = 0
        ok &= checksum(zeroed) == int(row[8:12].view("<i4")[0])
    positions = np.full(K, -1, dtype=np.int64)  # -1: no entry
    if index == "int32":
        idx = row[index_at:index_at + 4 * K].view("<i4").astype(np.int64)
        for j in range(used):
            if 0 <= idx[j] < numel:
                positions[j] = idx[j]
            else:
                ok = False
    elif index == "local":
        positions, index_ok = parse_local(row[index_at:scales_at], K, numel, used)
        ok &= index_ok
    else:
        blocks = blocks_of(numel)
        counts = row[index_at:index_at + 4 * blocks].view("<i4").astype(np.int64)
        low = row[index_at + 4 * blocks:index_at + 4 * blocks + 2 * K].view("<u2").astype(np.int64)
        if (counts < 0).any() or int(counts.sum()) != used:
            ok = False
        else:
            j = 0
            for b in range(blocks):
                for _ in range(int(counts[b])):
                    pos = b * BLOCK + int(low[j])
                    if pos < numel:
                        positions[j] = pos
                    else:
                        ok = False
                    j += 1
    claims_finite = flag == 1
    if is_scaled(codec):
        S = num_scales(K, codec, chunk)
        scales = row[scales_at:scales_at + 4 * S].view("<f4").astype(np.float32)
        if claims_finite and not np.isfinite(scales).all():
            ok = False
        codes = unpack_codes(row[values_at:], codec, K)
        decoded = decode_codes(codes, scales, codec, chunk)
    else:
        scales = np.zeros(0, np.float32)
        decoded = float_decode(row[values_at:], codec, K)
        if claims_finite and not np.isfinite(decoded[:used]).all():
            ok = False
    return dict(finite=flag != 0, well_formed=bool(ok), count=count, used=used,
                positions=positions, decoded=decoded, scales=scales)


def decode_payloads(gathered: np.ndarray, codec: str, chunk: int, index: str, numel: int,
                    checksum_on: bool, K: int, out: Optional[np.ndarray] = None,
                    padding: str = "skip"):
    """Decodes ``gathered`` (uint8[world, nbytes]).

    Returns ``(sum float32[numel], finite bool[world], well_formed bool[world])``. The sum adds,
    in float32, each *well-formed* rank's slots in use in slot order, rank 0 first, into ``out``
    (default: zeros). What a malformed payload adds is left out (the spec only says it must
    write nothing outside the bucket): compare sums only where every rank is well formed.

    ``padding``: what a slot past the count adds. ``"skip"`` (the spec's reading: only the first
    C slots are decoded): nothing. ``"zero_times_scale"`` (scaled codecs; what a decoder that
    zeroes the codes of padding slots and sends them to position 0 adds): ``0 * scale`` at
    position 0 after the slots in use, NaN when the scale is not finite, else nothing visible.
    """
    gathered = np.asarray(gathered, dtype=np.uint8)
    world = gathered.shape[0]
    total = np.zeros(numel, dtype=np.float32) if out is None else np.array(out, dtype=np.float32)
    finite = np.zeros(world, dtype=bool)
    well_formed = np.zeros(world, dtype=bool)
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(world):
            p = parse_payload(gathered[r], codec, chunk, index, numel, checksum_on, K)
            finite[r], well_formed[r] = p["finite"], p["well_formed"]
            if not p["well_formed"]:
                continue
            for j in range(p["used"]):
                pos = int(p["positions"][j])
                total[pos] = F32(total[pos] + p["decoded"][j])
            if padding == "zero_times_scale" and is_scaled(codec) and numel:
                for j in range(p["used"], K):
                    total[0] = F32(total[0] + F32(0.0) * p["scales"][j // chunk])
    return total, finite, well_formed


def decode_average(gathered: np.ndarray, codec: str, chunk: int, index: str, numel: int,
                   checksum_on: bool, K: int, divisor: float, padding: str = "skip"):
    total, finite, well_formed = decode_payloads(gathered, codec, chunk, index, numel, checksum_on, K,
                                                 padding=padding)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return (total / F32(divisor)).astype(np.float32), finite, well_formed


def _self_check() -> None:  # pragma: no cover  (python tests/wire_reference.py)
    rng = np.random.default_rng(0)
    for codec in CODECS:
        for index in INDEXES:
            for K, chunk, numel in [(1, 4, 10), (13, 4, 1000), (300, 7, 70000), (300, 7, 1000),
                                    (1000, 8, 1000), (3000, 256, 300000), (33, 5, 33)]:
                idx = np.sort(rng.choice(numel, K, replace=False))
                val = (rng.standard_normal(K) * 3).astype(np.float32)
                payload, sent = encode_payload(True, idx, val, K, codec, chunk, index, numel, True)
                total, fin, ok = decode_payloads(payload[None], codec, chunk, index, numel, True, K)
                want = np.zeros(numel, np.float32)
                want[idx] = sent
                assert ok.all() and fin.all() and np.array_equal(total, want), (codec, index, K)
    # local layouts worked out by hand from the spec
    assert local_layout(10_000, 1_000_000) == (6, False) and local_index_bytes(10_000, 1_000_000) == 10708
    assert local_layout(300, 1000) == (0, True) and local_index_bytes(300, 1000) == 4 + 128
    assert local_layout(3, 1000) == (6, False) and local_index_bytes(3, 1000) == 4 + 4 + 4
    assert local_layout(3, 10) == (0, True) and local_layout(0, 10) == (1, False)
    assert local_layout(4, 70_000) == (12, False) and local_index_bytes(4, 70_000) == 4 + 4 + 8
    # the spec's worked example: positions 5, 7, 600 (chunks 0, 0, 9; fields 5, 7, 24)
    section = encode_local(np.array([5, 7, 600]), 3, 3, 1000)
    assert section.tolist() == [6, 0, 0, 0, 0b11, 0b1000, 0, 0] + list((5 | 7 << 6 | 24 << 12).to_bytes(4, "little"))
    assert parse_local(section, 3, 1000, 3)[0].tolist() == [5, 7, 600]
    assert local_layout(0, 0) == (1, False) and local_index_bytes(0, 0) == 4
    print("ok")


if __name__ == "__main__":  # pragma: no cover
    _self_check()

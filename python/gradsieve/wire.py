"""The packed payload one rank sends for one bucket, and its decoding.

Layout of one payload (a flat uint8 tensor; every rank's has the same size for a bucket, so one
``all_gather_into_tensor`` moves them)::

    header  int32[2]          finite flag (1 when every gradient entry this rank read was finite),
                              number C of slots that carry an entry (the first C; C <= K)
            int32[2]          with checksum=True only: a Fletcher-style sum (mod 65521) of the
                              whole payload with this field zeroed, and 0
    index   int32[K]          index="int32": bucket coordinates
        or  int32[B]          index="csr16": entries per block of 65536 (B = ceil(numel / 65536)),
            int16[K]          then each entry's offset in its block (unsigned bits), block order;
                              padded to a multiple of 4 bytes
        or  int32             index="local" (:func:`local_layout`): a descriptor, b or 256, then
            K + N bits        the entries per chunk of 2^b positions in unary (N = ceil(numel /
                              2^b) chunks; slot j in chunk c sets bit j + c, so each chunk's
                              count is a run of ones closed by a zero), padded to 4 bytes, and K
                              offsets of b bits in their chunks, LSB first, padded to 4 bytes; or
                              (descriptor 256) a bitmap of the numel positions, padded to 4 bytes
    scales  float32[S]        scaled codecs only: one per chunk of ``chunk`` slots, S = ceil(K / chunk)
                              (the last chunk may be partial)
    values  ceil(K * bits / 8) bytes: K fp32/fp16/bf16 values, or K codes of ``bits`` bits packed
                              least significant bit first (slot j's code starts at bit j * bits)

Value codecs (:data:`CODECS`): ``fp32``, ``fp16``, ``bf16`` carry the values; ``int8``, ``int4`` and
``int2`` carry ``round(x / scale)`` (or, with a seed, ``floor(x / scale + u)``: stochastic
rounding, :func:`rounding_draws`) in two's complement, clamped to +-qmax (127, 7, 1) with
``scale = max|x| / qmax`` per chunk; ``sign`` carries one bit (1: negative) with the mean |x| of the
chunk's nonzero entries as its scale. A chunk holding NaN or Inf gets a NaN scale and zero codes.
A slot decodes to ``code * scale`` (sign: ``+-scale``).

K is fixed per bucket (a capacity); only the first C slots are decoded, so a compressor that sends
a varying number of entries pads with whatever it likes. With ``int32`` an entry costs 4 index
bytes, with ``csr16`` 2 (plus 4 bytes per block, about 0.4 bytes per entry at density 0.01), with
``local`` about 1.1 at density 0.01 and 1.5 at 0.001 (unary counts and b-bit offsets). No
slot is padding for the codec's sake: the payload ends at the byte its last code needs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch

from gradsieve import ops

@dataclasses.dataclass(frozen=True)
class Codec:
    """A value codec: ``bits`` per entry; ``dtype`` for the float codecs, else codes times a
    float32 scale per chunk (``qmax``: the largest code magnitude of the integer codecs)."""

    bits: int
    dtype: Optional[torch.dtype] = None
    qmax: int = 0

    @property
    def scaled(self) -> bool:
        return self.dtype is None


CODECS = {
    "fp32": Codec(32, torch.float32), "fp16": Codec(16, torch.float16), "bf16": Codec(16, torch.bfloat16),
    "int8": Codec(8, qmax=127), "int4": Codec(4, qmax=7), "int2": Codec(2, qmax=1), "sign": Codec(1),
}
VALUE_CODECS = tuple(CODECS)
INDEX_FORMATS = ("int32", "csr16", "local")
LOCAL_BITMAP = 256  # the descriptor of a local index section in bitmap mode (offsets mode: b)
HEADER_BYTES = 8
CSR16_BLOCK = 1 << 16


def checksum_of(payloads: torch.Tensor) -> torch.Tensor:
    """Fletcher-style checksum of each row of ``payloads`` (uint8[world, nbytes]) as int32[world]:
    ``(sum_i (n - i) * byte_i mod 65521) * 65536 + (sum_i byte_i mod 65521)`` with the bit pattern
    of a uint32. A flipped bit or two swapped bytes change it. Tensor ops only (no host sync)."""
    x = payloads.to(torch.int64)
    n = x.shape[-1]
    weights = torch.arange(n, 0, -1, dtype=torch.int64, device=payloads.device)
    low = x.sum(dim=-1) % 65521
    high = (x * weights).sum(dim=-1) % 65521
    value = high * 65536 + low  # < 2^32
    return torch.where(value >= 1 << 31, value - (1 << 32), value).to(torch.int32)


def csr16_blocks(numel: int) -> int:
    return -(-numel // CSR16_BLOCK)


@dataclasses.dataclass(frozen=True)
class LocalLayout:
    """The chunk-local index of K entries over ``numel`` positions: chunks of ``2^bits`` positions,
    their counts in unary (K + chunks bits) and a ``bits``-bit offset per entry (``bits`` in
    [1, 15], the smallest section, the smallest ``bits`` on a tie), or a bitmap of the positions
    where that is smaller."""

    bits: int  # 0 in bitmap mode
    bitmap: bool
    chunks: int
    counts_bytes: int  # the unary counts: 4 * ceil((K + chunks) / 32)
    offsets_bytes: int  # or the bitmap's bytes

    @property
    def nbytes(self) -> int:
        return 4 + self.counts_bytes + self.offsets_bytes

    @property
    def descriptor(self) -> int:
        return LOCAL_BITMAP if self.bitmap else self.bits


@functools.lru_cache(maxsize=1024)
def local_layout(entries: int, numel: int) -> LocalLayout:
    best = None
    for bits in range(1, 16):
        chunks = -(-numel // (1 << bits))
        candidate = LocalLayout(bits, False, chunks, 4 * -(-(entries + chunks) // 32),
                                4 * -(-entries * bits // 32))
        if best is None or candidate.nbytes < best.nbytes:
            best = candidate
    bitmap = LocalLayout(0, True, 0, 0, 4 * -(-numel // 32))
    return bitmap if bitmap.nbytes < best.nbytes else best


def pack_bits(fields: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """``fields`` (int64[n], each below ``2^bits``) as ``nbytes`` bytes (zero padded), ``bits`` bits
    each, least significant bit first."""
    shifts = torch.arange(bits, device=fields.device)
    flat = ((fields[:, None] >> shifts) & 1).reshape(-1)
    padded = torch.zeros(8 * nbytes, dtype=torch.int64, device=fields.device)
    padded[:flat.numel()] = flat
    return (padded.view(-1, 8) << torch.arange(8, device=fields.device)).sum(dim=1).to(torch.uint8)


def unpack_bits(section: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` fields of ``bits`` bits (int64[..., n]) of sections (uint8[..., nbytes])."""
    flat = ((section.to(torch.int64)[..., None] >> torch.arange(8, device=section.device)) & 1)
    flat = flat.reshape(*section.shape[:-1], -1)[..., :n * bits]
    weights = torch.ones(1, dtype=torch.int64, device=section.device) << torch.arange(bits, device=section.device)
    return (flat.reshape(*section.shape[:-1], n, bits) * weights).sum(dim=-1)


_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with its bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def rounding_draws(seed: int, values: torch.Tensor) -> torch.Tensor:
    """The uniform draws in [0, 1) (float32[K], 24 random bits each) that stochastic rounding adds
    to slot j's ``x / scale`` (``values``: float32[K], in wire order): SplitMix64's finaliser over
    ``seed + (counter + 1) * 0x9E3779B97F4A7C15``, the counter holding x's bit pattern in its high
    32 bits and j in its low 32 (csrc/include/gradsieve/radix_key.h's rounding_draw, in int64
    arithmetic that wraps as uint64 does)."""
    slot = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
    bits = values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    counter = (bits << 32) | slot
    z = (counter + 1) * _signed64(0x9E3779B97F4A7C15) + _signed64(seed)
    z = (z ^ _shift_right(z, 30)) * _signed64(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _signed64(0x94D049BB133111EB)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * (1.0 / 16777216.0)


def quantize(values: torch.Tensor, codec: Codec, chunk: int,
             seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The codes (int8[K]: two's complement codes, or sign bits 0/1) and the scales
    (float32[ceil(K / chunk)]) of ``values`` (float32[K]) under a scaled codec, in torch ops: the
    reference of the fused pack's quantization (the module docstring's rules, float32 arithmetic).
    ``seed``: stochastic rounding of the integer codecs, ``floor(x / scale + u)`` with
    :func:`rounding_draws`."""
    if codec.qmax == 127 and seed is None:
        return ops.quantize_int8(values, chunk)
    k = values.numel()
    chunks = -(-k // chunk)
    padded = torch.zeros(chunks * chunk, dtype=torch.float32, device=values.device)
    padded[:k] = values
    rows = padded.view(chunks, chunk)
    finite = torch.isfinite(rows).all(dim=1)
    nan = torch.full((chunks,), float("nan"), device=values.device)
    if codec.qmax:
        amax = rows.abs().amax(dim=1)
        scales = torch.where(finite, amax / torch.full_like(amax, codec.qmax), nan)
        usable = (scales > 0)[:, None]
        ratio = rows / torch.where(usable, scales[:, None], 1.0)
        if seed is None:
            codes = torch.round(ratio)
        else:
            draws = torch.zeros(chunks * chunk, dtype=torch.float32, device=values.device)
            draws[:k] = rounding_draws(seed, values)
            codes = torch.floor(ratio + draws.view(chunks, chunk))
        codes = codes.clamp_(-codec.qmax, codec.qmax)
        codes = torch.where(usable, codes, 0.0)
    else:
        # The mean |x| of each chunk's nonzero entries, summed in slot order one float32 add at a
        # time (as the fused kernels do): a column at a time, across every chunk at once.
        magnitude = rows.abs()
        total = torch.zeros(chunks, dtype=torch.float32, device=values.device)
        for column in range(chunk):
            total = total + magnitude[:, column]
        nonzero = (rows != 0).sum(dim=1).to(torch.float32)
        mean = torch.where(nonzero > 0, total / nonzero.clamp(min=1.0), 0.0)
        scales = torch.where(finite, mean, nan)
        codes = ((rows < 0) & ~torch.isnan(scales)[:, None]).to(torch.float32)
    return codes.reshape(-1)[:k].to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, codec: Codec, chunk: int,
               keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What a receiver decodes for ``codes`` (int8[..., K], as :func:`quantize` gives them) with
    ``scales`` (float32[..., S]): ``code * scale`` (sign: ``+-scale``), one float32 multiplication;
    ``0 * scale`` where ``keep`` (bool[..., K]) is False."""
    k = codes.shape[-1]
    factor = (1.0 - 2.0 * codes.to(torch.float32)) if codec.qmax == 0 else codes.to(torch.float32)
    if keep is not None:
        factor = torch.where(keep, factor, 0.0)
    return factor * scales.repeat_interleave(chunk, dim=-1)[..., :k]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int8[K]) as the values section: ``bits`` bits each, least significant bit first."""
    if bits == 8:
        return codes.view(torch.uint8)
    return pack_bits(codes.to(torch.int64) & ((1 << bits) - 1), bits, -(-codes.numel() * bits // 8))


def unpack_codes(section: torch.Tensor, bits: int, k: int, signed: bool) -> torch.Tensor:
    """The first ``k`` codes (int8[..., k]) of values sections (uint8[..., n]): two's complement
    fields sign-extended when ``signed``, else the bits as they are."""
    if bits == 8:
        return section.view(torch.int8)[..., :k]
    fields = unpack_bits(section, bits, k)
    if signed:
        fields = torch.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)
    return fields.to(torch.int8)


@dataclasses.dataclass(frozen=True)
class PayloadFormat:
    """Byte layout of a payload carrying ``entries`` (index, value) pairs."""

    entries: int  # K, the slots on the wire
    values: str = "fp32"
    chunk: int = 256
    index: str = "int32"
    numel: int = 0  # the bucket's size (csr16 needs it for its block counts)
    checksum: bool = False  # 8 more header bytes: a checksum of the payload

    def __post_init__(self) -> None:
        if self.index not in INDEX_FORMATS:
            raise ValueError(f"PayloadFormat: index must be one of {list(INDEX_FORMATS)}, got {self.index!r}")
        if self.values not in CODECS:
            raise ValueError(f"PayloadFormat: values must be one of {list(VALUE_CODECS)}, got {self.values!r}")
        if CODECS[self.values].scaled and not 1 <= self.chunk <= 1 << 20:
            raise ValueError(f"PayloadFormat: chunk must be in [1, 2^20] with {self.values} values, "
                             f"got {self.chunk}")

    @property
    def codec(self) -> Codec:
        return CODECS[self.values]

    @property
    def header_bytes(self) -> int:
        return HEADER_BYTES + (8 if self.checksum else 0)

    @property
    def slots(self) -> int:
        """K on the wire: every slot is one of the entries (no padding)."""
        return self.entries

    @property
    def num_scales(self) -> int:
        return -(-self.entries // self.chunk) if self.codec.scaled else 0

    @property
    def blocks(self) -> int:
        return csr16_blocks(self.numel) if self.index == "csr16" else 0

    @property
    def local(self) -> LocalLayout:
        """The layout of a local index section (``index="local"``)."""
        return local_layout(self.entries, self.numel)

    @property
    def local_bits(self) -> int:
        """b of a local index in offsets mode (0 in bitmap mode)."""
        return self.local.bits

    @property
    def local_bitmap(self) -> bool:
        return self.local.bitmap

    @property
    def positional(self) -> bool:
        """Whether the index gives positions by their order (csr16, local): entries go on the wire
        in ascending position order."""
        return self.index in ("csr16", "local")

    @property
    def index_bytes(self) -> int:
        if self.index == "int32":
            return 4 * self.slots
        if self.index == "local":
            return self.local.nbytes
        return 4 * self.blocks + -(-2 * self.slots // 4) * 4

    @property
    def values_bytes(self) -> int:
        return -(-self.codec.bits * self.slots // 8)

    @property
    def nbytes(self) -> int:
        return self.header_bytes + self.index_bytes + 4 * self.num_scales + self.values_bytes

    @property
    def bits_per_entry(self) -> float:
        """Bits the payload costs per entry, all included (index, value, scales, header)."""
        return 8 * self.nbytes / max(self.entries, 1)

    def pack(
        self, finite: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
        valid: Optional[torch.Tensor] = None, ordered: bool = False, seed: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encodes ``values`` (float32, the exact values chosen) at ``indices`` (int64).

        ``valid`` (bool, like ``indices``) marks the slots that carry an entry; the others are
        padding: they go on the wire as value 0 (whatever is passed there) and are not decoded. Entries go on the wire valid first (and, for csr16, in
        ascending index order); no host synchronisation. ``ordered=True`` promises that they
        already are (valid entries first, in ascending index order), which saves a sort.

        The payload is written by one fused op (:func:`gradsieve.ops.pack_payload`: one pass on
        the CPU, one kernel on CUDA), after a sort where one is needed; inputs that op does not
        take go through :meth:`pack_reference`. Both give the same bytes and ``sent``, bit for bit.

        ``seed`` (int8, int4, int2 only; an int in [-2^63, 2^63)): stochastic rounding, slot j's
        code ``floor(x / scale + u)``, ``u`` from (seed, j, the bits of x) (:func:`rounding_draws`;
        j counts slots in wire order); None rounds to nearest.

        Returns:
            ``(payload, sent)``: the uint8 payload and the float32 values a receiver will decode,
            in the order of ``indices`` (0 at padding slots), so that the sender can keep
            ``values - sent`` (the rounding) in its error memory.
        """
        self._check_seed(seed)
        if not self._fused_pack_takes(finite, indices, values, valid):
            return self.pack_reference(finite, indices, values, valid, ordered, seed)
        order = None
        if not ordered and (valid is not None or self.positional):
            indices, values, valid, order = self._wire_order(indices, values, valid)
        payload, sent = ops.pack_payload(finite, indices, values, valid, self.values, self.chunk, self.index,
                                         self.numel, self.checksum, seed)
        if self.checksum:
            payload[HEADER_BYTES:HEADER_BYTES + 4].view(torch.int32)[0] = checksum_of(payload.view(1, -1))[0]
        if order is not None:
            sent = torch.zeros_like(sent).index_copy_(0, order, sent)
        return payload, sent

    def _check_seed(self, seed: Optional[int]) -> None:
        if seed is None:
            return
        if not self.codec.qmax:
            raise ValueError(f"seed (stochastic rounding) needs values 'int8', 'int4' or 'int2', got "
                             f"{self.values!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(1 << 63) <= seed < 1 << 63:
            raise ValueError(f"seed must be an int in [-2^63, 2^63), got {seed!r}")

    def _wire_order(self, indices: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor]):
        """The entries in wire order: valid ones first, in ascending index order (a stable sort:
        equal keys keep their order); padding slots get index 0 and value 0. Returns
        ``(indices, values, valid, order)``, ``order`` the permutation applied."""
        if valid is None:
            valid = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device)
        key = torch.where(valid, indices, torch.full_like(indices, self.numel + 1))
        key, order = torch.sort(key, stable=True)
        valid = valid[order]
        indices = torch.where(valid, key, torch.zeros_like(key))
        values = torch.where(valid, values[order], torch.zeros_like(values))
        return indices, values, valid, order

    def _fused_pack_takes(self, finite: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                          valid: Optional[torch.Tensor]) -> bool:
        """Whether :func:`gradsieve.ops.pack_payload` takes these inputs (host-side facts only)."""
        device = indices.device
        if device.type == "cuda":
            if not ops.cuda_kernels_built():
                return False
        elif device.type != "cpu":
            return False
        return (indices.dim() == 1 and indices.dtype in (torch.int64, torch.int32)
                and indices.numel() == self.entries and 1 <= self.chunk <= 1 << 20
                and values.dtype == torch.float32 and values.shape == indices.shape
                and values.device == device
                and isinstance(finite, torch.Tensor) and finite.dtype == torch.bool
                and finite.numel() == 1 and finite.device == device
                and (valid is None or (valid.dtype == torch.bool and valid.shape == indices.shape
                                       and valid.device == device)))

    def pack_reference(
        self, finite: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
        valid: Optional[torch.Tensor] = None, ordered: bool = False, seed: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pack` in plain torch ops (7 to 14 small launches, more for sign), for every
        case: the path of inputs the fused op does not take, and the reference it is tested
        against."""
        self._check_seed(seed)
        k, device, codec = indices.numel(), indices.device, self.codec
        order = None
        if not ordered and (valid is not None or self.positional):
            indices, values, valid, order = self._wire_order(indices, values, valid)
        elif self.positional:
            if valid is None:
                valid = torch.ones(k, dtype=torch.bool, device=device)
            indices = torch.where(valid, indices, torch.zeros_like(indices))
        if valid is not None:
            values = torch.where(valid, values, 0.0)  # a padding slot goes on the wire as 0
        payload = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        header = payload[:self.header_bytes].view(torch.int32)
        header[0] = finite.to(torch.int32)
        if valid is None:
            header[1] = k
        else:
            header[1] = valid.sum().to(torch.int32)
        offset = self.header_bytes
        if self.index == "int32":
            payload[offset:offset + 4 * k].view(torch.int32).copy_(indices)
        elif self.index == "local":
            payload[offset:offset + self.index_bytes].copy_(self._local_section(indices, valid))
        else:
            blocks = self.blocks
            counts = torch.zeros(blocks, dtype=torch.int32, device=device)
            if k and blocks:
                counts.scatter_add_(0, torch.div(indices, CSR16_BLOCK, rounding_mode="floor"),
                                    valid.to(torch.int32))
            payload[offset:offset + 4 * blocks].view(torch.int32).copy_(counts)
            low = indices % CSR16_BLOCK
            signed = torch.where(low >= 1 << 15, low - (1 << 16), low)  # the same 16 bits
            payload[offset + 4 * blocks:offset + 4 * blocks + 2 * k].view(torch.int16).copy_(signed)
        offset += self.index_bytes
        if codec.scaled:
            codes, scales = quantize(values, codec, self.chunk, seed)
            payload[offset:offset + 4 * self.num_scales].view(torch.float32).copy_(scales)
            offset += 4 * self.num_scales
            payload[offset:offset + self.values_bytes].copy_(pack_codes(codes, codec.bits))
            sent = dequantize(codes, scales, codec, self.chunk)
        else:
            cast = values.to(codec.dtype)
            payload[offset:offset + self.values_bytes].view(codec.dtype).copy_(cast)
            sent = cast.float()
        if valid is not None:
            sent = torch.where(valid, sent, 0.0)  # nothing is sent for a slot that carries no entry
        if order is not None:
            sent = torch.zeros_like(sent).index_copy_(0, order, sent)
        if self.checksum:
            header[2] = checksum_of(payload.view(1, -1))[0]
        return payload, sent

    def _local_section(self, indices: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The local index section of entries in wire order: a slot that carries no entry, or whose
        position is outside the bucket, sets no bit (offset 0)."""
        layout, device = self.local, indices.device
        section = torch.zeros(layout.nbytes, dtype=torch.uint8, device=device)
        section[:4].view(torch.int32)[0] = layout.descriptor
        carried = valid & (indices >= 0) & (indices < self.numel)
        if layout.bitmap:
            marks = torch.zeros(8 * layout.offsets_bytes, dtype=torch.int64, device=device)
            if marks.numel():
                marks.index_add_(0, torch.where(carried, indices, 0), carried.to(torch.int64))
            section[4:].copy_(pack_bits(marks.clamp(max=1), 1, layout.offsets_bytes))
            return section
        marks = torch.zeros(8 * layout.counts_bytes, dtype=torch.int64, device=device)
        if indices.numel():
            slot = torch.arange(indices.numel(), device=device)
            at = torch.where(carried, slot + (indices >> layout.bits), 0)
            marks.index_add_(0, at, carried.to(torch.int64))
        section[4:4 + layout.counts_bytes].copy_(pack_bits(marks.clamp(max=1), 1, layout.counts_bytes))
        fields = torch.where(carried, indices & ((1 << layout.bits) - 1), 0)
        section[4 + layout.counts_bytes:].copy_(pack_bits(fields, layout.bits, layout.offsets_bytes))
        return section

    def _local_positions(self, section: torch.Tensor, used: torch.Tensor):
        """Slot positions (int64[world, K], -1 where a slot in use has none) of local index
        sections (uint8[world, index_bytes]) and whether each section is well formed."""
        layout, k, world, device = self.local, self.slots, section.shape[0], section.device
        slot = torch.arange(k, device=device).expand(world, k)
        well_formed = section[:, :4].contiguous().view(torch.int32)[:, 0] == layout.descriptor
        body = section[:, 4 + layout.counts_bytes:]
        if layout.bitmap:
            marks = unpack_bits(body, 1, 8 * layout.offsets_bytes)
            well_formed &= (marks[:, self.numel:] == 0).all(dim=1)
            inside = marks[:, :self.numel]
            ends = torch.cumsum(inside, dim=1)
            well_formed &= inside.sum(dim=1) == used
            # Slot j is the (j + 1)-th set bit: the first position whose running count reaches j + 1.
            positions = torch.searchsorted(ends.contiguous(), (slot + 1).contiguous())
            has = positions < self.numel
        else:
            # Slot j's chunk is q - j, q its (j + 1)-th set bit of the unary counts.
            marks = unpack_bits(section[:, 4:4 + layout.counts_bytes], 1, 8 * layout.counts_bytes)
            ends = torch.cumsum(marks, dim=1)
            if layout.counts_bytes:  # none only for K = 0 over an empty bucket
                well_formed &= ends[:, -1] == used
            chunk = torch.searchsorted(ends.contiguous(), (slot + 1).contiguous()) - slot
            fields = unpack_bits(body, layout.bits, k)
            positions = (chunk << layout.bits) + fields
            has = (chunk < layout.chunks) & (positions < self.numel)
        in_use = slot < used[:, None]
        well_formed &= (has | ~in_use).all(dim=1)
        return torch.where(has & in_use, positions, -1), well_formed

    def decode_sum(self, gathered: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Adds every rank's payload (``gathered``: uint8[world, nbytes]) into ``out`` (float32).

        Whatever the bytes, nothing is written outside ``out`` and nothing raises: a payload that
        is not well formed (a count outside [0, K], a finite flag other than 0 or 1, an index
        outside the bucket or a malformed csr16 block, a non-finite scale or value under a flag
        that says finite) is flagged, and its out-of-range entries are dropped. All of it is
        tensor arithmetic on the payload's device, with no host synchronisation.

        Returns:
            ``(finite, well_formed)``: bool tensors[world]. A rank's contribution is usable when
            both are True; the hook skips the step otherwise.
        """
        world = gathered.shape[0]
        if gathered.dim() != 2 or gathered.shape[1] != self.nbytes or gathered.dtype != torch.uint8:
            raise ValueError(f"decode_sum: expected uint8 payloads of {self.nbytes} bytes, got "
                             f"{gathered.dtype} of shape {tuple(gathered.shape)}")

        def column(start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            # Every rank's bytes [start, start + nbytes) as one flat tensor of dtype. reshape(-1),
            # not contiguous(): a [1, nbytes] slice counts as contiguous while its row stride is
            # still the whole payload's, which view(dtype) rejects when that is not a multiple
            # of the dtype's size (world size 1, odd k).
            return gathered[:, start:start + nbytes].reshape(-1).view(dtype)

        header = column(0, self.header_bytes, torch.int32).view(world, -1)
        flags = header[:, 0] != 0
        slots = self.slots
        count = header[:, 1]
        well_formed = (count >= 0) & (count <= slots) & ((header[:, 0] == 0) | (header[:, 0] == 1))
        used = count.clamp(0, slots)
        in_use = torch.arange(slots, device=gathered.device) < used[:, None]
        if self.checksum:
            unsigned = gathered.clone()
            unsigned[:, HEADER_BYTES:HEADER_BYTES + 4] = 0
            well_formed &= checksum_of(unsigned) == header[:, 2]
        offset = self.header_bytes
        if self.index == "int32":
            # An index in use outside the bucket is left to the decode kernel, which skips it and
            # flags its payload (below); slots past the count become index 0 with value 0.
            indices = column(offset, 4 * slots, torch.int32).view(world, slots)
            valid = in_use
            indices = torch.where(valid, indices, torch.zeros_like(indices))
        elif self.index == "local":
            section = column(offset, self.index_bytes, torch.uint8).view(world, self.index_bytes)
            indices, formed = self._local_positions(section, used.to(torch.int64))
            well_formed &= formed
            valid = indices >= 0
            indices = indices.clamp_(min=0)
        else:
            blocks = self.blocks
            counts = column(offset, 4 * blocks, torch.int32).view(world, blocks)
            offsets = column(offset + 4 * blocks, self.index_bytes - 4 * blocks, torch.int16)
            offsets = offsets.view(world, -1)[:, :slots]
            indices = ops.csr16_indices(counts, offsets, used.to(torch.int32), self.numel)
            valid = indices >= 0
            well_formed &= (valid | ~in_use).all(dim=1)
            # Block counts must add up to the count in the header (a sender's counts always do).
            well_formed &= counts.to(torch.int64).clamp(min=0).sum(dim=1) == used
            well_formed &= (counts >= 0).all(dim=1)
            indices = indices.clamp_(min=0)
        offset += self.index_bytes
        indices = indices.reshape(-1)
        claims_finite = header[:, 0] == 1
        codec = self.codec
        if codec.scaled:
            scales = column(offset, 4 * self.num_scales, torch.float32).view(world, self.num_scales)
            offset += 4 * self.num_scales
            well_formed &= ~(claims_finite & ~torch.isfinite(scales).all(dim=1))
            section = column(offset, self.values_bytes, torch.uint8).view(world, self.values_bytes)
            codes = unpack_codes(section, codec.bits, slots, signed=codec.qmax > 0)
            # Slots not in use add 0 times their scale (at index 0), as the fused decode does.
            values = dequantize(codes, scales, codec, self.chunk, keep=valid).reshape(-1)
        else:
            values = column(offset, self.values_bytes, codec.dtype).view(world, slots)
            values = torch.where(valid, values, torch.zeros_like(values))
            well_formed &= ~(claims_finite & ~torch.isfinite(values).all(dim=1))
            values = values.reshape(-1)
        # One flag per payload from the decode kernel: an index outside the bucket, skipped.
        outside = torch.zeros(world, dtype=torch.int32, device=gathered.device)
        ops.sparse_accumulate_(out, indices, values, bad=outside)
        well_formed &= outside == 0
        return flags, well_formed

    def decode_average(self, gathered: torch.Tensor, out: torch.Tensor,
                       divisor: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Writes the average of every rank's payload (``gathered``: uint8[world, nbytes]) into
        ``out`` (float32[numel], contiguous, overwritten: it need not be zeroed), in one op
        (:func:`gradsieve.ops.decode_average_`): ``out = decoded sum / divisor``.

        The flags and the entries added are :meth:`decode_sum`'s, whatever the bytes; on CPU the
        result is bitwise ``out.zero_(); self.decode_sum(gathered, out); out.div_(divisor)``. No
        host synchronisation. With csr16 indices ``out`` must hold the format's ``numel``
        entries; with int32 indices the bucket is ``out``.

        Returns:
            ``(finite, well_formed)``: bool tensors[world], as :meth:`decode_sum`'s.
        """
        if gathered.dim() != 2 or gathered.shape[1] != self.nbytes or gathered.dtype != torch.uint8:
            raise ValueError(f"decode_average: expected uint8 payloads of {self.nbytes} bytes, got "
                             f"{gathered.dtype} of shape {tuple(gathered.shape)}")
        if out.dtype != torch.float32 or not out.is_contiguous() or out.device != gathered.device:
            raise ValueError(f"decode_average: out must be a contiguous float32 tensor on {gathered.device}, "
                             f"got {out.dtype} on {out.device} (contiguous: {out.is_contiguous()})")
        if self.positional and out.numel() != self.numel:
            raise ValueError(f"decode_average: out must have the bucket's {self.numel} entries, got "
                             f"{out.numel()}")
        return ops.decode_average_(out, gathered, self.slots, self.values, self.chunk, self.index,
                                   self.checksum, float(divisor))


@dataclasses.dataclass(frozen=True)
class LayerFormat:
    """Byte layout of a payload that carries whole parameter tensors densely (``granular``'s
    ``layer`` level): no index per entry, only which of the bucket's ``len(numels)`` parameters
    are in it::

        header  int32[2]          finite flag, number C of parameters carried
                int32[2]          with checksum=True only (as in PayloadFormat)
        ids     int32[P]          the carried parameters' positions in the bucket, ascending
                                  (the first C; the rest are padding)
        scales  float32[ceil(M/chunk)]  scaled codecs only (int8, int4, int2, sign)
        values  ceil(M * bits / 8) bytes: the carried parameters' entries, one after the other,
                                  as in PayloadFormat

    ``M`` (``capacity``) is fixed per bucket; the carried parameters fill its start.
    """

    numels: Tuple[int, ...]
    capacity: int
    values: str = "fp32"
    chunk: int = 256
    checksum: bool = False

    @property
    def header_bytes(self) -> int:
        return HEADER_BYTES + (8 if self.checksum else 0)

    @property
    def slots(self) -> int:
        return self.capacity

    @property
    def codec(self) -> Codec:
        return CODECS[self.values]

    @property
    def num_scales(self) -> int:
        """Scaled codecs: one scale per chunk of values, the last chunk possibly partial."""
        return -(-self.capacity // self.chunk) if self.codec.scaled else 0

    @property
    def values_bytes(self) -> int:
        return -(-self.codec.bits * self.slots // 8)

    @property
    def nbytes(self) -> int:
        return self.header_bytes + 4 * len(self.numels) + 4 * self.num_scales + self.values_bytes

    def pack(self, finite: torch.Tensor, chosen: Tuple[int, ...], values: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encodes the entries ``values`` (float32) of the parameters at bucket positions
        ``chosen`` (ascending; their entries one after the other, at most ``capacity``).
        Returns ``(payload, sent)``: ``sent`` is what a receiver decodes for ``values``."""
        chosen = tuple(int(c) for c in chosen)
        if list(chosen) != sorted(set(chosen)) or any(not 0 <= c < len(self.numels) for c in chosen):
            raise ValueError(f"LayerFormat.pack: chosen must be ascending distinct positions below "
                             f"{len(self.numels)}, got {list(chosen)}")
        total = sum(self.numels[c] for c in chosen)
        if values.numel() != total or total > self.capacity:
            raise ValueError(f"LayerFormat.pack: {values.numel()} values for parameters holding {total} "
                             f"entries (capacity {self.capacity})")
        device = values.device
        payload = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        header = payload[:self.header_bytes].view(torch.int32)
        header[0] = finite.to(torch.int32)
        header[1] = len(chosen)
        offset = self.header_bytes
        if chosen:
            payload[offset:offset + 4 * len(chosen)].view(torch.int32).copy_(
                torch.tensor(chosen, dtype=torch.int32))
        offset += 4 * len(self.numels)
        codec = self.codec
        if codec.scaled:
            # The capacity's unused tail goes as zeros (codes 0).
            padded = torch.zeros(self.capacity, dtype=torch.float32, device=device)
            padded[:total] = values
            codes, scales = quantize(padded, codec, self.chunk)
            payload[offset:offset + 4 * self.num_scales].view(torch.float32).copy_(scales)
            offset += 4 * self.num_scales
            payload[offset:offset + self.values_bytes].copy_(pack_codes(codes, codec.bits))
            sent = dequantize(codes, scales, codec, self.chunk)[:total]
        else:
            cast = values.to(codec.dtype)
            payload[offset:offset + cast.element_size() * total].view(codec.dtype).copy_(cast)
            sent = cast.float()
        if self.checksum:
            header[2] = checksum_of(payload.view(1, -1))[0]
        return payload, sent

    def decode_sum(self, gathered: torch.Tensor, out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Adds every rank's carried parameters into ``out`` (float32, the bucket). As
        :meth:`PayloadFormat.decode_sum`: whatever the bytes, nothing is written outside ``out``
        and nothing raises; a payload that is not well formed (count outside [0, P], a flag other
        than 0 or 1, positions not ascending or outside the bucket, more entries than the
        capacity, non-finite scales or values under a finite flag, a wrong checksum) is flagged
        and contributes nothing. Returns ``(finite, well_formed)``, bool[world]."""
        world, device = gathered.shape[0], gathered.device
        if gathered.dim() != 2 or gathered.shape[1] != self.nbytes or gathered.dtype != torch.uint8:
            raise ValueError(f"decode_sum: expected uint8 payloads of {self.nbytes} bytes, got "
                             f"{gathered.dtype} of shape {tuple(gathered.shape)}")
        if out.numel() != sum(self.numels):
            raise ValueError(f"decode_sum: out has {out.numel()} entries, the bucket {sum(self.numels)}")

        def column(start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            size = torch.empty((), dtype=dtype).element_size()
            return gathered[:, start:start + nbytes].reshape(-1).view(dtype).view(world, nbytes // size)

        P, M = len(self.numels), self.slots
        header = column(0, self.header_bytes, torch.int32)
        flags = header[:, 0] != 0
        count = header[:, 1]
        well_formed = (count >= 0) & (count <= P) & ((header[:, 0] == 0) | (header[:, 0] == 1))
        if self.checksum:
            unsigned = gathered.clone()
            unsigned[:, HEADER_BYTES:HEADER_BYTES + 4] = 0
            well_formed &= checksum_of(unsigned) == header[:, 2]
        offset = self.header_bytes
        numels = torch.tensor(self.numels, dtype=torch.int64, device=device)
        ids = column(offset, 4 * P, torch.int32).to(torch.int64) if P else \
            torch.zeros(world, 0, dtype=torch.int64, device=device)
        offset += 4 * P
        in_use = torch.arange(P, device=device) < count.clamp(0, P)[:, None]
        inside = (ids >= 0) & (ids < P)
        well_formed &= (inside | ~in_use).all(dim=1)
        if P > 1:
            rising = (ids[:, 1:] > ids[:, :-1]) | ~in_use[:, 1:]
            well_formed &= rising.all(dim=1)
        carried = torch.zeros(world, P, dtype=torch.bool, device=device)
        carried.scatter_(1, torch.where(in_use & inside, ids, 0), in_use & inside)
        carried_numel = torch.where(carried, numels, 0)
        total = carried_numel.sum(dim=1)
        well_formed &= total <= self.capacity
        claims_finite = header[:, 0] == 1
        codec = self.codec
        if codec.scaled:
            scales = column(offset, 4 * self.num_scales, torch.float32)
            offset += 4 * self.num_scales
            well_formed &= ~(claims_finite & ~torch.isfinite(scales).all(dim=1))
            section = column(offset, self.values_bytes, torch.uint8)
            values = dequantize(unpack_codes(section, codec.bits, M, signed=codec.qmax > 0), scales, codec,
                                self.chunk)
        else:
            values = column(offset, self.values_bytes, codec.dtype).float()
        used = torch.arange(M, device=device) < total[:, None]
        well_formed &= ~(claims_finite & (used & ~torch.isfinite(values)).any(dim=1))
        if not out.numel() or not M:
            return flags, well_formed
        # Entry e of parameter p comes from slot start[p] + (e - offset[p]) of a rank's values,
        # start[p] being the entries of the carried parameters before p.
        param_of = torch.repeat_interleave(torch.arange(P, device=device), numels)
        first = torch.cumsum(numels, 0) - numels
        local = torch.arange(out.numel(), device=device) - first[param_of]
        starts = torch.cumsum(carried_numel, dim=1) - carried_numel
        for r in range(world):
            source = starts[r][param_of] + local
            take = carried[r][param_of] & (source < M) & well_formed[r]  # a malformed payload adds nothing
            picked = values[r].gather(0, source.clamp(0, M - 1))
            out.add_(torch.where(take, picked, torch.zeros_like(picked)))
        return flags, well_formed

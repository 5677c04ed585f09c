"""The packed payload one rank sends for one bucket, and its decoding.

Layout of one payload (a flat uint8 tensor; every rank's has the same size for a bucket, so one
``all_gather_into_tensor`` moves them)::

    header  int32[2]          finite flag (1 when every gradient entry this rank read was finite),
                              number of entries K
    indices int32[K]          bucket coordinates
    scales  float32[K/chunk]  only for int8 values; K is then a multiple of chunk
    values  fp32|fp16|bf16|int8 [K]

Padding entries carry index 0 and value 0, so decoding never needs to skip them.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

from gradsieve import ops

VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
HEADER_BYTES = 8


@dataclasses.dataclass(frozen=True)
class PayloadFormat:
    """Byte layout of a payload carrying ``entries`` (index, value) pairs."""

    entries: int  # K as selected (before padding to the int8 chunk)
    values: str = "fp32"
    chunk: int = 256

    @property
    def slots(self) -> int:
        """K on the wire: padded up to a multiple of ``chunk`` for int8 values."""
        if self.values != "int8":
            return self.entries
        return -(-self.entries // self.chunk) * self.chunk

    @property
    def num_scales(self) -> int:
        return self.slots // self.chunk if self.values == "int8" else 0

    @property
    def nbytes(self) -> int:
        value_size = torch.empty((), dtype=VALUE_DTYPES[self.values]).element_size()
        return HEADER_BYTES + 4 * self.slots + 4 * self.num_scales + value_size * self.slots

    def pack(
        self, finite: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encodes ``values`` (float32, the exact values chosen) at ``indices`` (int64).

        Returns:
            ``(payload, sent)``: the uint8 payload and the float32 values a receiver will decode,
            so that the sender can keep ``values - sent`` (the rounding) in its error memory.
        """
        k, slots, device = indices.numel(), self.slots, indices.device
        payload = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        header = payload[:HEADER_BYTES].view(torch.int32)
        header[0] = finite.to(torch.int32)
        header[1] = k
        offset = HEADER_BYTES
        payload[offset:offset + 4 * k].view(torch.int32).copy_(indices)
        offset += 4 * slots
        if self.values == "int8":
            padded = torch.zeros(slots, dtype=torch.float32, device=device)
            padded[:k] = values
            q, scales = ops.quantize_int8(padded, self.chunk)
            payload[offset:offset + 4 * self.num_scales].view(torch.float32).copy_(scales)
            offset += 4 * self.num_scales
            payload[offset:offset + slots].view(torch.int8).copy_(q)
            sent = ops.dequantize_int8(q, scales, self.chunk)[:k]
        else:
            dtype = VALUE_DTYPES[self.values]
            cast = values.to(dtype)
            size = cast.element_size()
            payload[offset:offset + size * k].view(dtype).copy_(cast)
            sent = cast.float()
        return payload, sent

    def decode_sum(self, gathered: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Adds every rank's payload (``gathered``: uint8[world, nbytes]) into ``out`` (float32).

        Returns:
            bool tensor[world]: each rank's finite flag.
        """
        world = gathered.shape[0]

        def column(start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            # Every rank's bytes [start, start + nbytes) as one flat tensor of dtype. reshape(-1),
            # not contiguous(): a [1, nbytes] slice counts as contiguous while its row stride is
            # still the whole payload's, which view(dtype) rejects when that is not a multiple
            # of the dtype's size (world size 1, odd k).
            return gathered[:, start:start + nbytes].reshape(-1).view(dtype)

        flags = column(0, HEADER_BYTES, torch.int32).view(world, -1)[:, 0] != 0
        slots = self.slots
        offset = HEADER_BYTES
        indices = column(offset, 4 * slots, torch.int32)
        offset += 4 * slots
        if self.values == "int8":
            scales = column(offset, 4 * self.num_scales, torch.float32)
            offset += 4 * self.num_scales
            q = column(offset, slots, torch.int8)
            ops.sparse_accumulate_(out, indices, q, scales, self.chunk)
        else:
            dtype = VALUE_DTYPES[self.values]
            size = torch.empty((), dtype=dtype).element_size()
            values = column(offset, size * slots, dtype)
            ops.sparse_accumulate_(out, indices, values)
        return flags

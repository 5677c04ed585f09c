"""Dense baselines: plain all-reduce (``none``) and cast-to-16-bit all-reduce (``fp16``, ``bf16``,
as PyTorch's own fp16/bf16 compression hooks do)."""

import torch

from gradsieve.compressor import Compressor, Traits
from gradsieve.registry import register_compressor


@register_compressor("none")
class NoCompression(Compressor):
    """Dense all-reduce of the bucket in its own dtype: the baseline every other compressor is
    measured against."""

    traits = Traits(dense=True)


@register_compressor("fp16")
class Float16Compression(Compressor):
    """Cast to float16, all-reduce, cast back: half the bytes of fp32, no memory."""

    traits = Traits(dense=True, allreduce_dtype=torch.float16)


@register_compressor("bf16")
class BFloat16Compression(Compressor):
    """Cast to bfloat16, all-reduce, cast back: fp32's range with 8 bits of mantissa."""

    traits = Traits(dense=True, allreduce_dtype=torch.bfloat16)

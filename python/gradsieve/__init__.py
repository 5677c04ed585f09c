"""gradsieve: gradient compression for communication-efficient data-parallel training.

The compression ops live in ``torch.ops.gradsieve`` (CPU kernels always, CUDA kernels when the
package was built against a CUDA torch) and are wrapped, typed and documented in
:mod:`gradsieve.ops`.
"""

from gradsieve import ops
from gradsieve.ops import (
    cuda_kernels_built,
    dequantize_int8,
    ef_topk_,
    quantile_abs,
    quantize_int8,
    sparse_accumulate_,
    threshold_select,
    topk_abs,
)

__version__ = "0.1.0"

__all__ = [
    "cuda_kernels_built",
    "dequantize_int8",
    "ef_topk_",
    "ops",
    "quantile_abs",
    "quantize_int8",
    "sparse_accumulate_",
    "threshold_select",
    "topk_abs",
]

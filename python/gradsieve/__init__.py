"""gradsieve: gradient compression for communication-efficient data-parallel training.

* ops: ``torch.ops.gradsieve`` (CPU kernels always, CUDA kernels in a CUDA build), wrapped in
  :mod:`gradsieve.ops`;
* compressors: a registry (:func:`available_compressors`, :func:`get_compressor`), each declaring
  its :class:`Traits`;
* exchanges (how a bucket moves): a registry (:func:`available_exchanges`, :func:`get_exchange`);
* the DDP hook: :class:`CompressionState` and :func:`compression_hook`;
* the N-worker :class:`Simulator`, running the same compressor code in one process;
* :class:`SpeculativeOptimizer`: speculative sparse training (communication overlaps the next
  step).
"""

from gradsieve import compressors as _compressors  # noqa: F401  (fills the registry)
from gradsieve import exchanges as _exchanges  # noqa: F401  (fills the exchange registry)
from gradsieve import ops
from gradsieve import signals
from gradsieve.compressor import Aggregated, BucketLayout, Compressed, Compressor, SparseCompressor, Traits
from gradsieve.exchange import (AllGatherExchange, Collective, Exchange, Round, Topology, available_exchanges,
                                get_exchange, register_exchange, run_together)
from gradsieve.hook import compression_hook
from gradsieve.state import CompressionState
from gradsieve.ops import (
    adaptive_select,
    csr16_indices,
    cuda_kernels_built,
    decode_average_,
    dequantize_int8,
    dgc_accumulate,
    dgc_mask_,
    ef21_commit,
    ef21_topk,
    ef_topk_,
    ef_topk_into,
    influence_update,
    pack_payload,
    predictive_score,
    quantile_abs,
    quantize_int8,
    regtopk_select_,
    segment_mean,
    sparse_accumulate_,
    threshold_select,
    topk_abs,
)
from gradsieve.registry import available_compressors, get_compressor, register_compressor
from gradsieve.simulator import Simulator
from gradsieve.speculative import SpeculativeOptimizer

__version__ = "0.1.0"

__all__ = [
    "Aggregated",
    "AllGatherExchange",
    "BucketLayout",
    "Collective",
    "Compressed",
    "CompressionState",
    "Compressor",
    "Exchange",
    "Round",
    "Topology",
    "Simulator",
    "SpeculativeOptimizer",
    "SparseCompressor",
    "Traits",
    "adaptive_select",
    "available_compressors",
    "available_exchanges",
    "compression_hook",
    "csr16_indices",
    "cuda_kernels_built",
    "decode_average_",
    "dequantize_int8",
    "dgc_accumulate",
    "dgc_mask_",
    "ef21_commit",
    "ef21_topk",
    "ef_topk_",
    "ef_topk_into",
    "get_compressor",
    "get_exchange",
    "influence_update",
    "ops",
    "pack_payload",
    "predictive_score",
    "quantile_abs",
    "quantize_int8",
    "regtopk_select_",
    "register_compressor",
    "register_exchange",
    "run_together",
    "segment_mean",
    "signals",
    "sparse_accumulate_",
    "threshold_select",
    "topk_abs",
]

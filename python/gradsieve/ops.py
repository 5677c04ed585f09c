"""Typed Python face of the ``torch.ops.gradsieve`` operators.

Every op reads its input as flattened (any shape), accepts float32, float16 and bfloat16, runs on
CPU and, when built with CUDA, on CUDA, and never synchronises with the host. The ops rank entries
by magnitude with one documented key order (``csrc/include/gradsieve/radix_key.h``): -0.0 equals
+0.0, NaN is larger than every number including inf, and among equal magnitudes at a cut the lower
index wins. Selected entries come back in ascending index order.

Bad arguments raise ``RuntimeError`` with a message ``gradsieve.<op>: <arg> must be ..., got ...``;
the same checks run on every backend and in the fake (Meta) kernels used by ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from gradsieve import _C  # noqa: F401  (loading the library registers the ops)

__all__ = [
    "adaptive_select",
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
    "influence_update",
    "pack_payload",
    "predictive_score",
    "quantile_abs",
    "quantize_int8",
    "regtopk_select_",
    "segment_mean",
    "sparse_accumulate_",
    "threshold_select",
    "topk_abs",
]


def cuda_kernels_built() -> bool:
    """Whether this build of gradsieve has CUDA kernels (it was built against a CUDA torch)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("gradsieve::topk_abs", "CUDA")


def topk_abs(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of largest magnitude, by exact radix select (no sort).

    Args:
        x: Tensor[...] of float32/float16/bfloat16, read as flattened.
        k: how many entries, ``0 <= k <= x.numel()``.

    Returns:
        ``(values, indices)``: ``indices`` Tensor[k] int64 in ascending order, ``values`` Tensor[k]
        of x's dtype with ``values == x.flatten()[indices]`` (signed). Ties at the cut go to the
        lower index; NaN counts as the largest magnitude.

    Example::

        >>> values, indices = gradsieve.topk_abs(torch.tensor([0.5, -3.0, 2.0]), 2)
        >>> indices.tolist(), values.tolist()
        ([1, 2], [-3.0, 2.0])
    """
    return torch.ops.gradsieve.topk_abs(x, k)


def quantile_abs(x: torch.Tensor, q: float) -> torch.Tensor:
    """The order statistic of ``|x|`` at fraction ``q`` (a percentile threshold).

    Equal to ``torch.quantile(x.abs().double(), q, interpolation="lower")`` cast back to x's dtype:
    the ascending rank ``floor(q * (n - 1))``; NaN when x holds a NaN or is empty.

    Args:
        x: Tensor[...] of float32/float16/bfloat16.
        q: fraction in ``[0, 1]``.

    Returns:
        Tensor[] (0-d) of x's dtype, on x's device.

    Example::

        >>> gradsieve.quantile_abs(torch.tensor([4.0, -1.0, 3.0, 2.0]), 0.5)
        tensor(2.)
    """
    return torch.ops.gradsieve.quantile_abs(x, float(q))


def ef_topk_(
    residual: torch.Tensor, grad: torch.Tensor, k: int, scale: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Error feedback fused with top-k: accumulate, select, keep the rest.

    ``acc = residual + scale * grad``; the top ``k`` of ``|acc|`` are returned and removed;
    ``residual`` is left holding ``acc`` with the selected entries set to zero, so exactly
    ``new residual + scatter(values, indices) == old residual + scale * grad``.

    Args:
        residual: Tensor[...] float32, updated in place (same numel as grad).
        grad: Tensor[...] of float32/float16/bfloat16.
        k: how many entries to send, ``0 <= k <= grad.numel()``.
        scale: multiplier of grad (for example a learning rate), finite.

    Returns:
        ``(values, indices)``: Tensor[k] float32 (acc's values) and Tensor[k] int64 ascending.

    Example::

        >>> residual = torch.zeros(4)
        >>> values, indices = gradsieve.ef_topk_(residual, torch.tensor([1.0, -4.0, 2.0, 0.5]), 1)
        >>> indices.tolist(), residual.tolist()
        ([1], [1.0, 0.0, 2.0, 0.5])
    """
    return torch.ops.gradsieve.ef_topk_(residual, grad, k, float(scale))


def ef_topk_into(
    out: torch.Tensor, residual: torch.Tensor, grad: torch.Tensor, k: int, scale: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ef_topk_` out of place, with the gradient's finite flag from the same pass.

    ``out = residual + scale * grad`` (``residual`` is only read); the top ``k`` of ``|out|`` are
    returned and set to zero in ``out``, exactly as :func:`ef_topk_` does to its residual (same
    values, indices, ties and roundings), so the old residual can be kept for an undo without a
    copy.

    Args:
        out: Tensor[...] float32, contiguous, overwritten (same numel as grad); may be ``residual``
            itself (then it is :func:`ef_topk_`).
        residual: Tensor[...] float32 (same numel as grad).
        grad: Tensor[...] of float32/float16/bfloat16.
        k: how many entries to send, ``0 <= k <= grad.numel()``.
        scale: multiplier of grad, finite.

    Returns:
        ``(values, indices, finite)``: Tensor[k] float32, Tensor[k] int64 ascending, and a bool
        Tensor[]: every entry of ``grad`` is finite (no host synchronisation).

    Example::

        >>> out = torch.empty(4)
        >>> values, indices, finite = gradsieve.ef_topk_into(out, torch.zeros(4),
        ...                                                  torch.tensor([1.0, -4.0, 2.0, 0.5]), 1)
        >>> indices.tolist(), out.tolist(), bool(finite)
        ([1], [1.0, 0.0, 2.0, 0.5], True)
    """
    return torch.ops.gradsieve.ef_topk_into(out, residual, grad, k, float(scale))


def regtopk_select_(
    residual: torch.Tensor,
    grad: torch.Tensor,
    prev_indices: torch.Tensor,
    prev_sent: torch.Tensor,
    prev_agg: torch.Tensor,
    mu: float,
    k: int,
    world_size: int,
    q: Optional[float] = None,
    bad: Optional[torch.Tensor] = None,
    kept: Optional[torch.Tensor] = None,
    finite: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RegTop-k selection fused with error feedback (Bereyhi et al., arXiv 2409.14893).

    ``a = residual + grad``; each entry gets the score ``w_j * |a_j|`` and the ``k`` entries of
    largest score are returned (``a``'s values, unchanged) and removed, so that
    ``new residual + scatter(values, indices) == residual + grad`` exactly, as with
    :func:`ef_topk_`. The weight regularises the entries this worker sent last step by how their
    contribution aggregated:

    * entry ``prev_indices[j]`` (sent last step with value ``prev_sent[j]``, where the world's
      average was ``prev_agg[j]``): ``w = tanh(|prev_agg[j] * world_size / prev_sent[j]| / mu)``,
      i.e. ``tanh(|1 + Delta| / mu)`` with the posterior distortion
      ``1 + Delta = g_agg / (omega * sent)``, ``omega = 1 / world_size``. An entry whose
      contributions cancelled across workers (``prev_agg == 0``) gets weight 0;
    * every other entry: ``w = tanh(|1 + q| / mu)`` (``Delta = q``), exactly 1 when ``q`` is None.

    Edge cases, identical on CPU and CUDA: empty ``prev_*`` (the first step) is plain top-k of
    ``|a|``; ``prev_sent[j] == 0`` or a NaN ratio counts as not sent; an infinite ratio gives
    weight 1; an index listed twice takes the lower of its scores. ``mu -> 0`` gives plain top-k
    (except where ``prev_agg == 0``). A NaN score ranks above everything (any NaN or infinite
    ``a`` ranks above every finite one), ties at the cut go to the lower index. The weight is
    computed in float64 and rounded once to float32; the score is a float32 product.

    Args:
        residual: Tensor[...] float32, updated in place (same numel as grad).
        grad: Tensor[...] of float32/float16/bfloat16.
        prev_indices: Tensor[M] int64 or int32, positions in ``[0, grad.numel())`` sent last step.
        prev_sent: Tensor[M] float32, the values sent there (as they went on the wire).
        prev_agg: Tensor[M] float32, the averaged gradient every worker received there.
        mu: regularisation, a finite number > 0 (the paper uses 1 to 5).
        k: how many entries to send, ``0 <= k <= grad.numel()``.
        world_size: number of workers N, ``>= 1``.
        q: the distortion of the entries not sent last step, ``>= 0`` (inf allowed); None: their
            weight is exactly 1.
        bad: optional int32[P] flags (zero-filled by the caller, P dividing M). Without it a
            ``prev_indices`` entry outside ``[0, grad.numel())`` is an error, raised before
            anything is written (on CUDA after reading one flag from the device). With it such an
            entry is skipped (its position keeps the weight of an entry not sent) and sets
            ``bad[j // (M // P)] = 1``, with no host synchronisation.
        kept: optional Tensor[...] float32 (grad's numel): the memory to read instead of
            ``residual``, which is then an output only: ``a = kept + grad`` is written to
            ``residual`` (error feedback out of place, in the same one pass: ``kept`` is left as
            it was, for an undo, without a copy of it).
        finite: optional bool tensor of one element, on grad's device: set to False when
            ``grad`` holds a NaN or Inf (read in the same pass), left as it is otherwise (the
            caller fills it with True; several calls may share one flag).

    Returns:
        ``(values, indices)``: Tensor[k] float32 (``a``'s values) and Tensor[k] int64 ascending.

    Example::

        >>> # Last step this worker sent 3.0 at entry 0 and the other worker -3.0: they cancelled.
        >>> residual = torch.zeros(4)
        >>> values, indices = gradsieve.regtopk_select_(
        ...     residual, torch.tensor([3.0, -2.0, 0.5, 1.0]), torch.tensor([0]),
        ...     torch.tensor([3.0]), torch.tensor([0.0]), mu=1.0, k=1, world_size=2)
        >>> indices.tolist(), values.tolist(), residual.tolist()
        ([1], [-2.0], [3.0, 0.0, 0.5, 1.0])
    """
    return torch.ops.gradsieve.regtopk_select_(
        residual, grad, prev_indices, prev_sent, prev_agg, float(mu), k, world_size,
        None if q is None else float(q), bad, kept, finite,
    )


def threshold_select(
    x: torch.Tensor, threshold: torch.Tensor, capacity: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries with ``|x| >= threshold``, at most ``capacity`` of them, padded to ``capacity``.

    When more than ``capacity`` entries pass, the ``capacity`` largest are kept (the top-k rule and
    its tie rule). Selected entries come first in ascending index order; the padding after them
    holds index 0 and value 0, so adding the whole payload into a dense buffer is harmless. A
    threshold at or below 0 admits everything; a NaN threshold admits only NaN entries.

    Args:
        x: Tensor[...] of float32/float16/bfloat16.
        threshold: Tensor[] (0-d), floating point, on x's device (no host sync is needed).
        capacity: size of the outputs, ``>= 0``.

    Returns:
        ``(values, indices, count)``: Tensor[capacity] of x's dtype, Tensor[capacity] int64, and a
        0-d int64 tensor with how many entries passed (larger than ``capacity`` on overflow).

    Example::

        >>> v, i, c = gradsieve.threshold_select(torch.tensor([0.1, 5.0, -2.0]), torch.tensor(1.0), 3)
        >>> i.tolist(), v.tolist(), int(c)
        ([1, 2, 0], [5.0, -2.0, 0.0], 2)
    """
    return torch.ops.gradsieve.threshold_select(x, threshold, capacity)


def quantize_int8(
    x: torch.Tensor,
    chunk: int,
    stochastic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk absmax quantization to int8 codes in ``[-127, 127]``.

    The flattened x is cut into chunks of ``chunk`` entries; each gets ``scale = max|x| / 127``.
    Round to nearest gives ``|x - dequantize(quantize(x))| <= scale / 2``; stochastic rounding is
    unbiased and reproducible for a given generator seed. A zero chunk has scale 0 and zero codes;
    a chunk holding NaN or Inf gets scale NaN (it decodes to NaN, so an overflow stays visible).

    Args:
        x: Tensor[...] of float32/float16/bfloat16.
        chunk: entries per scale, ``> 0``.
        stochastic: round up with probability equal to the fractional part.
        generator: source of randomness for stochastic rounding (default: the device's).

    Returns:
        ``(q, scales)``: int8 tensor of x's shape and Tensor[ceil(n / chunk)] float32.

    Example::

        >>> q, scales = gradsieve.quantize_int8(torch.tensor([1.0, -0.5, 0.25, 0.0]), chunk=2)
        >>> q.tolist(), scales.mul(127).tolist()
        ([127, -64, 127, 0], [1.0, 0.25])
    """
    return torch.ops.gradsieve.quantize_int8(x, chunk, stochastic, generator)


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, chunk: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``q * scales[i // chunk]`` in ``dtype``.

    Args:
        q: int8 tensor of any shape.
        scales: Tensor[ceil(q.numel() / chunk)] float32.
        chunk: the chunk used to quantize.
        dtype: float32, float16 or bfloat16.

    Returns:
        Tensor of q's shape and ``dtype``.
    """
    return torch.ops.gradsieve.dequantize_int8(q, scales, chunk, dtype)


def sparse_accumulate_(
    out: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    chunk: int = 0,
    bad: Optional[torch.Tensor] = None,
) -> None:
    """Adds sparse payloads into a dense buffer: ``out.flatten()[indices[j]] += values[j]``.

    Duplicate indices add up (several workers choosing the same coordinate). With int8 ``values``,
    each is dequantized on the way as ``values[j] * scales[j // chunk]``. This is the decode step
    for the world's gathered payloads.

    An index outside ``[0, out.numel())`` (a corrupted or hostile payload) never writes anything.
    Without ``bad`` it is an error, raised before ``out`` is touched (on CUDA this reads one flag
    from the device). With ``bad`` (int32[P], zero-filled by the caller, P dividing M: the entries
    are P payloads of M / P entries each) the entry is skipped and sets ``bad[j // (M // P)] = 1``,
    on the tensors' device without a host synchronisation, on CPU and CUDA alike.

    Args:
        out: dense float32/float16/bfloat16 tensor, updated in place.
        indices: int32 or int64 tensor, M entries.
        values: M entries, float32/float16/bfloat16, or int8 with ``scales``.
        scales: Tensor[ceil(M / chunk)] float32, only with int8 values.
        chunk: the quantization chunk of int8 values.
        bad: optional int32[P] flags, one per payload, set where a payload had an index outside.

    Example::

        >>> out = torch.zeros(4)
        >>> gradsieve.sparse_accumulate_(out, torch.tensor([1, 3, 1]), torch.tensor([1.0, 2.0, 3.0]))
        >>> out.tolist()
        [0.0, 4.0, 0.0, 2.0]
        >>> bad = torch.zeros(2, dtype=torch.int32)  # two payloads of two entries
        >>> gradsieve.sparse_accumulate_(out, torch.tensor([0, 1, 9, 2]), torch.ones(4), bad=bad)
        >>> out.tolist(), bad.tolist()
        ([1.0, 5.0, 1.0, 2.0], [0, 1])
    """
    torch.ops.gradsieve.sparse_accumulate_(out, indices, values, scales, chunk, bad)


def adaptive_select(
    grad: torch.Tensor,
    average: torch.Tensor,
    momentum: torch.Tensor,
    residual: torch.Tensor,
    alpha: float,
    beta: float,
    q: float,
    compare_average: bool,
    error_feedback: bool,
    capacity: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the ``adaptive`` compressor on one segment, fused: moving average,
    percentile threshold, mask, momentum blend and the candidates to send. Inputs are not changed.

    Per entry, in float32, each product and sum rounded on its own (as the eager reference)::

        a     = residual + grad
        ma    = alpha * |a| + (1 - alpha) * average           -> average_out
        thr   = quantile_abs(ma, q)                           -> threshold (NaN if ma holds NaN)
        m     = a if (ma if compare_average else |a|) >= thr else 0
        Q     = beta * m + (1 - beta) * momentum
        residual_out = (a - m if error_feedback else 0) + Q / beta

    ``residual_out`` is what stays behind if no entry were sent; the caller subtracts
    ``sent / beta`` at the entries it sent (with error feedback, ``sent`` as decoded; without, the
    values themselves), so that ``sum(sent) + residual + (1 - beta) / beta * momentum`` equals the
    sum of the gradients. The candidates are the entries with ``Q != 0`` (``count`` of them; NaN
    counts as nonzero); when more than ``capacity`` are nonzero, the ``capacity`` largest ``|Q|``
    (the tie and NaN rules of :func:`topk_abs`). They come first in ascending index order, padded
    with index 0 and value 0.

    Args:
        grad: Tensor[...] of float32/float16/bfloat16, read as flattened.
        average, momentum, residual: float32 with grad's number of elements.
        alpha: weight of the new magnitude in the moving average, in ``[0, 1]``.
        beta: weight of the masked gradient in the blend, in ``(0, 1]``.
        q: quantile of the threshold (``1 - density``), in ``[0, 1]``.
        compare_average: compare the moving average with the threshold (else ``|a|``).
        error_feedback: keep ``a - m`` in ``residual_out``.
        capacity: size of ``values``/``indices``, in ``[0, grad.numel()]``.

    Returns:
        ``(average_out, residual_out, values, indices, count, threshold)``: float32[n],
        float32[n], float32[capacity], int64[capacity], 0-d int64, 0-d float32.

    Example::

        >>> out = gradsieve.adaptive_select(torch.tensor([4.0, -1.0, 0.5, 2.0]), torch.zeros(4),
        ...                                 torch.zeros(4), torch.zeros(4), alpha=1.0, beta=1.0,
        ...                                 q=0.5, compare_average=False, error_feedback=True,
        ...                                 capacity=4)
        >>> out[2].tolist(), out[3].tolist(), int(out[4]), float(out[5])
        ([4.0, -1.0, 2.0, 0.0], [0, 1, 3, 0], 3, 1.0)
    """
    return torch.ops.gradsieve.adaptive_select(
        grad, average, momentum, residual, float(alpha), float(beta), float(q),
        bool(compare_average), bool(error_feedback), int(capacity))


def csr16_indices(counts: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor,
                  numel: int) -> torch.Tensor:
    """Bucket positions of csr16-encoded entries (the decode half of the ``csr16`` wire index).

    The bucket is cut into blocks of 65536 entries. Rank ``w`` lists its entries in block order:
    ``counts[w, b]`` of them in block ``b``, each as a 16-bit offset in its block (``offsets``,
    int16 holding the unsigned bits); only its first ``valid[w]`` slots carry entries.

    Args:
        counts: int32[world, ceil(numel / 65536)].
        offsets: int16[world, slots].
        valid: int32[world].
        numel: the bucket's size.

    Returns:
        int64[world, slots]: ``block * 65536 + offset``, or -1 for a slot beyond ``valid``, beyond
        the sum of the counts, or at a position >= ``numel`` (a malformed payload never yields a
        position outside the bucket).

    Example::

        >>> gradsieve.csr16_indices(torch.tensor([[1, 1]], dtype=torch.int32),
        ...                         torch.tensor([[5, 2, 0]], dtype=torch.int16),
        ...                         torch.tensor([2], dtype=torch.int32), 70000).tolist()
        [[5, 65538, -1]]
    """
    return torch.ops.gradsieve.csr16_indices(counts, offsets, valid, int(numel))


def predictive_score(
    grad: torch.Tensor,
    residual: torch.Tensor,
    history: Sequence[torch.Tensor],
    newest: int,
    weights: torch.Tensor,
    hidden: int,
    product: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The score of the ``predictive`` compressor on one segment, fused: error-feedback
    accumulator, its mean magnitude, per-entry features and a small MLP. Inputs are not changed.

    With ``H = len(history)`` and ``F = H + 2``, per entry ``i`` in float32::

        a     = residual + grad                                   -> accumulator
        s     = sum(|a|) / n   (1 when n == 0 or s == 0)          -> scale
        h_j   = history[(newest - j) % H]    (j = 0 is the newest, read as float32)
        x_0   = log1p(|a| / s)
        x_1   = log1p(|grad| / s)
        x_2+j = sgn(a) * sgn(h_j) * log1p(|h_j| / s)              (sgn(0) = 0)
        z_u   = max(0, b1[u] + sum_f W1[u, f] * x_f)              (u < hidden)
        logit = b2 + sum_u w2[u] * z_u
        score = sigmoid(logit) * |a| if product else softplus(logit)   -> score

    with ``weights`` laid out as ``W1`` (``[hidden, F]``, row-major) at 0, ``b1`` at ``hidden * F``,
    ``w2`` at ``hidden * F + hidden`` and ``b2`` at ``hidden * F + 2 * hidden``. The score is
    ``>= 0``, so :func:`topk_abs` of it selects the entries to send. ``softplus`` is
    ``logit`` above 20, else ``log1p(exp(logit))``. The sum behind ``s`` is taken in float64 on the
    CPU (fixed chunks, added in order) and in float64 block partials on CUDA: deterministic on
    both. Every other operation is float32, each product and sum rounded on its own in the order
    above; CPU and CUDA agree up to the last bits of ``log1p`` and ``exp``. A NaN or infinite
    gradient gives NaN or infinite scores (and scale), never an error: the caller drops such steps.

    Cost: two passes over the segment (grad and residual for ``s``; grad, residual and the history
    for the rest), no host synchronisation.

    Args:
        grad: Tensor[N] float32.
        residual: Tensor[N] float32, the error-feedback memory.
        history: 1 to 16 Tensor[N], all float32 or all bfloat16: a ring of previous gradients.
        newest: position of the newest entry of the ring, in ``[0, H)``.
        weights: Tensor[hidden * (H + 4) + 1] float32, the scorer's parameters (layout above).
        hidden: hidden units of the scorer, in ``[1, 64]``.
        product: score ``sigmoid(logit) * |a|`` (a learned gate on the magnitude) instead of
            ``softplus(logit)``.

    Returns:
        ``(accumulator, score, scale)``: Tensor[N] float32 (``a``), Tensor[N] float32, and a 0-d
        float32 tensor holding ``s`` as used, all on grad's device.

    Example::

        >>> H, hidden = 2, 1
        >>> weights = torch.zeros(hidden * (H + 4) + 1)
        >>> weights[0] = 1.0                            # W1[0, 0]: z = x_0 = log1p(|a| / s)
        >>> weights[hidden * (H + 2) + hidden] = 1.0    # w2[0]: logit = z, score = sigmoid(z) |a|
        >>> acc, score, scale = gradsieve.ops.predictive_score(
        ...     torch.tensor([1.0, -2.0, 0.0]), torch.zeros(3), [torch.zeros(3)] * H, 0,
        ...     weights, hidden, product=True)
        >>> float(scale), [round(v, 4) for v in score.tolist()]
        (1.0, [0.6667, 1.5, 0.0])
    """
    return torch.ops.gradsieve.predictive_score(
        grad, residual, list(history), int(newest), weights, int(hidden), bool(product))


def influence_update(
    grad: torch.Tensor,
    residual: torch.Tensor,
    score: torch.Tensor,
    hessian: Optional[torch.Tensor],
    eps: float,
    rho: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The second-order influence of each weight (``granular``) folded into a running score, fused
    with the error-feedback accumulator. Inputs are not changed.

    Per entry ``i``, in float32, in exactly this order, each product and sum rounded on its own
    (no fused multiply-add, on CPU and CUDA alike, so the two agree bit for bit)::

        a         = residual + grad                        -> acc
        t         = |a| * eps
        u         = 0.5 * |hessian|                        (hessian None: u = 0, influence = t)
        u         = u * eps
        u         = u * eps
        influence = t + u
        s         = rho * score
        w         = (1 - rho) * influence
        score_out = s + w                                  -> score_out

    ``eps``, ``rho`` and ``1 - rho`` (computed in float64) are each rounded once to float32;
    ``grad`` is read as float32 (exact for float16 and bfloat16). ``influence`` is
    :func:`gradsieve.influence.influence` of the accumulator: ``|a| eps + 0.5 |h| eps^2``. A NaN
    or infinite gradient gives NaN or infinite outputs at its entries, never an error. Cost: one
    pass over the segment, no host synchronisation.

    Args:
        grad: Tensor[N] of float32/float16/bfloat16 (1-D; any strides).
        residual: Tensor[N] float32, the error-feedback memory.
        score: Tensor[N] float32, the running score of the previous step.
        hessian: Tensor[N] float32, an estimate of the Hessian's diagonal
            (:func:`gradsieve.influence.hessian_diagonal`), or None for first-order influence.
        eps: the perturbation size, a finite number > 0.
        rho: weight of the previous score, in ``[0, 1)``.

    Returns:
        ``(acc, score_out)``: Tensor[N] float32 each (new tensors), on grad's device.

    Example::

        >>> acc, score = gradsieve.influence_update(
        ...     torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]), torch.tensor([4.0, 0.0]),
        ...     torch.tensor([2.0, -8.0]), eps=0.5, rho=0.5)
        >>> acc.tolist(), score.tolist()
        ([1.5, -2.0], [2.5, 1.0])
    """
    return torch.ops.gradsieve.influence_update(grad, residual, score, hessian, float(eps),
                                                float(rho))


def segment_mean(x: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """The mean of each consecutive segment of ``x``: ``x[0:numels[0]]``, the next ``numels[1]``
    entries, and so on (for example the parameters of a flattened bucket).

    Each segment is summed in float64 and divided by its length in float64, then rounded once to
    float32; an empty segment's mean is 0. The CPU sums fixed chunks of 65536 entries (in order,
    so the result does not depend on the number of threads), CUDA one block per segment (a
    deterministic block reduction): the two agree to 1 ulp. NaN or inf entries give a NaN or
    infinite mean for their segment. Cost: one pass over ``x``; on CUDA the segment boundaries go
    to the device in a pinned-memory copy on the current stream, with no host synchronisation.

    Args:
        x: Tensor[N] float32 (1-D; any strides).
        numels: the segments' lengths, each ``>= 0``, summing to ``N`` (empty only when ``x`` is).

    Returns:
        Tensor[len(numels)] float32 on x's device.

    Example::

        >>> gradsieve.segment_mean(torch.tensor([1.0, 2.0, 3.0, -4.0, 5.0]), [2, 0, 3]).tolist()
        [1.5, 0.0, 1.3333333730697632]
    """
    return torch.ops.gradsieve.segment_mean(x, [int(v) for v in numels])


def decode_average_(
    out: torch.Tensor,
    gathered: torch.Tensor,
    slots: int,
    values: str,
    chunk: int,
    index: str,
    checksum: bool,
    divisor: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decodes the world's gathered payloads into their average, in one op: ``out`` (the bucket)
    becomes ``(sum over ranks of each payload's entries) / divisor``.

    The payload layout is :class:`gradsieve.wire.PayloadFormat`'s (header, int32 or csr16 indices,
    scales, values or codes); :meth:`~gradsieve.wire.PayloadFormat.decode_average` passes its fields.
    ``out`` is overwritten (it need not be zeroed). Whatever the bytes, nothing is written outside
    ``out`` and nothing raises: each payload's flags are those of
    :meth:`~gradsieve.wire.PayloadFormat.decode_sum` (a count outside [0, K], a finite flag other
    than 0 or 1, an index outside the bucket, malformed csr16 block counts, a non-finite scale or
    value under a header that says finite, a wrong checksum: not well formed), and the entries it
    adds are decode_sum's too. On CPU the result is bitwise ``out.zero_(); fmt.decode_sum(gathered,
    out); out.div_(divisor)`` (ranks in order, then a true division). On CUDA the entries are added
    with atomics, as by :func:`sparse_accumulate_`: the last bit of a sum of three or more entries
    at one position depends on scheduling. No host synchronisation; cost: one pass over the
    payloads (two with the checksum) and, on CUDA, three launches.

    Args:
        out: Tensor[numel] float32, contiguous: the bucket, overwritten.
        gathered: Tensor[world, nbytes] uint8, on out's device: every rank's payload.
        slots: K, the payload's capacity in entries.
        values: the value codec: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"int4"``,
            ``"int2"`` or ``"sign"``.
        chunk: values per scale for the scaled codecs, in ``[1, 2^20]`` (ignored otherwise).
        index: ``"int32"``, ``"csr16"`` (blocks of 65536 over ``out.numel()`` entries) or
            ``"local"`` (its layout a function of ``slots`` and ``out.numel()``).
        checksum: the header carries the payload's checksum (16 header bytes instead of 8).
        divisor: what the sum is divided by (the world size for an average), finite and > 0.

    Returns:
        ``(finite, well_formed)``: Tensor[world] bool each, on out's device.

    Example::

        >>> fmt = gradsieve.wire.PayloadFormat(2, numel=4)
        >>> a, _ = fmt.pack(torch.tensor(True), torch.tensor([0, 3]), torch.tensor([1.0, 2.0]))
        >>> b, _ = fmt.pack(torch.tensor(True), torch.tensor([3, 1]), torch.tensor([4.0, 5.0]))
        >>> out = torch.empty(4)
        >>> finite, well_formed = gradsieve.decode_average_(
        ...     out, torch.stack([a, b]), 2, "fp32", 256, "int32", False, 2.0)
        >>> out.tolist(), well_formed.tolist()
        ([0.5, 2.5, 0.0, 3.0], [True, True])
    """
    return torch.ops.gradsieve.decode_average_(out, gathered, int(slots), str(values), int(chunk), index,
                                               bool(checksum), float(divisor))


# ------------------------------------------------------------------------ fused compress-side ops
# (csrc/ops/registration_compress.cpp): the passes of a compressor's compress step, fused.

def pack_payload(
    finite: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    valid: Optional[torch.Tensor],
    wire: str,
    chunk: int,
    index: str,
    numel: int,
    checksum: bool = False,
    seed: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A whole sparse payload (:mod:`gradsieve.wire`'s layout) in one pass.

    Writes the header (finite flag; the number of slots that carry an entry: ``valid.sum()``, or
    K without ``valid``; with ``checksum`` a zeroed checksum field), the index section (int32
    positions; csr16 per-block counts of the valid entries then 16-bit offsets; or the local index:
    a descriptor, per-chunk counts and b-bit offsets, or a bitmap; padding slots as position 0 and
    value 0), the scales and the values or codes, bit for bit as
    :meth:`~gradsieve.wire.PayloadFormat.pack` does with ``ordered=True``: the entries must
    already be valid first in ascending position order (not checked: that would synchronise), or
    the index int32 with no ``valid``. int8 values are quantized exactly as :func:`quantize_int8`
    rounds, int4/int2/sign by the rules of :mod:`gradsieve.wire`, float16/bfloat16 exactly as
    ``Tensor.to``. Positions of valid entries must lie in ``[0, numel)`` for csr16 (one outside
    is not counted). The checksum itself is left to the caller. Cost: one pass over the K
    entries (CUDA: one kernel after a memset), no host synchronisation.

    Args:
        finite: bool tensor of one element, on the entries' device.
        indices: Tensor[K] int64 or int32, bucket positions.
        values: Tensor[K] float32, the values chosen.
        valid: optional Tensor[K] bool, the slots that carry an entry.
        wire: the value codec: ``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"int4"``,
            ``"int2"`` or ``"sign"``.
        chunk: entries per scale, in ``[1, 2^20]`` (read for the scaled codecs only).
        index: ``"int32"``, ``"csr16"`` or ``"local"``.
        numel: the bucket's size (csr16 and local need it).
        checksum: the header has the 8-byte checksum field (zeroed here).
        seed: None: the integer codecs round to nearest (half to even). An int (its 64 bits taken
            as unsigned): stochastic rounding, slot j's code ``floor(x / scale + u)`` with ``u`` in
            [0, 1) drawn from (seed, j, the bits of x) by a counter-based generator, the same on
            every backend (:func:`gradsieve.wire.rounding_draws`); only for int8, int4 and int2.

    Returns:
        ``(payload, sent)``: Tensor[nbytes] uint8 and Tensor[K] float32, the values as a receiver
        decodes them (0 at padding slots: nothing is sent for them).

    Example::

        >>> payload, sent = gradsieve.ops.pack_payload(
        ...     torch.tensor(True), torch.tensor([2, 7]), torch.tensor([0.5, -1.0]), None,
        ...     "fp16", 1, "int32", 10)
        >>> payload[:8].view(torch.int32).tolist(), payload[8:16].view(torch.int32).tolist()
        ([1, 2], [2, 7])
    """
    return torch.ops.gradsieve.pack_payload(finite, indices, values, valid, str(wire), int(chunk),
                                            str(index), int(numel), bool(checksum),
                                            None if seed is None else int(seed))


def ef21_topk(grad: torch.Tensor, estimate: torch.Tensor,
              k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EF21's selection (arXiv 2106.05203): the top-k of the change ``grad - estimate``.

    Exactly ``topk_abs(grad - estimate, k)`` (float32 difference, the tie and NaN rules of
    :func:`topk_abs`) without the difference's buffer on the CPU, with the finiteness of ``grad``
    from the same pass. Inputs are not changed.

    Args:
        grad: Tensor[...] of float32/float16/bfloat16.
        estimate: Tensor[...] float32 with grad's number of elements.
        k: how many entries, ``0 <= k <= grad.numel()``.

    Returns:
        ``(values, indices, finite)``: Tensor[k] float32 (the change there), Tensor[k] int64
        ascending, and a 0-d bool tensor, True when every entry of ``grad`` is finite.

    Example::

        >>> v, i, f = gradsieve.ops.ef21_topk(torch.tensor([1.0, 5.0, 2.0]), torch.tensor([0.0, 4.5, -1.0]), 1)
        >>> i.tolist(), v.tolist(), bool(f)
        ([2], [3.0], True)
    """
    return torch.ops.gradsieve.ef21_topk(grad, estimate, k)


def ef21_commit(estimate: torch.Tensor, indices: torch.Tensor, change: torch.Tensor,
                global_estimate: torch.Tensor,
                average: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EF21's commit in one pass: the worker's and the global estimates move. Inputs are not
    changed.

    ``estimate_out = estimate.index_add(0, indices, change)`` (each position in ``[0, n)``; one
    outside is skipped), ``global_out = global_estimate + average`` and ``result``, a copy of
    ``global_out`` of its own (what the optimizer receives), bit for bit as those torch calls.

    Args:
        estimate, global_estimate, average: Tensor[n] float32.
        indices: Tensor[K] int64 or int32, the positions sent.
        change: Tensor[K] float32, the change sent there (as the wire rounded it).

    Returns:
        ``(estimate_out, global_out, result)``: three new Tensor[n] float32.

    Example::

        >>> e, g, r = gradsieve.ops.ef21_commit(torch.zeros(3), torch.tensor([1]), torch.tensor([2.0]),
        ...                                     torch.ones(3), torch.tensor([0.5, 0.5, 0.5]))
        >>> e.tolist(), g.tolist()
        ([0.0, 2.0, 0.0], [1.5, 1.5, 1.5])
    """
    return torch.ops.gradsieve.ef21_commit(estimate, indices, change, global_estimate, average)


def dgc_accumulate(
    grad: torch.Tensor,
    momentum_u: torch.Tensor,
    velocity_v: torch.Tensor,
    momentum: float,
    grad_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DGC's momentum correction (arXiv 1712.01887) in one pass. Inputs are not changed.

    Per entry, in float32, each product and sum rounded on its own (as the eager
    ``momentum_u * momentum + grad * grad_scale``, then ``velocity_v + u``)::

        g = grad * grad_scale            (grad_scale None: g = grad)
        u = momentum_u * momentum + g    -> u
        v = velocity_v + u               -> v

    Args:
        grad: Tensor[...] of float32/float16/bfloat16 (read as float32).
        momentum_u, velocity_v: Tensor[...] float32 with grad's number of elements.
        momentum: the momentum factor, finite (rounded once to float32).
        grad_scale: optional 0-d float32 tensor on grad's device (local clipping's factor).

    Returns:
        ``(u, v, finite)``: new float32 tensors of momentum_u's and velocity_v's shapes, and a 0-d
        bool tensor, True when every entry of ``grad`` is finite.

    Example::

        >>> u, v, f = gradsieve.ops.dgc_accumulate(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0]),
        ...                                        torch.tensor([0.5, 0.5]), 0.5)
        >>> u.tolist(), v.tolist()
        ([2.0, 2.0], [2.5, 2.5])
    """
    return torch.ops.gradsieve.dgc_accumulate(grad, momentum_u, velocity_v, float(momentum),
                                              grad_scale)


def dgc_mask_(momentum_u: torch.Tensor, velocity_v: torch.Tensor, indices: torch.Tensor,
              valid: Optional[torch.Tensor] = None) -> None:
    """DGC's momentum factor masking, in place: ``x[i] = x[i] * 0.0`` for both tensors at every
    position ``i = indices[j]`` whose slot carries an entry (``valid[j]``, default all).

    The product, not a fill: a negative entry becomes -0.0 and a non-finite one NaN, as the
    product with a 0/1 mask gives. A position outside ``[0, n)`` is skipped. Cost: K scattered
    writes, no pass over the tensors.

    Args:
        momentum_u, velocity_v: Tensor[...] float32 of n elements each (not overlapping).
        indices: Tensor[K] int64 or int32.
        valid: optional Tensor[K] bool.

    Example::

        >>> u, v = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
        >>> gradsieve.ops.dgc_mask_(u, v, torch.tensor([1, 0]), torch.tensor([True, False]))
        >>> u.tolist(), v.tolist()
        ([1.0, -0.0, 3.0], [4.0, 0.0, 6.0])
    """
    torch.ops.gradsieve.dgc_mask_(momentum_u, velocity_v, indices, valid)

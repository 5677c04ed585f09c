"""What every compressor is: a selection rule, the memory it keeps, and a codec for the wire.

A compressor knows no collective and no DDP. The same object runs in the DDP hook
(:mod:`gradsieve.hook`), in the N-worker :class:`~gradsieve.simulator.Simulator` and in direct
calls, in three steps:

1. ``compress(grad, memory, layout, step)`` on each worker: a flat float32 gradient and that
   worker's memory for the bucket in; a :class:`Compressed` out: the packed payload
   (:mod:`gradsieve.wire`), the *pending* memory and this step's scratch. Memory is never changed
   here, so a step can be dropped whole.
2. ``aggregate(gathered, layout, step)``: what the exchange gathered (every worker's payload,
   uint8[world, nbytes]) in; an :class:`Aggregated` out: their average and, per worker, whether its
   gradient was finite and its payload well formed. Pure: every rank computes the same numbers.
3. ``commit(memory, compressed, average, layout)`` on each worker, only when every worker's
   payload was usable: the pending memory becomes the memory, and the result is what the
   optimizer receives (the average, or for EF21 the updated global estimate).

How the hook, speculative training and the harness must treat a compressor is declared once per
class in its :class:`Traits`; what it hears from outside its buckets comes as
:mod:`gradsieve.signals` through :meth:`Compressor.observe`. Dense compressors (``none``, ``fp16``,
``bf16``) skip the three steps: the hook all-reduces them.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import (Any, Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Tuple,
                    Type)

import torch

from gradsieve.memory import BucketMemory
from gradsieve.options import Option, resolve
from gradsieve.signals import Signal
from gradsieve.wire import CODECS, INDEX_FORMATS, VALUE_CODECS, PayloadFormat


@dataclasses.dataclass(frozen=True)
class Traits:
    """How a compressor must be treated, declared once per class (``traits = Traits(...)``;
    a subclass changes what differs with ``dataclasses.replace(Parent.traits, ...)``).

    Attributes:
        dense: the hook all-reduces the bucket (no payload, no memory).
        allreduce_dtype: dense only: the dtype to all-reduce in (None: the bucket's own).
        returns_average: ``commit`` returns the average of the decoded payloads (EF21 returns a
            running estimate). Speculative training needs it.
        commit_needs_average: ``commit`` reads the average (regtopk's distortion, predictive's
            labels, ef21's estimate), so the memory can only be committed once the exchange has
            ended. False: ``commit`` uses only what ``compress`` produced, and speculative training
            may commit before the exchange ends (and roll back when the step is skipped).
        rollback_safe: ``commit`` changes nothing but the bucket memory's tensors, and replaces
            them rather than writing into them, so the hook can undo it by putting the old tensors
            back (when a later bucket of the same step is skipped). False (predictive, whose
            commit also trains its predictors): such a commit stands.
        ascending: sparse compressors: ``select`` returns every segment's entries in ascending
            index order, with a segment's padding (marked by the scratch ``"valid"``) after its
            entries, so the wire need not sort them.
        signals: the :mod:`gradsieve.signals` types :meth:`Compressor.observe` wants; no other
            signal reaches it.
        probes: it scores entries with curvature that ``CompressionState.probe`` measures
            (:meth:`Compressor.probe_plan` says when and how).
        counters: names of the per-bucket counters ``commit`` keeps in ``memory.counters``;
            ``state.stats()`` sums them over buckets.
        reports: ``stats()`` keys a training harness records at each evaluation, and the name it
            records each under; a key that is also a counter is recorded per compressed step too
            (as ``<name>_per_step``).
    """

    dense: bool = False
    allreduce_dtype: Optional[torch.dtype] = None
    returns_average: bool = True
    commit_needs_average: bool = False
    rollback_safe: bool = True
    ascending: bool = True
    signals: FrozenSet[Type[Signal]] = frozenset()
    probes: bool = False
    counters: Tuple[str, ...] = ()
    reports: Tuple[Tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class BucketLayout:
    """What a compressor may know about one bucket."""

    numel: int
    param_numels: Tuple[int, ...]
    param_ndims: Tuple[int, ...]
    world_size: int
    index: int = 0
    # Stable identities of the parameters (the hook's parameter keys; positions in the simulator).
    # Bucket order can change (DDP rebuilds buckets), so anything that must not depend on it,
    # such as DGC's random sample, works in key order.
    param_keys: Tuple[int, ...] = ()

    @property
    def keys(self) -> Tuple[int, ...]:
        return self.param_keys or tuple(range(len(self.param_numels)))

    def param_offsets(self) -> Tuple[int, ...]:
        offsets, total = [], 0
        for numel in self.param_numels:
            offsets.append(total)
            total += numel
        return tuple(offsets)

    @staticmethod
    def flat(numel: int, world_size: int, param_sizes: Optional[Sequence[int]] = None) -> "BucketLayout":
        sizes = tuple(param_sizes) if param_sizes else (numel,)
        if sum(sizes) != numel:
            raise ValueError(f"param_sizes must add up to the gradient size {numel}, got {sum(sizes)}")
        return BucketLayout(numel, sizes, tuple(2 for _ in sizes), world_size)


def piece_key(key: int, start: int) -> int:
    """The key of the piece of parameter ``key`` that begins at its entry ``start`` (a bucket
    layout may hold part of a parameter: the hierarchical exchange's shards). Negative, so that it
    never equals a parameter's own key, which is >= 0; :func:`piece_of` inverts it."""
    return -1 - ((key << 32) | start)


def piece_of(key: int) -> Tuple[int, int]:
    """(parameter key, first entry) of a layout key: the parameter itself (entry 0) for a
    parameter's own key, or what :func:`piece_key` made the piece's key from."""
    if key >= 0:
        return key, 0
    packed = -1 - key
    return packed >> 32, packed & 0xFFFFFFFF


def entries_for(fraction: float, numel: int) -> int:
    """``ceil(fraction * numel)`` of the decimal number the user wrote, capped at ``numel``.

    The float product rounds: ``0.55 * 100`` is 55.00000000000001 and ``math.ceil`` makes it 56.
    Here the fraction is read back from its shortest decimal form (``repr``: "0.55" -> 55/100),
    so density 0.55 of 100 entries is 55 and 0.07 of 100 is 7, exactly.

    Example::

        >>> entries_for(0.55, 100), entries_for(0.07, 100), entries_for(0.001, 1500)
        (55, 7, 2)
    """
    if numel <= 0:
        return 0
    exact = Fraction(repr(float(fraction))) * numel
    return min(numel, max(0, math.ceil(exact)))


class Segment(NamedTuple):
    offset: int
    numel: int
    k: int


class Compressed(NamedTuple):
    """One worker's compression of one bucket."""

    payload: torch.Tensor  # uint8[nbytes]
    pending: Dict[str, torch.Tensor]  # the memory to commit: per-entry names, else bucket-level
    scratch: Dict[str, Any]  # what commit (or the wire) needs of this step only


class Aggregated(NamedTuple):
    """The exchange's result for one bucket, as every rank decodes it alike."""

    average: torch.Tensor  # float32[numel]
    finite: torch.Tensor  # bool[world]: the worker's gradient was finite
    well_formed: torch.Tensor  # bool[world]: the worker's payload decoded cleanly

    @property
    def usable(self) -> torch.Tensor:
        """bool[world]: the worker's payload may be applied (finite and well formed)."""
        return self.finite & self.well_formed


class Selection(NamedTuple):
    """What a sparse compressor's ``select`` chose: bucket indices (int64[K]), their values
    (float32[K]), the pending memory, and scratch (``"valid"``: bool[K], the slots that carry an
    entry, default all)."""

    indices: torch.Tensor
    values: torch.Tensor
    pending: Dict[str, torch.Tensor]
    scratch: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ProbePlan:
    """When and how ``CompressionState.probe`` measures curvature for a compressor: every
    ``every`` steps, ``probes`` Rademacher directions, perturbations of size ``eps``."""

    every: int
    probes: int
    eps: float


class Compressor:
    """Base class of all compressors. Subclasses declare ``OPTIONS``, ``traits`` and their memory,
    and implement the steps."""

    name: str = "?"
    traits: Traits = Traits()
    OPTIONS: Mapping[str, Option] = {}
    memory_names: Tuple[str, ...] = ()  # per-entry memory (float32 Tensor[bucket numel] each)
    memory_dtypes: Mapping[str, torch.dtype] = {}  # per-entry memory not in float32

    def __init__(self, **options: Any) -> None:
        self.options = resolve(f"compressor {self.name!r}", self.OPTIONS, options)
        for key, value in self.options.items():
            setattr(self, key, value)

    def config(self) -> Dict[str, Any]:
        """Everything that must agree across ranks."""
        return {"compressor": self.name, **self.options}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------------------ the steps
    def payload_format(self, layout: BucketLayout, step: int) -> PayloadFormat:
        raise NotImplementedError

    def compress(self, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout, step: int) -> Compressed:
        raise NotImplementedError

    def aggregate(self, gathered: torch.Tensor, layout: BucketLayout, step: int,
                  out: Optional[torch.Tensor] = None) -> Aggregated:
        """The average of the world's payloads (float32[numel]) and each worker's flags. ``out``:
        where to write the average (float32[numel], contiguous; e.g. the bucket itself, whose
        gradient ``compress`` has read), or None for a new tensor."""
        if out is None:
            out = torch.empty(layout.numel, dtype=torch.float32, device=gathered.device)
        finite, well_formed = self.payload_format(layout, step).decode_average(gathered, out, gathered.shape[0])
        return Aggregated(out, finite, well_formed)

    def own_update(self, compressed: Compressed, layout: BucketLayout, step: int) -> Aggregated:
        """This worker's own contribution to the sum the average is taken of, dense
        (float32[numel]): its payload decoded alone, the values as they went on the wire, with its
        flags (bool[1], read from the payload's header, no pass over the values). Pure.
        Speculative training applies it to the working weights before the exchange ends."""
        out = torch.empty(layout.numel, dtype=torch.float32, device=compressed.payload.device)
        finite, well_formed = self.payload_format(layout, step).decode_average(
            compressed.payload.unsqueeze(0), out, 1)
        return Aggregated(out, finite, well_formed)

    def commit(self, memory: BucketMemory, compressed: Compressed, average: torch.Tensor,
               layout: BucketLayout) -> torch.Tensor:
        for key, value in compressed.pending.items():
            if key in self.memory_names:
                memory.entries[key] = value
            else:
                memory.extra[key] = value
        return average

    def undelivered(self, memory: BucketMemory) -> Optional[torch.Tensor]:
        """The gradient mass this worker has taken in and not yet delivered (float32[numel]), such
        that over any run of committed steps ``sum(gradients) == sum(what its payloads carried) +
        undelivered(memory)`` (error feedback: nothing is lost, only delayed); None when the
        compressor keeps no such account (EF21, momentum corrections, no error feedback)."""
        return None

    # ------------------------------------------------------------------------------ run-time state
    def runtime(self) -> Dict[str, Any]:
        """Run-time state shared by a rank's buckets (not per entry), e.g. a density that follows
        the validation metric: what must agree across ranks at every step besides :meth:`config`
        (JSON-able). Saved with the hook's state; compared across ranks like the config."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name}: this compressor keeps no run-time state, got {sorted(state)}")

    def receive(self, signal: Signal) -> None:
        """Hands ``signal`` to :meth:`observe` when its type is in ``traits.signals``; other
        signals are dropped here (the hook's state and the Simulator send every signal here)."""
        if type(signal) in self.traits.signals:
            self.observe(signal)

    def observe(self, signal: Signal) -> None:
        """A signal of one of the types in ``traits.signals`` (no other reaches it)."""

    def probe_plan(self) -> Optional[ProbePlan]:
        """When and how curvature is measured for it (``traits.probes``); None: never."""
        return None

    def store_probe(self, params_memory: Dict[int, Dict[str, torch.Tensor]], key: int,
                    diagonal: torch.Tensor) -> None:
        """Keeps a parameter's measured Hessian diagonal (flat float32) in the per-parameter
        memory ``params_memory`` (``traits.probes``)."""
        raise NotImplementedError(f"{self.name} takes no curvature probes")

    def stats(self) -> Dict[str, Any]:
        """Counters for ``state.stats()`` beside the hook's own."""
        return {}


SPARSE_OPTIONS: Dict[str, Option] = {
    "density": Option(0.01, "fraction of entries sent per step, in (0, 1]",
                      check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]"),
    "scope": Option("bucket", "select over the whole bucket, or over each parameter on its own "
                    "(k_i = ceil(density * numel_i))", kind=str, choices=("bucket", "layer")),
    "compress_1d": Option(True, "compress 1-D parameters (biases, norms) too; False sends them dense",
                          kind=bool),
    "values": Option("fp32", "value encoding on the wire: fp32, fp16 or bf16 values, or codes with a "
                     "float32 scale per chunk: int8, int4, int2 (see rounding) or sign (1 bit, "
                     "the chunk's mean magnitude)", kind=str, choices=VALUE_CODECS),
    "chunk": Option(256, "entries per scale for int8, int4, int2 and sign values", kind=int,
                    check=lambda v: 1 <= v <= 1 << 20, allowed="an integer in [1, 2^20]"),
    "rounding": Option("nearest", "how int8, int4 and int2 values round: to the nearest code, or "
                       "stochastic (unbiased: up with the probability of the fraction), drawn from "
                       "rounding_seed, the step, the bucket, the slot and the value", kind=str,
                       choices=("nearest", "stochastic")),
    "rounding_seed": Option(0, "seed of stochastic rounding", kind=int,
                            check=lambda v: 0 <= v < 1 << 62, allowed="an integer in [0, 2^62)"),
    "index": Option("int32", "index encoding on the wire: int32 positions (4 bytes per entry), "
                    "csr16 (per-block counts and 16-bit offsets: 2 bytes per entry) or local "
                    "(chunks of 2^b positions, b chosen per bucket: the counts per chunk in unary "
                    "and b-bit offsets, about 8.6 bits per entry at density 0.01; or a bitmap "
                    "where denser)",
                    kind=str,
                    choices=INDEX_FORMATS),
    "checksum": Option(False, "put a checksum of each payload in its header (8 more bytes): a "
                       "payload changed on the way (a flipped bit) is caught and its step skipped",
                       kind=bool),
}


class SparseCompressor(Compressor):
    """Top-k style compressors: a fixed number of (index, value) pairs per bucket and worker.

    The bucket is cut into segments (the whole bucket; each parameter with ``scope="layer"``; the
    stretches between 1-D parameters, which go dense, with ``compress_1d=False``); each segment
    sends ``ceil(density * numel)`` entries. Subclasses implement :meth:`select`.

    Agreed indices: a compressor whose class sets ``agreed_indices = True`` can also send its
    values at an index set that every rank was given (:meth:`accumulate`, :meth:`compress_at`),
    for an exchange that all-reduces those values with no index bytes. Such a class implements
    ``_accumulate`` and ``_pending_at``. The attribute is not inherited: a subclass declares it in
    its own body, since a subclass that changes :meth:`select` (regtopk from topk) has a selection
    rule of its own, which an agreed index set would bypass.
    """

    OPTIONS = SPARSE_OPTIONS
    agreed_indices: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.agreed_indices = bool(cls.__dict__.get("agreed_indices", False))

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.get("rounding") == "stochastic" and self.values not in ("int8", "int4", "int2"):
            raise ValueError(f"compressor {self.name!r}: rounding='stochastic' needs values 'int8', "
                             f"'int4' or 'int2', got values={self.values!r}")

    def density_at(self, step: int) -> float:
        return self.density

    def rounding_seed_at(self, step: int, layout: BucketLayout) -> Optional[int]:
        """The seed of this step's and bucket's stochastic rounding (None: round to nearest): from
        ``rounding_seed``, the step and the bucket's first parameter key (a stable identity, as
        DGC's sample uses, so that the hook and the Simulator draw alike whatever DDP's bucket
        order)."""
        if self.options.get("rounding") != "stochastic":
            return None
        first_key = layout.keys[0] if layout.keys else 0
        mixed = (self.rounding_seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9
                 + (first_key + 1) * 0x94D049BB133111EB)
        return mixed % (1 << 63)

    def segments(self, layout: BucketLayout, step: int) -> List[Segment]:
        density = self.density_at(step)
        pieces: List[Tuple[int, int, bool]] = []  # (offset, numel, dense)
        offset = 0
        for numel, ndim in zip(layout.param_numels, layout.param_ndims):
            dense = ndim <= 1 and not self.compress_1d
            if pieces and self.scope == "bucket" and not dense and not pieces[-1][2]:
                start, size, _ = pieces[-1]
                pieces[-1] = (start, size + numel, False)
            else:
                pieces.append((offset, numel, dense))
            offset += numel
        return [Segment(o, n, n if dense else entries_for(density, n)) for o, n, dense in pieces]

    def payload_format(self, layout: BucketLayout, step: int) -> PayloadFormat:
        return self._format(sum(s.k for s in self.segments(layout, step)), layout.numel)

    def _format(self, k: int, numel: int) -> PayloadFormat:
        # A chunk larger than the payload is one chunk.
        return PayloadFormat(k, self.values, max(1, min(self.chunk, k)), self.index, numel, self.checksum)

    def select(self, grad: torch.Tensor, memory: BucketMemory, segments: List[Segment], layout: BucketLayout,
               step: int) -> Selection:
        """The entries to send: indices (int64[K], bucket coordinates), values (float32[K]), the
        pending memory, and scratch (``"valid"``: bool[K], the slots that carry an entry;
        ``"finite"``: optional, a bool tensor, every entry of ``grad`` finite, which saves
        :meth:`compress` a pass)."""
        raise NotImplementedError

    def absorb_rounding(self, selection: Selection, error: torch.Tensor) -> None:
        """Keeps the wire's rounding error (float32[K], chosen minus sent) in the selection's
        pending memory. Error-feedback compressors add it to their residual; others may ignore it."""

    def compress(self, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout, step: int) -> Compressed:
        segments = self.segments(layout, step)
        fmt = self._format(sum(s.k for s in segments), layout.numel)
        selection = self.select(grad, memory, segments, layout, step)
        # A select that read every entry may give the flag (scratch "finite"); else one more pass.
        finite = selection.scratch.get("finite")
        if finite is None:
            finite = torch.isfinite(grad).all()
        valid = selection.scratch.get("valid")
        ordered = self.traits.ascending and (len(segments) == 1 or valid is None)
        payload, sent = fmt.pack(finite, selection.indices, selection.values, valid, ordered,
                                 self.rounding_seed_at(step, layout))
        if self.values != "fp32":
            self.absorb_rounding(selection, selection.values - sent)
        selection.scratch["wire_values"] = sent  # the values as they went on the wire (float32[K])
        return Compressed(payload, selection.pending, selection.scratch)

    # ------------------------------------------------------------------------------ agreed indices
    def check_agreed_indices(self) -> None:
        """Raises ValueError unless :meth:`compress_at` can run with these options: the class sets
        ``agreed_indices`` and ``values`` is fp32, fp16 or bf16 (a sum of int8 codes quantized
        with each rank's own scales is not the sum of the values)."""
        self._require_agreed_indices()
        if self.values not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"compressor {self.name!r}: values must be fp32, fp16 or bf16 to send "
                             f"values at agreed indices, got {self.values!r} (a sum of codes "
                             f"quantized with each rank's own scales is not the sum of the values)")

    def _require_agreed_indices(self) -> None:
        if not self.agreed_indices:
            raise ValueError(f"compressor {self.name!r} cannot send its values at agreed indices "
                             f"(agreed_indices is False): it chooses its entries by a rule of its own")

    def accumulate(self, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout,
                   step: int) -> torch.Tensor:
        """What this worker would select its entries from this step, as :meth:`compress` computes
        it (the compressor's accumulator, for example ``residual + grad``). Pure: ``memory`` is
        not changed and the result is a new tensor.

        Args:
            grad: Tensor[layout.numel] (any shape and strides with that many entries) of float32,
                float16 or bfloat16; read as float32.
            memory: this worker's memory of the bucket.

        Returns:
            Tensor[layout.numel] float32.

        Example::

            >>> topk = gradsieve.get_compressor("topk", density=0.1)
            >>> acc = topk.accumulate(grad, memory, layout, step)
            >>> indices = gradsieve.topk_abs(acc, 10)[1]  # e.g. chosen by one rank, broadcast
        """
        self._require_agreed_indices()
        return self._accumulate(self._flat_grad("accumulate", grad, layout), memory, layout, step)

    def compress_at(self, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout, step: int,
                    indices: torch.Tensor, accumulated: Optional[torch.Tensor] = None) -> Compressed:
        """This worker's values at the agreed ``indices``, for an all-reduce of the values alone.

        The index set is given, so ``scope``, ``compress_1d``, ``density`` and any threshold or
        warm-up of the compressor's own selection decide nothing here (the caller chooses the set
        and its size, for example from :meth:`density_at`); ``index``, ``chunk`` and ``checksum``
        do not apply (no payload is packed). Memory is not changed: :meth:`commit` applies the
        pending memory as after :meth:`compress`. A non-finite gradient does not raise: the
        scratch flag ``"finite"`` says so (no host synchronisation).

        Args:
            grad: as for :meth:`accumulate`.
            memory: this worker's memory of the bucket.
            indices: Tensor[K] int64, ascending, distinct, in ``[0, layout.numel)``, the same on
                every rank (not checked: checking would synchronise with the host).
            accumulated: :meth:`accumulate` of the same inputs when the caller already has it;
                the result is the same with or without it.

        Returns:
            :class:`Compressed` whose ``payload`` is Tensor[K] in the wire dtype of ``values``
            (float32, float16 or bfloat16): ``accumulate(...)[indices]`` rounded to it, a tensor
            of its own (nothing in ``pending`` or ``scratch`` shares its storage, so an exchange
            may reduce into it in place). ``pending``: the memory :meth:`compress` would leave had
            it sent exactly these values. ``scratch``: what :meth:`commit` needs, with
            ``"indices"``, ``"wire_values"`` (the payload as float32[K]) and ``"finite"`` (bool
            Tensor[], every gradient entry finite).

        Raises:
            ValueError: the compressor has no agreed-index form, ``values="int8"``, or a tensor of
                the wrong size or dtype.

        Example::

            >>> compressed = topk.compress_at(grad, memory, layout, step, indices, accumulated=acc)
            >>> total = compressed.payload.float()  # all-reduced (summed) over the workers
            >>> average = torch.zeros(layout.numel).index_add_(0, indices, total / world)
            >>> topk.commit(memory, compressed, average, layout)
        """
        self.check_agreed_indices()
        flat = self._flat_grad("compress_at", grad, layout)
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
            got = f"{indices.dtype} of shape {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) \
                else type(indices).__name__
            raise ValueError(f"compress_at: indices must be a 1-D int64 tensor, got {got}")
        if accumulated is None:
            accumulated = self._accumulate(flat, memory, layout, step)
        elif accumulated.dtype != torch.float32 or accumulated.shape != (layout.numel,):
            raise ValueError(f"compress_at: accumulated must be float32 of shape ({layout.numel},), got "
                             f"{accumulated.dtype} of shape {tuple(accumulated.shape)}")
        chosen = accumulated[indices]
        dtype = CODECS[self.values].dtype
        payload = chosen.to(dtype, copy=True)
        sent = chosen if dtype == torch.float32 else payload.float()
        pending, scratch = self._pending_at(flat, memory, layout, step, indices, accumulated, chosen, sent)
        scratch.update(indices=indices, wire_values=sent, finite=torch.isfinite(grad).all())
        return Compressed(payload, pending, scratch)

    def _accumulate(self, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout,
                    step: int) -> torch.Tensor:
        """:meth:`accumulate` of a flat float32 ``grad`` (Tensor[numel]); a new tensor."""
        raise NotImplementedError(f"compressor {self.name!r} sets agreed_indices but does not "
                                  f"implement _accumulate")

    def _pending_at(self, grad: torch.Tensor, memory: BucketMemory, layout: BucketLayout, step: int,
                    indices: torch.Tensor, accumulated: torch.Tensor, chosen: torch.Tensor,
                    sent: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """The pending memory and the compressor's own scratch of :meth:`compress_at`, given the
        flat float32 ``grad``, ``accumulated`` (not to be changed), ``chosen`` (its values at
        ``indices``, float32[K]) and ``sent`` (those values as the wire rounds them)."""
        raise NotImplementedError(f"compressor {self.name!r} sets agreed_indices but does not "
                                  f"implement _pending_at")

    @staticmethod
    def _flat_grad(what: str, grad: torch.Tensor, layout: BucketLayout) -> torch.Tensor:
        if grad.numel() != layout.numel or grad.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{what}: grad must be float32, float16 or bfloat16 with {layout.numel} "
                             f"entries, got {grad.dtype} with {grad.numel()}")
        return grad.reshape(-1).to(torch.float32)


def per_segment(segments: List[Segment],
                pick: Callable[[int, slice, int], Tuple[torch.Tensor, torch.Tensor]]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs ``pick(number, piece, k) -> (values, indices)`` on every segment (``piece``: the
    segment's slice of the bucket, ``indices`` local to it) and returns all the selected entries
    as (bucket indices, values)."""
    parts_i, parts_v = [], []
    for number, seg in enumerate(segments):
        values, indices = pick(number, slice(seg.offset, seg.offset + seg.numel), seg.k)
        parts_i.append(indices + seg.offset if seg.offset else indices)
        parts_v.append(values)
    if len(parts_i) == 1:
        return parts_i[0], parts_v[0]
    return torch.cat(parts_i), torch.cat(parts_v)


def all_of(flags: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The AND of bool tensors (True when there are none), on the device."""
    if not flags:
        return torch.ones((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def ef_select(accumulator: torch.Tensor, grad: torch.Tensor, segments: List[Segment], ops_module,
              scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Error-feedback top-k over each segment: ``accumulator`` (float32, changed in place) +=
    scale * grad, the top-k of every segment is taken out. Returns bucket indices and values."""
    return per_segment(segments, lambda _, piece, k: ops_module.ef_topk_(
        accumulator[piece], grad[piece], k, scale))

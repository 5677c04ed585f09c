"""Speculative sparse training: communication of step t overlaps the computation of step t+1.

The speculative part of influence-scored sparse updates, built for DDP. Each rank keeps two
copies of the model:

* the *global* weights, the result of the averaged sparse updates. Every rank computes them from
  the same gathered payloads with the same optimizer state, so they are bit-identical on every
  rank; they are the model a run produces.
* the *working* weights, the model's own parameters, which the forward and backward passes use.
  Each step a rank applies its own filtered update (what its payload carries, as it went on the
  wire) to them at once, without waiting for the other ranks.

Timeline of step t (``revert_threshold > 0``)::

    backward t     the hook compresses each bucket, starts its all-gather and returns this
                   rank's own sent update at once (DDP does not wait for the exchange); after
                   the last bucket, step t-1's exchanges end (overlap_compress)
    step()   t     global weights += the average of step t-1; correction; then the working
                   weights take this rank's own update of step t
    forward  t+1   ... while step t's exchange is on the wire, and on through step t+1's
                   backward and compression

Correction: after each global update, every parameter tensor (a "layer") whose working weights
are further than ``revert_threshold`` from the global ones, in relative L2 norm
``||w - g|| / ||g||``, is reverted to the global weights, and its optimizer state to the global
optimizer's. Per layer, not the whole model: a model norm is dominated by the largest matrices and
would let small layers (biases, norms) drift far before anything is reverted. A layer within the
threshold keeps its speculative weights. So after every correction no layer is further than
``revert_threshold`` from the global weights (tested).

``revert_threshold=0`` allows no difference at all: the wrapper then does not speculate; step()
waits for this step's exchange, updates the global weights and copies them into the model. That
is the synchronous run, bit for bit (tested), at the synchronous speed. Warm-up steps (dense
all-reduce) are synchronous too: the working weights become the global weights.

The compressor's memory follows synchronous training. With ``overlap_compress`` (the default
where the compressor allows it, i.e. its commit does not read the average: granular, topk, dgc,
adaptive) each bucket's memory is committed when its payload is sent; if the step turns out
skipped on some rank, the memory is rolled back and the next step, already compressed from it,
is dropped as well (on every rank alike), which is what synchronous training holds with both
steps skipped. Without a skip the numbers are those of ``overlap_compress=False`` bit for bit
(tested), where each step's exchanges end, and the memory is committed, before the next step's
first bucket is compressed, which leaves the compression outside the overlap. Granular's auto
policy reads each step's observations one step later under ``overlap_compress`` (the same on
every rank, whenever exchanges happen to end).

Extra memory per rank: one copy of the weights (4 bytes per fp32 parameter) and one copy of the
optimizer's state (SGD: 4 more bytes with momentum, none without; Adam: 8 more bytes), plus one
step's payloads in flight (:meth:`SpeculativeOptimizer.stats` measures it); with
``overlap_compress`` one step of the compressor's memory held for the rollback (granular: 8
bytes per parameter; ``CompressionState.stats()["rollback_bytes"]``).

Not supported: loss scaling (``GradScaler``: the averaged update would stay scaled; bf16 autocast
needs no scaler), closures, compressors whose result is not the average of the payloads (ef21),
dense compressors (nothing to overlap: use the baselines).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Dict, Iterator, List, Optional

import torch

from gradsieve.inflight import Landed
from gradsieve.options import Option, resolve
from gradsieve.registry import compressor_class
from gradsieve.signals import ObservationLag
from gradsieve.state import CompressionState

__all__ = ["SpeculativeOptimizer", "WRAPPER_OPTIONS", "split_options", "supports"]

# gradsieve-train's --opt keys for the wrapper (the compressor never sees them).
WRAPPER_OPTIONS = {
    "speculative": Option(False, "speculative training (gradsieve.SpeculativeOptimizer): apply the own "
                          "update at once, let the exchange overlap the next step", kind=bool),
    "overlap_compress": Option("auto", "speculative: commit the compressor's memory when a payload is sent "
                               "(rolled back if the step is skipped) so the exchange also overlaps the next "
                               "step's compression; auto: when the compressor allows it",
                               choices=("auto", True, False)),
    "revert_threshold": Option(0.01, "speculative: relative L2 distance per layer beyond which the "
                               "working weights revert to the global ones (0: synchronous)",
                               check=lambda v: math.isfinite(v) and v >= 0, allowed="a finite number >= 0"),
}


def supports(compressor_cls) -> bool:
    """Whether speculative training works with this compressor class."""
    return not compressor_cls.traits.dense and compressor_cls.traits.returns_average


def split_options(name: str, options: Dict[str, Any]):
    """(compressor options, validated wrapper options or None when not speculative)."""
    own = {k: options[k] for k in options if k in WRAPPER_OPTIONS}
    rest = {k: v for k, v in options.items() if k not in WRAPPER_OPTIONS}
    if not own:
        return rest, None
    wrapper = resolve(f"{name} (speculative training)", WRAPPER_OPTIONS, own)
    if wrapper["overlap_compress"] is True and compressor_class(name).traits.commit_needs_average:
        raise ValueError(f"{name}: overlap_compress=true needs a compressor whose memory does not depend on "
                         "the average; use overlap_compress=auto or false")
    return rest, wrapper if wrapper["speculative"] else None


class SpeculativeOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer for speculative sparse training with :func:`gradsieve.compression_hook`.

    Args:
        optimizer: the optimizer of the model's parameters (the working weights), e.g.
            ``torch.optim.SGD`` (with or without momentum) or ``torch.optim.Adam``. A copy of it,
            with the same hyperparameters, updates the global weights; learning-rate schedulers
            on the wrapper reach both.
        state: the :class:`gradsieve.CompressionState` registered as the model's comm hook.
        revert_threshold: relative L2 distance per parameter tensor beyond which a layer's
            working weights are reverted to the global ones after each correction (>= 0; 0:
            synchronous, see the module's notes).
        speculative: False makes the wrapper a plain pass-through (synchronous sparse training).
        overlap_compress: commit the compressor's memory when a payload is sent, so that an
            exchange may run on through the next step's compression (see the module's notes).
            None (default): when the compressor allows it; True: required (an error for
            regtopk and predictive, whose commit reads the average); False: never.

    Use::

        state = gradsieve.CompressionState("granular", density=0.01)
        ddp.register_comm_hook(state, gradsieve.compression_hook)
        opt = gradsieve.SpeculativeOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), state)
        for x, y in data:
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            opt.step()
        with opt.global_weights():      # evaluate or save the model every rank agrees on
            evaluate(model)

    Checkpoints: save ``opt.state_dict()`` *before* ``state.state_dict()`` (it ends the exchanges
    in flight), together with the model's (working) weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, state: CompressionState,
                 revert_threshold: float = 0.01, speculative: bool = True,
                 overlap_compress: Optional[bool] = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"SpeculativeOptimizer: optimizer must be a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        if isinstance(optimizer, SpeculativeOptimizer):
            raise ValueError("SpeculativeOptimizer: the optimizer is already wrapped")
        if not isinstance(state, CompressionState):
            raise ValueError(f"SpeculativeOptimizer: state must be a gradsieve.CompressionState, got "
                             f"{type(state).__name__}")
        if (isinstance(revert_threshold, bool) or not isinstance(revert_threshold, (int, float))
                or not math.isfinite(revert_threshold) or revert_threshold < 0):
            raise ValueError(f"SpeculativeOptimizer: revert_threshold must be a finite number >= 0, got "
                             f"{revert_threshold!r}")
        if not isinstance(speculative, bool):
            raise ValueError(f"SpeculativeOptimizer: speculative must be True or False, got {speculative!r}")
        if overlap_compress is not None and not isinstance(overlap_compress, bool):
            raise ValueError(f"SpeculativeOptimizer: overlap_compress must be True, False or None, got "
                             f"{overlap_compress!r}")
        compressor = state.compressor
        traits = compressor.traits
        if speculative and traits.dense:
            raise ValueError(f"SpeculativeOptimizer: compressor {compressor.name!r} is dense (all-reduced, "
                             "nothing to speculate on); use a sparse compressor such as 'granular' or 'topk'")
        if speculative and not traits.returns_average:
            raise ValueError(f"SpeculativeOptimizer: compressor {compressor.name!r} does not return the "
                             "average of the payloads, which speculative training applies")
        if speculative and overlap_compress and traits.commit_needs_average:
            raise ValueError(f"SpeculativeOptimizer: overlap_compress=True needs a compressor whose memory "
                             f"does not depend on the average; {compressor.name!r}'s does (use "
                             "overlap_compress=None or False)")
        # Not Optimizer.__init__: the wrapper shares the inner optimizer's groups and state, so
        # schedulers, gradient clipping and zero_grad act on the working optimizer.
        self.optimizer = optimizer
        self.compression = state
        self.speculative = speculative
        self.revert_threshold = float(revert_threshold)
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self._params: List[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._global: List[torch.Tensor] = []
        self.global_optimizer: Optional[torch.optim.Optimizer] = None
        self._correct_due = False
        self._dense_at: Optional[int] = None
        self.counters = {"global_steps": 0, "global_skipped": 0, "corrections": 0, "layer_reverts": 0,
                         "layers_kept": 0, "own_skipped": 0}
        self.max_drift = 0.0  # largest relative distance kept after a correction, over the run
        self.last_drifts: List[float] = []  # per layer, after the last correction (0: reverted)
        # Committing early only matters when the exchange is left in flight (threshold > 0).
        self.overlap_compress = bool(speculative and self.revert_threshold > 0 and overlap_compress is not False
                                     and not traits.commit_needs_average)
        if speculative:
            state.speculative = self.revert_threshold
            state.overlap_compress = self.overlap_compress
            state.signal(ObservationLag(int(self.overlap_compress)))
            self._global = [p.detach().clone() for p in self._params]
            groups = [{**{k: v for k, v in group.items() if k != "params"},
                       "params": [self._global[self._index[id(p)]] for p in group["params"]]}
                      for group in optimizer.param_groups]
            self.global_optimizer = type(optimizer)(groups, **optimizer.defaults)
            for p in self._params:  # an optimizer that has stepped already: the same state
                if optimizer.state.get(p):
                    self.global_optimizer.state[self._global[self._index[id(p)]]] = _cloned(optimizer.state[p])

    # --------------------------------------------------------------------------- optimizer face
    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    def __repr__(self) -> str:
        return (f"SpeculativeOptimizer({self.optimizer!r}, revert_threshold={self.revert_threshold}, "
                f"speculative={self.speculative})")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        raise ValueError("SpeculativeOptimizer: add parameter groups to the optimizer before wrapping it")

    def step(self, closure=None):  # type: ignore[override]
        """Applies the averages that arrived to the global weights, corrects the working weights,
        then applies this rank's own update of this step to them (see the module's timeline)."""
        if closure is not None:
            raise ValueError("SpeculativeOptimizer.step: closures are not supported")
        if not self.speculative:
            return self.optimizer.step()
        state = self.compression
        if self.revert_threshold == 0:
            state.inflight.finish(state)  # synchronous: this step's exchange, now
        landed = state.inflight.take_landed()
        usable = state.inflight.take_own_ok()  # per bucket: this step's own update is finite
        current = state.step - 1  # the hook's step of the backward just done
        dense_now = self._dense_at == current or (current in landed and landed[current].dense)
        self._dense_at = None
        for at in sorted(landed):
            self._apply_global(landed[at])
        if dense_now or self.revert_threshold == 0:
            self._adopt_global()
            return None
        if self._correct_due:
            self._correct()
        if usable and not bool(torch.cat(usable).all()):
            # A non-finite own update (an overflow): the working weights stay; the exchange flags
            # it on every rank, so the global step is skipped too.
            self.counters["own_skipped"] += 1
            return None
        return self.optimizer.step()

    # --------------------------------------------------------------------------- global weights
    def synchronize(self) -> None:
        """Ends the exchanges in flight and applies them to the global weights (between steps).
        The correction still happens at the next step(), where it would have."""
        if not self.speculative:
            return
        self.compression.inflight.finish(self.compression)
        landed = self.compression.inflight.take_landed()
        for at in sorted(landed):
            if landed[at].dense:
                self._dense_at = at
            self._apply_global(landed[at])

    @contextlib.contextmanager
    def global_weights(self) -> Iterator[None]:
        """Within the block the model holds the global weights (identical on every rank):
        evaluate or export them there. The working weights come back afterwards."""
        if not self.speculative:
            yield
            return
        self.synchronize()
        saved = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for p, g in zip(self._params, self._global):
                p.copy_(g)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._params, saved):
                    p.copy_(s)

    def global_parameters(self) -> List[torch.Tensor]:
        """The global weights, in the order of the optimizer's parameters (read-only use)."""
        return list(self._global) if self.speculative else [p.detach() for p in self._params]

    def _apply_global(self, landed: Landed) -> None:
        if any(average is None for _, average in landed.buckets):
            self.counters["global_skipped"] += 1  # non-finite or malformed on some rank: skipped
            return
        for params, average in landed.buckets:
            offset = 0
            for p in params:
                i = self._index.get(id(p))
                if i is None:
                    raise ValueError("SpeculativeOptimizer: the model has a parameter the wrapped "
                                     "optimizer does not update; give the optimizer all of them")
                g = self._global[i]
                g.grad = average[offset:offset + p.numel()].view_as(g).to(g.dtype)
                offset += p.numel()
        for mine, theirs in zip(self.global_optimizer.param_groups, self.optimizer.param_groups):
            for key, value in theirs.items():  # a scheduler changed the working lr: follow it
                if key != "params":
                    mine[key] = value
        self.global_optimizer.step()
        for g in self._global:
            g.grad = None
        self.counters["global_steps"] += 1
        self._correct_due = True

    def _adopt_global(self) -> None:
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(self._params, self._global)):
                p.copy_(g)
                self._copy_state(i)
        self._correct_due = False

    def _copy_state(self, i: int) -> None:
        p, g = self._params[i], self._global[i]
        theirs = self.global_optimizer.state.get(g)
        if theirs:
            self.optimizer.state[p] = _cloned(theirs)
        else:
            self.optimizer.state.pop(p, None)

    def _correct(self) -> None:
        """Reverts every layer further than ``revert_threshold`` from the global weights."""
        self._correct_due = False
        self.counters["corrections"] += 1
        if not self._params:
            return
        with torch.no_grad():
            diffs = torch.stack([torch.linalg.vector_norm(p.detach().float() - g.float())
                                 for p, g in zip(self._params, self._global)])
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in self._global])
            # A zero global layer: any difference is infinitely far.
            relative = torch.where(norms > 0, diffs / norms.clamp_min(1e-30),
                                   torch.where(diffs > 0, math.inf, 0.0)).tolist()
            drifts = []
            for i, distance in enumerate(relative):
                if not distance <= self.revert_threshold:  # NaN reverts too
                    self._params[i].copy_(self._global[i])
                    self._copy_state(i)
                    self.counters["layer_reverts"] += 1
                    drifts.append(0.0)
                else:
                    self.counters["layers_kept"] += 1
                    drifts.append(distance)
        self.last_drifts = drifts
        self.max_drift = max(self.max_drift, max(drifts))

    # --------------------------------------------------------------------------- statistics
    def memory_bytes(self) -> int:
        """Bytes of the extra memory this wrapper holds: the global weights and the global
        optimizer's state (measured from the tensors)."""
        total = sum(g.untyped_storage().nbytes() for g in self._global)
        if self.global_optimizer is not None:
            for per_param in self.global_optimizer.state.values():
                for value in per_param.values():
                    if isinstance(value, torch.Tensor):
                        total += value.untyped_storage().nbytes()
        return total

    def stats(self) -> Dict[str, Any]:
        """``global_steps`` (averages applied), ``global_skipped`` (steps skipped on every rank),
        ``corrections``, ``layer_reverts`` and ``layers_kept`` (per parameter tensor, summed over
        corrections), ``revert_rate`` (their ratio), ``max_drift`` (largest relative distance a
        layer kept), ``own_skipped`` (non-finite own updates), ``memory_bytes``, and the settings."""
        decided = self.counters["layer_reverts"] + self.counters["layers_kept"]
        return {**self.counters, "revert_rate": self.counters["layer_reverts"] / decided if decided else None,
                "max_drift": self.max_drift, "memory_bytes": self.memory_bytes(),
                "revert_threshold": self.revert_threshold, "speculative": self.speculative,
                "overlap_compress": self.overlap_compress}

    # --------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        """The working optimizer, the global weights and optimizer, and the correction state.
        Ends the exchanges in flight first (see :meth:`synchronize`): save it before the
        CompressionState's."""
        self.synchronize()
        out: Dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "speculative": self.speculative,
                               "revert_threshold": self.revert_threshold}
        if self.speculative:
            out.update(global_weights=[g.detach().clone() for g in self._global],
                       global_optimizer=self.global_optimizer.state_dict(),
                       correct_due=self._correct_due, dense_at=self._dense_at,
                       counters=dict(self.counters), max_drift=self.max_drift,
                       last_drifts=list(self.last_drifts))
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:  # type: ignore[override]
        for key in ("speculative", "revert_threshold"):
            if state_dict.get(key) != getattr(self, key):
                raise ValueError(f"SpeculativeOptimizer.load_state_dict: the checkpoint has {key}="
                                 f"{state_dict.get(key)!r}, this wrapper has {getattr(self, key)!r}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if not self.speculative:
            return
        weights = state_dict["global_weights"]
        if len(weights) != len(self._global) or any(w.shape != g.shape for w, g in zip(weights, self._global)):
            raise ValueError("SpeculativeOptimizer.load_state_dict: the checkpoint's global weights do "
                             "not match this optimizer's parameters")
        with torch.no_grad():
            for g, w in zip(self._global, weights):
                g.copy_(w)
        self.global_optimizer.load_state_dict(state_dict["global_optimizer"])
        self._correct_due = bool(state_dict["correct_due"])
        self._dense_at = state_dict["dense_at"]
        self.counters = dict(state_dict["counters"])
        self.max_drift = float(state_dict["max_drift"])
        self.last_drifts = list(state_dict["last_drifts"])


def _cloned(per_param: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in per_param.items()}

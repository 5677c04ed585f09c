"""Influence-scored sparse updates with a granularity that changes during training, built for
DDP: no server; every rank computes the same global update from the gathered payloads.

Per bucket and worker, every step::

    a      = residual + grad                          # what error feedback would send
    infl   = |a| * eps + 0.5 * |h| * eps^2            # second-order influence (h: Hessian diagonal)
    score  = rho * score + (1 - rho) * infl           # rolling influence per entry
    level  = weight | hybrid | layer                  # the granularity of this step (below)
    send what the level selects, within the byte budget; residual = a - sent

``h`` is estimated by :meth:`gradsieve.CompressionState.probe` (``gradsieve.influence``:
Hutchinson's estimator from measured +/-eps perturbations of the weights) every ``probe_every``
steps and kept per parameter; between probes the score runs on the new ``|a|`` and the last
``h``. Without probes (``probe_every=0``) the score is ``|a|`` alone, and ``weight`` is ``topk``.
The fused op :func:`gradsieve.ops.influence_update` computes ``a`` and the score in one pass;
:func:`gradsieve.ops.segment_mean` gives the per-parameter mean scores the coarse levels rank by;
the select is the radix select of :func:`gradsieve.ops.topk_abs` on the scores.

Levels (``granularity``). ``density`` is a budget in *bytes*: a payload may take ``density`` of
the bucket's dense fp32 bytes, headers included, whatever the level, so the levels are compared
at equal cost:

* ``weight``: the top entries by score, as (index, value) pairs: ``k`` is the most entries whose
  payload fits the budget (about ``4 * density / 5`` of the entries with int8 values and int32
  indices).
* ``layer``: whole parameter tensors, chosen by mean score (highest first, skipping any that no
  longer fits), sent dense with no index bytes: about ``4 * density`` of the entries with int8
  values. A parameter larger than the budget is never sent at this level (its entries wait in the
  residual), which is the price of having no indices.
* ``hybrid``: parameters taken by mean score until they hold ``hybrid_share`` of the bucket, then
  the top entries inside them (the same ``k`` as ``weight``).
* ``auto``: a policy picks the level of each step, the same on every rank (the level is in the
  configuration the hook verifies across ranks at every change, and in every payload's header).
  A bucket whose largest parameter does not fit the layer payload plays ``hybrid`` when the
  policy says ``layer`` (:meth:`GranularCompressor.bucket_level`).

Policies for ``auto`` (``policy``):

* ``rules``: the three originally proposed signals. Progress: the first third of ``horizon`` steps
  starts from ``layer``, the second from ``hybrid``, the rest from ``weight`` (``horizon=0``:
  unknown, start from ``hybrid``; ``gradsieve-train`` sets it to the run's steps). Confidence: one
  level finer when the loss trend is steady, measured as the spread of the last ``window`` training
  losses around their least-squares line, relative to their mean, below ``steady``. Resources: one
  level coarser when the step is communication-bound: the share of the step a rank spent waiting
  for its last bucket's exchange (the hook's own timings), averaged over ranks, above
  ``comm_bound``. At an equal byte budget, coarser means more values per byte (no indices), not
  fewer bytes.
* ``bandit``: a discounted UCB over the three levels (``ucb_c``, ``ucb_gamma``), rewarded by
  the decrease of the training loss (averaged over ranks) per payload byte after the step that
  played the level, normalised by a running mean of its magnitude.

What every rank knows alike: each payload starts with a 16-byte side header (level, the rank's
training loss of the step as given to ``report_loss``, its communication share), so after the
all-gather every rank holds every rank's loss and timing, without another collective; the policy
of step t reads those of step t - 1.

Memory per entry: ``residual`` and ``score`` (4 bytes each) and the Hessian diagonal ``hessian``
(4 bytes, per parameter, once probed).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from gradsieve import ops
from gradsieve.compressor import (SPARSE_OPTIONS, Aggregated, Compressed, Compressor, ProbePlan, Traits, entries_for,
                                  piece_of)
from gradsieve.options import Option
from gradsieve.signals import CommShare, Loss, ObservationLag
from gradsieve.registry import register_compressor
from gradsieve.wire import LayerFormat, PayloadFormat

LEVELS = ("layer", "hybrid", "weight")  # coarse to fine; a level's code is its position
SIDE_BYTES = 16
# Compressed steps after this instance's first one at which a missing training loss (auto) or
# curvature probe (probe_every > 0) is warned about: by then a loop that makes the calls has made
# them (report_loss before each backward, probe after each optimizer step).
CALLS_DUE_AFTER = 2


class DiscountedUCB:
    """UCB1 over ``arms`` with exponentially discounted counts and sums (``gamma`` per update), for
    rewards that drift as training goes on. Deterministic: the same rewards give the same choices
    on every rank. An arm never played is chosen first (lowest number first)."""

    def __init__(self, arms: int, c: float = 1.0, gamma: float = 0.98) -> None:
        self.arms, self.c, self.gamma = arms, c, gamma
        self.counts = [0.0] * arms
        self.sums = [0.0] * arms

    def choose(self) -> int:
        for arm, n in enumerate(self.counts):
            if n == 0.0:
                return arm
        total = sum(self.counts)
        best, best_index = 0, -math.inf
        for arm in range(self.arms):
            n = self.counts[arm]
            index = self.sums[arm] / n + self.c * math.sqrt(max(0.0, math.log(max(total, 1.0))) / n)
            if index > best_index:
                best, best_index = arm, index
        return best

    def update(self, arm: int, reward: float) -> None:
        self.counts = [n * self.gamma for n in self.counts]
        self.sums = [s * self.gamma for s in self.sums]
        self.counts[arm] += 1.0
        self.sums[arm] += reward

    def state_dict(self) -> Dict[str, Any]:
        return {"counts": list(self.counts), "sums": list(self.sums)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = [float(v) for v in state["counts"]]
        self.sums = [float(v) for v in state["sums"]]


def steadiness(losses: Sequence[float]) -> float:
    """Spread of ``losses`` around their least-squares line, relative to their mean magnitude:
    0 for a loss moving on a straight line (steady), larger the noisier it is."""
    n = len(losses)
    if n < 3:
        return math.inf
    xs = range(n)
    mx, my = (n - 1) / 2.0, sum(losses) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, losses)]
    spread = math.sqrt(sum(r * r for r in resid) / n)
    return spread / max(abs(my), 1e-12)


@register_compressor("granular")
class GranularCompressor(Compressor):
    """Influence-scored sparse updates: per-step granularity (weight / layer / hybrid / auto).

    Options: ``density`` (the byte budget, a fraction of the dense fp32 bytes), ``granularity``,
    ``policy`` (``rules`` or ``bandit``, for ``auto``), ``eps`` (perturbation size of the
    influence and of the probes), ``rho`` (weight of the old score in the rolling average),
    ``probe_every`` (steps between Hessian probes; 0: never, the score is then ``|a|``),
    ``probes`` (Rademacher directions per probe), ``hybrid_share``, ``horizon``, ``window``,
    ``steady``, ``comm_bound``, ``ucb_c``, ``ucb_gamma``; and ``values`` (default ``int8``),
    ``chunk``, ``index``, ``checksum`` as for ``topk``.

    Example::

        >>> sim = gradsieve.Simulator("granular", world_size=4, density=0.01, granularity="hybrid",
        ...                           param_sizes=[6000, 4000])
        >>> average = sim.step([torch.randn(10_000) for _ in range(4)])
    """

    OPTIONS = {
        "density": Option(0.01, "byte budget: the fraction of the bucket's dense fp32 bytes a "
                          "payload may take, headers included, in (0, 1]",
                          check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]"),
        "granularity": Option("weight", "what is selected: single entries (weight), whole "
                              "parameters sent dense (layer), entries inside the most influential "
                              "parameters (hybrid), or a policy's choice each step (auto)",
                              kind=str, choices=("weight", "layer", "hybrid", "auto")),
        "policy": Option("rules", "how auto picks the level: rules on progress, loss steadiness "
                         "and wait share (rules) or a discounted UCB bandit rewarded by loss "
                         "decrease per byte", kind=str,
                         choices=("rules", "bandit")),
        "values": Option("int8", SPARSE_OPTIONS["values"].doc, kind=str,
                         choices=SPARSE_OPTIONS["values"].choices),
        "chunk": SPARSE_OPTIONS["chunk"],
        "index": SPARSE_OPTIONS["index"],
        "checksum": SPARSE_OPTIONS["checksum"],
        "eps": Option(1e-3, "perturbation size: of the influence |a| eps + |h| eps^2 / 2 and of "
                      "the Hessian probes, > 0", check=lambda v: 0.0 < v < math.inf, allowed="> 0"),
        "rho": Option(0.0, "weight of the previous score in the rolling influence, in [0, 1)",
                      check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)"),
        "probe_every": Option(25, "steps between Hessian-diagonal probes (state.probe); 0: never "
                              "(the score is then |a| alone)", kind=int,
                              check=lambda v: v >= 0, allowed="an integer >= 0"),
        "probes": Option(1, "Rademacher directions per probe (2 gradient evaluations each)", kind=int,
                         check=lambda v: 1 <= v <= 1000, allowed="an integer in [1, 1000]"),
        "hybrid_share": Option(0.5, "hybrid: the share of the bucket's entries, in whole parameters "
                               "by mean influence, that the top entries are drawn from, in (0, 1]",
                               check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]"),
        "horizon": Option(0, "auto/rules: the run's length in compressed steps, for the progress "
                          "signal (0: unknown, progress is not used)", kind=int,
                          check=lambda v: v >= 0, allowed="an integer >= 0"),
        "window": Option(10, "auto/rules: training losses the steadiness is measured over", kind=int,
                         check=lambda v: 3 <= v <= 10_000, allowed="an integer in [3, 10000]"),
        "steady": Option(0.05, "auto/rules: a loss trend is steady when its spread around a line "
                         "is below this fraction of the loss", check=lambda v: v >= 0.0, allowed=">= 0"),
        "comm_bound": Option(0.5, "auto/rules: a step is communication-bound when ranks wait for "
                             "the exchange more than this share of it", check=lambda v: 0.0 <= v <= 1.0,
                             allowed="in [0, 1]"),
        "ucb_c": Option(1.0, "auto/bandit: exploration weight", check=lambda v: v >= 0.0, allowed=">= 0"),
        "ucb_gamma": Option(0.98, "auto/bandit: discount of past rewards per update, in (0, 1]",
                            check=lambda v: 0.0 < v <= 1.0, allowed="in (0, 1]"),
    }
    memory_names = ("residual", "score")
    traits = Traits(signals=frozenset({Loss, CommShare, ObservationLag}), probes=True,
                    reports=(("level_steps", "level_steps"),))
    # Steps by which the auto policy reads each step's observations late (see ObservationLag).
    observation_lag = 0

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._reset_policy()
        self._loss_local: Any = float("nan")  # this rank's loss of the step (report_loss)
        self._comm_local = float("nan")       # this rank's share of the last step spent waiting
        self._cache: Dict[Tuple[Any, ...], Any] = {}
        # Whether the per-step calls reached this instance (report_loss, a probe), the first step
        # it compressed, and whether their absence was checked (once).
        self._loss_seen = False
        self._probe_seen = False
        self._first_step: Optional[int] = None
        self._calls_checked = False

    def _reset_policy(self) -> None:
        self.bandit = DiscountedUCB(len(LEVELS), self.ucb_c, self.ucb_gamma)
        self.losses: List[float] = []        # mean training loss per observed step (last `window`)
        self.level_steps = [0] * len(LEVELS)  # steps played per level
        self.decided: Optional[Tuple[int, int]] = None  # (step, level code)
        self.played: Dict[int, int] = {}  # level code of the last few steps decided
        # Observations of steps not yet consumed by the policy: step -> (loss, comm, level, bytes),
        # tensors until consumed. "previous": the last consumed one, for the bandit's reward.
        self.observed: Dict[int, Tuple[Any, Any, int, int]] = {}
        self.previous: Optional[Tuple[int, float, int, int]] = None
        self.reward_scale = 0.0
        self.last_signals: Dict[str, Any] = {}

    # ------------------------------------------------------------------------------ signals
    def observe(self, signal) -> None:
        if isinstance(signal, Loss):
            # This rank's loss of the step being computed (a 0-d tensor is copied into the payload
            # without waiting for it).
            loss = signal.loss
            self._loss_local = loss.detach().reshape(()).float() if isinstance(loss, torch.Tensor) else float(loss)
            self._loss_seen = True
        elif isinstance(signal, CommShare):
            self._comm_local = float(signal.share)
        elif isinstance(signal, ObservationLag):
            self.observation_lag = int(signal.steps)

    # ------------------------------------------------------------------------------ sizes
    def budget_bytes(self, numel: int) -> int:
        return 4 * entries_for(self.density, numel)

    def weight_format(self, layout) -> PayloadFormat:
        """The largest (index, value) payload within the budget (at least one entry)."""
        key = ("weight", layout.numel)
        if key not in self._cache:
            budget = self.budget_bytes(layout.numel) - SIDE_BYTES

            def fmt(k: int) -> PayloadFormat:
                return PayloadFormat(k, self.values, max(1, min(self.chunk, k)), self.index,
                                     layout.numel, self.checksum)

            self._cache[key] = fmt(_largest(1, layout.numel, lambda k: fmt(k).nbytes <= budget))
        return self._cache[key]

    def layer_format(self, layout) -> LayerFormat:
        """The largest dense-values payload within the budget (possibly of capacity 0)."""
        key = ("layer", layout.param_numels)
        if key not in self._cache:
            budget = self.budget_bytes(layout.numel) - SIDE_BYTES

            def fmt(m: int) -> LayerFormat:
                return LayerFormat(tuple(layout.param_numels), m, self.values, max(1, min(self.chunk, m)),
                                   self.checksum)

            self._cache[key] = fmt(_largest(0, layout.numel, lambda m: fmt(m).nbytes <= budget))
        return self._cache[key]

    def bucket_level(self, level: str, layout) -> str:
        """The level a bucket plays when the step's level is ``level``. Under ``auto``, a bucket
        whose largest parameter does not fit the layer payload plays ``hybrid`` instead of
        ``layer``: at the layer level that parameter could never be sent, its residual would only
        grow, and the step that finally sends it would apply all of it at once, a jump that can
        make the loss non-finite (experiments/granular/RESULTS.md)."""
        if level == "layer" and self.granularity == "auto" and \
                max(layout.param_numels) > self.layer_format(layout).capacity:
            return "hybrid"
        return level

    def payload_bytes(self, layout, level: str) -> int:
        body = self.layer_format(layout) if level == "layer" else self.weight_format(layout)
        return SIDE_BYTES + body.nbytes

    # ------------------------------------------------------------------------------ policy
    def level_at(self, step: int) -> str:
        """The level of compressed step ``step`` (decided once, from what was observed before)."""
        if self.granularity != "auto":
            return self.granularity
        if step in self.played:  # decided already (a later step may have been decided since)
            return LEVELS[self.played[step]]
        self._consume(step)
        self.decided = (step, self._decide(step))
        self.level_steps[self.decided[1]] += 1
        # Speculative training may aggregate a step after the next one was compressed: keep the
        # levels of the steps not aggregated yet.
        self.played = {s: c for s, c in self.played.items() if s >= step - 2}
        self.played[step] = self.decided[1]
        return LEVELS[self.decided[1]]

    def _consume(self, step: int) -> None:
        for seen in sorted(s for s in self.observed if s < step - self.observation_lag):
            loss, comm, code, nbytes = self.observed.pop(seen)
            loss, comm = float(loss), float(comm)
            self.last_signals = {"step": seen, "loss": loss, "comm": comm}
            if math.isfinite(loss):
                self.losses = (self.losses + [loss])[-self.window:]
            if self.previous is not None and self.previous[0] == seen - 1 and math.isfinite(loss):
                _, before, played, sent = self.previous
                if math.isfinite(before):
                    per_byte = (before - loss) / max(sent, 1)
                    self.reward_scale = 0.9 * self.reward_scale + 0.1 * abs(per_byte) if self.reward_scale \
                        else abs(per_byte)
                    reward = per_byte / self.reward_scale if self.reward_scale > 0 else 0.0
                    self.bandit.update(played, max(-3.0, min(3.0, reward)))
            self.previous = (seen, loss, code, nbytes)

    def _decide(self, step: int) -> int:
        if self.policy == "bandit":
            return self.bandit.choose()
        if self.horizon > 0:
            progress = step / self.horizon
            base = 0 if progress < 1 / 3 else 1 if progress < 2 / 3 else 2
        else:
            base = 1
        steady = len(self.losses) >= self.window and steadiness(self.losses) < self.steady
        comm = self.last_signals.get("comm", float("nan"))
        bound = math.isfinite(comm) and comm > self.comm_bound
        self.last_signals.update(base=LEVELS[base], steady=steady, comm_bound=bound)
        finer = min(len(LEVELS) - 1, base + int(steady))
        return max(0, finer - int(bound))

    def runtime(self) -> Dict[str, Any]:
        if self.granularity != "auto":
            return {}
        return {"level": LEVELS[self.decided[1]] if self.decided else None}

    # ------------------------------------------------------------------------------ steps
    def _hessian(self, memory, layout, device) -> Optional[torch.Tensor]:
        # A piece of a parameter (the hierarchical exchange's shards) reads its part of the
        # parameter's measured diagonal.
        found = []
        for key, numel in zip(layout.keys, layout.param_numels):
            parent, start = piece_of(key)
            diagonal = memory.params.get(parent, {}).get("hessian")
            found.append(None if diagonal is None else diagonal.reshape(-1)[start:start + numel])
        if all(h is None for h in found) or len(layout.keys) != len(layout.param_numels):
            return None
        parts = [torch.zeros(n, device=device) if h is None else h.to(device, torch.float32)
                 for h, n in zip(found, layout.param_numels)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _check_calls(self, step: int, hessian: Optional[torch.Tensor]) -> None:
        """Warns once when, CALLS_DUE_AFTER compressed steps after the first one, what the options
        need has not arrived: the training loss for ``auto`` (CompressionState.report_loss), a
        curvature probe when ``probe_every > 0`` (CompressionState.probe). A resumed run has its
        probed diagonal back from the checkpoint (``hessian``)."""
        if self._first_step is None:
            self._first_step = step
        if self._calls_checked or step - self._first_step < CALLS_DUE_AFTER:
            return
        self._calls_checked = True
        missing = []
        if self.granularity == "auto" and not self._loss_seen:
            without = ("the bandit gets no reward and plays its first level, layer, every step"
                       if self.policy == "bandit" else
                       "the rules never see a steady loss and follow progress and wait share only")
            missing.append(f"granularity='auto' (policy {self.policy!r}) has received no training loss: call "
                           f"state.report_loss(loss) every step before loss.backward(); without it {without}")
        if self.probe_every and not self._probe_seen and hessian is None:
            missing.append(f"probe_every={self.probe_every} but no curvature probe has arrived: call "
                           "state.probe(model, loss_fn, batch) every step after optimizer.step() (in a "
                           "Simulator: compressor.store_probe), or set probe_every=0; without it the "
                           "influence score is |a| alone")
        if missing:
            warnings.warn(f"granular: after {step - self._first_step + 1} compressed steps, "
                          + "; and ".join(missing), UserWarning, stacklevel=2)

    def compress(self, grad, memory, layout, step) -> Compressed:
        level = self.bucket_level(self.level_at(step), layout)
        entries = memory.entries
        hessian = self._hessian(memory, layout, grad.device)
        self._check_calls(step, hessian)
        acc, score = ops.influence_update(grad, entries["residual"], entries["score"], hessian,
                                          self.eps, self.rho)
        finite = torch.isfinite(grad).all()
        residual = acc.clone()
        if level == "layer":
            fmt = self.layer_format(layout)
            chosen = self._fill_layers(score, layout, fmt.capacity)
            spans = [_span(layout, p) for p in chosen]
            values = torch.cat([acc[s] for s in spans]) if spans else acc[:0]
            body, sent = fmt.pack(finite, tuple(chosen), values)
            at = 0
            for s in spans:
                size = s.stop - s.start
                residual[s] -= sent[at:at + size]
                at += size
            indices = None
        else:
            fmt = self.weight_format(layout)
            k = fmt.entries
            if level == "hybrid":
                positions = self._hybrid_positions(score, layout, k)
                _, local = ops.topk_abs(score[positions], k)
                indices = positions[local]
            else:
                _, indices = ops.topk_abs(score, k)
            body, sent = fmt.pack(finite, indices, acc[indices])
            residual[indices] = acc[indices] - sent
        side = torch.zeros(SIDE_BYTES, dtype=torch.uint8, device=grad.device)
        side[:4].view(torch.int32)[0] = LEVELS.index(level)
        floats = side[4:12].view(torch.float32)
        loss = self._loss_local
        floats[0] = loss.to(grad.device) if isinstance(loss, torch.Tensor) else loss
        floats[1] = self._comm_local
        payload = torch.cat([side, body])
        return Compressed(payload, {"residual": residual, "score": score}, {"level": level})

    @staticmethod
    def _ranked(score, layout) -> List[int]:
        """The bucket's parameters by mean score, highest first (non-finite means last, then by
        position)."""
        means = ops.segment_mean(score, list(layout.param_numels)).tolist()
        return sorted(range(len(means)), key=lambda p: (-_finite_or(means[p]), p))

    def _fill_layers(self, score, layout, capacity: int) -> List[int]:
        """Parameters by mean score, highest first, each taken if it still fits (ascending)."""
        chosen, room = [], capacity
        for p in self._ranked(score, layout):
            n = layout.param_numels[p]
            if 0 < n <= room:
                chosen.append(p)
                room -= n
        return sorted(chosen)

    def _hybrid_positions(self, score, layout, k: int) -> torch.Tensor:
        """The entries of the parameters of highest mean score that hold ``hybrid_share`` of the
        bucket (and at least ``k`` entries), in ascending order."""
        if len(layout.param_numels) == 1:
            return torch.arange(layout.numel, device=score.device)
        want = max(k, math.ceil(self.hybrid_share * layout.numel))
        chosen, held = [], 0
        for p in self._ranked(score, layout):
            if held >= want:
                break
            chosen.append(p)
            held += layout.param_numels[p]
        spans = [_span(layout, p) for p in sorted(chosen)]
        return torch.cat([torch.arange(s.start, s.stop, device=score.device) for s in spans])

    def aggregate(self, gathered, layout, step, out=None):
        level = self.bucket_level(self.level_at(step), layout)
        world = gathered.shape[0]
        side = gathered[:, :SIDE_BYTES].reshape(-1).view(torch.int32).view(world, -1)
        floats = gathered[:, 4:12].reshape(-1).view(torch.float32).view(world, 2)
        body = gathered[:, SIDE_BYTES:]
        fmt = self.layer_format(layout) if level == "layer" else self.weight_format(layout)
        out = torch.zeros(layout.numel, dtype=torch.float32, device=gathered.device) if out is None \
            else out.zero_()
        if body.shape[1] != fmt.nbytes:
            raise ValueError(f"granular: expected payloads of {SIDE_BYTES + fmt.nbytes} bytes at level "
                             f"{level}, got {gathered.shape[1]}")
        finite, well_formed = fmt.decode_sum(body, out)
        well_formed = well_formed & (side[:, 0] == LEVELS.index(level))
        if step not in self.observed and (self.previous is None or self.previous[0] < step):
            code = self.played.get(step, LEVELS.index(level))
            self.observed[step] = (floats[:, 0].mean(), floats[:, 1].mean(), code, gathered.shape[1])
        return Aggregated(out.div_(world), finite, well_formed)

    def own_update(self, compressed, layout, step):
        level = self.bucket_level(self.level_at(step), layout)
        fmt = self.layer_format(layout) if level == "layer" else self.weight_format(layout)
        out = torch.zeros(layout.numel, dtype=torch.float32, device=compressed.payload.device)
        finite, well_formed = fmt.decode_sum(compressed.payload[SIDE_BYTES:].unsqueeze(0), out)
        return Aggregated(out, finite, well_formed)

    def commit(self, memory, compressed, average, layout):
        memory.entries["residual"] = compressed.pending["residual"]
        memory.entries["score"] = compressed.pending["score"]
        return average

    def undelivered(self, memory):
        return memory.entries["residual"]

    # ------------------------------------------------------------------------------ probes
    def probe_plan(self) -> Optional[ProbePlan]:
        return ProbePlan(self.probe_every, self.probes, self.eps) if self.probe_every else None

    def store_probe(self, params_memory: Dict[int, Dict[str, torch.Tensor]], key: int,
                    diagonal: torch.Tensor) -> None:
        params_memory.setdefault(key, {})["hessian"] = diagonal.detach().reshape(-1).float().clone()
        self._probe_seen = True

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        observed = {int(s): (float(l), float(c), int(code), int(n))
                    for s, (l, c, code, n) in self.observed.items()}
        return {"bandit": self.bandit.state_dict(), "losses": list(self.losses),
                "level_steps": list(self.level_steps), "decided": list(self.decided) if self.decided else None,
                "observed": observed, "previous": list(self.previous) if self.previous else None,
                "reward_scale": self.reward_scale, "last_signals": dict(self.last_signals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reset_policy()
        if not state:
            return
        self.bandit.load_state_dict(state["bandit"])
        self.losses = [float(v) for v in state["losses"]]
        self.level_steps = [int(v) for v in state["level_steps"]]
        self.decided = tuple(state["decided"]) if state["decided"] else None
        self.played = {self.decided[0]: self.decided[1]} if self.decided else {}
        self.observed = {int(s): tuple(v) for s, v in state["observed"].items()}
        self.previous = tuple(state["previous"]) if state["previous"] else None
        self.reward_scale = float(state["reward_scale"])
        self.last_signals = dict(state["last_signals"])

    def stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.granularity == "auto":
            out["level"] = LEVELS[self.decided[1]] if self.decided else None
            out["level_steps"] = dict(zip(LEVELS, self.level_steps))
        return out


def _largest(low: int, high: int, fits) -> int:
    """The largest n in [low, high] with fits(n) (fits is monotone: true then false); ``low`` when
    none fits."""
    if not fits(low):
        return low
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _span(layout, p: int) -> slice:
    start = sum(layout.param_numels[:p])
    return slice(start, start + layout.param_numels[p])


def _finite_or(value: float, fallback: float = -math.inf) -> float:
    return value if math.isfinite(value) else fallback


__all__: Tuple[str, ...] = ("GranularCompressor", "DiscountedUCB", "steadiness", "LEVELS")

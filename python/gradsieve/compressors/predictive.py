"""Sparsity masks from a gradient-importance predictor trained online.

Each worker scores every entry with a small per-parameter network and sends the ``density``
fraction of entries with the highest scores, int8-quantized; what it did not send, and the
rounding, stays in a residual added to the next gradient (error compensation)::

    a      = residual + grad                      # what error feedback would send
    x      = features(a, grad, last H gradients)  # per entry, scale-free (below)
    score  = predictor_p(x)                       # p: the parameter the entry belongs to
    send the top `density` of entries: half of them by |a|, the rest by score (``magnitude``)
    values a (int8); residual = a - sent

The share chosen by magnitude (``magnitude``, 0.5 by default) keeps error feedback's guarantee
that a large accumulated entry is eventually sent, which a ranking by the score alone
(``magnitude=0``) loses; docs/compressors.md has the measurements behind the default.

The predictor (per parameter tensor; weights identical in shape on every rank, in the rank's
per-parameter memory, checkpointed): ``x -> relu(W1 x + b1) -> w2 . z + b2 = logit``, hidden width
``hidden`` (8). Features, with ``s`` the mean of ``|a|`` over the parameter::

    x0 = log1p(|a| / s),  x1 = log1p(|grad| / s),  x2+j = sgn(a) sgn(h_j) log1p(|h_j| / s)

where ``h_j`` is the entry's gradient ``j + 1`` steps ago (j < ``history``): signed and relative to
the direction ``a`` would be sent in, so a consistent direction and a flip-flopping one look
different. The score is ``softplus(logit)`` (order of ``sigmoid(logit)``, the originally
proposed importance in (0, 1), without its float saturation), or with ``ranking="product"``
``sigmoid(logit) * |a|``.
The fused op :func:`gradsieve.ops.predictive_score` computes ``a`` and the scores in two passes.

What it learns from. After the exchange every worker holds the average of the sent entries; an
entry is labelled important when it is among the top-k of that average (what a centralised top-k
would have sent, which no worker can see before the exchange). From each step, ``sample`` entries
per parameter (a quarter drawn from the labelled ones, a quarter from the entries this worker
sent, the rest uniformly; the draw is seeded by the option ``seed``, the parameter and the step,
so it is the same on every rank and in the simulator) and their features as they were at the
selection train the predictor with one Adam step on the binary cross-entropy. That step runs on a
background thread started when the step's memory is committed and is collected by the next
compression of the parameter, one step later: it overlaps the next forward and backward. It is a
pure function of saved memory (weights, Adam moments, the sampled batch), so a checkpoint restores
it exactly (a restored run recomputes it on the spot). The initial weights rank by ``|a|``: the
predictor starts as ``topk``.

Adaptive k. ``report_metric(value, higher_is_better)`` (on the hook's state or the simulator;
``gradsieve-train`` reports after every evaluation) compares the metric with the previous report:
a relative gain below ``k_plateau`` (a plateau, or worse) multiplies the density by ``k_factor``,
above ``k_fast`` divides it, within ``[k_min, k_max]``; every change is logged
(``compressor.density_log``) and ``state.stats()`` shows the density now. ``k_min = k_max = 0``
(the default) pins the density: adaptive k is off.

Memory per entry: ``residual`` (4 bytes) and ``history`` gradients (4 bytes each, 2 with
``history_dtype="bf16"``); per parameter: the predictor's weights and Adam moments (3 x
``hidden * (history + 4) + 1`` floats) and one sampled batch (``sample * (history + 3)`` floats).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from gradsieve import ops
from gradsieve.compressor import SPARSE_OPTIONS, Selection, SparseCompressor
from gradsieve.options import Option
from gradsieve.signals import Metric
from gradsieve.registry import register_compressor

# One background thread for all predictors of a process: jobs are small and run one at a time.
_TRAINER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradsieve-predictor")

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def num_weights(history: int, hidden: int) -> int:
    """Length of one predictor's flat weight vector: W1 [hidden, history + 2], b1, w2, b2."""
    return hidden * (history + 4) + 1


def initial_weights(history: int, hidden: int, seed: int, key: int) -> torch.Tensor:
    """The same on every rank: hidden unit 0 passes ``log1p(|a| / s)`` and is the only one read
    out, so the first scores rank by ``|a|`` as ``topk`` does; the other units start random in
    W1 with zero read-out weights and learn from the first training step on."""
    features = history + 2
    gen = torch.Generator().manual_seed((seed * 1_000_003 + key * 7919 + 17) % (1 << 62))
    w1 = torch.randn(hidden, features, generator=gen) * (1.0 / math.sqrt(features))
    w1[0] = 0.0
    w1[0, 0] = 1.0
    b1 = torch.zeros(hidden)
    w2 = torch.zeros(hidden)
    w2[0] = 1.0
    b2 = torch.tensor([-2.0])
    return torch.cat([w1.reshape(-1), b1, w2, b2]).float()


def features(a: torch.Tensor, grad: torch.Tensor, history: List[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """The predictor's input for some entries, as :func:`gradsieve.ops.predictive_score` computes
    it: ``a``, ``grad`` [m]; ``history`` newest first, H tensors [m]; ``scale`` 0-d. Returns [m, H + 2]."""
    inv = 1.0 / scale
    sign_a = torch.sign(a)
    cols = [torch.log1p(a.abs() * inv), torch.log1p(grad.abs() * inv)]
    for h in history:
        h = h.float()
        cols.append(sign_a * torch.sign(h) * torch.log1p(h.abs() * inv))
    return torch.stack(cols, dim=1)


def logits(weights: torch.Tensor, x: torch.Tensor, hidden: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [m], hidden pre-activations [m, hidden]) of the predictor on features ``x``."""
    f = x.shape[1]
    w1 = weights[: hidden * f].view(hidden, f)
    b1 = weights[hidden * f: hidden * (f + 1)]
    w2 = weights[hidden * (f + 1): hidden * (f + 2)]
    pre = torch.addmm(b1, x, w1.t())
    return torch.relu(pre) @ w2 + weights[-1], pre


def train_step(weights: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, x: torch.Tensor,
               y: torch.Tensor, hidden: int, lr: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step on the mean binary cross-entropy of ``sigmoid(logit(x))`` against ``y``,
    with the gradient written out (no autograd: a pure, thread-safe function of its inputs).
    Returns (weights, m, v, loss before the step); step ``t`` counts from 1."""
    f = x.shape[1]
    out, pre = logits(weights, x, hidden)
    z = torch.relu(pre)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
    d_out = (torch.sigmoid(out) - y) / max(1, x.shape[0])
    w2 = weights[hidden * (f + 1): hidden * (f + 2)]
    d_pre = d_out[:, None] * w2[None, :] * (pre > 0)
    grad = torch.cat([(d_pre.t() @ x).reshape(-1), d_pre.sum(0), z.t() @ d_out, d_out.sum().reshape(1)])
    b1, b2 = ADAM_BETAS
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    weights = weights - step * m / (v.sqrt() + ADAM_EPS)
    return weights, m, v, loss


def _job(saved: Mapping[str, torch.Tensor], hidden: int, lr: float):
    """The training step a parameter's memory has queued (its batch of the last step)."""
    t = int(saved["adam_t"]) + 1
    weights, m, v, loss = train_step(saved["weights"], saved["adam_m"], saved["adam_v"], t,
                                     saved["batch_x"], saved["batch_y"], hidden, lr)
    return weights, m, v, loss, t


@register_compressor("predictive")
class PredictiveCompressor(SparseCompressor):
    """Top-k by a learned importance score, int8 values, error feedback, adaptive k.

    Options: ``density`` (fraction sent, the k of the original design), ``history`` (H past
    gradients the predictor reads, 3), ``hidden`` (its width, 8), ``lr`` (its Adam step, 0.01),
    ``sample`` (entries per parameter it trains on per step, 512), ``ranking`` (``"score"``: by
    the predicted importance; ``"product"``: importance times ``|a|``), ``magnitude`` (share of k
    taken by ``|a|`` first, 0.5), ``history_dtype`` (``fp32``/``bf16``), ``seed``; adaptive k:
    ``k_min``, ``k_max`` (0: the density; equal: off), ``k_factor`` (2), ``k_plateau`` (0.002),
    ``k_fast`` (0.02); and those of ``topk`` (``scope``, ``compress_1d``, ``values`` (default
    ``int8``), ``chunk``, ``index``).

    Example::

        >>> sim = gradsieve.Simulator("predictive", world_size=4, density=0.01)
        >>> average = sim.step([torch.randn(10_000) for _ in range(4)])
    """

    # The predictor learns from the average; the commit also trains the predictors (memory.params,
    # background jobs), so it cannot be undone; adaptive k follows the validation metric.
    traits = dataclasses.replace(SparseCompressor.traits, commit_needs_average=True, rollback_safe=False,
                                 signals=frozenset({Metric}), reports=(("density", "density"),))

    OPTIONS = {
        **SPARSE_OPTIONS,
        "values": Option("int8", SPARSE_OPTIONS["values"].doc, kind=str,
                         choices=SPARSE_OPTIONS["values"].choices),
        "history": Option(3, "past gradients per entry the predictor reads, in [1, 16]", kind=int,
                          check=lambda v: 1 <= v <= 16, allowed="an integer in [1, 16]"),
        "hidden": Option(8, "hidden width of each parameter's predictor, in [1, 64]", kind=int,
                         check=lambda v: 1 <= v <= 64, allowed="an integer in [1, 64]"),
        "lr": Option(0.01, "the predictor's Adam learning rate, > 0",
                     check=lambda v: 0.0 < v < math.inf, allowed="> 0"),
        "sample": Option(512, "entries per parameter the predictor trains on per step, >= 8", kind=int,
                         check=lambda v: 8 <= v <= 1 << 20, allowed="an integer in [8, 2^20]"),
        "ranking": Option("score", "what the top-k ranks by: the predicted importance, or its "
                          "product with |residual + grad|", kind=str, choices=("score", "product")),
        "magnitude": Option(0.5, "share of each segment's k chosen by |residual + grad| alone, "
                            "before the ranking picks the rest, in [0, 1]: a floor under error "
                            "feedback's guarantee (1 is topk)",
                            check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
        "label": Option("smoothed", "what the predictor learns to find: the top-k of this step's "
                        "received average (\"average\"), or of its moving average over steps "
                        "(\"smoothed\", weight label_decay on the past)", kind=str,
                        choices=("average", "smoothed")),
        "label_decay": Option(0.9, "weight of the past in the smoothed label average, in [0, 1)",
                              check=lambda v: 0.0 <= v < 1.0, allowed="in [0, 1)"),
        "history_dtype": Option("fp32", "storage of the gradient history", kind=str,
                                choices=("fp32", "bf16")),
        "seed": Option(0, "seed of the predictors' initial weights and training samples", kind=int,
                       check=lambda v: 0 <= v < 1 << 62, allowed="an integer in [0, 2^62)"),
        "k_min": Option(0.0, "adaptive k: the lowest density, in [0, 1]; 0: density",
                        check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
        "k_max": Option(0.0, "adaptive k: the highest density, in [0, 1]; 0: density",
                        check=lambda v: 0.0 <= v <= 1.0, allowed="in [0, 1]"),
        "k_factor": Option(2.0, "adaptive k: the density is multiplied or divided by this, > 1",
                           check=lambda v: 1.0 < v < math.inf, allowed="> 1"),
        "k_plateau": Option(0.002, "adaptive k: a relative gain of the metric below this is a "
                            "plateau (more entries are sent)", check=lambda v: math.isfinite(v),
                            allowed="a finite number"),
        "k_fast": Option(0.02, "adaptive k: a relative gain above this is fast progress (fewer "
                         "entries are sent)", check=lambda v: math.isfinite(v), allowed="a finite number"),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        low, high = self.k_bounds()
        if not low <= self.density <= high:
            raise ValueError(f"compressor 'predictive': density {self.density} must lie in "
                             f"[k_min, k_max] = [{low}, {high}]")
        if self.k_fast < self.k_plateau:
            raise ValueError(f"compressor 'predictive': k_fast ({self.k_fast}) must be >= "
                             f"k_plateau ({self.k_plateau})")
        self.memory_names = ("residual",) + tuple(f"history{j}" for j in range(self.history))
        if self.label == "smoothed":
            self.memory_names += ("received",)
        if self.history_dtype == "bf16":
            self.memory_dtypes = {f"history{j}": torch.bfloat16 for j in range(self.history)}
        self.density_now = self.density
        self.last_metric: Optional[float] = None
        self.reports = 0
        self.density_log: List[Dict[str, Any]] = []
        # (parameter memory dict, batch tensor) -> the training job started for that batch.
        self._jobs: Dict[int, Tuple[torch.Tensor, concurrent.futures.Future]] = {}

    # ----------------------------------------------------------------------------- adaptive k
    def k_bounds(self) -> Tuple[float, float]:
        return (self.k_min or self.density, self.k_max or self.density)

    def density_at(self, step: int) -> float:
        return self.density_now

    def runtime(self) -> Dict[str, Any]:
        return {"density": self.density_now}

    def observe(self, signal) -> None:
        if isinstance(signal, Metric):
            self.report_metric(signal.value, signal.higher_is_better)

    def report_metric(self, value: float, higher_is_better: bool = True) -> None:
        """Applies the adaptive-k rule to a new validation metric (non-finite values are ignored)."""
        if not math.isfinite(value):
            return
        previous, self.last_metric = self.last_metric, value
        self.reports += 1
        low, high = self.k_bounds()
        if previous is None or low == high:
            return
        gain = (value - previous) if higher_is_better else (previous - value)
        relative = gain / max(abs(previous), 1e-12)
        now = self.density_now
        if relative < self.k_plateau:
            new = min(high, now * self.k_factor)
        elif relative > self.k_fast:
            new = max(low, now / self.k_factor)
        else:
            new = now
        if new != now:
            self.density_log.append({"report": self.reports, "metric": value, "relative_gain": relative,
                                     "from": now, "to": new})
            self.density_now = new

    def state_dict(self) -> Dict[str, Any]:
        return {"density_now": self.density_now, "last_metric": self.last_metric, "reports": self.reports,
                "density_log": [dict(e) for e in self.density_log]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.density_now = float(state["density_now"])
        self.last_metric = state["last_metric"]
        self.reports = int(state["reports"])
        self.density_log = [dict(e) for e in state["density_log"]]

    def stats(self) -> Dict[str, Any]:
        return {"density": self.density_now, "density_changes": len(self.density_log)}

    # ------------------------------------------------------------------------------ predictor
    def _saved(self, memory, key: int, device: torch.device) -> Dict[str, torch.Tensor]:
        saved = memory.params.get(key)
        if saved is None:
            n = num_weights(self.history, self.hidden)
            saved = {"weights": initial_weights(self.history, self.hidden, self.seed, key),
                     "adam_m": torch.zeros(n), "adam_v": torch.zeros(n),
                     "adam_t": torch.zeros((), dtype=torch.int64), "written": torch.zeros((), dtype=torch.int64)}
        return {name: t.to(device) for name, t in saved.items()}

    def _trained(self, memory, key: int, saved: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The parameter's predictor after the training step its memory has queued (if any)."""
        if "batch_x" not in saved:
            return saved
        job = self._jobs.get(id(memory.params.get(key)))
        stored = memory.params[key]["batch_x"]
        if job is not None and job[0] is stored:
            weights, m, v, loss, t = job[1].result()
        else:  # restored from a checkpoint, or the job is gone: the same computation, here
            weights, m, v, loss, t = _job(saved, self.hidden, self.lr)
        out = {k: v_ for k, v_ in saved.items() if not k.startswith("batch_")}
        out.update(weights=weights, adam_m=m, adam_v=v, adam_t=torch.tensor(t), loss=loss.reshape(()))
        return out

    def _history(self, memory, offset: int, numel: int, newest: int) -> List[torch.Tensor]:
        """The parameter's history slots, in storage order (slot ``newest`` is the last gradient)."""
        return [memory.entries[f"history{j}"][offset:offset + numel] for j in range(self.history)]

    # ------------------------------------------------------------------------------ the steps
    def select(self, grad, memory, segments, layout, step):
        device = grad.device
        accumulator = torch.empty_like(grad)
        score = torch.empty_like(grad)
        predictors: Dict[int, Dict[str, torch.Tensor]] = {}
        scales: Dict[int, torch.Tensor] = {}
        for key, offset, numel in memory.slices():
            saved = self._trained(memory, key, self._saved(memory, key, device))
            newest = (int(saved["written"]) - 1) % self.history
            piece = slice(offset, offset + numel)
            a, s, scale = ops.predictive_score(grad[piece], memory.entries["residual"][piece],
                                               self._history(memory, offset, numel, newest), newest,
                                               saved["weights"], self.hidden, self.ranking == "product")
            accumulator[piece] = a
            score[piece] = s
            predictors[key] = saved
            scales[key] = scale
        parts_i, parts_v = [], []
        for seg in segments:
            piece = slice(seg.offset, seg.offset + seg.numel)
            if seg.k == seg.numel:  # sent dense
                idx = torch.arange(seg.numel, device=device)
            else:
                # A non-finite step is dropped after the exchange; rank by 0 meanwhile.
                key = torch.nan_to_num(score[piece], nan=0.0, posinf=0.0)
                floor = int(round(self.magnitude * seg.k))
                if floor > 0:  # the largest |a| first (an infinite key), then the best scores
                    _, first = ops.topk_abs(torch.nan_to_num(accumulator[piece], nan=0.0), floor)
                    key.index_fill_(0, first, math.inf)
                _, idx = ops.topk_abs(key, seg.k)
            parts_i.append(idx + seg.offset)
            parts_v.append(accumulator[piece][idx])
        indices = torch.cat(parts_i) if len(parts_i) > 1 else parts_i[0]
        values = torch.cat(parts_v) if len(parts_v) > 1 else parts_v[0]
        residual = accumulator.clone().index_fill_(0, indices, 0.0)
        scratch = {"grad": grad, "indices": indices, "predictors": predictors, "scales": scales,
                   "segments": segments}
        return Selection(indices, values, {"residual": residual}, scratch)

    def absorb_rounding(self, selection, error):
        selection.pending["residual"].index_add_(0, selection.indices, error)

    def undelivered(self, memory):
        return memory.entries["residual"]

    def commit(self, memory, compressed, average, layout):
        scratch = compressed.scratch
        grad, sent = scratch["grad"], scratch["indices"]
        step_labels = torch.zeros(layout.numel, dtype=torch.bool, device=grad.device)
        dense = torch.zeros(layout.numel, dtype=torch.bool, device=grad.device)
        target = average
        if self.label == "smoothed":
            target = memory.entries["received"] * self.label_decay + average * (1.0 - self.label_decay)
        for seg in scratch["segments"]:
            piece = slice(seg.offset, seg.offset + seg.numel)
            if seg.k == seg.numel:
                dense[piece] = True
            else:
                _, top = ops.topk_abs(target[piece], seg.k)
                step_labels[top + seg.offset] = True
        was_sent = torch.zeros_like(step_labels).index_fill_(0, sent, True)
        batches = {}
        history_writes: Dict[int, List[Tuple[int, int]]] = {}
        for key, offset, numel in memory.slices():
            saved = scratch["predictors"][key]
            written = int(saved["written"])
            history_writes.setdefault(written % self.history, []).append((offset, numel))
            if numel == 0 or bool(dense[offset]):
                batches[key] = None
                continue
            piece = slice(offset, offset + numel)
            idx = self._draw(step_labels[piece], was_sent[piece], key, written)
            newest = (written - 1) % self.history
            past = self._history(memory, offset, numel, newest)
            ordered = [past[(newest - j) % self.history][idx] for j in range(self.history)]
            g = grad[piece][idx]
            a = memory.entries["residual"][piece][idx] + g
            batches[key] = (features(a, g, ordered, scratch["scales"][key]),
                            step_labels[piece][idx].float())
        # The per-entry memory: the residual, and this step's gradient in each parameter's slot.
        memory.entries["residual"] = compressed.pending["residual"]
        if self.label == "smoothed":
            memory.entries["received"] = target
        for slot, pieces in history_writes.items():
            name = f"history{slot}"
            target = memory.entries[name].clone()
            for offset, numel in pieces:
                target[offset:offset + numel] = grad[offset:offset + numel]
            memory.entries[name] = target
        for key, _, _ in memory.slices():
            saved = dict(scratch["predictors"][key])
            saved["written"] = saved["written"] + 1
            if batches[key] is not None:
                saved["batch_x"], saved["batch_y"] = batches[key]
            old = memory.params.get(key)
            if old is not None:
                self._jobs.pop(id(old), None)
            memory.params[key] = saved
            if batches[key] is not None:
                self._jobs[id(saved)] = (saved["batch_x"],
                                         _TRAINER.submit(_job, dict(saved), self.hidden, self.lr))
        return average

    def _draw(self, labels: torch.Tensor, sent: torch.Tensor, key: int, written: int) -> torch.Tensor:
        """The entries of one parameter the predictor trains on this step (same on every rank)."""
        numel = labels.numel()
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + key * 7919 + written * 104_729) % (1 << 62))
        quarter = self.sample // 4
        parts = []
        for pool in (labels.nonzero().squeeze(1).cpu(), sent.nonzero().squeeze(1).cpu()):
            if pool.numel():
                parts.append(pool[torch.randint(pool.numel(), (quarter,), generator=gen)])
        rest = self.sample - sum(p.numel() for p in parts)
        parts.append(torch.randint(numel, (rest,), generator=gen))
        return torch.cat(parts).to(labels.device)


__all__ = ("PredictiveCompressor", "features", "initial_weights", "logits", "num_weights", "train_step")

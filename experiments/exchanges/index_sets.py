"""How the agreed-index all-reduce exchange should pick its index set: trains on the harness's
workloads in one process, W simulated workers, and compares the ``select`` rules with dense
averaging and the flat top-k all-gather.

One model; each step every worker computes its gradient on its own batch from its own
(heterogeneous, label-skewed) shard of ``gradsieve.train.workloads``, the W flat gradients go
through ``gradsieve.Simulator.step``, the result is written into the parameters' ``.grad`` and the
workload's optimizer (as ``gradsieve-train`` sets it up: same optimizer, learning rate, batch,
initial model, batches per rank, one dense warm-up step, evaluations every twentieth of the run)
takes its step.

Per run it records the held-out metric over the run, the mean training loss of the workers per
step, the bytes each worker puts on the wire per compressed step (the compressor's payload as the
Simulator counts it, and, for the allreduce exchange, the leader's broadcast of the index set,
which the Simulator and the hook count in ``wire_bytes`` too; the record keeps them apart), and, for the allreduce exchange, how much of the
agreed index set is new from one step to the next (read from the exchange's ``previous`` sets).
For every sparse variant it also records the support of the update (entries the step moved) and how
many distinct entries were ever moved.

Variants (``VARIANTS``): ``none``; ``topk-0.01`` (flat all-gather); ``ar-<select>-<density>`` for
select in leader, previous, mix (share 0.5) at density 0.01 (topk's k) and 0.02 (topk's payload:
topk sends k indices and k values, the all-reduce only values); ``dgc-*``, ``dgc-m0.9-*`` and
``ef21-*``: those compressors on the flat all-gather at 0.01 and with ``select="leader"`` at 0.01 and
0.02 (``dgc`` with momentum 0, since the workloads train with Adam; ``dgc-m0.9`` with DGC's default
momentum, as ``gradsieve-train --compare dgc`` runs it); ``ar-leader-0.05`` and ``ar-mix-0.05``, about
the traffic per rank of ``topk-0.01`` at 8 workers.

Reproduce (the 104 runs of RESULTS.md, from the repository root; about 38 minutes of wall time on
2 shared cores)::

    S="python experiments/exchanges/index_sets.py --jobs 2 --seed 0 --seed 1"
    export PYTHONPATH=python
    $S --workload textcls --workload charlm --world 4
    $S --workload textcls --world 8
    $S --workload textcls --workload charlm --world 4 --variant dgc-0.01 --variant dgc-ar-leader-0.01 \
       --variant dgc-ar-leader-0.02 --variant ef21-0.01 --variant ef21-ar-leader-0.01 \
       --variant ef21-ar-leader-0.02 --variant dgc-m0.9-0.01 --variant dgc-m0.9-ar-leader-0.01 \
       --variant dgc-m0.9-ar-leader-0.02
    $S --workload charlm --world 8 --variant none --variant topk-0.01 --variant ar-leader-0.01 \
       --variant ar-leader-0.02 --variant ar-mix-0.01 --variant ar-mix-0.02
    $S --workload textcls --workload charlm --world 8 --variant ar-leader-0.05 --variant ar-mix-0.05

Each run writes ``results/<workload>-w<W>-<variant>-s<seed>.json`` and is skipped when that file
exists (``--force`` reruns it); ``--report`` (also done after every batch of runs) reads them all
and writes ``results/summary.json``, ``results/table.md``, ``results/metric_vs_step.png`` (the select
rules), ``results/compressors_vs_step.png`` and ``results/set_new_fraction.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import multiprocessing
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import gradsieve
from gradsieve.compressor import entries_for
from gradsieve.train.run import eval_steps
from gradsieve.train.workloads import defaults_for, make_workload, resolve_model_size

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# The model size of each workload in this study.
MODEL_SIZE = {"textcls": "base", "charlm": "tiny"}
WARMUP_STEPS = 1  # dense steps before compression, as gradsieve-train's --warmup-steps default


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of exchanging: a compressor, its density, and the exchange with its select rule."""

    compressor: str
    density: Optional[float] = None
    exchange: str = "allgather"
    select: Optional[str] = None
    share: float = 0.5
    options: Tuple[Tuple[str, object], ...] = ()

    def simulator(self, world: int, param_sizes: Sequence[int], param_ndims: Sequence[int]) -> gradsieve.Simulator:
        options = dict(self.options)
        if self.density is not None:
            options["density"] = self.density
        exchange_options = {}
        if self.exchange == "allreduce":
            exchange_options = {"select": self.select, "share": self.share}
        return gradsieve.Simulator(self.compressor, world, param_sizes=list(param_sizes),
                                   param_ndims=list(param_ndims), exchange=self.exchange,
                                   exchange_options=exchange_options, **options)


def _variants() -> Dict[str, Variant]:
    found = {"none": Variant("none")}
    for compressor in ("topk", "dgc", "ef21"):
        prefix = "" if compressor == "topk" else f"{compressor}-"
        # DGC's momentum lives in the compressor; the workloads here train with Adam, so DGC runs
        # without it (momentum 0: exact top-k from the velocity, DGC's sampled threshold kept).
        options = (("momentum", 0.0),) if compressor == "dgc" else ()
        found[f"{compressor}-0.01"] = Variant(compressor, 0.01, options=options)
        for select in ("leader", "previous", "mix"):
            for density in (0.01, 0.02):
                found[f"{prefix}ar-{select}-{density:g}"] = Variant(compressor, density, "allreduce", select,
                                                                   options=options)
    # About topk-0.01's traffic per rank at 8 workers (ring all-reduce and broadcast against the
    # all-gather's 7 payloads).
    for select in ("leader", "mix"):
        found[f"ar-{select}-0.05"] = Variant("topk", 0.05, "allreduce", select)
    # DGC as gradsieve-train runs it (its default momentum 0.9; the harness keeps Adam, which the
    # compressor warns about: momentum twice).
    momentum = (("momentum", 0.9),)
    found["dgc-m0.9-0.01"] = Variant("dgc", 0.01, options=momentum)
    for density in (0.01, 0.02):
        found[f"dgc-m0.9-ar-leader-{density:g}"] = Variant("dgc", density, "allreduce", "leader", options=momentum)
    return found


VARIANTS = _variants()
DEFAULT_VARIANTS = ("none", "topk-0.01", "ar-leader-0.01", "ar-previous-0.01", "ar-mix-0.01",
                    "ar-leader-0.02", "ar-previous-0.02", "ar-mix-0.02")


def result_path(workload: str, world: int, variant: str, seed: int) -> str:
    return os.path.join(RESULTS, f"{workload}-w{world}-{variant}-s{seed}.json")


def _index_bytes(variant: Variant, k: int, had_previous: bool) -> int:
    """Bytes of the index set the leader broadcasts this step (int32 indices, as the exchange
    sends them and the hook counts them); 0 for the other exchanges."""
    if variant.exchange != "allreduce":
        return 0
    if not had_previous or variant.select == "leader":
        return 4 * k
    if variant.select == "mix":
        return 4 * math.ceil(variant.share * k)
    return 0


def train(workload_name: str, variant_name: str, world: int, seed: int,
          steps: Optional[int] = None) -> Dict[str, object]:
    """One run (``steps``: None for the harness's default); returns its record (also written to its
    result file)."""
    torch.set_num_threads(1)
    variant = VARIANTS[variant_name]
    size = resolve_model_size(workload_name, MODEL_SIZE[workload_name])
    defaults = defaults_for(workload_name, size)
    steps = steps or defaults.steps
    workers = [make_workload(workload_name, rank, world, seed, True, None, size) for rank in range(world)]
    torch.manual_seed(seed)  # the harness's initial model for this seed
    model = workers[0].model()
    params = [p for p in model.parameters() if p.requires_grad]
    numels = [p.numel() for p in params]
    numel = sum(numels)
    if defaults.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=defaults.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=defaults.lr, momentum=defaults.momentum)
    sim = variant.simulator(world, numels, [p.dim() for p in params])
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + rank) for rank in range(world)]
    evaluate_at = set(eval_steps(steps, max(1, steps // 20)))
    accuracy_metric = defaults.target_metric == "accuracy"

    evals: List[Dict[str, float]] = []
    losses: List[float] = []
    new_fraction: List[Optional[float]] = []  # allreduce: share of the agreed set not in the last one
    support: List[int] = []  # entries the update moved (sparse variants)
    support_new: List[Optional[float]] = []  # share of those not moved the step before
    index_bytes = 0
    ever_moved = torch.zeros(numel, dtype=torch.bool)
    last_set: Optional[torch.Tensor] = None
    last_support: Optional[torch.Tensor] = None
    sparse = not sim.compressor.traits.dense
    moves_support = sparse and sim.compressor.traits.returns_average

    def evaluate(step: int) -> None:
        model.eval()
        loss, accuracy = workers[0].evaluate(model, torch.device("cpu"))
        model.train()
        evals.append({"step": step, "loss": loss, "accuracy": accuracy,
                      "metric": accuracy if accuracy_metric else loss})

    started = time.perf_counter()
    evaluate(0)
    for step in range(steps):
        grads, step_losses = [], []
        for rank, worker in enumerate(workers):
            x, y = worker.batch(generators[rank], defaults.batch_size)
            model.zero_grad(set_to_none=True)
            loss = worker.loss(model(x), y)
            loss.backward()
            step_losses.append(loss.item())
            grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                    for p in params]))
        losses.append(sum(step_losses) / world)
        if step < WARMUP_STEPS:
            update = torch.stack(grads).mean(0)
        else:
            k = entries_for(sim.compressor.density_at(sim.steps), numel) if sparse else 0
            previous = getattr(sim.exchange, "previous", {})
            had_previous = any(s.numel() == k for s in previous.values())
            update = sim.step(grads)
            if not bool(torch.isfinite(update).all()):
                raise RuntimeError(f"{workload_name} {variant_name} seed {seed}: step {step} skipped (non-finite)")
            index_bytes += _index_bytes(variant, k, had_previous)
            if variant.exchange == "allreduce":
                (agreed,) = sim.exchange.previous.values()  # one bucket: the whole flat gradient
                new_fraction.append(None if last_set is None else
                                    float((~torch.isin(agreed, last_set)).float().mean()))
                last_set = agreed.clone()
            if moves_support:
                moved = update != 0
                support.append(int(moved.sum()))
                support_new.append(None if last_support is None or not moved.any() else
                                   float((moved & ~last_support).sum()) / float(moved.sum()))
                ever_moved |= moved
                last_support = moved
        offset = 0
        for p, n in zip(params, numels):
            p.grad = update[offset:offset + n].view_as(p).clone()
            offset += n
        optimizer.step()
        if step + 1 in evaluate_at:
            evaluate(step + 1)
    seconds = time.perf_counter() - started

    compressed_steps = max(1, sim.steps)
    # The Simulator's wire bytes hold the payloads and every worker's share of the broadcast sets.
    payload = sim.wire_bytes / compressed_steps / world - index_bytes / compressed_steps
    record = {
        "workload": workload_name, "model_size": size, "variant": variant_name, "world": world,
        "seed": seed, "steps": steps, "warmup_steps": WARMUP_STEPS, "numel": numel,
        "compressor": variant.compressor, "density": variant.density, "exchange": variant.exchange,
        "select": variant.select, "share": variant.share if variant.select == "mix" else None,
        "options": dict(variant.options),
        "optimizer": defaults.optimizer, "lr": defaults.lr, "batch_size": defaults.batch_size,
        "metric_name": defaults.target_metric, "final_metric": evals[-1]["metric"],
        "final_eval_loss": evals[-1]["loss"], "final_accuracy": evals[-1]["accuracy"],
        "train_loss_tail": statistics.mean(losses[-max(1, steps // 10):]),
        "payload_bytes_per_step_rank": payload,
        "index_bytes_per_step": index_bytes / compressed_steps,
        "bytes_per_step_rank": payload + index_bytes / compressed_steps,
        "dense_bytes_per_step_rank": 4 * numel,
        "set_new_fraction_mean": _mean(new_fraction),
        "set_new_fraction_last10": _mean(new_fraction[-max(1, len(new_fraction) // 10):]),
        "support_mean": _mean(support),
        "support_new_fraction_mean": _mean(support_new),
        "ever_moved_fraction": float(ever_moved.float().mean()) if moves_support else None,
        "seconds": seconds,
        "history": {"loss": losses, "eval": evals, "set_new_fraction": new_fraction, "support": support,
                    "support_new_fraction": support_new},
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(result_path(workload_name, world, variant_name, seed), "w") as f:
        json.dump(record, f)
    return record


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _run(task: Tuple[str, str, int, int, Optional[int]]) -> str:
    record = train(*task)
    workload, variant, world, seed, _ = task
    return (f"{workload} w{world} {variant} s{seed}: {record['metric_name']} {record['final_metric']:.4f}, "
            f"{record['bytes_per_step_rank'] / 1024:.1f} KiB/step/rank, {record['seconds']:.0f} s")


# ------------------------------------------------------------------------------------- report
def _spread(values: List[float]) -> Tuple[float, float]:
    """Mean and half the range (over seeds)."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def _ring_bytes(record: dict) -> float:
    """Bytes one rank receives per step with the usual bandwidth-optimal collectives (what grows
    with the number of ranks W): a ring all-reduce moves 2 (W - 1) / W of the buffer, an
    all-gather (W - 1) payloads of the others, a broadcast the set once."""
    world = record["world"]
    payload = record["payload_bytes_per_step_rank"]
    if record["exchange"] == "allgather" and record["compressor"] != "none":
        return (world - 1) * payload
    return 2 * (world - 1) / world * payload + record["index_bytes_per_step"] * (world - 1) / world


def report() -> None:
    records = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*-s*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    if not records:
        print("no results yet")
        return
    order = list(VARIANTS)
    groups: Dict[Tuple[str, int, str], List[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["world"], r["variant"]), []).append(r)
    summary, lines = [], []
    for (workload, world) in sorted({(w, n) for w, n, _ in groups}, key=lambda t: (t[0] != "textcls", t)):
        metric = next(r["metric_name"] for r in records if r["workload"] == workload)
        lines += [f"### {workload} ({MODEL_SIZE[workload]}), {world} workers, heterogeneous",
                  "",
                  f"| variant | final {'accuracy' if metric == 'accuracy' else 'eval loss'} | train loss (last 10%) "
                  f"| KiB/step/rank (payload + index broadcast) | ring KiB in/step/rank "
                  f"| entries moved/step (x k at 0.01) | set new/step (mean, last 10%) "
                  f"| entries ever moved | seeds | s/run |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for variant in sorted({v for w, n, v in groups if (w, n) == (workload, world)}, key=order.index):
            runs = sorted(groups[(workload, world, variant)], key=lambda r: r["seed"])
            m, dm = _spread([r["final_metric"] for r in runs])
            t, dt = _spread([r["train_loss_tail"] for r in runs])
            payload = statistics.mean(r["payload_bytes_per_step_rank"] for r in runs) / 1024
            index = statistics.mean(r["index_bytes_per_step"] for r in runs) / 1024
            new = [r["set_new_fraction_mean"] for r in runs if r["set_new_fraction_mean"] is not None]
            new_late = [r["set_new_fraction_last10"] for r in runs if r["set_new_fraction_last10"] is not None]
            moved = [r["ever_moved_fraction"] for r in runs if r["ever_moved_fraction"] is not None]
            seconds = statistics.mean(r["seconds"] for r in runs)
            ring = statistics.mean(_ring_bytes(r) for r in runs) / 1024
            k = entries_for(0.01, runs[0]["numel"])
            moved_per_step = [r["support_mean"] for r in runs if r["support_mean"] is not None]
            lines.append(
                f"| {variant} | {m:.3f} ± {dm:.3f} | {t:.3f} ± {dt:.3f} | "
                f"{payload:.1f}" + (f" + {index:.1f}" if index else "") + f" | {ring:.1f} | "
                + (f"{statistics.mean(moved_per_step) / k:.2f}" if moved_per_step else "-") + " | "
                + (f"{statistics.mean(new):.3f}, {statistics.mean(new_late):.3f}" if new else "-") + " | "
                + (f"{100 * statistics.mean(moved):.1f}%" if moved else "-")
                + f" | {','.join(str(r['seed']) for r in runs)} | {seconds:.0f} |")
            summary.append({"workload": workload, "world": world, "variant": variant, "metric": metric,
                            "final_metric_mean": m, "final_metric_half_range": dm,
                            "final_metrics": [r["final_metric"] for r in runs],
                            "train_loss_tail_mean": t, "payload_kib_per_step_rank": payload,
                            "index_kib_per_step": index, "ring_kib_in_per_step_rank": ring,
                            "moved_per_step": statistics.mean(moved_per_step) if moved_per_step else None,
                            "set_new_fraction_mean": statistics.mean(new) if new else None,
                            "set_new_fraction_last10": statistics.mean(new_late) if new_late else None,
                            "ever_moved_fraction": statistics.mean(moved) if moved else None,
                            "seeds": [r["seed"] for r in runs], "seconds_per_run": seconds})
        lines.append("")
    total = sum(r["seconds"] for r in records)
    lines.append(f"{len(records)} runs, {total / 60:.1f} min of single-thread run time in all.")
    with open(os.path.join(RESULTS, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("\n".join(lines))
    _plot(records)


STYLE = {  # the select study: variant -> (color, line style, marker)
    "none": ("black", "-", ""),
    "topk-0.01": ("tab:gray", "--", "o"),
    "ar-leader-0.01": ("tab:blue", ":", "^"),
    "ar-leader-0.02": ("tab:blue", "-", "^"),
    "ar-previous-0.01": ("tab:red", ":", "x"),
    "ar-previous-0.02": ("tab:red", "-", "x"),
    "ar-mix-0.01": ("tab:green", ":", "s"),
    "ar-mix-0.02": ("tab:green", "-", "s"),
    "ar-leader-0.05": ("tab:cyan", "-.", "v"),
    "ar-mix-0.05": ("tab:olive", "-.", "D"),
}
# The compressor study: color per compressor, line style and marker per exchange and density.
COMPRESSOR_COLORS = {"topk": "tab:gray", "dgc": "tab:purple", "dgc-m0.9": "tab:brown", "ef21": "tab:orange"}
EXCHANGE_STYLES = {"0.01": ("--", "o"), "ar-leader-0.01": (":", "^"), "ar-leader-0.02": ("-", "^")}


def _compressor_style(variant: str) -> Tuple[str, str, str]:
    if variant == "none":
        return STYLE["none"]
    if variant.startswith("ar-") or variant == "topk-0.01":
        compressor, rest = "topk", variant.replace("topk-", "")
    else:
        compressor, _, rest = variant.partition("-ar-" if "-ar-" in variant else "-0")
        rest = ("ar-" + rest) if "-ar-" in variant else "0" + rest
    line, marker = EXCHANGE_STYLES[rest]
    return COMPRESSOR_COLORS[compressor], line, marker


def _plot(records: List[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def metric_panels(chosen: List[dict], style, filename: str, what: str) -> None:
        panels = sorted({(r["workload"], r["world"]) for r in chosen}, key=lambda t: (t[0] != "textcls", t))
        if not panels:
            return
        columns = min(2, len(panels))
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(7.5 * columns, 5.2 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, (workload, world) in zip(axes.flat, panels):
            mine = [r for r in chosen if (r["workload"], r["world"]) == (workload, world)]
            for variant in sorted({r["variant"] for r in mine}, key=list(VARIANTS).index):
                runs = [r for r in mine if r["variant"] == variant]
                steps = [e["step"] for e in runs[0]["history"]["eval"]]
                mean = [statistics.mean(r["history"]["eval"][i]["metric"] for r in runs) for i in range(len(steps))]
                color, line, marker = style(variant)
                ax.plot(steps, mean, color=color, linestyle=line, marker=marker, markersize=4, linewidth=1.4,
                        label=variant)
            metric = mine[0]["metric_name"]
            ax.set_title(f"{what}: {workload} ({mine[0]['model_size']}), {world} workers, heterogeneous "
                         f"(mean of {len({r['seed'] for r in mine})} seeds)", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out accuracy" if metric == "accuracy" else "held-out loss")
            if metric != "accuracy":
                low = min(min(e["metric"] for e in r["history"]["eval"]) for r in mine)
                ax.set_ylim(low - 0.05, low + 1.2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, filename), dpi=110)
        plt.close(fig)

    metric_panels([r for r in records if r["variant"] in STYLE], STYLE.__getitem__, "metric_vs_step.png",
                  "select rules")
    compared = {r["variant"] for r in records if r["compressor"] in ("dgc", "ef21")}
    if compared:
        compared |= {"none", "topk-0.01", "ar-leader-0.01", "ar-leader-0.02"}
        worlds = {(r["workload"], r["world"]) for r in records if r["compressor"] in ("dgc", "ef21")}
        metric_panels([r for r in records if r["variant"] in compared and (r["workload"], r["world"]) in worlds],
                      _compressor_style, "compressors_vs_step.png", "compressors")

    # How much of the agreed index set is new each step (select rules, mean over seeds).
    panels = sorted({(r["workload"], r["world"]) for r in records}, key=lambda t: (t[0] != "textcls", t))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (workload, world) in zip(axes[0], panels):
        mine = [r for r in records if (r["workload"], r["world"]) == (workload, world)
                and r["exchange"] == "allreduce" and r["variant"] in STYLE]
        for variant in sorted({r["variant"] for r in mine}, key=list(VARIANTS).index):
            runs = [r for r in mine if r["variant"] == variant]
            series = [r["history"]["set_new_fraction"][1:] for r in runs]
            mean = [statistics.mean(values) for values in zip(*series)]
            color, line, _ = STYLE[variant]
            ax.plot(range(WARMUP_STEPS + 1, WARMUP_STEPS + 1 + len(mean)), mean, color=color, linestyle=line,
                    linewidth=1.2, label=variant)
        ax.set_title(f"{workload}, {world} workers", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("share of the index set new this step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center right")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "set_new_fraction.png"), dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=sorted(MODEL_SIZE), default=[])
    parser.add_argument("--world", action="append", type=int, default=[])
    parser.add_argument("--seed", action="append", type=int, default=[])
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), default=[])
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--charlm-steps", type=int, default=None, help="charlm steps (default: the harness's)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose result file exists")
    parser.add_argument("--report", action="store_true", help="only write the table and the plot")
    args = parser.parse_args()
    if args.report:
        report()
        return
    steps = {"textcls": None, "charlm": args.charlm_steps}
    tasks = [(w, v, n, s, steps[w]) for w in (args.workload or ["textcls"]) for n in (args.world or [4])
             for v in (args.variant or DEFAULT_VARIANTS) for s in (args.seed or [0])
             if args.force or not os.path.exists(result_path(w, n, v, s))]
    # The longest runs first, so that the two workers finish together.
    tasks.sort(key=lambda t: (t[2], t[0] == "charlm"), reverse=True)
    started = time.perf_counter()
    if args.jobs > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for line in pool.imap_unordered(_run, tasks):
                print(line, flush=True)
    else:
        for task in tasks:
            print(_run(task), flush=True)
    print(f"{len(tasks)} runs in {(time.perf_counter() - started) / 60:.1f} min of wall time", flush=True)
    report()


if __name__ == "__main__":
    main()

"""What ``gradsieve-train`` reports: the comparison table, time-to-target and speed-ups against
dense all-reduce, ``metrics.json``/``metrics.csv`` and the plots.

Time-to-target is read from the evaluations a run made: the training seconds (the clock of
:mod:`gradsieve.train.run`, evaluations excluded) up to the first evaluation whose metric meets the
target. Its resolution is therefore the evaluation interval (``--eval-every``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from gradsieve.train import link
from gradsieve.train.cluster import CLUSTER_ENV
from gradsieve.train.run import human_bytes

__all__ = ["Target", "time_to_target", "add_speedups", "format_table", "write_outputs", "write_plots",
           "loss_figure", "report_comparison"]

METRICS = ("accuracy", "loss")

# What the table's "train loss" is (train_one's record["train_loss"]), printed under the table.
TRAIN_LOSS_NOTE = ("train loss: the training-batch loss averaged over all ranks at each step, then over "
                   "the last 10% of the steps (at least the last step); eval loss: the held-out loss "
                   "after the last step")


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal on the held-out metric: ``accuracy >= value`` or ``loss <= value``."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``accuracy=0.9``, ``acc=90%`` or ``loss=1.5``."""
        key, sep, value = str(text).partition("=")
        key = {"acc": "accuracy"}.get(key.strip().lower(), key.strip().lower())
        if not sep or key not in METRICS:
            raise ValueError(f"--target must be accuracy=VALUE or loss=VALUE, got {text!r}")
        value = value.strip()
        percent = value.endswith("%")
        try:
            number = float(value[:-1] if percent else value)
        except ValueError:
            raise ValueError(f"--target value must be a number, got {text!r}") from None
        if percent:
            number /= 100
        if not math.isfinite(number):
            raise ValueError(f"--target value must be finite, got {text!r}")
        if key == "accuracy" and not 0 < number <= 1:
            raise ValueError(f"--target accuracy must be a fraction in (0, 1] (or a percentage), got {text!r}")
        return cls(key, number)

    def met(self, loss: Optional[float], accuracy: Optional[float]) -> bool:
        if self.metric == "accuracy":
            return accuracy is not None and accuracy >= self.value
        return loss is not None and math.isfinite(loss) and loss <= self.value

    def describe(self) -> str:
        if self.metric == "accuracy":
            return f"accuracy >= {100 * self.value:g}%"
        return f"eval loss <= {self.value:g}"


def time_to_target(evals: Sequence[Dict[str, Any]], target: Target) -> Optional[Dict[str, float]]:
    """The first evaluation that meets ``target``: ``{"seconds", "step"}``, or None if none does."""
    for point in evals:
        if target.met(point.get("loss"), point.get("accuracy")):
            return {"seconds": float(point["seconds"]), "step": int(point["step"])}
    return None


def add_speedups(results: List[Dict[str, Any]], target: Optional[Target]) -> None:
    """Adds ``target_s``/``target_step`` and the speed-ups against the dense run (``none``) to each
    run: ``step_speedup`` (dense ms/step over this run's) and ``target_speedup`` (dense
    time-to-target over this run's; None when either did not reach the target)."""
    for r in results:
        reached = time_to_target(r["history"]["eval"], target) if target else None
        r["target_s"] = reached["seconds"] if reached else None
        r["target_step"] = reached["step"] if reached else None
    dense = next((r for r in results if r["compressor"] == "none"), None)
    for r in results:
        r["step_speedup"] = dense["time_per_step_s"] / r["time_per_step_s"] if dense else None
        both = dense is not None and dense["target_s"] and r["target_s"]
        r["target_speedup"] = dense["target_s"] / r["target_s"] if both else None


def _metric_cell(r: Dict[str, Any], has_accuracy: bool) -> str:
    if has_accuracy and r["accuracy"] is not None:
        return f"{100 * r['accuracy']:.1f}%"
    return "-"


def format_table(results: List[Dict[str, Any]], has_accuracy: bool, link: bool = False,
                 target: Optional[Target] = None, cross_node: bool = False) -> str:
    """The comparison as a text table, one row per run. ``bytes/step`` is what this rank handed to
    the collectives; ``link/step`` what crossed the shared emulated link; ``x-node/step`` what every
    emulated node's NIC sent, summed, per step after the warm-up."""
    header = ["compressor", "density", "train loss", "eval loss", "accuracy", "bytes/step", "vs fp32"]
    if link:
        header.append("link/step")
    if cross_node:
        header.append("x-node/step")
    header += ["ms/step", "speed-up"]
    if target is not None:
        header += ["to target", "speed-up "]
    rows = []
    for r in results:
        row = [
            r.get("name", r["compressor"]),
            "-" if r["density"] is None else f"{r['density']:g}",
            f"{r['train_loss']:.4f}",
            f"{r['eval_loss']:.4g}",
            _metric_cell(r, has_accuracy),
            human_bytes(r["wire_bytes_per_step"]),
            f"{r['compression_ratio']:.1f}x",
        ]
        if link:
            lb = r.get("link_bytes_per_step")
            row.append("-" if lb is None else human_bytes(lb))
        if cross_node:
            xb = r.get("cross_node_bytes_per_step")
            row.append("-" if xb is None else human_bytes(xb))
        row += [
            f"{1000 * r['time_per_step_s']:.1f}",
            "-" if r.get("step_speedup") is None else f"{r['step_speedup']:.2f}x",
        ]
        if target is not None:
            row += [
                "not reached" if r.get("target_s") is None else f"{r['target_s']:.1f} s",
                "-" if r.get("target_speedup") is None else f"{r['target_speedup']:.2f}x",
            ]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for row in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    out.append(TRAIN_LOSS_NOTE)
    if not any(r["compressor"] == "none" for r in results):
        out.append("(no dense run: add 'none' to --compare for the baseline and the speed-ups)")
    return "\n".join(out)


def _smooth(values: List[float], window: int) -> List[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# Each run's line: a line style and a marker of its own (4 x 10 combinations before one repeats),
# so that runs whose curves coincide (dense and fp16, sparse compressors at one density) stay
# apart; the markers sit every few points, at an offset of their own per run.
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
MARKS_PER_LINE = 8


def _line_style(index: int, count: int, points: int) -> Dict[str, Any]:
    """Keyword arguments of ``Axes.plot`` for run ``index`` of ``count`` with ``points`` points."""
    import matplotlib

    colours = matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors
    every = max(1, points // MARKS_PER_LINE)
    return {"color": colours[index % len(colours)], "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
            "marker": MARKERS[index % len(MARKERS)], "markevery": (index * every // max(1, count), every),
            "markersize": 5, "linewidth": 1.4, "markerfacecolor": "none"}


def _readable_log_axis(ax, axis: str = "y") -> None:
    """Plain-number ticks on a log axis spanning less than three decades: evenly spaced round
    numbers under one decade (1.5, 2, 2.5, ...), 1-2-5 steps under three; powers of ten beyond.
    Minor ticks unlabelled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if not 0 < low < high:
        return
    if high / low < 10:
        ticks = [v for v in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
                 if low <= v <= high]
        locator = FixedLocator(ticks)
    elif high / low < 1000:
        locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    else:
        return
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(locator)
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())
    if axis == "y":
        ax.set_ylim(low, high)
    else:
        ax.set_xlim(low, high)


def loss_figure(results: List[Dict[str, Any]], kind: str, title: str):
    """The training loss (moving average) of every run against ``kind``: ``"step"`` or
    ``"bytes"`` (cumulative MiB sent per rank). Returns the matplotlib Figure (the caller closes
    it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for index, r in enumerate(results):
        loss = r["history"]["loss"]
        y = _smooth(loss, max(1, len(loss) // 30))
        style = _line_style(index, len(results), len(y))
        if kind == "step":
            ax.plot(range(1, len(y) + 1), y, label=r["label"], **style)
        else:
            x = [max(b, 1) / 2**20 for b in r["history"]["cum_bytes"]]
            ax.plot(x, y, label=r["label"], **style)
    if kind == "step":
        ax.set_xlabel("step")
    else:
        ax.set_xlabel("cumulative MiB sent per rank")
        ax.set_xscale("log")
    ax.set_ylabel("training loss (moving average)")
    _finish(fig, ax, title, all(v > 0 for r in results for v in r["history"]["loss"]))
    return fig


def _finish(fig, ax, title: str, log_y: bool) -> None:
    """A log y axis with readable ticks when ``log_y``; the title, grid, legend and layout."""
    if log_y:
        ax.set_yscale("log")
        _readable_log_axis(ax)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()


def write_plots(out: str, results: List[Dict[str, Any]], title: str, has_accuracy: bool,
                target: Optional[Target] = None) -> List[str]:
    """``loss_vs_step.png``, ``loss_vs_bytes.png`` (training loss) and ``metric_vs_time.png`` (the
    held-out metric against training wall-clock seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind in ("step", "bytes"):
        fig = loss_figure(results, kind, title)
        path = os.path.join(out, f"loss_vs_{kind}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)

    use_accuracy = has_accuracy and (target is None or target.metric == "accuracy")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for index, r in enumerate(results):
        evals = r["history"]["eval"]
        xs = [e["seconds"] for e in evals]
        ys = [100 * e["accuracy"] if use_accuracy else e["loss"] for e in evals]
        style = _line_style(index, len(results), len(xs))
        style["markevery"] = 1  # one point per evaluation: every one marked
        ax.plot(xs, ys, label=r["label"], **style)
    if target is not None and target.metric == ("accuracy" if use_accuracy else "loss"):
        ax.axhline(100 * target.value if use_accuracy else target.value, color="grey", ls="--", lw=1,
                   label="target")
    ax.set_xlabel("training wall-clock seconds (evaluations excluded)")
    ax.set_ylabel("held-out accuracy (%)" if use_accuracy else "held-out loss")
    _finish(fig, ax, title, not use_accuracy and all(e["loss"] > 0 for r in results for e in r["history"]["eval"]))
    path = os.path.join(out, "metric_vs_time.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
    return paths


def write_outputs(out: str, config: Dict[str, Any], results: List[Dict[str, Any]]) -> None:
    """``metrics.json`` (config and every run with its histories) and ``metrics.csv`` (one row per
    run, no histories)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"config": config, "runs": results}, f, indent=1)
    columns = [k for k in results[0] if k not in ("history", "options")] + ["options"]
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: r[k] for k in columns if k != "options"}, "options": json.dumps(r["options"])})


def workload_title(args, world: int) -> str:
    name = args.workload + (f" {args.model_size}" if args.model_size else "")
    title = f"{name}, {world} workers" + (", heterogeneous" if args.heterogeneous else "")
    topology = cluster_topology()
    if topology is not None:
        nodes, local, rate = topology
        title = (f"{name}, {nodes} nodes x {local} ranks" + (", heterogeneous" if args.heterogeneous else "")
                 + f", NIC {link.LinkSpec.parse(rate).describe_nic()}")
    elif args.link:
        title += f", {link.LinkSpec.parse(args.link).describe()}"
    return title


def cluster_topology() -> Optional[tuple]:
    """(nodes, ranks per node, rate) in an emulated cluster's worker, else None."""
    text = os.environ.get(CLUSTER_ENV)
    if not text:
        return None
    nodes, local, rate = text.split(",", 2)
    return int(nodes), int(local), rate


def report_comparison(args, results: List[Dict[str, Any]], world: int, workload, backend: str) -> None:
    """``gradsieve-train``'s report on rank 0 after every run: speed-ups, metrics files, plots and
    the table."""
    target = Target(args.target_metric, args.target_value)
    if target.metric == "accuracy" and not workload.has_accuracy:
        target = None
    add_speedups(results, target)
    config = {
        "workload": args.workload, "model_size": args.model_size, "world_size": world, "backend": backend,
        "seed": args.seed, "heterogeneous": args.heterogeneous, "batch_size": args.batch_size, "lr": args.lr,
        "optimizer": args.optimizer, "momentum": args.momentum, "warmup_steps": args.warmup_steps,
        "eval_every": args.eval_every, "link": args.link,
        "cluster": None if cluster_topology() is None else dict(zip(("nodes", "nproc_per_node", "nic"),
                                                                     cluster_topology())),
        "target": None if target is None else dataclasses.asdict(target),
        "torch": torch.__version__, "cpu_count": os.cpu_count(),
    }
    write_outputs(args.out, config, results)
    title = workload_title(args, world)
    plots = write_plots(args.out, results, title, workload.has_accuracy, target)
    print()
    print(f"{title}, {results[0]['steps']} steps, seed {args.seed}, {backend}"
          + ("" if target is None else f"; target: {target.describe()}"))
    cross = any(r.get("cross_node_bytes_per_step") is not None for r in results)
    print(format_table(results, workload.has_accuracy, link=bool(args.link) and not cross, target=target,
                       cross_node=cross))
    if cross:
        print("x-node/step: bytes every node's NIC sent, summed, per step after the warm-up (headers included); "
              "bytes/step: what each rank handed to the collectives, warm-up included")
    print(f"wrote {os.path.join(args.out, 'metrics.json')}, metrics.csv, " + ", ".join(os.path.basename(p) for p in plots))

"""Issue 31, the 0.1% regime: every sparse compressor (its default wire, or the one ``--wire``
names) at densities 0.001 and 0.01, against dense DDP (``none``) and, with ``--baselines``,
PyTorch's bf16 hook and PowerSGD (rank 1 and 4), on a workload's default run, iid or
``--heterogeneous``, over seeds. ``summary`` prints the final metric per compressor (mean ± std)
and its distance from dense.

    python experiments/density/all_sparse.py run --workload digits --seeds 0 1 2
    python experiments/density/all_sparse.py run --workload textcls --seeds 0 1 2 --baselines \
        --heterogeneous --wire values=int4:chunk=32:index=local
    python experiments/density/all_sparse.py summary
    python experiments/density/all_sparse.py plot     # results/all_sparse/pareto_<workload>-<split>.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sweeps import cli, load, mean_std, train  # noqa: E402

COMPRESSORS = ["topk", "dgc", "regtopk", "ef21", "adaptive", "predictive", "granular"]
BASELINES = ["torch-bf16", "powersgd:rank=1", "powersgd:rank=4"]
RESULTS = os.path.join(HERE, "results", "all_sparse")
METRIC = {"digits": "accuracy", "charlm": "eval_loss", "textcls": "accuracy"}


def run(args) -> None:
    split = "het" if args.heterogeneous else "iid"
    wire = f":{args.wire}" if args.wire else ""
    tag = args.wire.replace("=", "").replace(":", "_") + "-" if args.wire else ""
    for density in args.densities:
        for seed in args.seeds:
            out = os.path.join(RESULTS, f"{args.workload}-{split}-{tag}d{density}-s{seed}")
            if os.path.exists(os.path.join(out, "metrics.json")):
                continue
            compare = ["none"] + (BASELINES if args.baselines else [])
            compare += [f"{name}:density={density}{wire}" for name in COMPRESSORS]
            train(out, args.workload, args.heterogeneous, seed, args.extra, compare)


def summary(_args) -> None:
    found = load(RESULTS)
    for setting in sorted(found):
        metric = METRIC[setting.split("-")[0]]
        scale = 100.0 if metric == "accuracy" else 1.0
        dense = [r.get(metric) for r in found[setting].get("none", [])]
        print(f"\n{setting} ({metric}, mean ± std over seeds; vs dense: the mean difference)")
        print(f"| compressor | {metric} | vs dense | KB/step sent | seeds |")
        print("| --- | --- | --- | --- | --- |")
        for name, records in found[setting].items():
            values = [r.get(metric) for r in records]
            gap = "-"
            if name != "none" and dense:
                gap = f"{(statistics.mean(values) - statistics.mean(dense)) * scale:+.{2 if scale > 1 else 3}f}"
            label = name if name in BASELINES else name.split(":")[0]
            kb = mean_std([r.get("wire_bytes_per_step") for r in records], 1e-3, 3)
            print(f"| {label} | {mean_std(values, scale)} | {gap} | {kb} | {len(records)} |")


def plot(_args) -> None:
    """Final metric against KB sent per step (mean over seeds), one point per compressor, wire and
    density, the baselines in black: results/all_sparse/pareto_<workload>-<split>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = load(RESULTS)
    panels = {}
    for setting, runs in found.items():
        workload, split = setting.split("-")[:2]
        wire = setting.split("-")[2] if setting.count("-") > 2 else "default wire"
        for name, records in runs.items():
            panels.setdefault((workload, split), []).append((name, wire, records))
    markers = dict(zip(COMPRESSORS, "osD^v<>"))
    for (workload, split), points in panels.items():
        metric = METRIC[workload]
        fig, ax = plt.subplots(figsize=(7, 4.8))
        seen = set()
        for name, wire, records in points:
            compressor = name.split(":")[0]
            x = statistics.mean(r["wire_bytes_per_step"] for r in records) / 1e3
            y = statistics.mean(r[metric] for r in records)
            if compressor in COMPRESSORS:
                color = {"default wire": "tab:blue", "valuesint8_indexlocal": "tab:orange"}.get(wire, "tab:green")
                pretty = wire.replace("values", "").replace("_chunk", "/").replace("_indexlocal", ", local index")
                label = pretty if wire not in seen else None
                seen.add(wire)
                ax.scatter([x], [y], marker=markers[compressor], color=color, label=label, s=22)
                ax.annotate(compressor, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            elif (name, "ref") not in seen:
                seen.add((name, "ref"))
                ax.scatter([x], [y], marker="*", color="black", s=40)
                ax.annotate(name, (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("KB sent per step (wire_bytes_per_step)")
        ax.set_ylabel(metric)
        ax.set_title(f"{workload} {split}: every sparse compressor at 0.001 and 0.01, by wire")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"pareto_{workload}-{split}.png"), dpi=120)
        plt.close(fig)


def run_arguments(r) -> None:
    r.add_argument("--workload", default="digits", choices=sorted(METRIC))
    r.add_argument("--densities", nargs="+", type=float, default=[0.001, 0.01])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--heterogeneous", action="store_true", help="each rank its own label skew")
    r.add_argument("--baselines", action="store_true", help="torch-bf16 and PowerSGD rank 1 and 4 too")
    r.add_argument("--wire", default="", help="wire options for every sparse compressor, e.g. "
                   "values=int4:chunk=32:index=local (the results go to "
                   "<workload>-<split>-valuesint4_chunk32_indexlocal-d...)")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more gradsieve-train arguments (e.g. --model-size small --steps 300)")


if __name__ == "__main__":
    cli(__doc__, run, summary, run_arguments, plot=plot)

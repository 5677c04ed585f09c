"""Issue 31, the 0.1% regime: every sparse compressor (its default wire, or the one ``--wire``
names) at densities 0.001 and 0.01, against dense DDP (``none``) and, with ``--baselines``,
PyTorch's bf16 hook and PowerSGD (rank 1 and 4), on a workload's default run, iid or
``--heterogeneous``, over seeds. ``summary`` prints the final metric per compressor (mean ± std)
and its distance from dense.

    python experiments/density/all_sparse.py run --workload digits --seeds 0 1 2
    python experiments/density/all_sparse.py run --workload textcls --seeds 0 1 2 --baselines \
        --heterogeneous --wire values=int4:chunk=32:index=local
    python experiments/density/all_sparse.py summary
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sweeps import load, mean_std, train  # noqa: E402

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
        print(f"| compressor | {metric} | vs dense | seeds |")
        print("| --- | --- | --- | --- |")
        for name, records in found[setting].items():
            values = [r.get(metric) for r in records]
            gap = "-"
            if name != "none" and dense:
                gap = f"{(statistics.mean(values) - statistics.mean(dense)) * scale:+.{2 if scale > 1 else 3}f}"
            label = name if name in BASELINES else name.split(":")[0]
            print(f"| {label} | {mean_std(values, scale)} | {gap} | {len(records)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workload", default="digits", choices=sorted(METRIC))
    r.add_argument("--densities", nargs="+", type=float, default=[0.001, 0.01])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--heterogeneous", action="store_true", help="each rank its own label skew")
    r.add_argument("--baselines", action="store_true", help="torch-bf16 and PowerSGD rank 1 and 4 too")
    r.add_argument("--wire", default="", help="wire options for every sparse compressor, e.g. "
                   "values=int4:chunk=32:index=local (the results go to <workload>-<split>-valuesint4_chunk32_indexlocal-d...)")
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more gradsieve-train arguments (e.g. --model-size small --steps 300)")
    sub.add_parser("summary")
    args = parser.parse_args()
    run(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    main()

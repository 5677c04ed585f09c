"""Issue 31, the 0.1% regime: every sparse compressor with its default wire at densities 0.001 and
0.01, against dense DDP (``none``), on a workload's default run, over seeds. ``summary`` prints the
final metric per compressor (mean ± std) and its distance from dense.

    python experiments/density/all_sparse.py run --workload digits --seeds 0 1 2
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
RESULTS = os.path.join(HERE, "results", "all_sparse")
METRIC = {"digits": "accuracy", "charlm": "eval_loss", "textcls": "accuracy"}


def run(args) -> None:
    for density in args.densities:
        for seed in args.seeds:
            out = os.path.join(RESULTS, f"{args.workload}-iid-d{density}-s{seed}")
            if os.path.exists(os.path.join(out, "metrics.json")):
                continue
            compare = ["none"] + [f"{name}:density={density}" for name in COMPRESSORS]
            train(out, args.workload, False, seed, args.extra, compare)


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
            print(f"| {name.split(':')[0]} | {mean_std(values, scale)} | {gap} | {len(records)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workload", default="digits", choices=sorted(METRIC))
    r.add_argument("--densities", nargs="+", type=float, default=[0.001, 0.01])
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="more gradsieve-train arguments (e.g. --model-size small --steps 300)")
    sub.add_parser("summary")
    args = parser.parse_args()
    run(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    main()

"""Issue 31, stochastic rounding: `topk` with int8, int4 and int2 values, rounded to nearest or
stochastically (``rounding=stochastic``), at the same density and wire (local index), over
seeds. With error feedback the rounding error of either kind stays in the residual; this measures
whether unbiased rounding trains any better. ``summary`` prints the final metric per variant.

    python experiments/density/rounding.py run --workload textcls --seeds 0 1 2
    python experiments/density/rounding.py summary
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sweeps import cli, load, mean_std, train  # noqa: E402

RESULTS = os.path.join(HERE, "results", "rounding")
WORKLOADS = {  # workload -> extra arguments and the metric reported
    "digits": ([], "accuracy"),
    "charlm": (["--model-size", "small", "--steps", "300"], "eval_loss"),
    "textcls": (["--model-size", "base"], "accuracy"),
}
WIRES = ("int8:256", "int4:32", "int2:8")


def variants(density: float, wires) -> list:
    out = []
    for wire in wires:
        codec, chunk = wire.split(":")
        base = f"topk:density={density}:values={codec}:chunk={chunk}:index=local"
        out += [base, base + ":rounding=stochastic"]
    return out


def run(args) -> None:
    extra, _ = WORKLOADS[args.workload]
    for seed in args.seeds:
        out = os.path.join(RESULTS, f"{args.workload}-iid-d{args.density}-s{seed}")
        if os.path.exists(os.path.join(out, "metrics.json")):
            continue
        train(out, args.workload, False, seed, extra, variants(args.density, args.wires))


def summary(_args) -> None:
    found = load(RESULTS)
    for setting in sorted(found):
        metric = WORKLOADS[setting.split("-")[0]][1]
        scale = 100.0 if metric == "accuracy" else 1.0
        print(f"\n{setting} ({metric}, mean ± std over seeds)")
        print(f"| values | chunk | rounding | {metric} | seeds |")
        print("| --- | --- | --- | --- | --- |")
        for name, records in found[setting].items():
            options = records[0].get("options", {})
            print(f"| {options.get('values')} | {options.get('chunk')} | {options.get('rounding', 'nearest')} | "
                  f"{mean_std([r.get(metric) for r in records], scale)} | {len(records)} |")


def run_arguments(r) -> None:
    r.add_argument("--workload", default="textcls", choices=sorted(WORKLOADS))
    r.add_argument("--density", type=float, default=0.01)
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--wires", nargs="+", default=list(WIRES), metavar="CODEC:CHUNK")


if __name__ == "__main__":
    cli(__doc__, run, summary, run_arguments)

"""The granular compressor against topk at the same bytes per step.

``gradsieve-train --compare`` for every (workload, seed): granular at a byte budget of 1% of the
dense fp32 bytes (``density=0.01``; int8 values) in each of its levels and policies, with and
without the Hessian probe and the rolling score, against ``topk`` with int8 values at densities
0.008 and 0.0066. 0.8% of the entries at 5 bytes and a bit each is 1% of the fp32 bytes, but
topk's int8 payload pads its entries to a multiple of the scale chunk (256), which on digits
doubles its bytes; granular fits its entries, padding included, in the budget, and on digits
sends 256 entries, as topk does at 0.66%. The bytes/step column says which pairs are equal. Each setting's metrics go under ``results/<workload>-iid-s<seed>/``;
existing results are reused.

    python experiments/granular/run.py                 # the sweep (about 20 min on 2 cores)
    python experiments/granular/run.py --summarize     # tables only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))
from sweeps import load as load_settings, mean_std, train  # noqa: E402

VARIANTS = [
    "none",
    "topk:values=int8:density=0.008",
    "topk:values=int8:density=0.0066",
    "granular",
    "granular:probe_every=0",
    "granular:rho=0.9",
    "granular:granularity=hybrid",
    "granular:granularity=layer",
    "granular:granularity=auto",
    "granular:granularity=auto:policy=bandit",
]
WHAT = {
    "none": "dense fp32 all-reduce",
    "topk:values=int8:density=0.008": "top-k by magnitude, int8, error feedback (0.8% of entries)",
    "topk:values=int8:density=0.0066": "the same, 0.66% of the entries",
    "granular": "weight level, Hessian probe every 25 steps (the default)",
    "granular:probe_every=0": "weight level, \\|a\\| alone (no probe)",
    "granular:rho=0.9": "weight level, rolling score (0.9 of the old score kept)",
    "granular:granularity=hybrid": "top entries inside the parameters holding half the bucket",
    "granular:granularity=layer": "whole parameters by mean influence, dense, no indices",
    "granular:granularity=auto": "rules: progress, loss steadiness, communication share",
    "granular:granularity=auto:policy=bandit": "discounted UCB on loss decrease per byte",
}
WORKLOADS = {"digits": ["--steps", "1000"], "charlm": []}
SEEDS = (0, 1, 2)


def sweep(only: List[str]) -> None:
    for seed in SEEDS:
        for workload, extra in WORKLOADS.items():
            tag = f"{workload}-iid-s{seed}"
            out = os.path.join(RESULTS, tag)
            if only and tag not in only:
                continue
            if not os.path.exists(os.path.join(out, "metrics.json")):
                train(out, workload, False, seed, ["--density", "0.01", *extra], VARIANTS)


def summarize() -> None:
    lines: List[str] = []
    table: Dict[str, Dict[str, dict]] = {}
    for setting, runs in load_settings(RESULTS).items():
        if setting.split("-")[0] not in WORKLOADS:  # speculative-*: speculative.py's results
            continue
        metric = "accuracy" if setting.startswith("digits") else "eval_loss"
        scale = 100.0 if metric == "accuracy" else 1.0
        lines += [f"### {setting} ({len(next(iter(runs.values())))} seeds; {metric}"
                  f"{' %' if scale == 100 else ''}: mean ± std)", "",
                  f"| variant | what | {metric} | train loss | bytes/step | ms/step | probe share | levels played |",
                  "|---|---|---|---|---|---|---|---|"]
        for name in VARIANTS:
            records = runs.get(name)
            if not records:
                continue
            played: Dict[str, int] = {}
            for r in records:
                for level, n in (r["history"]["eval"][-1].get("level_steps") or {}).items():
                    played[level] = played.get(level, 0) + n
            row = {metric: [r[metric] for r in records], "bytes": [r["wire_bytes_per_step"] for r in records],
                   "train_loss": [r["train_loss"] for r in records],
                   "step_ms": [1000 * r["time_per_step_s"] for r in records],
                   "probe_share": [r.get("probe_share") for r in records], "levels": played}
            table.setdefault(setting, {})[name] = row
            shown = ", ".join(f"{k} {v}" for k, v in played.items()) if played else "-"
            lines.append(f"| `{name}` | {WHAT.get(name, '')} | {mean_std(row[metric], scale)} | "
                         f"{mean_std(row['train_loss'])} | {statistics.mean(row['bytes']) / 1024:.2f} KB | "
                         f"{mean_std(row['step_ms'], digits=3)} | {mean_std(row['probe_share'], 100, 2)}"
                         f"{'%' if any(row['probe_share']) else ''} | {shown} |")
        lines.append("")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(RESULTS, "summary.json"), "w") as f:
        json.dump(table, f, indent=1)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--summarize", action="store_true", help="tables from existing results")
    parser.add_argument("--only", nargs="*", default=[], help="settings to run (e.g. digits-iid-s0)")
    args = parser.parse_args()
    if not args.summarize:
        sweep(args.only)
    summarize()


if __name__ == "__main__":
    main()

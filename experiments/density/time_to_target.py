"""Issue 31, the trade a user makes: fewer bits per entry buy more entries (or more steps) in the
same time over a slow link. ``gradsieve-train --link 100mbit`` on textcls (base, 150 steps, target
75% held-out accuracy) with topk at fp32 values against the low-bit wire (int4, one scale per 32
entries, local index) at density 0.01 and at higher densities that still send fewer bytes, over
seeds; dense DDP and PyTorch's bf16 hook as references. ``summary`` prints seconds to target,
final accuracy, bytes and ms per step (median over seeds). Needs root (the emulated link) and a
quiet machine: step times are measured.

    python experiments/density/time_to_target.py run --seeds 0 1 2
    python experiments/density/time_to_target.py summary
"""

from __future__ import annotations

import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sweeps import cli, load, train  # noqa: E402

RESULTS = os.path.join(HERE, "results", "time_to_target")
LOW_BIT = "values=int4:chunk=32:index=local"
VARIANTS = ["topk", f"topk:{LOW_BIT}", f"topk:density=0.015:{LOW_BIT}", f"topk:density=0.02:{LOW_BIT}",
            f"topk:density=0.03:{LOW_BIT}", "topk:density=0.02:values=int8:index=local"]
REFERENCES = ["none", "torch-bf16"]


def run(args) -> None:
    for seed in args.seeds:
        out = os.path.join(RESULTS, f"textcls-100mbit-s{seed}")
        if os.path.exists(os.path.join(out, "metrics.json")):
            continue
        # The dense references take about 100 s each: seed 0 only unless asked.
        compare = (REFERENCES if seed == args.seeds[0] or args.references else []) + VARIANTS
        train(out, "textcls", False, seed, ["--model-size", "base", "--link", "100mbit"], compare)


def summary(_args) -> None:
    found = load(RESULTS)
    for setting, runs in sorted(found.items()):
        print(f"\n{setting} (medians over seeds; to target: the seeds that reached 75%)")
        print("| variant | density | accuracy | to target (s) | reached | KB/step | ms/step | seeds |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, records in runs.items():
            reached = [r["target_s"] for r in records if r.get("target_s") is not None]
            to_target = f"{statistics.median(reached):.1f}" if reached else "not reached"
            accuracy = statistics.median(r["accuracy"] for r in records) * 100
            kb = statistics.median(r["wire_bytes_per_step"] for r in records) / 1e3
            ms = statistics.median(r["time_per_step_s"] for r in records) * 1e3
            density = records[0].get("density") or "-"
            print(f"| {name} | {density} | {accuracy:.1f}% | {to_target} | {len(reached)}/{len(records)} | "
                  f"{kb:.1f} | {ms:.1f} | {len(records)} |")


def run_arguments(r) -> None:
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--references", action="store_true", help="dense and bf16 for every seed")


if __name__ == "__main__":
    cli(__doc__, run, summary, run_arguments)

"""Shows that a change keeps every training result bit for bit.

``run OUT`` trains short runs of every compressor and many variants (int8 and csr16 wire formats,
per-layer scope, speculative training, granular's auto policies, PyTorch's own hooks) with
``gradsieve-train`` on the digits, charlm and textcls workloads, 2 and 3 local workers, and keeps
their records in OUT (about a minute on 2 cores). ``compare BEFORE AFTER`` compares two such
folders: every run's per-step losses, evaluations, bytes on the wire, skipped steps and reported
counters must be equal; wall-clock times are not compared. Runs whose result depends on the clock
(granular's rules policy reads the measured communication share) run with ``comm_bound=1.0``.

Example::

    git stash; python scripts/same_results.py run /tmp/before; git stash pop
    python scripts/same_results.py run /tmp/after
    python scripts/same_results.py compare /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

RUNS = {
    "digits": ["--workload", "digits", "--steps", "24", "--eval-every", "6", "--warmup-steps", "2", "--compare",
               "none,fp16,bf16,torch-fp16,powersgd,topk,topk:values=int8,topk:index=csr16:checksum=true,"
               "topk:scope=layer:compress_1d=false,dgc,ef21,regtopk,adaptive,predictive,granular,"
               "granular:granularity=auto:comm_bound=1.0,granular:granularity=auto:policy=bandit,"
               "granular:speculative=true,topk:speculative=true,dgc:speculative=true:overlap_compress=false,"
               "granular:granularity=hybrid:speculative=true:revert_threshold=0"],
    "charlm": ["--workload", "charlm", "--model-size", "tiny", "--steps", "16", "--eval-every", "8", "--compare",
               "topk,adaptive,predictive,regtopk,granular:granularity=auto:comm_bound=1.0,ef21"],
    "textcls": ["--workload", "textcls", "--model-size", "small", "--steps", "16", "--eval-every", "8",
                "--nproc", "3", "--compare", "topk,dgc,granular:speculative=true,none"],
}
COMPARED = ("train_loss", "eval_loss", "accuracy", "wire_bytes_per_step", "dense_bytes_per_step", "skipped_steps",
            "probes")


def run(out: str) -> int:
    for name, args in RUNS.items():
        cmd = [sys.executable, "-m", "gradsieve.train", *args, "--no-progress", "--out", os.path.join(out, name)]
        print("same_results:", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
            return done.returncode
    return 0


def _comparable(record: Dict[str, Any]) -> Dict[str, Any]:
    history = record["history"]
    evals = [{k: v for k, v in e.items() if k != "seconds"} for e in history["eval"]]
    counters = {k: v for k, v in record.items() if k.endswith("_per_step") and k not in
                ("time_per_step_s", "compress_s_per_step", "decode_s_per_step", "link_bytes_per_step")}
    return {**{k: record.get(k) for k in COMPARED}, **counters, "loss": history["loss"],
            "cum_bytes": history["cum_bytes"], "eval": evals}


def compare(before: str, after: str) -> int:
    differ: List[str] = []
    count = 0
    for name in RUNS:
        runs = []
        for folder in (before, after):
            with open(os.path.join(folder, name, "metrics.json")) as f:
                runs.append(json.load(f)["runs"])
        if [r["name"] for r in runs[0]] != [r["name"] for r in runs[1]]:
            differ.append(f"{name}: the runs differ: {[r['name'] for r in runs[0]]} / {[r['name'] for r in runs[1]]}")
            continue
        for a, b in zip(*runs):
            count += 1
            x, y = _comparable(a), _comparable(b)
            keys = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
            if keys:
                differ.append(f"{name} {a['name']}: {', '.join(keys)}")
    for line in differ:
        print("same_results: DIFFERENT", line)
    print(f"same_results: {count} runs compared, {len(differ)} differ")
    return 1 if differ else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("out")
    both = sub.add_parser("compare")
    both.add_argument("before")
    both.add_argument("after")
    args = parser.parse_args(argv)
    return run(args.out) if args.command == "run" else compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())

"""Step time over emulated links: link rate x compressor x workers, with gradsieve-train --link.

For each link rate (``--rates``) and worker count (``--workers``) it runs one ``gradsieve-train``
comparison of every compressor (``--compare``, torch's own hooks included) on the
communication-bound workload, in a private network namespace whose loopback is rate-limited
(:mod:`gradsieve.train.link`), and collects per run: median ms/step, the bytes each rank put into
collectives, the bytes that crossed the shaped link (all ranks, TCP/IP headers included), the
compress/decode time, and the speed-up against dense all-reduce in the same comparison. Writes
``bench_network.json``/``.csv`` and the break-even plot ``bench_network.png`` (speed-up against link
rate) to ``--out``; ``benchmarks/cost_model.py`` reads the JSON.

Steps per run are chosen per rate so that the slow links stay affordable (``--steps``): the median
step time needs a handful of compressed steps, not convergence.

    python benchmarks/bench_network.py                      # the full sweep (about 30 min on 2 cores)
    python benchmarks/bench_network.py --rates 100mbit --workers 2 --compare none,topk
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

DEFAULT_COMPARE = ("none,torch-fp16,powersgd,powersgd:rank=4,topk,topk:values=int8,topk:values=int8:index=csr16,"
                   "dgc,ef21,regtopk,adaptive,adaptive:beta=0.7,predictive")
DEFAULT_STEPS = {"10mbit": 8, "100mbit": 20, "1gbit": 40, "unlimited": 40}


def rate_bits(rate: str):
    from gradsieve.train.link import LinkSpec

    return LinkSpec.parse(rate).rate_bits


def run_point(rate: str, workers: int, args, out_dir: str) -> List[Dict]:
    steps = args.steps.get(rate, DEFAULT_STEPS.get(rate, 20))
    cmd = [sys.executable, "-m", "gradsieve.train", "--link", rate, "--nproc", str(workers),
           "--workload", args.workload, "--compare", args.compare, "--density", str(args.density),
           "--steps", str(steps), "--eval-every", str(steps), "--no-progress", "--out", out_dir,
           "--seed", str(args.seed)]
    if args.model_size:
        cmd += ["--model-size", args.model_size]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"bench_network: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.json")) as f:
        metrics = json.load(f)
    rows = []
    for r in metrics["runs"]:
        # Per-step bytes of the steps the median time is taken over (after the warm-up): the steady
        # state, without the dense warm-up steps (PowerSGD's start_iter among them).
        wire = _median_step(r["history"]["cum_bytes"])
        link_steady = _median_step(r["history"]["link_cum_bytes"])
        rows.append({
            "rate": rate, "rate_bits": rate_bits(rate), "workers": workers, "workload": args.workload,
            "model_size": metrics["config"].get("model_size"), "name": r["name"], "compressor": r["compressor"],
            "source": r["source"], "density": r["density"], "steps": r["steps"],
            "ms_per_step": 1e3 * r["time_per_step_s"],
            "wire_bytes_per_step": r["wire_bytes_per_step"],
            "dense_bytes_per_step": r["dense_bytes_per_step"],
            "link_bytes_per_step": r["link_bytes_per_step"],
            "wire_bytes_steady": wire,
            "link_bytes_steady": link_steady,
            "compress_ms_per_step": None if r["compress_s_per_step"] is None else 1e3 * r["compress_s_per_step"],
            "decode_ms_per_step": None if r["decode_s_per_step"] is None else 1e3 * r["decode_s_per_step"],
            "step_speedup": r.get("step_speedup"),
            "step_ms_all": [1e3 * s for s in r["history"]["step_s"]],
        })
    print(f"bench_network: {rate:>9} x {workers} workers: {len(rows)} runs in {wall:.0f} s", file=sys.stderr)
    return rows


def _median_step(cumulative: List[float]):
    """Median of the per-step increments of a cumulative series, over its second half (past any
    warm-up); None for an empty series."""
    if not cumulative:
        return None
    steps = [b - a for a, b in zip([0] + cumulative[:-1], cumulative)]
    tail = steps[len(steps) // 2:]
    return statistics.median(tail)


def print_table(rows: List[Dict]) -> None:
    header = f"{'rate':>9} {'N':>2} {'compressor':22} {'ms/step':>9} {'bytes/step':>11} {'link/step':>11} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        link = "-" if r["link_bytes_steady"] is None else f"{r['link_bytes_steady'] / 2**20:9.3f}MB"
        speed = "-" if r["step_speedup"] is None else f"{r['step_speedup']:8.2f}x"
        print(f"{r['rate']:>9} {r['workers']:>2} {r['name']:22} {r['ms_per_step']:9.1f} "
              f"{r['wire_bytes_steady'] / 2**20:9.3f}MB {link:>11} {speed:>9}")


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worker_counts = sorted({r["workers"] for r in rows})
    fig, axes = plt.subplots(1, len(worker_counts), figsize=(5.6 * len(worker_counts), 4.4), dpi=110,
                             squeeze=False, sharey=True)
    shaped = sorted({r["rate_bits"] for r in rows if r["rate_bits"]})
    unlimited_x = (shaped[-1] * 10) if shaped else 1e10
    for ax, n in zip(axes[0], worker_counts):
        names = list(dict.fromkeys(r["name"] for r in rows if r["workers"] == n))
        for name in names:
            pts = sorted(((r["rate_bits"] or unlimited_x), r["step_speedup"]) for r in rows
                         if r["workers"] == n and r["name"] == name and r["step_speedup"])
            if pts:
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [b / 1e6 for b in shaped] + [unlimited_x / 1e6]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks[:-1]] + ["unshaped"])
        ax.set_xlabel("link rate, Mbit/s (shared by all workers)")
        ax.set_title(f"{n} workers: step-time speed-up over dense all-reduce")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("dense ms/step / ms/step")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="10mbit,100mbit,1gbit,unlimited")
    p.add_argument("--workers", default="2,4")
    p.add_argument("--compare", default=DEFAULT_COMPARE)
    p.add_argument("--workload", default="textcls")
    p.add_argument("--model-size", default=None)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", action="append", default=[], metavar="RATE=N",
                   help=f"steps per run at a rate (defaults: {DEFAULT_STEPS})")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    args.steps = {k: int(v) for k, _, v in (s.partition("=") for s in args.steps)}
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    workers = [int(w) for w in args.workers.split(",")]

    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            for rate in rates:
                rows.extend(run_point(rate, n, args, os.path.join(tmp, f"{rate}_{n}")))
    print_table(rows)
    os.makedirs(args.out, exist_ok=True)
    import torch

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "kernel": platform.release(), "workload": args.workload, "model_size": args.model_size,
            "compare": args.compare, "density": args.density}
    with open(os.path.join(args.out, "bench_network.json"), "w") as f:
        json.dump({"machine": meta, "rows": rows}, f, indent=1)
    fields = [k for k in rows[0] if k != "step_ms_all"]
    with open(os.path.join(args.out, "bench_network.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, os.path.join(args.out, "bench_network.png"))
    print(f"bench_network: wrote {args.out}/bench_network.json, .csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

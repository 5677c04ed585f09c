"""The exchanges on emulated clusters: ``gradsieve-train --nodes N --nproc L --link RATE`` for each
layout and NIC rate, one ``--compare`` per point, so that every run of a point shares the machine's
state.

Points: 2 nodes x 2 ranks and 4 nodes x 1 rank, at 100 Mbit/s and 1 Gbit/s per node NIC (and, with
``--points 2x1@100mbit``, 2 nodes of 1 rank, to see what grows with the ranks). Runs:
DDP's all-reduce (``none``), PyTorch's ``bf16_compress_hook`` and PowerSGD (rank 1), ``topk`` at
density 0.01 with each exchange (``allgather``, ``hierarchical``, ``allreduce``), and ``regtopk``
and ``dgc`` with the hierarchical exchange (regtopk chooses its own entries, so it cannot use the
all-reduce's agreed set). Each point's report lands in ``OUT/<workload>-<N>x<L>-<rate>/``
(``metrics.json``: every run's record, with ``cross_node_bytes_per_step``), and a table of all
points in ``OUT/<workload>-summary.md``.

    python benchmarks/bench_cluster.py                       # textcls, all points (~20 min on 2 cores)
    python benchmarks/bench_cluster.py --points 2x2@1gbit    # one point
    python benchmarks/cost_model.py --cluster-report OUT/textcls-2x2-1gbit/metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
POINTS = ("2x2@100mbit", "4x1@100mbit", "2x2@1gbit", "4x1@1gbit")
RUNS = ("none,torch-bf16,powersgd,topk,topk:exchange=hierarchical,topk:exchange=allreduce,"
        "regtopk:exchange=hierarchical,dgc:exchange=hierarchical")


def run_point(point: str, workload: str, out: str, runs: str, extra: List[str]) -> Dict:
    layout, rate = point.split("@")
    nodes, local = (int(x) for x in layout.split("x"))
    folder = os.path.join(out, f"{workload}-{nodes}x{local}-{rate}")
    cmd = [sys.executable, "-m", "gradsieve.train", "--workload", workload, "--nodes", str(nodes), "--nproc",
           str(local), "--link", rate, "--compare", runs, "--no-progress", "--out", folder, *extra]
    print("bench_cluster:", " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"bench_cluster: {point} failed: {done.stderr.strip().splitlines()[-1:]}")
    print(done.stdout, flush=True)
    with open(os.path.join(folder, "metrics.json")) as f:
        report = json.load(f)
    return {"point": point, "nodes": nodes, "local": local, "rate": rate, "seconds": seconds,
            "table": done.stdout, "runs": report["runs"]}


def summary(points: List[Dict], workload: str) -> str:
    lines = [f"# {workload} on emulated clusters", "",
             "| point | run | metric | train loss | ms/step | to target (s) | bytes/step | x-node/step | "
             "x-node per node |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        for r in p["runs"]:
            metric = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
            if r["accuracy"] is None:
                metric = f"eval loss {r['eval_loss']:.3f}"
            cross = r.get("cross_node_bytes_per_step")
            lines.append(
                f"| {p['nodes']}x{p['local']} @ {p['rate']} | {r['name']} | {metric} | {r['train_loss']:.3f} | "
                f"{1000 * r['time_per_step_s']:.1f} | "
                f"{'not reached' if r.get('target_s') is None else format(r['target_s'], '.1f')} | "
                f"{r['wire_bytes_per_step'] / 1e3:.1f} KB | "
                f"{'-' if cross is None else format(cross / 1e3, '.1f') + ' KB'} | "
                f"{'-' if cross is None else format(cross / p['nodes'] / 1e3, '.1f') + ' KB'} |")
    lines.append("")
    lines += [f"- {p['nodes']}x{p['local']} @ {p['rate']}: {p['seconds']:.0f} s for the point" for p in points]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="textcls")
    p.add_argument("--points", default=",".join(POINTS), help="comma-separated NxL@RATE")
    p.add_argument("--runs", default=RUNS, help="the --compare of every point")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cluster"))
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more gradsieve-train arguments, after --")
    args = p.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    points = [run_point(point, args.workload, args.out, args.runs, extra) for point in args.points.split(",")]
    text = summary(points, args.workload)
    path = os.path.join(args.out, f"{args.workload}-summary.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"bench_cluster: wrote {path}")


if __name__ == "__main__":
    main()

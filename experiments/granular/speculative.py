"""Speculative training (gradsieve.SpeculativeOptimizer) on and off, in wall-clock time.

``gradsieve-train`` runs granular without and with ``speculative=true`` (with its memory committed
early, ``overlap_compress``, the default, and without) at a few byte budgets, once over the
emulated 100 Mbit/s link (``--link 100mbit``) and once over the unshaped loopback, where
communication costs almost nothing. The unshaped pair gives the compute
time per step and the wrapper's own cost; the shaped pair what communication adds and how much of
it the overlap takes back:

    hidden, net   = (sync over the link - speculative over the link) / (sync over the link - sync unshaped)
    hidden, gross = 1 - (time speculative still waited for an exchange) / (sync over the link - sync unshaped)

(net counts the wrapper's own cost against the overlap; gross does not).

Each setting's metrics go under ``results/speculative-<link>-s<seed>/``; existing results are
reused.

    python experiments/granular/speculative.py               # about 8 min per seed on 2 cores
    python experiments/granular/speculative.py --summarize   # the table only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))
from sweeps import train  # noqa: E402

WORKLOAD = "textcls"
DENSITIES = ("0.01", "0.05", "0.2")
THRESHOLD = "0.01"
LINKS = {"100mbit": ["--link", "100mbit"], "loopback": []}
SEEDS = (0, 1)


def compare() -> List[str]:
    runs = []
    for density in DENSITIES:
        spec = f"granular:density={density}:speculative=true:revert_threshold={THRESHOLD}"
        runs += [f"granular:density={density}", spec, f"{spec}:overlap_compress=false"]
    return runs


def tag(link: str, seed: int) -> str:
    return f"speculative-{link}-s{seed}"


def sweep() -> None:
    for seed in SEEDS:
        for link, extra in LINKS.items():
            out = os.path.join(RESULTS, tag(link, seed))
            if os.path.exists(os.path.join(out, "metrics.json")):
                print(f"= {tag(link, seed)} (kept)")
                continue
            train(out, WORKLOAD, False, seed, extra, compare())


def load(link: str, seed: int) -> Dict[str, dict]:
    with open(os.path.join(RESULTS, tag(link, seed), "metrics.json")) as f:
        return {run["name"]: run for run in json.load(f)["runs"]}


def summarize() -> str:
    lines = ["| seed | density | link KB/step | compress ms/step | speculative | ms/step unshaped: sync / spec | "
             "ms/step 100 Mbit/s: sync / spec | communication added (sync) | spec still waits | "
             "hidden, net (gross) | reverts | accuracy sync / spec |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for seed in SEEDS:
        shaped, free = load("100mbit", seed), load("loopback", seed)
        for density in DENSITIES:
            sync = f"granular:density={density}"
            base = f"{sync}:speculative=True:revert_threshold={THRESHOLD}"
            for label, spec in (("overlap_compress (default)", base),
                                ("commit on landing", f"{base}:overlap_compress=False")):
                if spec not in shaped or spec not in free:
                    continue
                ms = {(k, n): runs[n]["time_per_step_s"] * 1000 for k, runs in (("free", free), ("link", shaped))
                      for n in (sync, spec)}
                added = ms["link", sync] - ms["free", sync]
                hidden = (ms["link", sync] - ms["link", spec]) / added if added > 0 else float("nan")
                info = shaped[spec]["speculative"]
                wait = info["wait_s_per_step"] * 1000
                gross = (added - wait) / added if added > 0 else float("nan")
                link_kb = (shaped[sync]["link_bytes_per_step"] or 0) / 1024
                compress = shaped[sync]["compress_s_per_step"] * 1000
                lines.append(
                    f"| {seed} | {density} | {link_kb:.0f} | {compress:.1f} | {label} | {ms['free', sync]:.1f} / "
                    f"{ms['free', spec]:.1f} | {ms['link', sync]:.1f} / {ms['link', spec]:.1f} | {added:.1f} ms | "
                    f"{wait:.1f} ms | {hidden:.0%} ({gross:.0%}) | {info['revert_rate']:.0%} | "
                    f"{shaped[sync]['accuracy']:.1%} / {shaped[spec]['accuracy']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--summarize", action="store_true", help="print the table from stored results")
    args = p.parse_args()
    if not args.summarize:
        sweep()
    print(summarize())


if __name__ == "__main__":
    main()

"""Helpers the experiment scripts share: run one ``gradsieve-train --compare`` per (workload, data
split, seed), read the stored runs back grouped by setting, and print mean ± std over seeds."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import argparse
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out: str, workload: str, heterogeneous: bool, seed: int, extra: List[str], compare: List[str]) -> None:
    """``gradsieve-train --compare`` of ``compare`` into ``out`` (``extra``: more arguments)."""
    cmd = [sys.executable, "-m", "gradsieve.train", "--workload", workload, "--compare", ",".join(compare),
           "--seed", str(seed), "--no-progress", "--out", out, *extra]
    if heterogeneous:
        cmd.append("--heterogeneous")
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def load(results: str) -> Dict[str, Dict[str, List[dict]]]:
    """{setting "digits-iid": {variant: [run record per seed]}} from ``results/<setting>-s<seed>*/``
    (``digits-iid-s0`` and ``digits-iid-s0-round2`` both belong to ``digits-iid``)."""
    found: Dict[str, Dict[str, List[dict]]] = {}
    for tag in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        path = os.path.join(results, tag, "metrics.json")
        if "-s" not in tag or not os.path.exists(path):
            continue
        setting = tag.rsplit("-s", 1)[0]
        with open(path) as f:
            for run in json.load(f)["runs"]:
                found.setdefault(setting, {}).setdefault(run["name"], []).append(run)
    return found


def mean_std(values: List[float], scale: float = 1.0, digits: int = 4) -> str:
    """``mean ± std`` of the finite values (times ``scale``), the value alone for one, ``-`` for none."""
    values = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.2g}"


def cli(doc: str, run: Callable, summary: Callable, run_arguments: Callable[[argparse.ArgumentParser], None],
        **more: Callable) -> None:
    """The command line of an experiment script: ``run`` (its arguments added by
    ``run_arguments``), ``summary`` or one of ``more`` (e.g. ``plot=...``), each called with the
    parsed arguments."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_arguments(sub.add_parser("run"))
    sub.add_parser("summary")
    for name in more:
        sub.add_parser(name)
    args = parser.parse_args()
    {"run": run, "summary": summary, **more}[args.command](args)

"""benchmarks/bench_network.py and benchmarks/cost_model.py end to end on a tiny sweep (digits, 2
workers, an unlimited and a shaped link), where this machine allows private network namespaces."""

import json
import os
import subprocess
import sys

import pytest

from test_link import requires_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@requires_netns
def test_tiny_sweep_and_cost_model(tmp_path):
    out = tmp_path / "results"
    sweep = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_network.py"), "--rates", "20mbit,unlimited",
         "--workers", "2", "--workload", "digits", "--compare", "none,powersgd,topk:values=int8",
         "--steps", "20mbit=6", "--steps", "unlimited=6", "--out", str(out)],
        capture_output=True, text=True, timeout=400)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    rows = json.loads((out / "bench_network.json").read_text())["rows"]
    assert {(r["rate"], r["name"]) for r in rows} == {
        (rate, name) for rate in ("20mbit", "unlimited") for name in ("none", "powersgd r1", "topk:values=int8")}
    by = {(r["rate"], r["name"]): r for r in rows}
    dense = by[("20mbit", "none")]
    # Two ranks' ring all-reduce: about twice the gradient crosses the shared queue per step (the
    # average over the run: a single step's reading can catch the other rank mid-transfer).
    assert 2 * dense["wire_bytes_steady"] <= dense["link_bytes_per_step"] < 2.2 * dense["wire_bytes_steady"]
    assert by[("20mbit", "topk:values=int8")]["step_speedup"] > 2
    assert (out / "bench_network.png").read_bytes()[:4] == b"\x89PNG"

    model = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cost_model.py"),
                            "--measurements", str(out / "bench_network.json"), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert model.returncode == 0, model.stderr[-3000:]
    check = json.loads((out / "cost_model.json").read_text())["check"]
    assert len(check["points"]) == 3
    # The shaped dense step is predicted from the unlimited one plus bytes over rate.
    dense_point = next(p for p in check["points"] if p["name"] == "none")
    assert abs(dense_point["error"]) < 0.3
    assert (out / "cost_model.png").read_bytes()[:4] == b"\x89PNG"

"""benchmarks/bench_network.py and benchmarks/cost_model.py end to end on a tiny sweep (digits, 2
workers, an unlimited and a shaped link), where this machine allows private network namespaces.

Only what a busy machine cannot change is asserted here: bytes, and the cost model's arithmetic on
the measurements. The wall-clock outcomes (top-k's speed-up, the model's error) are
``benchmarks/check_timing.py``'s sweep check, on a quiet machine."""

import json
import os
import subprocess
import sys

import pytest

from test_link import requires_netns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow  # two gradsieve-train sweeps in private namespaces


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
    # What makes int8 top-k faster on a slow link: its steady steps put less than a quarter of the
    # dense run's bytes on the link (about a twentieth; headers included).
    sparse = by[("20mbit", "topk:values=int8")]
    assert sparse["link_bytes_steady"] < 0.25 * dense["link_bytes_per_step"]
    # The speed-up is the dense run's step time over the run's, in the same comparison.
    for rate in ("20mbit", "unlimited"):
        for name in ("none", "powersgd r1", "topk:values=int8"):
            row = by[(rate, name)]
            assert row["step_speedup"] == pytest.approx(by[(rate, "none")]["ms_per_step"] / row["ms_per_step"])
    assert (out / "bench_network.png").read_bytes()[:4] == b"\x89PNG"

    model = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "cost_model.py"),
                            "--measurements", str(out / "bench_network.json"), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert model.returncode == 0, model.stderr[-3000:]
    check = json.loads((out / "cost_model.json").read_text())["check"]
    assert len(check["points"]) == 3
    # The shaped dense step is predicted from the unlimited one plus bytes over rate: a ring
    # all-reduce of 2 ranks puts twice the payload (times the measured header overhead) on the
    # queue. The error against the measurement is the check's.
    dense_point = next(p for p in check["points"] if p["name"] == "none")
    unlimited = by[("unlimited", "none")]["ms_per_step"]
    over_rate = 1e3 * check["header_overhead"] * 2 * dense["wire_bytes_steady"] * 8 / 20e6
    assert dense_point["predicted_ms"] == pytest.approx(unlimited + over_rate)
    assert dense_point["measured_ms"] == dense["ms_per_step"]
    assert dense_point["error"] == pytest.approx(dense_point["predicted_ms"] / dense_point["measured_ms"] - 1)
    assert (out / "cost_model.png").read_bytes()[:4] == b"\x89PNG"

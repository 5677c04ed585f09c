"""Timing checks that need a quiet machine: wall-clock windows that the test suite does not assert.

A test must not fail because the machine is busy, so the tests keep only what holds whatever the
load (bytes, messages, lower bounds that the kernel's rate limit enforces); the upper bounds of a
wall-clock window live here. Run on an otherwise idle machine (each check is a few tens of
seconds on 2 cores); the exit status is 0 when every check passed.

    python benchmarks/check_timing.py                 # every check
    python benchmarks/check_timing.py --only link_rate,stopped_worker

- ``link_rate``: a payload over a 40 Mbit/s emulated link moves at the set rate, within 15%
  (tests/test_link.py keeps the lower bound: never faster than the rate).
- ``stopped_worker``: with ``--timeout 4`` a SIGSTOPped worker fails the run 4 to 25 s after the
  stop: the timeout, a step in flight and the launcher's short grace period; not 30 s, not
  forever (tests/test_train.py keeps the failure and its message).
- ``sweep``: on a 20 Mbit/s link, top-k with int8 values steps more than 2x faster than dense
  all-reduce on digits, and the cost model predicts the shaped dense step within 30%
  (tests/test_bench_network.py keeps the bytes and the model's arithmetic).

``link_rate`` and ``sweep`` need a private network namespace (root or unprivileged user
namespaces); without one they are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from launching import SEND_RECV, stop_a_worker  # noqa: E402  (tests/launching.py)


class Skip(Exception):
    pass


def _prefix():
    from gradsieve.train import link

    try:
        return link.enter_prefix()
    except link.LinkError as err:
        raise Skip(f"no private network namespace here: {err}") from None




def check_link_rate(tmp: str) -> str:
    from gradsieve.train import link

    prefix = _prefix()
    script = os.path.join(tmp, "send_recv.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(SEND_RECV))
    out = os.path.join(tmp, "send_recv.json")
    rate_bits, nbytes = 40_000_000, 6_000_000  # 1.2 s at the set rate
    env = dict(os.environ, **{link.INSIDE_ENV: str(os.stat("/proc/self/ns/net").st_ino)})
    done = subprocess.run([*prefix, PYTHON, script, f"{rate_bits}bit", str(nbytes), out],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        seconds = json.load(f)["seconds"]
    achieved = nbytes * 8 / seconds
    assert abs(achieved - rate_bits) / rate_bits < 0.15, f"{achieved / 1e6:.1f} Mbit/s for a 40 Mbit/s link"
    return f"{achieved / 1e6:.1f} Mbit/s for a 40 Mbit/s link"


def check_stopped_worker(tmp: str) -> str:
    returncode, err, waited = stop_a_worker(tmp)
    assert returncode == 1 and "no reply within --timeout 4 s" in err, err[-2000:]
    assert 4.0 <= waited < 25.0, f"the run failed {waited:.1f} s after the stop"
    return f"the run failed {waited:.1f} s after the stop (--timeout 4)"


def check_sweep(tmp: str) -> str:
    _prefix()
    out = os.path.join(tmp, "results")
    sweep = subprocess.run(
        [PYTHON, os.path.join(HERE, "bench_network.py"), "--rates", "20mbit,unlimited",
         "--workers", "2", "--workload", "digits", "--compare", "none,powersgd,topk:values=int8",
         "--steps", "20mbit=6", "--steps", "unlimited=6", "--out", out],
        capture_output=True, text=True, timeout=400)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    model = subprocess.run([PYTHON, os.path.join(HERE, "cost_model.py"),
                            "--measurements", os.path.join(out, "bench_network.json"), "--out", out],
                           capture_output=True, text=True, timeout=120)
    assert model.returncode == 0, model.stderr[-3000:]
    with open(os.path.join(out, "bench_network.json")) as f:
        by = {(r["rate"], r["name"]): r for r in json.load(f)["rows"]}
    with open(os.path.join(out, "cost_model.json")) as f:
        check = json.load(f)["check"]
    speedup = by[("20mbit", "topk:values=int8")]["step_speedup"]
    error = next(p for p in check["points"] if p["name"] == "none")["error"]
    assert speedup > 2, f"top-k int8 at 20 Mbit/s: {speedup:.2f}x over dense, expected > 2x"
    assert abs(error) < 0.3, f"cost model: shaped dense step predicted {100 * error:+.0f}% off"
    return f"top-k int8 {speedup:.1f}x over dense at 20 Mbit/s; cost model dense error {100 * error:+.0f}%"


CHECKS = {"link_rate": check_link_rate, "stopped_worker": check_stopped_worker, "sweep": check_sweep}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks of {', '.join(CHECKS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; checks: {', '.join(CHECKS)}")
    failed = 0
    for name in names:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                verdict, said = "ok", CHECKS[name](tmp)
            except Skip as why:
                verdict, said = "skipped", str(why)
            except (AssertionError, subprocess.TimeoutExpired) as err:
                verdict, said = "FAILED", str(err).strip() or type(err).__name__
                failed += 1
        print(f"{name:15} {verdict:8} {said} ({time.perf_counter() - started:.0f} s)", flush=True)
    try:
        load = os.getloadavg()[0]
        print(f"check_timing: load average {load:.1f} on {os.cpu_count()} cores (the windows assume an idle machine)")
    except OSError:
        pass
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

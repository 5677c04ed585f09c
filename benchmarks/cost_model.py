"""An analytic step-time model of compressed data-parallel training, calibrated and checked on
``bench_network.py``'s measurements, then used to look past one machine.

One step is ``t = t_base + t_comm``.

*On the emulated link* (what bench_network measured): all N ranks share one queue of rate R (the
shaped loopback), so what counts is the bytes crossing it per step:

* ring all-reduce of S bytes per rank (DDP's default, torch-fp16, PowerSGD's factors): every rank
  sends 2 (N-1)/N S, so 2 (N-1) S cross the queue;
* all-gather of P-byte payloads (gradsieve's sparse compressors): every rank sends its payload to
  the N-1 others, N (N-1) P;
* ``t_comm = h * bytes / R``, h the packet overhead of TCP/IP over a 9000-byte MTU (measured:
  link bytes over payload bytes, about 1.01);
* ``t_base``: the same compressor's step time at the same N on the unlimited link (compute,
  compress, decode, loopback copies).

Predictions at 10 Mbit/s, 100 Mbit/s and 1 Gbit/s are compared with the measurements; the table
and ``cost_model.json`` give every point's error.

*On a cluster* (the extrapolation): N nodes, each with its own full-duplex link of B bit/s and a
per-message latency alpha, behind a non-blocking switch:

* ring all-reduce: ``2 (N-1)/N * S / B + 2 (N-1) alpha``: its bytes per node hardly grow with N;
* ring all-gather: ``(N-1) * P / B + (N-1) alpha``: grows linearly with N;
* decoding sums N payloads of k entries: ``N * k * c_decode`` (c_decode measured per entry);
* compute and compress time as measured (on this 2-core CPU: a GPU would shrink them, which only
  moves the break-even towards slower links).

With P = k (4 + v) bytes (int32 index, v-byte value) and S = 4 n, gathering beats the ring on
traffic alone while ``N * density * (4 + v) / 8 < 1``: for density 0.01, N < 100 with fp32 values
and N < 160 with int8 values; decode time and latency pull the break-even lower.

    python benchmarks/cost_model.py                     # reads benchmarks/results/bench_network.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ALLREDUCE = ("none", "torch-fp16", "powersgd")  # torch's hooks: all-reduce; the rest all-gather


def is_allreduce(row: Dict) -> bool:
    return row["compressor"] in ALLREDUCE


def queue_bytes(row: Dict, n: int) -> float:
    """Bytes that cross the one shared queue per step for this run's per-rank payload."""
    payload = row["wire_bytes_steady"]
    return 2 * (n - 1) * payload if is_allreduce(row) else n * (n - 1) * payload


def header_overhead(rows: List[Dict]) -> float:
    """Measured bytes on the link over the payload bytes the model counts (shaped runs, medians)."""
    ratios = [r["link_bytes_steady"] / queue_bytes(r, r["workers"]) for r in rows
              if r["rate_bits"] and r["link_bytes_steady"] and queue_bytes(r, r["workers"]) > 1e5]
    return statistics.median(ratios) if ratios else 1.0


def check_against_measurements(rows: List[Dict]) -> Dict:
    """Predicts every shaped point from the unlimited one of the same compressor and N."""
    h = header_overhead(rows)
    base = {(r["name"], r["workers"]): r for r in rows if r["rate_bits"] is None}
    points = []
    for r in rows:
        ref = base.get((r["name"], r["workers"]))
        if r["rate_bits"] is None or ref is None:
            continue
        predicted = ref["ms_per_step"] + 1e3 * h * queue_bytes(r, r["workers"]) * 8 / r["rate_bits"]
        points.append({"rate": r["rate"], "rate_bits": r["rate_bits"], "workers": r["workers"],
                       "name": r["name"], "measured_ms": r["ms_per_step"], "predicted_ms": predicted,
                       "error": predicted / r["ms_per_step"] - 1})
    errors = [abs(p["error"]) for p in points]
    return {"header_overhead": h, "points": points,
            "median_abs_error": statistics.median(errors) if errors else None,
            "max_abs_error": max(errors) if errors else None}


# ------------------------------------------------------------------------------- the cluster
def ring_allreduce_s(nbytes: float, n: int, bits: float, alpha: float) -> float:
    return 2 * (n - 1) / n * nbytes * 8 / bits + 2 * (n - 1) * alpha


def ring_allgather_s(nbytes: float, n: int, bits: float, alpha: float) -> float:
    return (n - 1) * nbytes * 8 / bits + (n - 1) * alpha


def calibrate(rows: List[Dict]) -> Dict:
    """Per-step costs of the measured workload, from the N = 2 runs on the unlimited link:

    * compute (forward, backward, optimizer): a sparse run's step minus its measured compress and
      decode time (its loopback all-gather of a few KB is negligible), the median over the sparse
      compressors;
    * the loopback's cost per all-reduced byte: the dense step minus that compute, per byte;
    * per all-reduce compressor, its own extra work (PowerSGD's matrix products and QR): its step
      minus the compute and its loopback bytes;
    * per sparse compressor, compress time, decode cost per entry, payload bytes and entries.
    """
    unlimited = {r["name"]: r for r in rows if r["rate_bits"] is None and r["workers"] == 2}
    dense = unlimited["none"]
    model = {"dense_bytes": dense["wire_bytes_steady"], "compressors": {}}
    computes = []
    for name, r in unlimited.items():
        if is_allreduce(r) or r["compress_ms_per_step"] is None:
            continue
        k = round(r["density"] * dense["wire_bytes_steady"] / 4)
        compress = r["compress_ms_per_step"] / 1e3
        decode = (r["decode_ms_per_step"] or 0.0) / 1e3
        computes.append(r["ms_per_step"] / 1e3 - compress - decode)
        model["compressors"][name] = {"kind": "allgather", "bytes": r["wire_bytes_steady"], "entries": k,
                                      "compress_s": compress, "decode_s_per_entry": decode / (2 * k)}
    compute = statistics.median(computes) if computes else dense["ms_per_step"] / 1e3
    model["compute_s"] = compute
    model["loopback_s_per_byte"] = max(0.0, dense["ms_per_step"] / 1e3 - compute) / dense["wire_bytes_steady"]
    for name, r in unlimited.items():
        if is_allreduce(r):
            loopback = model["loopback_s_per_byte"] * r["wire_bytes_steady"]
            extra = 0.0 if name == "none" else max(0.0, r["ms_per_step"] / 1e3 - compute - loopback)
            model["compressors"][name] = {"kind": "allreduce", "bytes": r["wire_bytes_steady"], "extra_s": extra}
    return model


def cluster_step_s(model: Dict, name: str, n: int, bits: float, alpha: float) -> float:
    c = model["compressors"][name]
    if c["kind"] == "allreduce":
        return model["compute_s"] + c["extra_s"] + ring_allreduce_s(c["bytes"], n, bits, alpha)
    decode = n * c["entries"] * c["decode_s_per_entry"]
    return model["compute_s"] + c["compress_s"] + decode + ring_allgather_s(c["bytes"], n, bits, alpha)


def break_even_workers(model: Dict, name: str, bits: float, alpha: float, limit: int = 1 << 16) -> Optional[int]:
    """The largest N at which ``name`` is faster than dense ring all-reduce (None: not even at 2)."""
    best = None
    for n in range(2, limit + 1):
        if cluster_step_s(model, name, n, bits, alpha) < cluster_step_s(model, "none", n, bits, alpha):
            best = n
        elif best is not None:
            break
    return best


def plot(check: Dict, model: Dict, alpha: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=110)
    ax = axes[0]
    for n, marker in ((2, "o"), (4, "s")):
        pts = [p for p in check["points"] if p["workers"] == n]
        ax.scatter([p["measured_ms"] for p in pts], [p["predicted_ms"] for p in pts], marker=marker,
                   label=f"{n} workers", alpha=0.7)
    lo = min(min(p["measured_ms"], p["predicted_ms"]) for p in check["points"])
    hi = max(max(p["measured_ms"], p["predicted_ms"]) for p in check["points"])
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms/step (10 Mbit/s - 1 Gbit/s)")
    ax.set_ylabel("predicted ms/step")
    ax.set_title(f"model vs measurement: median error {100 * check['median_abs_error']:.0f}%, "
                 f"max {100 * check['max_abs_error']:.0f}%", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()

    workers = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    ax = axes[1]
    for gbit, style in ((1, "-"), (10, "--"), (100, ":"), (400, "-.")):
        for name, color in (("topk", "C0"), ("topk:values=int8", "C1"), ("powersgd r1", "C2")):
            if name not in model["compressors"]:
                continue
            speed = [cluster_step_s(model, "none", n, gbit * 1e9, alpha)
                     / cluster_step_s(model, name, n, gbit * 1e9, alpha) for n in workers]
            ax.plot(workers, speed, ls=style, color=color, label=f"{name}, {gbit} Gbit/s")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers N (one link of B per node, switched)")
    ax.set_ylabel("speed-up over dense ring all-reduce")
    ax.set_title("extrapolation for the measured workload", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)

    ax = axes[2]
    rates = [1, 2, 5, 10, 25, 50, 100, 200, 400]
    for name, color, value_bytes in (("topk", "C0", 4), ("topk:values=int8", "C1", 1)):
        if name not in model["compressors"]:
            continue
        ns = [break_even_workers(model, name, g * 1e9, alpha) or 1 for g in rates]
        ax.plot(rates, ns, marker="o", color=color, label=f"{name}: measured costs")
        density = model["compressors"][name]["entries"] * 4 / model["dense_bytes"]
        ax.axhline(8 / (density * (4 + value_bytes)), color=color, ls=":", lw=1,
                   label=f"{name}: traffic alone (N < 8 / (d (4 + {value_bytes})))")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("link rate per node, Gbit/s")
    ax.set_ylabel("largest N where it beats dense (1: never)")
    ax.set_title("where gathering sparse payloads stops paying", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measurements", default=os.path.join(HERE, "results", "bench_network.json"))
    p.add_argument("--alpha-us", type=float, default=20.0, help="per-message latency of the cluster links")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    with open(args.measurements) as f:
        data = json.load(f)
    rows = data["rows"]
    check = check_against_measurements(rows)
    print(f"cost_model: packet overhead h = {check['header_overhead']:.4f}; "
          f"{len(check['points'])} shaped points predicted from the unlimited ones")
    print(f"{'rate':>9} {'N':>2} {'compressor':22} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    for pt in check["points"]:
        print(f"{pt['rate']:>9} {pt['workers']:>2} {pt['name']:22} {pt['measured_ms']:12.1f} "
              f"{pt['predicted_ms']:13.1f} {100 * pt['error']:6.1f}%")
    print(f"cost_model: |error| median {100 * check['median_abs_error']:.1f}%, max {100 * check['max_abs_error']:.1f}%")

    model = calibrate(rows)
    alpha = args.alpha_us * 1e-6
    table = {}
    for name in model["compressors"]:
        if model["compressors"][name]["kind"] == "allgather":
            table[name] = {f"{g}gbit": break_even_workers(model, name, g * 1e9, alpha)
                           for g in (1, 10, 100, 400)}
    print("cost_model: largest N at which a sparse compressor beats dense ring all-reduce "
          f"(cluster, alpha {args.alpha_us:g} us):")
    for name, by_rate in table.items():
        print(f"  {name:22} " + "  ".join(f"{rate}: {'-' if n is None else n}" for rate, n in by_rate.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost_model.json"), "w") as f:
        json.dump({"machine": data.get("machine"), "alpha_s": alpha, "check": check, "model": model,
                   "break_even_workers": table}, f, indent=1)
    plot(check, model, alpha, os.path.join(args.out, "cost_model.png"))
    print(f"cost_model: wrote {args.out}/cost_model.json and cost_model.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

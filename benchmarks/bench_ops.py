"""Benchmark of gradsieve's ops against the torch code a user would otherwise write.

For each size n and density k/n it times, on CPU and (when present) CUDA:
  topk_abs        vs torch.topk(x.abs(), k) (default, and sorted=False)
  quantile_abs    vs torch.kthvalue(x.abs(), i)
  ef_topk_        vs the same error-feedback steps in eager torch with torch.topk
  regtopk_select_ vs the same RegTop-k steps in eager torch (weights, torch.topk of the score)
  quantize_int8   vs eager per-chunk absmax quantization
Timings are medians over repeats after warm-up (CUDA: device events). On CUDA each row also shows
the memory-bandwidth floor: the bytes the op must move divided by the device-to-device copy
bandwidth measured in the same run. Results are printed as a table and written to JSON and CSV.

    python benchmarks/bench_ops.py --quick            # a minute on a laptop CPU
    python benchmarks/bench_ops.py --device cuda      # n = 2^20 .. 2^28 on the GPU
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import gradsieve

CHUNK = 4096


def timer(device: str, fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus written."""
    src = torch.randn(1 << 26, device=device)
    dst = torch.empty_like(src)
    seconds = timer(device, lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() * src.element_size() / seconds


def eager_ef_topk(residual: torch.Tensor, grad: torch.Tensor, k: int):
    acc = residual + grad.float()
    _, idx = torch.topk(acc.abs(), k, sorted=False)
    values = acc[idx]
    acc[idx] = 0
    residual.copy_(acc)
    return values, idx


def eager_regtopk(residual, grad, prev_indices, prev_sent, prev_agg, mu, k, world_size):
    acc = residual + grad.float()
    score = acc.abs()
    weight = torch.tanh((prev_agg * world_size / prev_sent).abs() / mu)
    score[prev_indices] = weight * score[prev_indices]
    _, idx = torch.topk(score, k, sorted=False)
    values = acc[idx]
    acc[idx] = 0
    residual.copy_(acc)
    return values, idx


def eager_quantize(x: torch.Tensor, chunk: int):
    flat = x.reshape(-1).float()
    blocks = flat.view(-1, chunk)
    scales = blocks.abs().amax(dim=1) / 127.0
    q = torch.round(blocks / scales.clamp_min(1e-30)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def bench_size(device: str, n: int, densities: List[float], repeats: int, bandwidth: float | None):
    rows = []
    x = torch.randn(n, device=device)
    elem = x.element_size()

    def add(op, density, ours, baselines: Dict[str, float], floor_bytes):
        base_name, base_t = next(iter(baselines.items()))
        row = {
            "device": device, "op": op, "n": n, "density": density,
            "gradsieve_ms": ours * 1e3, "baseline": base_name, "baseline_ms": base_t * 1e3,
            "speedup": base_t / ours,
        }
        for name, t in list(baselines.items())[1:]:
            row[f"{name}_ms"] = t * 1e3
            row[f"speedup_vs_{name}"] = t / ours
        if bandwidth:
            floor = floor_bytes / bandwidth
            row.update(floor_ms=floor * 1e3, x_floor=ours / floor)
        rows.append(row)

    for density in densities:
        k = max(1, int(n * density))
        ours = timer(device, lambda: gradsieve.topk_abs(x, k), repeats)
        base = timer(device, lambda: torch.topk(x.abs(), k), repeats)
        base_unsorted = timer(device, lambda: torch.topk(x.abs(), k, sorted=False), repeats)
        add("topk_abs", density, ours, {"torch.topk": base, "topk_unsorted": base_unsorted}, n * elem)

        residual = torch.zeros(n, device=device)
        residual_eager = torch.zeros(n, device=device)
        grad = x * 1e-3
        ours = timer(device, lambda: gradsieve.ef_topk_(residual, grad, k), repeats)
        base = timer(device, lambda: eager_ef_topk(residual_eager, grad, k), repeats)
        add("ef_topk_", density, ours, {"eager_ef_topk": base}, n * (elem + 8) + k * 16)

        # RegTop-k with last step's k entries: what the regtopk compressor runs every step.
        prev = torch.randperm(n, device=device)[:k]
        prev_sent = torch.randn(k, device=device)
        prev_agg = torch.randn(k, device=device) * 0.5
        args = (prev, prev_sent, prev_agg, 4.0, k, 8)
        ours = timer(device, lambda: gradsieve.regtopk_select_(residual, grad, *args), repeats)
        base = timer(device, lambda: eager_regtopk(residual_eager, grad, *args), repeats)
        add("regtopk_select_", density, ours, {"eager_regtopk": base},
            n * (elem + 8) + k * (8 + 8) + k * 12)

    rank = n - max(1, int(n * densities[0]))
    ours = timer(device, lambda: gradsieve.quantile_abs(x, rank / (n - 1)), repeats)
    base = timer(device, lambda: torch.kthvalue(x.abs(), rank + 1), repeats)
    add("quantile_abs", densities[0], ours, {"torch.kthvalue": base}, n * elem)

    ours = timer(device, lambda: gradsieve.quantize_int8(x, CHUNK), repeats)
    base = timer(device, lambda: eager_quantize(x, CHUNK), repeats)
    add("quantize_int8", float("nan"), ours, {"eager_quantize": base},
        n * elem + n + 4 * (n // CHUNK))
    return rows


def machine_description(devices: List[str]) -> Dict[str, object]:
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "gradsieve": gradsieve.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if "cuda" in devices:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows):
    header = f"{'device':6} {'op':15} {'n':>11} {'k/n':>6} {'gradsieve ms':>13} {'baseline':>15} " \
             f"{'baseline ms':>12} {'speedup':>8} {'floor ms':>9} {'x floor':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        density = "" if r["density"] != r["density"] else f"{r['density']:g}"
        floor = f"{r['floor_ms']:9.3f} {r['x_floor']:8.2f}" if "floor_ms" in r else f"{'-':>9} {'-':>8}"
        print(f"{r['device']:6} {r['op']:15} {r['n']:>11} {density:>6} {r['gradsieve_ms']:13.3f} "
              f"{r['baseline']:>15} {r['baseline_ms']:12.3f} {r['speedup']:7.2f}x {floor}")
        if "topk_unsorted_ms" in r:
            print(f"{'':6} {'':15} {'':>11} {'':>6} {'':>13} {'sorted=False':>15} "
                  f"{r['topk_unsorted_ms']:12.3f} {r['speedup_vs_topk_unsorted']:7.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (about a minute on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--min-log2", type=int, default=None, help="smallest n as a power of two (default 20)")
    parser.add_argument("--max-log2", type=int, default=None,
                        help="largest n as a power of two (default: 24 on CPU, 28 on CUDA; 22 with --quick)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for bench_ops.json and bench_ops.csv")
    args = parser.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not (torch.cuda.is_available() and gradsieve.cuda_kernels_built()):
        if args.device == "cuda":
            parser.error("--device cuda: no GPU, or gradsieve was built without CUDA kernels")
        devices.remove("cuda")
        print("bench_ops: no GPU or no CUDA build of gradsieve: CPU only")

    densities = [0.001, 0.01]
    rows = []
    for device in devices:
        lo = args.min_log2 if args.min_log2 is not None else 20
        hi = args.max_log2 if args.max_log2 is not None else (22 if args.quick else (28 if device == "cuda" else 24))
        repeats = args.repeats or (3 if args.quick else (20 if device == "cuda" else 5))
        bandwidth = copy_bandwidth(device) if device == "cuda" else None
        if bandwidth:
            print(f"bench_ops: {torch.cuda.get_device_name()}: device copy {bandwidth / 1e9:.0f} GB/s (read + write)")
        for log2 in range(lo, hi + 1, 2 if args.quick else 1):
            n = 1 << log2
            try:
                rows.extend(bench_size(device, n, densities, repeats, bandwidth))
            except torch.OutOfMemoryError:
                print(f"bench_ops: n = 2^{log2} does not fit on {device}; stopping there")
                break
            print(f"bench_ops: {device} n = 2^{log2} done", file=sys.stderr)
    print_table(rows)

    os.makedirs(args.out, exist_ok=True)
    meta = machine_description(devices)
    if "cuda" in devices:
        meta["copy_bandwidth_GBps"] = copy_bandwidth("cuda") / 1e9
    with open(os.path.join(args.out, "bench_ops.json"), "w") as f:
        json.dump({"machine": meta, "rows": rows}, f, indent=1)
    fields = sorted({key for r in rows for key in r})
    with open(os.path.join(args.out, "bench_ops.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"bench_ops: wrote {args.out}/bench_ops.json and bench_ops.csv")


if __name__ == "__main__":
    main()

"""Benchmark of the DDP communication hooks on a ResNet-50 backward pass, one process.

A ResNet-50 (25.6M float32 parameters, defined here: torchvision is not needed) is wrapped in
DistributedDataParallel in a world of one process (NCCL on CUDA, gloo on CPU), and its backward
pass is timed with each way of exchanging the gradient:

  backward          a hook that returns the bucket untouched: the backward pass alone
  allreduce         DDP's default (fp32 all-reduce)
  fp16              torch's fp16_compress_hook
  powerSGD r1, r4   torch's powerSGD_hook, PowerSGDState(matrix_approximation_rank=1 or 4,
                    start_powerSGD_iter=2), timed after its warm-up
  topk d, int8      gradsieve.compression_hook, compressor "topk" at density d (0.001, 0.01),
                    fp32 values and values="int8"

With one process the collective itself moves nothing: what the times measure is each hook's own
work (compress, decode, copies and host synchronisation) against the backward pass it rides on.
Per method: the median backward time over the timed steps (device events on CUDA), the overhead
against DDP's default all-reduce, that overhead as a fraction of the bare backward pass, and the
bytes one rank would put on the wire per step (gradsieve: state.stats()["wire_bytes"]; powerSGD:
growth of state.total_numel_after_compression times 4; fp16: 2 bytes per entry; allreduce: 4).

    python benchmarks/bench_hook.py --device cuda --out results       # a GPU: ResNet-50, batch 32
    python benchmarks/bench_hook.py --device cpu --quick --out /tmp/x # seconds: a small model
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

import gradsieve

RESNET50_PARAMETERS = 25_557_032


# =============================================================================== the model
class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, each with batch norm; a projected
    shortcut where the shape changes."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(blocks: Sequence[int] = (3, 4, 6, 3), base: int = 64, classes: int = 1000) -> nn.Module:
    """A bottleneck ResNet; the defaults are ResNet-50 (He et al. 2015, arXiv 1512.03385), with
    the stride on the 3x3 convolution."""
    layers: List[nn.Module] = [nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    channels = base
    for stage, count in enumerate(blocks):
        width = base * 2 ** stage
        for i in range(count):
            layers.append(Bottleneck(channels, width, stride=2 if i == 0 and stage > 0 else 1))
            channels = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


# =============================================================================== the methods
def no_comm_hook(_state, bucket):  # no annotations: DDP checks them against its own types
    """Returns the bucket as it is: the backward pass with no exchange at all."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class Method:
    """One way of exchanging the gradient: registers its hook, reports bytes on the wire."""

    def __init__(self, name: str, density: Optional[float] = None,
                 make: Optional[Callable[[], Tuple[object, Callable]]] = None,
                 wire_bytes: Optional[Callable[[object, int], float]] = None) -> None:
        self.name, self.density, self.make, self.wire_bytes = name, density, make, wire_bytes


def methods(densities: Sequence[float], ranks: Sequence[int]) -> List[Method]:
    """Every method of the benchmark. wire_bytes(state, numel) gives the cumulative bytes so far."""
    found = [
        Method("backward", make=lambda: (None, no_comm_hook)),
        Method("allreduce"),  # DDP's built-in all-reduce: no hook registered
        Method("fp16", make=lambda: (None, default_hooks.fp16_compress_hook)),
    ]
    for rank in ranks:
        found.append(Method(
            f"powerSGD r{rank}",
            make=lambda rank=rank: (powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                                           start_powerSGD_iter=2), powersgd.powerSGD_hook),
            wire_bytes=lambda state, numel: 4.0 * state.total_numel_after_compression))
    for values in ("fp32", "int8"):
        for density in densities:
            found.append(Method(
                "topk" if values == "fp32" else "topk int8", density,
                make=lambda density=density, values=values: (
                    gradsieve.CompressionState(compressor="topk", density=density, values=values),
                    gradsieve.compression_hook),
                wire_bytes=lambda state, numel: float(state.stats()["wire_bytes"])))
    return found


def fixed_bytes_per_step(name: str, numel: int) -> Optional[float]:
    return {"backward": 0.0, "allreduce": 4.0 * numel, "fp16": 2.0 * numel}.get(name)


# =============================================================================== timing
def time_method(method: Method, args, device: torch.device, batch) -> Dict[str, object]:
    """Builds the model afresh (same seed), wraps it in DDP with the method's hook, runs the
    warm-up steps and times the backward pass of the timed steps."""
    torch.manual_seed(0)
    model = make_model(args).to(device)
    numel = sum(p.numel() for p in model.parameters())
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = None
    if method.make is not None:
        state, hook = method.make()
        ddp.register_comm_hook(state, hook)
    images, labels = batch
    loss_fn = nn.CrossEntropyLoss()
    times, wall = [], []
    wire_start, host_start = 0.0, 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if method.wire_bytes is not None:
                wire_start = method.wire_bytes(state, numel)
            if isinstance(state, gradsieve.CompressionState):
                host_start = state.compress_s + state.decode_s
        ddp.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(images), labels)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            start.record()
            loss.backward()
            end.record()
            end.synchronize()
            wall_s = time.perf_counter() - t0
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            loss.backward()
            seconds = wall_s = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(seconds)
            wall.append(wall_s)
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    if method.wire_bytes is not None:
        wire = (method.wire_bytes(state, numel) - wire_start) / args.steps
    else:
        wire = fixed_bytes_per_step(method.name, numel)
    row = {
        "method": method.name, "density": method.density, "parameters": numel,
        "backward_ms": 1e3 * statistics.median(times),
        "backward_ms_min": 1e3 * min(times), "backward_ms_max": 1e3 * max(times),
        "host_wall_ms": 1e3 * statistics.median(wall),
        "wire_bytes_per_step": wire, "grads_finite": grads_finite,
    }
    if isinstance(state, gradsieve.CompressionState):
        # Host time in the hook's compress and decode (on CUDA: launches and synchronisation).
        row["hook_host_ms_per_step"] = 1e3 * (state.compress_s + state.decode_s - host_start) / args.steps
        row["compressed_steps"] = state.compressed_steps
    del ddp, model, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def make_model(args) -> nn.Module:
    if args.quick:
        return resnet(blocks=(1, 1, 1, 1), base=8, classes=10)
    return resnet()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_ratios(rows: List[Dict[str, object]]) -> None:
    """overhead_ms: backward time minus DDP's default all-reduce's; overhead_vs_backward: that
    over the bare backward pass; vs_fp32: dense fp32 bytes over the method's bytes."""
    by_name = {r["method"]: r for r in rows}
    bare = by_name["backward"].get("backward_ms")
    default = by_name["allreduce"].get("backward_ms")
    for r in rows:
        if "error" in r:
            continue
        r["overhead_ms"] = r["backward_ms"] - default if default is not None else None
        r["overhead_vs_backward"] = r["overhead_ms"] / bare if bare and default is not None else None
        wire = r["wire_bytes_per_step"]
        r["vs_fp32"] = 4.0 * r["parameters"] / wire if wire else None


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def print_table(result: Dict[str, object]) -> None:
    rows = result["rows"]
    config = result["config"]
    numel = next((r["parameters"] for r in rows if "parameters" in r), 0)
    print(f"bench_hook: {config['model']}, {numel / 1e6:.2f}M parameters, batch "
          f"{config['batch']}x3x{config['image']}x{config['image']}, {config['backend']} world size 1, "
          f"median of {config['steps']} steps after {config['warmup']}")
    header = (f"{'method':15} {'density':>7} {'backward ms':>12} {'overhead ms':>12} {'x backward':>11} "
              f"{'bytes/step':>11} {'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        density = "-" if r["density"] is None else f"{r['density']:g}"
        if "error" in r:
            print(f"{r['method']:15} {density:>7} failed: {r['error'][:120]}")
            continue
        baseline = r["method"] in ("backward", "allreduce") or r["overhead_vs_backward"] is None
        ratio = "-" if baseline else f"{r['overhead_vs_backward']:+.3f}"
        overhead = "-" if baseline else f"{r['overhead_ms']:+.2f}"
        vs = "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.1f}x"
        print(f"{r['method']:15} {density:>7} {r['backward_ms']:12.2f} {overhead:>12} {ratio:>11} "
              f"{human_bytes(r['wire_bytes_per_step']):>11} {vs:>8}")
    print("overhead: backward ms minus allreduce's; x backward: overhead over the bare backward "
          "('backward' row); with one process the collectives move nothing")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="a small ResNet (0.2M parameters) on 32x32 images, few steps: the dry run")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default 32; 4 with --quick)")
    parser.add_argument("--image", type=int, default=None, help="image side (default 224; 32 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (default 5: DDP rebuilds its buckets after step 1, "
                             "gradsieve compresses from step 2, powerSGD from step 3)")
    parser.add_argument("--densities", default="0.001,0.01")
    parser.add_argument("--ranks", default="1,4", help="powerSGD matrix approximation ranks")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for bench_hook.json")
    parser.add_argument("--table-from", metavar="JSON", default=None,
                        help="print the table of a saved bench_hook.json and exit (no benchmark)")
    args = parser.parse_args(argv)
    if args.table_from:
        with open(args.table_from) as f:
            print_table(json.load(f))
        return 0
    args.batch = args.batch or (4 if args.quick else 32)
    args.image = args.image or (32 if args.quick else 224)
    args.steps = args.steps or (3 if args.quick else 20)
    if args.warmup < 4:
        parser.error("--warmup must be >= 4 (powerSGD compresses from its third step)")
    densities = [float(d) for d in args.densities.split(",") if d]
    ranks = [int(r) for r in args.ranks.split(",") if r]

    if args.device == "cuda":
        if not (torch.cuda.is_available() and gradsieve.cuda_kernels_built()):
            print("bench_hook: --device cuda needs a GPU and a CUDA build of gradsieve")
            return 2
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if args.quick:  # a dry run on a small shared machine: spinning thread pools only slow it down
            torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(1)
        classes = 10 if args.quick else 1000
        batch = (torch.randn(args.batch, 3, args.image, args.image, generator=g).to(device),
                 torch.randint(0, classes, (args.batch,), generator=g).to(device))
        rows = []
        for method in methods(densities, ranks):
            label = f"{method.name}{'' if method.density is None else f' {method.density:g}'}"
            try:
                rows.append(time_method(method, args, device, batch))
                print(f"bench_hook: {label}: {rows[-1]['backward_ms']:.2f} ms", file=sys.stderr, flush=True)
            except Exception as error:  # record it and go on with the other methods
                first_line = (str(error).strip().splitlines() or [""])[0]
                message = f"{type(error).__name__}: {first_line}"
                print(f"bench_hook: {label} failed: {message}", flush=True)
                traceback.print_exc()
                rows.append({"method": method.name, "density": method.density, "error": message})
                gc.collect()
        # The bare backward again at the end: how much the machine drifted during the run.
        again = time_method(methods(densities, ranks)[0], args, device, batch)
        if not args.quick and again["parameters"] != RESNET50_PARAMETERS:
            raise RuntimeError(f"the model has {again['parameters']} parameters, "
                               f"ResNet-50 {RESNET50_PARAMETERS}")
    finally:
        gc.collect()
        dist.destroy_process_group()
    add_ratios(rows)
    machine = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "gradsieve": gradsieve.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    result = {
        "machine": machine,
        "config": {"model": "resnet-small (quick)" if args.quick else "resnet-50", "batch": args.batch,
                   "image": args.image, "steps": args.steps, "warmup": args.warmup, "backend": backend,
                   "device": device.type, "densities": densities, "powersgd_ranks": ranks,
                   "timer": "cuda events around loss.backward()" if device.type == "cuda"
                   else "perf_counter"},
        "backward_ms_again_at_end": again["backward_ms"],
        "rows": rows,
    }
    print_table(result)
    print(f"bench_hook: the bare backward measured again at the end: {again['backward_ms']:.2f} ms "
          f"(first: {rows[0]['backward_ms']:.2f} ms)")
    failed = [r["method"] for r in rows if "error" in r]
    bad = [r["method"] for r in rows if not r.get("grads_finite", True)]
    if failed:
        print(f"bench_hook: failed: {', '.join(failed)}")
    if bad:
        print(f"bench_hook: non-finite gradients after: {', '.join(bad)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_hook.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"bench_hook: wrote {path}")
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())

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

Several CPU ranks (--world N, CPU only): N gloo ranks on this machine, started with
torch.multiprocessing (a real process group over TCP on 127.0.0.1), each with
torch.set_num_threads(--threads, default 1), so that the collectives really move the bytes between
processes. --model picks resnet18 (BasicBlock, 11.7M parameters) or resnet50 (default). The methods
are the ones above plus torch's bf16_compress_hook and gradsieve's dgc, ef21 and regtopk at
--other-density (default 0.01). Every time is per step and, over the ranks, the slowest rank's
(a step ends when its last rank does); the medians are over the timed steps. Per method:

  backward ms         the median backward pass with the method
  overhead ms         minus DDP's default all-reduce ('allreduce' row)
  vs bare ms          minus the backward pass with no exchange ('backward' row)
  compress, decode    gradsieve only: state.stats()'s compress_s and decode_s grown in the step
                      (host time of the hook's compress, and of its decode in the future's callback)
  x floor             (compress + decode) over the floor: the median time of one pass over the whole
                      gradient, buf.mul_(1.0) over a flat float32 tensor of the model's parameter
                      count, timed in the same ranks, with the same threads, at the same time
  bytes/step          what one rank puts on the wire per step

--gradient-only replaces the convolutions by a model that has the ResNet's parameters (the same
shapes, in the same order, so DDP builds the same buckets) but whose forward is
sum_i dot(p_i, w_i) * x, with w_i a fixed random tensor per rank (not a buffer: DDP does not
broadcast it, so the ranks' gradients differ as they would in training) and x a scalar input per
step: its backward is one cheap pass per parameter (grad p_i = w_i * x). On 1 or 2 CPU threads a
ResNet-50 backward over a real batch takes seconds, and the hook's tens of milliseconds vanish in
its noise; here the backward is close to the floor, so 'vs bare ms' and 'overhead ms' show the
hook's whole cost (compress, decode, copies, the collective) instead of burying it. What it does not
show: the overlap with the convolutions that a real backward gives (DDP starts each bucket's hook
while earlier layers still compute), and the cache state a real backward leaves. The compress and
decode columns are the hook's own host time either way; the gradient-only mode is the honest
measure of those against the floor, and the full model (no --gradient-only) is the one to quote for
end-to-end step time.

    python benchmarks/bench_hook.py --device cpu --world 2 --quick --out /tmp/x   # seconds
    python benchmarks/bench_hook.py --device cpu --world 2 --model resnet18 --gradient-only --steps 10
    python benchmarks/bench_hook.py --device cpu --world 2 --model resnet50 --gradient-only --steps 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import socket
import tempfile
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel

import gradsieve

RESNET50_PARAMETERS = 25_557_032
RESNET18_PARAMETERS = 11_689_512


# =============================================================================== the model
def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity, or a strided 1x1 projection with batch norm where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


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
        self.shortcut = shortcut(in_channels, out_channels, stride)

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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the first carrying the stride), each with batch norm; a projected
    shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18(classes: int = 1000) -> nn.Module:
    """ResNet-18 (He et al. 2015): BasicBlocks (2, 2, 2, 2) of 64 to 512 channels, 11,689,512
    parameters."""
    layers: List[nn.Module] = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    channels = 64
    for stage, count in enumerate((2, 2, 2, 2)):
        width = 64 * 2 ** stage
        for i in range(count):
            layers.append(BasicBlock(channels, width, stride=2 if i == 0 and stage > 0 else 1))
            channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


class GradientOnly(nn.Module):
    """The parameters of ``model`` (same shapes, values and order) under a forward of
    sum_i dot(p_i, w_i) * x: the backward is one pass per parameter, grad p_i = w_i * x.
    w_i is drawn from ``seed`` and kept outside the module's buffers (DDP would broadcast those
    from rank 0), so each rank has its own gradient."""

    def __init__(self, model: nn.Module, seed: int, device: torch.device) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in model.parameters()])
        g = torch.Generator().manual_seed(seed)
        self.directions = [torch.randn(p.shape, generator=g).to(device) for p in model.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for p, w in zip(self.weights, self.directions):
            total = total + torch.dot(p.view(-1), w.view(-1))
        return total * x


# =============================================================================== the methods
def no_comm_hook(_state, bucket):  # no annotations: DDP checks them against its own types
    """Returns the bucket as it is: the backward pass with no exchange at all."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def bf16_gloo_hook(state, bucket):
    """torch's bf16_compress_hook under another name: DDP refuses that hook by name unless NCCL
    2.10+ (or XCCL) runs it, while gloo all-reduces bfloat16 as it is. The work is the hook's own."""
    return default_hooks.bf16_compress_hook(state, bucket)


class SerialPowerSGD:
    """powerSGD_hook with each bucket's hook first waiting for the previous bucket's exchange.
    powerSGD launches its Q all-reduce from the P all-reduce's callback (a gloo thread) while the
    autograd thread launches the next bucket's P all-reduce: with a backward as short as
    --gradient-only's the two race, the ranks issue their collectives in different orders and gloo
    aborts ("Received data size doesn't match expected size"). Used for powerSGD with --world > 1;
    the cost is the lost overlap between one bucket's exchange and the next bucket's P."""

    def __init__(self, state: "powersgd.PowerSGDState") -> None:
        self.state, self.previous = state, None

    @staticmethod
    def hook(serial, bucket):
        if serial.previous is not None:
            serial.previous.wait()
        future = powersgd.powerSGD_hook(serial.state, bucket)
        serial.previous = None if bucket.is_last() else future
        return future


class Method:
    """One way of exchanging the gradient: registers its hook, reports bytes on the wire."""

    def __init__(self, name: str, density: Optional[float] = None,
                 make: Optional[Callable[[], Tuple[object, Callable]]] = None,
                 wire_bytes: Optional[Callable[[object, int], float]] = None) -> None:
        self.name, self.density, self.make, self.wire_bytes = name, density, make, wire_bytes


def gradsieve_method(name: str, compressor: str, density: float, **options) -> Method:
    return Method(name, density,
                  make=lambda: (gradsieve.CompressionState(compressor=compressor, density=density, **options),
                                gradsieve.compression_hook),
                  wire_bytes=lambda state, numel: float(state.stats()["wire_bytes"]))


def methods(densities: Sequence[float], ranks: Sequence[int], others: Sequence[float] = (),
            serial: bool = False) -> List[Method]:
    """Every method of the benchmark. wire_bytes(state, numel) gives the cumulative bytes so far.
    ``others``: the densities of bf16 and of gradsieve's dgc, ef21 and regtopk (the several-rank
    mode); empty: the one-process method list. serial: powerSGD through SerialPowerSGD."""
    found = [
        Method("backward", make=lambda: (None, no_comm_hook)),
        Method("allreduce"),  # DDP's built-in all-reduce: no hook registered
        Method("fp16", make=lambda: (None, default_hooks.fp16_compress_hook)),
    ]
    if others:
        found.append(Method("bf16", make=lambda: (None, bf16_gloo_hook)))
    for rank in ranks:
        found.append(Method(
            f"powerSGD r{rank}",
            make=lambda rank=rank: (powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank,
                                                           start_powerSGD_iter=2), powersgd.powerSGD_hook),
            wire_bytes=lambda state, numel: 4.0 * (state.state if isinstance(state, SerialPowerSGD) else state)
            .total_numel_after_compression))
        if serial:
            inner = found[-1].make
            found[-1].make = lambda inner=inner: (SerialPowerSGD(inner()[0]), SerialPowerSGD.hook)
    for values in ("fp32", "int8"):
        for density in densities:
            found.append(Method(
                "topk" if values == "fp32" else "topk int8", density,
                make=lambda density=density, values=values: (
                    gradsieve.CompressionState(compressor="topk", density=density, values=values),
                    gradsieve.compression_hook),
                wire_bytes=lambda state, numel: float(state.stats()["wire_bytes"])))
    for density in others:
        for compressor in ("dgc", "ef21", "regtopk"):
            found.append(gradsieve_method(compressor, compressor, density))
    return found


def fixed_bytes_per_step(name: str, numel: int) -> Optional[float]:
    return {"backward": 0.0, "allreduce": 4.0 * numel, "fp16": 2.0 * numel, "bf16": 2.0 * numel}.get(name)


# =============================================================================== timing
def slowest_rank(values: List[float]) -> List[float]:
    """Per step, the largest value over the ranks (the values themselves in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    gathered: List[Optional[List[float]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [max(column) for column in zip(*gathered)]


def time_method(method: Method, args, device: torch.device, batch) -> Dict[str, object]:
    """Builds the model afresh (same seed), wraps it in DDP with the method's hook, runs the
    warm-up steps and times the backward pass of the timed steps."""
    torch.manual_seed(0)
    model = make_model(args, device).to(device)
    numel = sum(p.numel() for p in model.parameters())
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = None
    if method.make is not None:
        state, hook = method.make()
        ddp.register_comm_hook(state, hook)
    images, labels = batch
    loss_fn = nn.CrossEntropyLoss()
    several = dist.get_world_size() > 1
    times, wall, compress, decode = [], [], [], []
    wire_start, host_start = 0.0, 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if method.wire_bytes is not None:
                wire_start = method.wire_bytes(state, numel)
            if isinstance(state, gradsieve.CompressionState):
                host_start = state.compress_s + state.decode_s
        ddp.zero_grad(set_to_none=True)
        if args.gradient_only:
            loss = ddp(torch.tensor(1.0 + 0.01 * step, device=device))
        else:
            loss = loss_fn(ddp(images), labels)
        if several:
            dist.barrier()  # the ranks start the backward together
        before = (state.compress_s, state.decode_s) if isinstance(state, gradsieve.CompressionState) else None
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
            if before is not None:
                compress.append(state.compress_s - before[0])
                decode.append(state.decode_s - before[1])
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    if method.wire_bytes is not None:
        wire = (method.wire_bytes(state, numel) - wire_start) / args.steps
    else:
        wire = fixed_bytes_per_step(method.name, numel)
    times, wall = slowest_rank(times), slowest_rank(wall)
    row = {
        "method": method.name, "density": method.density, "parameters": numel,
        "backward_ms": 1e3 * statistics.median(times),
        "backward_ms_min": 1e3 * min(times), "backward_ms_max": 1e3 * max(times),
        "host_wall_ms": 1e3 * statistics.median(wall),
        "wire_bytes_per_step": wire, "grads_finite": grads_finite,
    }
    if several:  # the most bytes any rank sent; finite on every rank
        if wire is not None:
            row["wire_bytes_per_step"] = slowest_rank([float(wire)])[0]
        row["grads_finite"] = slowest_rank([0.0 if grads_finite else 1.0])[0] == 0.0
    if isinstance(state, gradsieve.CompressionState):
        # Host time in the hook's compress and decode (on CUDA: launches and synchronisation).
        row["hook_host_ms_per_step"] = 1e3 * (state.compress_s + state.decode_s - host_start) / args.steps
        row["compressed_steps"] = state.compressed_steps
        hook = slowest_rank([c + d for c, d in zip(compress, decode)])
        compress, decode = slowest_rank(compress), slowest_rank(decode)
        row["compress_ms"] = 1e3 * statistics.median(compress)
        row["decode_ms"] = 1e3 * statistics.median(decode)
        row["hook_ms"] = 1e3 * statistics.median(hook)
    del ddp, model, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def time_floor(numel: int, device: torch.device, reps: int = 20) -> Dict[str, float]:
    """One pass over the whole gradient: the median of buf.mul_(1.0) over a flat float32 tensor of
    ``numel`` entries (read and write in place), and of a copy into a second one, slowest rank per
    repetition, in the ranks' own threads."""
    buf = torch.randn(numel, device=device)
    dst = torch.empty_like(buf)
    found = {}
    for name, op in (("floor_ms", lambda: buf.mul_(1.0)), ("floor_copy_ms", lambda: dst.copy_(buf))):
        times = []
        for rep in range(reps + 2):
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            op()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep >= 2:
                times.append(time.perf_counter() - t0)
        found[name] = 1e3 * statistics.median(slowest_rank(times))
    return found


def make_model(args, device: torch.device = torch.device("cpu")) -> nn.Module:
    if args.quick:
        model = resnet(blocks=(1, 1, 1, 1), base=8, classes=10)
    elif args.model == "resnet18":
        model = resnet18()
    else:
        model = resnet()
    if args.gradient_only:
        rank = dist.get_rank() if dist.is_initialized() else 0
        model = GradientOnly(model, seed=1000 + rank, device=device)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_ratios(rows: List[Dict[str, object]], floor_ms: Optional[float] = None) -> None:
    """overhead_ms: backward time minus DDP's default all-reduce's; overhead_vs_backward: that
    over the bare backward pass; overhead_vs_bare_ms: backward time minus the bare backward's;
    vs_fp32: dense fp32 bytes over the method's bytes; x_floor: a gradsieve method's compress and
    decode per step over one pass over the gradient."""
    by_name = {r["method"]: r for r in rows}
    bare = by_name["backward"].get("backward_ms")
    default = by_name["allreduce"].get("backward_ms")
    for r in rows:
        if "error" in r:
            continue
        r["overhead_ms"] = r["backward_ms"] - default if default is not None else None
        r["overhead_vs_backward"] = r["overhead_ms"] / bare if bare and default is not None else None
        r["overhead_vs_bare_ms"] = r["backward_ms"] - bare if bare is not None else None
        wire = r["wire_bytes_per_step"]
        r["vs_fp32"] = 4.0 * r["parameters"] / wire if wire else None
        if floor_ms and "hook_ms" in r:
            r["x_floor"] = (r["compress_ms"] + r["decode_ms"]) / floor_ms


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
    machine = result.get("machine", {})
    world = config.get("world", 1)
    numel = next((r["parameters"] for r in rows if "parameters" in r), 0)
    work = ("gradient only (one pass per parameter, no convolutions)" if config.get("gradient_only")
            else f"batch {config['batch']}x3x{config['image']}x{config['image']}")
    print(f"bench_hook: {config['model']}, {numel / 1e6:.2f}M parameters, {work}, {config['backend']} "
          f"world size {world}, {machine.get('cpu_threads', '?')} threads per rank, "
          f"median of {config['steps']} steps after {config['warmup']}")
    if machine:
        print(f"bench_hook: {machine.get('host', '')} {machine.get('date', '')} torch {machine.get('torch', '')} "
              f"gradsieve {machine.get('gradsieve', '')}")
    floor = result.get("floor_ms")
    if floor is not None:
        print(f"bench_hook: floor (one pass over the gradient, buf.mul_(1.0)): {floor:.2f} ms; "
              f"a copy: {result.get('floor_copy_ms', float('nan')):.2f} ms")
    header = (f"{'method':12} {'density':>7} {'backward ms':>11} {'overhead ms':>11} {'x backward':>10} "
              f"{'vs bare ms':>10} {'compress':>9} {'decode':>8} {'x floor':>7} {'bytes/step':>11} {'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        density = "-" if r["density"] is None else f"{r['density']:g}"
        if "error" in r:
            print(f"{r['method']:12} {density:>7} failed: {r['error'][:120]}")
            continue
        baseline = r["method"] in ("backward", "allreduce") or r["overhead_vs_backward"] is None
        ratio = "-" if baseline else f"{r['overhead_vs_backward']:+.3f}"
        overhead = "-" if baseline else f"{r['overhead_ms']:+.2f}"
        vs_bare = r.get("overhead_vs_bare_ms")
        vs_bare = "-" if vs_bare is None or r["method"] == "backward" else f"{vs_bare:+.2f}"
        compress = f"{r['compress_ms']:.2f}" if "compress_ms" in r else "-"
        decode = f"{r['decode_ms']:.2f}" if "decode_ms" in r else "-"
        x_floor = f"{r['x_floor']:.2f}" if r.get("x_floor") is not None else "-"
        vs = "-" if r["vs_fp32"] is None else f"{r['vs_fp32']:.1f}x"
        print(f"{r['method']:12} {density:>7} {r['backward_ms']:11.2f} {overhead:>11} {ratio:>10} {vs_bare:>10} "
              f"{compress:>9} {decode:>8} {x_floor:>7} {human_bytes(r['wire_bytes_per_step']):>11} {vs:>8}")
    print("overhead: backward ms minus allreduce's; x backward: overhead over the bare backward "
          "('backward' row); vs bare: backward ms minus the bare backward's; compress, decode: gradsieve's "
          "host ms per step; x floor: (compress + decode) over the floor"
          + ("; with one process the collectives move nothing" if world == 1 else
             f"; times: the slowest of {world} ranks per step"))


def run_methods(args, device: torch.device) -> Tuple[List[Dict[str, object]], Dict[str, object], Dict[str, float]]:
    """Every method in this process (one rank of the process group): the rows, the bare backward
    measured again at the end, and the floor."""
    g = torch.Generator().manual_seed(1)
    classes = 10 if args.quick else 1000
    batch = (torch.randn(args.batch, 3, args.image, args.image, generator=g).to(device),
             torch.randint(0, classes, (args.batch,), generator=g).to(device))
    others = args.other_densities if args.world > 1 else []
    rows = []
    for method in methods(args.density_list, args.rank_list, others, serial=args.world > 1):
        label = f"{method.name}{'' if method.density is None else f' {method.density:g}'}"
        try:
            rows.append(time_method(method, args, device, batch))
            if dist.get_rank() == 0:
                print(f"bench_hook: {label}: {rows[-1]['backward_ms']:.2f} ms", file=sys.stderr, flush=True)
        except Exception as error:  # record it and go on with the other methods
            first_line = (str(error).strip().splitlines() or [""])[0]
            message = f"{type(error).__name__}: {first_line}"
            print(f"bench_hook: {label} failed on rank {dist.get_rank()}: {message}", flush=True)
            traceback.print_exc()
            rows.append({"method": method.name, "density": method.density, "error": message})
            gc.collect()
            if args.world > 1:
                raise  # the other ranks wait in a collective: no way to go on
    # The bare backward again at the end: how much the machine drifted during the run.
    again = time_method(methods(args.density_list, args.rank_list)[0], args, device, batch)
    expected = {"resnet50": RESNET50_PARAMETERS, "resnet18": RESNET18_PARAMETERS}[args.model]
    if not args.quick and again["parameters"] != expected:
        raise RuntimeError(f"the model has {again['parameters']} parameters, {args.model} {expected}")
    floor = time_floor(again["parameters"], device)
    return rows, again, floor


def rank_main(rank: int, args, port: int, path: str) -> None:
    """One gloo rank of the several-rank CPU mode; rank 0 writes its results to ``path``."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    try:
        rows, again, floor = run_methods(args, torch.device("cpu"))
        if rank == 0:
            with open(path, "w") as f:
                json.dump({"rows": rows, "again": again, "floor": floor, "threads": torch.get_num_threads()}, f)
    finally:
        gc.collect()
        dist.destroy_process_group()
    # The results are written: leave without interpreter finalisation (as the launcher's workers do).
    # With torch 2.13 on CPU a gloo rank sometimes aborts at exit with "terminate called without an
    # active exception" after its work is done, which failed a CI run of this script.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="a small ResNet (0.2M parameters) on 32x32 images, few steps: the dry run")
    parser.add_argument("--model", choices=["resnet50", "resnet18"], default="resnet50",
                        help="the model, or the model whose gradient --gradient-only takes (default resnet50)")
    parser.add_argument("--world", type=int, default=1,
                        help="ranks: 1 (default) this process alone; N > 1: N gloo ranks on this machine "
                             "(CPU only), with bf16, dgc, ef21 and regtopk added to the methods")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default 1 with --world > 1 or --quick; "
                             "torch's own default otherwise)")
    parser.add_argument("--gradient-only", action="store_true",
                        help="no convolutions: a model with the chosen ResNet's parameters whose backward "
                             "is one pass per parameter, so that the hook's cost is not buried")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step (default 32; 4 with --quick)")
    parser.add_argument("--image", type=int, default=None, help="image side (default 224; 32 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (default 5: DDP rebuilds its buckets after step 1, "
                             "gradsieve compresses from step 2, powerSGD from step 3)")
    parser.add_argument("--densities", default="0.001,0.01")
    parser.add_argument("--other-density", default="0.01",
                        help="densities of dgc, ef21 and regtopk with --world > 1 (default 0.01)")
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
    if args.world < 1:
        parser.error("--world must be >= 1")
    if args.world > 1 and args.device != "cpu":
        parser.error("--world > 1 is the CPU mode (gloo ranks on this machine): give --device cpu")
    args.density_list = [float(d) for d in args.densities.split(",") if d]
    args.rank_list = [int(r) for r in args.ranks.split(",") if r]
    args.other_densities = [float(d) for d in args.other_density.split(",") if d]
    if args.threads is None and (args.world > 1 or (args.quick and args.device == "cpu")):
        # a small shared machine: spinning thread pools only slow it down
        args.threads = 1

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
    if args.world > 1:
        with tempfile.TemporaryDirectory(prefix="bench_hook") as folder:
            path = os.path.join(folder, "rank0.json")
            mp.spawn(rank_main, args=(args, free_port(), path), nprocs=args.world, join=True)
            with open(path) as f:
                got = json.load(f)
        rows, again, floor, threads = got["rows"], got["again"], got["floor"], got["threads"]
    else:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            rows, again, floor = run_methods(args, device)
        finally:
            gc.collect()
            dist.destroy_process_group()
        threads = torch.get_num_threads()
    add_ratios(rows, floor["floor_ms"])
    machine = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "gradsieve": gradsieve.__version__,
        "python": platform.python_version(), "cpu_threads": threads,
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        machine["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    model = "resnet-small (quick)" if args.quick else args.model.replace("resnet", "resnet-")
    result = {
        "machine": machine,
        "config": {"model": model, "batch": args.batch, "gradient_only": args.gradient_only,
                   "image": args.image, "steps": args.steps, "warmup": args.warmup, "backend": backend,
                   "world": args.world, "device": device.type, "densities": args.density_list,
                   "other_densities": args.other_densities if args.world > 1 else [],
                   "powersgd_ranks": args.rank_list,
                   "timer": "cuda events around loss.backward()" if device.type == "cuda"
                   else "perf_counter around loss.backward(), slowest rank per step"},
        "backward_ms_again_at_end": again["backward_ms"],
        **floor,
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

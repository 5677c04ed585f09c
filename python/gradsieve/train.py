"""``gradsieve-train``: compressed data-parallel training from one command.

Launches its own local workers (``--nproc``, default 2) or, started under ``torchrun``, uses the
ranks it is given. Each compressor of ``--compare`` (or the one ``--compressor``) trains in turn
from the same seed, model initialisation and data split; at the end rank 0 prints a table and
writes ``metrics.json``, ``metrics.csv`` and two plots (loss against step, loss against cumulative
bytes sent) to ``--out``.

Examples::

    gradsieve-train --compare none,fp16,topk,dgc,ef21 --density 0.01
    gradsieve-train --workload charlm --compressor topk --density 0.01 --opt values=int8
    torchrun --nnodes 2 --nproc-per-node 8 ... -m gradsieve.train --workload cifar10 --data-dir /data
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import socket
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from gradsieve.hook import CompressionState, compression_hook
from gradsieve.registry import available_compressors, compressor_class, get_compressor
from gradsieve.workloads import DEFAULTS, WORKLOADS, WorkloadError, check_available, epochs_to_steps, make_workload

PROG = "gradsieve-train"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a comparison."""

    compressor: str
    options: Dict[str, Any]

    @property
    def label(self) -> str:
        if "density" in self.options:
            return f"{self.compressor} {self.options['density']:g}"
        return self.compressor


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``gradsieve-train: error: ...`` and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Compressed data-parallel training with gradsieve's DDP hook.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", default="digits", choices=WORKLOADS,
                   help="digits: sklearn's 8x8 digits, small CNN; charlm: character transformer on the "
                        "Python standard library's sources; linreg: heterogeneous linear regression; "
                        "cifar10: ResNet-18, needs --data-dir")
    p.add_argument("--compressor", default="topk", help="a registered compressor: " + ", ".join(available_compressors()))
    p.add_argument("--compare", default=None,
                   help="comma-separated compressors trained in turn from the same seed (replaces --compressor)")
    p.add_argument("--density", type=float, default=0.01, help="fraction of entries sent (sparse compressors)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="compressor option, repeatable (e.g. values=int8, scope=layer, momentum=0.9)")
    p.add_argument("--warmup-steps", type=int, default=1, help="dense all-reduce steps before compression")
    p.add_argument("--nproc", type=int, default=2, help="local worker processes (ignored under torchrun)")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="auto: nccl with one GPU per rank when GPUs are present, else gloo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per workload)")
    p.add_argument("--epochs", type=float, default=None, help="epochs over each rank's shard (instead of --steps)")
    p.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default per workload; linreg: full)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default per workload)")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adam"), help="default per workload")
    p.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default per workload); for dgc it becomes dgc's momentum correction "
                        "and the optimizer runs without momentum")
    p.add_argument("--heterogeneous", action="store_true",
                   help="skewed data per rank (label mix; separate files for charlm)")
    p.add_argument("--data-dir", default=None, help="dataset folder (cifar10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/<workload>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--opt must be KEY=VALUE, got {item!r}")
        options[key.strip()] = _parse_value(value.strip())
    return options


def plan_runs(args: argparse.Namespace) -> List[RunSpec]:
    """The runs asked for, each validated by the registry (ValueError names what is wrong)."""
    names = [n.strip() for n in args.compare.split(",") if n.strip()] if args.compare else [args.compressor]
    if not names:
        raise ValueError("--compare must name at least one compressor")
    if len(set(names)) != len(names):
        raise ValueError(f"--compare names a compressor twice: {args.compare}")
    given = parse_options(args.opt)
    if "density" in given:
        raise ValueError("give the density with --density, not --opt")
    used = set()
    runs = []
    for name in names:
        declared = compressor_class(name).OPTIONS  # ValueError for an unknown name
        options = {key: value for key, value in given.items() if key in declared}
        used.update(options)
        if "density" in declared:
            options["density"] = args.density
        if "momentum" in declared and "momentum" not in options and args.optimizer == "sgd" and args.momentum:
            options["momentum"] = args.momentum  # dgc: momentum correction replaces SGD's momentum
        get_compressor(name, **options)  # validates values and ranges
        runs.append(RunSpec(name, options))
    unused = sorted(set(given) - used)
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} are not accepted by any of {', '.join(names)}")
    return runs


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    defaults = DEFAULTS[args.workload]
    for field in ("batch_size", "lr", "optimizer", "momentum"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(defaults, field))
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.steps is None and args.epochs is None:
        args.steps = defaults.steps
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.epochs is not None and not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.warmup_steps < 1:
        raise ValueError(f"--warmup-steps must be >= 1, got {args.warmup_steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise ValueError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.batch_size < 0:
        raise ValueError(f"--batch-size must be >= 0, got {args.batch_size}")
    if args.batch_size == 0 and args.workload != "linreg":
        raise ValueError("--batch-size 0 (full batch) is only for linreg")
    if args.out is None:
        args.out = os.path.join("runs", args.workload)
    return args


# ------------------------------------------------------------------------------------- workers
def _device_and_backend(args: argparse.Namespace, local_rank: int) -> tuple:
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WorkloadError("--backend nccl needs CUDA GPUs, none is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), backend
    return torch.device("cpu"), backend


def _optimizer(args, spec: RunSpec, params) -> torch.optim.Optimizer:
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    momentum = 0.0 if "momentum" in spec.options else args.momentum
    return torch.optim.SGD(params, lr=args.lr, momentum=momentum)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def train_one(args, spec: RunSpec, workload, rank: int, world: int, device: torch.device) -> Dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(args.seed)  # the same initial model on every rank and in every run
    model = workload.model().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = CompressionState(spec.compressor, warmup_steps=args.warmup_steps, **spec.options)
    ddp.register_comm_hook(state, compression_hook)
    optimizer = _optimizer(args, spec, ddp.parameters())
    state.watch_optimizer(optimizer)
    steps = args.steps or epochs_to_steps(args.epochs, workload.shard_size, args.batch_size)
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)  # same batches in every run

    losses, cum_bytes, step_times = [], [], []
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"{spec.label:>12}", unit="step", leave=True, dynamic_ncols=True)
    for step in range(steps):
        x, y = workload.batch(generator, args.batch_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = ddp(x)
        loss = workload.loss(output, y)
        loss.backward()
        optimizer.step()
        value = loss.item()  # also waits for the step
        _sync(device)
        step_times.append(time.perf_counter() - started)
        losses.append(value)
        cum_bytes.append(state.wire_bytes)
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                shown = {"loss": f"{value:.4f}"}
                if workload.has_accuracy:
                    with torch.no_grad():
                        shown["acc"] = f"{workload.batch_accuracy(output, y):.3f}"
                bar.set_postfix(**shown, sent=_human_bytes(state.wire_bytes))
    eval_loss, accuracy = workload.evaluate(model, device)
    if bar is not None:
        bar.set_postfix(loss=f"{losses[-1]:.4f}", eval=f"{eval_loss:.4f}",
                        acc="-" if accuracy is None else f"{accuracy:.3f}", sent=_human_bytes(state.wire_bytes))
        bar.close()

    # Every rank's training losses, averaged per step: the loss of the global batch.
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, losses)
    mean_losses = [sum(ls[i] for ls in gathered) / world for i in range(steps)]
    stats = state.stats()
    timed = step_times[min(len(step_times) - 1, max(1, args.warmup_steps)):]
    tail = mean_losses[-max(1, steps // 10):]
    return {
        "compressor": spec.compressor,
        "label": spec.label,
        "options": dict(spec.options),
        "density": spec.options.get("density"),
        "steps": steps,
        "eval_loss": eval_loss,
        "accuracy": accuracy,
        "train_loss": sum(tail) / len(tail),
        "wire_bytes_per_step": stats["wire_bytes"] / steps,
        "dense_bytes_per_step": stats["dense_bytes"] / steps,
        "compression_ratio": stats["compression_ratio"],
        "time_per_step_s": statistics.median(timed),
        "compress_s_per_step": stats["compress_s"] / steps,
        "decode_s_per_step": stats["decode_s"] / steps,
        "skipped_steps": stats["skipped_steps"],
        "history": {"loss": mean_losses, "cum_bytes": cum_bytes},
    }


def run_rank(rank: int, world: int, local_rank: int, args: argparse.Namespace, runs: List[RunSpec]) -> None:
    device, backend = _device_and_backend(args, local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        workload = make_workload(args.workload, rank, world, args.seed, args.heterogeneous, args.data_dir)
        results = []
        for spec in runs:
            results.append(train_one(args, spec, workload, rank, world, device))
            dist.barrier()
        if rank == 0:
            report(args, results, world, workload.has_accuracy, backend)
    finally:
        # Free the DDP models (they may sit in reference cycles) while the process group lives.
        gc.collect()
        dist.destroy_process_group()


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace, runs: List[RunSpec]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    run_rank(local_rank, world, local_rank, args, runs)
    # Done and written: leave without interpreter finalisation, so that gloo's threads cannot meet
    # the interpreter's teardown (a suspected cause of a rare abort seen in the tests).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------- output
def format_table(results: List[Dict[str, Any]], has_accuracy: bool) -> str:
    dense = next((r for r in results if r["compressor"] == "none"), None)
    header = ["compressor", "density", "train loss", "eval loss", "accuracy", "bytes/step",
              "vs fp32", "ms/step"]
    rows = []
    for r in results:
        rows.append([
            r["compressor"],
            "-" if r["density"] is None else f"{r['density']:g}",
            f"{r['train_loss']:.4f}",
            f"{r['eval_loss']:.4g}",
            f"{100 * r['accuracy']:.1f}%" if has_accuracy and r["accuracy"] is not None else "-",
            _human_bytes(r["wire_bytes_per_step"]),
            f"{r['compression_ratio']:.1f}x",
            f"{1000 * r['time_per_step_s']:.1f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for row in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if dense is None:
        out.append("(no dense run: add 'none' to --compare for the baseline)")
    return "\n".join(out)


def _smooth(values: List[float], window: int) -> List[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_plots(out: str, results: List[Dict[str, Any]], title: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind in ("step", "bytes"):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for r in results:
            loss = r["history"]["loss"]
            y = _smooth(loss, max(1, len(loss) // 30))
            if kind == "step":
                ax.plot(range(1, len(y) + 1), y, label=r["label"])
            else:
                x = [max(b, 1) / 2**20 for b in r["history"]["cum_bytes"]]
                ax.plot(x, y, label=r["label"])
        if kind == "step":
            ax.set_xlabel("step")
        else:
            ax.set_xlabel("cumulative MiB sent per rank")
            ax.set_xscale("log")
        ax.set_ylabel("training loss (moving average)")
        positive = all(v > 0 for r in results for v in r["history"]["loss"])
        if positive:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, f"loss_vs_{kind}.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def report(args: argparse.Namespace, results: List[Dict[str, Any]], world: int, has_accuracy: bool,
           backend: str) -> None:
    os.makedirs(args.out, exist_ok=True)
    config = {
        "workload": args.workload, "world_size": world, "backend": backend, "seed": args.seed,
        "heterogeneous": args.heterogeneous, "batch_size": args.batch_size, "lr": args.lr,
        "optimizer": args.optimizer, "momentum": args.momentum, "warmup_steps": args.warmup_steps,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"config": config, "runs": results}, f, indent=1)
    columns = [k for k in results[0] if k not in ("history", "options")] + ["options"]
    with open(os.path.join(args.out, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: r[k] for k in columns if k != "options"}, "options": json.dumps(r["options"])})
    title = f"{args.workload}, {world} workers" + (", heterogeneous" if args.heterogeneous else "")
    plots = write_plots(args.out, results, title)
    print()
    print(f"{title}, {results[0]['steps']} steps, seed {args.seed}, {backend}")
    print(format_table(results, has_accuracy))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}, metrics.csv, " + ", ".join(os.path.basename(p) for p in plots))


# ---------------------------------------------------------------------------------------- main
def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve_args(args)
        runs = plan_runs(args)
        check_available(args.workload, args.data_dir)
    except (ValueError, WorkloadError) as err:
        parser.error(str(err))
    if _under_torchrun():
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), args, runs)
        return 0
    import torch.multiprocessing as mp

    try:
        mp.spawn(_spawned, args=(args.nproc, _free_port(), args, runs), nprocs=args.nproc, join=True)
    except mp.ProcessRaisedException as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        print(f"{PROG}: error: a worker failed: {lines[-1] if lines else err}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as err:
        print(f"{PROG}: error: a worker exited: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

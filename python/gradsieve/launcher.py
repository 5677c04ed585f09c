"""Where ``gradsieve-train``'s workers come from: local processes it starts itself, or the ranks
``torchrun`` gives it; the process group, the runs in turn, the report on rank 0."""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from gradsieve import link
from gradsieve.training import RunSpec, train_one
from gradsieve.workloads import WorkloadError, make_workload

__all__ = ["under_torchrun", "launch", "run_rank"]

Reporter = Callable[[argparse.Namespace, List[Dict[str, Any]], int, Any, str], None]


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _device_and_backend(args: argparse.Namespace, local_rank: int) -> tuple:
    backend = args.backend
    if backend == "auto":
        # The same choice on every rank: NCCL only when each local rank has a GPU of its own (with
        # one GPU and two local workers, rank 0 alone choosing NCCL would split the group).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise WorkloadError("--backend nccl needs CUDA GPUs, none is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), backend
    return torch.device("cpu"), backend


def run_rank(rank: int, world: int, local_rank: int, args: argparse.Namespace, runs: List[RunSpec],
             reporter: Reporter) -> None:
    device, backend = _device_and_backend(args, local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        workload = make_workload(args.workload, rank, world, args.seed, args.heterogeneous, args.data_dir,
                                 model_size=args.model_size)
        results = []
        for spec in runs:
            results.append(train_one(args, spec, workload, rank, world, device))
            gc.collect()
            dist.barrier()
        if rank == 0:
            reporter(args, results, world, workload, backend)
    finally:
        # Free the DDP models (they may sit in reference cycles) while the process group lives.
        gc.collect()
        dist.destroy_process_group()


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace, runs: List[RunSpec],
             reporter: Reporter) -> None:
    link.die_with_parent()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    run_rank(local_rank, world, local_rank, args, runs, reporter)
    # Done and written: leave without interpreter finalisation, so that gloo's threads cannot meet
    # the interpreter's teardown (a suspected cause of a rare abort seen in the tests).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, runs: List[RunSpec], reporter: Reporter, prog: str) -> int:
    """Runs every spec of ``runs`` on the ranks torchrun gives, or on ``args.nproc`` local worker
    processes. Returns the exit status."""
    if under_torchrun():
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                 args, runs, reporter)
        return 0
    import torch.multiprocessing as mp

    try:
        mp.spawn(_spawned, args=(args.nproc, _free_port(), args, runs, reporter), nprocs=args.nproc, join=True)
    except mp.ProcessRaisedException as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        print(f"{prog}: error: a worker failed: {lines[-1] if lines else err}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as err:
        print(f"{prog}: error: a worker exited: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0

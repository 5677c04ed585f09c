"""Where ``gradsieve-train``'s workers come from: local processes it starts itself, or the ranks
``torchrun`` gives it; the process group, the runs in turn, the report on rank 0."""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import socket
import sys
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from gradsieve.config_check import check_agreement
from gradsieve.train import cluster, link
from gradsieve.train.failures import error_line
from gradsieve.train.run import RunSpec, train_one
from gradsieve.train.workloads import WorkloadError, make_workload

__all__ = ["under_torchrun", "launch", "run_rank", "agreed_arguments", "ArgumentsDiffer"]

# The arguments each node may give a value of its own (by argparse dest): where it reads and writes
# (paths on its own disks), how long it waits for a peer, whether it shows progress, and the local
# layout, which torchrun or the emulated cluster set per node (--nproc is ignored under torchrun).
PER_NODE = ("out", "data_dir", "checkpoint_dir", "timeout", "no_progress", "nproc", "nodes", "link")
# Namespace fields compared in another form below: the planned runs stand for --compressor and
# --compare, the resolved goal for --target.
_COMPARED_AS = ("compressor", "compare", "opt", "target", "target_metric", "target_value")


class ArgumentsDiffer(ValueError):
    """The ranks were started with different gradsieve-train arguments; raised on every rank, the
    message names each differing option and its value on every rank."""


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def agreed_arguments(args: argparse.Namespace, runs: List[RunSpec]) -> Dict[str, Any]:
    """What every rank must have been started with alike, keyed by the option as typed
    (``--steps``), with the values resolved (a workload's default steps, the target): every
    argument except those of :data:`PER_NODE`. The runs stand for ``--compare``/``--compressor``
    (each run's name with its variant); ``--opt`` is its KEY=VALUE pairs (the last of a key wins,
    as for the runs)."""
    mine: Dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest not in PER_NODE and dest not in _COMPARED_AS:
            mine[_option(dest)] = value
    mine["--compare"] = [spec.name for spec in runs]
    pairs: Dict[str, str] = {}
    for item in getattr(args, "opt", None) or ():
        key, _, value = str(item).partition("=")
        pairs[key.strip()] = value.strip()
    mine["--opt"] = pairs
    metric, value = getattr(args, "target_metric", None), getattr(args, "target_value", None)
    mine["--target"] = None if metric is None else f"{metric}={value:g}"
    return mine


def check_arguments(args: argparse.Namespace, runs: List[RunSpec], device: torch.device) -> None:
    """Compares :func:`agreed_arguments` across the ranks (three small collectives when they
    differ, one when they agree). Raises :class:`ArgumentsDiffer` on every rank when they differ."""
    try:
        check_agreement(agreed_arguments(args, runs), group=None, device=device,
                        what="gradsieve-train: the nodes were started with different arguments")
    except ValueError as err:
        may_differ = ", ".join(_option(dest) for dest in PER_NODE if dest not in ("nodes", "link"))
        raise ArgumentsDiffer(f"{err}\n  start every node with the same arguments (only {may_differ} "
                              "may differ)") from None

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
    timeout = getattr(args, "timeout", 300.0)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout), store=_elastic_store(rank, world, timeout))
    except Exception as err:  # the rendezvous waits for every rank, under the same timeout
        if _timed_out(err):
            raise RuntimeError(f"rank {rank}: a peer never joined: no answer within --timeout {timeout:g} s "
                               f"({_first_line(err)})") from None
        raise
    try:
        # Before any training collective: ranks started with different arguments (--steps, say)
        # would otherwise fail mid-run with a broken connection, or train on wrong numbers.
        check_arguments(args, runs, device)
        _run_all(rank, world, args, runs, reporter, device, backend)
    except ArgumentsDiffer:
        raise
    except Exception as err:
        if _timed_out(err):
            raise RuntimeError(f"rank {rank}: a peer stopped answering: no reply within --timeout {timeout:g} s "
                               f"({_first_line(err)})") from None
        raise
    finally:
        # Free the DDP models (they may sit in reference cycles) while the process group lives.
        gc.collect()
        dist.destroy_process_group()


def _elastic_store(rank: int, world: int, timeout: float):
    """Under torchrun's restarts (``--max-restarts``), the rendezvous store of attempt N with a prefix
    of its own; None otherwise (init_process_group's env:// default).

    Without the prefix, a restarted group sometimes read the addresses the previous attempt's
    (dead) workers had published and failed with "connectFullMesh ... Connection refused"."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_store and rank == 0,
                          timeout=datetime.timedelta(seconds=timeout), multi_tenant=not agent_store)
    return dist.PrefixStore(f"/gradsieve/attempt_{restart}", store)


def _timed_out(err: BaseException) -> bool:
    """A collective or the rendezvous gave up waiting (gloo: "Timed out waiting ...", the store:
    "... timeout ...")."""
    text = str(err).lower()
    return isinstance(err, TimeoutError) or "timed out" in text or "timeout" in text


def _first_line(err: BaseException) -> str:
    """The innermost message of ``err``: torch wraps a failed collective seen from a future's callback
    in "Got the following error when running the callback: RuntimeError: ..." (twice over a hook)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    text = re.split(r"\w+(?:Error|Exception): ", text)[-1]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[source/file.cc:81] " prefix
    return text[:200]


def _run_all(rank, world, args, runs, reporter, device, backend) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", args.nproc))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    workload = make_workload(args.workload, rank, world, args.seed, args.heterogeneous, args.data_dir,
                             model_size=args.model_size)
    results = []
    for index, spec in enumerate(runs):
        results.append(train_one(args, spec, workload, rank, world, device, index))
        gc.collect()
        dist.barrier()
    if rank == 0:
        reporter(args, results, world, workload, backend)


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace, runs: List[RunSpec],
             reporter: Reporter, launcher: int) -> None:
    link.die_with_parent(launcher)
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
        if cluster.CLUSTER_ENV in os.environ:
            link.die_with_parent()  # an emulated node's worker goes with its torchrun
        try:
            run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                     args, runs, reporter)
        except ArgumentsDiffer as err:
            # Every rank fails alike; each node's local rank 0 says why, without a traceback
            # (torchrun then reports the failed workers). An emulated node's line reaches the
            # launcher's failure line through error_line.
            if os.environ.get("LOCAL_RANK") == "0":
                message = str(err)
                if message.startswith(f"{prog}: "):
                    message = message[len(prog) + 2:]
                print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
            return 2
        return 0
    import logging

    import torch.multiprocessing as mp

    # The stopped or failed peers are taken down below; the error line says why, not torch's log.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)

    try:
        ctx = mp.start_processes(_spawned, args=(args.nproc, _free_port(), args, runs, reporter, os.getpid()),
                                 nprocs=args.nproc, join=False, start_method="spawn")
        # A short grace period: a worker that failed has already said why; the others are either
        # failing too or stuck (a stopped peer never answers SIGTERM), so do not wait 30 s for them.
        while not ctx.join(grace_period=2.0):
            pass
    except mp.ProcessRaisedException as err:
        print(f"{prog}: error: a worker failed: {error_line(str(err))}", file=sys.stderr)
        return 1
    except mp.ProcessExitedException as err:
        print(f"{prog}: error: a worker exited: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0

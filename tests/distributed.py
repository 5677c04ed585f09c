"""Runs a test function on N gloo worker processes (torch.multiprocessing), collecting results;
recording_hook, the compression hook that also keeps what went in and came out of each bucket."""

import gc
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradsieve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        gc.collect()  # free DDP models and hook futures while the process group is alive
        dist.destroy_process_group()
    # The result is on disk: leave without interpreter finalisation. Once, under heavy load, a
    # worker died with "terminate called without an active exception" (cause not found; gloo
    # threads meeting interpreter teardown is the suspect), and teardown is not what is tested.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(fn, world_size, tmp_path, *args):
    """Calls ``fn(rank, world_size, *args)`` on every rank; returns the list of their results.
    ``fn`` must be a module-level function. A worker's exception fails the call with its message."""
    out_dir = str(tmp_path)
    mp.spawn(_entry, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def recording_hook():
    """compression_hook that also keeps each bucket's input (this rank's gradient) and output."""
    inputs, outputs = [], []

    def hook(state, bucket):
        inputs.append(bucket.buffer().detach().clone())

        def keep(f):
            outputs.append(f.value().detach().clone())
            return f.value()

        return gradsieve.compression_hook(state, bucket).then(keep)

    hook.inputs, hook.outputs = inputs, outputs
    return hook

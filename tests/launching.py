"""Helpers shared by the tests and benchmarks/check_timing.py that start gradsieve-train's
processes: finding a launcher's workers, and a two-rank send over an emulated link."""

import glob
import os
import re
import signal
import subprocess
import sys
import time
from typing import Tuple

__all__ = ["SEND_RECV", "spawned_workers", "stop_a_worker"]


def spawned_workers(parent: int) -> list:
    """The pids of the workers that the launcher ``parent`` spawned (torch.multiprocessing)."""
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    workers = []
    for pid in found:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(int(pid))
        except OSError:
            pass
    return workers


def training_steps_done(checkpoints: str, rank: int) -> int:
    """The newest step that ``rank`` has saved a checkpoint after (0 before the first)."""
    found = [int(m.group(1)) for path in glob.glob(os.path.join(checkpoints, "*", f"step-*-rank{rank}.pt"))
             if (m := re.search(r"step-(\d+)-rank", os.path.basename(path)))]
    return max(found, default=0)


def stop_a_worker(folder: str, timeout: int = 4) -> Tuple[int, str, float]:
    """Starts a long digits run with ``--timeout`` on 2 local workers, waits until both ranks have
    saved a checkpoint after a compressed step (both are in the training loop), SIGSTOPs one
    worker (its socket stays open: only the process-group timeout can end the others' wait) and
    waits for the run to end. Returns its exit status, its stderr, and the seconds from the stop
    to the end. The deadlines are hang guards only."""
    checkpoints = os.path.join(folder, "ck")
    proc = subprocess.Popen([sys.executable, "-m", "gradsieve.train", "--workload", "digits", "--compare", "topk",
                             "--steps", "100000", "--timeout", str(timeout), "--no-progress", "--out",
                             os.path.join(folder, "out"), "--checkpoint-dir", checkpoints,
                             "--checkpoint-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stopped = None
    try:
        # Without the timeout the stopped run would wait gloo's default, 30 minutes.
        deadline = time.monotonic() + 300
        while (min(training_steps_done(checkpoints, r) for r in (0, 1)) < 2 and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert min(training_steps_done(checkpoints, r) for r in (0, 1)) >= 2, "no training steps in 300 s"
        workers = spawned_workers(proc.pid)
        assert len(workers) == 2, "the run did not start its workers"
        stopped = workers[-1]
        os.kill(stopped, signal.SIGSTOP)
        began = time.monotonic()
        _, err = proc.communicate(timeout=300)
        waited = time.monotonic() - began
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except OSError:
                pass
    return proc.returncode, err, waited


# A script (run inside a link's namespace: LINK NBYTES OUT) in which rank 0 sends NBYTES to rank 1
# twice (the first opens the connection) and writes the second transfer's seconds and the bytes
# the namespace's loopback carried meanwhile; rank 0's window opens before the send and closes
# after rank 1 has it all.
SEND_RECV = """
    import json, os, sys, time
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from gradsieve.train import link

    def worker(rank, port, nbytes, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        t = torch.ones(nbytes // 4)
        for _ in range(2):  # the first transfer opens the connection
            dist.barrier()
            started, lo_before = time.perf_counter(), link.tx_bytes()
            if rank == 0:
                dist.send(t, 1)
            else:
                dist.recv(t, 0)
            dist.barrier()
            seconds, lo_bytes = time.perf_counter() - started, link.tx_bytes() - lo_before
        if rank == 0:  # its window opens before the send and closes after rank 1 has it all
            json.dump({"seconds": seconds, "lo_bytes": lo_bytes}, open(out, "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        link.configure(link.LinkSpec.parse(sys.argv[1]))
        mp.spawn(worker, args=(29512, int(sys.argv[2]), sys.argv[3]), nprocs=2)
"""

"""The emulated cluster of ``gradsieve-train --nodes N --nproc L --link RATE``: argument errors,
and where this machine allows private network namespaces, the nodes themselves: a node's NIC
carries a payload at the rate while traffic inside a node is not limited, a dense step's
cross-node bytes are what a ring all-reduce moves, the exchanges' cross-node bytes, and a
teardown that leaves nothing behind (normal end, a crashed worker, Ctrl-C)."""

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from gradsieve.train import cluster, link
from test_link import PYTHON, _foreign_netns_processes, _wait_for, requires_netns


def _host_links():
    return subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout


# ------------------------------------------------------------------------------------- arguments
def test_the_ranks_get_the_arguments_without_the_clusters():
    argv = ["--nodes", "2", "--nproc=2", "--workload", "textcls", "--link", "1gbit", "--node", "3", "--steps", "5"]
    assert cluster.without_options(argv, ("--nodes", "--nproc", "--link")) == ["--workload", "textcls", "--steps", "5"]
    assert cluster.without_options(["--no-progress", "--nod=4"], ("--nodes",)) == ["--no-progress"]


@pytest.mark.parametrize("argv,message", [
    (["--nodes", "0", "--link", "1gbit"], "--nodes must be an integer >= 1, got 0"),
    (["--nodes", "2"], "--nodes needs --link RATE"),
    (["--nodes", "2", "--nproc", "0", "--link", "1gbit"], "--nproc must be"),
    (["--compare", "topk:exchange=ring"], "exchange must be one of allgather, hierarchical, allreduce, "
                                          "hierarchical+allreduce, got 'ring'"),
    (["--compare", "none:exchange=hierarchical"], "none has no option exchange"),
    (["--compare", "topk:select=mix"], "select= chooses the allreduce exchange's index set"),
    (["--compare", "regtopk:exchange=allreduce"], "'regtopk' chooses its own"),
    (["--compare", "topk:exchange=allreduce:values=int8"], "values must be fp32, fp16 or bf16"),
    (["--compare", "topk:exchange=hierarchical:speculative=true"], "speculative training needs exchange=allgather"),
])
def test_bad_cluster_and_exchange_arguments_are_one_line(argv, message):
    done = subprocess.run([PYTHON, "-m", "gradsieve.train", "--workload", "digits", "--steps", "2", *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def test_nodes_under_torchrun_is_an_error():
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    env.pop(cluster.CLUSTER_ENV, None)
    done = subprocess.run([PYTHON, "-m", "gradsieve.train", "--workload", "digits", "--nodes", "2", "--link", "1gbit"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "under torchrun, leave out --nodes" in done.stderr


# ------------------------------------------------------------------------------------- the nodes
TRANSFERS = """
    import json, sys, time
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    payload = torch.zeros(int(sys.argv[1]) // 4)
    seconds = {}
    for name, (a, b) in {"inside": (0, 1), "across": (0, world - 1)}.items():
        dist.barrier()
        started = time.perf_counter()
        if rank == a:
            dist.send(payload, b)
        if rank == b:
            dist.recv(payload, a)
        dist.barrier()
        seconds[name] = time.perf_counter() - started
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(seconds, f)
    dist.destroy_process_group()
"""


@pytest.mark.slow
@requires_netns
def test_a_nodes_nic_runs_at_the_rate_and_inside_a_node_is_not_limited(tmp_path):
    """16 MB between two nodes at 100 Mbit/s takes the rate's time within 15% (headers
    included); between two ranks of one node, far less."""
    script = tmp_path / "transfers.py"
    script.write_text(textwrap.dedent(TRANSFERS))
    out = tmp_path / "seconds.json"
    nbytes, rate = 16_000_000, 100_000_000
    before = _host_links()
    done = subprocess.run([PYTHON, "-m", "gradsieve.train.cluster", "--nodes", "2", "--nproc", "2", "--link",
                           "100mbit", "--", str(script), str(nbytes), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds = json.loads(out.read_text())
    across = nbytes * 8 / seconds["across"]
    assert 0.85 * rate <= across <= 1.02 * rate, f"{across / 1e6:.1f} Mbit/s across nodes on 100 Mbit/s"
    assert seconds["inside"] < seconds["across"] / 5, seconds
    assert _host_links() == before
    assert _wait_for(lambda: _foreign_netns_processes() == [], 20)


def _train(tmp_path, *argv, timeout=600):
    out = tmp_path / "out"
    done = subprocess.run([PYTHON, "-m", "gradsieve.train", "--no-progress", "--out", str(out), *argv],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, {r["name"]: r for r in json.loads((out / "metrics.json").read_text())["runs"]}


@pytest.mark.slow
@requires_netns
def test_cross_node_bytes_of_dense_and_compressed_steps(tmp_path):
    """2 nodes of 2 ranks. A dense step: each NIC sends what gloo's ring all-reduce puts on the one
    ring edge leaving the node, 2 (P - 1) / P of the gradient. The hierarchical exchange's
    cross-node bytes are about (P - 1) / (N - 1) = 3 times fewer than the flat all-gather's (textcls:
    payloads of tens of KB, where per-message overheads are small)."""
    before = _host_links()
    done, runs = _train(tmp_path, "--workload", "textcls", "--nodes", "2", "--nproc", "2", "--link", "1gbit", "--steps", "6",
                        "--compare", "none,topk,topk:exchange=hierarchical,topk:exchange=allreduce")
    assert "2 nodes x 2 ranks, NIC 1 Gbit/s each way" in done.stdout and "x-node/step" in done.stdout
    nodes, ranks = 2, 4
    dense = runs["none"]
    ring = nodes * 2 * (ranks - 1) / ranks * dense["dense_bytes_per_step"]
    assert 1.0 <= dense["cross_node_bytes_per_step"] / ring <= 1.08, (dense["cross_node_bytes_per_step"], ring)
    flat = runs["topk"]["cross_node_bytes_per_step"]
    shards = runs["topk:exchange=hierarchical"]["cross_node_bytes_per_step"]
    assert 2.5 <= flat / shards <= 3.5, (flat, shards)
    assert runs["topk:exchange=hierarchical"]["node_bytes_per_step"] > 0
    assert runs["topk:exchange=allreduce"]["cross_node_bytes_per_step"] < flat
    assert _host_links() == before
    assert _wait_for(lambda: _foreign_netns_processes() == [], 20)


@pytest.mark.slow
@requires_netns
def test_a_crashed_worker_ends_the_run_with_one_line_and_nothing_left(tmp_path):
    env = dict(os.environ, GRADSIEVE_FAULT_AT_STEP="3:2")
    before = _host_links()
    done = subprocess.run([PYTHON, "-m", "gradsieve.train", "--workload", "digits", "--nodes", "2", "--nproc", "2",
                           "--link", "1gbit", "--steps", "50", "--timeout", "20", "--no-progress", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "node" in errors[0] and "failed" in errors[0], done.stderr[-2000:]
    assert _host_links() == before
    assert _wait_for(lambda: _foreign_netns_processes() == [], 30)


@pytest.mark.slow
@requires_netns
def test_ctrl_c_tears_the_cluster_down(tmp_path):
    proc = subprocess.Popen([PYTHON, "-m", "gradsieve.train", "--workload", "digits", "--nodes", "2", "--nproc", "1",
                             "--link", "1gbit", "--steps", "100000", "--no-progress", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # Both nodes' workers are up (each node: unshare -> torchrun -> a worker).
        assert _wait_for(lambda: proc.poll() is not None or len(_foreign_netns_processes()) >= 5, 120)
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert _wait_for(lambda: _foreign_netns_processes() == [], 30)

"""The emulated cluster of ``gradsieve-train --nodes N --nproc L --link RATE``: N nodes of L ranks
on this machine, each node behind a network card of its own.

Inside the run's private network namespace (made as for ``--link``, :mod:`gradsieve.train.link`)
a Linux bridge is the switch. Each node is a process in a network namespace of its own
(``unshare --net``), with one end of a veth pair, ``nic0``, moved into it by pid and given the
address 10.77.0.(i+1); the other end is a port of the bridge. A token-bucket filter on each end
limits the node's traffic to RATE in each direction (the node end shapes what it sends, the
bridge end what it receives): full duplex, like a NIC on a non-blocking switch. Ranks of one node
reach each other over the node's own addresses, which the kernel routes through the node's
loopback: unshaped, as NVLink or PCIe inside a real node.

Each node then runs ``torchrun --nnodes N --nproc-per-node L`` with c10d rendezvous at node 0's
address (node 0 hosts the store), as a real multi-node job starts, and gloo bound to ``nic0``.
Every process dies with the one that started it (``prctl(PR_SET_PDEATHSIG)``): a run that ends, is
interrupted or crashes takes its nodes, their workers and their namespaces with it, and the run's
namespace goes with its last process. Nothing is created outside the run's namespace.

The bytes each node's NIC transmitted are read from the node's own ``/proc/net/dev``
(:func:`gradsieve.train.link.tx_bytes`), by its local rank 0.

``python -m gradsieve.train.cluster --nodes N --nproc L --link RATE -- SCRIPT [ARGS]`` runs any
torchrun script (or ``-m module ...``) this way; gradsieve-train's ``--nodes`` uses the same code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

from gradsieve.train import link
from gradsieve.train.failures import error_line

__all__ = ["NIC", "NIC_ENV", "CLUSTER_ENV", "node_address", "run_cluster", "nic_tx_bytes"]

NIC = "nic0"
BRIDGE = "br0"
SUBNET = "10.77.0"
RENDEZVOUS_PORT = 29400
# Set in every worker of an emulated node: the node's NIC, and "N,L,RATE" of the cluster.
NIC_ENV = "GRADSIEVE_NIC"
CLUSTER_ENV = "GRADSIEVE_CLUSTER"


def node_address(index: int) -> str:
    return f"{SUBNET}.{index + 1}"


def nic_tx_bytes() -> Optional[int]:
    """Bytes this process's node NIC has sent (None outside an emulated node)."""
    nic = os.environ.get(NIC_ENV)
    return None if nic is None else link.tx_bytes(nic)


def _run(cmd: Sequence[str]) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise link.LinkError(f"--nodes: `{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


def _shape(device: str, spec: link.LinkSpec) -> None:
    if spec.rate_bits is not None:
        _run(spec.tbf_command(device))


def _stop(procs: List[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()


def run_cluster(nodes: int, nproc: int, spec: link.LinkSpec, target: Sequence[str], prog: str,
                env: Optional[dict] = None) -> int:
    """Runs ``torchrun ... target`` on ``nodes`` emulated nodes of ``nproc`` ranks each (call only
    inside the run's private namespace, :func:`gradsieve.train.link.inside`). ``target``: a script
    and its arguments, or ``-m module ...``. Returns the exit status; on a failure prints one line
    naming the node and its error."""
    if not link.inside():
        raise link.LinkError("refusing to build a cluster in a namespace that is not private to this run")
    _run(["ip", "link", "set", "lo", "up"])
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "link", "set", BRIDGE, "mtu", str(link.MTU), "up"])
    base_env = dict(os.environ if env is None else env)
    base_env.update({NIC_ENV: NIC, CLUSTER_ENV: f"{nodes},{nproc},{spec.text}", "GLOO_SOCKET_IFNAME": NIC,
                     "TORCH_CPP_LOG_LEVEL": base_env.get("TORCH_CPP_LOG_LEVEL", "ERROR")})
    base_env.pop(link.INSIDE_ENV, None)
    procs: List[subprocess.Popen] = []
    logs = []
    run_id = f"gradsieve{os.getpid()}"
    try:
        for index in range(nodes):
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            log = tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            cmd = ["unshare", "--net", "--", sys.executable, "-m", "gradsieve.train.cluster", "--node", str(index),
                   "--nodes", str(nodes), "--nproc", str(nproc), "--link", spec.text, "--sync", f"{ready_w},{go_r}",
                   "--run-id", run_id, "--", *target]
            proc = subprocess.Popen(cmd, env=base_env, pass_fds=(ready_w, go_r), stderr=log,
                                    preexec_fn=_node_preexec)
            procs.append(proc)
            os.close(ready_w)
            os.close(go_r)
            # The node has made its namespace once it says so: only then may its NIC move in.
            with os.fdopen(ready_r) as ready:
                if ready.readline().strip() != "ready":
                    raise link.LinkError(f"--nodes: node {index} did not start: {_tail(log)}")
            port = f"vh{index}"
            _run(["ip", "link", "add", port, "mtu", str(link.MTU), "type", "veth", "peer", "name", NIC,
                  "netns", str(proc.pid)])
            _run(["ip", "link", "set", port, "master", BRIDGE, "up"])
            _shape(port, spec)
            with os.fdopen(go_w, "w") as go:
                go.write("go\n")
        return _wait(procs, logs, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        _stop(procs)
        for log in logs:
            log.close()


def _node_preexec() -> None:
    os.setpgrp()  # the node and its torchrun workers: one group to stop
    link.die_with_parent()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    text = log.read()
    return error_line(text) if text.strip() else "no output"


def _wait(procs: List[subprocess.Popen], logs, prog: str) -> int:
    """Waits for every node; the first to fail stops the others."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            first = failed[0]
            print(f"{prog}: error: node {first} failed (exit {codes[first]}): {_tail(logs[first])}",
                  file=sys.stderr)
            return 1
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


def _node_main(args: argparse.Namespace) -> int:
    """Inside a node's fresh namespace: say so, wait for the NIC, configure it, exec torchrun."""
    ready_w, go_r = (int(fd) for fd in args.sync.split(","))
    with os.fdopen(ready_w, "w") as ready:
        ready.write("ready\n")
    with os.fdopen(go_r) as go:
        if go.readline().strip() != "go":
            return 1  # the run stopped before this node's NIC was ready
    spec = link.LinkSpec.parse(args.link)
    me = node_address(args.node)
    _run(["ip", "link", "set", "lo", "up"])
    _run(["ip", "addr", "add", f"{me}/24", "dev", NIC])
    _run(["ip", "link", "set", NIC, "mtu", str(link.MTU), "up"])
    _shape(NIC, spec)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nodes),
                "--nproc-per-node", str(args.nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{node_address(0)}:{RENDEZVOUS_PORT}", "--rdzv-id", args.run_id,
                "--rdzv-conf", f"is_host={1 if args.node == 0 else 0}", "--local-addr", me,
                "--max-restarts", "0", *args.target]
    os.execv(sys.executable, torchrun)
    return 1  # not reached


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gradsieve.train.cluster",
                                description="Run a torchrun script on an emulated cluster of nodes.")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--nproc", type=int, default=1, help="ranks per node")
    p.add_argument("--link", required=True, metavar="RATE", help="each node's NIC rate, each direction")
    p.add_argument("--node", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sync", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default="gradsieve", help=argparse.SUPPRESS)
    p.add_argument("target", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS], or -- -m MODULE [ARGS]")
    args = p.parse_args(argv)
    if args.target[:1] == ["--"]:
        args.target = args.target[1:]
    if args.node is not None:
        return _node_main(args)
    try:
        spec = link.LinkSpec.parse(args.link)
        check_layout(args.nodes, args.nproc)
    except ValueError as err:
        p.error(str(err))
    if not args.target:
        p.error("give a script (or -m module) to run on every node")
    if not link.inside():
        try:
            prefix = link.enter_prefix()
        except link.LinkError as err:
            p.error(str(err))
        return link.run_inside(list(sys.argv[1:] if argv is None else argv), prefix, module="gradsieve.train.cluster")
    try:
        return run_cluster(args.nodes, args.nproc, spec, args.target, p.prog)
    except link.LinkError as err:
        p.error(str(err))
    return 1


def without_options(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """``argv`` without the options ``names`` (``--name VALUE`` or ``--name=VALUE``, or an
    abbreviation argparse would accept): what each node's ranks are given."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        head = arg.split("=", 1)[0]
        if head.startswith("--") and len(head) > 3 and any(name.startswith(head) for name in names):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def check_layout(nodes: int, nproc: int) -> None:
    if not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"--nodes must be an integer >= 1, got {nodes!r}")
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an integer >= 1, got {nproc!r}")
    if nodes > 250:
        raise ValueError(f"--nodes must be at most 250 (one /24 subnet), got {nodes}")


if __name__ == "__main__":
    sys.exit(main())

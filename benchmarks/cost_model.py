"""An analytic step-time model of compressed data-parallel training, calibrated and checked on
``bench_network.py``'s measurements, then used to look past one machine.

One step is ``t = t_base + t_comm``.

*On the emulated link* (what bench_network measured): all N ranks share one queue of rate R (the
shaped loopback), so what counts is the bytes crossing it per step:

* ring all-reduce of S bytes per rank (DDP's default, torch-fp16, PowerSGD's factors): every rank
  sends 2 (N-1)/N S, so 2 (N-1) S cross the queue;
* all-gather of P-byte payloads (gradsieve's sparse compressors): every rank sends its payload to
  the N-1 others, N (N-1) P;
* ``t_comm = h * bytes / R``, h the packet overhead of TCP/IP over a 9000-byte MTU (measured:
  link bytes over payload bytes, about 1.01);
* ``t_base``: the same compressor's step time at the same N on the unlimited link (compute,
  compress, decode, loopback copies).

Predictions at 10 Mbit/s, 100 Mbit/s and 1 Gbit/s are compared with the measurements; the table
and ``cost_model.json`` give every point's error.

*On a cluster of one rank per node* (the first extrapolation, ``cluster_step_s``; its outputs
``cost_model.json`` and ``cost_model.png``): N nodes, each with its own full-duplex link of B bit/s
and a per-message latency alpha, behind a non-blocking switch:

* ring all-reduce: ``2 (N-1)/N * S / B + 2 (N-1) alpha``: its bytes per node hardly grow with N;
* ring all-gather: ``(N-1) * P / B + (N-1) alpha``: grows linearly with N;
* decoding sums N payloads of k entries: ``N * k * c_decode`` (c_decode measured per entry);
* compute and compress time as measured (on this 2-core CPU: a GPU would shrink them, which only
  moves the break-even towards slower links).

With P = k (4 + v) bytes (int32 index, v-byte value) and S = 4 n, gathering beats the ring on
traffic alone while ``N * density * (4 + v) / 8 < 1``: for density 0.01, N < 100 with fp32 values
and N < 160 with int8 values; decode time and latency pull the break-even lower.

*On a cluster of N nodes of L ranks* (``step_cost``; P = N L ranks; outputs
``cost_model_cluster.json``, ``cost_model_break_even.json``, ``cost_model_speedup.png``).

Topology (:class:`Cluster`). Each node has one full-duplex NIC of B bit/s into a non-blocking
switch; a message through it costs ``alpha + bytes / B``. Inside a node each rank has a link of
B_intra bytes/s each way (NVLink/NVSwitch on GPU nodes, shared memory on CPU ones) and a
per-message latency alpha_intra. Ranks are node-contiguous (rank r on node r // L, as torchrun and
``gradsieve.exchange.Topology`` place them), so a ring over all P ranks crosses each node's
boundary once: exactly one ring edge leaves a node and one enters it. A ring step moves one chunk
over every edge at once and lasts as long as its slowest edge, ``max(alpha + c/B, alpha_intra +
c/B_intra)``. Cross-node bytes are per node NIC and bucket, each way (what a NIC receives; in a
ring it sends as much); ``cross_total`` sums them over the nodes (the bytes through the switch).

A bucket holds n fp32 entries, S = 4 n bytes; a sparse exchange keeps k = ceil(d n) entries at
density d; the payload per rank is ``p = header + k (i + v)``: i index bytes (int32: 4, csr16: 2
plus 4 per 65536-entry block), v value bytes (fp32 4, bf16 2, int8 1 plus a 4-byte scale per
256-value chunk), header 8. The byte count is ``gradsieve.wire.PayloadFormat``'s, the library's
own layout.

Collectives:

* ring all-reduce of S over the P ranks: 2 (P-1) steps of S/P; NIC ``2 (P-1)/P S``, latency
  ``2 (P-1) alpha``;
* two-level all-reduce (NCCL-like): ring reduce-scatter inside the node ((L-1)/L S per rank over
  B_intra), the L shards of S/L all-reduced across nodes by L concurrent rings of the N ranks of
  one local index (all through the node's NIC: ``2 (N-1)/N S``, ``2 (N-1) alpha``) or by L double
  binary trees (``2 S``, ``2 ceil(log2 N) alpha``), ring all-gather inside the node. Every
  all-reduce (dense, bf16, PowerSGD's factors, the ``allreduce`` exchange's values) takes the
  fastest of the three (``algorithm="best"``: NCCL picks by size too, and a dense baseline that
  could be faster would flatter compression); ``algorithm="ring"`` forces the flat ring (gloo, as
  on the emulated cluster);
* ring all-gather of p over the P ranks: P-1 steps of p; NIC ``(P-1) p``, latency ``(P-1) alpha``;
* broadcast of q bytes: a pipelined binary tree over the nodes (``ceil(log2 N) alpha + 2 q / B``,
  an inner node sends to two; NIC q), then over the ranks of each node.

Exchanges (:data:`EXCHANGES`, one function each, per bucket):

* ``dense`` (DDP): all-reduce of S. ``torch-bf16``: all-reduce of S/2. ``powersgd`` (rank 1):
  two all-reduces (the P, then the Q factors) of its measured bytes per step, split over the
  buckets (``(rows + cols) r`` per matrix), plus its measured extra compute;
* ``allgather`` (today's exchange): select over n entries; ring all-gather of p among the P ranks:
  NIC ``(P-1) p``; decode P payloads, ``P k c_decode``;
* ``hierarchical``: ring reduce-scatter of S inside the node; each local rank compresses its shard
  of n/L entries (k/L kept, p_shard ~ p/L); L concurrent ring all-gathers among the N ranks of each
  local index: NIC ``(N-1) L p_shard ~ (N-1) p``, ``(N-1) alpha``; decode N payloads of k/L
  entries; ring all-gather of the dense shards inside the node. Cross-node traffic grows with N,
  not P: ``(P-1)/(N-1) >= L`` times less than allgather (L for large N);
* ``allreduce``: a rotating leader selects k indices of the bucket and broadcasts them (NIC 4 k);
  every rank all-reduces its values there (v bytes each): NIC about ``2 k v``, flat in P; decode
  is one scatter of k entries. (int8 values would need a re-quantising reduction: not modelled);
* ``hierarchical`` with ``cross="allreduce"``: reduce-scatter inside; per local index a leader
  selects k/L indices of its shard and broadcasts them among the N nodes; L concurrent all-reduces
  of k/L values across nodes (NIC about 2 k v + 4 k); all-gather inside.

Step time: ``t = t_compute + t_fixed + sum over buckets (compress + comm + decode)``. Overlap: none;
communication is not hidden behind the backward pass (``overlap`` > 0 hides up to that fraction of
``t_compute``), the same for every method. This overstates dense DDP's step, which overlaps well,
by at most its backward time: where communication and backward take similar time the speed-ups
over dense are upper bounds. The buckets are equal pieces of the gradient (textcls: 1, ResNet-50:
5, as the measured payload headers show). The arithmetic of reductions is not counted apart (on
the CPU it is in the measured B_intra).

Scenarios (``--device``; :func:`cpu_scenario`, :func:`h100_scenario`):

* ``cpu``: textcls (1,049,236 parameters, one bucket) on this 2-core VM, as :func:`calibrate`
  finds it in bench_network.json: compute 9.1 ms per step, compress 6.9 ns per entry (top-k; 6.0
  with int8 values), decode 73 ns per received entry, PowerSGD rank 1's extra work 5.7 ms and
  torch-fp16's (for bf16) 2.8 ms. B_intra is the loopback's measured all-reduce rate, 0.68 GB/s
  (gloo over TCP with one core per rank: pessimistic for a real CPU node; ``--intra-gbyte``),
  alpha_intra 10 us;
* ``h100``: ResNet-50 (25,557,032 parameters, 5 buckets) on H100s, from ``results/cuda_h100``:
  compute 24.4 ms = 1.5 x the DDP backward bench_hook measured (16.2 ms; the forward is assumed
  to take half the backward's time, not measured); compress = ``ef_topk_`` fitted as 0.064-0.067
  ms per call plus 11.4-11.8 ps per entry (2^26 and 2^28 entries); decode =
  ``sparse_accumulate_``, 75 ps per entry; the hook's own cost per step, 9.0-13.0 ms
  (bench_hook's overhead at world size 1 less those kernels: mostly host synchronisation per
  bucket; ``--hook-overhead-ms`` replaces it); PowerSGD rank 1's overhead 21.9 ms (546 KB per
  step) and fp16's (for bf16) 2.3 ms; B_intra 200 GB/s (NVLink; ``--intra-gbyte``), alpha_intra
  5 us.

Predictions (``cost_model_cluster.json``; ``--grid`` prints them): step time, speed-up over dense
and over PowerSGD, cross-node bytes, for N = 1, 2, 4 .. 1024 nodes, L = 1 and 8, 1, 10 and 100
Gbit/s per node, density 0.01 and 0.001. :func:`break_even_nodes` gives, for one exchange against
one baseline, the range of node counts where it is faster (every N up to 64, then 32 steps per
doubling up to 4096, crossings bisected); the table for 8-rank nodes at 10 Gbit/s is printed and
written to ``cost_model_break_even.json``; ``cost_model_speedup.png`` plots the speed-ups.

:func:`check_cluster` (``--cluster-report PATH``) predicts the cross-node bytes and ms/step of
each run of an emulated-cluster report (``gradsieve-train --nodes N --nproc L --link RATE``) and
prints the relative errors; the fields it reads are named in :data:`CLUSTER_REPORT_FIELDS`.

    python benchmarks/cost_model.py                     # reads benchmarks/results/bench_network.json
    python benchmarks/cost_model.py --device h100 --grid
    python benchmarks/cost_model.py --cluster-report runs/cluster/metrics.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ALLREDUCE = ("none", "torch-fp16", "powersgd")  # torch's hooks: all-reduce; the rest all-gather


def is_allreduce(row: Dict) -> bool:
    return row["compressor"] in ALLREDUCE


def queue_bytes(row: Dict, n: int) -> float:
    """Bytes that cross the one shared queue per step for this run's per-rank payload."""
    payload = row["wire_bytes_steady"]
    return 2 * (n - 1) * payload if is_allreduce(row) else n * (n - 1) * payload


def header_overhead(rows: List[Dict]) -> float:
    """Measured bytes on the link over the payload bytes the model counts (shaped runs, medians)."""
    ratios = [r["link_bytes_steady"] / queue_bytes(r, r["workers"]) for r in rows
              if r["rate_bits"] and r["link_bytes_steady"] and queue_bytes(r, r["workers"]) > 1e5]
    return statistics.median(ratios) if ratios else 1.0


def check_against_measurements(rows: List[Dict]) -> Dict:
    """Predicts every shaped point from the unlimited one of the same compressor and N."""
    h = header_overhead(rows)
    base = {(r["name"], r["workers"]): r for r in rows if r["rate_bits"] is None}
    points = []
    for r in rows:
        ref = base.get((r["name"], r["workers"]))
        if r["rate_bits"] is None or ref is None:
            continue
        predicted = ref["ms_per_step"] + 1e3 * h * queue_bytes(r, r["workers"]) * 8 / r["rate_bits"]
        points.append({"rate": r["rate"], "rate_bits": r["rate_bits"], "workers": r["workers"],
                       "name": r["name"], "measured_ms": r["ms_per_step"], "predicted_ms": predicted,
                       "error": predicted / r["ms_per_step"] - 1})
    errors = [abs(p["error"]) for p in points]
    return {"header_overhead": h, "points": points,
            "median_abs_error": statistics.median(errors) if errors else None,
            "max_abs_error": max(errors) if errors else None}


# ------------------------------------------------------------------------------- the cluster
def ring_allreduce_s(nbytes: float, n: int, bits: float, alpha: float) -> float:
    return 2 * (n - 1) / n * nbytes * 8 / bits + 2 * (n - 1) * alpha


def ring_allgather_s(nbytes: float, n: int, bits: float, alpha: float) -> float:
    return (n - 1) * nbytes * 8 / bits + (n - 1) * alpha


def calibrate(rows: List[Dict]) -> Dict:
    """Per-step costs of the measured workload, from the N = 2 runs on the unlimited link:

    * compute (forward, backward, optimizer): a sparse run's step minus its measured compress and
      decode time (its loopback all-gather of a few KB is negligible), the median over the sparse
      compressors;
    * the loopback's cost per all-reduced byte: the dense step minus that compute, per byte;
    * per all-reduce compressor, its own extra work (PowerSGD's matrix products and QR): its step
      minus the compute and its loopback bytes;
    * per sparse compressor, compress time, decode cost per entry, payload bytes and entries.
    """
    unlimited = {r["name"]: r for r in rows if r["rate_bits"] is None and r["workers"] == 2}
    dense = unlimited["none"]
    model = {"dense_bytes": dense["wire_bytes_steady"], "compressors": {}}
    computes = []
    for name, r in unlimited.items():
        if is_allreduce(r) or r["compress_ms_per_step"] is None:
            continue
        k = round(r["density"] * dense["wire_bytes_steady"] / 4)
        compress = r["compress_ms_per_step"] / 1e3
        decode = (r["decode_ms_per_step"] or 0.0) / 1e3
        computes.append(r["ms_per_step"] / 1e3 - compress - decode)
        model["compressors"][name] = {"kind": "allgather", "bytes": r["wire_bytes_steady"], "entries": k,
                                      "compress_s": compress, "decode_s_per_entry": decode / (2 * k)}
    compute = statistics.median(computes) if computes else dense["ms_per_step"] / 1e3
    model["compute_s"] = compute
    model["loopback_s_per_byte"] = max(0.0, dense["ms_per_step"] / 1e3 - compute) / dense["wire_bytes_steady"]
    for name, r in unlimited.items():
        if is_allreduce(r):
            loopback = model["loopback_s_per_byte"] * r["wire_bytes_steady"]
            extra = 0.0 if name == "none" else max(0.0, r["ms_per_step"] / 1e3 - compute - loopback)
            model["compressors"][name] = {"kind": "allreduce", "bytes": r["wire_bytes_steady"], "extra_s": extra}
    return model


def cluster_step_s(model: Dict, name: str, n: int, bits: float, alpha: float) -> float:
    c = model["compressors"][name]
    if c["kind"] == "allreduce":
        return model["compute_s"] + c["extra_s"] + ring_allreduce_s(c["bytes"], n, bits, alpha)
    decode = n * c["entries"] * c["decode_s_per_entry"]
    return model["compute_s"] + c["compress_s"] + decode + ring_allgather_s(c["bytes"], n, bits, alpha)


def break_even_workers(model: Dict, name: str, bits: float, alpha: float, limit: int = 1 << 16) -> Optional[int]:
    """The largest N at which ``name`` is faster than dense ring all-reduce (None: not even at 2)."""
    best = None
    for n in range(2, limit + 1):
        if cluster_step_s(model, name, n, bits, alpha) < cluster_step_s(model, "none", n, bits, alpha):
            best = n
        elif best is not None:
            break
    return best


def plot(check: Dict, model: Dict, alpha: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=110)
    ax = axes[0]
    for n, marker in ((2, "o"), (4, "s")):
        pts = [p for p in check["points"] if p["workers"] == n]
        ax.scatter([p["measured_ms"] for p in pts], [p["predicted_ms"] for p in pts], marker=marker,
                   label=f"{n} workers", alpha=0.7)
    lo = min(min(p["measured_ms"], p["predicted_ms"]) for p in check["points"])
    hi = max(max(p["measured_ms"], p["predicted_ms"]) for p in check["points"])
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured ms/step (10 Mbit/s - 1 Gbit/s)")
    ax.set_ylabel("predicted ms/step")
    ax.set_title(f"model vs measurement: median error {100 * check['median_abs_error']:.0f}%, "
                 f"max {100 * check['max_abs_error']:.0f}%", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()

    workers = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    ax = axes[1]
    for gbit, style in ((1, "-"), (10, "--"), (100, ":"), (400, "-.")):
        for name, color in (("topk", "C0"), ("topk:values=int8", "C1"), ("powersgd r1", "C2")):
            if name not in model["compressors"]:
                continue
            speed = [cluster_step_s(model, "none", n, gbit * 1e9, alpha)
                     / cluster_step_s(model, name, n, gbit * 1e9, alpha) for n in workers]
            ax.plot(workers, speed, ls=style, color=color, label=f"{name}, {gbit} Gbit/s")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers N (one link of B per node, switched)")
    ax.set_ylabel("speed-up over dense ring all-reduce")
    ax.set_title("extrapolation for the measured workload", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)

    ax = axes[2]
    rates = [1, 2, 5, 10, 25, 50, 100, 200, 400]
    for name, color, value_bytes in (("topk", "C0", 4), ("topk:values=int8", "C1", 1)):
        if name not in model["compressors"]:
            continue
        ns = [break_even_workers(model, name, g * 1e9, alpha) or 1 for g in rates]
        ax.plot(rates, ns, marker="o", color=color, label=f"{name}: measured costs")
        density = model["compressors"][name]["entries"] * 4 / model["dense_bytes"]
        ax.axhline(8 / (density * (4 + value_bytes)), color=color, ls=":", lw=1,
                   label=f"{name}: traffic alone (N < 8 / (d (4 + {value_bytes})))")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("link rate per node, Gbit/s")
    ax.set_ylabel("largest N where it beats dense (1: never)")
    ax.set_title("where gathering sparse payloads stops paying", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)



# ------------------------------------------------------------------ N nodes of L ranks
MIB = 1 << 20
NODE_COUNTS = tuple(1 << i for i in range(11))  # 1 .. 1024
LINK_GBITS = (1, 10, 100)
DENSITIES = (0.01, 0.001)
LOCAL_SIZES = (1, 8)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """N nodes of L ranks (P = N L, rank r on node r // L), one full-duplex NIC of ``nic_bits``
    bit/s per node behind a non-blocking switch, ``intra_bytes`` bytes/s per rank inside a node.

    Example::

        >>> Cluster(nodes=4, local=8, nic_bits=10e9).ranks
        32
    """

    nodes: int
    local: int
    nic_bits: float
    alpha: float = 20e-6
    intra_bytes: float = 200e9
    alpha_intra: float = 5e-6

    def __post_init__(self) -> None:
        for name in ("nodes", "local"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Cluster: {name} must be an integer >= 1, got {value!r}")

    @property
    def ranks(self) -> int:
        return self.nodes * self.local


@dataclasses.dataclass(frozen=True)
class Cost:
    """One bucket's exchange as the slowest rank sees it (every rank waits for it).

    ``cross_bytes``: what one node's NIC receives (rings send as much); ``cross_total``: summed over
    the nodes; ``intra_bytes``: what one rank sends inside its node; ``wire_bytes``: the rank's own
    payload (dense methods: what it all-reduces)."""

    comm_s: float = 0.0
    cross_bytes: float = 0.0
    cross_total: float = 0.0
    intra_bytes: float = 0.0
    compress_s: float = 0.0
    decode_s: float = 0.0
    wire_bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, name) + getattr(other, name) for name in COST_FIELDS))

    def __mul__(self, times: float) -> "Cost":
        return Cost(*(getattr(self, name) * times for name in COST_FIELDS))


COST_FIELDS = tuple(field.name for field in dataclasses.fields(Cost))


def _cross_s(cluster: Cluster, nbytes: float, groups: int = 1) -> float:
    """One message of ``nbytes`` through the NIC, shared by ``groups`` concurrent collectives."""
    return cluster.alpha + groups * nbytes * 8 / cluster.nic_bits


def _intra_s(cluster: Cluster, nbytes: float) -> float:
    return cluster.alpha_intra + nbytes / cluster.intra_bytes


def ring_over_ranks(cluster: Cluster, chunk: float, steps: int) -> Cost:
    """``steps`` steps of a ring over all P ranks, each moving ``chunk`` bytes over every edge. With
    node-contiguous ranks one ring edge leaves each node and one enters it; the other L-1 edges
    of a node stay inside it. A step lasts as long as its slowest edge."""
    if cluster.ranks == 1 or steps == 0:
        return Cost()
    step, cross, intra = 0.0, 0.0, 0.0
    if cluster.nodes > 1:
        step, cross = _cross_s(cluster, chunk), steps * chunk
    if cluster.local > 1:
        step, intra = max(step, _intra_s(cluster, chunk)), steps * chunk
    return Cost(comm_s=steps * step, cross_bytes=cross, cross_total=cluster.nodes * cross, intra_bytes=intra)


def ring_in_node(cluster: Cluster, chunk: float, steps: int) -> Cost:
    """A ring among the L ranks of each node (all nodes at once): ``steps`` steps of ``chunk``."""
    if cluster.local == 1:
        return Cost()
    return Cost(comm_s=steps * _intra_s(cluster, chunk), intra_bytes=steps * chunk)


def ring_across_nodes(cluster: Cluster, chunk: float, steps: int) -> Cost:
    """L concurrent rings, one per local index, each among the N ranks of that index (one per
    node), ``steps`` steps of ``chunk`` bytes each: every node's NIC carries the L rings."""
    if cluster.nodes == 1:
        return Cost()
    per_node = steps * cluster.local * chunk
    return Cost(comm_s=steps * _cross_s(cluster, chunk, cluster.local), cross_bytes=per_node,
                cross_total=cluster.nodes * per_node)


def tree_across_nodes(cluster: Cluster, shard: float) -> Cost:
    """L concurrent double-binary-tree all-reduces of ``shard`` bytes among the N nodes: each NIC
    receives (and sends) about 2 x shard per tree, 2 ceil(log2 N) latencies (pipelined)."""
    if cluster.nodes == 1:
        return Cost()
    per_node = 2 * cluster.local * shard
    depth = math.ceil(math.log2(cluster.nodes))
    return Cost(comm_s=2 * depth * cluster.alpha + per_node * 8 / cluster.nic_bits, cross_bytes=per_node,
                cross_total=cluster.nodes * per_node)


def ring_allreduce(cluster: Cluster, nbytes: float) -> Cost:
    """Ring all-reduce of ``nbytes`` over all P ranks: NIC 2 (P-1)/P nbytes each way."""
    p = cluster.ranks
    return ring_over_ranks(cluster, nbytes / p, 2 * (p - 1))


def allreduce_across_nodes(cluster: Cluster, shard: float, algorithm: str = "best") -> Cost:
    """L concurrent all-reduces of ``shard`` bytes, one per local index, each among the N ranks of
    that index, through the nodes' NICs: rings (``"ring"``), trees (``"tree"``) or the faster."""
    n = cluster.nodes
    ways = {"ring": lambda: ring_across_nodes(cluster, shard / n, 2 * (n - 1)),
            "tree": lambda: tree_across_nodes(cluster, shard)}
    if algorithm == "best":
        return min((way() for way in ways.values()), key=lambda cost: cost.comm_s)
    return ways[algorithm]()


def two_level_allreduce(cluster: Cluster, nbytes: float, across: str = "ring") -> Cost:
    """Reduce-scatter in the node, all-reduce of each 1/L shard across the nodes (``"ring"`` or
    ``"tree"``), all-gather in the node."""
    shard = nbytes / cluster.local
    inside = ring_in_node(cluster, shard, cluster.local - 1)
    return inside + allreduce_across_nodes(cluster, shard, across) + inside


ALLREDUCE_ALGORITHMS = ("ring", "two-level ring", "two-level tree")


def allreduce(cluster: Cluster, nbytes: float, algorithm: str = "best") -> Cost:
    """All-reduce of ``nbytes`` per rank with ``algorithm`` (one of ALLREDUCE_ALGORITHMS), or the
    fastest of them (``"best"``)."""
    if nbytes <= 0:
        return Cost()
    ways = {"ring": lambda: ring_allreduce(cluster, nbytes),
            "two-level ring": lambda: two_level_allreduce(cluster, nbytes, "ring"),
            "two-level tree": lambda: two_level_allreduce(cluster, nbytes, "tree")}
    if algorithm == "best":
        return min((way() for way in ways.values()), key=lambda cost: cost.comm_s)
    if algorithm not in ways:
        raise ValueError(f"allreduce: algorithm must be 'best' or one of {list(ways)}, got {algorithm!r}")
    return ways[algorithm]()


def ring_allgather(cluster: Cluster, payload: float) -> Cost:
    """Ring all-gather of one ``payload`` per rank over all P ranks: NIC (P-1) payload each way."""
    return ring_over_ranks(cluster, payload, cluster.ranks - 1)


def broadcast(cluster: Cluster, nbytes: float, groups: int = 1, inside: bool = True) -> Cost:
    """A pipelined binary-tree broadcast of ``nbytes`` over the nodes (``groups`` of them at once
    through each NIC), then (``inside``) over each node's ranks."""
    cost = Cost()
    if cluster.nodes > 1:
        depth = math.ceil(math.log2(cluster.nodes))
        cost += Cost(comm_s=depth * cluster.alpha + 2 * groups * nbytes * 8 / cluster.nic_bits,
                     cross_bytes=groups * nbytes, cross_total=(cluster.nodes - 1) * groups * nbytes)
    if inside and cluster.local > 1:
        depth = math.ceil(math.log2(cluster.local))
        cost += Cost(comm_s=depth * cluster.alpha_intra + 2 * nbytes / cluster.intra_bytes, intra_bytes=2 * nbytes)
    return cost


@functools.lru_cache(maxsize=None)
def payload_bytes(numel: int, entries: int, values: str = "fp32", index: str = "int32") -> int:
    """Bytes of one rank's payload carrying ``entries`` of a bucket of ``numel`` (the library's
    wire layout, ``gradsieve.wire.PayloadFormat``)."""
    from gradsieve.wire import PayloadFormat

    return PayloadFormat(entries=entries, values=values, index=index, numel=numel).nbytes


VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # an all-reduced value (int8 does not sum)


@dataclasses.dataclass(frozen=True)
class Method:
    """A way of exchanging the gradient: ``exchange`` (a key of EXCHANGES), the sparse payload's
    ``values`` and ``index`` formats, and for ``hierarchical`` its ``cross``-node step."""

    exchange: str
    values: str = "fp32"
    index: str = "int32"
    cross: str = "allgather"

    @property
    def sparse(self) -> bool:
        return self.exchange in ("allgather", "hierarchical", "allreduce")

    @property
    def label(self) -> str:
        name = self.exchange
        if self.exchange == "hierarchical" and self.cross == "allreduce":
            name = "hierarchical/allreduce"
        if self.sparse and self.values != "fp32":
            name += f" {self.values}"
        if self.sparse and self.index != "int32":
            name += f" {self.index}"
        return name


DENSE = Method("dense")
POWERSGD = Method("powersgd")
BF16 = Method("torch-bf16")
METHODS = (DENSE, BF16, POWERSGD, Method("allgather"), Method("allgather", values="int8"),
           Method("hierarchical"), Method("hierarchical", values="int8"), Method("allreduce"),
           Method("hierarchical", cross="allreduce"))


@dataclasses.dataclass
class Scenario:
    """The per-rank costs of one workload on one kind of machine (see the module docstring)."""

    name: str
    workload: str
    params: int
    buckets: int
    compute_s: float  # forward, backward and optimizer of one rank
    select_call_s: Dict[Tuple[str, float], float]  # (values, density) -> fixed cost of one compress call
    select_entry_s: Dict[Tuple[str, float], float]  # (values, density) -> compress cost per bucket entry
    decode_entry_s: float  # decode cost per received entry
    hook_s: Dict[Tuple[str, float], float]  # (values, density) -> the sparse hook's own cost per step
    extra_s: Dict[str, float]  # "powersgd", "torch-bf16": their work per step beyond the compute
    powersgd_bytes: float  # rank 1's factors per rank and step
    intra_bytes: float
    alpha_intra: float
    source: str = ""

    def lookup(self, table: Dict[Tuple[str, float], float], values: str, density: float) -> float:
        """The entry for ``values`` (else fp32's, else any) at the density nearest ``density`` (log
        scale); 0 for an empty table."""
        keys = ([key for key in table if key[0] == values] or [key for key in table if key[0] == "fp32"]
                or list(table))
        if not keys:
            return 0.0
        return table[min(keys, key=lambda key: abs(math.log(key[1] / density)))]

    def select_s(self, numel: int, values: str, density: float) -> float:
        return (self.lookup(self.select_call_s, values, density)
                + self.lookup(self.select_entry_s, values, density) * numel)

    def fixed_s(self, method: Method, density: float) -> float:
        if method.sparse:
            return self.lookup(self.hook_s, method.values, density)
        return self.extra_s.get(method.exchange, 0.0)

    def to_json(self) -> Dict:
        out = dataclasses.asdict(self)
        for name in ("select_call_s", "select_entry_s", "hook_s"):
            out[name] = {f"{v}@{d:g}": s for (v, d), s in getattr(self, name).items()}
        return out


EXCHANGES: Dict[str, Callable[..., Cost]] = {}


def exchange_model(name: str) -> Callable:
    """Decorator: the cost of one bucket under exchange ``name``, as
    ``f(numel, density, method, cluster, scenario, algorithm) -> Cost``."""

    def add(fn: Callable[..., Cost]) -> Callable[..., Cost]:
        if name in EXCHANGES:
            raise ValueError(f"exchange_model: {name!r} is registered twice")
        EXCHANGES[name] = fn
        return fn

    return add


def kept(numel: int, density: float) -> int:
    return max(1, math.ceil(density * numel))


@exchange_model("dense")
def _dense(numel, density, method, cluster, scenario, algorithm) -> Cost:
    return allreduce(cluster, 4 * numel, algorithm) + Cost(wire_bytes=4 * numel)


@exchange_model("torch-bf16")
def _bf16(numel, density, method, cluster, scenario, algorithm) -> Cost:
    return allreduce(cluster, 2 * numel, algorithm) + Cost(wire_bytes=2 * numel)


@exchange_model("powersgd")
def _powersgd(numel, density, method, cluster, scenario, algorithm) -> Cost:
    share = scenario.powersgd_bytes * numel / scenario.params  # this bucket's factors
    return allreduce(cluster, share / 2, algorithm) * 2 + Cost(wire_bytes=share)


@exchange_model("allgather")
def _allgather(numel, density, method, cluster, scenario, algorithm) -> Cost:
    k = kept(numel, density)
    p = payload_bytes(numel, k, method.values, method.index)
    return ring_allgather(cluster, p) + Cost(
        compress_s=scenario.select_s(numel, method.values, density),
        decode_s=cluster.ranks * k * scenario.decode_entry_s, wire_bytes=p)


@exchange_model("allreduce")
def _allreduce(numel, density, method, cluster, scenario, algorithm) -> Cost:
    if method.values not in VALUE_BYTES:
        raise ValueError(f"allreduce: values must be one of {list(VALUE_BYTES)} (summed on the way), "
                         f"got {method.values!r}")
    k = kept(numel, density)
    values = k * VALUE_BYTES[method.values]
    return broadcast(cluster, 4 * k) + allreduce(cluster, values, algorithm) + Cost(
        compress_s=scenario.select_s(numel, method.values, density),
        decode_s=k * scenario.decode_entry_s, wire_bytes=values)


@exchange_model("hierarchical")
def _hierarchical(numel, density, method, cluster, scenario, algorithm) -> Cost:
    l, n = cluster.local, cluster.nodes
    shard = -(-numel // l)  # the longest shard
    k = kept(shard, density)
    inside = ring_in_node(cluster, 4 * shard, l - 1)  # reduce-scatter, then (the same) all-gather
    work = Cost(compress_s=scenario.select_s(shard, method.values, density))
    if method.cross == "allgather":
        p = payload_bytes(shard, k, method.values, method.index)
        across = ring_across_nodes(cluster, p, n - 1)
        work += Cost(decode_s=n * k * scenario.decode_entry_s, wire_bytes=p)
    elif method.cross == "allreduce":
        if method.values not in VALUE_BYTES:
            raise ValueError(f"hierarchical: cross='allreduce' needs values in {list(VALUE_BYTES)}, "
                             f"got {method.values!r}")
        values = k * VALUE_BYTES[method.values]
        # One leader per local index: L broadcasts and L all-reduces through each NIC at once.
        across = broadcast(cluster, 4 * k, groups=l, inside=False) + \
            allreduce_across_nodes(cluster, values, "best" if algorithm == "best" else "ring")
        work += Cost(decode_s=k * scenario.decode_entry_s, wire_bytes=values)
    else:
        raise ValueError(f"hierarchical: cross must be 'allgather' or 'allreduce', got {method.cross!r}")
    return inside + across + inside + work


def bucket_sizes(params: int, buckets: int) -> Dict[int, int]:
    """Equal buckets: size -> how many buckets have it."""
    base, extra = divmod(params, buckets)
    sizes = {base + 1: extra, base: buckets - extra}
    return {size: count for size, count in sizes.items() if count and size}


def step_cost(scenario: Scenario, method: Method, cluster: Cluster, density: float,
              algorithm: str = "best", overlap: float = 0.0) -> Dict[str, float]:
    """One training step of ``scenario``'s workload exchanged by ``method`` on ``cluster``.

    Args:
        density: the fraction of each bucket a sparse method keeps (ignored by dense ones).
        algorithm: how all-reduces run: ``"best"`` (the fastest of ALLREDUCE_ALGORITHMS) or one of
            them (``"ring"``: the flat ring over all ranks, as gloo does).
        overlap: the fraction of ``compute_s`` behind which communication hides (0: none).

    Returns:
        ``step_s`` and its parts (``compute_s``, ``fixed_s``, ``compress_s``, ``comm_s``,
        ``decode_s``), and per step ``cross_bytes`` (one node's NIC, each way), ``cross_total``
        (all nodes), ``intra_bytes`` (one rank), ``wire_bytes`` (one rank's payloads).

    Example::

        >>> step_cost(scenario, Method("hierarchical"), Cluster(64, 8, 10e9), 0.01)["step_s"]
    """
    if method.exchange not in EXCHANGES:
        raise ValueError(f"step_cost: exchange must be one of {sorted(EXCHANGES)}, got {method.exchange!r}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"step_cost: overlap must be in [0, 1], got {overlap!r}")
    model = EXCHANGES[method.exchange]
    total = Cost()
    for numel, count in bucket_sizes(scenario.params, scenario.buckets).items():
        total += model(numel, density, method, cluster, scenario, algorithm) * count
    fixed = scenario.fixed_s(method, density)
    exposed = max(0.0, total.comm_s - overlap * scenario.compute_s)
    step = scenario.compute_s + fixed + total.compress_s + total.decode_s + exposed
    return {"step_s": step, "compute_s": scenario.compute_s, "fixed_s": fixed, "compress_s": total.compress_s,
            "comm_s": total.comm_s, "exposed_comm_s": exposed, "decode_s": total.decode_s,
            "cross_bytes": total.cross_bytes, "cross_total": total.cross_total, "intra_bytes": total.intra_bytes,
            "wire_bytes": total.wire_bytes}


# ------------------------------------------------------------------ scenarios
def cpu_scenario(rows: List[Dict], intra_bytes: Optional[float] = None, alpha_intra: float = 10e-6) -> Scenario:
    """This machine (bench_network.json's rows): the measured workload, costs as :func:`calibrate`
    finds them. Compress and decode per entry come from ``topk`` (fp32 values) and
    ``topk:values=int8``, whichever were measured; PowerSGD from ``powersgd r1``; bf16's extra work
    is torch-fp16's (0 when it was not measured).

    B_intra defaults to the loopback's all-reduce rate measured at N = 2 (there a rank sends S per
    all-reduce of S bytes).

    Raises:
        ValueError: the rows lack a top-k or a ``powersgd r1`` run at N = 2 on the unlimited link.
    """
    model = calibrate(rows)
    compressors = model["compressors"]
    params = round(model["dense_bytes"] / 4)
    unlimited = {r["name"]: r for r in rows if r["rate_bits"] is None and r["workers"] == 2}
    sparse = {values: name for values, name in (("int8", "topk:values=int8"), ("fp32", "topk")) if name in compressors}
    needs = (("topk or topk:values=int8", bool(sparse)), ("powersgd r1", "powersgd r1" in compressors))
    missing = [need for need, ok in needs if not ok]
    if missing:
        raise ValueError(f"cpu_scenario: the measurements need unlimited 2-worker runs of {' and '.join(missing)}")
    select_entry = {(values, unlimited[name]["density"]): compressors[name]["compress_s"] / params
                    for values, name in sparse.items()}
    decode = compressors[sparse.get("fp32", sparse.get("int8"))]["decode_s_per_entry"]
    loopback = model["loopback_s_per_byte"]
    return Scenario(
        name="cpu", workload=str(rows[0].get("workload") or "textcls"), params=params, buckets=1,
        compute_s=model["compute_s"], select_call_s={}, select_entry_s=select_entry, decode_entry_s=decode,
        hook_s={}, extra_s={"powersgd": compressors["powersgd r1"]["extra_s"],
                            "torch-bf16": compressors.get("torch-fp16", {}).get("extra_s", 0.0)},
        powersgd_bytes=compressors["powersgd r1"]["bytes"],
        intra_bytes=intra_bytes or (1.0 / loopback if loopback > 0 else 10e9), alpha_intra=alpha_intra,
        source="bench_network.json, unlimited 2-worker runs: compute, " + ", ".join(sparse.values())
               + " compress and decode, PowerSGD's and fp16's extra work; B_intra the loopback's rate")


def h100_scenario(hook_json: Dict, ops_json: Dict, forward_share: float = 0.5, intra_bytes: float = 200e9,
                  alpha_intra: float = 5e-6, hook_overhead_s: Optional[float] = None) -> Scenario:
    """ResNet-50 on H100s from results/cuda_h100 (bench_hook.json, bench_ops.json).

    Args:
        forward_share: the forward's time as a fraction of the backward's (not measured).
        hook_overhead_s: replaces the hook's measured overhead per step (None: as measured).
    """
    rows = hook_json["rows"]
    dense = next(r for r in rows if r["method"] == "allreduce")
    params = int(dense["parameters"])
    ops = [r for r in ops_json["rows"] if r.get("device", "cuda") == "cuda"]
    select_call, select_entry = {}, {}
    for density in sorted({r["density"] for r in ops if r["op"] == "ef_topk_"}):
        pts = sorted((r["n"], r["gradsieve_ms"] / 1e3) for r in ops
                     if r["op"] == "ef_topk_" and r["density"] == density)
        (n0, t0), (n1, t1) = pts[0], pts[-1]
        slope = (t1 - t0) / (n1 - n0) if n1 > n0 else t1 / n1
        for values in ("fp32", "int8"):
            select_entry[(values, density)] = slope
            select_call[(values, density)] = max(0.0, t0 - slope * n0)
    decode = [r for r in ops if r["op"] == "sparse_accumulate_"]
    entries = sum(8 * r["density"] * r["n"] for r in decode)  # bench_ops decodes 8 payloads
    decode_entry = sum(r["gradsieve_ms"] / 1e3 for r in decode) / entries
    overhead = {r["method"]: r["overhead_ms"] / 1e3 for r in rows}
    powersgd = next(r for r in rows if r["method"] == "powerSGD r1")
    scenario = Scenario(
        name="h100", workload="resnet50", params=params,
        buckets=5,  # bench_hook's top-k payloads carry 5 headers per step: DDP's 5 buckets
        compute_s=(1 + forward_share) * dense["backward_ms"] / 1e3, select_call_s=select_call,
        select_entry_s=select_entry, decode_entry_s=decode_entry, hook_s={},
        extra_s={"powersgd": overhead["powerSGD r1"], "torch-bf16": overhead["fp16"]},
        powersgd_bytes=powersgd["wire_bytes_per_step"], intra_bytes=intra_bytes, alpha_intra=alpha_intra,
        source=f"results/cuda_h100: {hook_json.get('machine', {}).get('gpu', 'H100')}, bench_hook (ResNet-50, "
               f"batch 32) and bench_ops (ef_topk_, sparse_accumulate_); forward = {forward_share:g} x backward")
    # The hook's own cost: its measured overhead at world size 1 less the kernels the model counts
    # (select per bucket, decode of the one payload).
    for r in rows:
        if r["method"] in ("topk", "topk int8"):
            values, density = ("int8" if "int8" in r["method"] else "fp32"), r["density"]
            kernels = sum(count * scenario.select_s(numel, values, density)
                          for numel, count in bucket_sizes(params, scenario.buckets).items())
            kernels += kept(params, density) * decode_entry
            measured = r["overhead_ms"] / 1e3 - kernels
            scenario.hook_s[(values, density)] = max(0.0, measured if hook_overhead_s is None else hook_overhead_s)
    return scenario


# ------------------------------------------------------------------ predictions, break-even
def predict_grid(scenario: Scenario, alpha: float, algorithm: str = "best", overlap: float = 0.0,
                 methods=METHODS, nodes=NODE_COUNTS, locals_=LOCAL_SIZES, gbits=LINK_GBITS,
                 densities=DENSITIES) -> List[Dict]:
    """Step time, speed-up over dense and over PowerSGD, cross-node bytes: one series over
    ``nodes`` per (L, link rate, density, method)."""
    series = []
    for local in locals_:
        for gbit in gbits:
            clusters = [Cluster(n, local, gbit * 1e9, alpha, scenario.intra_bytes, scenario.alpha_intra) for n in nodes]
            for density in densities:
                steps = {m: [step_cost(scenario, m, c, density, algorithm, overlap) for c in clusters] for m in methods}
                dense = [s["step_s"] for s in steps[DENSE]]
                powersgd = [s["step_s"] for s in steps[POWERSGD]]
                for m in methods:
                    t = [s["step_s"] for s in steps[m]]
                    series.append({
                        "scenario": scenario.name, "workload": scenario.workload, "local": local, "gbit": gbit,
                        "density": density, "method": m.label, "nodes": list(nodes),
                        "step_ms": [round(1e3 * x, 4) for x in t],
                        "speedup_vs_dense": [round(a / b, 4) for a, b in zip(dense, t)],
                        "speedup_vs_powersgd": [round(a / b, 4) for a, b in zip(powersgd, t)],
                        "cross_mb_per_node": [round(s["cross_bytes"] / 1e6, 6) for s in steps[m]],
                        "comm_ms": [round(1e3 * s["comm_s"], 4) for s in steps[m]],
                    })
    return series


def break_even_nodes(scenario: Scenario, method: Method, baseline: Method, local: int, nic_bits: float,
                     density: float, alpha: float = 20e-6, limit: int = 4096, algorithm: str = "best",
                     overlap: float = 0.0) -> Optional[Tuple[int, int]]:
    """The node counts where ``method`` is faster than ``baseline`` on nodes of ``local`` ranks.

    Every N up to 64 is tried, then 32 steps per doubling up to ``limit``; a crossing between two
    tried counts is found by bisection (the step times are smooth in N).

    Returns:
        ``(first, last)``: the first N in 1..limit where it wins and the last N of that unbroken
        run (``last == limit``: it still wins at the limit), or None when it never wins.

    Example::

        >>> break_even_nodes(scenario, Method("hierarchical"), DENSE, 8, 10e9, 0.01)
        (2, 89)
    """
    def wins(n: int) -> bool:
        cluster = Cluster(n, local, nic_bits, alpha, scenario.intra_bytes, scenario.alpha_intra)
        return (step_cost(scenario, method, cluster, density, algorithm, overlap)["step_s"]
                < step_cost(scenario, baseline, cluster, density, algorithm, overlap)["step_s"])

    def last_like(lo: int, hi: int) -> int:
        """The last N in [lo, hi) whose outcome is lo's (hi's differs)."""
        outcome = wins(lo)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if wins(mid) == outcome else (lo, mid)
        return lo

    octaves = max(0, math.ceil(math.log2(limit / 64)))
    tried = sorted(set(range(1, min(limit, 64) + 1))
                   | {min(limit, round(64 * 2 ** (i / 32))) for i in range(32 * octaves + 1)})
    first = previous = None
    for n in tried:
        if wins(n):
            if first is None:
                first = n if previous is None else last_like(previous, n) + 1
        elif first is not None:
            return first, last_like(previous, n)
        previous = n
    return None if first is None else (first, previous)


def break_even_table(scenarios: List[Scenario], alpha: float, local: int = 8, gbit: float = 10,
                     densities=DENSITIES, limit: int = 4096, overlap: float = 0.0) -> List[Dict]:
    """:func:`break_even_nodes` of every method but the baselines against dense and PowerSGD, with
    the largest speed-up over each at N = 1, 2, 4, ... 1024 (``best_vs_*``: [N, speed-up])."""
    rows = []
    for scenario in scenarios:
        clusters = [Cluster(n, local, gbit * 1e9, alpha, scenario.intra_bytes, scenario.alpha_intra)
                    for n in NODE_COUNTS]
        for density in densities:
            def times(m: Method) -> List[float]:
                return [step_cost(scenario, m, c, density, overlap=overlap)["step_s"] for c in clusters]

            baselines = {b: times(b) for b in (DENSE, POWERSGD)}
            for m in METHODS:
                if m in baselines:
                    continue
                row = {"scenario": scenario.name, "workload": scenario.workload, "density": density,
                       "method": m.label, "local": local, "gbit": gbit, "limit": limit}
                mine = times(m)
                for baseline, theirs in baselines.items():
                    span = break_even_nodes(scenario, m, baseline, local, gbit * 1e9, density, alpha, limit,
                                            overlap=overlap)
                    row[f"vs_{baseline.exchange}"] = None if span is None else list(span)
                    speedups = [a / b for a, b in zip(theirs, mine)]
                    best = max(range(len(speedups)), key=speedups.__getitem__)
                    row[f"best_vs_{baseline.exchange}"] = [NODE_COUNTS[best], round(speedups[best], 3)]
                rows.append(row)
    return rows


def describe_span(span: Optional[List[int]], limit: int) -> str:
    if span is None:
        return "never"
    first, last = span
    end = f"{last}+" if last >= limit else str(last)
    return f"1-{end}" if first == 1 else f"{first}-{end}"


def print_break_even(rows: List[Dict], alpha: float) -> None:
    if not rows:
        return
    print(f"cost_model: nodes N where an exchange is faster than dense DDP / than PowerSGD rank 1 "
          f"({rows[0]['local']}-rank nodes, {rows[0]['gbit']:g} Gbit/s per node, alpha {alpha * 1e6:g} us; "
          f"'+': still at {rows[0]['limit']}; best: the largest speed-up over N = 1..1024, at N)")
    print(f"  {'scenario':14} {'density':>7}  {'exchange':23} {'beats dense':>12} {'best':>12}   "
          f"{'beats PowerSGD':>14} {'best':>12}")
    for r in rows:
        cells = []
        for name in ("dense", "powersgd"):
            n, x = r[f"best_vs_{name}"]
            cells += [describe_span(r[f"vs_{name}"], r["limit"]), f"{x:.2f}x @{n}"]
        print(f"  {r['scenario'] + ' ' + r['workload']:14} {r['density']:7g}  {r['method']:23} {cells[0]:>12} "
              f"{cells[1]:>12}   {cells[2]:>14} {cells[3]:>12}")


def print_grid(series: List[Dict]) -> None:
    blocks: Dict[Tuple, List[Dict]] = {}
    for s in series:
        blocks.setdefault((s["scenario"], s["local"], s["density"], s["gbit"]), []).append(s)
    for (scenario, local, density, gbit), group in blocks.items():
        dense = next(s for s in group if s["method"] == DENSE.label)
        others = [s for s in group if s["method"] != DENSE.label]
        print(f"\n{scenario}, L = {local}, density {density:g}, {gbit:g} Gbit/s per node: dense ms/step, then "
              "each method's speed-up over dense / over PowerSGD")
        short = [s["method"].replace("hierarchical", "hier.").replace("allgather", "gather") for s in others]
        print(f"{'N':>5} {'dense ms':>9} " + " ".join(f"{name[:15]:>15}" for name in short))
        for i, n in enumerate(dense["nodes"]):
            cells = " ".join(f"  {s['speedup_vs_dense'][i]:6.2f}/{s['speedup_vs_powersgd'][i]:<6.2f}" for s in others)
            print(f"{n:5d} {dense['step_ms'][i]:9.1f} {cells}")


PLOTTED = (("allgather", "C0", "o"), ("hierarchical", "C1", "s"), ("allreduce", "C2", "^"),
           ("hierarchical/allreduce", "C3", "D"), ("powersgd", "C4", "v"), ("torch-bf16", "C7", "x"))
RATE_STYLES = {1: "-", 10: "--", 100: ":"}


def plot_speedup(series: List[Dict], path: str) -> None:
    """Speed-up over dense against nodes: one panel per (scenario, L, density), one line per
    method (colour, marker) and link rate (line style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = sorted({(s["scenario"], s["local"], s["density"]) for s in series},
                    key=lambda key: (key[0] != "cpu", key[1], -key[2]))
    scenarios = sorted({p[0] for p in panels}, key=lambda name: name != "cpu")
    columns = sorted({(p[1], p[2]) for p in panels}, key=lambda key: (key[0], -key[1]))
    fig, axes = plt.subplots(len(scenarios), len(columns), figsize=(5.2 * len(columns), 4.6 * len(scenarios)),
                             dpi=110, squeeze=False, sharex=True)
    workloads = {s["scenario"]: s.get("workload", "") for s in series}
    for row, scenario in enumerate(scenarios):
        for col, (local, density) in enumerate(columns):
            ax = axes[row][col]
            for method, color, marker in PLOTTED:
                if local == 1 and method.startswith("hierarchical"):
                    continue  # the same as allgather / allreduce with one rank per node
                for s in series:
                    if (s["scenario"], s["local"], s["density"], s["method"]) != (scenario, local, density, method):
                        continue
                    ax.plot(s["nodes"], s["speedup_vs_dense"], color=color, marker=marker, markersize=4,
                            ls=RATE_STYLES.get(s["gbit"], "-."), lw=1.4, alpha=0.9)
            ax.axhline(1.0, color="grey", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{scenario} ({workloads.get(scenario) or ''}), L = {local} ranks/node, density {density:g}",
                         fontsize=9)
            if row == len(scenarios) - 1:
                ax.set_xlabel("nodes N")
            if col == 0:
                ax.set_ylabel("speed-up over dense DDP all-reduce")
    handles = [Line2D([], [], color=c, marker=m, ls="-", label=name + (" (L > 1)" if name.startswith("hier") else ""))
               for name, c, m in PLOTTED]
    handles += [Line2D([], [], color="black", ls=style, label=f"{gbit} Gbit/s per node")
                for gbit, style in RATE_STYLES.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("cost model: speed-up over dense all-reduce (no overlap; above 1: faster)", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------ the emulated cluster
# Where check_cluster finds each quantity in a report: the first name present wins, looked up in
# the run's record, then its "topology", then the report's "config". (name, scale to the unit).
CLUSTER_REPORT_FIELDS: Dict[str, Tuple] = {
    "runs": ("runs", "rows"),
    "ms_per_step": (("ms_per_step", 1.0), ("time_per_step_s", 1e3), ("step_s", 1e3)),
    "cross_node_bytes": (("cross_node_bytes_per_step", 1.0), ("nic_bytes_per_step", 1.0),
                         ("cross_bytes_per_step", 1.0)),
    "wire_bytes": (("wire_bytes_steady", 1.0), ("wire_bytes_per_step", 1.0)),
    "dense_bytes": (("dense_bytes_per_step", 1.0),),
    "compress_ms": (("compress_s_per_step", 1e3), ("compress_ms_per_step", 1.0)),
    "decode_ms": (("decode_s_per_step", 1e3), ("decode_ms_per_step", 1.0)),
    "nodes": (("nodes", 1),),
    "local": (("nproc", 1), ("local", 1), ("nproc_per_node", 1)),
    "link": (("link_bits", 1.0), ("rate_bits", 1.0), ("link", None), ("rate", None), ("nic", None)),
    "exchange": (("exchange", None),),
    "cross": (("cross", None),),
    "compressor": (("compressor", None),),
    "name": (("name", None), ("label", None)),
    "density": (("density", 1.0),),
    "values": (("values", None),),
    "index": (("index", None),),
    "cores": (("cpu_count", 1), ("cores", 1)),
}
# The report's cross-node bytes: "total" summed over every node's NIC, or "node" for one NIC; and
# whether they are counted on the NICs (TCP/IP headers in: the prediction is scaled by h).
CROSS_NODE_BYTES_SCOPE = "total"
CROSS_NODE_BYTES_ON_LINK = True


def _field(record: Dict, report: Dict, key: str, fields: Dict = CLUSTER_REPORT_FIELDS):
    config = report.get("config") or {}
    places = [record, record.get("topology") or {}, record.get("options") or {}, config, config.get("cluster") or {},
              report.get("topology") or {}, report.get("machine") or {}]
    for name, scale in fields[key]:
        for place in places:
            if isinstance(place, dict) and place.get(name) is not None:
                value = place[name]
                return value * scale if scale is not None and isinstance(value, (int, float)) else value
    return None


def link_bits_of(value) -> float:
    """A link rate in bit/s from a number or a ``--link`` string (``math.inf``: unlimited)."""
    if isinstance(value, (int, float)):
        return float(value)
    from gradsieve.train.link import LinkSpec

    bits = LinkSpec.parse(str(value)).rate_bits
    return math.inf if bits is None else float(bits)


def link_delay_of(value) -> float:
    if isinstance(value, str) and "delay" in value:
        from gradsieve.train.link import LinkSpec

        return LinkSpec.parse(value).delay_s
    return 0.0


def method_of(compressor: str, exchange: Optional[str], values: Optional[str], index: Optional[str],
              cross: Optional[str]) -> Method:
    """The model's method for a run of ``compressor`` (a gradsieve-train name)."""
    base = (compressor or "").split(":")[0]
    if base == "none":
        return DENSE
    if base in ("torch-fp16", "torch-bf16", "fp16", "bf16"):
        return BF16
    if base == "powersgd":
        return POWERSGD
    def options(spec: str) -> Dict[str, str]:  # "name:key=value,key=value"
        if ":" not in spec:
            return {}
        return dict(item.split("=", 1) for item in spec.split(":", 1)[1].split(",") if "=" in item)

    given = {**options(compressor or ""), **options(exchange or "")}
    return Method((exchange or "allgather").split(":")[0], values or given.get("values", "fp32"),
                  index or given.get("index", "int32"), cross or given.get("cross", "allgather"))


def check_cluster(report_json_path: str, scenario: Optional[Scenario] = None, alpha: float = 20e-6,
                  algorithm: str = "ring", header_overhead: float = 1.0, cores: Optional[int] = None,
                  fields: Dict = CLUSTER_REPORT_FIELDS, verbose: bool = True) -> Dict:
    """Predicts each run of an emulated-cluster report and compares: cross-node bytes per step,
    ms per step (and the per-rank wire bytes).

    A run's ms/step is predicted from the run of the same name and topology on an unlimited link
    in the same report when there is one (its time plus the cross-node time the link adds, as
    :func:`check_against_measurements` does), else from the scenario's compute (times the ranks
    sharing ``cores`` CPU cores) plus the run's own measured compress and decode plus the modelled
    communication.

    Args:
        report_json_path: a ``metrics.json`` of ``gradsieve-train --nodes N --nproc L --link RATE``.
        scenario: the per-rank costs (default: :func:`cpu_scenario` of bench_network.json).
        algorithm: the all-reduce algorithm of the run's backend (gloo: ``"ring"``).
        header_overhead: link bytes over payload bytes (h), applied when CROSS_NODE_BYTES_ON_LINK.

    Returns:
        ``{"skipped": reason}`` when the report is missing, else ``{"points": [...],
        "median_abs_error_ms": ..., "median_abs_error_bytes": ...}``; errors are predicted over
        measured minus 1.
    """
    if not os.path.exists(report_json_path):
        reason = f"{report_json_path} not found"
        if verbose:
            print(f"cost_model: cluster report {reason}: skipped")
        return {"skipped": reason}
    with open(report_json_path) as f:
        report = json.load(f)
    runs = next((report[key] for key in fields["runs"] if key in report), None)
    if runs is None:
        reason = f"{report_json_path} has none of the run lists {list(fields['runs'])}"
        if verbose:
            print(f"cost_model: cluster report {reason}: skipped")
        return {"skipped": reason}
    if scenario is None:
        with open(os.path.join(HERE, "results", "bench_network.json")) as f:
            scenario = cpu_scenario(json.load(f)["rows"])
    cores = cores or _field({}, report, "cores", fields) or os.cpu_count() or 1
    scale = header_overhead if CROSS_NODE_BYTES_ON_LINK else 1.0

    def topology(r: Dict) -> Tuple:
        return tuple(_field(r, report, key, fields) for key in ("name", "nodes", "local"))

    def unlimited_link(r: Dict) -> bool:
        link = _field(r, report, "link", fields)
        return link is not None and link_bits_of(link) == math.inf

    unlimited = {topology(r): r for r in runs if unlimited_link(r)}
    points, skipped = [], []
    for r in runs:
        name = _field(r, report, "name", fields) or _field(r, report, "compressor", fields)
        nodes, local = _field(r, report, "nodes", fields), _field(r, report, "local", fields)
        link = _field(r, report, "link", fields)
        missing = [key for key, value in (("nodes", nodes), ("local", local), ("link", link)) if value is None]
        if missing:
            skipped.append(f"{name}: no {', '.join(missing)} (looked for {[fields[m] for m in missing]})")
            continue
        bits = link_bits_of(link)
        method = method_of(_field(r, report, "compressor", fields), _field(r, report, "exchange", fields),
                           _field(r, report, "values", fields), _field(r, report, "index", fields),
                           _field(r, report, "cross", fields))
        density = _field(r, report, "density", fields) or 0.0
        if method.sparse and not density:
            skipped.append(f"{name}: no density")
            continue
        dense_bytes = _field(r, report, "dense_bytes", fields)
        run_scenario = scenario
        if dense_bytes and round(dense_bytes / 4) != scenario.params:
            params = round(dense_bytes / 4)
            buckets = max(1, math.ceil(4 * params / (25 * MIB)))  # DDP's 25 MiB buckets
            run_scenario = dataclasses.replace(scenario, params=params, buckets=buckets)
        wire = _field(r, report, "wire_bytes", fields)
        if method == POWERSGD and wire:
            run_scenario = dataclasses.replace(run_scenario, powersgd_bytes=wire)
        cluster = Cluster(int(nodes), int(local), bits, alpha + link_delay_of(link), run_scenario.intra_bytes,
                          run_scenario.alpha_intra)
        predicted = step_cost(run_scenario, method, cluster, density, algorithm)
        measured_ms = _field(r, report, "ms_per_step", fields)
        base_run = unlimited.get(topology(r))
        if base_run is not None and base_run is not r:
            free = step_cost(run_scenario, method, dataclasses.replace(cluster, nic_bits=math.inf), density, algorithm)
            base = "same run, unlimited link"
            added_ms = 1e3 * (predicted["comm_s"] - free["comm_s"])
            predicted_ms = _field(base_run, report, "ms_per_step", fields) + added_ms
        else:
            base = f"model, compute x {max(1.0, cluster.ranks / cores):g} (ranks per core)"
            compress = _field(r, report, "compress_ms", fields)
            decode = _field(r, report, "decode_ms", fields)
            work = (compress if compress is not None else 1e3 * predicted["compress_s"]) + \
                   (decode if decode is not None else 1e3 * predicted["decode_s"])
            predicted_ms = 1e3 * (run_scenario.compute_s * max(1.0, cluster.ranks / cores) + predicted["fixed_s"]
                                  + predicted["comm_s"]) + work
        cross = predicted["cross_total"] if CROSS_NODE_BYTES_SCOPE == "total" else predicted["cross_bytes"]
        measured_cross = _field(r, report, "cross_node_bytes", fields)
        point = {"name": name, "method": method.label, "nodes": int(nodes), "local": int(local), "link_bits": bits,
                 "density": density, "base": base,
                 "measured_ms": measured_ms, "predicted_ms": predicted_ms,
                 "error_ms": None if not measured_ms else predicted_ms / measured_ms - 1,
                 "measured_cross_bytes": measured_cross, "predicted_cross_bytes": scale * cross,
                 "error_cross_bytes": None if not measured_cross else scale * cross / measured_cross - 1,
                 "measured_wire_bytes": wire, "predicted_wire_bytes": predicted["wire_bytes"],
                 "error_wire_bytes": None if not wire else predicted["wire_bytes"] / wire - 1}
        points.append(point)
    errors_ms = [abs(p["error_ms"]) for p in points if p["error_ms"] is not None]
    errors_bytes = [abs(p["error_cross_bytes"]) for p in points if p["error_cross_bytes"] is not None]
    result = {"report": report_json_path, "points": points, "skipped_runs": skipped,
              "median_abs_error_ms": statistics.median(errors_ms) if errors_ms else None,
              "median_abs_error_bytes": statistics.median(errors_bytes) if errors_bytes else None}
    if verbose:
        print_cluster_check(result)
    return result


def print_cluster_check(result: Dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:6.1f}%"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"cost_model: {result['report']}: {len(result['points'])} runs "
          f"(cross-node bytes: {CROSS_NODE_BYTES_SCOPE}{', on the link' if CROSS_NODE_BYTES_ON_LINK else ''})")
    print(f"{'run':22} {'method':22} {'N':>4} {'L':>2} {'Gbit/s':>7} {'cross MB meas':>13} {'pred':>9} {'err':>7} "
          f"{'ms meas':>9} {'pred':>9} {'err':>7}  base")
    for p in result["points"]:
        mc = None if p["measured_cross_bytes"] is None else p["measured_cross_bytes"] / 1e6
        print(f"{str(p['name'])[:22]:22} {p['method'][:22]:22} {p['nodes']:4d} {p['local']:2d} "
              f"{p['link_bits'] / 1e9:7.3g} "
              f"{num(mc, '13.3f'):>13} {p['predicted_cross_bytes'] / 1e6:9.3f} {pct(p['error_cross_bytes']):>7} "
              f"{num(p['measured_ms'], '9.1f'):>9} {p['predicted_ms']:9.1f} {pct(p['error_ms']):>7}  {p['base']}")
    for line in result["skipped_runs"]:
        print(f"  skipped {line}")
    if result["median_abs_error_ms"] is not None or result["median_abs_error_bytes"] is not None:
        print(f"cost_model: |error| median: ms/step {pct(result['median_abs_error_ms'])}, "
              f"cross-node bytes {pct(result['median_abs_error_bytes'])}")


def load_scenarios(device: str, rows: List[Dict], cuda_dir: str, args) -> List[Scenario]:
    scenarios = []
    if device in ("cpu", "all"):
        intra = None if args.intra_gbyte is None else args.intra_gbyte * 1e9
        try:
            scenarios.append(cpu_scenario(rows, intra_bytes=intra))
        except ValueError as e:
            print(f"cost_model: the cpu scenario is skipped: {e}")
    if device in ("h100", "all"):
        paths = [os.path.join(cuda_dir, name) for name in ("bench_hook.json", "bench_ops.json")]
        if all(os.path.exists(p) for p in paths):
            with open(paths[0]) as f:
                hook_json = json.load(f)
            with open(paths[1]) as f:
                ops_json = json.load(f)
            scenarios.append(h100_scenario(
                hook_json, ops_json, intra_bytes=200e9 if args.intra_gbyte is None else args.intra_gbyte * 1e9,
                hook_overhead_s=None if args.hook_overhead_ms is None else args.hook_overhead_ms / 1e3))
        else:
            print(f"cost_model: no CUDA results in {cuda_dir}: the h100 scenario is skipped")
    return scenarios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measurements", default=os.path.join(HERE, "results", "bench_network.json"))
    p.add_argument("--alpha-us", type=float, default=20.0, help="per-message latency of the cluster links")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--device", choices=("cpu", "h100", "all"), default="all",
                   help="the scenarios of the N x L cluster model: cpu (textcls, this machine's costs), h100 "
                        "(ResNet-50, results/cuda_h100's costs), or both")
    p.add_argument("--cuda-results", default=os.path.join(HERE, "results", "cuda_h100"),
                   help="bench_hook.json and bench_ops.json of a CUDA run (the h100 scenario)")
    p.add_argument("--intra-gbyte", type=float, default=None,
                   help="B_intra, GB/s per rank inside a node (default: cpu the measured loopback, h100 200)")
    p.add_argument("--hook-overhead-ms", type=float, default=None,
                   help="h100: the sparse hook's own cost per step (default: as bench_hook measured it)")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="fraction of the compute time behind which communication hides (default 0: none)")
    p.add_argument("--grid", action="store_true",
                   help="print every prediction (N = 1..1024, L = 1 and 8, 1/10/100 Gbit/s, density 0.01 and 0.001)")
    p.add_argument("--cluster-report", action="append", default=[], metavar="PATH",
                   help="check the model against an emulated-cluster report (gradsieve-train --nodes N --nproc L "
                        "--link RATE); may be given several times; only the check runs")
    args = p.parse_args(argv)
    with open(args.measurements) as f:
        data = json.load(f)
    rows = data["rows"]
    check = check_against_measurements(rows)
    alpha = args.alpha_us * 1e-6
    if args.cluster_report:
        intra = None if args.intra_gbyte is None else args.intra_gbyte * 1e9
        try:
            scenario = cpu_scenario(rows, intra_bytes=intra)
        except ValueError as e:
            print(f"cost_model: no cluster check: {e}")
            return 1
        for path in args.cluster_report:
            check_cluster(path, scenario, alpha, header_overhead=check["header_overhead"])
        return 0

    print(f"cost_model: packet overhead h = {check['header_overhead']:.4f}; "
          f"{len(check['points'])} shaped points predicted from the unlimited ones")
    print(f"{'rate':>9} {'N':>2} {'compressor':22} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    for pt in check["points"]:
        print(f"{pt['rate']:>9} {pt['workers']:>2} {pt['name']:22} {pt['measured_ms']:12.1f} "
              f"{pt['predicted_ms']:13.1f} {100 * pt['error']:6.1f}%")
    print(f"cost_model: |error| median {100 * check['median_abs_error']:.1f}%, max {100 * check['max_abs_error']:.1f}%")

    model = calibrate(rows)
    table = {}
    for name in model["compressors"]:
        if model["compressors"][name]["kind"] == "allgather":
            table[name] = {f"{g}gbit": break_even_workers(model, name, g * 1e9, alpha)
                           for g in (1, 10, 100, 400)}
    print("cost_model: largest N at which a sparse compressor beats dense ring all-reduce "
          f"(cluster, alpha {args.alpha_us:g} us):")
    for name, by_rate in table.items():
        print(f"  {name:22} " + "  ".join(f"{rate}: {'-' if n is None else n}" for rate, n in by_rate.items()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost_model.json"), "w") as f:
        json.dump({"machine": data.get("machine"), "alpha_s": alpha, "check": check, "model": model,
                   "break_even_workers": table}, f, indent=1)
    plot(check, model, alpha, os.path.join(args.out, "cost_model.png"))
    print(f"cost_model: wrote {args.out}/cost_model.json and cost_model.png")

    scenarios = load_scenarios(args.device, rows, args.cuda_results, args)
    if not scenarios:
        return 0
    for sc in scenarios:
        print(f"cost_model: scenario {sc.name}: {sc.workload}, {sc.params:,} parameters in {sc.buckets} bucket(s), "
              f"compute {1e3 * sc.compute_s:.1f} ms/step, B_intra {sc.intra_bytes / 1e9:.3g} GB/s ({sc.source})")
    grid = [s for sc in scenarios for s in predict_grid(sc, alpha, overlap=args.overlap)]
    if args.grid:
        print_grid(grid)
    break_even = break_even_table(scenarios, alpha, overlap=args.overlap)
    print_break_even(break_even, alpha)
    assumptions = {"alpha_s": alpha, "overlap": args.overlap,
                   "all-reduce": "fastest of " + ", ".join(ALLREDUCE_ALGORITHMS), "placement": "node-contiguous ranks",
                   "nodes": list(NODE_COUNTS), "local": list(LOCAL_SIZES),
                   "gbit": list(LINK_GBITS), "densities": list(DENSITIES)}
    with open(os.path.join(args.out, "cost_model_cluster.json"), "w") as f:
        json.dump({"assumptions": assumptions, "scenarios": [sc.to_json() for sc in scenarios], "series": grid},
                  f, indent=1)
    with open(os.path.join(args.out, "cost_model_break_even.json"), "w") as f:
        json.dump({"assumptions": assumptions, "rows": break_even}, f, indent=1)
    plot_speedup(grid, os.path.join(args.out, "cost_model_speedup.png"))
    print(f"cost_model: wrote {args.out}/cost_model_cluster.json, cost_model_break_even.json and "
          "cost_model_speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

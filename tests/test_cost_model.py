"""benchmarks/cost_model.py on synthetic measurements: the traffic formulas, the check against
measured points, and the break-even worker count where only traffic matters; then the cluster of N
nodes of L ranks: each exchange's traffic against hand-computed values, how it grows with N, the
break-even search, and the check against an emulated-cluster report."""

import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("cost_model", os.path.join(ROOT, "benchmarks", "cost_model.py"))
cost_model = importlib.util.module_from_spec(spec)
sys.modules.setdefault("cost_model", cost_model)  # dataclasses look their module up by name
spec.loader.exec_module(cost_model)

N_PARAMS = 1_000_000
DENSE = 4 * N_PARAMS


def row(name, compressor, rate_bits, workers, ms, payload, density=None, h=1.01):
    r = {"name": name, "compressor": compressor, "rate": "x", "rate_bits": rate_bits, "workers": workers,
         "ms_per_step": ms, "wire_bytes_steady": payload, "density": density,
         "compress_ms_per_step": 0.0, "decode_ms_per_step": 0.0}
    r["link_bytes_steady"] = h * cost_model.queue_bytes(r, workers)
    return r


def test_traffic_through_the_shared_queue():
    dense = row("none", "none", None, 4, 10.0, DENSE)
    sparse = row("topk", "topk", None, 4, 10.0, 80_000, 0.01)
    assert cost_model.queue_bytes(dense, 4) == 2 * 3 * DENSE  # ring: 2 (N-1)/N S per rank, N ranks
    assert cost_model.queue_bytes(sparse, 4) == 4 * 3 * 80_000  # all-gather: N-1 copies per rank


def test_exact_measurements_give_zero_error():
    rows = []
    for n in (2, 4):
        for name, compressor, payload, base in (("none", "none", DENSE, 12.0), ("topk", "topk", 80_000, 9.0)):
            rows.append(row(name, compressor, None, n, base, payload, 0.01 if name == "topk" else None))
            for bits in (10e6, 100e6, 1e9):
                ms = base + 1e3 * 1.01 * cost_model.queue_bytes(rows[-1], n) * 8 / bits
                rows.append(row(name, compressor, bits, n, ms, payload, 0.01 if name == "topk" else None))
    check = cost_model.check_against_measurements(rows)
    assert check["header_overhead"] == pytest.approx(1.01)
    assert len(check["points"]) == 12
    assert check["max_abs_error"] == pytest.approx(0.0, abs=1e-9)
    # A measurement 20% slower than the model shows as a -1/6 error.
    rows[1]["ms_per_step"] *= 1.2
    check = cost_model.check_against_measurements(rows)
    assert check["max_abs_error"] == pytest.approx(1 - 1 / 1.2)


@pytest.mark.parametrize("value_bytes", [4, 1])
def test_break_even_on_traffic_alone(value_bytes):
    density = 0.01
    payload = density * N_PARAMS * (4 + value_bytes)
    rows = [row("none", "none", None, 2, 0.0, DENSE),
            row("topk", "topk", None, 2, 0.0, payload, density)]
    model = cost_model.calibrate(rows)
    model["compute_s"] = 0.0
    n = cost_model.break_even_workers(model, "topk", 10e9, alpha=0.0)
    # (N-1) P < 2 (N-1)/N S  <=>  N < 2 S / P = 8 / (density (4 + v))
    assert n == pytest.approx(8 / (density * (4 + value_bytes)), abs=1.01)


# ------------------------------------------------------------------ N nodes of L ranks
Cluster, Method, Cost = cost_model.Cluster, cost_model.Method, cost_model.Cost
B = 8e9  # 1 GB/s per NIC: bytes over B in seconds are bytes * 1e-9
B_INTRA = 4e9


def scenario(params=1000, buckets=1, compute_s=0.0, select_entry_s=0.0, decode_entry_s=0.0, hook_s=0.0,
             powersgd_bytes=400.0):
    return cost_model.Scenario(
        name="test", workload="synthetic", params=params, buckets=buckets, compute_s=compute_s,
        select_call_s={}, select_entry_s={("fp32", 0.01): select_entry_s}, decode_entry_s=decode_entry_s,
        hook_s={("fp32", 0.01): hook_s}, extra_s={"powersgd": 0.0, "torch-bf16": 0.0},
        powersgd_bytes=powersgd_bytes, intra_bytes=B_INTRA, alpha_intra=1e-6)


def cluster(nodes, local, alpha=0.0, alpha_intra=0.0, nic_bits=B):
    return Cluster(nodes, local, nic_bits, alpha, B_INTRA, alpha_intra)


def test_payload_bytes_are_the_wire_layout():
    assert cost_model.payload_bytes(1000, 50) == 8 + 50 * (4 + 4)
    assert cost_model.payload_bytes(1000, 50, "bf16") == 8 + 50 * (4 + 2)
    # int8: 50 values, one float32 scale for the (partial) chunk of 256; int4 and int2 pack 2 and 4
    # codes to a byte.
    assert cost_model.payload_bytes(1000, 50, "int8") == 8 + 50 * 4 + 4 + 50
    assert cost_model.payload_bytes(1000, 50, "int4") == 8 + 50 * 4 + 4 + 25
    assert cost_model.payload_bytes(1000, 50, "int2") == 8 + 50 * 4 + 4 + 13
    assert cost_model.payload_bytes(1000, 50, "sign") == 8 + 50 * 4 + 4 + 7
    # csr16: one block count (4 bytes), 2-byte offsets padded to 4 bytes.
    assert cost_model.payload_bytes(1000, 50, "fp32", "csr16") == 8 + 4 + 100 + 50 * 4


def test_ring_allreduce_over_nodes_of_two_ranks():
    # P = 4 ranks on 2 nodes; S = 1600 bytes: 6 steps of 400 bytes, one ring edge leaves each node.
    c = cluster(2, 2, alpha=1e-6, alpha_intra=1e-6)
    cost = cost_model.ring_allreduce(c, 1600)
    assert cost.cross_bytes == 2 * 3 / 4 * 1600 == 2400
    assert cost.cross_total == 2 * 2400
    assert cost.intra_bytes == 2400
    step = max(1e-6 + 400 * 8 / B, 1e-6 + 400 / B_INTRA)  # the slowest edge sets the pace
    assert cost.comm_s == pytest.approx(6 * step)
    # Two-level: reduce-scatter of 1600 in the node (1 step of 800), 2 concurrent rings of 2 nodes
    # (2 steps of 400, both through the NIC), all-gather in the node.
    two = cost_model.two_level_allreduce(c, 1600)
    assert two.cross_bytes == 2 * 2 * 400 == 1600  # 2 (N-1)/N S
    assert two.intra_bytes == 2 * 800
    assert two.comm_s == pytest.approx(2 * (1e-6 + 800 / B_INTRA) + 2 * (1e-6 + 2 * 400 * 8 / B))
    assert cost_model.allreduce(c, 1600).comm_s == min(cost.comm_s, two.comm_s)
    # One node: nothing crosses.
    assert cost_model.ring_allreduce(cluster(1, 8), 1600).cross_bytes == 0


def test_exchange_traffic_by_hand():
    sc, d = scenario(params=1000), 0.1
    # allgather, 3 nodes of 2: a ring of 6 over payloads of 8 + 100 * 8 bytes; decode 6 payloads.
    cost = cost_model.step_cost(sc, Method("allgather"), cluster(3, 2), d, algorithm="ring")
    assert cost["cross_bytes"] == 5 * 808
    assert cost["cross_total"] == 3 * 5 * 808
    assert cost["wire_bytes"] == 808
    # hierarchical, 3 nodes of 2: shards of 500 entries, 50 kept (408 bytes); 2 concurrent rings of
    # 3 nodes through each NIC; the dense bucket crosses the node's ring twice (scatter, gather).
    cost = cost_model.step_cost(sc, Method("hierarchical"), cluster(3, 2), d)
    assert cost["cross_bytes"] == (3 - 1) * 2 * 408
    assert cost["intra_bytes"] == 2 * 1 * 4 * 500
    assert cost["wire_bytes"] == 408
    # allreduce, 2 nodes of 2, flat ring: 100 indices broadcast (400 bytes through the NIC), then
    # 100 fp32 values all-reduced over 4 ranks: 2 * 3/4 * 400.
    cost = cost_model.step_cost(sc, Method("allreduce"), cluster(2, 2), d, algorithm="ring")
    assert cost["cross_bytes"] == 400 + 600
    # hierarchical/allreduce, 2 nodes of 2: per local index 50 indices (200 bytes) and a 2-node ring
    # all-reduce of 200 bytes of values (2 steps of 100); two local indices through each NIC.
    cost = cost_model.step_cost(sc, Method("hierarchical", cross="allreduce"), cluster(2, 2), d, algorithm="ring")
    assert cost["cross_bytes"] == 2 * 200 + 2 * 2 * 100
    # dense baselines: S = 4000 bytes, bf16 half of it, PowerSGD two all-reduces of its 400 bytes.
    flat = cluster(2, 2)
    assert cost_model.step_cost(sc, cost_model.DENSE, flat, d, "ring")["cross_bytes"] == 1.5 * 4000
    assert cost_model.step_cost(sc, cost_model.BF16, flat, d, "ring")["cross_bytes"] == 1.5 * 2000
    assert cost_model.step_cost(sc, cost_model.POWERSGD, flat, d, "ring")["cross_bytes"] == 2 * 1.5 * 200


def test_step_time_adds_compute_compress_comm_decode():
    sc = scenario(params=1000, compute_s=0.01, select_entry_s=1e-6, decode_entry_s=1e-5, hook_s=0.002)
    c = cluster(4, 1, alpha=1e-5)
    cost = cost_model.step_cost(sc, Method("allgather"), c, 0.01)
    p = cost_model.payload_bytes(1000, 10)
    comm = 3 * (1e-5 + p * 8 / B)
    assert cost["comm_s"] == pytest.approx(comm)
    assert cost["step_s"] == pytest.approx(0.01 + 0.002 + 1000 * 1e-6 + 4 * 10 * 1e-5 + comm)
    # overlap hides communication behind up to that fraction of the compute, no more
    hidden = cost_model.step_cost(sc, Method("allgather"), c, 0.01, overlap=1.0)
    assert hidden["step_s"] == pytest.approx(cost["step_s"] - min(comm, 0.01))


def test_hierarchical_with_one_rank_per_node_is_allgather():
    sc = scenario(params=100_000, buckets=3, compute_s=0.01, select_entry_s=1e-8, decode_entry_s=1e-7)
    for n in (1, 2, 7, 64):
        c = cluster(n, 1, alpha=2e-5)
        flat = cost_model.step_cost(sc, Method("allgather"), c, 0.01)
        two = cost_model.step_cost(sc, Method("hierarchical"), c, 0.01)
        assert two == pytest.approx(flat)


@pytest.mark.parametrize("local", [2, 8])
def test_hierarchical_crosses_about_L_times_less_than_allgather(local):
    sc = scenario(params=8 << 20, buckets=4)
    for n in (2, 4, 64, 1024):
        c = cluster(n, local)
        flat = cost_model.step_cost(sc, Method("allgather"), c, 0.01)["cross_bytes"]
        hier = cost_model.step_cost(sc, Method("hierarchical"), c, 0.01)["cross_bytes"]
        # (P-1) p against (N-1) L p_shard, p_shard = p / L up to its header
        assert flat / hier == pytest.approx((n * local - 1) / (n - 1), rel=1e-3)
        assert flat / hier >= local * (1 - 1e-3)
    assert flat / hier == pytest.approx(local, rel=0.01)  # N = 1024


@pytest.mark.parametrize("algorithm", ["best", "ring"])
@pytest.mark.parametrize("cross", ["allreduce", "hierarchical"])
def test_allreduce_cross_node_bytes_are_flat_in_nodes(cross, algorithm):
    method = Method("allreduce") if cross == "allreduce" else Method("hierarchical", cross="allreduce")
    sc = scenario(params=8 << 20, buckets=4)
    counts = [2, 4, 16, 128, 1024]
    cross_bytes = [cost_model.step_cost(sc, method, cluster(n, 8), 0.01, algorithm)["cross_bytes"] for n in counts]
    assert max(cross_bytes) < 2 * min(cross_bytes)
    k = sc.params * 0.01
    assert all(4 * k <= b <= 4 * k + 2 * k * 4 + 1 for b in cross_bytes)  # indices 4k, values about 2 k v
    gather = [cost_model.step_cost(sc, Method("allgather"), cluster(n, 8), 0.01)["cross_bytes"] for n in counts]
    assert gather[-1] > 400 * gather[0]  # the all-gather's grows with P


def test_reproduces_the_one_rank_per_node_model():
    n_params, density, payload = 1_000_000, 0.01, 8 + 10_000 * 8
    rows = [row("none", "none", None, 2, 20.0, DENSE), row("powersgd r1", "powersgd", None, 2, 21.0, 50_000),
            row("topk", "topk", None, 2, 18.0, payload, density)]
    rows[-1]["compress_ms_per_step"], rows[-1]["decode_ms_per_step"] = 5.0, 0.4
    model = cost_model.calibrate(rows)
    sc = cost_model.cpu_scenario(rows)
    assert sc.params == n_params and sc.compute_s == pytest.approx(model["compute_s"])
    for n in (2, 3, 16, 100):
        for name, method in (("none", cost_model.DENSE), ("topk", Method("allgather"))):
            old = cost_model.cluster_step_s(model, name, n, 10e9, 2e-5)
            new = cost_model.step_cost(sc, method, Cluster(n, 1, 10e9, 2e-5), density, algorithm="ring")
            assert new["step_s"] == pytest.approx(old)


def test_bad_settings_are_rejected():
    sc = scenario()
    with pytest.raises(ValueError, match="exchange must be one of"):
        cost_model.step_cost(sc, Method("scatter"), cluster(2, 1), 0.01)
    with pytest.raises(ValueError, match="values must be one of"):
        cost_model.step_cost(sc, Method("allreduce", values="int8"), cluster(2, 1), 0.01)
    with pytest.raises(ValueError, match="nodes must be an integer"):
        Cluster(0, 8, 1e9)
    with pytest.raises(ValueError, match="algorithm must be"):
        cost_model.allreduce(cluster(2, 2), 100, "butterfly")


def costly_scenario():
    """A workload whose compress and decode cost something: the all-gather's break-even is finite."""
    return scenario(params=4 << 20, buckets=2, compute_s=0.02, select_entry_s=1e-9, decode_entry_s=2e-8,
                    hook_s=0.001, powersgd_bytes=200_000)


def brute_force(sc, method, baseline, local, bits, density, limit):
    wins = []
    for n in range(1, limit + 1):
        c = Cluster(n, local, bits, 2e-5, sc.intra_bytes, sc.alpha_intra)
        wins.append(cost_model.step_cost(sc, method, c, density)["step_s"]
                    < cost_model.step_cost(sc, baseline, c, density)["step_s"])
    if True not in wins:
        return None
    first = wins.index(True)
    last = first
    while last + 1 < limit and wins[last + 1]:
        last += 1
    return first + 1, last + 1


@pytest.mark.parametrize("method", [Method("allgather"), Method("hierarchical"), Method("allgather", values="int8")])
def test_break_even_search_matches_trying_every_count(method):
    sc = costly_scenario()
    for gbit in (1, 10):
        found = cost_model.break_even_nodes(sc, method, cost_model.DENSE, 8, gbit * 1e9, 0.01, 2e-5, limit=300)
        assert found == brute_force(sc, method, cost_model.DENSE, 8, gbit * 1e9, 0.01, 300)


def test_break_even_moves_the_way_traffic_says():
    sc = costly_scenario()

    def last(method, gbit, density):
        span = cost_model.break_even_nodes(sc, method, cost_model.DENSE, 8, gbit * 1e9, density, 2e-5, limit=4096)
        return 0 if span is None else span[1]

    for method in (Method("allgather"), Method("hierarchical")):
        # a faster link leaves less to save: the break-even never grows with the rate...
        by_rate = [last(method, g, 0.01) for g in (0.5, 1, 2, 5, 10, 25, 100)]
        assert by_rate == sorted(by_rate, reverse=True) and by_rate[0] > by_rate[-1]
        # ... nor with the density
        by_density = [last(method, 1, d) for d in (0.0005, 0.001, 0.003, 0.01, 0.03)]
        assert by_density == sorted(by_density, reverse=True) and by_density[0] > by_density[-1]
    # the hierarchical exchange keeps paying L times further out (about)
    assert last(Method("hierarchical"), 1, 0.01) > 4 * last(Method("allgather"), 1, 0.01)


def test_break_even_table_rows():
    rows = cost_model.break_even_table([costly_scenario()], 2e-5, local=8, gbit=10, densities=(0.01,), limit=64)
    labels = [r["method"] for r in rows]
    assert "dense" not in labels and "powersgd" not in labels and "hierarchical/allreduce" in labels
    for r in rows:
        for key in ("vs_dense", "vs_powersgd"):
            assert r[key] is None or 1 <= r[key][0] <= r[key][1] <= 64
        assert r["best_vs_dense"][0] in cost_model.NODE_COUNTS


# ------------------------------------------------------------------ the emulated-cluster check
def synthetic_report(path, sc, ms_scale=1.0, bytes_scale=1.0):
    """Runs as gradsieve-train --nodes N --nproc L --link RATE might report them, 'measured' by the
    model itself (then scaled), so that the check must find the scale as its error."""
    runs = []
    for name, compressor, exchange, nodes, local, link in (
            ("none", "none", None, 2, 2, "100mbit"), ("topk", "topk", "allgather", 2, 2, "100mbit"),
            ("topk", "topk", "allgather", 2, 2, "unlimited"),
            ("topk hier", "topk", "hierarchical", 4, 2, "1gbit"),
            ("topk ar", "topk", "allreduce", 4, 2, "1gbit")):
        bits = math.inf if link == "unlimited" else cost_model.link_bits_of(link)
        c = Cluster(nodes, local, bits, 2e-5, sc.intra_bytes, sc.alpha_intra)
        method = cost_model.method_of(compressor, exchange, None, None, None)
        cost = cost_model.step_cost(sc, method, c, 0.01, algorithm="ring")
        ms = 1e3 * (sc.compute_s * nodes * local / 2 + cost["fixed_s"] + cost["compress_s"] + cost["decode_s"]
                    + cost["comm_s"])
        runs.append({"name": name, "compressor": compressor, "options": {"density": 0.01}, "density": 0.01,
                     "time_per_step_s": ms_scale * ms / 1e3, "dense_bytes_per_step": 4.0 * sc.params,
                     "wire_bytes_per_step": cost["wire_bytes"],
                     "cross_node_bytes_per_step": bytes_scale * cost["cross_total"],
                     "topology": {"nodes": nodes, "nproc": local, "link": link, "exchange": exchange}})
    with open(path, "w") as f:
        json.dump({"config": {"workload": "synthetic", "cpu_count": 2}, "runs": runs}, f)


def test_check_cluster_on_a_synthetic_report(tmp_path):
    sc = costly_scenario()
    path = str(tmp_path / "metrics.json")
    synthetic_report(path, sc)
    check = cost_model.check_cluster(path, sc, alpha=2e-5, header_overhead=1.0, verbose=False)
    assert len(check["points"]) == 5 and not check["skipped_runs"]
    for p in check["points"]:
        assert p["error_cross_bytes"] == pytest.approx(0.0, abs=1e-9)
        assert p["error_ms"] == pytest.approx(0.0, abs=1e-9)
        assert p["error_wire_bytes"] == pytest.approx(0.0, abs=1e-9)
    # the 100mbit top-k run is predicted from its unlimited twin plus what the link adds
    assert [p["base"] for p in check["points"]].count("same run, unlimited link") == 1
    # measurements 25% slower and 10% heavier show as errors of 1/1.25 - 1 and 1/1.1 - 1
    synthetic_report(path, sc, ms_scale=1.25, bytes_scale=1.1)
    check = cost_model.check_cluster(path, sc, alpha=2e-5, header_overhead=1.0, verbose=False)
    for p in check["points"]:
        assert p["error_cross_bytes"] == pytest.approx(1 / 1.1 - 1)
        if p["base"] != "same run, unlimited link":  # that one's base is measured 25% slower too
            assert p["error_ms"] == pytest.approx(1 / 1.25 - 1)
    assert check["median_abs_error_bytes"] == pytest.approx(1 - 1 / 1.1)


def test_check_cluster_skips_what_is_missing(tmp_path, capsys):
    missing = str(tmp_path / "nowhere.json")
    assert cost_model.check_cluster(missing, scenario())["skipped"] == f"{missing} not found"
    assert "skipped" in capsys.readouterr().out
    # the CLI: a missing report is a clear skip, not a failure
    assert cost_model.main(["--cluster-report", missing, "--cluster-report", missing]) == 0
    assert capsys.readouterr().out.count("not found: skipped") == 2
    # a run without its topology is listed as skipped, the others are checked
    path = str(tmp_path / "metrics.json")
    synthetic_report(path, costly_scenario())
    report = json.load(open(path))
    del report["runs"][0]["topology"]["nodes"]
    json.dump(report, open(path, "w"))
    check = cost_model.check_cluster(path, costly_scenario(), verbose=False)
    assert len(check["points"]) == 4 and check["skipped_runs"][0].startswith("none: no nodes")

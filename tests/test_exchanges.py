"""The exchanges in one process: the hierarchical exchange's shards and layouts, the cluster
layout, and the Simulator over nodes against independent references (the hook equals the
Simulator: tests/test_conformance.py)."""

import pytest
import torch

import gradsieve
from gradsieve.compressor import BucketLayout
from gradsieve.compressor import piece_key, piece_of
from gradsieve.exchanges.hierarchical import shard_layout, shard_sizes


def grads_for(world, numel, seed=0, steps=4):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(numel, generator=gen) for _ in range(world)] for _ in range(steps)]


# ------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("numel,parts", [(10, 4), (8, 4), (3, 4), (0, 2), (1, 1)])
def test_shard_sizes_cover_the_bucket_longest_first(numel, parts):
    sizes = shard_sizes(numel, parts)
    assert len(sizes) == parts and sum(sizes) == numel
    assert max(sizes) - min(sizes) <= 1 and list(sizes) == sorted(sizes, reverse=True)


def test_a_shard_layout_holds_the_pieces_of_the_parameters_in_it():
    layout = BucketLayout(10, (4, 3, 3), (2, 1, 2), 4, 5, (7, 8, 9))
    lo, hi = 3, 8  # the last entry of parameter 7, all of 8, the first of 9
    shard = shard_layout(layout, lo, hi, 2)
    assert shard.numel == 5 and shard.world_size == 2 and shard.index == 5
    assert shard.param_numels == (1, 3, 1) and shard.param_ndims == (2, 1, 2)
    assert shard.param_keys == (piece_key(7, 3), 8, piece_key(9, 0))
    # A piece's key never equals a parameter's key, nor another piece's.
    keys = {piece_key(k, s) for k in range(50) for s in range(50)}
    assert len(keys) == 2500 and all(k < 0 for k in keys)
    assert all(piece_of(piece_key(k, s)) == (k, s) for k in (0, 1, 5 << 20, 2**40) for s in (0, 1, 2**31))
    assert piece_of(12) == (12, 0)
    assert shard_layout(layout, 0, 10, 1).param_keys == (7, 8, 9)


def test_the_topology_of_a_world():
    t = gradsieve.Topology.of(8, 4)
    assert (t.nodes, t.local, t.world) == (2, 4, 8)
    assert t.node_ranks(5) == (4, 5, 6, 7) and t.cross_ranks(5) == (1, 5)
    assert gradsieve.Topology.of(6, None) == gradsieve.Topology(1, 6) or "LOCAL_WORLD_SIZE" in __import__("os").environ
    with pytest.raises(ValueError, match="ranks per node .* divides the world size 6, got 4"):
        gradsieve.Topology.of(6, 4)
    with pytest.raises(ValueError, match="nodes must be an integer >= 1, got 0"):
        gradsieve.Topology(0, 2)


def test_the_topology_reads_torchruns_local_world_size(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert gradsieve.Topology.of(6) == gradsieve.Topology(3, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE must be an integer, got 'two'"):
        gradsieve.Topology.of(6)


# ------------------------------------------------------------------------------ the Simulator over nodes
@pytest.mark.parametrize("name", ["topk", "dgc", "ef21", "regtopk"])
def test_nodes_of_one_rank_are_the_flat_exchange(name):
    """Hierarchical with one rank per node has nothing to do inside a node: bit for bit the flat
    all-gather."""
    flat = gradsieve.Simulator(name, 4, density=0.05, param_sizes=[600, 400])
    nodes = gradsieve.Simulator(name, nodes=4, local=1, exchange="hierarchical", density=0.05,
                                param_sizes=[600, 400])
    for grads in grads_for(4, 1000):
        assert torch.equal(flat.step(grads), nodes.step(grads))


@pytest.mark.parametrize("numel", [1000, 1003, 5])
@pytest.mark.parametrize("nodes,local", [(2, 2), (3, 4), (1, 4)])
def test_at_full_density_the_hierarchical_exchange_is_the_average(numel, nodes, local):
    """Sending every entry, the result is the mean of all ranks' gradients (to float32 rounding),
    whether or not the bucket divides into the node's shards (and when it has fewer entries than a
    node has ranks)."""
    world = nodes * local
    sim = gradsieve.Simulator("topk", nodes=nodes, local=local, exchange="hierarchical", density=1.0)
    for grads in grads_for(world, numel, steps=2):
        out = sim.step(grads)
        torch.testing.assert_close(out, torch.stack(grads).mean(0), rtol=1e-5, atol=1e-6)


def test_the_hierarchical_error_feedback_account():
    """Over steps, every rank's gradients add up to what was delivered to all ranks plus what the
    ranks hold: rank (n, j) holds its shard j of node n's average, local times its share."""
    sim = gradsieve.Simulator("topk", nodes=2, local=3, exchange="hierarchical", density=0.03)
    check_hierarchical_account(sim, 2, 3, 1001, steps=6)


def check_hierarchical_account(sim, nodes, local, numel, steps):
    world = nodes * local
    total = torch.zeros(numel, dtype=torch.float64)
    delivered = torch.zeros(numel, dtype=torch.float64)
    for grads in grads_for(world, numel, steps=steps):
        total += sum(g.double() for g in grads)
        delivered += world * sim.step(grads).double()
    held = torch.zeros(numel, dtype=torch.float64)
    sizes = shard_sizes(numel, local)
    for rank in range(world):
        j = rank % local
        lo = sum(sizes[:j])
        held[lo:lo + sizes[j]] += local * sim.memory(rank, "residual").double()
    torch.testing.assert_close(delivered + held, total, rtol=0, atol=1e-4)
    assert float(delivered.abs().sum()) > 0


def test_each_rank_holds_the_memory_of_its_shard():
    flat = gradsieve.Simulator("topk", 4, density=0.01)
    nodes = gradsieve.Simulator("topk", nodes=1, local=4, exchange="hierarchical", density=0.01)
    grads = grads_for(4, 4000, steps=1)[0]
    flat.step(grads)
    nodes.step(grads)
    assert flat.memory_bytes(0)["total"] == 4000 * 4
    assert nodes.memory_bytes(0)["total"] == 1000 * 4


def test_cross_node_payloads_are_local_times_smaller():
    """The payloads that cross nodes: each rank's covers its shard, so a node sends about 1/L of
    what the flat all-gather has each rank send."""
    flat = gradsieve.Simulator("topk", 8, density=0.01)
    nodes = gradsieve.Simulator("topk", nodes=2, local=4, exchange="hierarchical", density=0.01)
    grads = grads_for(8, 40_000, steps=1)[0]
    flat.step(grads)
    nodes.step(grads)
    assert nodes.wire_bytes * 4 == pytest.approx(flat.wire_bytes, rel=0.05)


def test_a_non_finite_gradient_skips_the_step_on_every_shard():
    sim = gradsieve.Simulator("topk", nodes=2, local=2, exchange="hierarchical", density=0.1)
    steps = grads_for(4, 100, steps=3)
    sim.step(steps[0])
    before = [sim.memory(r, "residual").clone() for r in range(4)]
    bad = [g.clone() for g in steps[1]]
    # Entry 7 lies in shard 0: rank 3 (local index 1) hands it to rank 2, whose cross-node group
    # skips; the group of local index 1 learns it from the node's all-gather.
    bad[3][7] = float("inf")
    out = sim.step(bad)
    assert torch.isnan(out).all() and sim.skipped_steps == 1
    for r in range(4):
        assert torch.equal(sim.memory(r, "residual"), before[r])
    assert torch.isfinite(sim.step(steps[2])).all()


def test_simulator_layout_arguments_are_checked():
    with pytest.raises(ValueError, match="give nodes and local together, got nodes=2, local=None"):
        gradsieve.Simulator("topk", nodes=2)
    with pytest.raises(ValueError, match="world_size 3 is not nodes \\* local = 4"):
        gradsieve.Simulator("topk", 3, nodes=2, local=2)
    with pytest.raises(ValueError, match="local must be an integer >= 1, got 0"):
        gradsieve.Simulator("topk", nodes=2, local=0)
    with pytest.raises(ValueError, match="unknown exchange 'ring'"):
        gradsieve.Simulator("topk", 2, exchange="ring")
    with pytest.raises(ValueError, match="cross must be a flat exchange, got 'hierarchical'"):
        gradsieve.Simulator("topk", nodes=2, local=2, exchange="hierarchical",
                            exchange_options={"cross": "hierarchical"})


def test_a_simulated_exchange_refuses_real_collectives():
    exchange = gradsieve.get_exchange("allgather", simulated_world=2)
    with pytest.raises(ValueError, match="is simulated: run its phases with run_together"):
        exchange.issue(gradsieve.Collective("all_gather", (0, 1), torch.zeros(2)))
    with pytest.raises(ValueError, match="simulated_world must be an integer >= 1, got 0"):
        gradsieve.get_exchange("allgather", simulated_world=0)


def test_a_checkpoint_loads_only_into_the_same_exchange():
    flat = gradsieve.CompressionState("topk", density=0.1,
                                      exchange=gradsieve.get_exchange("allgather", simulated_world=4))
    nodes = gradsieve.CompressionState("topk", density=0.1,
                                       exchange=gradsieve.get_exchange("hierarchical", simulated_world=4, local=2))
    with pytest.raises(ValueError, match=r"made with the exchange \{'exchange': 'allgather'\}, this state has "
                                         r"\{'exchange': 'hierarchical', 'nodes': 2, 'local': 2"):
        nodes.load_state_dict(flat.state_dict())
    again = gradsieve.CompressionState("topk", density=0.1,
                                       exchange=gradsieve.get_exchange("hierarchical", simulated_world=4, local=2))
    again.load_state_dict(nodes.state_dict())
    assert again.stats()["node_bytes"] == 0


# ------------------------------------------------------------------------------ the agreed-index all-reduce
def test_allreduce_leader_sends_the_leaders_top_k_and_keeps_the_rest():
    """Against plain torch: step 0's leader (worker 0 for bucket 0) picks the top-k of its
    gradient; every worker's values there are averaged; each worker keeps the rest."""
    world, numel, k = 3, 200, 10
    sim = gradsieve.Simulator("topk", world, exchange="allreduce", density=k / numel)
    grads = grads_for(world, numel, steps=2)
    out = sim.step(grads[0])
    chosen = grads[0][0].abs().topk(k).indices.sort().values
    expected = torch.zeros(numel)
    expected[chosen] = torch.stack([g[chosen] for g in grads[0]]).sum(0) / world
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    for w in range(world):
        kept = grads[0][w].clone()
        kept[chosen] = 0
        assert torch.equal(sim.memory(w, "residual"), kept)
    # Step 1: the leader is worker 1, choosing from its residual plus its gradient.
    out = sim.step(grads[1])
    acc = [sim_residual + g for sim_residual, g in zip([grads[0][w].clone().index_fill_(0, chosen, 0)
                                                        for w in range(world)], grads[1])]
    chosen = acc[1].abs().topk(k).indices.sort().values
    expected = torch.zeros(numel)
    expected[chosen] = torch.stack([a[chosen] for a in acc]).sum(0) / world
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("select", ["leader", "previous", "mix"])
@pytest.mark.parametrize("name", ["topk", "dgc", "ef21"])
def test_allreduce_at_full_density_is_the_average(select, name):
    world, numel = 4, 300
    options = {"momentum": 0.0} if name == "dgc" else {}
    sim = gradsieve.Simulator(name, world, exchange="allreduce", exchange_options={"select": select},
                              density=1.0, **options)
    for grads in grads_for(world, numel, steps=3):
        torch.testing.assert_close(sim.step(grads), torch.stack(grads).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("select", ["leader", "previous", "mix"])
def test_allreduce_error_feedback_account(select):
    world, numel = 4, 500
    sim = gradsieve.Simulator("topk", world, exchange="allreduce", exchange_options={"select": select},
                              density=0.02)
    total = torch.zeros(numel, dtype=torch.float64)
    delivered = torch.zeros(numel, dtype=torch.float64)
    for grads in grads_for(world, numel, steps=8):
        total += sum(g.double() for g in grads)
        delivered += world * sim.step(grads).double()
    held = sum(sim.memory(w, "residual").double() for w in range(world))
    torch.testing.assert_close(delivered + held, total, rtol=0, atol=1e-4)


def test_allreduce_previous_freezes_the_set_and_mix_renews_part_of_it():
    """"previous" alone keeps step 0's set forever (the average is zero outside it); "mix" takes
    half from the leader each step."""
    world, numel, k = 4, 400, 20
    sets = {}
    for select in ("previous", "mix"):
        sim = gradsieve.Simulator("topk", world, exchange="allreduce", exchange_options={"select": select},
                                  density=k / numel)
        seen = []
        for grads in grads_for(world, numel, steps=5):
            sim.step(grads)
            seen.append(set(next(iter(sim.exchange.previous.values())).tolist()))
        sets[select] = seen
    assert all(s == sets["previous"][0] for s in sets["previous"])
    assert all(len(s) == k for s in sets["mix"])
    assert any(len(a - b) > 0 for a, b in zip(sets["mix"][1:], sets["mix"]))


def test_allreduce_a_non_finite_gradient_outside_the_set_skips_the_step():
    world, numel = 2, 100
    sim = gradsieve.Simulator("topk", world, exchange="allreduce", density=0.05)
    grads = grads_for(world, numel, steps=2)
    sim.step(grads[0])
    before = [sim.memory(w, "residual").clone() for w in range(world)]
    bad = [g.clone() for g in grads[1]]
    bad[1][int(bad[1].abs().argmin())] = float("nan")  # an entry no one would send
    assert torch.isnan(sim.step(bad)).all() and sim.skipped_steps == 1
    for w in range(world):
        assert torch.equal(sim.memory(w, "residual"), before[w])


def test_allreduce_bytes_are_the_values_and_the_broadcast_set():
    world, numel, k = 4, 1000, 10
    sim = gradsieve.Simulator("topk", world, exchange="allreduce", density=k / numel, values="bf16")
    sim.step(grads_for(world, numel, steps=1)[0])
    # Values and the finiteness entry in bf16, and the leader's int32 index set (as every rank
    # counts the broadcast it took part in).
    assert sim.wire_bytes == world * ((k + 1) * 2 + k * 4)


def test_allreduce_refuses_what_it_cannot_sum():
    with pytest.raises(ValueError, match="needs a compressor that can send at indices .* 'regtopk' chooses its own"):
        gradsieve.Simulator("regtopk", 2, exchange="allreduce")
    with pytest.raises(ValueError, match="values must be fp32, fp16 or bf16 .* got 'int8'"):
        gradsieve.Simulator("topk", 2, exchange="allreduce", values="int8")
    with pytest.raises(ValueError, match="select must be one of leader, previous, mix, got 'best'"):
        gradsieve.get_exchange("allreduce", simulated_world=2, select="best")
    with pytest.raises(ValueError, match=r"share must be a number in \(0, 1\), got 1.0"):
        gradsieve.get_exchange("allreduce", simulated_world=2, share=1.0)
    gradsieve.Simulator("none", 2, exchange="allreduce")  # dense compressors all-reduce anyway


def test_hierarchical_with_an_allreduce_across_nodes():
    """Composed: shards inside the node, agreed-index all-reduce across nodes. At full density, the
    average; the error-feedback account with local times each rank's shard residual."""
    nodes, local, numel = 2, 2, 301
    world = nodes * local
    full = gradsieve.Simulator("topk", nodes=nodes, local=local, exchange="hierarchical",
                               exchange_options={"cross": "allreduce"}, density=1.0)
    grads = grads_for(world, numel, steps=2)
    torch.testing.assert_close(full.step(grads[0]), torch.stack(grads[0]).mean(0), rtol=1e-5, atol=1e-6)
    sim = gradsieve.Simulator("topk", nodes=nodes, local=local, exchange="hierarchical",
                              exchange_options={"cross": "allreduce"}, density=0.03)
    check_hierarchical_account(sim, nodes, local, numel, steps=5)


def test_a_piece_reads_its_part_of_the_parameters_curvature():
    """granular scores with the measured Hessian diagonal of each parameter; a shard holding a
    piece of a parameter reads that piece's part of it."""
    compressor = gradsieve.get_compressor("granular", density=0.1)
    whole = BucketLayout(10, (4, 6), (2, 2), 1, 0, (3, 4))
    shard = shard_layout(whole, 2, 7, 1)  # entries 2-3 of parameter 3, 0-2 of parameter 4
    params = {3: {"hessian": torch.arange(4.0)}, 4: {"hessian": torch.arange(10.0, 16.0)}}
    memory = gradsieve.memory.BucketMemory(shard.keys, shard.param_numels, {}, params=params)
    assert compressor._hessian(memory, shard, torch.device("cpu")).tolist() == [2.0, 3.0, 10.0, 11.0, 12.0]

"""The DDP communication hook on CUDA over NCCL: world size 1 (one process, one GPU), so that the
device paths of the hook run (payload packing, the decode kernels and their flags, the memory on
the device), checked against the plain-torch references of tests/reference.py fed the recorded
buckets. Skipped without a GPU and a CUDA build of gradsieve."""

import gc
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
import reference
from conftest import requires_cuda
from distributed import free_port, recording_hook
from test_hook import batch, small_model

pytestmark = requires_cuda

STEPS = 6
BAD_STEP = 3  # an inf in this step's input: its gradient is not finite and the step is skipped


def _entry(rank, fn, port, out_dir, args):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        gc.collect()  # free the DDP model and the hook's futures while the process group is alive
        dist.destroy_process_group()
    # As tests/distributed.py: the result is on disk, teardown is not what is tested.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_gpu(fn, tmp_path, *args):
    """``fn(*args)`` in a fresh process holding a one-rank NCCL process group on GPU 0."""
    mp.spawn(_entry, args=(fn, free_port(), str(tmp_path), args), nprocs=1, join=True)
    return torch.load(os.path.join(str(tmp_path), "result.pt"), weights_only=False)


def worker(compressor, options):
    device = torch.device("cuda", 0)
    model = small_model().to(device)
    state = gradsieve.CompressionState(compressor, **options)
    recorder = recording_hook()
    ddp = DDP(model, device_ids=[0])
    ddp.register_comm_hook(state, recorder)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    names = () if state.compressor.traits.dense else state.compressor.memory_names
    memory = []
    for step in range(STEPS):
        x, y = batch(0, step)
        if step == BAD_STEP:
            x[0, 0] = float("inf")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
        if step != BAD_STEP:  # the skipped step's average is NaN: not applied
            opt.step()
        torch.cuda.synchronize()
        state.flush()  # the skipped step's memory is undone when its flags are read
        memory.append({name: state.memory.total(name).cpu() for name in names}
                      if state.memory.buckets else None)
    return {
        "inputs": [t.cpu() for t in recorder.inputs],
        "outputs": [t.cpu() for t in recorder.outputs],
        "devices": sorted({str(t.device) for t in recorder.inputs + recorder.outputs}),
        "memory_devices": sorted({str(t.device) for m in state.memory.buckets.values()
                                  for t in m.entries.values()}),
        "memory": memory,
        "buckets": len(state.memory.buckets),
        "stats": state.stats(),
    }


def assert_same(actual, expected, step):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=f"step {step}")


@pytest.mark.parametrize("compressor,options", [
    ("topk", {"density": 0.1}),
    ("topk", {"density": 0.1, "index": "csr16"}),
    ("topk", {"density": 0.1, "values": "int8", "chunk": 16, "index": "csr16"}),
])
def test_sparse_hook_on_cuda_matches_reference(tmp_path, compressor, options):
    r = run_on_gpu(worker, tmp_path, compressor, options)
    assert r["devices"] == ["cuda:0"] and r["memory_devices"] == ["cuda:0"] and r["buckets"] == 1
    inputs, outputs = r["inputs"], r["outputs"]
    assert len(inputs) == len(outputs) == STEPS
    numel = inputs[0].numel()
    assert torch.equal(outputs[0], inputs[0])  # warm-up: the all-reduce of one rank
    # Error-feedback top-k in plain torch on the CPU, fed the recorded gradients: the CUDA kernels
    # round as the CPU ones do (IEEE float32 adds, products and divisions, round half to even),
    # so the outputs and the residual are equal bit for bit.
    ef = reference.ErrorFeedbackTopK(1, options["density"], options.get("values", "fp32"),
                                     options.get("chunk", 256))
    k = reference.entries_for(options["density"], numel)
    for step in range(1, STEPS):
        expected = ef.step([inputs[step]])
        assert_same(outputs[step], expected, step)
        assert torch.equal(r["memory"][step]["residual"], ef.bucket_residual(0, ["bucket"], [numel]))
        if step == BAD_STEP:
            # The finite flag read back from the payload on the device: the whole bucket is NaN
            # and the residual stays as it was.
            assert not bool(torch.isfinite(inputs[step]).all())
            assert bool(outputs[step].isnan().all())
            assert torch.equal(r["memory"][step]["residual"], r["memory"][step - 1]["residual"])
        else:
            assert 0 < int((outputs[step] != 0).sum()) <= k
    stats = r["stats"]
    assert stats["compressed_steps"] == STEPS - 1 and stats["skipped_steps"] == 1
    assert stats["bad_payloads"] == 0 and stats["wire_bytes"] > 0 and stats["compression_ratio"] > 1.0


@pytest.mark.parametrize("name,wire", [("none", torch.float32), ("fp16", torch.float16)])
def test_dense_hook_on_cuda(tmp_path, name, wire):
    r = run_on_gpu(worker, tmp_path, name, {})
    assert r["devices"] == ["cuda:0"]
    inputs, outputs = r["inputs"], r["outputs"]
    assert len(inputs) == len(outputs) == STEPS
    for step in range(STEPS):
        # One rank: the all-reduce is the gradient itself, rounded to the wire's type and back
        # (a non-finite gradient passes through as it is).
        assert outputs[step].dtype == torch.float32
        assert_same(outputs[step], inputs[step].to(wire).float(), step)
    numel = inputs[0].numel()
    assert r["stats"]["wire_bytes"] == STEPS * numel * torch.empty((), dtype=wire).element_size()
    assert math.isclose(r["stats"]["compression_ratio"], 4 / torch.empty((), dtype=wire).element_size())


def sync_free_worker(cases):
    """Trains each case for a few steps; steps after the first compressed one (whose buckets run
    the configuration check, a collective read on the host) run under
    ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation in the hook raises."""
    device = torch.device("cuda", 0)
    out = {}
    for compressor, options, exchange, exchange_options in cases:
        model = small_model().to(device)
        state = gradsieve.CompressionState(compressor, warmup_steps=1, density=0.1,
                                           exchange=gradsieve.get_exchange(exchange, **exchange_options), **options)
        ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.001)
        ddp.register_comm_hook(state, gradsieve.compression_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        error = None
        for step in range(6):
            x, y = batch(0, step)
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            checked = step >= 3
            try:
                if checked:
                    torch.cuda.set_sync_debug_mode("error")
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()
            except RuntimeError as err:
                error = f"step {step}: {err}"
                break
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        out[f"{compressor} {options} {exchange} {exchange_options}"] = (error, state.stats()["skipped_steps"])
    return out


def test_backward_with_the_hook_does_not_synchronise(tmp_path):
    cases = [("topk", {}, "allgather", {}), ("topk", {"values": "int8", "index": "csr16"}, "allgather", {}),
             ("dgc", {}, "allgather", {}), ("ef21", {}, "allgather", {}), ("regtopk", {}, "allgather", {}),
             ("topk", {}, "allreduce", {"select": "mix"}), ("ef21", {}, "allreduce", {}),
             ("topk", {}, "hierarchical", {"local": 1})]
    results = run_on_gpu(sync_free_worker, tmp_path, cases)
    failures = {case: error for case, (error, _) in results.items() if error}
    assert not failures, failures
    assert all(skipped == 0 for _, skipped in results.values()), results

"""The hook reads nothing from the device per bucket: a 2-rank run under a detector of host reads
(tests/sync_detector.py) for the compressors and exchanges whose step is decided on the device.

What is allowed: the configuration check at a bucket's first call (a collective that compares the
ranks' settings), and one read per step of the previous step's flags (``StepLedger.resolve``,
from a host copy made when that step ended). Everything else, per bucket, is a failure, and the
message names the gradsieve function that read.
"""

import collections

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsieve
from distributed import run_workers
from sync_detector import HostReads

STEPS = 6
# (compressor, its options, exchange, the exchange's options)
CASES = [
    ("topk", {}, "allgather", {}),
    ("topk", {"values": "int8", "index": "csr16"}, "allgather", {}),
    ("topk", {"checksum": True}, "allgather", {}),
    ("dgc", {}, "allgather", {}),
    ("ef21", {}, "allgather", {}),
    ("regtopk", {}, "allgather", {}),
    ("topk", {}, "allreduce", {"select": "mix"}),
    ("dgc", {}, "allreduce", {"select": "previous"}),
    ("ef21", {}, "allreduce", {"select": "leader"}),
    ("topk", {}, "hierarchical", {"local": 2}),
    ("regtopk", {}, "hierarchical", {"local": 2}),
    ("ef21", {}, "hierarchical", {"local": 2, "cross": "allreduce"}),
]
ALLOWED = {"verify_config": "the configuration check at a bucket's first call",
           "resolve": "the previous step's flags, once per step"}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def _run(rank, world, name, options, exchange, exchange_options, nan_at=None):
    """Trains STEPS steps with the hook under the detector; per step, the host reads made from
    gradsieve's code, by the function (of the allowed ones, or the innermost) that made them, and
    the number of hook calls."""
    state = gradsieve.CompressionState(name, warmup_steps=1, **({} if name in ("granular",) else {"density": 0.05}),
                                       exchange=gradsieve.get_exchange(exchange, **exchange_options), **options)
    ddp = DDP(_model(), bucket_cap_mb=0.01)
    calls = [0]

    def hook(s, bucket):
        calls[0] += 1
        return gradsieve.compression_hook(s, bucket)

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    steps, outputs_finite = [], []
    with HostReads() as detector:
        for step in range(STEPS):
            seen, made = detector.count(), calls[0]
            x = torch.randn(16, 32, generator=torch.Generator().manual_seed(100 * step + rank))
            y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(7 + step))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            if nan_at == step and rank == 1:
                loss = loss * float("nan")
            loss.backward()
            finite = all(bool(torch.isfinite(p.grad).all()) for p in ddp.parameters())
            outputs_finite.append(finite)
            if finite:  # as GradScaler does: a step with a non-finite gradient is not applied
                opt.step()
            reads = collections.Counter()
            for what, path, function, line, stack in detector.reads[seen:]:
                allowed = next((f for f in stack if f in ALLOWED), None)
                reads[allowed or f"{what} in {function} ({path}:{line})"] += 1
            steps.append((dict(reads), calls[0] - made))
    stats = state.stats()
    return {"steps": steps, "finite": outputs_finite, "skipped": stats["skipped_steps"],
            "memory": {i: {k: t.clone() for k, t in m.entries.items()} for i, m in state.memory.buckets.items()}}


def worker_cases(rank, world, cases, nan_at):
    out = []
    for case in cases:
        out.append(_run(rank, world, *case, nan_at=nan_at))
        dist.barrier()
    return out


def worker_decode_into_bucket(rank, world):
    """Per compressed bucket: whether the flat round decoded the average into DDP's bucket."""
    into = []
    original = gradsieve.exchange.Round.aggregate

    def aggregate(self, compressor, received, layout, step, out=None):
        into.append(out is not None and out.data_ptr() == self.buffer.data_ptr())
        return original(self, compressor, received, layout, step, out=out)

    gradsieve.exchange.Round.aggregate = aggregate
    try:
        result = _run(rank, world, "topk", {}, "allgather", {})
    finally:
        gradsieve.exchange.Round.aggregate = original
    return into, result["finite"]


def _check(case, result):
    name = f"{case[0]} {case[1]} exchange={case[2]} {case[3]}"
    for step, (reads, buckets) in enumerate(result["steps"]):
        assert buckets > 1 or step == 0, f"{name}: the model must make several buckets"
        bad = {k: n for k, n in reads.items() if k not in ALLOWED}
        assert not bad, f"{name}, step {step} ({buckets} buckets): host reads {bad}"
        if step >= 2:  # after the warm-up and the first compressed step's bucket checks
            assert reads.get("verify_config", 0) == 0, f"{name}, step {step}: configuration re-checked"
        assert reads.get("resolve", 0) <= 1, f"{name}, step {step}: {reads['resolve']} reads of the flags"
    # The flags of every compressed step but the last are read at the next step's first bucket.
    assert sum(r.get("resolve", 0) for r, _ in result["steps"]) == STEPS - 2, name


@pytest.mark.parametrize("part", [slice(0, 6), slice(6, None)])
def test_no_host_read_per_bucket(tmp_path, part):
    cases = CASES[part]
    results = run_workers(worker_cases, 2, tmp_path, cases, None)
    for rank_results in results:
        for case, result in zip(cases, rank_results):
            _check(case, result)
            assert all(result["finite"]), case
            assert result["skipped"] == 0, case


def test_a_skipped_step_is_still_decided_on_the_device(tmp_path):
    """A NaN gradient on rank 1 at step 3: the buckets come back NaN on both ranks (the optimizer's
    step is then poisoned as before: GradScaler would skip it), the step is counted once the flags
    are read, and nothing is read per bucket."""
    cases = [("topk", {}, "allgather", {}), ("ef21", {}, "hierarchical", {"local": 2})]
    results = run_workers(worker_cases, 2, tmp_path, cases, 3)
    for rank_results in results:
        for case, result in zip(cases, rank_results):
            _check(case, result)
            assert result["finite"][3] is False and all(result["finite"][:3]), case
            assert result["skipped"] == 1, case


def test_the_average_is_decoded_into_the_bucket(tmp_path):
    """A float32 bucket takes the average straight from the fused decode: no result tensor, no copy."""
    for into, finite in run_workers(worker_decode_into_bucket, 2, tmp_path):
        assert into and all(into), into
        assert all(finite)

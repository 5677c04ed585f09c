"""gradsieve-train --checkpoint-every / --checkpoint-dir / --resume: a run killed mid-way and
resumed ends bit-identical to one that was never interrupted."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from distributed import run_workers
from gradsieve.train import cli as train_cli
from gradsieve.train.checkpoint import FAULT_ENV, RunCheckpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPRESSORS = ["topk", "dgc", "ef21", "regtopk", "adaptive", "predictive",
               "granular:granularity=auto:policy=bandit:probe_every=3",
               "granular:speculative=True:revert_threshold=0.02:probe_every=3"]
BASE = ["--workload", "digits", "--steps", "12", "--eval-every", "6", "--checkpoint-every", "4",
        "--no-progress", "--timeout", "60"]


def train(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "gradsieve.train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def folder(index, name):
    """A run's checkpoint folder (the run name's ':' become '_')."""
    return f"{index:02d}-{name.replace(':', '_')}"


def finished(root, index, name):
    return torch.load(os.path.join(root, folder(index, name), "done-rank0.pt"), weights_only=False)


@pytest.mark.slow
def test_killed_runs_resume_bit_identical(tmp_path):
    """Each run of the comparison is killed once (rank 1 exits abruptly before step 9; the newest
    checkpoint is after step 8) and resumed by the next invocation with --resume, which also skips
    the runs already finished and starts the next one from scratch, to be killed in turn."""
    compare = ["--compare", ",".join(COMPRESSORS)]
    straight = tmp_path / "straight"
    out = train(*BASE, *compare, "--checkpoint-dir", str(straight), "--out", str(tmp_path / "o1"))
    assert out.returncode == 0, out.stderr[-3000:]

    resumed = tmp_path / "resumed"
    args = [*BASE, *compare, "--checkpoint-dir", str(resumed), "--out", str(tmp_path / "o2"), "--resume"]
    killed = 0
    for _ in range(len(COMPRESSORS) + 1):
        out = train(*args, env={FAULT_ENV: "1:9"})
        if out.returncode == 0:
            break
        assert "a worker exited" in out.stderr and "exit code 17" in out.stderr, out.stderr[-3000:]
        killed += 1
    assert out.returncode == 0 and killed == len(COMPRESSORS), (killed, out.stderr[-3000:])
    assert out.stderr.count("resumed after step 8") == 1  # the last one; the others were done

    for index, name in enumerate(COMPRESSORS):
        a, b = finished(straight, index, name), finished(resumed, index, name)
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)
        assert a["record"]["history"]["loss"] == b["record"]["history"]["loss"], name
        assert a["record"]["wire_bytes_per_step"] == b["record"]["wire_bytes_per_step"], name
        assert [e["loss"] for e in a["record"]["history"]["eval"]] == \
            [e["loss"] for e in b["record"]["history"]["eval"]], name
        # Only the two newest checkpoints of each rank are kept.
        files = sorted(os.listdir(resumed / folder(index, name)))
        assert files == ["done-rank0.pt", "done-rank1.pt", "step-000000004-rank0.pt",
                         "step-000000004-rank1.pt", "step-000000008-rank0.pt",
                         "step-000000008-rank1.pt"], files


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle this on purpose")


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    ck = RunCheckpoints(str(tmp_path), 0, "topk", rank=0)
    ck.save(4, {"step": 4, "weights": torch.arange(1000.0)})
    with pytest.raises(pickle.PicklingError):
        ck.save(8, {"step": 8, "weights": torch.arange(1000.0), "bad": Unpicklable()})
    assert ck.steps() == [4]
    assert sorted(os.listdir(ck.dir)) == ["step-000000004-rank0.pt"]  # no temporary file left
    assert ck.load(ck.path(4))["step"] == 4


def test_a_damaged_checkpoint_is_named(tmp_path):
    ck = RunCheckpoints(str(tmp_path), 0, "topk", rank=0)
    with open(ck.path(4), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"checkpoint .*step-000000004-rank0.pt cannot be read"):
        ck.load(ck.path(4))


def worker_newest_common(rank, world, root):
    ck = RunCheckpoints(root, 0, "topk", rank)
    for step in ([4, 8, 12] if rank == 0 else [4, 10]):
        ck.save(step, {"step": step})
    if rank == 0:
        ck.save_done({"record": None})
    return ck.newest_common(torch.device("cpu")), ck.finished(torch.device("cpu")) is None


@pytest.mark.slow
def test_the_ranks_agree_on_the_newest_step_they_all_have(tmp_path):
    # Two checkpoints are kept per rank: rank 0 keeps 8 and 12, rank 1 keeps 4 and 10, so none is
    # common and the run starts over; rank 0's lone done file does not make the run finished.
    results = run_workers(worker_newest_common, 2, tmp_path, str(tmp_path))
    assert results == [(None, True), (None, True)]


def worker_newest_common_found(rank, world, root):
    ck = RunCheckpoints(root, 0, "topk", rank)
    for step in ([4, 8] if rank == 0 else [8, 10]):
        ck.save(step, {"step": step})
    return ck.newest_common(torch.device("cpu"))


@pytest.mark.slow
def test_the_newest_common_step_is_found_below_the_newest(tmp_path):
    assert run_workers(worker_newest_common_found, 2, tmp_path, str(tmp_path)) == [8, 8]


@pytest.mark.parametrize("args,message", [
    (["--resume"], "--checkpoint-every and --resume need --checkpoint-dir"),
    (["--checkpoint-every", "0", "--checkpoint-dir", "X"], "--checkpoint-every must be >= 1, got 0"),
    (["--compare", "topk,powersgd", "--checkpoint-dir", "X"], "leave powersgd out of a checkpointed run"),
])
def test_bad_checkpoint_arguments_are_named(args, message, capsys, monkeypatch):
    # In this process (argparse's error is SystemExit(2)); arguments that pass would reach launch.
    monkeypatch.setattr(train_cli, "launch", lambda *a, **k: pytest.fail("the arguments were accepted"))
    with pytest.raises(SystemExit) as stop:
        train_cli.main(["--workload", "digits", "--steps", "4", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err


@pytest.mark.slow
def test_resuming_with_other_arguments_fails_clearly(tmp_path):
    ck = str(tmp_path / "ck")
    common = ["--workload", "digits", "--steps", "8", "--checkpoint-every", "4", "--checkpoint-dir", ck,
              "--no-progress", "--out", str(tmp_path / "o")]
    out = train(*common, env={FAULT_ENV: "1:6"})
    assert out.returncode != 0
    out = train(*common, "--resume", "--lr", "0.2")
    assert out.returncode != 0
    assert "was written with lr=0.05, this run has lr=0.2" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_restarts_the_group_which_resumes(tmp_path):
    """torchrun --max-restarts=1: rank 1 dies before step 9 on the first attempt; torchrun restarts
    both workers, which resume after step 8 and end with the uninterrupted run's parameters."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this interpreter")
    args = ["--compare", "topk,adaptive", "--out", str(tmp_path / "o")]
    straight = tmp_path / "straight"
    out = train(*BASE, *args, "--checkpoint-dir", str(straight))
    assert out.returncode == 0, out.stderr[-3000:]
    elastic = tmp_path / "elastic"
    out = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "-m", "gradsieve.train",
         *BASE, *args, "--checkpoint-dir", str(elastic), "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, FAULT_ENV: "1:9"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "exitcode: 17" in out.stderr  # the first attempt did die
    assert out.stderr.count("resumed after step 8") == 1, out.stderr[-3000:]
    for index, name in enumerate(["topk", "adaptive"]):
        a, b = finished(straight, index, name)["model"], finished(elastic, index, name)["model"]
        assert all(torch.equal(a[key], b[key]) for key in a), name

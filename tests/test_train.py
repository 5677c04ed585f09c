"""gradsieve-train: tiny runs of every workload, its outputs, and its errors on bad arguments.

The runs start ``python -m gradsieve.train`` (slow tier); argument errors and the step clock are
checked in this process."""

import csv
import json
import os
import pickle
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gradsieve.train import cli as train_cli
from gradsieve.train import launcher
from gradsieve.train import failures
from gradsieve.train import run as training
from gradsieve.train import workloads
from launching import stop_a_worker

PYTHON = sys.executable


def run_cli(*args, timeout=240):
    return subprocess.run([PYTHON, "-m", "gradsieve.train", *args], capture_output=True, text=True,
                          timeout=timeout)


def fake_cifar(root, per_batch=8):
    """A CIFAR-10 folder in the real pickle format with a few random images per batch."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in workloads.CIFAR_NAMES:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("workload,extra", [
    ("digits", ["--compare", "none,topk,dgc,ef21,regtopk,adaptive,predictive:k_min=0.005:k_max=0.04,"
                "granular:granularity=auto:policy=bandit:probe_every=4,"
                "granular:speculative=true:revert_threshold=0.02,topk:speculative=true:overlap_compress=false",
                "--steps", "12", "--eval-every", "3"]),
    ("charlm", ["--compare", "none,topk,regtopk,adaptive:index=csr16,predictive,granular:granularity=hybrid,"
                "granular:speculative=true",
                "--steps", "4",
                "--batch-size", "4"]),
    ("linreg", ["--compare", "none,topk,ef21,regtopk,adaptive,predictive,granular,granular:speculative=true",
                "--steps", "20",
                "--density", "0.1"]),
    ("cifar10", ["--compare", "topk,regtopk,adaptive,predictive,granular:granularity=layer,"
                 "granular:speculative=true", "--steps", "2",
                 "--batch-size", "4",
                 "--heterogeneous"]),
    ("textcls", ["--compare", "none,torch-fp16,powersgd,topk,adaptive,predictive,granular:granularity=auto,"
                 "granular:granularity=auto:speculative=true",
                 "--steps", "6"]),
])
def test_tiny_run_of_each_workload(tmp_path, workload, extra):
    if workload == "cifar10":
        extra = extra + ["--data-dir", fake_cifar(str(tmp_path / "data"))]
    out = tmp_path / "out"
    result = run_cli("--workload", workload, "--out", str(out), "--no-progress", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compressor" in result.stdout and "bytes/step" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["workload"] == workload and metrics["config"]["world_size"] == 2
    names = [r["compressor"] for r in metrics["runs"]]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["compressor"] for r in rows] == names
    for run in metrics["runs"]:
        assert len(run["history"]["loss"]) == run["steps"]
        assert all(np.isfinite(run["history"]["loss"]))
        assert run["wire_bytes_per_step"] > 0
        if run["compressor"] != "none":
            assert run["compression_ratio"] > 1.5
        if run["compressor"].startswith("predictive"):  # the metric reached the state (adaptive k)
            densities = [e["density"] for e in run["history"]["eval"]]
            assert len(densities) >= 2 and all(0 < d <= 1 for d in densities)
        if run["compressor"] == "granular":  # the probe ran on the clock (after the first step)
            assert run["probes"] >= 1 and 0 < run["probe_share"] < 1
            if "auto" in run["name"]:
                played = run["history"]["eval"][-1]["level_steps"]
                assert sum(played.values()) == run["steps"] - 1  # every compressed step
        if "speculative=True" in run["name"]:
            # Every step reached the global weights (the last evaluation waited for the last
            # exchange); corrections after every compressed step but the first.
            spec = run["speculative"]
            assert spec["global_steps"] == run["steps"] and spec["global_skipped"] == 0
            assert spec["corrections"] == run["steps"] - 2
            assert 0 <= spec["max_drift"] <= spec["revert_threshold"]
            assert spec["overlap_compress"] is ("overlap_compress=False" not in run["name"])
            assert spec["rolled_back"] == 0
        else:
            assert run["speculative"] is None
    for png in ("loss_vs_step.png", "loss_vs_bytes.png", "metric_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_torch_baselines_and_variants_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = run_cli("--compare", "none,torch-fp16,torch-bf16,powersgd:start_iter=3:rank=2,topk,topk:values=int8",
                     "--steps", "8", "--eval-every", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["name"]: r for r in json.loads((out / "metrics.json").read_text())["runs"]}
    assert list(runs) == ["none", "torch-fp16", "torch-bf16", "powersgd:start_iter=3:rank=2", "topk",
                          "topk:values=int8"]
    assert [runs[n]["source"] for n in runs] == ["torch", "torch", "torch", "torch", "gradsieve", "gradsieve"]
    # DDP's default and torch's fp16 and bf16 hooks: fp32 and half the bytes, every step.
    assert runs["none"]["compression_ratio"] == 1.0
    assert runs["torch-fp16"]["compression_ratio"] == 2.0 and runs["torch-bf16"]["compression_ratio"] == 2.0
    # bf16 keeps 8 bits of mantissa, fp16 11: the two casts train differently from fp32 and each other.
    losses = {n: runs[n]["history"]["loss"] for n in ("none", "torch-fp16", "torch-bf16")}
    assert losses["torch-bf16"] != losses["torch-fp16"] and losses["torch-bf16"] != losses["none"]
    # PowerSGD: 3 dense steps, then rank-2 factors (and the uncompressed biases) only.
    power = runs["powersgd:start_iter=3:rank=2"]
    dense = runs["none"]["wire_bytes_per_step"]
    assert 3 * dense / 8 < power["wire_bytes_per_step"] < 0.5 * dense
    assert runs["topk:values=int8"]["wire_bytes_per_step"] < runs["topk"]["wire_bytes_per_step"]
    for run in runs.values():
        assert [e["step"] for e in run["history"]["eval"]] == [0, 4, 8]
        # The clock: an evaluation's ``seconds`` is the training time of the steps before it, the
        # sum of their recorded step times (evaluations are off the clock); the run's total too.
        step_s = run["history"]["step_s"]
        assert len(step_s) == run["steps"] and all(s > 0 for s in step_s)
        for point in run["history"]["eval"]:
            assert point["seconds"] == pytest.approx(sum(step_s[:point["step"]]), rel=1e-9, abs=0), point
        assert run["train_seconds"] == pytest.approx(sum(step_s), rel=1e-9)
        assert run["step_speedup"] is not None
    # Progress off a terminal: lines, not carriage-return frames; no leaked semaphore at exit.
    assert "\r" not in result.stderr
    assert "none: step 8/8" in result.stderr
    assert "leaked semaphore" not in result.stderr
    assert "to target" in result.stdout


@pytest.mark.slow
def test_same_seed_same_numbers_and_dense_baseline_first(tmp_path):
    args = ["--compare", "none,topk", "--steps", "15", "--no-progress", "--seed", "3"]
    first = run_cli(*args, "--out", str(tmp_path / "a"))
    second = run_cli(*args, "--out", str(tmp_path / "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:]
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["runs"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["runs"]
    assert [r["history"]["loss"] for r in a] == [r["history"]["loss"] for r in b]
    # The dense run sends fp32 every step: its ratio is exactly 1.
    assert a[0]["compressor"] == "none" and a[0]["compression_ratio"] == 1.0


@pytest.fixture
def no_launch(monkeypatch):
    """gradsieve-train's main without workers: arguments that get as far as a launch fail the test."""
    def launch(*args, **kwargs):
        raise AssertionError("the arguments were accepted: the run would have started")

    monkeypatch.setattr(train_cli, "launch", launch)


@pytest.mark.parametrize("args,message", [
    (["--compressor", "tpok"], "unknown compressor 'tpok'"),
    (["--density", "0"], "density must be in (0, 1]"),
    (["--opt", "values=int3"], "values must be one of"),
    (["--opt", "nonsense"], "--opt must be KEY=VALUE"),
    (["--opt", "colour=red"], "colour are not accepted by any of topk"),
    (["--compare", "none,none"], "names a compressor twice"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "5", "--epochs", "1"], "give --steps or --epochs"),
    (["--workload", "mnist"], "invalid choice: 'mnist'"),
    (["--workload", "cifar10"], "cifar10 needs --data-dir"),
    (["--workload", "cifar10", "--data-dir", "/nonexistent"], "no CIFAR-10 under '/nonexistent'"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--target", "accuracy=90"], "--target accuracy must be a fraction"),
    (["--target", "f1=0.5"], "--target must be accuracy=VALUE or loss=VALUE"),
    (["--link", "100mbps"], "--link must be RATE[,delay=D]"),
    (["--model-size", "huge", "--workload", "charlm"], "charlm: unknown model size 'huge'; sizes: tiny"),
    (["--model-size", "base"], "digits has one model and takes no model size"),
    (["--compare", "topk:colour=red"], "topk has no option colour"),
    (["--compare", "powersgd", "--opt", "rank=0"], "rank must be an integer >= 1"),
    (["--compare", "powersgd:start_iter=1"], "start_iter must be an integer >= 2"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--timeout", "0"], "--timeout must be a number of seconds > 0, got 0.0"),
    (["--opt", "density=0.1"], "not with --opt"),
    (["--compare", "ef21", "--opt", "speculative=true"], "speculative are not accepted by any of ef21"),
    (["--compare", "none:speculative=true"], "none has no option speculative"),
    (["--compare", "granular:speculative=true:revert_threshold=-1"],
     "revert_threshold must be a finite number >= 0, got -1.0"),
    (["--compare", "granular:speculative=true:overlap_compress=maybe"],
     "overlap_compress must be one of ['auto', True, False], got 'maybe'"),
    (["--compare", "regtopk:speculative=true:overlap_compress=true"],
     "regtopk: overlap_compress=true needs a compressor whose memory does not depend on the average"),
    (["--compare", "topk:density=2"], "density must be in (0, 1], got 2.0"),
])
def test_bad_arguments_give_one_line_error(args, message, capsys, no_launch):
    # In this process: argparse's error is SystemExit(2) with the line on stderr; any other
    # exception fails the test with its traceback, and arguments that pass reach no_launch.
    with pytest.raises(SystemExit) as stop:
        train_cli.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradsieve-train: error:"), err
    assert message in lines[0]


@pytest.mark.slow
def test_the_command_exits_2_with_one_line_and_no_traceback():
    """The real interpreter and entry point: exit status 2, one line on stderr (nothing else
    printed on the way, no traceback)."""
    result = run_cli("--compressor", "tpok", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradsieve-train: error:"), result.stderr
    assert "unknown compressor 'tpok'" in lines[0]




@pytest.mark.slow
def test_a_stopped_worker_fails_the_run_with_the_timeout(tmp_path):
    """SIGSTOP (not kill) one worker in the training loop: its socket stays open, so only the
    process-group timeout can end the others' wait. The run must fail with a line that says so.

    No wall-clock window here: the stop waits for an event (both ranks have saved a checkpoint
    after a compressed step, so both are in the loop), not for a fixed sleep that a loaded
    machine can outlast; how soon after the stop the run fails (4 to 25 s) is
    ``benchmarks/check_timing.py --only stopped_worker``'s, on a quiet machine."""
    returncode, err, _ = stop_a_worker(str(tmp_path))
    assert returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("gradsieve-train: error: a worker failed:"), err[-2000:]
    assert "a peer stopped answering: no reply within --timeout 4 s" in lines[-1]
    assert "Traceback" not in err


def test_plan_runs_routes_options_and_dgc_momentum():
    args = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--compare", "none,topk,dgc", "--opt", "values=int8", "--density", "0.05"]))
    runs = {r.compressor: r.options for r in train_cli.plan_runs(args)}
    assert runs["none"] == {}
    assert runs["topk"] == {"values": "int8", "density": 0.05}
    # SGD momentum moves into dgc's momentum correction; the optimizer then runs without it.
    assert runs["dgc"] == {"values": "int8", "density": 0.05, "momentum": 0.9}
    spec = train_cli.RunSpec("dgc", runs["dgc"])
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert training._optimizer(args, spec, params).param_groups[0]["momentum"] == 0.0
    # With Adam (its own moments) dgc runs without momentum correction, unless asked for.
    adam = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--workload", "textcls", "--compare", "dgc,topk"]))
    assert adam.optimizer == "adam"
    assert train_cli.plan_runs(adam)[0].options["momentum"] == 0.0
    asked = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--workload", "textcls", "--compare", "dgc:momentum=0.5"]))
    assert train_cli.plan_runs(asked)[0].options["momentum"] == 0.5
    # A variant's own density (same-bytes comparisons) wins over --density.
    own = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--compare", "topk:density=0.02:values=int8,adaptive", "--density", "0.01"]))
    assert [r.options["density"] for r in train_cli.plan_runs(own)] == [0.02, 0.01]


def test_heterogeneous_digits_shards_are_skewed():
    even = [workloads.make_workload("digits", r, 2, 0) for r in range(2)]
    skewed = [workloads.make_workload("digits", r, 2, 0, heterogeneous=True) for r in range(2)]
    for w in even:
        assert 0.4 < float((w.y % 2 == 0).float().mean()) < 0.6
    # Rank 0 holds mostly even digits, rank 1 mostly odd ones.
    assert float((skewed[0].y % 2 == 0).float().mean()) > 0.75
    assert float((skewed[1].y % 2 == 1).float().mean()) > 0.75
    assert len(skewed[0].y) == len(skewed[1].y)


@pytest.fixture
def one_rank_group():
    """A one-rank gloo group in this process, for calling a run's loop directly."""
    assert not dist.is_initialized(), "a process group of another test is still alive"
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_clock_counts_training_steps_and_not_evaluations(monkeypatch, one_rank_group):
    """The step clock on a fake perf_counter: each step's training work advances it 1 s (in
    drawing the batch), each evaluation 1000 s. A step's time is then exactly 1 s and an
    evaluation's ``seconds`` the number of steps before it: nothing of the evaluations is on the
    clock, and no wall-clock time is read."""
    now = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    args = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--workload", "linreg", "--compare", "topk", "--steps", "6", "--eval-every", "2", "--no-progress"]))
    spec = train_cli.plan_runs(args)[0]
    workload = workloads.make_workload("linreg", 0, 1, 0)
    draw, evaluate = workload.batch, workload.evaluate

    def timed_draw(*a, **k):
        now[0] += 1.0
        return draw(*a, **k)

    def timed_evaluate(*a, **k):
        now[0] += 1000.0
        return evaluate(*a, **k)

    monkeypatch.setattr(workload, "batch", timed_draw)
    monkeypatch.setattr(workload, "evaluate", timed_evaluate)
    record = training.train_one(args, spec, workload, 0, 1, torch.device("cpu"))
    assert record["history"]["step_s"] == [1.0] * 6
    assert [(e["step"], e["seconds"]) for e in record["history"]["eval"]] == [(0, 0.0), (2, 2.0), (4, 4.0), (6, 6.0)]
    assert record["train_seconds"] == 6.0 and record["time_per_step_s"] == 1.0
    assert now[0] == 6 + 4 * 1000.0  # every step drew one batch, every evaluation ran


# ------------------------------------------------------------------------ arguments across nodes
def start_node(rank, world, port, folder, *argv):
    """``python -m gradsieve.train`` as torchrun starts one rank of a node of one rank (the
    environment torchrun gives, no agent)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "GRADSIEVE_"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([PYTHON, "-m", "gradsieve.train", "--workload", "digits", "--compare", "topk",
                             "--no-progress", "--out", os.path.join(folder, f"out{rank}"), *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("option,values", [("--steps", ("20", "30")), ("--warmup-steps", ("1", "3"))])
def test_nodes_started_with_different_arguments_fail_at_once_naming_them(tmp_path, option, values):
    """Two nodes of one rank each, started (as torchrun would) with different ``option``: both
    fail before training, exit 2, and say which option differs and its value on each rank; no
    traceback, no broken connection, no wait for --timeout (600 s here; the hang guard is 240 s).
    Each node may give its own --out and --timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.monotonic()
    nodes = [start_node(rank, 2, port, str(tmp_path), option, value, "--timeout", str(600 + rank))
             for rank, value in enumerate(values)]
    try:
        done = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    seconds = time.monotonic() - began
    for node, (_, err) in zip(nodes, done):
        assert node.returncode == 2, err[-3000:]
        lines = err.strip().splitlines()
        assert lines[0] == "gradsieve-train: error: the nodes were started with different arguments:", err
        assert lines[1] == f"  {option}: rank 0: {values[0]}; rank 1: {values[1]}", err
        assert len(lines) == 3 and "start every node with the same arguments" in lines[2], err
        assert "--out" in lines[2] and "--timeout" in lines[2]
        assert "Traceback" not in err and "peer" not in err and "Connection" not in err
    assert seconds < 240, seconds


def test_the_compared_arguments_leave_out_only_what_a_node_may_choose():
    args = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--compare", "none,topk:values=int8,dgc", "--opt", "momentum=0.5", "--steps", "20", "--out", "/x",
         "--timeout", "9", "--checkpoint-dir", "/ck", "--checkpoint-every", "5"]))
    mine = launcher.agreed_arguments(args, train_cli.plan_runs(args))
    assert mine["--steps"] == 20 and mine["--warmup-steps"] == 1 and mine["--checkpoint-every"] == 5
    assert mine["--compare"] == ["none", "topk:values=int8", "dgc"] and mine["--opt"] == {"momentum": "0.5"}
    assert mine["--target"] == "accuracy=0.97" and mine["--workload"] == "digits"
    for per_node in ("--out", "--timeout", "--checkpoint-dir", "--data-dir", "--no-progress", "--nproc"):
        assert per_node not in mine
    # Every other option of the command is compared (a new option is too, unless listed per node).
    options = {a.option_strings[0] for a in train_cli.build_parser()._actions if a.option_strings}
    assert options - set(mine) == {"-h", "--compressor", "--out", "--timeout", "--checkpoint-dir", "--data-dir",
                                   "--no-progress", "--nproc", "--nodes", "--link"}
    # --compressor and --compare naming the same run agree.
    single = train_cli.resolve_args(train_cli.build_parser().parse_args(["--compressor", "topk"]))
    listed = train_cli.resolve_args(train_cli.build_parser().parse_args(["--compare", "topk"]))
    assert (launcher.agreed_arguments(single, train_cli.plan_runs(single))
            == launcher.agreed_arguments(listed, train_cli.plan_runs(listed)))


def test_the_failure_line_of_a_node_is_gradsieve_trains_own_report():
    """An emulated node's output: the worker's report, then torchrun's; the launcher's failure line
    is the report with its indented lines, not torchrun's ChildFailedError."""
    output = "\n".join([
        "gradsieve-train: error: the nodes were started with different arguments:",
        "  --steps: ranks 0,1: 20; ranks 2,3: 30",
        "  start every node with the same arguments (only --out may differ)",
        "[2026-01-01 00:00:00] torch.distributed.elastic.multiprocessing.api: [ERROR] failed (exitcode: 2)",
        "Traceback (most recent call last):",
        '  File "run.py", line 1, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "  time      : 2026-01-01_00:00:00",
    ])
    assert failures.error_line(output) == "\n".join([
        "the nodes were started with different arguments:", "  --steps: ranks 0,1: 20; ranks 2,3: 30",
        "  start every node with the same arguments (only --out may differ)"])
    # Without a report of its own: the last error line of the traceback, as before.
    assert failures.error_line("Traceback:\n  File x\nValueError: bad\n") == "ValueError: bad"


def test_torch_baselines_are_accepted_by_compare_and_listed_in_help(capsys):
    args = train_cli.resolve_args(train_cli.build_parser().parse_args(
        ["--compare", "none,torch-fp16,torch-bf16,powersgd,topk"]))
    runs = train_cli.plan_runs(args)
    assert [(r.name, r.from_torch) for r in runs] == [
        ("none", True), ("torch-fp16", True), ("torch-bf16", True), ("powersgd r1", True), ("topk", False)]
    assert runs[2].options == {}
    with pytest.raises(SystemExit):
        train_cli.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--compare COMPARE comma")  # the option's help, not the usage line
    compare = text[start:text.index("--density", start)]
    for name in ("none", "torch-fp16", "torch-bf16", "powersgd"):
        assert name in compare, compare

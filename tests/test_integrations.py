"""gradsieve's hook in Lightning, Accelerate and the Transformers Trainer (gradsieve.integrations),
each in a user-style script on 2 CPU processes (gloo; tests/integrations/), one launch per
framework: the hook compresses (bytes on the wire, at the ratio the density implies), statistics
are logged (Lightning), and every rank gets its own compressor memory back from the framework's
checkpoint. Plus: ``import gradsieve`` needs none of the frameworks, and bad input gets clear errors.
The framework tests skip when the framework is not installed (the ``integrations`` extra)."""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

import gradsieve
from gradsieve.integrations import ALL_RANKS_FORMAT, rank_state

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "integrations")
ROOT = os.path.dirname(HERE)
DENSITY = 0.05  # the scripts' density
STEPS = 6  # the scripts' first run: 1 dense warm-up step, then 5 compressed
# topk sends fp32 values and int32 indices, 8 bytes per entry, where the dense all-reduce sends 4:
# a compressed step carries about 1 / (2 density) times fewer bytes (plus a small header).
EXPECTED_RATIO = 1 / (2 * DENSITY)


# With torch 2.13 on CPU, a gloo process sometimes aborts at exit with this message after its work
# is done, with or without gradsieve (docs/integrations.md, "Ending a run": the scripts free what
# holds the process group first, which made it rare, not impossible).
ABORT_AT_EXIT = "terminate called without an active exception"


def launch(cmd, cwd, extra_env=None, fresh=None):
    """Runs ``cmd``; fails the test unless it exits with 0. A launch that failed only by aborting
    at exit (ABORT_AT_EXIT) is run once more, with a warning, after emptying the folder ``fresh``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for attempt in (1, 2):
        # A session of its own, so that a launch that hangs can be ended with its processes: SIGTERM
        # first (torchrun's agent ends its workers, which run in sessions of their own), then SIGKILL.
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(cmd)} did not end in 300 s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
        done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        if done.returncode == 0:
            return done
        output = done.stdout + done.stderr
        if attempt == 1 and ABORT_AT_EXIT in output and "Traceback" not in output.split(ABORT_AT_EXIT)[0]:
            warnings.warn(f"{' '.join(cmd[-2:])}: a process aborted at exit ({ABORT_AT_EXIT!r}); running the "
                          f"launch once more")
            for child in (fresh.iterdir() if fresh is not None else ()):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            continue
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path):
    return torch.load(path, weights_only=False)


def check_compressed(stats):
    """The hook ran every step and compressed all but the warm-up step, at the expected ratio."""
    assert stats["steps"] == STEPS, stats
    assert stats["compressed_steps"] == STEPS - 1 and stats["skipped_steps"] == 0, stats
    assert stats["wire_bytes"] > 0, stats
    dense_step = stats["dense_bytes"] / STEPS
    compressed_step = (stats["wire_bytes"] - dense_step) / stats["compressed_steps"]  # step 0 was dense
    assert 0.9 * EXPECTED_RATIO <= dense_step / compressed_step <= 1.05 * EXPECTED_RATIO, (dense_step, compressed_step)
    assert stats["compression_ratio"] == pytest.approx(stats["dense_bytes"] / stats["wire_bytes"])


def params_memory(state_dict):
    return state_dict["memory"]["params"]


def same_memory(a, b):
    a, b = params_memory(a), params_memory(b)
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
                                        for k in a)


def check_each_rank_got_its_own(saved, restored):
    """``saved[r]``, ``restored[r]``: rank r's state dictionary when saved and after restoring."""
    assert not same_memory(saved[0], saved[1]), "the ranks' memories should differ (different data)"
    for rank in (0, 1):
        assert params_memory(saved[rank]), "no memory was saved"
        assert same_memory(restored[rank], saved[rank]), f"rank {rank} did not get its own memory back"
        assert restored[rank]["step"] == saved[rank]["step"] == STEPS


# ------------------------------------------------------------------------------------ no framework
BLOCKED_IMPORTS = textwrap.dedent("""
    import importlib, importlib.abc, importlib.machinery, sys

    BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "accelerate", "transformers")

    class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked by the test)")

        def exec_module(self, module):
            raise ModuleNotFoundError(f"No module named {module.__name__!r} (blocked by the test)")

    sys.meta_path.insert(0, Block())
    import gradsieve
    assert not [m for m in sys.modules if m.startswith("gradsieve.integrations")], "import gradsieve imported them"
    import gradsieve.integrations
    for module, package in (("lightning", "lightning"), ("accelerate", "accelerate"), ("transformers", "transformers")):
        try:
            importlib.import_module("gradsieve.integrations." + module)
        except ImportError as error:
            assert f"needs the {package!r} package" in str(error) and f"pip install {package}" in str(error), error
        else:
            raise AssertionError(module + " imported without its framework")
    print("no framework: ok")
""")


def test_gradsieve_imports_without_the_frameworks():
    done = launch([sys.executable, "-c", BLOCKED_IMPORTS], ROOT)
    assert "no framework: ok" in done.stdout


def test_rank_state_refuses_another_world_size_and_unsafe_content():
    state = gradsieve.CompressionState("topk", density=DENSITY)
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    entry = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    # No process group here: a world of one rank.
    assert rank_state({"format": ALL_RANKS_FORMAT, "world_size": 1, "ranks": [entry]}, "t")["step"] == 0
    with pytest.raises(ValueError, match="holds the hook states of 2 ranks, this run has 1"):
        rank_state({"format": ALL_RANKS_FORMAT, "world_size": 2, "ranks": [entry, entry]}, "t")
    with pytest.raises(ValueError, match="expected the hook states of every rank"):
        rank_state({"memory": {}}, "t")
    # An object that only a full unpickler would build is refused, not built.
    unsafe = io.BytesIO()
    torch.save({"state": types.SimpleNamespace(a=1)}, unsafe)
    bad = torch.frombuffer(bytearray(unsafe.getvalue()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="weights_only=True"):
        rank_state({"format": ALL_RANKS_FORMAT, "world_size": 1, "ranks": [bad]}, "t")


# ------------------------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("lightning")
    # Lightning's "ddp" strategy starts rank 1 by running the script again.
    launch([sys.executable, os.path.join(SCRIPTS, "lightning_train.py"), str(out)], str(out), fresh=out)
    return out, [load(out / f"saved-rank{r}.pt") for r in (0, 1)], [load(out / f"resumed-rank{r}.pt") for r in (0, 1)]


def test_lightning_callback_compresses_on_cpu(lightning_run):
    # DDPStrategy(ddp_comm_hook=...) registers nothing on CPU; the callback does.
    _, saved, _ = lightning_run
    for rank in (0, 1):
        check_compressed(saved[rank]["stats"])


def test_lightning_callback_logs_the_statistics(lightning_run):
    import csv

    out, saved, _ = lightning_run
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == list(range(STEPS))
    last = rows[-1]
    stats = saved[0]["stats"]  # the logger writes rank 0's numbers
    assert float(last["gradsieve/wire_bytes"]) == stats["wire_bytes"] > 0
    assert float(last["gradsieve/compressed_steps"]) == stats["compressed_steps"]
    assert float(last["gradsieve/skipped_steps"]) == 0
    assert float(last["gradsieve/compression_ratio"]) == pytest.approx(stats["compression_ratio"], rel=1e-6)
    assert float(rows[0]["gradsieve/compression_ratio"]) == pytest.approx(1.0)  # the dense warm-up step


def test_lightning_checkpoint_gives_each_rank_its_own_memory(lightning_run):
    out, saved, resumed = lightning_run
    check_each_rank_got_its_own([s["state"] for s in saved], [r["at_start"] for r in resumed])
    # The checkpoint Lightning wrote from rank 0 holds both ranks' states and loads with weights_only.
    entry = torch.load(out / "run.ckpt", weights_only=True)["callbacks"]["GradsieveCallback"]
    assert entry["format"] == ALL_RANKS_FORMAT and entry["world_size"] == 2 and len(entry["ranks"]) == 2
    for rank in (0, 1):  # the resumed fit went on compressing, from the restored counters
        assert resumed[rank]["stats"]["compressed_steps"] == STEPS - 1 + 3


def test_lightning_callback_rejects_bad_input():
    pytest.importorskip("lightning")
    from gradsieve.integrations.lightning import GradsieveCallback

    with pytest.raises(TypeError, match="state must be a gradsieve.CompressionState or a function"):
        GradsieveCallback("topk")
    with pytest.raises(TypeError, match="log must be a sequence"):
        GradsieveCallback(gradsieve.CompressionState("topk", density=DENSITY), log="wire_bytes")
    callback = GradsieveCallback(gradsieve.CompressionState("topk", density=DENSITY))
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="did not wrap the model in DistributedDataParallel"):
        callback.on_fit_start(trainer, None)
    made = GradsieveCallback(lambda: "not a state")
    with pytest.raises(TypeError, match="the state function's result"):
        made.setup(trainer, None, "fit")


# ------------------------------------------------------------------------------------ Accelerate
@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("accelerate")
    # The command docs/integrations.md gives for CPU: `accelerate launch --cpu` would start one process.
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()),
            os.path.join(SCRIPTS, "accelerate_train.py"), str(out)], str(out), {"ACCELERATE_USE_CPU": "1"},
           fresh=out)
    return [load(out / f"rank{r}.pt") for r in (0, 1)]


def test_accelerate_register_compresses_on_two_cpu_processes(accelerate_run):
    for result in accelerate_run:
        assert result["world"] == 2 and result["type"].endswith("MULTI_CPU")
        check_compressed(result["saved_stats"])
        assert result["stats"]["compressed_steps"] == STEPS - 1 + 1  # restored counters, then one more step
        assert result["again"], "registering the same state again returns the DDP module"


def test_accelerate_register_explains_a_model_that_is_not_ddp(accelerate_run):
    for result in accelerate_run:
        assert "Sequential, not the DistributedDataParallel module" in result["unprepared_error"]
        assert "pass the model that accelerator.prepare returned" in result["unprepared_error"]
        assert "already has gradsieve's hook with another CompressionState" in result["second_hook_error"]


def test_accelerate_save_and_load_state_give_each_rank_its_own_memory(accelerate_run):
    check_each_rank_got_its_own([r["saved"] for r in accelerate_run], [r["loaded"] for r in accelerate_run])


ACCELERATE_ALONE = textwrap.dedent("""
    import json, os, sys, torch, gradsieve
    from accelerate import Accelerator
    from gradsieve.integrations.accelerate import register

    accelerator = Accelerator()  # without GPUs and without cpu=True
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    state = gradsieve.CompressionState("topk", density=0.1)
    found = {"type": str(accelerator.distributed_type), "model": type(model).__name__, "error": None}
    try:
        register(accelerator, model, state)
    except ValueError as error:
        found["error"] = str(error)
    try:
        register("an accelerator", model, state)
    except TypeError as error:
        found["type_error"] = str(error)
    with open(os.path.join(sys.argv[1], "rank" + os.environ.get("RANK", "0") + ".json"), "w") as f:
        json.dump(found, f)
""")


def test_accelerate_register_explains_a_process_that_trains_alone(tmp_path):
    import json

    pytest.importorskip("accelerate")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without GPUs")
    script = tmp_path / "alone.py"
    script.write_text(ACCELERATE_ALONE)
    env = {"ACCELERATE_USE_CPU": "0"}
    # Under torchrun without ACCELERATE_USE_CPU: with accelerate 1.16 each of the 2 processes trains
    # alone, unwrapped (accelerate 1.0 wrapped the model in DDP here, and register takes it).
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
            str(tmp_path)], str(tmp_path), env)
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        if found["model"] == "DistributedDataParallel":
            assert found["error"] is None, found
        else:
            assert found["type"].endswith(".NO"), found
            assert "distributed type is NO" in found["error"] and "one of 2 processes" in found["error"], found
            assert "ACCELERATE_USE_CPU=1" in found["error"], found
        assert "accelerator must be an accelerate.Accelerator, got str" in found["type_error"]
    # One process (as `accelerate launch --cpu --num_processes 2` starts).
    launch([sys.executable, str(script), str(tmp_path)], str(tmp_path), env)
    found = json.loads((tmp_path / "rank0.json").read_text())
    assert found["model"] == "Linear" and "one process trains alone" in found["error"], found
    assert "accelerate launch --cpu" in found["error"], found


# ------------------------------------------------------------------------------------ Trainer
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    out = tmp_path_factory.mktemp("trainer")
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            os.path.join(SCRIPTS, "transformers_train.py"), str(out)], str(out), fresh=out)
    return out, [load(out / f"saved-rank{r}.pt") for r in (0, 1)], [load(out / f"resumed-rank{r}.pt") for r in (0, 1)]


def test_trainer_callback_registers_before_the_first_backward(trainer_run):
    _, saved, _ = trainer_run
    for result in saved:
        assert result["world"] == 2 and result["global_step"] == STEPS
        check_compressed(result["stats"])  # steps == STEPS: the hook saw every optimizer step


def test_trainer_checkpoints_give_each_rank_its_own_memory(trainer_run):
    out, saved, resumed = trainer_run
    folder = out / "run" / f"checkpoint-{STEPS}"
    for rank in (0, 1):
        assert resumed[rank]["loaded_from"] == str(folder / f"gradsieve_rank{rank}.pt")
        record = torch.load(folder / f"gradsieve_rank{rank}.pt", weights_only=True)
        assert record["rank"] == rank and record["world_size"] == 2 and record["global_step"] == STEPS
    check_each_rank_got_its_own([s["state"] for s in saved], [r["at_begin"] for r in resumed])
    for result in resumed:
        assert result["global_step"] == STEPS + 3
        assert result["stats"]["compressed_steps"] == STEPS - 1 + 3

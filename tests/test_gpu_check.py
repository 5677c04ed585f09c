"""scripts/gpu_check.sh, the one command of a lent GPU machine, kept from rotting between GPUs:
its dry run on this machine (no GPU needed) must pass, report every stage, end with its summary and
leave at most eight well-named files; its drivers (scripts/cuda_op_driver.py,
benchmarks/bench_ops.py, benchmarks/bench_hook.py) run there in their CPU modes. Also: the target
logic of bench_ops.py, a failing stage failing the script, and the op driver catching a wrong result.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

import gradsieve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ("build", "pytest", "sanitizer", "bench", "hook")
CUDA_STAGES = ("sanitizer", "bench", "hook")
DRIVER_GROUPS = ("topk_abs", "quantile_abs", "ef_topk_", "regtopk_select_", "threshold_select",
                 "quantize_int8", "sparse_accumulate_", "non-contiguous", "adaptive_select",
                 "csr16_indices", "predictive_score", "influence_update", "segment_mean", "hostile",
                 "large")
HOOK_METHODS = ("backward", "allreduce", "fp16", "powerSGD r1", "powerSGD r4", "topk", "topk int8")
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def load(path, name):
    """A script of the repository as a module (benchmarks/ and scripts/ are no packages)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(out, *stages, python=sys.executable, timeout=240):
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPU_CHECK_")}
    env.update(GPU_CHECK_DRY_RUN="1", OUT=str(out), PYTHON=python)
    return subprocess.run(["bash", SCRIPT, *stages], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tail(result, lines=40):
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The whole script as a dry run, OUT in a fresh folder: (CompletedProcess, OUT)."""
    out = tmp_path_factory.mktemp("gpu_check_out")
    return run_script(out), out


# =============================================================================== the dry run
@pytest.mark.slow
def test_dry_run_passes(dry_run):
    result, _ = dry_run
    assert result.returncode == 0, tail(result)


@pytest.mark.slow
def test_every_stage_reports(dry_run):
    result, _ = dry_run
    for stage in STAGES:
        verdict = "skipped: needs CUDA" if stage in CUDA_STAGES else "passed: dry run"
        assert f"gpu_check: {stage}: {verdict}" in result.stdout, tail(result)


@pytest.mark.slow
def test_summary_comes_last(dry_run):
    result, out = dry_run
    lines = result.stdout.rstrip("\n").splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("gpu_check: == summary:"))
    last_stage_line = max(i for i, line in enumerate(lines)
                          if re.match(r"gpu_check: (build|pytest|sanitizer|bench|hook): ", line))
    assert last_stage_line < header
    summary = lines[header:]
    table = summary.index(next(line for line in summary if line.startswith("stage ")))
    assert [line.split()[0] for line in summary[table + 1:table + 6]] == list(STAGES)
    assert any(line.startswith("device op") for line in summary[:table]), "the bench_ops table"
    assert any(line.startswith("method ") for line in summary[:table]), "the bench_hook table"
    assert lines[-1] == ("gpu_check: stages: 2 passed, 0 failed, 3 skipped of 5 "
                         "(dry run: GPU_CHECK_DRY_RUN=1); exit 0"), tail(result)
    assert lines[-2].startswith(f"gpu_check: files in {out}")


@pytest.mark.slow
def test_out_holds_at_most_eight_well_named_files(dry_run):
    _, out = dry_run
    files = []
    for folder, dirs, names in os.walk(out):
        relative = os.path.relpath(folder, out)
        depth = 0 if relative == "." else len(relative.split(os.sep))
        assert depth <= 2, f"{relative} is more than 2 folders down"
        for name in dirs + names:
            assert NAME.match(name), f"name {name!r} has characters the device tool does not return"
        files += [os.path.normpath(os.path.join(relative, name)) for name in names]
    assert len(files) <= 8, files
    assert set(files) >= {"build.log", "pytest.log", "sanitizer.log", "bench_ops.log", "bench_ops.json",
                          "bench_hook.log", "bench_hook.json"}, files


@pytest.mark.slow
def test_op_driver_ran_every_group_on_cpu(dry_run):
    _, out = dry_run
    log = (out / "sanitizer.log").read_text()
    for group in DRIVER_GROUPS:
        assert re.search(rf"^{re.escape(group)} +cpu +ok \d+ cases", log, re.M), f"{group}:\n{log}"
    assert re.search(r"^cuda_op_driver: \d+ passed, 0 failed$", log, re.M), log


@pytest.mark.slow
def test_bench_ops_ran_with_sparse_accumulate_and_targets(dry_run):
    _, out = dry_run
    result = json.loads((out / "bench_ops.json").read_text())
    rows = result["rows"]
    ops = {row["op"] for row in rows}
    assert ops == {"topk_abs", "quantile_abs", "ef_topk_", "regtopk_select_", "quantize_int8",
                   "sparse_accumulate_", "adaptive_select", "csr16_pack", "csr16_decode",
                   "local_pack", "local_decode", "int4l_pack", "int4l_decode",
                   "predictive_score", "influence_update", "segment_mean"}
    sparse = [row for row in rows if row["op"] == "sparse_accumulate_"]
    assert [row["density"] for row in sparse] == [0.001, 0.01]
    assert all(row["baseline"] == "index_add_" and row["n"] == 4096 and row["gradsieve_ms"] > 0
               for row in sparse)
    # Every kernel op has CUDA targets; the wire rows compare two wire formats and have none.
    wire_rows = {f"{wire}_{step}" for wire in ("csr16", "local", "int4l") for step in ("pack", "decode")}
    assert set(result["machine"]["targets"]) == ops - wire_rows
    assert all("met" not in row for row in rows), "targets are for CUDA rows only"


@pytest.mark.slow
def test_bench_hook_ran_every_method_on_cpu(dry_run):
    _, out = dry_run
    result = json.loads((out / "bench_hook.json").read_text())
    assert result["config"]["backend"] == "gloo" and result["config"]["device"] == "cpu"
    rows = result["rows"]
    assert [row.get("error") for row in rows] == [None] * len(rows)
    assert {row["method"] for row in rows} == set(HOOK_METHODS)
    by_method = {(row["method"], row["density"]): row for row in rows}
    numel = rows[0]["parameters"]
    assert by_method[("allreduce", None)]["wire_bytes_per_step"] == 4 * numel
    assert by_method[("fp16", None)]["wire_bytes_per_step"] == 2 * numel
    for density in (0.001, 0.01):
        topk = by_method[("topk", density)]
        # k = ceil(density * numel) indices and values of 4 bytes each, plus the packet headers.
        assert 8 * density * numel <= topk["wire_bytes_per_step"] < 8 * density * numel + 1024
        assert by_method[("topk int8", density)]["wire_bytes_per_step"] < topk["wire_bytes_per_step"]
    assert 0 < by_method[("powerSGD r1", None)]["wire_bytes_per_step"] \
        < by_method[("powerSGD r4", None)]["wire_bytes_per_step"] < 4 * numel
    assert all(row["grads_finite"] and row["backward_ms"] > 0 for row in rows)


@pytest.mark.slow
def test_bench_hook_two_gloo_ranks(tmp_path):
    """bench_hook.py --world 2 --quick: two gloo ranks, the extra methods, the floor and x floor."""
    result = subprocess.run([sys.executable, "benchmarks/bench_hook.py", "--device", "cpu", "--world", "2",
                             "--quick", "--gradient-only", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, tail(result)
    saved = json.loads((tmp_path / "bench_hook.json").read_text())
    assert saved["config"]["world"] == 2 and saved["config"]["gradient_only"]
    assert saved["machine"]["cpu_threads"] == 1 and saved["floor_ms"] > 0
    rows = {(row["method"], row["density"]): row for row in saved["rows"]}
    assert set(rows) >= {("bf16", None), ("dgc", 0.01), ("ef21", 0.01), ("regtopk", 0.01), ("topk", 0.001)}
    assert all("error" not in row and row["grads_finite"] for row in rows.values())
    numel = saved["rows"][0]["parameters"]
    assert rows[("bf16", None)]["wire_bytes_per_step"] == 2 * numel
    for key in (("topk", 0.01), ("dgc", 0.01), ("ef21", 0.01), ("regtopk", 0.01)):
        row = rows[key]
        assert row["compress_ms"] > 0 and row["decode_ms"] > 0
        assert row["x_floor"] == pytest.approx((row["compress_ms"] + row["decode_ms"]) / saved["floor_ms"])
    assert "x floor" in result.stdout and "the slowest of 2 ranks" in result.stdout


# =============================================================================== failures
def test_a_failing_stage_fails_the_script(tmp_path):
    """A driver that dies makes its stage 'failed' and the script exit 1, after the summary."""
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\n"
                      'case "$*" in *bench_hook.py*--device*) echo "bench_hook: boom" >&2; exit 3;; esac\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    result = run_script(out, "hook", python=str(python), timeout=120)
    assert result.returncode == 1, tail(result)
    assert "gpu_check: hook: failed: bench_hook.py --device cpu --quick exited 3" in result.stdout
    last = result.stdout.rstrip().splitlines()[-1]
    assert last.startswith("gpu_check: stages: 0 passed, 1 failed, 0 skipped of 1"), last
    assert "bench_hook: boom" in (out / "bench_hook.log").read_text()


def test_unknown_stage_is_a_usage_error(tmp_path):
    result = run_script(tmp_path, "build", "benchmark", timeout=30)
    assert result.returncode == 2 and "stages: build pytest sanitizer bench hook" in result.stderr
    assert not any(tmp_path.iterdir())


def test_op_driver_catches_a_wrong_result(monkeypatch, capsys):
    driver = load("scripts/cuda_op_driver.py", "cuda_op_driver")
    topk_abs = gradsieve.topk_abs

    def off_by_one(x, k):  # the right values, one index shifted
        values, indices = topk_abs(x, k)
        if k:
            indices = indices.clone()
            indices[-1] = (indices[-1] + 1) % x.numel() if x.numel() > 1 else indices[-1]
        return values, indices

    monkeypatch.setattr(gradsieve, "topk_abs", off_by_one)
    assert driver.main(["--device", "cpu", "--small", "--ops", "topk_abs"]) == 1
    assert re.search(r"^topk_abs +cpu +FAILED \d+ of \d+ cases", capsys.readouterr().out, re.M)


# =============================================================================== bench_ops targets
@pytest.fixture(scope="module")
def bench_ops():
    return load("benchmarks/bench_ops.py", "bench_ops")


def cuda_row(op, **columns):
    return {"device": "cuda", "op": op, "n": 1 << 26, "density": 0.001, "gradsieve_ms": 1.0,
            "baseline": "x", "baseline_ms": 1.0, **columns}


def test_target_met_and_missed(bench_ops, capsys):
    met = cuda_row("topk_abs", speedup=6.0, speedup_vs_topk_unsorted=3.0, x_floor=2.5, floor_ms=0.4)
    bench_ops.apply_targets(met)
    assert met["met"] is True and met["missed"] == []
    assert met["target"] == "speedup >= 5, speedup_vs_topk_unsorted >= 3, x_floor <= 2.5"

    missed = cuda_row("ef_topk_", speedup=4.0, x_floor=2.1, floor_ms=0.4)
    bench_ops.apply_targets(missed)
    assert missed["met"] is False and missed["missed"] == ["speedup 4.00 < 5", "x_floor 2.10 > 2"]

    quantize = cuda_row("quantize_int8", density=float("nan"), bw_fraction=0.55)
    bench_ops.apply_targets(quantize)
    assert quantize["missed"] == ["bw_fraction 0.55 < 0.6"]

    predictive = cuda_row("predictive_score", density=float("nan"), speedup=6.0, x_floor=2.5)
    bench_ops.apply_targets(predictive)
    assert predictive["missed"] == ["x_floor 2.50 > 2"]

    no_floor = cuda_row("quantile_abs", speedup=9.0)
    bench_ops.apply_targets(no_floor)
    assert no_floor["missed"] == ["x_floor not measured"]

    sparse = cuda_row("sparse_accumulate_", speedup=1.0)
    bench_ops.apply_targets(sparse)
    assert sparse["met"] is True  # "no slower" than index_add_

    small = cuda_row("topk_abs", n=1 << 24, speedup=1.0)
    cpu = {**cuda_row("topk_abs", speedup=1.0), "device": "cpu"}
    for row in (small, cpu):
        bench_ops.apply_targets(row)
        assert "met" not in row

    bench_ops.print_table([met, missed, small])
    printed = capsys.readouterr().out
    assert "  yes" in printed and "no: speedup 4.00 < 5; x_floor 2.10 > 2" in printed
    assert "targets (CUDA, n >= 2^26): 1 of 2 rows met" in printed


def test_sizes_argument(bench_ops):
    assert bench_ops.parse_sizes("26,28") == [26, 28]
    for bad in ("", "2x", "26,99"):
        with pytest.raises(Exception, match="log2"):
            bench_ops.parse_sizes(bad)

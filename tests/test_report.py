"""gradsieve-train's reporting on synthetic run records: targets, time-to-target, speed-ups, the
table; and the progress display when stderr is not a terminal."""

import io
import math

import pytest

from gradsieve.train.progress import Progress
from gradsieve.train import report
from gradsieve.train.report import Target, add_speedups, format_table, time_to_target


def run(name, ms, evals, density=None, **extra):
    """A run record as gradsieve.train.run.train_one makes it (only the fields the report reads)."""
    return {
        "compressor": name, "label": name, "density": density, "options": {}, "steps": 100,
        "train_loss": 0.5, "eval_loss": evals[-1][2], "accuracy": evals[-1][3],
        "wire_bytes_per_step": 1000.0, "compression_ratio": 1.0, "time_per_step_s": ms / 1e3,
        "history": {"eval": [{"step": s, "seconds": t, "loss": loss, "accuracy": acc}
                             for s, t, loss, acc in evals]},
        **extra,
    }


@pytest.mark.parametrize("text,metric,value", [
    ("accuracy=0.9", "accuracy", 0.9), ("acc=90%", "accuracy", 0.9), ("loss=1.5", "loss", 1.5),
    (" Loss = 0.01 ", "loss", 0.01), ("accuracy=1", "accuracy", 1.0),
])
def test_target_parse(text, metric, value):
    target = Target.parse(text)
    assert target.metric == metric and target.value == pytest.approx(value)


@pytest.mark.parametrize("text,message", [
    ("0.9", "accuracy=VALUE or loss=VALUE"), ("f1=0.5", "accuracy=VALUE or loss=VALUE"),
    ("accuracy=90", "fraction in (0, 1]"), ("accuracy=0", "fraction in (0, 1]"),
    ("loss=abc", "must be a number"), ("loss=nan", "finite"),
])
def test_target_parse_rejects(text, message):
    with pytest.raises(ValueError, match="--target") as err:
        Target.parse(text)
    assert message in str(err.value)


def test_target_met_directions():
    acc, loss = Target("accuracy", 0.9), Target("loss", 1.0)
    assert acc.met(5.0, 0.9) and not acc.met(0.1, 0.899) and not acc.met(0.1, None)
    assert loss.met(1.0, None) and not loss.met(1.01, 0.99) and not loss.met(float("nan"), 1.0)


def test_time_to_target_is_the_first_evaluation_that_meets_it():
    evals = [{"step": 0, "seconds": 0.0, "loss": 2.3, "accuracy": 0.1},
             {"step": 10, "seconds": 4.0, "loss": 0.9, "accuracy": 0.85},
             {"step": 20, "seconds": 8.5, "loss": 0.5, "accuracy": 0.92},
             {"step": 30, "seconds": 12.0, "loss": 0.7, "accuracy": 0.88},  # dips below again
             {"step": 40, "seconds": 16.0, "loss": 0.3, "accuracy": 0.95}]
    assert time_to_target(evals, Target("accuracy", 0.9)) == {"seconds": 8.5, "step": 20}
    assert time_to_target(evals, Target("loss", 1.0)) == {"seconds": 4.0, "step": 10}
    assert time_to_target(evals, Target("accuracy", 0.99)) is None
    assert time_to_target([], Target("loss", 1.0)) is None


def test_speedups_against_the_dense_run():
    target = Target("accuracy", 0.9)
    results = [
        run("none", 200.0, [(0, 0.0, 2.0, 0.1), (50, 10.0, 0.5, 0.91), (100, 20.0, 0.3, 0.95)]),
        run("topk", 50.0, [(0, 0.0, 2.0, 0.1), (50, 2.5, 0.8, 0.85), (100, 5.0, 0.4, 0.93)], density=0.01),
        run("powersgd", 100.0, [(0, 0.0, 2.0, 0.1), (100, 10.0, 0.9, 0.80)]),
    ]
    add_speedups(results, target)
    dense, topk, power = results
    assert dense["step_speedup"] == pytest.approx(1.0) and dense["target_speedup"] == pytest.approx(1.0)
    assert topk["step_speedup"] == pytest.approx(4.0)
    assert topk["target_s"] == 5.0 and topk["target_step"] == 100
    assert topk["target_speedup"] == pytest.approx(2.0)  # 10 s against 5 s
    assert power["target_s"] is None and power["target_speedup"] is None
    table = format_table(results, has_accuracy=True, link=True, target=target)
    lines = table.splitlines()
    assert "to target" in lines[0] and "link/step" in lines[0] and "speed-up" in lines[0]
    assert "4.00x" in lines[3] and "5.0 s" in lines[3] and "2.00x" in lines[3]
    assert "not reached" in lines[4]


def test_without_a_dense_run_there_are_no_speedups():
    results = [run("topk", 50.0, [(0, 0.0, 2.0, 0.1), (100, 5.0, 0.4, 0.93)], density=0.01)]
    add_speedups(results, Target("accuracy", 0.9))
    assert results[0]["step_speedup"] is None and results[0]["target_speedup"] is None
    assert results[0]["target_s"] == 5.0
    assert "no dense run" in format_table(results, has_accuracy=True, target=Target("accuracy", 0.9))


def test_dense_run_that_misses_the_target_gives_no_target_speedup():
    results = [run("none", 200.0, [(0, 0.0, 2.0, 0.1), (100, 20.0, 0.3, 0.5)]),
               run("topk", 50.0, [(0, 0.0, 2.0, 0.1), (100, 5.0, 0.4, 0.93)], density=0.01)]
    add_speedups(results, Target("accuracy", 0.9))
    assert results[1]["target_s"] == 5.0 and results[1]["target_speedup"] is None
    assert not math.isnan(results[1]["step_speedup"])


def test_progress_off_a_terminal_prints_lines_not_frames():
    stream = io.StringIO()
    bar = Progress(100, "topk", stream=stream, line_seconds=1e9)
    for step in range(100):
        bar.update(1, loss=f"{1 / (step + 1):.3f}")
    bar.close(loss="0.010", acc="0.990")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert 10 <= len(lines) <= 12
    assert lines[0].startswith("topk: step 10/100") and "loss" in lines[0]
    assert "acc 0.990" in lines[-1]


def test_the_table_says_what_train_loss_is():
    results = [run("none", 200.0, [(0, 0.0, 2.0, 0.1), (100, 20.0, 0.3, 0.95)])]
    add_speedups(results, None)
    lines = format_table(results, has_accuracy=True).splitlines()
    assert "train loss" in lines[0]
    note = [line for line in lines if line.startswith("train loss:")]
    assert note == [report.TRAIN_LOSS_NOTE]
    assert "averaged over all ranks" in note[0] and "last 10% of the steps" in note[0]


@pytest.mark.parametrize("count", [3, 6, 12])
@pytest.mark.parametrize("kind", ["step", "bytes"])
def test_loss_plot_tells_coinciding_runs_apart_and_labels_its_log_axis(count, kind):
    """Runs with the very same loss curve (dense and fp16 often are): every line has a
    (line style, marker) of its own, its markers sparse, the y axis (log, under a decade) at
    least 3 labelled ticks in plain numbers."""
    import matplotlib.pyplot as plt

    steps = 120
    loss = [2.3 * math.exp(-s / 40) + 0.3 for s in range(steps)]
    results = [{"label": f"run{i}", "compressor": f"run{i}",
                "history": {"loss": list(loss), "cum_bytes": [(s + 1) * 1000.0 for s in range(steps)]}}
               for i in range(count)]
    fig = report.loss_figure(results, kind, "title")
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert len(lines) == count
        styles = [(line.get_linestyle(), line.get_marker()) for line in lines]
        assert len(set(styles)) == count, styles
        assert all(line.get_linestyle() != "None" and line.get_marker() not in (None, "None", "") for line in lines)
        if count <= 10:
            assert len({line.get_color() for line in lines}) == count
        for line in lines:  # sparse markers: an offset and a stride, about 8 per line
            offset, every = line.get_markevery()
            assert every >= steps // 10
        assert ax.get_yscale() == "log"
        fig.canvas.draw()
        low, high = ax.get_ylim()
        labelled = [(loc, label.get_text()) for loc, label in zip(ax.yaxis.get_majorticklocs(), ax.get_yticklabels())
                    if low <= loc <= high and label.get_text()]
        assert len(labelled) >= 3, labelled
        assert all("$" not in text and "^" not in text for _, text in labelled), labelled  # no 10^x
    finally:
        plt.close(fig)

"""benchmarks/cost_model.py on synthetic measurements: the traffic formulas, the check against
measured points, and the break-even worker count where only traffic matters."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("cost_model", os.path.join(ROOT, "benchmarks", "cost_model.py"))
cost_model = importlib.util.module_from_spec(spec)
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

"""How many entries a density selects: the true ceiling of the decimal product, never one more
because the float product rounded up."""

import math
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

import gradsieve
from gradsieve.compressor import BucketLayout, entries_for


def decimal_ceiling(density: float, numel: int) -> int:
    """Independent reference: the density as the decimal the user wrote, times numel, rounded up."""
    exact = Decimal(repr(density)) * numel
    whole = int(exact)
    return min(numel, whole + (1 if exact > whole else 0))


@pytest.mark.parametrize("density,numel,k", [
    (0.55, 100, 55), (0.07, 100, 7), (0.01, 100, 1), (0.001, 1500, 2), (0.1, 30, 3),
    (0.3, 10, 3), (0.7, 10, 7), (0.29, 100, 29), (0.57, 100, 57), (1.0, 7, 7), (1e-9, 5, 1),
    (0.5, 0, 0), (0.5, 1, 1),
])
def test_known_cases(density, numel, k):
    assert entries_for(density, numel) == k


def test_many_decimal_densities_and_sizes():
    mismatched_float_rule = 0
    for percent in range(1, 101):
        for per_mille in (percent / 100, percent / 1000):
            for numel in (1, 3, 7, 10, 100, 1000, 1234, 10**5, 10**6 + 3):
                assert entries_for(per_mille, numel) == decimal_ceiling(per_mille, numel), (per_mille, numel)
                mismatched_float_rule += min(numel, math.ceil(per_mille * numel)) != decimal_ceiling(per_mille, numel)
    assert mismatched_float_rule > 0  # the old float rule really was wrong on some of these


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1.0, allow_nan=False), st.integers(0, 10**9))
def test_any_float_density(density, numel):
    assert entries_for(density, numel) == decimal_ceiling(density, numel)


def test_compressors_send_that_many_entries():
    layout = BucketLayout.flat(100, 2, (100,))
    for name in ("topk", "ef21", "regtopk", "dgc"):
        compressor = gradsieve.get_compressor(name, density=0.55)
        assert sum(s.k for s in compressor.segments(layout, 10_000)) == 55, name
    layer = gradsieve.get_compressor("topk", density=0.07, scope="layer")
    assert [s.k for s in layer.segments(BucketLayout.flat(300, 2, (100, 200)), 0)] == [7, 14]

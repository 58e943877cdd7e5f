"""Holds normkit to the documented numerical bounds (docs/numerics.md): the worst error
against float64 per norm, dtype and data kind (ordinary, large offset, near the float16
maximum, constant groups, subnormals), on every kernel path. The sweep and the bounds
are in numerics_sweep.py; regenerate the page with
`python tests/python/numerics_sweep.py --markdown docs/numerics.md`."""

from __future__ import annotations

import pytest

import numerics_sweep


@pytest.fixture(scope="module")
def worst():
    return numerics_sweep.sweep()


@pytest.mark.parametrize("dtype", list(numerics_sweep.DTYPES))
@pytest.mark.parametrize("norm", numerics_sweep.NORMS)
def test_within_documented_bound(worst, norm, dtype):
    over = {
        kind: worst[(norm, dtype, kind)]
        for kind in numerics_sweep.KINDS
        if not worst[(norm, dtype, kind)] <= numerics_sweep.bound(norm, dtype, kind)
    }
    assert not over, f"{norm} {dtype}: errors over the documented bound: {over}"


def test_documented_table_is_current():
    """docs/numerics.md lists the bounds the test enforces."""
    import pathlib

    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "numerics.md"
    if not page.exists():
        pytest.skip("docs/numerics.md not in this tree (installed-package run)")
    text = page.read_text()
    for dtype in numerics_sweep.DTYPES:
        assert f"## {dtype}" in text
        assert f"{numerics_sweep.bound('layer_norm', dtype):.1e}" in text

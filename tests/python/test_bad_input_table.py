"""One test per row of the bad-input table (bad_input_table.py, docs/bad_input.md):
the exception type and the start of its message, or for odd-but-valid inputs the same
result as on a contiguous copy."""

from __future__ import annotations

import pathlib

import pytest

import bad_input_table


@pytest.mark.parametrize("row", bad_input_table.ROWS, ids=[f"{r[0]}: {r[1]}" for r in bad_input_table.ROWS])
def test_row(row):
    ok, happened = bad_input_table.check_row(row)
    expected = f"{row[3].__name__}: {row[4]}..." if row[3] else row[4]
    assert ok, f"{row[1]}: expected {expected}, got {happened}"


def test_documented_table_is_current():
    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "bad_input.md"
    if not page.exists():
        pytest.skip("docs/bad_input.md not in this tree")
    assert page.read_text() == bad_input_table.markdown(), (
        "docs/bad_input.md is stale: python tests/python/bad_input_table.py --markdown docs/bad_input.md")

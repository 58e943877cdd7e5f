"""Memory: resident memory stays flat over many calls, nanobind reports no leaked
objects at exit, and indexing is 64-bit (a LayerNorm over more than 2**31 elements)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normkit


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_resident_memory_stays_flat_over_100000_calls(rng):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    w = np.ones(64, np.float32)
    img = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    ln = normkit.LayerNorm(64)

    def round_of_calls(n):
        for _ in range(n):
            y, m, r = normkit.layer_norm(x, 64, w, w, return_stats=True)
            normkit.layer_norm_backward(y, x, m, r, 64, w)
            normkit.group_norm(img, 2)
            ln(x)
            ln.backward(x)

    round_of_calls(2000)  # warm up: allocator pools, caches
    before = _rss_bytes()
    round_of_calls(20000)  # 100 000 normkit calls
    grown = _rss_bytes() - before
    # A leak of even 32 bytes per call would show as > 3 MB.
    assert grown < 2 * 1024 * 1024, f"resident memory grew by {grown} bytes over 100000 calls"


def test_nanobind_reports_no_leaks_at_exit():
    code = textwrap.dedent(
        """
        import numpy as np, normkit, pickle
        x = np.random.default_rng(0).standard_normal((8, 16, 4, 4)).astype(np.float32)
        layers = [normkit.BatchNorm(16), normkit.InstanceNorm(16, affine=True), normkit.GroupNorm(4, 16),
                  normkit.LayerNorm((4, 4)), normkit.RMSNorm(4)]
        for layer in layers:
            y = layer(x)
            layer.backward(y)
            w = layer.weight              # arrays that keep their layer alive
            state = layer.state_dict()
            clone = pickle.loads(pickle.dumps(layer))
        print(normkit.info()["version"])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "leak" not in result.stderr.lower(), result.stderr


@pytest.mark.slow
def test_layer_norm_over_more_than_2_to_the_31_elements():
    # float16 [262145, 8192]: 2**31 + 8192 elements, 4 GiB per array.
    rows, cols = 262145, 8192
    try:
        x = np.empty((rows, cols), np.float16)
    except MemoryError:
        pytest.skip("not enough memory for two 4 GiB arrays")
    base = np.arange(cols, dtype=np.float32) % 97 / 97
    x[:] = base.astype(np.float16)
    # Element 2**31 starts the last row: probe rows on both sides of it, each
    # made different (an offset and a scale the output must remove).
    probe_rows = [0, 1, rows // 2, rows - 2, rows - 1]
    for k, r in enumerate(probe_rows):
        x[r] = (base * (k + 1) + 10 * k).astype(np.float16)
    expected = {}
    for r in probe_rows:
        row = x[r].astype(np.float64)
        expected[r] = (row - row.mean()) / np.sqrt(row.var() + 1e-5)
    y, mean, rstd = normkit.layer_norm(x, cols, return_stats=True)
    del x
    for r in probe_rows:
        np.testing.assert_allclose(y[r].astype(np.float64), expected[r], rtol=0, atol=4e-3, err_msg=f"row {r}")
    assert np.all(np.isfinite(rstd))

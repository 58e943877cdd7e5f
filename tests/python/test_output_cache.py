"""The output cache: large fresh outputs reuse freed buffers (python/src/output_cache.hpp)."""

import gc

import numpy as np
import pytest

import normkit
from normkit import _ext
from normkit._dtypes import CACHED_OUTPUT_MIN_BYTES

ROWS = CACHED_OUTPUT_MIN_BYTES // (4 * 1024)  # a float32 [ROWS, 1024] output is exactly the threshold


@pytest.fixture
def cache_limit():
    """Starts each test from an empty cache, with no garbage of earlier tests left to free into
    it (a cycle holding a large output, collected mid-test, would change the counts)."""
    before = _ext.output_cache_info()["limit"]
    gc.collect()
    normkit.set_output_cache_limit(0)  # frees what earlier tests left cached
    yield
    normkit.set_output_cache_limit(before)


def test_large_outputs_are_reused_and_correct(cache_limit, rng):
    normkit.set_output_cache_limit(1 << 30)
    x = rng.standard_normal((ROWS, 1024)).astype(np.float32)
    y1 = normkit.layer_norm(x, 1024)
    address = y1.ctypes.data
    assert address % 64 == 0, "cached outputs are cache-line aligned"
    expected = y1.copy()
    del y1
    gc.collect()
    assert _ext.output_cache_info()["cached"] >= x.nbytes, "the freed buffer went back to the cache"
    y2 = normkit.layer_norm(x, 1024)
    assert y2.ctypes.data == address, "the same buffer is reused for an output of the same size"
    np.testing.assert_array_equal(y2, expected)
    assert y2.shape == x.shape and y2.dtype == x.dtype and y2.flags.c_contiguous and y2.flags.writeable


def test_small_outputs_do_not_use_the_cache(cache_limit, rng):
    normkit.set_output_cache_limit(1 << 30)
    before = _ext.output_cache_info()["cached"]
    y = normkit.rms_norm(rng.standard_normal((64, 1024)).astype(np.float32), 1024)
    del y
    gc.collect()
    assert _ext.output_cache_info()["cached"] == before


def test_limit_zero_frees_and_disables(cache_limit, rng):
    normkit.set_output_cache_limit(1 << 30)
    y = normkit.layer_norm(rng.standard_normal((ROWS, 1024)).astype(np.float32), 1024)
    del y
    gc.collect()
    normkit.set_output_cache_limit(0)
    assert _ext.output_cache_info()["cached"] == 0
    y = normkit.layer_norm(rng.standard_normal((ROWS, 1024)).astype(np.float32), 1024)
    del y
    gc.collect()
    assert _ext.output_cache_info()["cached"] == 0


def test_bfloat16_outputs_from_the_cache(cache_limit, rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    normkit.set_output_cache_limit(1 << 30)
    x = rng.standard_normal((2 * ROWS, 1024)).astype(ml_dtypes.bfloat16)
    y = normkit.rms_norm(x, 1024)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = normkit.rms_norm(x[:8], 1024)
    np.testing.assert_array_equal(y[:8].view(np.uint16), ref.view(np.uint16))


def test_negative_limit_is_an_error():
    with pytest.raises(ValueError, match="^nbytes"):
        normkit.set_output_cache_limit(-1)

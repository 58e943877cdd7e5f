"""Statistics when one-pass shifted sums would cancel (outliers where the shift is taken).

The columns kernels sum x - shift (shift = the first row of each block of
rows) in one pass and fall back to a two-pass for a tile where that would lose
too many bits: here the first row of each block is an outlier, far from the
mean compared with the spread, so every tile must take the fallback and still
match the float64 reference.
"""

import numpy as np
import pytest

import normkit


@pytest.mark.parametrize("channels", [3, 16, 40])
def test_outlier_first_rows_take_the_two_pass(kernel_path, rng, channels):
    rows = 3 * 4096 + 17  # several blocks of at most 4096 rows
    x = (5.0 + 1e-3 * rng.standard_normal((rows, channels))).astype(np.float32)
    x[::4096] = 5e3  # the first row of every block, whatever the block size (a divisor of 4096)
    x[1::1024] = -5e3  # and more rows scattered through every block
    x64 = x.astype(np.float64)
    mean, var = x64.mean(0), x64.var(0)
    y, m, r = normkit.batch_norm(x, None, None, training=True, eps=0.0, layout="NC", return_stats=True)
    # float32 sums of values up to 5e3: the mean is good to ~1e-9 of the data's
    # magnitude (2e-5 absolute); the variance, dominated by the outliers, to 1e-5.
    np.testing.assert_allclose(m, mean, rtol=0, atol=2e-5)
    np.testing.assert_allclose(1.0 / r.astype(np.float64) ** 2, var, rtol=1e-5)
    np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var), rtol=1e-5, atol=1e-4)


def test_group_norm_channels_last_outlier_first_pixel(kernel_path, rng):
    x = (100.0 + 1e-2 * rng.standard_normal((2, 64, 64, 32))).astype(np.float32)  # NHWC
    x[:, 0, 0, :] = -1e4  # each sample's first row is far from its group's mean
    g = normkit.group_norm(x, 4, eps=0.0, layout="NHWC")
    x64 = x.astype(np.float64).reshape(2, 64 * 64, 4, 8)
    ref = (x64 - x64.mean(axis=(1, 3), keepdims=True)) / x64.std(axis=(1, 3), keepdims=True)
    # Outliers 1e6 times the spread: float32 statistics hold the outputs to ~1e-5
    # relative (the channels-first path, another algorithm, shows 4e-6 here).
    np.testing.assert_allclose(g.reshape(ref.shape), ref, rtol=2e-5, atol=2e-4)


def test_layer_norm_outlier_first_element_takes_the_two_pass(kernel_path, rng):
    """Rows whose first element (the shift) is an outlier, with more outliers
    further on: the rows kernel's two-pass fallback, whose sums are flushed in
    blocks so that small deviations after an outlier do not round one way."""
    x = (5.0 + 1e-3 * rng.standard_normal((64, 4096))).astype(np.float32)
    x[:, 0] = 5e3
    x[:, 1::512] = -5e3
    x64 = x.astype(np.float64)
    var = x64.var(-1)
    y, mean, rstd = normkit.layer_norm(x, 4096, eps=0.0, return_stats=True)
    np.testing.assert_allclose(1.0 / rstd.ravel().astype(np.float64) ** 2, var, rtol=3e-6)
    # x[0] = 5e3 is an outlier: the kernel moves its shift to the first chunk's
    # mean, so the mean keeps the precision of float32 sums of the data (not
    # the resolution of float32 numbers near 5e3, ulp 4.9e-4).
    np.testing.assert_allclose(mean.ravel(), x64.mean(-1), rtol=0, atol=2e-5)
    np.testing.assert_allclose(y, (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(var)[:, None], rtol=1e-5, atol=1e-4)

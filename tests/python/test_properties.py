"""Property tests (hypothesis) over the Python surface: random shapes (0- and 1-sized axes
included), layouts, dtypes, normalized shapes, groups and eps, checked against invariants
that hold whatever the data:

- without affine, every normalized group has mean 0 and variance var/(var + eps);
- channels-last equals channels-first transposed (forward and backward);
- GroupNorm with 1 group equals LayerNorm over (C, spatial...); with C groups, InstanceNorm;
- out=x gives the fresh result;
- LayerNorm of an already normalized row is that row (to eps).

Shapes that the norm refuses (one value per channel in BatchNorm training, one spatial
element in InstanceNorm) must raise ValueError, never crash.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import normkit  # noqa: E402

# database=None: no example database written into the source tree (failures print their example).
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

CHANNELS_FIRST = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
CHANNELS_LAST = {3: "NLC", 4: "NHWC", 5: "NDHWC"}
TOL = {np.float32: 2e-4, np.float64: 1e-10}


@st.composite
def channel_problems(draw, min_spatial_rank=0):
    """(x channels-first as float64 values, dtype, groups, eps): x of shape (N, C, S...)."""
    rank = draw(st.integers(2 + min_spatial_rank, 5))
    n = draw(st.integers(0, 3))
    c = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    spatial = [draw(st.integers(1, 5)) for _ in range(rank - 2)]
    groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 1e-1]))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0, 1e3]))
    scale = draw(st.sampled_from([1.0, 1e-2, 10.0]))
    x = np.random.default_rng(seed).standard_normal((n, c, *spatial)) * scale + offset
    return x, dtype, groups, eps


def to_last(a):
    """(N, C, S...) -> (N, S..., C)."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def to_first(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def close(a, b, dtype, scale=1.0):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0,
                               atol=TOL[dtype] * max(scale, 1.0))


def expected_group_stats(x, axes, eps):
    """Mean and variance the normalized output must have per group: 0 and var/(var + eps)."""
    var = x.var(axis=axes)
    return var / (var + eps)


@SETTINGS
@given(channel_problems())
def test_normalized_groups_have_zero_mean_and_unit_variance(problem):
    x64, dtype, groups, eps = problem
    x = x64.astype(dtype)
    xd = x.astype(np.float64)  # the statistics of the data actually passed
    n, c = x.shape[:2]
    spatial_axes = tuple(range(2, x.ndim))
    # GroupNorm: per (n, group) over (C/G, spatial...)
    y = normkit.group_norm(x, groups, eps=eps).astype(np.float64)
    if x.size:
        yg = y.reshape(n, groups, -1)
        xg = xd.reshape(n, groups, -1)
        close(yg.mean(axis=2), 0.0, dtype, scale=np.abs(yg).max(initial=0))
        close(yg.var(axis=2), expected_group_stats(xg, 2, eps), dtype, scale=4)
    # BatchNorm training: per channel over (N, spatial...); exactly one value per
    # channel is an error (as in PyTorch), none is an empty result.
    if n * int(np.prod(x.shape[2:])) != 1:
        y = normkit.batch_norm(x, None, None, training=True, eps=eps).astype(np.float64)
        axes = (0, *spatial_axes)
        if y.size:
            close(y.mean(axis=axes), 0.0, dtype, scale=np.abs(y).max(initial=0))
            close(y.var(axis=axes), expected_group_stats(xd, axes, eps), dtype, scale=4)
    else:
        with pytest.raises(ValueError):
            normkit.batch_norm(x, None, None, training=True, eps=eps)
    # LayerNorm over every axis but the batch
    if x.ndim >= 2 and x.size:
        y = normkit.layer_norm(x, x.shape[1:], eps=eps).astype(np.float64)
        axes = tuple(range(1, x.ndim))
        close(y.mean(axis=axes), 0.0, dtype, scale=np.abs(y).max(initial=0))
        close(y.var(axis=axes), expected_group_stats(xd, axes, eps), dtype, scale=4)


@SETTINGS
@given(channel_problems(min_spatial_rank=1))
def test_channels_last_equals_channels_first_transposed(problem):
    x64, dtype, groups, eps = problem
    x = x64.astype(dtype)
    first, last = CHANNELS_FIRST[x.ndim], CHANNELS_LAST[x.ndim]
    n, c = x.shape[:2]
    rng = np.random.default_rng(7)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    spatial = int(np.prod(x.shape[2:]))

    y1, m1, r1 = normkit.group_norm(x, groups, w, b, eps, layout=first, return_stats=True)
    y2, m2, r2 = normkit.group_norm(to_last(x), groups, w, b, eps, layout=last, return_stats=True)
    close(to_first(y2), y1, dtype, scale=np.abs(y1).max(initial=1))
    g1 = normkit.group_norm_backward(dy, x, m1, r1, groups, w, layout=first)
    g2 = normkit.group_norm_backward(to_last(dy), to_last(x), m2, r2, groups, w, layout=last)
    close(to_first(g2[0]), g1[0], dtype, scale=np.abs(g1[0]).max(initial=1))
    close(g2[1], g1[1], dtype, scale=np.abs(g1[1]).max(initial=1) * max(spatial * n, 1))
    close(g2[2], g1[2], dtype, scale=np.abs(g1[2]).max(initial=1) * max(spatial * n, 1))

    if n * spatial != 1:
        y1, m1, r1 = normkit.batch_norm(x, None, None, w, b, True, eps=eps, layout=first, return_stats=True)
        y2, m2, r2 = normkit.batch_norm(to_last(x), None, None, w, b, True, eps=eps, layout=last,
                                        return_stats=True)
        close(to_first(y2), y1, dtype, scale=np.abs(y1).max(initial=1))
        g1 = normkit.batch_norm_backward(dy, x, m1, r1, w, layout=first)
        g2 = normkit.batch_norm_backward(to_last(dy), to_last(x), m2, r2, w, layout=last)
        close(to_first(g2[0]), g1[0], dtype, scale=np.abs(g1[0]).max(initial=1))

    if spatial > 1:
        y1 = normkit.instance_norm(x, weight=w, bias=b, eps=eps, layout=first)
        y2 = normkit.instance_norm(to_last(x), weight=w, bias=b, eps=eps, layout=last)
        close(to_first(y2), y1, dtype, scale=np.abs(y1).max(initial=1))
    elif x.size:
        with pytest.raises(ValueError):
            normkit.instance_norm(x, eps=eps, layout=first)


@SETTINGS
@given(channel_problems())
def test_group_norm_special_cases(problem):
    x64, dtype, _, eps = problem
    x = x64.astype(dtype)
    n, c = x.shape[:2]
    # One group: LayerNorm over (C, spatial...).
    y1 = normkit.group_norm(x, 1, eps=eps)
    y2 = normkit.layer_norm(x, x.shape[1:], eps=eps)
    close(y1, y2, dtype, scale=np.abs(y2).max(initial=1))
    # C groups: InstanceNorm (which needs more than one spatial element).
    if x.ndim > 2 and int(np.prod(x.shape[2:])) > 1:
        y1 = normkit.group_norm(x, c, eps=eps)
        y2 = normkit.instance_norm(x, eps=eps)
        close(y1, y2, dtype, scale=np.abs(y2).max(initial=1))


@SETTINGS
@given(channel_problems(), st.booleans())
def test_out_equals_x_gives_the_fresh_result(problem, channels_last):
    x64, dtype, groups, eps = problem
    x = x64.astype(dtype)
    layout = None
    if channels_last and x.ndim >= 3:
        x, layout = to_last(x), CHANNELS_LAST[x.ndim]
    fresh = normkit.group_norm(x, groups, eps=eps, layout=layout)
    inplace = x.copy()
    result = normkit.group_norm(inplace, groups, eps=eps, layout=layout, out=inplace)
    assert result is inplace
    np.testing.assert_array_equal(inplace, fresh)
    # LayerNorm over the trailing dim, in place.
    if x.shape[-1] > 0:
        fresh = normkit.layer_norm(x, x.shape[-1], eps=eps)
        inplace = x.copy()
        normkit.layer_norm(inplace, x.shape[-1], eps=eps, out=inplace)
        np.testing.assert_array_equal(inplace, fresh)


@SETTINGS
@given(st.integers(1, 64), st.integers(2, 300), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))
def test_layer_norm_of_a_normalized_row_is_that_row(rows, cols, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols))
    x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    assume(np.all(np.isfinite(x)))
    x = x.astype(dtype)
    eps = 1e-12 if dtype == np.float64 else 1e-9
    y = normkit.layer_norm(x, cols, eps=eps)
    # Rounding x to float32 moves its mean and variance by about 1e-7: y moves by as much.
    np.testing.assert_allclose(y, x, rtol=0, atol=TOL[dtype] * 5)

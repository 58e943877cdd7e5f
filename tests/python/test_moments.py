"""Statistics that merge: normkit.moments / merge_moments / Moments, batch_norm(stats=),
the distributed backward's sums, and BatchNorm recalibration, in one process.

References are float64 (channel_reference.mean_var_rows: shifted two-pass). The
SyncBatchNorm runs over MPI are in test_distributed.py.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import normkit
from backward_reference import batch_norm_backward_ref
from channel_reference import batch_norm_ref, mean_var_rows, to_ncs
from helpers import assert_close, assert_running_close, in_layout, make_x, np_dtype, raises_named

LAYOUTS_4D = ["NCHW", "NHWC"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
# Relative accuracy of a Moments' mean (to the data's magnitude) and m2 (to itself):
# float64 input is accumulated in float64; float32/16-bit in float32 per block
# (shifted, so cancellation costs nothing; TOL32 as for the norms), merged in float64.
MOMENT_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}


def _reference(x, norm, layout=None, num_groups=None, k=None):
    """(count, mean, m2) in float64 of the statistics `norm` forms over x."""
    if norm == "layer":
        lead = x.shape[: x.ndim - k]
        rows = np.asarray(x, dtype=np.float64).reshape(int(np.prod(lead, dtype=np.int64)), -1)
        mean, var = mean_var_rows(rows)
        return rows.shape[1], mean.reshape(lead), (var * rows.shape[1]).reshape(lead)
    a = to_ncs(x, layout)
    n, c, s = a.shape
    if norm == "batch":
        rows = a.transpose(1, 0, 2).reshape(c, n * s)
        shape = (c,)
    else:
        g = c if norm == "instance" else num_groups
        rows = a.reshape(n * g, (c // g) * s)
        shape = (n, g)
    mean, var = mean_var_rows(rows)
    return rows.shape[1], mean.reshape(shape), (var * rows.shape[1]).reshape(shape)


def _check_moments(m, ref, dtype, x):
    count, mean, m2 = ref
    tol = MOMENT_TOL[dtype]
    assert m.count == count
    assert m.mean.dtype == np.float64 and m.m2.dtype == np.float64
    assert m.shape == mean.shape
    scale = max(1.0, float(np.max(np.abs(np.asarray(x, dtype=np.float64))))) if x.size else 1.0
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(m.m2, m2, rtol=tol, atol=tol * scale * scale * 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS_4D)
@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_channel_moments_match_float64(kernel_path, rng, norm, layout, dtype):
    dt = np_dtype(dtype)
    x = in_layout(make_x(rng, (3, 8, 5, 7), np.float64, loc=3.0).astype(dt), layout)
    kwargs = {"num_groups": 4} if norm == "group" else {}
    m = normkit.moments(x, norm=norm, layout=layout, **kwargs)
    _check_moments(m, _reference(x, norm, layout, kwargs.get("num_groups")), dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_moments_match_float64(kernel_path, rng, dtype):
    dt = np_dtype(dtype)
    x = make_x(rng, (4, 6, 96), np.float64, loc=-2.0).astype(dt)
    for shape in (96, (6, 96)):
        k = 1 if shape == 96 else 2
        m = normkit.moments(x, norm="layer", normalized_shape=shape)
        _check_moments(m, _reference(x, "layer", k=k), dtype, x)
    # a strided view (every other row) is read in place, with the same statistics as a copy
    view = x[:, ::2]
    a = normkit.moments(view, norm="layer", normalized_shape=96)
    b = normkit.moments(np.ascontiguousarray(view), norm="layer", normalized_shape=96)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.m2, b.m2)


def test_moments_of_1d_and_3d_channel_layouts(rng):
    for shape, layout in (((6, 5), "NC"), ((4, 5, 9), "NLC"), ((4, 5, 9), "NCL"), ((2, 5, 3, 4, 2), "NDHWC")):
        x = make_x(rng, shape, np.float64)
        m = normkit.moments(x, layout=layout)
        _check_moments(m, _reference(x, "batch", layout), "float64", x)


def _random_parts(rng, n, parts):
    cuts = np.sort(rng.choice(np.arange(0, n + 1), size=parts - 1, replace=True))
    return np.split(np.arange(n), cuts)  # may hold empty parts


def _merge_tree(rng, ms):
    """Merges a list of Moments in a random binary grouping (order kept)."""
    ms = list(ms)
    while len(ms) > 1:
        i = int(rng.integers(0, len(ms) - 1))
        ms[i:i + 2] = [normkit.merge_moments(ms[i], ms[i + 1])]
    return ms[0]


@pytest.mark.parametrize("layout", LAYOUTS_4D)
def test_hostile_data_merged_in_random_groupings_stays_exact(rng, layout):
    """Mean 1e4, std 1e-2 in float32, split into uneven (some empty) parts and merged
    in random groupings: the variance stays exact. A float64 sum / sum-of-squares
    merge of the same parts is checked to be far off, so the data is hostile enough."""
    x = (rng.standard_normal((24, 6, 8, 8)) * 1e-2 + 1e4).astype(np.float32)
    x = in_layout(x, layout)
    count, ref_mean, ref_m2 = _reference(x, "batch", layout)
    ref_var = ref_m2 / count
    for trial in range(5):
        idx = _random_parts(rng, x.shape[0], 6)
        parts = [normkit.moments(x[i], layout=layout) for i in idx]
        merged = _merge_tree(rng, parts) if trial else normkit.merge_moments(*parts)
        assert merged.count == count
        np.testing.assert_allclose(merged.mean, ref_mean, rtol=1e-12)
        np.testing.assert_allclose(merged.var(), ref_var, rtol=1e-6)
    # the naive merge loses the variance (relative error ~2e-4 here; above: 1e-12 NCHW, 2e-7 NHWC)
    sums = [np.asarray(x[i], np.float64) for i in idx]
    axes = (0, 2, 3) if layout == "NCHW" else (0, 1, 2)
    s1 = sum(a.sum(axis=axes) for a in sums)
    s2 = sum((a * a).sum(axis=axes) for a in sums)
    naive_var = s2 / count - (s1 / count) ** 2
    assert np.max(np.abs(naive_var - ref_var) / ref_var) > 1e-5


def test_merge_groupings_agree_within_float64_rounding(rng):
    x = make_x(rng, (40, 5, 3, 3), np.float64, loc=100.0)
    parts = [normkit.moments(x[i]) for i in _random_parts(rng, 40, 8)]
    flat = normkit.merge_moments(*parts)
    again = normkit.merge_moments(parts)  # a list works too; same order: same bits
    assert np.array_equal(flat.mean, again.mean) and np.array_equal(flat.m2, again.m2)
    for _ in range(4):
        tree = _merge_tree(rng, parts)
        np.testing.assert_allclose(tree.mean, flat.mean, rtol=1e-14)
        np.testing.assert_allclose(tree.m2, flat.m2, rtol=1e-12)
    whole = normkit.moments(x)
    np.testing.assert_allclose(flat.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(flat.m2, whole.m2, rtol=1e-12)


def test_merge_with_an_empty_part_is_exact(rng):
    x = make_x(rng, (5, 4, 6), np.float32, loc=1e3)
    m = normkit.moments(x)
    empty = normkit.moments(x[:0])
    assert empty.count == 0 and empty.shape == (4,)
    for merged in (normkit.merge_moments(m, empty), normkit.merge_moments(empty, m), m.merge(empty, empty)):
        assert merged.count == m.count
        assert np.array_equal(merged.mean, m.mean) and np.array_equal(merged.m2, m.m2)
    both_empty = normkit.merge_moments(empty, empty)
    assert both_empty.count == 0 and np.isnan(both_empty.var()).all() and np.isnan(both_empty.rstd()).all()


def test_var_rstd_pickle_and_buffer(rng):
    x = make_x(rng, (7, 3, 5), np.float64)
    m = normkit.moments(x, layout="NCL")
    ref = x.transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(m.var(), ref.var(axis=1), rtol=1e-13)
    np.testing.assert_allclose(m.var(correction=1), ref.var(axis=1, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(m.rstd(1e-3), 1 / np.sqrt(ref.var(axis=1) + 1e-3), rtol=1e-13)
    back = pickle.loads(pickle.dumps(m))
    assert back.count == m.count and np.array_equal(back.mean, m.mean) and np.array_equal(back.m2, m.m2)
    buf = m.to_buffer()
    assert buf.dtype == np.float64 and buf.shape == (2 * 3 + 1,)
    again = normkit.Moments.from_buffer(buf, m.shape)
    assert again.count == m.count and np.array_equal(again.mean, m.mean) and np.array_equal(again.m2, m.m2)
    one = normkit.moments(x[:1, :, :1], layout="NCL")  # one value per channel
    assert one.count == 1 and np.isnan(one.var(correction=1)).all() and np.array_equal(one.var(), np.zeros(3))


def test_moments_keep_nan_and_inf(rng):
    x = make_x(rng, (4, 3, 8), np.float32)
    x[1, 0, 2] = np.nan
    x[2, 1, 3] = np.inf
    m = normkit.moments(x)
    assert np.isnan(m.mean[0]) and np.isnan(m.m2[0])
    assert not np.isfinite(m.mean[1]) and np.isnan(m.m2[1])
    assert np.isfinite(m.mean[2]) and np.isfinite(m.m2[2])


def test_moments_do_not_modify_x(rng):
    x = make_x(rng, (4, 3, 8), np.float32)
    before = x.copy()
    normkit.moments(x)
    normkit.moments(x, norm="layer", normalized_shape=8)
    assert np.array_equal(x, before)


# --------------------------------------------------------------------------- batch_norm(stats=)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS_4D)
def test_batch_norm_with_merged_stats_equals_the_whole_batch(kernel_path, rng, layout, dtype):
    """Each shard normalized with the merged moments of all shards gives the whole
    batch's BatchNorm (float64 reference), and the running statistics are the
    whole batch's, also when a shard is empty."""
    dt = np_dtype(dtype)
    x = in_layout(make_x(rng, (9, 6, 4, 5), np.float64, loc=2.0).astype(dt), layout)
    shards = [x[0:4], x[4:4], x[4:9]]
    m = normkit.merge_moments(*[normkit.moments(s, layout=layout) for s in shards])
    w = (1 + 0.3 * rng.standard_normal(6)).astype(np.float32 if dtype in ("float16", "bfloat16") else dt)
    b = (0.2 * rng.standard_normal(6)).astype(w.dtype)
    rdt = w.dtype
    y_ref, mean_ref, rstd_ref, rm_ref, rv_ref = batch_norm_ref(x, np.zeros(6), np.ones(6), w, b, training=True,
                                                               momentum=0.3, layout=layout)
    for shard, lo in zip(shards, (0, 4, 4)):
        rm, rv = np.zeros(6, rdt), np.ones(6, rdt)
        y, mean, rstd = normkit.batch_norm(shard, rm, rv, w, b, training=True, momentum=0.3, layout=layout,
                                           stats=m, return_stats=True)
        assert y.shape == shard.shape and y.dtype == shard.dtype
        assert_close(y, y_ref[lo:lo + shard.shape[0]], dt)
        assert_running_close(rm, rm_ref, "running_mean")
        assert_running_close(rv, rv_ref, "running_var")
        np.testing.assert_allclose(mean.astype(np.float64), mean_ref, rtol=1e-6)
        np.testing.assert_allclose(rstd.astype(np.float64), rstd_ref, rtol=1e-5)


def test_batch_norm_stats_with_out_and_activation(rng):
    x = make_x(rng, (4, 3, 6), np.float32)
    m = normkit.moments(x[:2])
    out = np.empty_like(x)
    y = normkit.batch_norm(x, None, None, training=True, stats=m, activation="relu", out=out)
    assert y is out
    mean, var = m.mean, m.var()
    ref = np.maximum((x - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5), 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_stats_bad_input(rng):
    x = make_x(rng, (4, 3, 6), np.float32)
    m = normkit.moments(x)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    raises_named(TypeError, "stats", lambda: normkit.batch_norm(x, rm, rv, training=True, stats=(m.mean, m.m2)))
    raises_named(ValueError, "stats", lambda: normkit.batch_norm(x, rm, rv, training=False, stats=m))
    other = normkit.moments(make_x(rng, (4, 5, 6), np.float32))
    raises_named(ValueError, "stats", lambda: normkit.batch_norm(x, rm, rv, training=True, stats=other))
    one = normkit.moments(x[:1, :, :1])
    raises_named(ValueError, "stats", lambda: normkit.batch_norm(x, rm, rv, training=True, stats=one))
    inst = normkit.moments(x, norm="instance")
    raises_named(ValueError, "stats", lambda: normkit.batch_norm(x, rm, rv, training=True, stats=inst))
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))  # nothing written on error


def test_moments_bad_input(rng):
    x = make_x(rng, (4, 6, 5), np.float32)
    raises_named(ValueError, "norm", lambda: normkit.moments(x, norm="rms"))
    raises_named(ValueError, "num_groups", lambda: normkit.moments(x, norm="group"))
    raises_named(ValueError, "num_groups", lambda: normkit.moments(x, norm="group", num_groups=4))
    raises_named(ValueError, "num_groups", lambda: normkit.moments(x, norm="batch", num_groups=2))
    raises_named(ValueError, "normalized_shape", lambda: normkit.moments(x, norm="layer"))
    raises_named(ValueError, "normalized_shape", lambda: normkit.moments(x, norm="layer", normalized_shape=7))
    raises_named(ValueError, "layout", lambda: normkit.moments(x, norm="layer", normalized_shape=5, layout="NLC"))
    raises_named(ValueError, "layout", lambda: normkit.moments(x, layout="NCHW"))
    raises_named(TypeError, "x", lambda: normkit.moments(x.astype(np.int32)))
    raises_named(TypeError, "layout", lambda: normkit.moments(x, layout=3))
    a, b = normkit.moments(x), normkit.moments(x, layout="NLC")
    raises_named(ValueError, "parts[1]", lambda: normkit.merge_moments(a, b))
    raises_named(TypeError, "parts[1]", lambda: normkit.merge_moments(a, "b"))
    raises_named(ValueError, "parts", lambda: normkit.merge_moments())
    raises_named(ValueError, "buffer", lambda: normkit.Moments.from_buffer(np.zeros(4), (6,)))
    raises_named(ValueError, "correction", lambda: a.var(correction=-1))
    raises_named(TypeError, "count", lambda: normkit.Moments(-1, np.zeros(2), np.zeros(2)))
    raises_named(ValueError, "m2", lambda: normkit.Moments(1, np.zeros(2), np.zeros(3)))


# --------------------------------------------------------------------------- distributed backward


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS_4D)
def test_backward_from_global_sums_equals_the_whole_batch(kernel_path, rng, layout, dtype):
    """Shards' grad sums added (the all-reduce) and each shard's backward from them:
    dx is the whole batch's dx, dweight / dbias the whole batch's (on every shard)."""
    dt = np_dtype(dtype)
    x = in_layout((rng.standard_normal((7, 5, 3, 4)) * 1e-1 + 50).astype(dt), layout)
    dy = in_layout(make_x(rng, (7, 5, 3, 4), np.float64).astype(dt), layout)
    w = (1 + 0.3 * rng.standard_normal(5)).astype(np.float32 if dtype == "bfloat16" else dt)
    cuts = [0, 3, 3, 7]  # one empty shard
    shards = [(x[a:b], dy[a:b]) for a, b in zip(cuts, cuts[1:])]
    m = normkit.merge_moments(*[normkit.moments(s, layout=layout) for s, _ in shards])
    rstd = m.rstd(1e-5)
    total_dy, total_dy_xmu, total_count = 0.0, 0.0, 0
    for s, g in shards:
        sdy, sdyx, count = normkit.batch_norm_grad_sums(g, s, m.mean, layout=layout)
        assert sdy.shape == (5,) and sdy.dtype == np.float64 and count == s.size // 5
        total_dy, total_dy_xmu, total_count = total_dy + sdy, total_dy_xmu + sdyx, total_count + count
    assert total_count == m.count
    dx_ref, dw_ref, db_ref = batch_norm_backward_ref(dy, x, w, training=True, layout=layout)
    for (s, g), lo in zip(shards, cuts):
        dx, dw, db = normkit.batch_norm_backward(g, s, m.mean, rstd, w, layout=layout, sum_dy=total_dy,
                                                 sum_dy_xmu=total_dy_xmu, count=total_count)
        assert dx.shape == s.shape and dx.dtype == s.dtype
        assert_close(dx, dx_ref[lo:lo + s.shape[0]], dt, what="dx", tol32=1e-4)
        assert_close(dw, dw_ref, w.dtype, what="dweight", tol32=1e-4)
        assert_close(db, db_ref, w.dtype, what="dbias", tol32=1e-4)


def test_backward_global_sums_bad_input(rng):
    x = make_x(rng, (4, 3, 6), np.float32)
    dy = make_x(rng, (4, 3, 6), np.float32)
    m = normkit.moments(x)
    sdy, sdyx, n = normkit.batch_norm_grad_sums(dy, x, m.mean)
    r = m.rstd(1e-5)
    raises_named(ValueError, "sum_dy_xmu", lambda: normkit.batch_norm_backward(dy, x, m.mean, r, sum_dy=sdy, count=n))
    raises_named(ValueError, "count", lambda: normkit.batch_norm_backward(dy, x, m.mean, r, sum_dy=sdy,
                                                                         sum_dy_xmu=sdyx))
    raises_named(ValueError, "count", lambda: normkit.batch_norm_backward(dy, x, m.mean, r, sum_dy=sdy,
                                                                         sum_dy_xmu=sdyx, count=n - 1))
    raises_named(ValueError, "sum_dy", lambda: normkit.batch_norm_backward(dy, x, m.mean, r, sum_dy=sdy[:2],
                                                                          sum_dy_xmu=sdyx, count=n))
    raises_named(ValueError, "sum_dy", lambda: normkit.batch_norm_backward(dy, x, m.mean, r, training=False,
                                                                          sum_dy=sdy, sum_dy_xmu=sdyx, count=n))
    raises_named(ValueError, "mean", lambda: normkit.batch_norm_grad_sums(dy, x, m.mean[:2]))
    raises_named(ValueError, "dy", lambda: normkit.batch_norm_grad_sums(dy[:2], x, m.mean))


# --------------------------------------------------------------------------- recalibration


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
def test_recalibrate_gives_population_statistics(rng, layout, dtype):
    dt = np_dtype(dtype)
    sizes = [3, 1, 7, 0, 5]
    shape = (6,) if layout == "NC" else (6, 4, 3)
    cf = [(rng.standard_normal((n, *shape)) * 0.05 + 300).astype(dt) for n in sizes]
    batches = [in_layout(b, layout) if layout != "NC" else b for b in cf]
    layer_dtype = np.float32 if dtype == "float16" else dt
    bn = normkit.BatchNorm(6, momentum=0.5, layout=layout, dtype=layer_dtype)
    bn.num_batches_tracked = 3
    consumed = []

    def stream():  # a one-pass iterable
        for b in batches:
            consumed.append(b.shape[0])
            yield b

    assert normkit.recalibrate_batch_norm(bn, stream()) is bn
    assert consumed == sizes
    allx = np.concatenate([np.moveaxis(b.astype(np.float64), -1 if layout == "NHWC" else 1, 1) for b in batches])
    per_channel = np.moveaxis(allx, 1, 0).reshape(6, -1)
    assert_running_close(bn.running_mean, per_channel.mean(axis=1), "running_mean")
    np.testing.assert_allclose(bn.running_var.astype(np.float64), per_channel.var(axis=1, ddof=1),
                               rtol=1e-3 if dtype == "float16" else 2e-5)
    assert int(bn.num_batches_tracked) == 3


def test_recalibrate_bad_input(rng):
    bn = normkit.BatchNorm(4, track_running_stats=False)
    raises_named(ValueError, "recalibrate", lambda: bn.recalibrate([np.ones((2, 4), np.float32)]))
    bn = normkit.BatchNorm(4)
    raises_named(ValueError, "batches[1]", lambda: bn.recalibrate([np.ones((2, 4)), np.ones((2, 5))]))
    raises_named(ValueError, "batches", lambda: bn.recalibrate([]))
    raises_named(TypeError, "layer", lambda: normkit.recalibrate_batch_norm(normkit.LayerNorm(4), []))
    assert np.array_equal(bn.running_mean, np.zeros(4)) and np.array_equal(bn.running_var, np.ones(4))

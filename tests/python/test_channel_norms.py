"""BatchNorm, InstanceNorm, GroupNorm and AdaIN forward against float64 references
(channel_reference.py) and PyTorch, in every layout, on every kernel path.

Every channel norm is run on a channels-first array and on the same values in
the channels-last layout of the same rank: each result is checked against the
float64 reference and the channels-last one against the transposed
channels-first one.

Tolerances (the constants and comparisons in helpers.py, a few more below) are
stated relative to the output's scale: ``scale = max(1, max |reference|)`` over the
compared array.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normkit
from channel_reference import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    adaptive_instance_norm_ref,
    batch_norm_ref,
    from_channels_first,
    group_norm_ref,
    instance_norm_ref,
    to_channels_first,
)
from helpers import (
    DTYPE_NAMES,
    TOL32,
    TOL64,
    UNIT_VAR_TOL,
    assert_close,
    assert_running_close,
    assert_stats_close,
    in_layout,
    make_params,
    make_x,
    np_dtype,
    raises_prefixed,
    same_bits,
    to_last,
)
from reference import stats_dtype

# --------------------------------------------------------------------------- tolerances

# TOL64, TOL32, ULPS16, STATS_TOL and UNIT_VAR_TOL: see helpers.py.
# Hostile data (mean 1e4, std 1e-2, float32): the normalized output within this of the
# float64 reference: the error must not scale with mean/std = 1e6 (a float32
# x * rstd - mean * rstd costs ~3e-2 here).
HOSTILE_TOL = 1e-4
# PyTorch float32 against normkit float32: both carry ~1e-6 of error.
TORCH_TOL32 = 2 * TOL32

CHANNELS = [1, 3, 17, 65]
SPATIAL = [1, 7, 33]
# (rank, spatial size); NC (rank 2) has no spatial dims: one case
RANK_SPATIAL = [(2, 1)] + [(r, s) for r in (3, 4, 5) for s in SPATIAL]
NORMS = ["bn_train", "bn_eval", "in", "in_track", "in_eval", "gn", "adain_map", "adain_pair"]
N = 3


# --------------------------------------------------------------------------- helpers


def spatial_shape(rank: int, s: int) -> tuple:
    """Spatial dims of a rank-`rank` array whose first spatial dim is s (odd products)."""
    if rank == 2:
        return ()
    if rank == 3:
        return (s,)
    if rank == 4:
        return (1, 1) if s == 1 else (s, 3)
    return (1, 1, 1) if s == 1 else (2, s, 3)


def make_cf(rng, n, c, rank, s, dtype, **kw):
    """A channels-first array with per-channel offsets (so channels differ)."""
    shape = (n, c) + spatial_shape(rank, s)
    x = rng.standard_normal(shape) * 2.0 + 0.5
    x += rng.uniform(-3, 3, size=(1, c) + (1,) * (rank - 2))
    return x.astype(dtype)


def make_running(rng, c, dtype):
    rm = rng.uniform(-1, 1, c).astype(dtype)
    rv = rng.uniform(0.5, 3, c).astype(dtype)
    return rm, rv


def divisors(c):
    return [g for g in range(1, c + 1) if c % g == 0]


def group_choices(c):
    """Several divisors of C, always 1 and C."""
    d = divisors(c)
    return d if len(d) <= 4 else [d[0], d[1], d[-2], d[-1]]


# --------------------------------------------------------------------------- one call, one reference


def make_case(rng, norm, c, rank, s, dtype, affine="both", param_dtype=None, stat_dtype=None, momentum=0.1):
    """The parameters of one call (channels-first style map included)."""
    pd = dtype if param_dtype is None else param_dtype
    sd = stats_dtype(dtype) if stat_dtype is None else stat_dtype
    p = {"momentum": momentum, "eps": 1e-5, "groups": 1, "rm": None, "rv": None, "style_cf": None, "pair": None}
    p["w"], p["b"] = make_params(rng, c, pd, affine)
    if norm in ("bn_train", "bn_eval", "in_track", "in_eval"):
        p["rm"], p["rv"] = make_running(rng, c, sd)
    if norm == "adain_map":
        s2 = {1: 4, 7: 12, 33: 3}[s]  # a different spatial size than x's
        p["style_cf"] = make_cf(rng, N, c, rank, s2, dtype)
    if norm == "adain_pair":
        p["pair"] = (rng.uniform(-2, 2, (N, c)).astype(pd), rng.uniform(0.2, 3, (N, c)).astype(pd))
    return p


def call_norm(norm, x, layout, p, **kw):
    """Runs `norm` on x; returns a dict y, mean, rstd (None for AdaIN), rm, rv (the updated copies)."""
    rm = None if p["rm"] is None else p["rm"].copy()
    rv = None if p["rv"] is None else p["rv"].copy()
    w, b, eps, mom = p["w"], p["b"], p["eps"], p["momentum"]
    mean = rstd = None
    if norm in ("bn_train", "bn_eval", "bn_train_nostats"):
        y, mean, rstd = normkit.batch_norm(x, rm, rv, w, b, norm != "bn_eval", mom, eps, layout=layout,
                                           return_stats=True, **kw)
    elif norm in ("in", "in_track", "in_eval"):
        y, mean, rstd = normkit.instance_norm(x, rm, rv, w, b, norm != "in_eval", mom, eps, layout=layout,
                                              return_stats=True, **kw)
    elif norm == "gn":
        y, mean, rstd = normkit.group_norm(x, p["groups"], w, b, eps, layout=layout, return_stats=True, **kw)
    elif norm == "adain_map":
        y = normkit.adaptive_instance_norm(x, in_layout(p["style_cf"], layout), eps, layout=layout, **kw)
    elif norm == "adain_pair":
        y = normkit.adaptive_instance_norm(x, p["pair"], eps, layout=layout, **kw)
    else:  # pragma: no cover
        raise AssertionError(norm)
    return {"y": y, "mean": mean, "rstd": rstd, "rm": rm, "rv": rv}


def ref_norm(norm, x, layout, p):
    w, b, eps, mom = p["w"], p["b"], p["eps"], p["momentum"]
    if norm in ("bn_train", "bn_eval", "bn_train_nostats"):
        y, mean, rstd, rm, rv = batch_norm_ref(x, p["rm"], p["rv"], w, b, norm != "bn_eval", mom, eps, layout)
    elif norm in ("in", "in_track", "in_eval"):
        y, mean, rstd, rm, rv = instance_norm_ref(x, p["rm"], p["rv"], w, b, norm != "in_eval", mom, eps, layout)
    elif norm == "gn":
        y, mean, rstd = group_norm_ref(x, p["groups"], w, b, eps, layout)
        rm = rv = None
    elif norm == "adain_map":
        y = adaptive_instance_norm_ref(x, in_layout(p["style_cf"], layout), eps, layout)
        mean = rstd = rm = rv = None
    else:
        y = adaptive_instance_norm_ref(x, p["pair"], eps, layout)
        mean = rstd = rm = rv = None
    return {"y": y, "mean": mean, "rstd": rstd, "rm": rm, "rv": rv}


def stats_shape(norm, n, c, groups):
    if norm.startswith("bn"):
        return (c,)
    if norm == "gn":
        return (n, groups)
    return (n, c)


def check_result(norm, res, ref, x, dtype, groups=1, what=""):
    y = res["y"]
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape, f"{what}: y {y.dtype} {y.shape}"
    assert_close(y, ref["y"], dtype, what=f"{what} y")
    if res["mean"] is not None:
        shape = stats_shape(norm, x.shape[0], ref["mean"].shape[-1], groups)
        assert res["mean"].shape == shape and res["rstd"].shape == shape, f"{what}: stats shape {res['mean'].shape}"
        assert_stats_close(res["mean"], ref["mean"], dtype, "mean", x)
        assert_stats_close(res["rstd"], ref["rstd"], dtype, "rstd")
    if ref["rm"] is not None:
        assert_running_close(res["rm"], ref["rm"], f"{what} running_mean")
        assert_running_close(res["rv"], ref["rv"], f"{what} running_var")


def needs_spatial(norm):
    """Norms that take statistics over the spatial axes only: 1 spatial element is an error."""
    return norm in ("in", "in_track", "adain_map", "adain_pair")


def run_both_layouts(norm, x_cf, rank, p, dtype, groups=1, what=""):
    """Runs norm on x_cf (channels-first) and its channels-last copy; checks each
    against the reference, the channels-last result against the transposed
    channels-first one, and that nothing but the running statistics was modified."""
    lay_cf, lay_cl = CHANNELS_FIRST[rank], CHANNELS_LAST[rank]
    results = {}
    for layout in dict.fromkeys([lay_cf, lay_cl]):
        x = x_cf if layout == lay_cf else in_layout(x_cf, layout)
        before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in p.items()}
        x_copy = x.copy()
        res = call_norm(norm, x, layout, p)
        ref = ref_norm(norm, x, layout, p)
        check_result(norm, res, ref, x, dtype, groups, what=f"{what} {layout}")
        assert same_bits(x, x_copy), f"{layout}: x was modified"
        for k, v in p.items():
            if isinstance(v, np.ndarray):
                assert same_bits(v, before[k]), f"{layout}: {k} was modified"
        results[layout] = res
    if lay_cl != lay_cf:
        a, b = results[lay_cf], results[lay_cl]
        assert_close(b["y"], from_channels_first(a["y"], lay_cl).astype(np.float64), dtype,
                     what=f"{what} channels-last vs transposed channels-first y")
        for k in ("mean", "rstd", "rm", "rv"):
            if a[k] is not None:
                assert_close(b[k], a[k].astype(np.float64), b[k].dtype, what=f"{what} {k} across layouts")
    return results


def run_case(norm, x_cf, rank, p, dtype, what=""):
    s = int(np.prod(x_cf.shape[2:], dtype=np.int64))
    if needs_spatial(norm) and s == 1:
        # PyTorch's rule: "Expected more than 1 spatial element when training"
        for layout in dict.fromkeys([CHANNELS_FIRST[rank], CHANNELS_LAST[rank]]):
            x = in_layout(x_cf, layout)
            raises_prefixed(ValueError, "x", lambda: call_norm(norm, x, layout, p))
        return
    if norm == "gn":
        c = x_cf.shape[1]
        for g in group_choices(c):
            p["groups"] = g
            run_both_layouts(norm, x_cf, rank, p, dtype, groups=g, what=f"G={g}")
        return
    run_both_layouts(norm, x_cf, rank, p, dtype, what=what)


# --------------------------------------------------------------------------- every norm, layout, path, shape


@pytest.mark.parametrize("rank,s", RANK_SPATIAL, ids=lambda v: str(v))
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("norm", NORMS)
def test_float32_every_layout(kernel_path, norm, c, rank, s, rng):
    dt = np.dtype(np.float32)
    x_cf = make_cf(rng, N, c, rank, s, dt)
    for affine in ("none", "both"):
        p = make_case(rng, norm, c, rank, s, dt, affine)
        run_case(norm, x_cf, rank, p, dt, what=affine)


@pytest.mark.parametrize("affine", ["weight", "bias"])
@pytest.mark.parametrize("norm", ["bn_train", "bn_eval", "in", "in_eval", "gn"])
def test_weight_only_bias_only(kernel_path, norm, affine, rng):
    dt = np.dtype(np.float32)
    x_cf = make_cf(rng, N, 17, 4, 7, dt)
    p = make_case(rng, norm, 17, 4, 7, dt, affine)
    run_case(norm, x_cf, 4, p, dt)


@pytest.mark.parametrize("rank,s,c", [(3, 33, 3), (4, 7, 17), (5, 7, 3), (2, 1, 65)], ids=str)
@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("norm", NORMS)
def test_other_dtypes(kernel_path, dtype, norm, rank, s, c, rng):
    dt = np_dtype(dtype)
    x_cf = make_cf(rng, N, c, rank, s, dt)
    p = make_case(rng, norm, c, rank, s, dt, "both")
    run_case(norm, x_cf, rank, p, dt)


@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda v: f"out+{v}")
@pytest.mark.parametrize("c", [8, 16, 24, 64, 320])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_channels_last_apply_column_runs(kernel_path, dtype, c, offset, rng):
    """The channels-last apply walks each row of C channels in runs of vectors to the
    row's end (the last vector of a run reads into the padded tables): C at and around
    the vector widths (8 and 16 lanes) and out= starting `offset` elements past a
    vector boundary, so runs start mid-row. BatchNorm inference (folded tables),
    training (centred) and GroupNorm (tables per sample), against float64."""
    dt = np_dtype(dtype)
    x = make_x(rng, (2, 9, 11, c), dt)  # NHWC: 198 rows of C channels
    w, b = make_params(rng, c, np.float32, "both")
    rm = rng.standard_normal(c).astype(np.float32)
    rv = (0.5 + rng.random(c)).astype(np.float32)
    cases = [
        ("bn_eval", lambda out: normkit.batch_norm(x, rm, rv, w, b, training=False, layout="NHWC", out=out),
         batch_norm_ref(x, rm, rv, w, b, False, layout="NHWC")[0]),
        ("bn_train", lambda out: normkit.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True, layout="NHWC",
                                                    out=out),
         batch_norm_ref(x, rm, rv, w, b, True, layout="NHWC")[0]),
        ("gn", lambda out: normkit.group_norm(x, 4, w, b, layout="NHWC", out=out),
         group_norm_ref(x, 4, w, b, layout="NHWC")[0]),
    ]
    for name, call, ref in cases:
        buf = np.full(x.size + offset + 8, 7, dt)
        out = buf[offset:offset + x.size].reshape(x.shape)
        y = call(out)
        assert y is out or np.shares_memory(y, out)
        assert_close(out, ref, dt, what=f"{name} C={c} out+{offset}")
        assert np.all(buf[:offset] == 7) and np.all(buf[offset + x.size:] == 7), f"{name}: wrote outside out"
        assert_close(call(None), ref, dt, what=f"{name} C={c} fresh")


@pytest.mark.parametrize("side", ["below", "at"])
@pytest.mark.parametrize("limit", [256, 1024])
@pytest.mark.parametrize("c", [3, 16, 17])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_channels_first_planes_around_the_columns_limit(kernel_path, dtype, c, limit, side, rng):
    """BatchNorm channels first: planes under 1 KiB go to the columns kernel's apply as
    rows of C * S columns (each channel's entry repeated over its plane), planes under
    256 bytes to its training statistics too; larger planes to the rows kernel, one
    row per plane. Planes just below and at each limit, C around the vector widths,
    training and inference, both layouts (the channels-last call is the columns
    kernel proper), against float64."""
    dt = np_dtype(dtype)
    s = limit // dt.itemsize - (3 if side == "below" else 0)  # odd below: vectors cross planes
    x_cf = make_cf(rng, 3, c, 3, s, dt)
    for norm in ("bn_train", "bn_eval"):
        p = make_case(rng, norm, c, 3, s, dt, "both")
        run_case(norm, x_cf, 3, p, dt, what=f"{norm} S={s}")


@pytest.mark.parametrize("s", [5, 49])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_channels_first_small_planes_in_channel_chunks(kernel_path, dtype, s, rng):
    """BatchNorm channels first: small planes go to the columns apply a chunk of
    channels at a time (tables of at most 64 KiB each: 16384 float32 or 8192 float64
    entries, whole planes), planes under 256 bytes whatever C. C filling two chunks
    and part of a third (so chunks end mid-vector and the last one is short),
    training and inference, both layouts, against float64."""
    dt = np_dtype(dtype)
    per_chunk = (64 * 1024) // (s * (8 if dtype == "float64" else 4))
    c = 2 * per_chunk + 7
    x_cf = make_cf(rng, 3, c, 3, s, dt)
    for norm in ("bn_train", "bn_eval"):
        p = make_case(rng, norm, c, 3, s, dt, "both")
        run_case(norm, x_cf, 3, p, dt, what=f"{norm} C={c} S={s}")


@pytest.mark.parametrize("params", ["float32", "same"])
@pytest.mark.parametrize("stats", ["float32", "same"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("norm", ["bn_train", "bn_eval", "in_track", "in_eval", "gn", "adain_pair"])
def test_16bit_param_and_running_stat_dtypes(kernel_path, norm, dtype, stats, params, rng):
    """16-bit x: weight/bias (and the AdaIN pair) may be x's dtype or float32, running
    statistics float32 or x's dtype; float32 ones are used at float32 precision."""
    dt = np_dtype(dtype)
    pd = np.dtype(np.float32) if params == "float32" else dt
    sd = np.dtype(np.float32) if stats == "float32" else dt
    x_cf = make_cf(rng, N, 17, 4, 7, dt)
    p = make_case(rng, norm, 17, 4, 7, dt, "both", param_dtype=pd, stat_dtype=sd)
    run_case(norm, x_cf, 4, p, dt)
    if p["rm"] is not None and norm in ("bn_train", "in_track"):
        res = call_norm(norm, x_cf, None, p)
        assert res["rm"].dtype == sd and res["rv"].dtype == sd


def test_16bit_mixed_weight_bias_dtypes(rng):
    dt = np.dtype(np.float16)
    x_cf = make_cf(rng, N, 17, 4, 7, dt)
    w16, b16 = make_params(rng, 17, dt, "both")
    ref = group_norm_ref(x_cf, 17, w16, b16)[0]
    for w, b in [(w16, b16.astype(np.float32)), (w16.astype(np.float32), b16)]:
        assert_close(normkit.group_norm(x_cf, 17, w, b), ref, dt)
        assert_close(normkit.batch_norm(x_cf, None, None, w, b, training=True),
                     batch_norm_ref(x_cf, None, None, w16, b16, True)[0], dt)


# --------------------------------------------------------------------------- BatchNorm specifics


@pytest.mark.parametrize("layout", ["NC", "NCL", "NLC", "NCHW", "NHWC", "NCDHW", "NDHWC"])
def test_batch_norm_training_without_running_stats(kernel_path, layout, rng):
    rank = len(layout)
    dt = np.dtype(np.float32)
    x = in_layout(make_cf(rng, 4, 17, rank, 7, dt), layout)
    w, b = make_params(rng, 17, dt, "both")
    y, mean, rstd = normkit.batch_norm(x, None, None, w, b, training=True, layout=layout, return_stats=True)
    ref_y, ref_mean, ref_rstd, _, _ = batch_norm_ref(x, None, None, w, b, True, layout=layout)
    assert_close(y, ref_y, dt)
    assert_stats_close(mean, ref_mean, dt, "mean", x)
    assert_stats_close(rstd, ref_rstd, dt, "rstd")


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_norm_running_stats_over_steps(kernel_path, layout, momentum, dtype, rng):
    """Several successive training calls update the running statistics in place like
    new = (1 - momentum) * old + momentum * batch, with the unbiased batch variance."""
    dt = np.dtype(dtype)
    rank = len(layout)
    c = 17
    rm, rv = make_running(rng, c, dt)
    rm0, rv0 = rm.copy(), rv.copy()
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    rm_id, rv_id = id(rm), id(rv)
    for step in range(4):
        x = in_layout(make_cf(rng, 5, c, rank, 7, dt) * (step + 1), layout)
        y = normkit.batch_norm(x, rm, rv, training=True, momentum=momentum, layout=layout)
        ref_y, _, _, rm_ref, rv_ref = batch_norm_ref(x, rm_ref, rv_ref, None, None, True, momentum, layout=layout)
        assert_close(y, ref_y, dt)
        assert id(rm) == rm_id and id(rv) == rv_id
        assert_running_close(rm, rm_ref, f"running_mean step {step}")
        assert_running_close(rv, rv_ref, f"running_var step {step}")
    if momentum == 0.0:
        assert same_bits(rm, rm0) and same_bits(rv, rv0), "momentum 0 changed the running statistics"
    # inference with the accumulated statistics
    x = in_layout(make_cf(rng, 2, c, rank, 7, dt), layout)
    y, mean, rstd = normkit.batch_norm(x, rm, rv, layout=layout, return_stats=True)
    ref_y, ref_mean, ref_rstd, _, _ = batch_norm_ref(x, rm, rv, layout=layout)
    assert_close(y, ref_y, dt)
    np.testing.assert_array_equal(mean, rm)  # eval: mean is running_mean
    assert_stats_close(rstd, ref_rstd, dt, "rstd")


def test_batch_norm_eval_leaves_running_stats(rng):
    dt = np.dtype(np.float32)
    x = make_cf(rng, 4, 5, 4, 7, dt)
    rm, rv = make_running(rng, 5, dt)
    rm0, rv0 = rm.copy(), rv.copy()
    normkit.batch_norm(x, rm, rv, training=False)
    assert same_bits(rm, rm0) and same_bits(rv, rv0)
    # read-only running statistics are fine in inference
    rm.flags.writeable = False
    rv.flags.writeable = False
    normkit.batch_norm(x, rm, rv)
    normkit.instance_norm(x, rm, rv, use_input_stats=False)


@pytest.mark.parametrize("layout", ["NC", "NCL", "NLC", "NCHW", "NHWC"])
def test_batch_norm_training_two_values_per_channel(kernel_path, layout, rng):
    """The smallest legal training batch: 2 values per channel (unbiased var = 2 * biased)."""
    rank = len(layout)
    shape_cf = (2, 5) + (1,) * (rank - 2) if layout != "NCL" and layout != "NLC" else (1, 5, 2)
    x = in_layout(make_x(rng, shape_cf, np.float64), layout)
    rm, rv = make_running(rng, 5, np.float64)
    ref = batch_norm_ref(x, rm, rv, None, None, True, layout=layout)
    y = normkit.batch_norm(x, rm, rv, training=True, layout=layout)
    assert_close(y, ref[0], np.float64)
    assert_running_close(rm, ref[3], "running_mean")
    assert_running_close(rv, ref[4], "running_var")


@pytest.mark.parametrize("rank,s,c", [(3, 49, 17), (4, 7, 65), (4, 350, 3), (5, 33, 5)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_batch_norm_training_one_sample(kernel_path, dtype, rank, s, c, rng):
    """BatchNorm training on one sample: channels first, each channel's statistics are
    its plane's and the call takes InstanceNorm's fused rows. Planes of 49 values to
    several KiB, against float64, the channels-last call (the columns kernel) and the
    running statistics; then far off zero (a mean 1e4 times the spread)."""
    dt = np_dtype(dtype)
    x_cf = make_cf(rng, 1, c, rank, s, dt)
    run_case("bn_train", x_cf, rank, make_case(rng, "bn_train", c, rank, s, dt, "both"), dt)
    if dtype in ("float32", "float64"):
        far = (x_cf.astype(np.float64) * 0.5 + 2e4).astype(dt)
        run_case("bn_train", far, rank, make_case(rng, "bn_train", c, rank, s, dt, "both"), dt, what="mean 2e4")


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)], ids=str)
def test_batch_norm_training_one_value_per_channel(shape):
    x = np.ones(shape, np.float32)
    raises_prefixed(ValueError, "x", lambda: normkit.batch_norm(x, None, None, training=True))
    # inference is fine
    y = normkit.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32))
    assert y.shape == shape


# --------------------------------------------------------------------------- InstanceNorm specifics


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("layout", ["NCL", "NLC", "NCHW", "NHWC"])
def test_instance_norm_running_stats_over_steps(kernel_path, layout, momentum, rng):
    """Running statistics move with the batch mean of the per-instance mean and
    unbiased variance; use_input_stats=False then normalizes with them."""
    dt = np.dtype(np.float64)
    rank = len(layout)
    c = 7
    rm, rv = make_running(rng, c, dt)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    for step in range(3):
        x = in_layout(make_cf(rng, 4, c, rank, 7, dt), layout)
        y = normkit.instance_norm(x, rm, rv, momentum=momentum, layout=layout)
        ref_y, _, _, rm_ref, rv_ref = instance_norm_ref(x, rm_ref, rv_ref, None, None, True, momentum, layout=layout)
        assert_close(y, ref_y, dt)
        assert_running_close(rm, rm_ref, f"running_mean step {step}")
        assert_running_close(rv, rv_ref, f"running_var step {step}")
    x = in_layout(make_cf(rng, 2, c, rank, 7, dt), layout)
    y = normkit.instance_norm(x, rm, rv, use_input_stats=False, layout=layout)
    assert_close(y, instance_norm_ref(x, rm, rv, None, None, False, layout=layout)[0], dt)


def test_instance_norm_use_input_stats_false_needs_no_spatial(rng):
    x = make_x(rng, (3, 5), np.float32)
    rm, rv = make_running(rng, 5, np.float32)
    y = normkit.instance_norm(x, rm, rv, use_input_stats=False)
    assert_close(y, instance_norm_ref(x, rm, rv, use_input_stats=False)[0], np.float32)


# --------------------------------------------------------------------------- GroupNorm identities


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_group_norm_one_group_is_layer_norm(kernel_path, rank, dtype, rng):
    dt = np.dtype(dtype)
    x = make_cf(rng, N, 6, rank, 7, dt)
    y = normkit.group_norm(x, 1)
    ln = normkit.layer_norm(x, x.shape[1:])
    assert_close(y, ln.astype(np.float64), dt)
    # channels-last: the same values transposed
    lay = CHANNELS_LAST[rank]
    y_cl = normkit.group_norm(in_layout(x, lay), 1, layout=lay)
    assert_close(y_cl, from_channels_first(ln, lay).astype(np.float64), dt)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_group_norm_c_groups_is_instance_norm(kernel_path, rank, dtype, rng):
    dt = np.dtype(dtype)
    c = 6
    x = make_cf(rng, N, c, rank, 7, dt)
    w, b = make_params(rng, c, dt, "both")
    for layout in (CHANNELS_FIRST[rank], CHANNELS_LAST[rank]):
        xl = in_layout(x, layout)
        y, m, r = normkit.group_norm(xl, c, w, b, layout=layout, return_stats=True)
        yi, mi, ri = normkit.instance_norm(xl, weight=w, bias=b, layout=layout, return_stats=True)
        assert_close(y, yi.astype(np.float64), dt)
        assert_close(m, mi.astype(np.float64), dt)
        assert_close(r, ri.astype(np.float64), dt)


# --------------------------------------------------------------------------- layouts: names, enum, default


@pytest.mark.parametrize("norm", ["bn_train", "bn_eval", "in", "gn", "adain_map"])
def test_layout_enum_string_default_agree(norm, rng):
    dt = np.dtype(np.float32)
    for rank in (2, 3, 4, 5):
        s = 1 if rank == 2 else 7
        if norm in ("in", "adain_map") and rank == 2:
            continue
        x_cf = make_cf(rng, N, 6, rank, s, dt)
        p = make_case(rng, norm, 6, rank, s, dt)
        p["groups"] = 3
        for layout in (CHANNELS_FIRST[rank], CHANNELS_LAST[rank]):
            x = in_layout(x_cf, layout)
            by_name = call_norm(norm, x, layout, p)
            by_enum = call_norm(norm, x, getattr(normkit.Layout, layout), p)
            for k in ("y", "mean", "rstd", "rm", "rv"):
                if by_name[k] is not None:
                    assert same_bits(by_name[k], by_enum[k]), f"{layout}: {k} differs for the enum"
        # the default is channels-first of x's rank
        default = call_norm(norm, x_cf, None, p)
        explicit = call_norm(norm, x_cf, CHANNELS_FIRST[rank], p)
        for k in ("y", "mean", "rstd", "rm", "rv"):
            if default[k] is not None:
                assert same_bits(default[k], explicit[k]), f"rank {rank}: default layout differs in {k}"


# --------------------------------------------------------------------------- AdaIN


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("layout", ["NCL", "NLC", "NCHW", "NHWC", "NCDHW", "NDHWC"])
def test_adain_style_map_of_other_size_equals_pair(kernel_path, layout, dtype, rng):
    """A feature-map style (different spatial size) means the same as the (mean, std)
    pair of its statistics, std = sqrt(var + eps)."""
    dt = np_dtype(dtype)
    rank = len(layout)
    x = in_layout(make_cf(rng, N, 5, rank, 7, dt), layout)
    style = in_layout(make_cf(rng, N, 5, rank, 33, dt) * 3 + 1, layout)
    assert style.shape != x.shape
    y = normkit.adaptive_instance_norm(x, style, layout=layout)
    assert_close(y, adaptive_instance_norm_ref(x, style, layout=layout), dt)
    sc = to_channels_first(style, layout).astype(np.float64).reshape(N, 5, -1)
    s_mean = sc.mean(axis=2)
    s_std = np.sqrt(sc.var(axis=2) + 1e-5)
    pd = np.float64 if dt == np.float64 else np.float32
    pair = (s_mean.astype(pd), s_std.astype(pd))
    y_pair = normkit.adaptive_instance_norm(x, pair, layout=layout)
    assert_close(y_pair, adaptive_instance_norm_ref(x, pair, layout=layout), dt)
    # the map and the pair agree (up to the float32 rounding of the pair)
    assert_close(y, y_pair.astype(np.float64), dt, tol32=1e-5)


def test_adain_pair_as_lists_and_float64(rng):
    x = make_cf(rng, 2, 3, 4, 7, np.float32)
    mean = rng.uniform(-1, 1, (2, 3))
    std = rng.uniform(0.5, 2, (2, 3))
    y = normkit.adaptive_instance_norm(x, (mean.astype(np.float32), std.astype(np.float32)))
    assert same_bits(normkit.adaptive_instance_norm(x, [mean.astype(np.float32).tolist(),
                                                        std.astype(np.float32).tolist()]), y)
    assert same_bits(normkit.adaptive_instance_norm(x, (mean, std)), y)


def test_adain_with_itself_as_style_is_identity(rng):
    x = make_cf(rng, 2, 3, 4, 7, np.float64)
    y = normkit.adaptive_instance_norm(x, x, eps=0.0)
    assert_close(y, x.astype(np.float64), np.float64)


# --------------------------------------------------------------------------- out=


OUT_NORMS = ["bn_train", "bn_eval", "in_track", "in_eval", "gn", "adain_map", "adain_pair"]


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("norm", OUT_NORMS)
def test_out_given_and_in_place(kernel_path, norm, rank, dtype, rng):
    dt = np_dtype(dtype)
    s = 1 if rank == 2 else 7
    if rank == 2 and norm in ("in_track", "adain_map", "adain_pair"):
        pytest.skip("needs spatial elements")
    x_cf = make_cf(rng, N, 17, rank, s, dt)
    p = make_case(rng, norm, 17, rank, s, dt)
    p["groups"] = 17 if rank == 2 else 1
    for layout in dict.fromkeys([CHANNELS_FIRST[rank], CHANNELS_LAST[rank]]):
        x = in_layout(x_cf, layout)
        fresh = call_norm(norm, x, layout, p)
        out = np.full_like(x, np.nan)
        given = call_norm(norm, x, layout, p, out=out)
        assert given["y"] is out
        for k in ("y", "mean", "rstd", "rm", "rv"):
            if fresh[k] is not None:
                assert same_bits(given[k], fresh[k]), f"{layout} out=: {k} differs"
        xi = x.copy()
        inplace = call_norm(norm, xi, layout, p, out=xi)
        assert inplace["y"] is xi
        for k in ("y", "mean", "rstd", "rm", "rv"):
            if fresh[k] is not None:
                # running statistics come from the original x, not the output
                assert same_bits(inplace[k], fresh[k]), f"{layout} out=x: {k} differs"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_group_norm_direct_call_matches_the_general_intake(kernel_path, layout, dtype, rng):
    """The plain NumPy group_norm call goes straight to the kernel; the same call through the
    general intake (return_stats=True, a Fortran-ordered x copied first, an int-like eps)
    gives the same bits, and out= (x itself included) is written and returned as itself."""
    x = in_layout(make_cf(rng, 3, 64, 4, 9, np.dtype(dtype)), layout)
    w = rng.standard_normal(64).astype(dtype)
    b = rng.standard_normal(64).astype(dtype)
    direct = normkit.group_norm(x, 8, w, b, 1e-5, layout=layout)
    general, _, _ = normkit.group_norm(x, 8, w, b, np.float64(1e-5), layout=layout, return_stats=True)
    assert same_bits(direct, general)
    assert same_bits(normkit.group_norm(np.asfortranarray(x), 8, w, b, layout=layout), direct)
    out = np.full_like(x, np.nan)
    assert normkit.group_norm(x, 8, w, b, layout=layout, out=out) is out
    assert same_bits(out, direct)
    xi = x.copy()
    assert normkit.group_norm(xi, 8, w, b, layout=layout, out=xi) is xi
    assert same_bits(xi, direct)


def test_group_norm_direct_call_errors_are_the_general_ones():
    """A bad argument on the direct path falls back to the general intake, whose message names it."""
    x = np.ones((2, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="num_groups"):
        normkit.group_norm(x, 3, layout="NHWC")
    with pytest.raises(ValueError, match="weight"):
        normkit.group_norm(x, 2, np.ones(7, np.float32), layout="NHWC")
    with pytest.raises(ValueError, match="out"):
        normkit.group_norm(x, 2, out=np.empty((2, 4, 4, 9), np.float32))
    with pytest.raises(ValueError, match="layout"):
        normkit.group_norm(x, 2, layout="NWHC")
    buf = np.ones(x.size + 1, np.float32)  # out one element past x: a partial overlap
    with pytest.raises(ValueError, match="out"):
        normkit.group_norm(buf[:-1].reshape(x.shape), 2, layout="NHWC", out=buf[1:].reshape(x.shape))


# --------------------------------------------------------------------------- non-contiguous inputs


# name -> (base maker(rng, dtype), view of a base, layout of the view). The base is a fresh
# array (channels-first or channels-last memory); the view is what the norm gets.
VIEW_CASES = {
    "cl_view_of_cf": (lambda r, dt: make_cf(r, N, 5, 4, 7, dt), lambda b: np.moveaxis(b, 1, -1), "NHWC"),
    "cf_view_of_cl": (lambda r, dt: in_layout(make_cf(r, N, 5, 4, 7, dt), "NHWC"), lambda b: np.moveaxis(b, -1, 1),
                      "NCHW"),
    "every_other_channel": (lambda r, dt: make_cf(r, N, 10, 4, 7, dt), lambda b: b[:, ::2], "NCHW"),
    "every_other_channel_cl": (lambda r, dt: in_layout(make_cf(r, N, 10, 4, 7, dt), "NHWC"), lambda b: b[..., ::2],
                               "NHWC"),
    "negative_spatial_stride": (lambda r, dt: make_cf(r, N, 5, 4, 7, dt), lambda b: b[:, :, ::-1], "NCHW"),
    "reversed_batch_cl": (lambda r, dt: in_layout(make_cf(r, N, 5, 4, 7, dt), "NHWC"), lambda b: b[::-1], "NHWC"),
    "fortran_ncl": (lambda r, dt: np.asfortranarray(make_cf(r, N, 5, 3, 33, dt)), lambda b: b, "NCL"),
    "sliced_nc": (lambda r, dt: make_cf(r, 9, 12, 2, 1, dt), lambda b: b[1:7, 2:9], "NC"),
}


def make_view(rng, case, dt):
    make_base, view_of, layout = VIEW_CASES[case]
    base = make_base(rng, dt)
    return base, view_of(base), layout


@pytest.mark.parametrize("case", list(VIEW_CASES))
@pytest.mark.parametrize("norm", ["bn_train", "bn_eval", "in_track", "gn", "adain_map", "adain_pair"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_noncontiguous_input(kernel_path, norm, case, dtype, rng):
    dt = np.dtype(dtype)
    base, xv, layout = make_view(rng, case, dt)
    assert not xv.flags.c_contiguous
    rank = xv.ndim
    if rank == 2 and norm in ("in_track", "adain_map", "adain_pair"):
        pytest.skip("needs spatial elements")
    c = xv.shape[1] if layout in ("NC", "NCL", "NCHW") else xv.shape[-1]
    p = make_case(rng, norm, c, max(rank, 3), 7, dt)
    if norm == "adain_map":  # a style of xv's rank (another spatial size), in its layout
        p["style_cf"] = make_cf(rng, xv.shape[0], c, rank, 7, dt)
    base_copy = base.copy(order="K")
    res = call_norm(norm, xv, layout, p)
    ref = ref_norm(norm, xv, layout, p)
    check_result(norm, res, ref, xv, dt)
    assert same_bits(base, base_copy), "input modified"
    contiguous = call_norm(norm, np.ascontiguousarray(xv), layout, p)
    for k in ("y", "mean", "rstd", "rm", "rv"):
        if res[k] is not None:
            assert same_bits(res[k], contiguous[k]), f"{k} differs from a contiguous copy's"


@pytest.mark.parametrize("case", list(VIEW_CASES))
@pytest.mark.parametrize("norm", ["bn_train", "in", "gn"])
def test_noncontiguous_in_place(case, norm, rng):
    """out=x on a view writes x's elements and nothing else of the base array."""
    dt = np.dtype(np.float32)
    base, xv, layout = make_view(rng, case, dt)
    if xv.ndim == 2 and norm == "in":
        pytest.skip("needs spatial elements")
    c = xv.shape[1] if layout in ("NC", "NCL", "NCHW") else xv.shape[-1]
    p = make_case(rng, norm, c, 4, 7, dt)
    fresh = call_norm(norm, np.ascontiguousarray(xv), layout, p)["y"]
    # the base (in logical C order) with only the view's elements replaced
    idx = np.arange(base.size).reshape(base.shape)
    idx_view = VIEW_CASES[case][1](idx)
    expected_flat = base.ravel(order="C").copy()
    expected_flat[idx_view.ravel()] = fresh.ravel()
    res = call_norm(norm, xv, layout, p, out=xv)
    assert res["y"] is xv
    assert same_bits(np.ascontiguousarray(xv), fresh)
    assert same_bits(base.ravel(order="C"), expected_flat), "in-place wrote outside x"


@pytest.mark.parametrize("norm", ["bn_train", "in", "gn", "adain_map"])
def test_noncontiguous_out(norm, rng):
    """A non-contiguous out either receives the right values or is refused with a
    ValueError naming `out` (never wrong values)."""
    dt = np.dtype(np.float32)
    x = make_cf(rng, N, 5, 4, 7, dt)
    p = make_case(rng, norm, 5, 4, 7, dt)
    expected = call_norm(norm, x, "NCHW", p)["y"]
    for out in (np.moveaxis(np.zeros((N,) + x.shape[2:] + (5,), dt), -1, 1), np.zeros((N, 10, 7, 3), dt)[:, ::2]):
        try:
            res = call_norm(norm, x, "NCHW", p, out=out)
        except ValueError as e:
            assert str(e).startswith("out"), f"message does not name out: {e}"
        else:
            assert res["y"] is out
            assert same_bits(np.ascontiguousarray(out), expected)


def test_torch_tensor_input(torch, rng):
    x = make_cf(rng, N, 5, 4, 7, np.float32)
    rm, rv = make_running(rng, 5, np.float32)
    y = normkit.batch_norm(torch.from_numpy(x), rm, rv)  # torch in, torch out (test_arrays.py has the rest)
    assert isinstance(y, torch.Tensor) and same_bits(y.numpy(), normkit.batch_norm(x, rm, rv))
    assert same_bits(normkit.group_norm(torch.from_numpy(x), 5).numpy(), normkit.group_norm(x, 5))
    xl = torch.from_numpy(x).permute(0, 2, 3, 1)  # a channels-last view
    assert same_bits(normkit.instance_norm(xl, layout="NHWC").numpy(),
                     normkit.instance_norm(in_layout(x, "NHWC"), layout="NHWC"))


# --------------------------------------------------------------------------- empty arrays

# (norm, channels-first shape); every case is also run in the channels-last layout.
EMPTY_CASES = [
    (norm, shape)
    for norm in ("bn_eval", "bn_train", "in", "gn", "adain")
    for shape in [(0, 3), (0, 3, 5), (0, 3, 4, 4), (0, 3, 2, 2, 2), (2, 3, 0), (2, 3, 0, 4), (2, 0, 4), (2, 0, 2, 2)]
]

_EMPTY_SCRIPT = textwrap.dedent(
    """
    import sys, json, numpy as np, normkit
    CL = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}
    CF = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
    for line in sys.stdin:
        key, norm, shape, last = json.loads(line)
        shape = tuple(shape)
        rank = len(shape)
        c = shape[1]
        layout = CL[rank] if last else CF[rank]
        x = np.zeros(shape, np.float32)
        if last:
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        print("START", key, flush=True)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        try:
            if norm == "bn_eval":
                y = normkit.batch_norm(x, rm, rv, layout=layout)
            elif norm == "bn_train":
                y = normkit.batch_norm(x, rm, rv, training=True, layout=layout)
            elif norm == "in":
                y = normkit.instance_norm(x, rm, rv, layout=layout)
            elif norm == "gn":
                y = normkit.group_norm(x, 1, layout=layout)
            else:
                y = normkit.adaptive_instance_norm(x, x, layout=layout)
            res = {"shape": list(y.shape), "dtype": str(y.dtype), "rm": rm.tolist(), "rv": rv.tolist()}
        except Exception as e:
            res = {"error": type(e).__name__, "message": str(e)}
        print("DONE", key, json.dumps(res), flush=True)
    """
)


def _run_empty_cases():
    """Runs every empty case in a child process (a crash must not take the test run
    down); a case that kills the child is recorded with the signal and the rest rerun."""
    import json

    todo = [(f"{norm}-{'x'.join(map(str, shape))}-{last}", norm, shape, last)
            for norm, shape in EMPTY_CASES for last in (False, True)]
    results = {}
    while todo:
        env = dict(os.environ)
        env.pop("NORMKIT_ISA", None)
        proc = subprocess.run([sys.executable, "-c", _EMPTY_SCRIPT], input="\n".join(json.dumps(t) for t in todo),
                              capture_output=True, text=True, timeout=120, env=env)
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = line.split()[1]
            elif line.startswith("DONE "):
                _, key, payload = line.split(" ", 2)
                results[key] = json.loads(payload)
                started = None
        if proc.returncode != 0:
            assert started is not None, proc.stderr
            results[started] = {"crash": proc.returncode}
        todo = [t for t in todo if t[0] not in results]
    return results


@pytest.fixture(scope="module")
def empty_results():
    return _run_empty_cases()


def _empty_key(norm, shape, last):
    return f"{norm}-{'x'.join(map(str, shape))}-{last}"


@pytest.mark.parametrize("last", [False, True], ids=["channels_first", "channels_last"])
@pytest.mark.parametrize("norm,shape", EMPTY_CASES, ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_empty_no_crash(empty_results, norm, shape, last):
    """Empty arrays never crash the process; a result has x's shape and dtype."""
    res = empty_results[_empty_key(norm, shape, last)]
    assert "crash" not in res, f"the process died (exit status {res['crash']}, a signal when negative)"
    if "error" in res:
        assert res["error"] in ("ValueError", "TypeError"), res
        return
    cl_shape = shape if not last else (shape[0],) + shape[2:] + (shape[1],)
    assert tuple(res["shape"]) == cl_shape and res["dtype"] == "float32"


@pytest.mark.parametrize("last", [False, True], ids=["channels_first", "channels_last"])
@pytest.mark.parametrize("norm,shape", [c for c in EMPTY_CASES if c[0] != "adain"],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_empty_like_torch(torch, empty_results, norm, shape, last):
    """Where PyTorch accepts an empty input, normkit does too (same shape, running
    statistics as PyTorch leaves them); where PyTorch refuses it, normkit may refuse
    it with a ValueError."""
    F = torch.nn.functional
    c = shape[1]
    x = torch.zeros(shape)
    rm, rv = torch.zeros(c), torch.ones(c)
    try:
        if norm == "bn_eval":
            y = F.batch_norm(x, rm, rv)
        elif norm == "bn_train":
            y = F.batch_norm(x, rm, rv, training=True)
        elif norm == "in":
            y = F.instance_norm(x, rm, rv)
        else:
            y = F.group_norm(x, 1)
        expected = {"shape": tuple(y.shape), "rm": rm.tolist(), "rv": rv.tolist()}
    except (ValueError, RuntimeError):
        expected = None
    res = empty_results[_empty_key(norm, shape, last)]
    assert "crash" not in res, f"the process died (exit status {res['crash']})"
    if expected is None:
        assert "error" not in res or res["error"] == "ValueError", res
        return
    assert "error" not in res, f"PyTorch accepts this empty input, normkit raised {res['error']}: {res['message']}"
    cl_shape = shape if not last else (shape[0],) + shape[2:] + (shape[1],)
    assert tuple(res["shape"]) == cl_shape
    if norm == "bn_train":
        np.testing.assert_array_equal(res["rm"], expected["rm"])
        np.testing.assert_array_equal(res["rv"], expected["rv"])
    elif norm == "in" and shape[0] == 0:
        # PyTorch averages the per-instance statistics over an empty batch and sets
        # the running statistics to NaN; leaving them unchanged is as good
        for got, torch_value, old in ((res["rm"], expected["rm"], 0.0), (res["rv"], expected["rv"], 1.0)):
            assert np.array_equal(got, torch_value, equal_nan=True) or np.all(np.array(got) == old), got
    elif norm == "in":
        np.testing.assert_array_equal(res["rm"], expected["rm"])
        np.testing.assert_array_equal(res["rv"], expected["rv"])


# --------------------------------------------------------------------------- PyTorch as a second oracle


TORCH_SHAPES = [(4, 17), (3, 5, 33), (2, 6, 7, 9), (2, 3, 4, 5, 6), (5, 1, 8, 8)]


def _torch_call(torch, norm, x_cf, rm, rv, w, b, momentum, groups):
    F = torch.nn.functional
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731 - shares memory: updates visible
    if norm == "bn_train":
        return F.batch_norm(t(x_cf), t(rm), t(rv), t(w), t(b), True, momentum, 1e-5).numpy()
    if norm == "bn_eval":
        return F.batch_norm(t(x_cf), t(rm), t(rv), t(w), t(b), False, momentum, 1e-5).numpy()
    if norm == "in_track":
        return F.instance_norm(t(x_cf), t(rm), t(rv), t(w), t(b), True, momentum, 1e-5).numpy()
    if norm == "in_eval":
        return F.instance_norm(t(x_cf), t(rm), t(rv), t(w), t(b), False, momentum, 1e-5).numpy()
    if norm == "in":
        return F.instance_norm(t(x_cf), None, None, t(w), t(b), True, momentum, 1e-5).numpy()
    return F.group_norm(t(x_cf), groups, t(w), t(b), 1e-5).numpy()


@pytest.mark.parametrize("last", [False, True], ids=["channels_first", "channels_last"])
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm", ["bn_train", "bn_eval", "in", "in_track", "in_eval", "gn"])
def test_matches_torch_over_steps(torch, kernel_path, norm, dtype, shape, last, rng):
    """Against torch.nn.functional over several successive calls (running statistics
    updated in place by both, starting from the same values)."""
    dt = np.dtype(dtype)
    rank = len(shape)
    c = shape[1]
    if norm in ("in", "in_track") and rank == 2:
        pytest.skip("InstanceNorm needs spatial elements")
    layout = CHANNELS_LAST[rank] if last else CHANNELS_FIRST[rank]
    rm, rv = make_running(rng, c, dt)
    rm_t, rv_t = rm.copy(), rv.copy()
    w, b = make_params(rng, c, dt, "both")
    # (no groups of a single element: PyTorch's folded x * scale + shift loses ~1e-4 there)
    groups = {17: 1, 5: 5, 6: 3, 3: 1, 1: 1}[c]
    tol32 = TORCH_TOL32
    for step in range(3):
        x_cf = (rng.standard_normal(shape) * (step + 1) + rng.uniform(-2, 2, (1, c) + (1,) * (rank - 2))).astype(dt)
        expected = _torch_call(torch, norm, x_cf, rm_t, rv_t, w, b, 0.2, groups)
        x = in_layout(x_cf, layout)
        if norm == "gn":
            y = normkit.group_norm(x, groups, w, b, layout=layout)
        elif norm == "in":
            y = normkit.instance_norm(x, None, None, w, b, layout=layout)
        elif norm.startswith("bn"):
            y = normkit.batch_norm(x, rm, rv, w, b, norm == "bn_train", 0.2, layout=layout)
        else:
            y = normkit.instance_norm(x, rm, rv, w, b, norm == "in_track", 0.2, layout=layout)
        assert_close(to_channels_first(y, layout), expected.astype(np.float64), dt, what=f"step {step} y",
                     tol32=tol32)
        if norm not in ("gn", "in"):
            np.testing.assert_allclose(rm, rm_t, rtol=tol32 if dt == np.float32 else TOL64, atol=1e-6 if
                                       dt == np.float32 else 1e-13, err_msg=f"step {step} running_mean")
            np.testing.assert_allclose(rv, rv_t, rtol=tol32 if dt == np.float32 else TOL64, atol=1e-6 if
                                       dt == np.float32 else 1e-13, err_msg=f"step {step} running_var")


@pytest.mark.parametrize("norm", ["bn", "in", "gn"])
def test_torch_default_arguments_agree(torch, norm, rng):
    """Defaults (eps=1e-5, momentum=0.1, channels-first) are PyTorch's."""
    F = torch.nn.functional
    x = (rng.standard_normal((4, 6, 5, 5)) * 0.01).astype(np.float32)  # small variance: eps matters
    rm, rv = make_running(rng, 6, np.float32)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    if norm == "bn":
        expected = F.batch_norm(torch.from_numpy(x), rm_t, rv_t, training=True).numpy()
        y = normkit.batch_norm(x, rm, rv, training=True)
        np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-5, atol=1e-7)
    elif norm == "in":
        expected = F.instance_norm(torch.from_numpy(x)).numpy()
        y = normkit.instance_norm(x)
    else:
        expected = F.group_norm(torch.from_numpy(x), 2).numpy()
        y = normkit.group_norm(x, 2)
    assert_close(y, expected.astype(np.float64), np.float32, tol32=TORCH_TOL32)


# --------------------------------------------------------------------------- hostile data


def _hostile_cf(rng, shape):
    """mean 1e4 (some channels -1e4 or 3e3), std 1e-2, float32, channels-first."""
    n, c = shape[:2]
    means = np.resize(np.array([1e4, -1e4, 3e3]), c)
    x = means.reshape((1, c) + (1,) * (len(shape) - 2)) + 1e-2 * rng.standard_normal(shape)
    return x.astype(np.float32)


@pytest.mark.parametrize("layout", ["NC", "NCL", "NLC", "NCHW", "NHWC", "NCDHW", "NDHWC"])
@pytest.mark.parametrize("norm", ["bn", "in", "gn"])
def test_large_mean_small_std_float32(kernel_path, norm, layout, rng):
    """Per-channel mean 1e4 and std 1e-2 in float32 normalize to unit variance within 1e-3
    (for GroupNorm each sample has its own mean so that the groups are hostile too)."""
    rank = len(layout)
    if norm == "in" and rank == 2:
        pytest.skip("InstanceNorm needs spatial elements")
    shape = (4, 6) + {2: (), 3: (97,), 4: (9, 11), 5: (3, 5, 7)}[rank]
    x_cf = _hostile_cf(rng, shape)
    if norm == "gn":
        per_sample = np.array([1e4, -1e4, 3e3, 1e4]).reshape((4,) + (1,) * (rank - 1))
        x_cf = (per_sample + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    x = in_layout(x_cf, layout)
    assert np.all(np.isfinite(x))
    if norm == "bn":
        y = normkit.batch_norm(x, None, None, training=True, eps=0.0, layout=layout)
        ref = batch_norm_ref(x, None, None, training=True, eps=0.0, layout=layout)[0]
        axes = (0, 2)
    elif norm == "in":
        y = normkit.instance_norm(x, eps=0.0, layout=layout)
        ref = instance_norm_ref(x, eps=0.0, layout=layout)[0]
        axes = (2,)
    else:
        y = normkit.group_norm(x, 2, eps=0.0, layout=layout)
        ref = group_norm_ref(x, 2, eps=0.0, layout=layout)[0]
        axes = (2,)
    yc = to_channels_first(y, layout).astype(np.float64)
    yc = yc.reshape(yc.shape[0], yc.shape[1], -1)
    if norm == "gn":
        yc = yc.reshape(yc.shape[0], 2, -1)
    var = yc.var(axis=axes)
    assert np.all(np.abs(var - 1.0) < UNIT_VAR_TOL), f"var(y) per statistics group: {var.ravel()}"
    assert np.all(np.abs(yc.mean(axis=axes)) < UNIT_VAR_TOL), f"mean(y): {yc.mean(axis=axes).ravel()}"
    err = np.max(np.abs(y.astype(np.float64) - ref))
    assert err < HOSTILE_TOL, f"max |y - reference| = {err:.3g}: the error grows with mean/std"


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("norm", ["in", "gn", "adain", "bn"])
def test_nan_stays_in_its_group(kernel_path, norm, dtype, rank, rng):
    """A NaN in one (sample, channel) makes only its statistics group NaN: that
    (sample, channel) for IN/AdaIN, (sample, group) for GN, the channel for BN."""
    dt = np_dtype(dtype)
    n, c, g = 4, 6, 3
    x_cf = make_cf(rng, n, c, rank, 7, dt)
    x_cf[2, 3].flat[5] = np.nan
    expected_nan = np.zeros(x_cf.shape, bool)
    if norm in ("in", "adain"):
        expected_nan[2, 3] = True
    elif norm == "gn":
        expected_nan[2, 2:4] = True  # group 1 of 3 holds channels 2 and 3
    else:
        expected_nan[:, 3] = True
    for layout in (CHANNELS_FIRST[rank], CHANNELS_LAST[rank]):
        x = in_layout(x_cf, layout)
        if norm == "in":
            y, mean, rstd = normkit.instance_norm(x, layout=layout, return_stats=True)
            stat_nan = np.zeros((n, c), bool)
            stat_nan[2, 3] = True
        elif norm == "gn":
            y, mean, rstd = normkit.group_norm(x, g, layout=layout, return_stats=True)
            stat_nan = np.zeros((n, g), bool)
            stat_nan[2, 1] = True
        elif norm == "bn":
            y, mean, rstd = normkit.batch_norm(x, None, None, training=True, layout=layout, return_stats=True)
            stat_nan = np.zeros(c, bool)
            stat_nan[3] = True
        else:
            style = in_layout(make_cf(rng, n, c, rank, 5, dt), layout)
            y = normkit.adaptive_instance_norm(x, style, layout=layout)
            mean = rstd = None
        yc = to_channels_first(y, layout).astype(np.float64)
        assert np.array_equal(np.isnan(yc), expected_nan), f"{layout}: NaN pattern of y is wrong"
        if mean is not None:
            assert np.array_equal(np.isnan(mean), stat_nan), f"{layout}: NaN pattern of mean"
            assert np.array_equal(np.isnan(rstd), stat_nan), f"{layout}: NaN pattern of rstd"
        if norm == "gn":
            ref = group_norm_ref(x, g, layout=layout)[0]
        elif norm == "in":
            ref = instance_norm_ref(x, layout=layout)[0]
        elif norm == "bn":
            ref = batch_norm_ref(x, None, None, training=True, layout=layout)[0]
        else:
            ref = adaptive_instance_norm_ref(x, style, layout=layout)
        assert_close(y, ref, dt)  # NaN positions and every other value


@pytest.mark.parametrize("layout", ["NCL", "NLC", "NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("norm", ["bn", "in", "gn", "adain"])
def test_constant_channels(kernel_path, norm, dtype, layout, rng):
    """Constant channels (variance exactly 0) give finite output: the bias."""
    dt = np_dtype(dtype)
    rank = len(layout)
    c = 5
    values = np.array([0.0, 1.0, -3.5, 1e4, 2.0**-10])
    x_cf = np.broadcast_to(values.reshape(1, c, *(1,) * (rank - 2)), (4, c) + spatial_shape(rank, 7)).astype(dt)
    x = in_layout(x_cf, layout)
    w, b = make_params(rng, c, dt, "both")
    expected = np.broadcast_to(from_channels_first(b.astype(np.float64).reshape(1, c, *(1,) * (rank - 2)), layout),
                               x.shape)
    if norm == "bn":
        rm, rv = make_running(rng, c, stats_dtype(dt))
        y = normkit.batch_norm(x, rm, rv, w, b, training=True, layout=layout)
        assert np.all(np.isfinite(rm)) and np.all(rv.astype(np.float64) < 3.0 * 0.9 + 1e-6)
    elif norm == "in":
        y = normkit.instance_norm(x, None, None, w, b, layout=layout)
    elif norm == "gn":
        y = normkit.group_norm(x, c, w, b, layout=layout)
    else:
        mean = rng.uniform(-1, 1, (4, c)).astype(dt)
        std = rng.uniform(0.5, 2, (4, c)).astype(dt)
        y = normkit.adaptive_instance_norm(x, (mean, std), layout=layout)
        expected = np.broadcast_to(from_channels_first(mean.astype(np.float64).reshape(4, c, *(1,) * (rank - 2)),
                                                       layout), x.shape)
    y64 = y.astype(np.float64)
    assert np.all(np.isfinite(y64))
    np.testing.assert_array_equal(y64, expected)


# --------------------------------------------------------------------------- big problems, threads, determinism

BIG_CASES = {
    # name: (layout, channels-first shape)
    "bn2d_nhwc": ("NHWC", (8, 32, 64, 64)),  # columns: 32768 rows of 32, several row blocks
    "bn2d_nchw": ("NCHW", (8, 32, 64, 64)),
    "bn1d_nc": ("NC", (20000, 65)),  # odd channel count, ~20 row blocks
    "bn_ndhwc": ("NDHWC", (4, 17, 9, 33, 35)),
}


@pytest.mark.parametrize("case", list(BIG_CASES))
def test_large_batch_norm(kernel_path, threads, case, rng):
    layout, shape = BIG_CASES[case]
    dt = np.dtype(np.float32)
    c = shape[1]
    x = in_layout((rng.standard_normal(shape) * 2 + rng.uniform(-3, 3, (1, c) + (1,) * (len(shape) - 2)))
                  .astype(dt), layout)
    rm, rv = make_running(rng, c, dt)
    w, b = make_params(rng, c, dt, "both")
    ref = batch_norm_ref(x, rm, rv, w, b, True, 0.1, layout=layout)
    y, mean, rstd = normkit.batch_norm(x, rm, rv, w, b, training=True, layout=layout, return_stats=True)
    assert normkit.get_num_threads() == threads
    assert_close(y, ref[0], dt)
    assert_stats_close(mean, ref[1], dt, "mean", x)
    assert_stats_close(rstd, ref[2], dt, "rstd")
    assert_running_close(rm, ref[3], "running_mean")
    assert_running_close(rv, ref[4], "running_var")


DET_CASES = {
    "bn_train-NHWC": ("bn_train", "NHWC"),
    "bn_train-NCHW": ("bn_train", "NCHW"),
    # planes of 49 elements: the columns statistics and apply over rows of C * S
    "bn_train-NCHW-7x7": ("bn_train", "NCHW", (64, 96, 7, 7)),
    # the apply over five chunks of channels (C * S past one 64 KiB table), rows statistics
    "bn_train-NCHW-7x7-chunks": ("bn_train", "NCHW", (8, 1400, 7, 7)),
    "bn_eval-NHWC": ("bn_eval", "NHWC"),
    "bn_train-NC": ("bn_train", "NC"),
    "in_track-NCHW": ("in_track", "NCHW"),
    "in_track-NHWC": ("in_track", "NHWC"),
    "gn-NCHW": ("gn", "NCHW"),
    "gn-NHWC": ("gn", "NHWC"),
    "adain_map-NHWC": ("adain_map", "NHWC"),
    "adain_map-NCHW": ("adain_map", "NCHW"),
}


@pytest.mark.parametrize("case", list(DET_CASES))
def test_bit_identical_across_thread_counts(kernel_path, case, rng, restore_threads):
    """1 and 2 threads give the same bits (y, statistics, running statistics) on a
    problem of a few MB, and repeated calls too."""
    norm, layout = DET_CASES[case][:2]
    dt = np.dtype(np.float32)
    shape = DET_CASES[case][2] if len(DET_CASES[case]) > 2 else (8, 32, 64, 64) if layout != "NC" else (32768, 33)
    c = shape[1]
    x = in_layout(make_x(rng, shape, dt), layout)
    p = {"momentum": 0.1, "eps": 1e-5, "groups": 8, "rm": None, "rv": None, "pair": None}
    p["w"], p["b"] = make_params(rng, c, dt, "both")
    p["rm"], p["rv"] = make_running(rng, c, dt)
    p["style_cf"] = make_cf(rng, 8, c, 4, 33, dt)
    results = []
    for n_threads in (1, 2, 2):
        normkit.set_num_threads(n_threads)
        results.append(call_norm(norm, x, layout, p))
    for k in ("y", "mean", "rstd", "rm", "rv"):
        if results[0][k] is not None:
            assert same_bits(results[0][k], results[1][k]), f"{k} depends on the thread count"
            assert same_bits(results[1][k], results[2][k]), f"repeated calls differ in {k}"
    sample = np.arange(0, shape[0], 3)
    if norm.startswith("bn"):
        ref = ref_norm(norm, x, layout, p)
        assert_close(results[1]["y"], ref["y"], dt)
    else:  # per-sample norms: a sample of the batch suffices
        ps = dict(p)
        if p["style_cf"] is not None:
            ps["style_cf"] = p["style_cf"][sample]
        ref = ref_norm(norm, x[sample], layout, ps)
        assert_close(results[1]["y"][sample], ref["y"], dt)


ITEM_CASES = {
    # name: (norm, channels-first shape, groups): how channels_last_groups cuts the work
    # one sample in bands of whole groups (float32: 4 bands of 8 groups, 320 bytes, whole lines)
    "gn-one-sample-bands": ("gn", (1, 320, 6, 7), 32),
    # three samples, (float32) bands of 3 groups of 16 channels and a last band of 2
    "gn-uneven-last-band": ("gn", (3, 128, 9, 9), 8),
    # InstanceNorm as 40 groups of one channel: (float32) bands of 16, 16 and 8 channels
    "in-narrow-last-band": ("in_track", (1, 40, 10, 9), 40),
    # many small samples: runs of 5 samples per item and a last run of 2
    "gn-sample-runs": ("gn", (47, 64, 5, 5), 8),
    # samples past 1 MiB (float32, float64): each step's rows shared out by a team
    "gn-rows-shared-out": ("gn", (2, 64, 64, 66), 4),
}


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("case", list(ITEM_CASES))
def test_channels_last_groups_in_items(kernel_path, case, dtype, rng, restore_threads):
    """Channels-last GroupNorm / InstanceNorm in each of its ways of cutting the work
    (bands of groups, runs of samples, rows shared out): against float64 far off zero,
    with the same bits for 1, 2 and 3 threads."""
    norm, shape, groups = ITEM_CASES[case]
    dt = np_dtype(dtype)
    c = shape[1]
    x = in_layout(make_x(rng, shape, dt, loc=20.0), "NHWC")
    p = {"momentum": 0.1, "eps": 1e-5, "groups": groups, "rm": None, "rv": None, "style_cf": None, "pair": None}
    p["w"], p["b"] = make_params(rng, c, dt, "both")
    if norm == "in_track":
        p["rm"], p["rv"] = make_running(rng, c, stats_dtype(dt))
    results = []
    for n_threads in (1, 2, 3):
        normkit.set_num_threads(n_threads)
        results.append(call_norm(norm, x, "NHWC", p))
    for k in ("y", "mean", "rstd", "rm", "rv"):
        if results[0][k] is not None:
            for r in results[1:]:
                assert same_bits(results[0][k], r[k]), f"{k} depends on the thread count"
    ref = ref_norm(norm, x, "NHWC", p)
    assert_close(results[0]["y"], ref["y"], dt)
    assert_stats_close(results[0]["mean"], ref["mean"], dt, "mean", x)
    assert_stats_close(results[0]["rstd"], ref["rstd"], dt, "rstd")
    if norm == "in_track":
        assert_running_close(results[0]["rm"], ref["rm"], "running_mean")
        assert_running_close(results[0]["rv"], ref["rv"], "running_var")


def test_isa_env_forces_path_for_channel_norms():
    """NORMKIT_ISA=scalar gives the same channel-norm results as _set_kernel_path('scalar')."""
    script = textwrap.dedent(
        """
        import numpy as np, normkit
        assert normkit.info()["kernel_path"] == "scalar", normkit.info()["kernel_path"]
        rng = np.random.default_rng(3)
        x = rng.standard_normal((3, 17, 5, 7)).astype(np.float32)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        ys = [normkit.batch_norm(x, None, None, training=True), normkit.batch_norm(xl, None, None, training=True,
              layout="NHWC"), normkit.group_norm(xl, 17, layout="NHWC"), normkit.instance_norm(x)]
        np.save(__import__("sys").argv[1], np.concatenate([y.ravel() for y in ys]))
        """
    )
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "y.npy")
        env = dict(os.environ, NORMKIT_ISA="scalar")
        proc = subprocess.run([sys.executable, "-c", script, path], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        got = np.load(path)
    original = normkit.info()["kernel_path"]
    normkit._set_kernel_path("scalar")
    try:
        rng = np.random.default_rng(3)
        x = rng.standard_normal((3, 17, 5, 7)).astype(np.float32)
        xl = to_last(x)
        ys = [normkit.batch_norm(x, None, None, training=True), normkit.batch_norm(xl, None, None, training=True,
              layout="NHWC"), normkit.group_norm(xl, 17, layout="NHWC"), normkit.instance_norm(x)]
    finally:
        normkit._set_kernel_path(original)
    assert same_bits(got, np.concatenate([y.ravel() for y in ys]))

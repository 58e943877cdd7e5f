"""LayerNorm and RMSNorm forward (the "rows" pattern) against float64 references,
on every kernel path this CPU supports.

Tolerances (the constants and comparisons in helpers.py) are stated relative to the
output's scale: ``scale = max(1, max |reference|)`` over the compared array.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import normkit
from helpers import (
    DTYPE_NAMES,
    TOL32,
    TOL64,
    UNIT_VAR_TOL,
    assert_close,
    assert_stats_close,
    make_params,
    make_x,
    np_dtype,
    same_bits,
)
from reference import layer_norm_ref, machine_eps, rms_norm_ref, stats_dtype

# --------------------------------------------------------------------------- cases

ROW_LENGTHS = [1, 3, 7, 15, 16, 17, 31, 33, 63, 65, 4095, 4097, 8193, 12288]
LN_AFFINE = ["none", "weight", "bias", "both"]
RMS_AFFINE = ["none", "weight"]


# --------------------------------------------------------------------------- helpers


def rows_of(n):
    return 2 if n >= 4096 else 5


def run_norm(func, x, ns, weight, bias, eps, **kw):
    if func == "layer":
        return normkit.layer_norm(x, ns, weight, bias, eps, **kw)
    return normkit.rms_norm(x, ns, weight, eps, **kw)


def ref_norm(func, x, ns, weight, bias, eps):
    if func == "layer":
        return layer_norm_ref(x, ns, weight, bias, eps)[0]
    return rms_norm_ref(x, ns, weight, eps)[0]


# --------------------------------------------------------------------------- every path, every tail


ROWS_CASES = [("layer", affine) for affine in LN_AFFINE] + [("rms", affine) for affine in RMS_AFFINE]


@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func,affine", ROWS_CASES)
def test_norm_rows(kernel_path, func, dtype, n, affine, rng):
    """LayerNorm (eps 1e-5) and RMSNorm (eps 1e-6) for every row length, dtype and
    affine: y and the statistics against the reference, x untouched, and the same y
    without return_stats (LayerNorm with its default eps)."""
    dt = np_dtype(dtype)
    x = make_x(rng, (rows_of(n), n), dt)
    weight, bias = make_params(rng, (n,), dt, affine)
    x_copy = x.copy()

    if func == "layer":
        y, mean, rstd = normkit.layer_norm(x, n, weight, bias, 1e-5, return_stats=True)
        ref_y, ref_mean, ref_rstd = layer_norm_ref(x, n, weight, bias, 1e-5)
    else:
        y, rstd = normkit.rms_norm(x, n, weight, 1e-6, return_stats=True)
        ref_y, ref_rstd = rms_norm_ref(x, n, weight, 1e-6)
        mean = None

    assert isinstance(y, np.ndarray) and y.dtype == dt and y.shape == x.shape
    assert_close(y, ref_y, dt)
    assert rstd.shape == (x.shape[0], 1)
    assert_stats_close(rstd, ref_rstd, dt, "rstd")
    if mean is not None:
        assert mean.shape == (x.shape[0], 1)
        assert_stats_close(mean, ref_mean, dt, "mean", x)
    assert same_bits(x, x_copy), f"{func}_norm modified its input"

    if func == "layer":
        y_plain = normkit.layer_norm(x, n, weight, bias)  # defaults: eps=1e-5, no stats
    else:
        y_plain = normkit.rms_norm(x, n, weight, 1e-6)
    assert isinstance(y_plain, np.ndarray)
    assert same_bits(y_plain, y), "return_stats changed y"


MULTI_SHAPES = [
    ((2, 3), (4, 33)),
    ((2, 3), (3, 5, 7)),
    ((4,), (2, 2049)),
    ((), (4, 33)),  # x is exactly normalized_shape: one row
    ((2, 1, 3), (1, 17)),  # size-1 dims on both sides
]


@pytest.mark.parametrize("lead,ns", MULTI_SHAPES, ids=lambda v: "x".join(map(str, v)) or "none")
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_multi_dim_normalized_shape(kernel_path, dtype, lead, ns, func, rng):
    dt = np_dtype(dtype)
    x = make_x(rng, lead + ns, dt)
    weight, bias = make_params(rng, ns, dt, "both")
    k = len(ns)
    stats_shape = lead + (1,) * k
    if func == "layer":
        y, mean, rstd = normkit.layer_norm(x, ns, weight, bias, return_stats=True)
        ref_y, ref_mean, ref_rstd = layer_norm_ref(x, ns, weight, bias)
        assert mean.shape == stats_shape
        assert_stats_close(mean, ref_mean, dt, "mean", x)
        # list and tuple normalized_shape mean the same
        assert same_bits(normkit.layer_norm(x, list(ns), weight, bias), y)
    else:
        y, rstd = normkit.rms_norm(x, ns, weight, return_stats=True)
        ref_y, ref_rstd = rms_norm_ref(x, ns, weight)
        assert same_bits(normkit.rms_norm(x, list(ns), weight), y)
    assert y.shape == x.shape and y.dtype == dt
    assert rstd.shape == stats_shape
    assert_close(y, ref_y, dt)
    assert_stats_close(rstd, ref_rstd, dt, "rstd")


@pytest.mark.parametrize("func", ["layer", "rms"])
def test_int_and_sequence_normalized_shape_agree(func, rng):
    x = make_x(rng, (3, 4, 19), np.float32)
    a = run_norm(func, x, 19, None, None, 1e-5)
    b = run_norm(func, x, (19,), None, None, 1e-5)
    c = run_norm(func, x, [np.int64(19)], None, None, 1e-5)
    d = run_norm(func, x, np.int32(19), None, None, 1e-5)
    assert same_bits(a, b) and same_bits(a, c) and same_bits(a, d)


# --------------------------------------------------------------------------- parameter dtypes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_16bit_x_with_float32_params(kernel_path, dtype, func, rng):
    dt = np_dtype(dtype)
    n = 77
    x = make_x(rng, (6, n), dt)
    weight, bias = make_params(rng, (n,), np.float32, "both")
    y = run_norm(func, x, n, weight, bias, 1e-5)
    assert y.dtype == dt
    # float32 parameters are used at float32 precision (not rounded to 16 bits first)
    assert_close(y, ref_norm(func, x, n, weight, bias, 1e-5), dt)
    # float64 parameters are cast to float32: same bits as passing float32
    y64 = run_norm(func, x, n, weight.astype(np.float64), None if bias is None else bias.astype(np.float64), 1e-5)
    assert same_bits(y64, y)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_x_with_mixed_param_dtypes(dtype, rng):
    """The contract lets each of weight/bias be x's dtype or float32: mixing them is allowed."""
    dt = np_dtype(dtype)
    n = 40
    x = make_x(rng, (3, n), dt)
    w16, b16 = make_params(rng, (n,), dt, "both")
    b32 = b16.astype(np.float32)
    w32 = w16.astype(np.float32)
    ref = layer_norm_ref(x, n, w16, b16)[0]  # same values either way
    for weight, bias in [(w16, b32), (w32, b16)]:
        y = normkit.layer_norm(x, n, weight, bias)
        assert y.dtype == dt
        assert_close(y, ref, dt)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_params_cast_to_x_dtype(dtype, rng):
    dt = np.dtype(dtype)
    other = np.float64 if dt == np.float32 else np.float32
    n = 33
    x = make_x(rng, (4, n), dt)
    weight, bias = make_params(rng, (n,), other, "both")
    y = normkit.layer_norm(x, n, weight, bias)
    assert y.dtype == dt
    assert same_bits(y, normkit.layer_norm(x, n, weight.astype(dt), bias.astype(dt)))
    yr = normkit.rms_norm(x, n, weight)
    assert same_bits(yr, normkit.rms_norm(x, n, weight.astype(dt)))
    # float16 weights for float32/float64 x as well
    w16 = weight.astype(np.float16)
    assert same_bits(normkit.rms_norm(x, n, w16), normkit.rms_norm(x, n, w16.astype(dt)))


def test_params_as_lists_and_noncontiguous(rng):
    n = 24
    x = make_x(rng, (3, n), np.float32)
    weight, bias = make_params(rng, (n,), np.float32, "both")
    y = normkit.layer_norm(x, n, weight, bias)
    assert same_bits(normkit.layer_norm(x, n, weight.tolist(), bias.tolist()), y)
    wide_w = np.repeat(weight, 2)[::2]  # strided view with the same values
    wide_b = np.repeat(bias, 2)[::2]
    assert same_bits(normkit.layer_norm(x, n, wide_w, wide_b), y)


# --------------------------------------------------------------------------- eps


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_rms_norm_default_eps_is_machine_epsilon(kernel_path, dtype, rng):
    dt = np_dtype(dtype)
    n = 65
    # small rms (~0.03) so that eps visibly changes the result for 16-bit dtypes
    x = make_x(rng, (4, n), dt, loc=0.0, scale=0.03)
    eps = machine_eps(dt)
    y, rstd = normkit.rms_norm(x, n, return_stats=True)
    assert same_bits(y, normkit.rms_norm(x, n, eps=eps))
    ref_y, ref_rstd = rms_norm_ref(x, n, eps=eps)
    assert_close(y, ref_y, dt)
    assert_stats_close(rstd, ref_rstd, dt, "rstd")
    if dtype == "bfloat16":  # eps 2**-7 is large next to rms^2 ~ 1e-3: make sure the test could tell
        wrong = rms_norm_ref(x, n, eps=1e-12)[0]
        assert not np.allclose(y.astype(np.float64), wrong, rtol=0.05)


@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-5, 0.1, 3.0])
def test_eps_values(func, eps, rng):
    n = 50
    x = make_x(rng, (3, n), np.float64, scale=0.1)
    y = run_norm(func, x, n, None, None, eps)
    assert_close(y, ref_norm(func, x, n, None, None, eps), np.float64)


# --------------------------------------------------------------------------- out=


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_out_given(kernel_path, dtype, func, rng):
    dt = np_dtype(dtype)
    n = 129
    x = make_x(rng, (7, n), dt)
    weight, bias = make_params(rng, (n,), dt, "both")
    fresh = run_norm(func, x, n, weight, bias, 1e-5)
    out = np.full_like(x, np.nan)
    res = run_norm(func, x, n, weight, bias, 1e-5, out=out)
    assert res is out
    assert same_bits(out, fresh)
    # out= together with return_stats
    out2 = np.zeros_like(x)
    res2 = run_norm(func, x, n, weight, bias, 1e-5, out=out2, return_stats=True)
    assert res2[0] is out2 and same_bits(out2, fresh)
    assert all(s.shape == (7, 1) for s in res2[1:])


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("n", [17, 4097])
def test_out_is_x_in_place(kernel_path, dtype, func, n, rng):
    dt = np_dtype(dtype)
    x = make_x(rng, (3, 2, n), dt)
    weight, bias = make_params(rng, (n,), dt, "both")
    fresh = run_norm(func, x.copy(), n, weight, bias, 1e-5)
    res = run_norm(func, x, n, weight, bias, 1e-5, out=x)
    assert res is x
    assert same_bits(x, fresh)


# --------------------------------------------------------------------------- non-contiguous inputs

# Each case: name -> (base array shape, view of a base, normalized_shape). The base is a
# fresh C-contiguous array (Fortran-ordered where named so); the view is taken from it.
VIEW_CASES = {
    "transposed": ((768, 6), lambda b: b.T, 768),
    "sliced_row_prefix": ((5, 1024), lambda b: b[:, :768], 768),
    "sliced_row_middle": ((5, 1024), lambda b: b[:, 3 : 3 + 65], 65),
    "negative_row_stride": ((6, 33), lambda b: b[::-1], 33),
    "negative_col_stride": ((4, 33), lambda b: b[:, ::-1], 33),
    "every_other_row": ((10, 65), lambda b: b[::2], 65),
    "every_other_col": ((3, 130), lambda b: b[:, ::2], 65),
    "leading_dims_no_collapse": ((3, 5, 17), lambda b: b[:, ::2, :], 17),
    "fortran_multi_dim": ((4, 5, 7), np.asfortranarray, (5, 7)),
    "sliced_multi_dim": ((2, 6, 9), lambda b: b[:, 1:5, :], (4, 9)),
    "misaligned_start": ((5 * 31 + 1,), lambda b: b[1:].reshape(5, 31), 31),
}


def make_view(rng, case, dt):
    shape, view_of, ns = VIEW_CASES[case]
    base = make_x(rng, shape, dt)
    if view_of is np.asfortranarray:
        base = np.asfortranarray(base)
        view_of = lambda b: b  # noqa: E731 - the Fortran array is the input itself
    xv = view_of(base)
    assert not xv.flags.c_contiguous or case == "misaligned_start"
    return base, view_of, xv, ns


@pytest.mark.parametrize("case", list(VIEW_CASES))
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_noncontiguous_input(kernel_path, dtype, case, func, rng):
    dt = np_dtype(dtype)
    base, _, xv, ns = make_view(rng, case, dt)
    base_copy = base.copy()
    nsh = (ns,) if isinstance(ns, int) else ns
    weight, bias = make_params(rng, nsh, dt, "both")
    y = run_norm(func, xv, ns, weight, bias, 1e-5)
    assert y.shape == xv.shape and y.dtype == dt
    assert_close(y, ref_norm(func, xv, ns, weight, bias, 1e-5), dt)
    assert same_bits(base, base_copy), "input modified"
    # the same bits as for a contiguous copy of the same values
    assert same_bits(y, run_norm(func, np.ascontiguousarray(xv), ns, weight, bias, 1e-5))


@pytest.mark.parametrize("case", list(VIEW_CASES))
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_noncontiguous_in_place(case, func, rng):
    """out=x works for any x (the design: `out` may be `x` itself) and writes only x's elements."""
    base, view_of, xv, ns = make_view(rng, case, np.dtype(np.float32))
    fresh = run_norm(func, np.ascontiguousarray(xv), ns, None, None, 1e-5)
    expected_base = base.copy(order="K")
    view_of(expected_base)[...] = fresh
    res = run_norm(func, xv, ns, None, None, 1e-5, out=xv)
    assert res is xv
    assert same_bits(xv, fresh)
    assert same_bits(base, expected_base), "in-place wrote outside x"


@pytest.mark.parametrize("func", ["layer", "rms"])
def test_noncontiguous_out(func, rng):
    """A non-contiguous out either receives the right values or is refused with a
    ValueError naming `out` (never another name, never wrong values)."""
    n = 33
    x = make_x(rng, (4, n), np.float32)
    expected = run_norm(func, x, n, None, None, 1e-5)
    for out in (np.zeros((n, 4), np.float32).T, np.zeros((4, 2 * n), np.float32)[:, ::2]):
        try:
            res = run_norm(func, x, n, None, None, 1e-5, out=out)
        except ValueError as e:
            assert str(e).startswith("out"), f"message does not name out: {e}"
        else:
            assert res is out
            assert same_bits(np.ascontiguousarray(out), expected)


# --------------------------------------------------------------------------- empty arrays


EMPTY_CASES = [
    ((0, 8), (8,)),
    ((0, 3, 4), (3, 4)),
    ((5, 0, 3), (3,)),
    ((2, 0), (0,)),
    ((2, 0, 3), (0, 3)),
    ((0,), (0,)),
]


@pytest.mark.parametrize("shape,ns", EMPTY_CASES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_empty_arrays(shape, ns, func, dtype):
    """Empty arrays give empty results (as PyTorch: also for a 0-size normalized dim)."""
    dt = np.dtype(dtype)
    for x in (np.zeros(shape, dt), np.empty(shape, dt)):
        weight = np.ones(ns, dt)
        bias = np.zeros(ns, dt)
        res = run_norm(func, x, ns, weight, bias, 1e-5, return_stats=True)
        y = res[0]
        assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dt
        stats_shape = shape[: len(shape) - len(ns)] + (1,) * len(ns)
        for s in res[1:]:
            assert s.shape == stats_shape and s.dtype == stats_dtype(dt)
        out = np.empty(shape, dt)
        assert run_norm(func, x, ns, None, None, 1e-5, out=out) is out


@pytest.mark.parametrize("shape,ns", EMPTY_CASES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_empty_arrays_like_torch(shape, ns, func):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.zeros(shape, np.float32)
    t = torch.from_numpy(x)
    expected = (F.layer_norm(t, ns) if func == "layer" else F.rms_norm(t, ns)).numpy()
    y = run_norm(func, x, ns, None, None, 1e-5)
    assert y.shape == expected.shape and y.dtype == expected.dtype


# --------------------------------------------------------------------------- PyTorch as a second oracle


TORCH_SHAPES = [((6, 1), (1,)), ((5, 17), (17,)), ((3, 4097), (4097,)), ((2, 3, 4, 33), (4, 33)), ((2, 3, 5, 7), (3, 5, 7))]


@pytest.mark.parametrize("shape,ns", TORCH_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("affine", LN_AFFINE)
def test_layer_norm_float64_matches_torch(kernel_path, shape, ns, affine, rng):
    torch = pytest.importorskip("torch")
    x = make_x(rng, shape, np.float64)
    weight, bias = make_params(rng, ns, np.float64, affine)
    tw = None if weight is None else torch.from_numpy(weight)
    tb = None if bias is None else torch.from_numpy(bias)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), ns, tw, tb, 1e-5).numpy()
    y, mean, rstd = normkit.layer_norm(x, ns, weight, bias, 1e-5, return_stats=True)
    assert_close(y, expected, np.float64)
    _, t_mean, t_rstd = torch.native_layer_norm(torch.from_numpy(x), ns, tw, tb, 1e-5)
    assert mean.shape == tuple(t_mean.shape) and rstd.shape == tuple(t_rstd.shape)
    np.testing.assert_allclose(mean, t_mean.numpy(), rtol=TOL64, atol=TOL64)
    np.testing.assert_allclose(rstd, t_rstd.numpy(), rtol=TOL64)


@pytest.mark.parametrize("shape,ns", TORCH_SHAPES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_float64_matches_torch(kernel_path, shape, ns, weighted, eps, rng):
    torch = pytest.importorskip("torch")
    x = make_x(rng, shape, np.float64)
    weight = (1.0 + 0.5 * rng.standard_normal(ns)) if weighted else None
    tw = None if weight is None else torch.from_numpy(weight)
    expected = torch.nn.functional.rms_norm(torch.from_numpy(x), ns, tw, eps).numpy()
    assert_close(normkit.rms_norm(x, ns, weight, eps), expected, np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_torch_default_arguments_agree(dtype, func, rng):
    """Defaults (eps=1e-5 for LayerNorm, machine epsilon for RMSNorm) are PyTorch's."""
    torch = pytest.importorskip("torch")
    dt = np.dtype(dtype)
    n = 96
    x = make_x(rng, (8, n), dt, loc=0.0, scale=0.05)  # small rms: eps matters
    t = torch.from_numpy(x.astype(np.float32))  # torch in float32, a common opmath
    if func == "layer":
        expected = torch.nn.functional.layer_norm(t, (n,)).numpy()
        y = normkit.layer_norm(x, n)
    else:
        expected = torch.nn.functional.rms_norm(t, (n,), eps=float(machine_eps(dt))).numpy()
        y = normkit.rms_norm(x, n)
    assert_close(y, expected.astype(np.float64), dt)


def test_accepts_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    x = make_x(rng, (4, 33), np.float32)
    y = normkit.layer_norm(torch.from_numpy(x), 33)  # torch in, torch out (test_arrays.py has the rest)
    assert isinstance(y, torch.Tensor)
    assert same_bits(y.numpy(), normkit.layer_norm(x, 33))
    yr = normkit.rms_norm(torch.from_numpy(x), (33,), torch.ones(33))
    assert same_bits(yr.numpy(), normkit.rms_norm(x, 33, np.ones(33, np.float32)))


# --------------------------------------------------------------------------- hostile data


@pytest.mark.parametrize("n", [7, 768, 4097, 12288])
def test_large_mean_small_std_float32(kernel_path, n, rng):
    """mean 1e4, std 1e-2 in float32: normalizes to unit variance (the naive E[x^2]-E[x]^2 cannot)."""
    rows = 4
    x = (1e4 + 1e-2 * rng.standard_normal((rows, n))).astype(np.float32)
    x[1] = (-1e4 + 1e-2 * rng.standard_normal(n)).astype(np.float32)  # negative mean too
    x[2] = (3e3 + 1e-3 * rng.standard_normal(n)).astype(np.float32)
    assert np.all(x.astype(np.float64).var(axis=1) > 0)

    y, mean, rstd = normkit.layer_norm(x, n, eps=0.0, return_stats=True)
    y64 = y.astype(np.float64)
    if n > 1:
        var = y64.var(axis=1)
        assert np.all(np.abs(var - 1.0) < UNIT_VAR_TOL), f"var(y) per row: {var}"
        assert np.all(np.abs(y64.mean(axis=1)) < UNIT_VAR_TOL)
    ref_y, ref_mean, ref_rstd = layer_norm_ref(x, n, eps=0.0)
    # tightly: the error must not scale with the mean (1e4 / 1e-2 = 1e6 amplification)
    assert np.max(np.abs(y64 - ref_y)) < TOL32, np.max(np.abs(y64 - ref_y))
    # mean is stored in float32: within one float32 ulp of |mean| ~ 1e4
    assert np.all(np.abs(mean.astype(np.float64) - ref_mean) <= np.spacing(np.float32(1e4)))
    assert np.all(np.abs(rstd / ref_rstd - 1.0) < 1e-4)

    # with the default eps too
    assert_close(normkit.layer_norm(x, n), layer_norm_ref(x, n)[0], np.float32)


def test_large_mean_small_std_float64(kernel_path, rng):
    n = 1031
    x = 1e8 + 1e-3 * rng.standard_normal((3, n))
    y = normkit.layer_norm(x, n, eps=0.0)
    assert np.all(np.abs(y.var(axis=1) - 1.0) < 1e-9)
    # a plain float64 mean would be off by ~1 ulp of 1e8 = 1e-5 of the output; a stable
    # kernel (like the shifted reference) keeps the full float64 accuracy
    assert_close(y, layer_norm_ref(x, n, eps=0.0)[0], np.float64)


@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("n", [16, 4097])
def test_float16_near_max_does_not_overflow(kernel_path, func, n, rng):
    x = rng.uniform(5.8e4, 6.5e4, size=(3, n)).astype(np.float16)
    x[1] *= np.where(rng.random(n) < 0.5, -1, 1).astype(np.float16)  # +-6e4: huge variance
    assert np.all(np.isfinite(x))
    y = run_norm(func, x, n, None, None, 1e-5)
    assert np.all(np.isfinite(y)), "float16 near 6e4 overflowed"
    assert_close(y, ref_norm(func, x, n, None, None, 1e-5), np.float16)
    if func == "layer":
        _, mean, rstd = normkit.layer_norm(x, n, return_stats=True)
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(rstd))


@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_nan_stays_in_its_row(kernel_path, func, dtype, where, rng):
    dt = np_dtype(dtype)
    n = 37
    x = make_x(rng, (5, n), dt)
    col = {"first": 0, "middle": n // 2, "last": n - 1}[where]
    x[2, col] = np.nan
    res = run_norm(func, x, n, None, None, 1e-5, return_stats=True)
    y = res[0].astype(np.float64)
    assert np.all(np.isnan(y[2])), "the NaN row should be all NaN"
    others = np.delete(np.arange(5), 2)
    assert np.all(np.isfinite(y[others])), "NaN leaked into other rows"
    assert_close(res[0][others], ref_norm(func, x[others], n, None, None, 1e-5), dt)
    for s in res[1:]:  # statistics: NaN only for that row
        assert np.isnan(s[2, 0]) and np.all(np.isfinite(s[others]))


@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("value", [np.inf, -np.inf])
@pytest.mark.parametrize("col", [0, 20])
def test_inf_affects_only_its_row(kernel_path, func, dtype, value, col, rng):
    dt = np_dtype(dtype)
    n = 33
    x = make_x(rng, (4, n), dt)
    x[1, col] = value
    y = run_norm(func, x, n, None, None, 1e-5).astype(np.float64)
    if func == "layer":
        assert np.all(np.isnan(y[1])), "an inf makes its LayerNorm row NaN"
    else:
        # RMSNorm: rms = inf, so the inf element is inf*0 = NaN and the rest 0 (as the
        # float64 reference and PyTorch): no finite garbage in the row
        assert np.isnan(y[1, col])
        assert np.all((y[1] == 0) | np.isnan(y[1]))
    others = [0, 2, 3]
    assert np.all(np.isfinite(y[others]))
    assert_close(y[others], ref_norm(func, x[others], n, None, None, 1e-5), dt)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("n", [1, 5, 16, 4097])
def test_constant_rows(kernel_path, dtype, n, rng):
    dt = np_dtype(dtype)
    values = np.array([0.0, 1.0, -3.5, 1e4, 2.0**-10], dtype=dt)
    x = np.repeat(values[:, None], n, axis=1)
    weight, bias = make_params(rng, (n,), dt, "both")
    y, mean, rstd = normkit.layer_norm(x, n, weight, bias, return_stats=True)
    assert np.all(np.isfinite(y.astype(np.float64)))
    # (x - mean) is exactly 0: the output is the bias
    np.testing.assert_array_equal(y.astype(np.float64), np.broadcast_to(bias.astype(np.float64), y.shape))
    np.testing.assert_array_equal(mean[:, 0], values.astype(stats_dtype(dt)))
    np.testing.assert_allclose(rstd, 1.0 / np.sqrt(1e-5), rtol=1e-6)
    y0 = normkit.layer_norm(x, n)
    np.testing.assert_array_equal(y0.astype(np.float64), 0.0)
    yr = normkit.rms_norm(x, n, weight)
    assert np.all(np.isfinite(yr.astype(np.float64)))
    assert_close(yr, rms_norm_ref(x, n, weight)[0], dt)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_variance_rows(kernel_path, dtype, rng):
    dt = np.dtype(dtype)
    n = 1000
    spread = 3e-7 if dt == np.float32 else 1e-15  # a few ulps of 1.0
    x = (1.0 + spread * rng.standard_normal((4, n))).astype(dt)
    assert np.all(x.astype(np.float64).var(axis=1) > 0)
    for eps in (1e-5, 0.0):
        y = normkit.layer_norm(x, n, eps=eps)
        assert np.all(np.isfinite(y))
        assert_close(y, layer_norm_ref(x, n, eps=eps)[0], dt)
    y = normkit.layer_norm(x, n, eps=0.0).astype(np.float64)
    assert np.all(np.abs(y.var(axis=1) - 1.0) < UNIT_VAR_TOL)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_one_huge_row(kernel_path, dtype, func, rng):
    dt = np_dtype(dtype)
    n = 2**17 + 3
    x = make_x(rng, (n,), dt)
    weight, bias = make_params(rng, (n,), dt, "both")
    y = run_norm(func, x, n, weight, bias, 1e-5)
    assert y.shape == (n,)
    assert_close(y, ref_norm(func, x, n, weight, bias, 1e-5), dt)
    y2 = run_norm(func, x[None, :], (n,), weight, bias, 1e-5)
    assert same_bits(y2[0], y)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_many_rows_of_length_one(kernel_path, dtype, rng):
    dt = np_dtype(dtype)
    x = make_x(rng, (5000, 1), dt)
    weight, bias = make_params(rng, (1,), dt, "both")
    y, mean, rstd = normkit.layer_norm(x, 1, weight, bias, return_stats=True)
    np.testing.assert_array_equal(y.astype(np.float64), np.full(x.shape, float(bias[0])))
    np.testing.assert_array_equal(mean, x.astype(stats_dtype(dt)))
    yr = normkit.rms_norm(x, 1, weight)
    assert_close(yr, rms_norm_ref(x, 1, weight)[0], dt)


@pytest.mark.parametrize("func", ["layer", "rms"])
def test_subnormal_float32(kernel_path, func, rng):
    n = 100
    x = (rng.uniform(-1, 1, (3, n)) * 1e-39).astype(np.float32)
    assert np.any((x != 0) & (np.abs(x) < np.finfo(np.float32).tiny))
    y = run_norm(func, x, n, None, None, 1e-5)
    assert np.all(np.isfinite(y))
    ref = ref_norm(func, x, n, None, None, 1e-5)
    # outputs are ~3e-37: compare relative to their own scale (flushing subnormals to 0 fails this)
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(y - ref)) <= 1e-5 * scale, (np.max(np.abs(y - ref)), scale)


@pytest.mark.parametrize("func", ["layer", "rms"])
def test_subnormal_float16(kernel_path, func, rng):
    """float16 subnormals are normal in float32: with eps=0 they normalize like any data."""
    n = 64
    x = (rng.uniform(-1, 1, (3, n)) * 5e-5).astype(np.float16)
    assert np.any((x != 0) & (np.abs(x) < np.finfo(np.float16).tiny))
    y = run_norm(func, x, n, None, None, 0.0)
    assert np.all(np.isfinite(y))
    assert_close(y, ref_norm(func, x, n, None, None, 0.0), np.float16)


# --------------------------------------------------------------------------- threads, determinism, big outputs


@pytest.mark.parametrize("func", ["layer", "rms"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_multithreaded_matches_reference(kernel_path, threads, func, dtype, rng):
    dt = np.dtype(dtype)
    n = 1000
    x = make_x(rng, (301, n), dt)  # ~1 MB: split over the threads; odd row count
    weight, bias = make_params(rng, (n,), dt, "both")
    y = run_norm(func, x, n, weight, bias, 1e-5)
    assert normkit.get_num_threads() == threads
    assert_close(y, ref_norm(func, x, n, weight, bias, 1e-5), dt)


@pytest.mark.parametrize("func", ["layer", "rms"])
def test_bit_identical_across_thread_counts(kernel_path, func, rng, restore_threads):
    shape = (4096, 1024)  # 16 MiB of float32: multi-threaded and large enough for streaming stores
    x = make_x(rng, shape, np.float32)
    weight, bias = make_params(rng, (shape[1],), np.float32, "both")
    normkit.set_num_threads(1)
    y1 = run_norm(func, x, shape[1], weight, bias, 1e-5, return_stats=True)
    normkit.set_num_threads(2)
    y2 = run_norm(func, x, shape[1], weight, bias, 1e-5, return_stats=True)
    y3 = run_norm(func, x, shape[1], weight, bias, 1e-5, return_stats=True)
    for a, b, c in zip(y1, y2, y3):
        assert same_bits(a, b), "result depends on the thread count"
        assert same_bits(b, c), "repeated calls differ"
    # and it is right: check a sample of rows against the reference
    sample = np.arange(0, shape[0], 61)
    assert_close(y2[0][sample], ref_norm(func, x[sample], shape[1], weight, bias, 1e-5), np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("func", ["layer", "rms"])
def test_large_odd_output_with_misaligned_out(kernel_path, dtype, func, rng):
    """Outputs over the streaming-store threshold (16 MiB), with rows of odd length and an
    `out` that starts one element past an aligned address: every row has its own
    misaligned head and tail."""
    dt = np.dtype(dtype)
    n = 1031 if dt == np.float32 else 2063
    rows = 4099
    x = make_x(rng, (rows, n), dt)
    weight, bias = make_params(rng, (n,), dt, "both")
    buf = np.empty(rows * n + 1, dt)
    out = buf[1:].reshape(rows, n)
    res = run_norm(func, x, n, weight, bias, 1e-5, out=out)
    assert res is out
    fresh = run_norm(func, x, n, weight, bias, 1e-5)
    assert same_bits(out, fresh)
    sample = np.r_[0:3, 1000:1003, rows - 3 : rows]
    assert_close(out[sample], ref_norm(func, x[sample], n, weight, bias, 1e-5), dt)
    # full check on the cheap float32 case
    if dt == np.float32 and func == "rms":
        assert_close(out, ref_norm(func, x, n, weight, bias, 1e-5), dt)


def test_streaming_stores_forced_on_small_outputs():
    """NORMKIT_STREAMING_MIN_BYTES=0 forces the streaming-store writer (an internal knob) on
    every output: all tails, every path, every dtype must still be right, in the rows and the
    channels-last writers, and nothing next to `out` may be written."""
    script = textwrap.dedent(
        """
        import sys, numpy as np, normkit
        sys.path.insert(0, sys.argv[1])
        from reference import layer_norm_ref, rms_norm_ref
        import ml_dtypes
        rng = np.random.default_rng(1)
        worst = 0.0
        for path in normkit.info()["kernel_paths_supported"]:
            normkit._set_kernel_path(path)
            for dt, tol in [(np.float32, 1e-5), (np.float64, 1e-12), (np.float16, 3e-3), (ml_dtypes.bfloat16, 2.5e-2)]:
                for n in [1, 3, 7, 15, 16, 17, 31, 33, 63, 65, 4095, 4097]:
                    for off in (0, 1, 3):
                        x = (rng.standard_normal((3, n)) * 2).astype(dt)
                        buf = np.empty(3 * n + off, dt)
                        out = buf[off:].reshape(3, n)
                        y = normkit.layer_norm(x, n, out=out).astype(np.float64)
                        r = layer_norm_ref(x, n)[0]
                        e1 = np.max(np.abs(y - r) / np.maximum(1, np.abs(r)))
                        y = normkit.rms_norm(x, n, out=out).astype(np.float64)
                        r = rms_norm_ref(x, n)[0]
                        e2 = np.max(np.abs(y - r) / np.maximum(1, np.abs(r)))
                        if max(e1, e2) > tol:
                            print(f"FAIL {path} {np.dtype(dt)} n={n} off={off} err={max(e1, e2)}")
                            sys.exit(1)
                # channels-last (the columns kernel's writer), with guard elements either side of out
                for c, s, groups in [(1, 37, 1), (3, 11, 3), (17, 5, 1), (40, 9, 8), (64, 33, 32)]:
                    for off in (0, 1, 3):
                        x = (rng.standard_normal((2, s, 1, c)) * 2 + 1).astype(dt)
                        buf = np.full(x.size + off + 40, 7, dt)
                        out = buf[off + 20 : off + 20 + x.size].reshape(x.shape)
                        y = normkit.group_norm(x, groups, layout="NHWC", out=out).astype(np.float64)
                        g = x.astype(np.float64).reshape(2, s, groups, c // groups)
                        r = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
                        e = np.max(np.abs(y - r.reshape(x.shape)) / np.maximum(1, np.abs(r.reshape(x.shape))))
                        guards = np.r_[buf[: off + 20], buf[off + 20 + x.size :]]
                        if e > tol or not np.all(guards == 7):
                            print(f"FAIL columns {path} {np.dtype(dt)} c={c} s={s} off={off} err={e}")
                            sys.exit(1)
        print("OK")
        """
    )
    pytest.importorskip("ml_dtypes")
    env = dict(os.environ, NORMKIT_STREAMING_MIN_BYTES="0")
    env.pop("NORMKIT_ISA", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(__file__)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


@pytest.mark.parametrize("func", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_direct_call_matches_the_general_intake(func, dtype, rng):
    """The plain NumPy call goes straight to the kernel (_functional._direct_rows); the same
    call through the general intake (a Fortran-ordered x, copied first; a list eps) must give
    the same bits, and out= must be written and returned as itself."""
    x = (rng.standard_normal((37, 96)) * 3 + 1).astype(dtype)
    w = rng.standard_normal(96).astype(dtype)
    f = getattr(normkit, func)
    params = (w, w) if func == "layer_norm" else (w,)
    direct = f(x, 96, *params, 1e-5)
    general = f(np.asfortranarray(x), (96,), *params, np.float64(1e-5))
    assert np.array_equal(direct, general)
    out = np.full_like(x, np.nan)
    assert f(x, 96, *params, 1e-5, out=out) is out
    assert np.array_equal(out, direct)


def test_direct_call_errors_are_the_general_ones():
    """A bad argument on the direct path falls back to the general intake, whose message names it."""
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="normalized_shape"):
        normkit.layer_norm(x, 7)
    with pytest.raises(ValueError, match="weight"):
        normkit.layer_norm(x, 8, np.ones(7, np.float32))
    with pytest.raises(ValueError, match="out"):
        normkit.rms_norm(x, 8, out=np.empty((4, 9), np.float32))


def _out_placed_from(x, offset, guard=16):
    """An array like x whose start lies `offset` bytes past x's modulo 4 KiB, inside a buffer
    with at least `guard` elements either side (filled with 7): (out, buffer, start index)."""
    item = x.dtype.itemsize
    buf = np.full(x.size + 4096 // item + 2 * guard, 7, x.dtype)
    lag = (x.ctypes.data + offset - buf.ctypes.data - guard * item) % 4096
    assert lag % item == 0
    start = guard + lag // item
    return buf[start : start + x.size].reshape(x.shape), buf, start


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows,cols", [(37, 1000), (4096, 1100)])
def test_output_placement_does_not_change_the_bits(kernel_path, dtype, rows, cols, rng):
    """Rows of a streamed output (the [4096,1100] float32 case is over 16 MiB) start and end on
    cache lines, with their edges stored apart: wherever out= lies relative to x (a few bytes
    above it modulo 4 KiB included), LayerNorm and RMSNorm give the bits of an output placed far
    from x, and nothing next to out= is written."""
    dt = np.dtype(dtype)
    x = make_x(rng, (rows, cols), dt)
    weight, bias = make_params(rng, (cols,), dt, "both")
    for func in ("layer", "rms"):
        far, _, _ = _out_placed_from(x, 2048)
        expected = run_norm(func, x, cols, weight, bias, 1e-5, out=far).copy()
        assert_close(expected[-3:], ref_norm(func, x[-3:], cols, weight, bias, 1e-5), dt)
        for offset in (0, 2, 16, 32, 48, 200, 1040, 4080):
            if offset % dt.itemsize:
                continue
            out, buf, start = _out_placed_from(x, offset)
            assert run_norm(func, x, cols, weight, bias, 1e-5, out=out) is out
            assert same_bits(out, expected), f"{func} out at x + {offset} mod 4096"
            assert np.all(buf[:start] == 7) and np.all(buf[start + x.size :] == 7), "wrote beside out="

"""Helpers shared by normkit's Python test files (no tests here).

- exceptions: ``raises_named`` / ``raises_prefixed`` (the error names the offending
  argument at the start of its message);
- dtypes: ``DTYPE_NAMES``, ``np_dtype`` (skips a test when ml_dtypes is missing),
  ``dtype_name``;
- data: ``make_x``, ``make_params``;
- array layouts: ``in_layout``, ``to_last``, ``from_last``;
- arrays of other libraries: ``DLPackOnly`` (an object that speaks DLPack and nothing else);
- comparisons: ``same_bits``, ``tolerance``, ``assert_close``,
  ``assert_stats_close``, ``assert_running_close`` and the tolerance constants.

Tolerances are stated relative to the output's scale:
``scale = max(1, max |reference|)`` over the compared array (finite values).
"""

from __future__ import annotations

import numpy as np
import pytest

from channel_reference import from_channels_first
from reference import machine_eps, stats_dtype

# --------------------------------------------------------------------------- tolerances

# float64 kernels: rows up to 12288 long / channel reductions over at most ~1e6
# elements accumulate a few hundred float64 roundings (eps 2.2e-16) at most; 1e-12
# of the output scale leaves a margin of ~10x while still catching any float32 step
# sneaking into the float64 path (that would show ~1e-7).
TOL64 = 1e-12
# float32 kernels: float32 accumulation (blocked/merged partial sums grow the error
# like ~sqrt(n)*eps, eps 1.2e-7) plus the final multiply-add (for BatchNorm inference
# the folded form x * scale + shift): ~1e-6 in practice, 1e-5 of the output scale is
# the allowed bound.
TOL32 = 1e-5
# float16/bfloat16: statistics are float32 and the output is rounded once to the
# 16-bit type (0.5 ulp). Allowed: 2 ulps of the 16-bit type at each output's
# magnitude (2 * eps16 * |ref|), plus TOL32 of the output scale for the float32
# arithmetic before the rounding (matters only for outputs near zero).
ULPS16 = 2
# Statistics (mean, rstd): float32 for 32/16-bit inputs, float64 for float64 (mean
# relative to the data's magnitude, rstd relative).
STATS_TOL = {"float64": TOL64, "float32": TOL32}
# Hostile data (mean 1e4, std 1e-2, float32): the normalized output must have unit
# variance within this, as the design and the issue require.
UNIT_VAR_TOL = 1e-3

DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16"]


# --------------------------------------------------------------------------- exceptions


def raises_prefixed(exc_type, prefix, fn):
    """fn() raises exc_type (a type or a tuple of types) with a message starting with
    `prefix` (a string or a tuple of strings); returns the message."""
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    assert msg.startswith(prefix), f"message does not start with {prefix!r}: {msg!r}"
    return msg


def raises_named(exc_type, name, fn):
    """fn() raises exc_type (exactly that family) with a message starting with `name`
    and saying more than the name."""
    msg = raises_prefixed(exc_type, name, fn)
    assert len(msg) > len(name) + 5, msg
    return msg


# --------------------------------------------------------------------------- dtypes


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.name


# --------------------------------------------------------------------------- data


def make_x(rng, shape, dtype, loc=0.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def make_params(rng, shape, dtype, affine):
    """(weight, bias) of `shape` (an int C or a normalized shape); affine is one of
    "none", "weight", "bias", "both"."""
    weight = bias = None
    if affine in ("weight", "both"):
        weight = (1.0 + 0.5 * rng.standard_normal(shape)).astype(dtype)
    if affine in ("bias", "both"):
        bias = (0.5 * rng.standard_normal(shape)).astype(dtype)
    return weight, bias


# --------------------------------------------------------------------------- array layouts


def in_layout(x_cf, layout):
    """A channels-first array's values as a contiguous array in `layout`."""
    return np.ascontiguousarray(from_channels_first(x_cf, layout))


def to_last(a):
    """A channels-first array's values as a contiguous channels-last array."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def from_last(a):
    """A channels-last array as a channels-first view."""
    return np.moveaxis(a, -1, 1)


# --------------------------------------------------------------------------- comparisons


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _scale(ref):
    finite = np.abs(ref[np.isfinite(ref)])
    return max(1.0, float(finite.max())) if finite.size else 1.0


def tolerance(dtype, ref, tol32=TOL32):
    """Allowed |actual - ref| per element for an output of `dtype` (see the constants)."""
    name = dtype_name(dtype)
    scale = _scale(ref)
    if name == "float64":
        return TOL64 * scale
    if name == "float32":
        return tol32 * scale
    return ULPS16 * machine_eps(dtype) * np.abs(ref) + tol32 * scale


def assert_close(actual, ref, dtype, what="y", tol32=TOL32):
    """actual (any float dtype) against a float64 reference; NaNs must coincide and
    infinities match exactly."""
    actual = np.asarray(actual).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    nan_a, nan_r = np.isnan(actual), np.isnan(ref)
    assert np.array_equal(nan_a, nan_r), f"{what}: NaN at different places ({nan_a.sum()} vs {nan_r.sum()} NaNs)"
    ok = ~nan_r
    tol = np.broadcast_to(tolerance(dtype, ref, tol32), ref.shape)
    with np.errstate(invalid="ignore"):
        err = np.abs(actual - ref)
        bad = ok & ~(err <= tol)
        # infinities must match exactly
        bad |= ok & np.isinf(ref) & (actual != ref)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err, -1)), ref.shape)
        raise AssertionError(
            f"{what} ({dtype_name(dtype)}): {bad.sum()} of {ref.size} elements out of tolerance; worst at {i}: "
            f"got {actual[i]!r}, expected {ref[i]!r}, |err|={err[i]:.3g} > tol={np.asarray(tol)[i]:.3g}"
        )


def assert_stats_close(actual, ref, x_dtype, kind, x=None):
    """mean (kind='mean') or rstd (kind='rstd') statistics: dtype, shape and values."""
    assert actual.dtype == stats_dtype(x_dtype), f"{kind}: dtype {actual.dtype}, expected {stats_dtype(x_dtype)}"
    assert actual.shape == ref.shape, f"{kind}: shape {actual.shape}, expected {ref.shape}"
    tol = STATS_TOL["float64" if dtype_name(x_dtype) == "float64" else "float32"]
    a = actual.astype(np.float64)
    with np.errstate(invalid="ignore"):
        if kind == "rstd":
            bound = tol * np.abs(ref)  # relative
        else:  # mean: relative to the data magnitude (cancellation)
            mag = np.nanmax(np.abs(np.asarray(x, dtype=np.float64))) if x is not None and np.size(x) else 1.0
            bound = tol * max(1.0, float(mag))
        ok = (np.abs(a - ref) <= bound) | (np.isnan(a) & np.isnan(ref))
    assert ok.all(), f"{kind}: max |err| {np.nanmax(np.abs(a - ref)):.3g}, bound {np.max(bound):.3g}"


def assert_running_close(actual, ref, what):
    """An updated running statistic (its own dtype) against the float64 reference."""
    a = np.asarray(actual).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, f"{what}: shape {a.shape} != {ref.shape}"
    name = dtype_name(actual.dtype)
    if name == "float64":
        tol = TOL64 * np.maximum(1.0, np.abs(ref))
    elif name == "float32":
        tol = TOL32 * np.maximum(1.0, np.abs(ref))
    else:
        tol = ULPS16 * machine_eps(actual.dtype) * np.abs(ref) + TOL32 * np.maximum(1.0, np.abs(ref))
    err = np.abs(a - ref)
    assert np.all(err <= tol), f"{what}: max |err| {err.max():.3g}; got {a}, expected {ref}"


# --------------------------------------------------------------------------- other libraries' arrays


class DLPackOnly:
    """An array of some library that offers DLPack and nothing else (no __array__, no buffer),
    as JAX's or an Array API library's arrays do."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()

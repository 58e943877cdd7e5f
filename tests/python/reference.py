"""Independent float64 NumPy references for the rows norms (LayerNorm, RMSNorm).

Everything is computed in float64 from the values the caller actually passed
(a float16/bfloat16/float32 input is first converted exactly to float64), and
weight/bias are applied in float64 too. Nothing here calls normkit, so the
references share no code (and no bug) with the library.
"""

from __future__ import annotations

import numpy as np

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None
    BFLOAT16 = None

FLOAT16 = np.dtype(np.float16)


def is_16bit(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype == FLOAT16 or (BFLOAT16 is not None and dtype == BFLOAT16)


def machine_eps(dtype) -> float:
    """Machine epsilon of a float dtype, bfloat16 included (2**-7)."""
    dtype = np.dtype(dtype)
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def stats_dtype(dtype) -> np.dtype:
    """The contract: float32 statistics for 16-bit inputs, the input dtype otherwise."""
    return np.dtype(np.float32) if is_16bit(dtype) else np.dtype(dtype)


def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _axes(x: np.ndarray, normalized_shape) -> tuple:
    k = 1 if np.isscalar(normalized_shape) or isinstance(normalized_shape, (int, np.integer)) else len(normalized_shape)
    return tuple(range(x.ndim - k, x.ndim))


def layer_norm_ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(y, mean, rstd) in float64. mean/rstd have shape x.shape[:-k] + (1,)*k.

    Shifted, corrected two-pass in float64: everything relative to the row's
    first element (x - shift is exact when the row's values are close together,
    the hard case), the mean of the shifted values with its residual added
    back, then the mean of squared deviations. A plain float64 mean cannot do:
    next to a mean of 1e8 and a standard deviation of 1e-3 the rounding of the
    mean itself (1.5e-8) would be 1e-5 of the normalized output.
    """
    x = f64(x)
    axes = _axes(x, normalized_shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        flat = x.reshape(x.shape[: x.ndim - len(axes)] + (-1,))
        shift = flat[..., :1] if flat.shape[-1] else np.zeros(flat.shape[:-1] + (1,))
        shift = shift.reshape(shift.shape[:-1] + (1,) * len(axes))
        shift = np.where(np.isfinite(shift), shift, 0.0)
        d = x - shift
        offset = d.mean(axis=axes, keepdims=True)
        offset = offset + (d - offset).mean(axis=axes, keepdims=True)
        dev = d - offset
        var = (dev * dev).mean(axis=axes, keepdims=True)
        mean = shift + offset
        rstd = 1.0 / np.sqrt(var + float(eps))
        y = dev * rstd
        if weight is not None:
            y = y * f64(weight)
        if bias is not None:
            y = y + f64(bias)
    return y, mean, rstd


def rms_norm_ref(x, normalized_shape, weight=None, eps=None):
    """(y, rstd) in float64; eps=None is the machine epsilon of x's dtype (as PyTorch)."""
    if eps is None:
        eps = machine_eps(np.asarray(x).dtype)
    x = f64(x)
    axes = _axes(x, normalized_shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ms = (x * x).mean(axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(ms + float(eps))
        y = x * rstd
        if weight is not None:
            y = y * f64(weight)
    return y, rstd

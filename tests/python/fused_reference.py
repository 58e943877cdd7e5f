"""Independent float64 NumPy references for the fused forms (issue 11):
activations, int8 / float8_e4m3fn quantization (static and dynamic per-row
scales) and the residual add of add_layer_norm / add_rms_norm.

As in reference.py and channel_reference.py nothing here calls normkit. The
norm itself comes from those references; this module adds what the fused
forms put before and after it:

- ``activation_ref(v, name)``: relu (NaN kept), silu, gelu (erf form, via
  math.erf) and gelu_tanh (PyTorch's approximate="tanh" formula), in float64.
- ``quantize_ref(r, kind)``: r = v / scale in float64 to the quantized value
  (returned as float64): int8 = clip(round_half_to_even(r), -127, 127) with
  NaN -> 0; float8_e4m3 = ml_dtypes.float8_e4m3fn of r clipped to +-448 first
  (ml_dtypes' cast does not saturate; inf saturates too), NaN stays NaN.
  ``e4m3_round(value)`` is a hand-written bit-level E4M3 rounding the tests use
  to check the ml_dtypes oracle on a table of values.
- ``dynamic_scales_ref(v, k, kind)``: per row max over the finite |v| / qmax;
  1 for a row whose max is 0 or that has no finite value.
- ``add_sum_ref(x, residual, residual_bias)``: s = (x + residual) + residual_bias
  in float32 (float64 for float64 x), rounded once to x's dtype. This is the
  contract's value bit for bit, not a float64 approximation.
"""

from __future__ import annotations

import math

import numpy as np

from reference import f64

try:
    import ml_dtypes

    FLOAT8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
except ImportError:  # pragma: no cover - depends on the environment
    ml_dtypes = None
    FLOAT8_E4M3 = None

ACTIVATIONS = ["relu", "silu", "gelu", "gelu_tanh"]
QUANTIZE_KINDS = ["int8", "float8_e4m3"]
QMAX = {"int8": 127.0, "float8_e4m3": 448.0}
E4M3_MAX = 448.0

_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation_ref(v, name):
    """act(v) in float64; name None is the identity."""
    v = f64(v)
    if name is None:
        return v
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name == "relu":
            return np.where(np.isnan(v), v, np.maximum(v, 0.0))
        if name == "silu":
            # v * sigmoid(v); written as v / (1 + exp(-v)) (exp overflow gives -0)
            return v / (1.0 + np.exp(-v))
        if name == "gelu":
            return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))) if v.size else v.copy()
        if name == "gelu_tanh":
            c = math.sqrt(2.0 / math.pi)
            return 0.5 * v * (1.0 + np.tanh(c * (v + 0.044715 * v * v * v)))
    raise ValueError(f"unknown activation {name!r}")


def quantized_dtype(kind) -> np.dtype:
    if kind == "int8":
        return np.dtype(np.int8)
    if FLOAT8_E4M3 is None:  # pragma: no cover
        raise RuntimeError("float8_e4m3 needs ml_dtypes")
    return FLOAT8_E4M3


def quantize_ref(r, kind):
    """The quantized value of r = v / scale (float64 in, float64 out)."""
    r = f64(r)
    with np.errstate(invalid="ignore"):
        if kind == "int8":
            q = np.clip(np.rint(r), -127.0, 127.0)  # np.rint: round half to even
            return np.where(np.isnan(r), 0.0, q)
        if kind == "float8_e4m3":
            clipped = np.clip(r, -E4M3_MAX, E4M3_MAX)  # NaN passes through np.clip
            return clipped.astype(FLOAT8_E4M3).astype(np.float64)
    raise ValueError(f"unknown quantize kind {kind!r}")


def e4m3_round(value: float) -> float:
    """Hand-written E4M3 ("fn": bias 7, 3 mantissa bits, no inf, max 448) round to
    nearest even with saturation, on the bits: 2**-6 is the smallest normal, the
    subnormal step is 2**-9, the step in [2**e, 2**(e+1)) is 2**(e-3)."""
    if math.isnan(value):
        return math.nan
    sign = -1.0 if math.copysign(1.0, value) < 0 else 1.0
    a = abs(value)
    if a >= E4M3_MAX:  # inf too
        return sign * E4M3_MAX
    if a == 0.0:
        return sign * 0.0
    e = max(math.frexp(a)[1] - 1, -6)  # a = m * 2**e with 1 <= m < 2 (or subnormal)
    step = 2.0 ** (e - 3)
    units = a / step  # exact: step is a power of two
    low = math.floor(units)
    frac = units - low
    if frac > 0.5 or (frac == 0.5 and low % 2 == 1):
        low += 1
    return sign * min(low * step, E4M3_MAX)


def row_max_finite(v, k):
    """max over the trailing k axes of the finite |v|; 0 where there is none.
    Shape v.shape[:-k] + (1,)*k."""
    v = f64(v)
    axes = tuple(range(v.ndim - k, v.ndim))
    a = np.where(np.isfinite(v), np.abs(v), 0.0)
    if v.size == 0:
        return np.zeros(v.shape[: v.ndim - k] + (1,) * k)
    return a.max(axis=axes, keepdims=True)


def dynamic_scales_ref(v, k, kind):
    """Per-row scales in float64, shape v.shape[:-k] + (1,)*k."""
    m = row_max_finite(v, k)
    return np.where(m > 0, m / QMAX[kind], 1.0)


def accumulation_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def add_sum_ref(x, residual, residual_bias=None):
    """s as the contract stores it: (x + residual) (+ residual_bias) in the
    accumulation type, rounded once to x's dtype (broadcasting residual)."""
    x = np.asarray(x)
    acc = accumulation_dtype(x.dtype)
    s = x.astype(acc) + np.asarray(residual).astype(acc)
    if residual_bias is not None:
        s = s + np.asarray(residual_bias).astype(acc)
    return np.broadcast_to(s, x.shape).astype(x.dtype)

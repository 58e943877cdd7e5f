"""Norms along any axes on arrays: normalize (torch.nn.functional.normalize, ONNX
LpNormalization), its gradient, and mean_variance_norm (ONNX
MeanVarianceNormalization).

The core reads x contiguous (row-major): anything else is copied once here.
Outputs have x's shape and dtype; an ``out=`` the core cannot write directly is
computed into a fresh array and copied into ``out`` once. Inputs are never
modified. No new kernel: the C++ side (cpp/src/plan/axis_plan.hpp) maps both
onto the rows and columns problems the other norms use.
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

from . import _ext
from ._args import as_eps
from ._dtypes import as_input, as_int, empty, kernel_view
from ._inputs import channel_input, channel_output, finish_output
from ._arrays import same_kind_out

__all__ = ["normalize", "normalize_backward", "mean_variance_norm"]


def _p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p: expected a real number (>= 1, or inf), got {p!r}")
    return float(p)


def _dim(dim, x) -> int:
    dim = as_int(dim, "dim")
    if not -(2**31) <= dim < 2**31:  # the core takes an int; its range check names dim the same way
        raise ValueError(f"dim: {dim} is out of range for x of shape {x.shape}")
    return dim


def _axes(axes) -> list:
    if isinstance(axes, bool):
        raise TypeError(f"axes: expected an int or a sequence of ints, got {axes!r}")
    try:
        if isinstance(axes, (tuple, list)):
            return [operator.index(a) for a in axes]
        return [operator.index(axes)]
    except TypeError:
        raise TypeError(f"axes: expected an int or a sequence of ints, got {axes!r}") from None


@same_kind_out
def normalize(x, p=2.0, dim=-1, eps=1e-12, *, out=None):
    """Lp normalization along ``dim``, as ``torch.nn.functional.normalize``.

    ``y = x / max(||x||_p, eps)`` with the norm over ``dim`` (any dim; ``p >= 1``
    or ``float("inf")``). With ``eps=0`` a slice whose norm is 0 gives zeros, as
    ONNX LpNormalization's reference does (PyTorch would give NaN there). p=2 (the
    sentence-embedding models' final L2 normalization) takes the norm from the
    kernels' statistics; other p from a plain loop in float64. 16-bit ``x`` is
    computed with float32 statistics. Returns ``y`` (``out`` may be ``x`` itself).
    """
    given = as_input(x, "x")
    x, bf16 = channel_input(given)
    p, dim, eps = _p(p), _dim(dim, x), as_eps(eps)
    y, copy_to = channel_output(out, x, given)
    _ext.normalize(kernel_view(x), kernel_view(y), p, dim, eps, bf16)
    return finish_output(y, copy_to)


@same_kind_out
def normalize_backward(dy, x, p=2.0, dim=-1, eps=1e-12):
    """Gradient of ``normalize``: returns ``dx`` (x's shape and dtype) from ``dy``
    and the forward's ``x``, ``p``, ``dim``, ``eps``. Where the norm is clamped
    to ``eps`` the gradient is ``dy / eps``; a slice of zeros with ``eps=0`` gets
    zeros; ``p=inf`` shares the gradient evenly between a slice's maxima (as
    PyTorch's autograd)."""
    x, bf16 = channel_input(as_input(x, "x"))
    dy = as_input(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected the shape of x {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy: expected dtype {x.dtype} like x, got {dy.dtype}")
    dy = np.ascontiguousarray(dy)
    p, dim, eps = _p(p), _dim(dim, x), as_eps(eps)
    dx = empty(x.shape, x.dtype)
    _ext.normalize_backward(kernel_view(dy), kernel_view(x), kernel_view(dx), p, dim, eps, bf16)
    return dx


@same_kind_out
def mean_variance_norm(x, axes=(0, 2, 3), eps=1e-9, *, out=None):
    """ONNX MeanVarianceNormalization: ``y = (x - mean) / (sqrt(var) + eps)``
    with the mean and biased variance over ``axes`` (any set of axes, negative
    ones counted from the end; default ``(0, 2, 3)``: per channel of NCHW).

    ``eps`` is added to the standard deviation, as ONNX does (ONNX fixes it at
    1e-9). The statistics are the kernels' shifted, merged moments, stable for a
    large mean (ONNX's reference forms E[x^2] - E[x]^2). With ``eps=0`` a constant
    slice gives zeros. 16-bit ``x`` is computed with float32 statistics. Returns
    ``y`` (``out`` may be ``x`` itself).
    """
    given = as_input(x, "x")
    x, bf16 = channel_input(given)
    axes, eps = _axes(axes), as_eps(eps)
    y, copy_to = channel_output(out, x, given)
    _ext.mean_variance_norm(kernel_view(x), kernel_view(y), axes, eps, bf16)
    return finish_output(y, copy_to)


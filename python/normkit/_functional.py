"""The normalization functions on arrays (normkit's functional API)."""

from __future__ import annotations

import numbers
import operator

import numpy as np

from . import _cuda, _ext
from ._dtypes import as_input, as_params, check_out, empty, indirect_output, is_bf16, kernel_view, stats_dtype

__all__ = ["layer_norm", "rms_norm"]


def _normalized_shape(normalized_shape) -> tuple:
    if type(normalized_shape) is int:  # the common case, fast
        return (normalized_shape,)
    try:
        if isinstance(normalized_shape, (tuple, list)):
            shape = tuple(operator.index(d) for d in normalized_shape)
        else:
            shape = (operator.index(normalized_shape),)
    except TypeError:
        raise TypeError(
            f"normalized_shape: expected an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if not shape:
        raise ValueError("normalized_shape: must name at least one dimension")
    return shape


def _eps(eps) -> float:
    if not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {eps!r}")
    return float(eps)


def _rows_input(x, normalized_shape):
    """Checks x against normalized_shape; copies x once if the kernels cannot view it."""
    x = as_input(x, "x")
    shape = _normalized_shape(normalized_shape)
    k = len(shape)
    if x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"normalized_shape: {shape} does not match the trailing dims of x, whose shape is {x.shape}"
        )
    bf16 = is_bf16(x.dtype)
    given = x
    if not x.flags.c_contiguous and not _ext.rows_viewable(kernel_view(x), k, bf16):
        # The normalized dims must be dense and the leading ones collapse to one
        # stride; anything else is copied once, here.
        x = np.ascontiguousarray(x)
    return x, shape, bf16, given


def _output(out, x, k, given):
    """(array the kernel writes, array to copy it into afterwards or None).
    `given` is x as the caller passed it (x itself may be a contiguous copy)."""
    if out is None:
        return empty(x.shape, x.dtype), None
    out = check_out(out, x)
    if (
        out.shape == x.shape
        and not out.flags.c_contiguous
        and not _ext.rows_viewable(kernel_view(out), k, is_bf16(x.dtype))
    ):
        # An output the kernels cannot write row by row (e.g. out=x for a
        # transposed x): compute into a fresh array, copy into out once.
        return indirect_output(out, given, x), out
    return out, None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, return_stats=False, stream=None):
    """Layer normalization over the trailing ``normalized_shape`` dims of ``x``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance,
    as ``torch.nn.functional.layer_norm``. Returns ``y``, or ``(y, mean, rstd)``
    with ``return_stats=True`` (statistics of shape ``x.shape[:-k] + (1,)*k``,
    float32 for 16-bit ``x``). ``out`` may be ``x`` itself.
    """
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.layer_norm(x, normalized_shape, weight, bias, eps, out, return_stats, stream)
    x, shape, bf16, given = _rows_input(x, normalized_shape)
    if weight is not None or bias is not None:
        weight, bias = as_params(x.dtype, (weight, "weight"), (bias, "bias"))
    eps = _eps(eps)
    y, copy_to = _output(out, x, len(shape), given)
    mean = rstd = None
    if return_stats:
        stats_shape = x.shape[: x.ndim - len(shape)] + (1,) * len(shape)
        mean = np.empty(stats_shape, dtype=stats_dtype(x.dtype))
        rstd = np.empty(stats_shape, dtype=mean.dtype)
    if bf16:
        _ext.layer_norm(
            kernel_view(x), kernel_view(y), shape, kernel_view(weight), kernel_view(bias), eps, mean, rstd, True
        )
    else:
        _ext.layer_norm(x, y, shape, weight, bias, eps, mean, rstd, False)
    if copy_to is not None:
        np.copyto(copy_to, y)
        y = copy_to
    return (y, mean, rstd) if return_stats else y


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False, stream=None):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims.

    ``y = x / sqrt(mean(x**2) + eps) * weight`` as ``torch.nn.functional.rms_norm``;
    ``eps=None`` means the machine epsilon of ``x``'s dtype. Returns ``y``, or
    ``(y, rstd)`` with ``return_stats=True``.
    """
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.rms_norm(x, normalized_shape, weight, eps, out, return_stats, stream)
    x, shape, bf16, given = _rows_input(x, normalized_shape)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))
    eps = None if eps is None else _eps(eps)
    y, copy_to = _output(out, x, len(shape), given)
    rstd = None
    if return_stats:
        rstd = np.empty(x.shape[: x.ndim - len(shape)] + (1,) * len(shape), dtype=stats_dtype(x.dtype))
    if bf16:
        _ext.rms_norm(kernel_view(x), kernel_view(y), shape, kernel_view(weight), eps, rstd, True)
    else:
        _ext.rms_norm(x, y, shape, weight, eps, rstd, False)
    if copy_to is not None:
        np.copyto(copy_to, y)
        y = copy_to
    return (y, rstd) if return_stats else y

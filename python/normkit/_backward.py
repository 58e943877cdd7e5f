"""Gradients of the norms, from the statistics their forward returned.

Each takes ``dy`` (the gradient of the output), ``x`` (the forward's input)
and the ``mean``/``rstd`` the forward gave with ``return_stats=True``, and
returns new arrays: the input gradient (x's dtype) and, where the norm has
them, the weight and bias gradients (weight's dtype; ``None`` when no weight is
given). Results are bit for bit the same from run to run and for any thread count.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _cuda, _ext
from ._channels import _channel_input, _layout
from ._dtypes import as_input, as_params, empty, is_bf16, kernel_view, stats_dtype
from ._functional import _eps, _rows_input

__all__ = [
    "layer_norm_backward",
    "rms_norm_backward",
    "batch_norm_backward",
    "instance_norm_backward",
    "group_norm_backward",
    "adaptive_instance_norm_backward",
]


def _like_x(dy, x, rows_k=None):
    """dy as the kernels read it: x's shape and dtype (checked here and in C++),
    copied once if its memory order does not suit them."""
    dy = as_input(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected the shape of x {x.shape}, got {dy.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy: expected dtype {x.dtype} like x, got {dy.dtype}")
    if dy.flags.c_contiguous:
        return dy
    if rows_k is not None and _ext.rows_viewable(kernel_view(dy), rows_k, is_bf16(dy.dtype)):
        return dy
    return np.ascontiguousarray(dy)


def _saved(stat, name, x_dtype):
    """A saved statistic (mean or rstd): its size and dtype are checked in C++,
    except bfloat16, which cannot travel to it as itself."""
    stat = as_input(stat, name)
    if is_bf16(stat.dtype):
        raise TypeError(f"{name}: expected dtype {stats_dtype(x_dtype)}, got bfloat16")
    return stat if stat.flags.c_contiguous else np.ascontiguousarray(stat)


def _param_grads(weight, shape, with_bias=True):
    if weight is None:
        return None, None
    return np.empty(shape, dtype=weight.dtype), (np.empty(shape, dtype=weight.dtype) if with_bias else None)


def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None, *, stream=None):
    """Gradient of ``layer_norm``: returns ``(dx, dweight, dbias)``."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight, stream)
    x, shape, bf16, _ = _rows_input(x, normalized_shape)
    dy = _like_x(dy, x, len(shape))
    mean, rstd = _saved(mean, "mean", x.dtype), _saved(rstd, "rstd", x.dtype)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))
    dx = empty(x.shape, x.dtype)
    dweight, dbias = _param_grads(weight, shape)
    _ext.layer_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, shape, kernel_view(weight),
                             kernel_view(dx), kernel_view(dweight), kernel_view(dbias), bf16)
    return dx, dweight, dbias


def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None, *, stream=None):
    """Gradient of ``rms_norm``: returns ``(dx, dweight)``."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.rms_norm_backward(dy, x, rstd, normalized_shape, weight, stream)
    x, shape, bf16, _ = _rows_input(x, normalized_shape)
    dy = _like_x(dy, x, len(shape))
    rstd = _saved(rstd, "rstd", x.dtype)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))
    dx = empty(x.shape, x.dtype)
    dweight, _ = _param_grads(weight, shape, with_bias=False)
    _ext.rms_norm_backward(kernel_view(dy), kernel_view(x), rstd, shape, kernel_view(weight), kernel_view(dx),
                           kernel_view(dweight), bf16)
    return dx, dweight


def _channel_backward_args(dy, x, mean, rstd, weight):
    x, bf16 = _channel_input(as_input(x, "x"))
    dy = _like_x(dy, x)
    mean, rstd = _saved(mean, "mean", x.dtype), _saved(rstd, "rstd", x.dtype)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))  # its shape is checked in C++
    dx = empty(x.shape, x.dtype)
    dweight, dbias = _param_grads(weight, None if weight is None else weight.shape)
    return dy, x, bf16, mean, rstd, weight, dx, dweight, dbias


def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, layout=None, stream=None):
    """Gradient of ``batch_norm``: returns ``(dx, dweight, dbias)``.

    ``training=True``: through the batch statistics (``mean``, ``rstd`` from the
    training forward); ``training=False``: the running statistics were constants
    (``dx = dy * weight * rstd``).
    """
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.batch_norm_backward(dy, x, mean, rstd, weight, training, layout, stream)
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    _ext.batch_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, kernel_view(weight), kernel_view(dx),
                             kernel_view(dweight), kernel_view(dbias), bool(training), _layout(layout), bf16)
    return dx, dweight, dbias


def instance_norm_backward(dy, x, mean, rstd, weight=None, *, use_input_stats=True, layout=None, stream=None):
    """Gradient of ``instance_norm``: returns ``(dx, dweight, dbias)``; mean/rstd of shape (N, C)."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.instance_norm_backward(dy, x, mean, rstd, weight, use_input_stats, layout, stream)
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    _ext.instance_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, kernel_view(weight), kernel_view(dx),
                                kernel_view(dweight), kernel_view(dbias), bool(use_input_stats), _layout(layout),
                                bf16)
    return dx, dweight, dbias


def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, layout=None, stream=None):
    """Gradient of ``group_norm``: returns ``(dx, dweight, dbias)``; mean/rstd of shape (N, num_groups)."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.group_norm_backward(dy, x, mean, rstd, num_groups, weight, layout, stream)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    _ext.group_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, int(num_groups), kernel_view(weight),
                             kernel_view(dx), kernel_view(dweight), kernel_view(dbias), _layout(layout), bf16)
    return dx, dweight, dbias


def adaptive_instance_norm_backward(dy, x, style, eps=1e-5, *, layout=None, stream=None):
    """Gradient of ``adaptive_instance_norm``: returns ``(dx, dstyle)``.

    For a style feature map, ``dstyle`` has its shape (through its mean and
    std); for a ``(mean, std)`` pair, ``dstyle`` is the pair ``(dmean, dstd)``.
    x's statistics are recomputed (the forward saves none).
    """
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.adaptive_instance_norm_backward(dy, x, style, eps, layout, stream)
    x, bf16 = _channel_input(as_input(x, "x"))
    dy = _like_x(dy, x)
    eps = _eps(eps)
    dx = empty(x.shape, x.dtype)
    if isinstance(style, (tuple, list)):
        if len(style) != 2:
            raise ValueError(f"style: expected a feature map or a (mean, std) pair, got a sequence of {len(style)}")
        style_mean, style_std = as_params(x.dtype, (style[0], "style"), (style[1], "style"))
        dmean, dstd = np.empty_like(style_mean), np.empty_like(style_std)
        _ext.adaptive_instance_norm_backward(kernel_view(dy), kernel_view(x), None, kernel_view(style_mean),
                                             kernel_view(style_std), eps, kernel_view(dx), None, kernel_view(dmean),
                                             kernel_view(dstd), _layout(layout), bf16)
        return dx, (dmean, dstd)
    style_map = as_input(style, "style")
    if style_map.dtype != x.dtype:
        raise TypeError(f"style: expected dtype {x.dtype} like x, got {style_map.dtype}")
    style_map = np.ascontiguousarray(style_map)
    dstyle = empty(style_map.shape, style_map.dtype)
    _ext.adaptive_instance_norm_backward(kernel_view(dy), kernel_view(x), kernel_view(style_map), None, None, eps,
                                         kernel_view(dx), kernel_view(dstyle), None, None, _layout(layout), bf16)
    return dx, dstyle

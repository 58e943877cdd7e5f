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
from ._args import as_eps, layout_name
from ._dtypes import DIRECT_DTYPES, as_input, as_params, empty, is_bf16, is_plain, kernel_view, stats_dtype
from ._inputs import channel_input, rows_input
from ._arrays import same_kind_out

__all__ = [
    "layer_norm_backward",
    "rms_norm_backward",
    "batch_norm_backward",
    "batch_norm_grad_sums",
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


@same_kind_out
def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight=None, *, stream=None):
    """Gradient of ``layer_norm``: returns ``(dx, dweight, dbias)``."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight, stream)
    x, shape, bf16, _ = rows_input(x, normalized_shape)
    dy = _like_x(dy, x, len(shape))
    mean, rstd = _saved(mean, "mean", x.dtype), _saved(rstd, "rstd", x.dtype)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))
    dx = empty(x.shape, x.dtype)
    dweight, dbias = _param_grads(weight, shape)
    _ext.layer_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, shape, kernel_view(weight),
                             kernel_view(dx), kernel_view(dweight), kernel_view(dbias), bf16)
    return dx, dweight, dbias


@same_kind_out
def rms_norm_backward(dy, x, rstd, normalized_shape, weight=None, *, stream=None):
    """Gradient of ``rms_norm``: returns ``(dx, dweight)``."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.rms_norm_backward(dy, x, rstd, normalized_shape, weight, stream)
    x, shape, bf16, _ = rows_input(x, normalized_shape)
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
    x, bf16 = channel_input(as_input(x, "x"))
    dy = _like_x(dy, x)
    mean, rstd = _saved(mean, "mean", x.dtype), _saved(rstd, "rstd", x.dtype)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))  # its shape is checked in C++
    dx = empty(x.shape, x.dtype)
    dweight, dbias = _param_grads(weight, None if weight is None else weight.shape)
    return dy, x, bf16, mean, rstd, weight, dx, dweight, dbias


def _direct_channel_backward(dy, x, mean, rstd, weight, layout, call):
    """The common NumPy call straight to the kernel, ``call(dx, dweight, dbias)`` on
    fresh gradients, returning them; or None for the general intake
    (_channel_backward_args): other array types, dtypes or memory orders, or a call the
    core refuses (the general intake then gives its messages; the core checks every
    argument before it writes). The intake costs about 8 us, a third of a
    [1,512,7,7] BatchNorm backward."""
    for a in (mean, rstd):  # in the statistics' dtype, checked by the core
        if type(a) is not np.ndarray or not a.flags.c_contiguous:
            return None
    if type(x) is not np.ndarray or not x.flags.c_contiguous or x.dtype not in DIRECT_DTYPES:
        return None
    if not is_plain(dy, x.dtype):
        return None
    if weight is not None and not is_plain(weight, x.dtype):
        return None
    if layout is not None and type(layout) is not str:
        return None
    dx = empty(x.shape, x.dtype)
    dweight, dbias = _param_grads(weight, None if weight is None else weight.shape)
    try:
        call(dx, dweight, dbias)
    except (TypeError, ValueError):
        return None
    return dx, dweight, dbias


@same_kind_out
def batch_norm_backward(dy, x, mean, rstd, weight=None, *, training=True, layout=None, sum_dy=None, sum_dy_xmu=None,
                        count=None, stream=None):
    """Gradient of ``batch_norm``: returns ``(dx, dweight, dbias)``.

    ``training=True``: through the batch statistics (``mean``, ``rstd`` from the
    training forward); ``training=False``: the running statistics were constants
    (``dx = dy * weight * rstd``).

    Distributed (x one shard of a batch normalized with the whole batch's
    statistics, ``batch_norm(..., stats=m)``): give the whole batch's
    ``sum_dy``, ``sum_dy_xmu`` (each (C,): the shards' ``batch_norm_grad_sums``
    added) and ``count``; ``mean``, ``rstd`` are the statistics the forward used
    (float64 ``m.mean``, ``m.rstd(eps)`` keep them exact). dweight and dbias are
    then the whole batch's.
    """
    if sum_dy is not None or sum_dy_xmu is not None or count is not None:
        return _batch_norm_backward_global(dy, x, mean, rstd, weight, training, layout, sum_dy, sum_dy_xmu, count)
    if type(x) is np.ndarray:
        grads = type(training) is bool and _direct_channel_backward(dy, x, mean, rstd, weight, layout, lambda dx, dw, db: (
            _ext.batch_norm_backward(dy, x, mean, rstd, weight, dx, dw, db, training, layout, False)))
        if grads:
            return grads
    elif _cuda.is_cuda(x):
        return _cuda.batch_norm_backward(dy, x, mean, rstd, weight, training, layout, stream)
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    _ext.batch_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, kernel_view(weight), kernel_view(dx),
                             kernel_view(dweight), kernel_view(dbias), bool(training), layout_name(layout), bf16)
    return dx, dweight, dbias


def _global_sum(value, name, channels):
    if value is None:
        raise ValueError(f"{name}: required with sum_dy, sum_dy_xmu and count (the whole batch's sums)")
    a = np.ascontiguousarray(as_input(value, name), dtype=np.float64)
    if a.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},), one value per channel, got {a.shape}")
    return a


def _batch_norm_backward_global(dy, x, mean, rstd, weight, training, layout, sum_dy, sum_dy_xmu, count):
    if not training:
        raise ValueError("sum_dy: the whole batch's sums are only used with training=True")
    if count is None:
        raise ValueError("count: required with sum_dy and sum_dy_xmu (the whole batch's values per channel)")
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count: expected an int, got {count!r}")
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    channels = mean.size
    sum_dy, sum_dy_xmu = _global_sum(sum_dy, "sum_dy", channels), _global_sum(sum_dy_xmu, "sum_dy_xmu", channels)
    _ext.batch_norm_backward_with_sums(kernel_view(dy), kernel_view(x), mean, rstd, int(count), sum_dy, sum_dy_xmu,
                                    kernel_view(weight), kernel_view(dx), kernel_view(dweight), kernel_view(dbias),
                                    layout_name(layout), bf16)
    return dx, dweight, dbias


@same_kind_out
def batch_norm_grad_sums(dy, x, mean, *, layout=None):
    """BatchNorm's backward reductions over this x (one shard of a batch):
    ``(sum_dy, sum_dy_xmu, count)``, float64 (C,) sums of dy and dy * (x - mean)
    per channel and the count of values per channel. Added over all shards (one
    all-reduce), they are what ``batch_norm_backward(..., sum_dy=, sum_dy_xmu=,
    count=)`` takes; ``mean`` is the one the forward normalized with (float64
    ``m.mean`` of the merged moments)."""
    x, bf16 = channel_input(as_input(x, "x"))
    dy = _like_x(dy, x)
    mean = _saved(mean, "mean", x.dtype)
    count, s_dy, s_dy_xmu = _ext.batch_norm_grad_sums(kernel_view(dy), kernel_view(x), mean, layout_name(layout), bf16)
    return s_dy, s_dy_xmu, count


@same_kind_out
def instance_norm_backward(dy, x, mean, rstd, weight=None, *, use_input_stats=True, layout=None, stream=None):
    """Gradient of ``instance_norm``: returns ``(dx, dweight, dbias)``; mean/rstd of shape (N, C)."""
    if type(x) is np.ndarray:
        grads = type(use_input_stats) is bool and _direct_channel_backward(
            dy, x, mean, rstd, weight, layout, lambda dx, dw, db: _ext.instance_norm_backward(
                dy, x, mean, rstd, weight, dx, dw, db, use_input_stats, layout, False))
        if grads:
            return grads
    elif _cuda.is_cuda(x):
        return _cuda.instance_norm_backward(dy, x, mean, rstd, weight, use_input_stats, layout, stream)
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    _ext.instance_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, kernel_view(weight), kernel_view(dx),
                                kernel_view(dweight), kernel_view(dbias), bool(use_input_stats), layout_name(layout),
                                bf16)
    return dx, dweight, dbias


@same_kind_out
def group_norm_backward(dy, x, mean, rstd, num_groups, weight=None, *, layout=None, stream=None):
    """Gradient of ``group_norm``: returns ``(dx, dweight, dbias)``; mean/rstd of shape (N, num_groups)."""
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.group_norm_backward(dy, x, mean, rstd, num_groups, weight, layout, stream)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    if type(x) is np.ndarray:
        grads = _direct_channel_backward(dy, x, mean, rstd, weight, layout, lambda dx, dw, db: (
            _ext.group_norm_backward(dy, x, mean, rstd, int(num_groups), weight, dx, dw, db, layout, False)))
        if grads:
            return grads
    dy, x, bf16, mean, rstd, weight, dx, dweight, dbias = _channel_backward_args(dy, x, mean, rstd, weight)
    _ext.group_norm_backward(kernel_view(dy), kernel_view(x), mean, rstd, int(num_groups), kernel_view(weight),
                             kernel_view(dx), kernel_view(dweight), kernel_view(dbias), layout_name(layout), bf16)
    return dx, dweight, dbias


@same_kind_out
def adaptive_instance_norm_backward(dy, x, style, eps=1e-5, *, layout=None, stream=None):
    """Gradient of ``adaptive_instance_norm``: returns ``(dx, dstyle)``.

    For a style feature map, ``dstyle`` has its shape (through its mean and
    std); for a ``(mean, std)`` pair, ``dstyle`` is the pair ``(dmean, dstd)``.
    x's statistics are recomputed (the forward saves none).
    """
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        return _cuda.adaptive_instance_norm_backward(dy, x, style, eps, layout, stream)
    x, bf16 = channel_input(as_input(x, "x"))
    dy = _like_x(dy, x)
    eps = as_eps(eps)
    dx = empty(x.shape, x.dtype)
    if isinstance(style, (tuple, list)):
        if len(style) != 2:
            raise ValueError(f"style: expected a feature map or a (mean, std) pair, got a sequence of {len(style)}")
        style_mean, style_std = as_params(x.dtype, (style[0], "style"), (style[1], "style"))
        dmean, dstd = np.empty_like(style_mean), np.empty_like(style_std)
        _ext.adaptive_instance_norm_backward(kernel_view(dy), kernel_view(x), None, kernel_view(style_mean),
                                             kernel_view(style_std), eps, kernel_view(dx), None, kernel_view(dmean),
                                             kernel_view(dstd), layout_name(layout), bf16)
        return dx, (dmean, dstd)
    style_map = as_input(style, "style")
    if style_map.dtype != x.dtype:
        raise TypeError(f"style: expected dtype {x.dtype} like x, got {style_map.dtype}")
    style_map = np.ascontiguousarray(style_map)
    dstyle = empty(style_map.shape, style_map.dtype)
    _ext.adaptive_instance_norm_backward(kernel_view(dy), kernel_view(x), kernel_view(style_map), None, None, eps,
                                         kernel_view(dx), kernel_view(dstyle), None, None, layout_name(layout), bf16)
    return dx, dstyle

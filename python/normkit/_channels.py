"""The channel norms on arrays: batch_norm, instance_norm, group_norm, adaptive_instance_norm.

x has a channel layout ("NC", "NCL"/"NLC", "NCHW"/"NHWC", "NCDHW"/"NDHWC", or a
normkit.Layout); the default is the channels-first layout of x's rank, as in
PyTorch. The core needs x contiguous in its layout: anything else is copied once
here. Outputs have x's shape and layout.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _cuda, _ext
from ._dtypes import as_input, as_params, call_direct, kernel_view, stats_dtype
from ._args import Layout, as_eps, as_momentum, batch_and_channels, layout_name
from ._epilogue import PLAIN, no_cuda_epilogue, parse
from ._inputs import channel_input, channel_output, finish_output
from ._moments import Moments
from ._arrays import is_array_object, same_kind_out

__all__ = ["batch_norm", "instance_norm", "group_norm", "adaptive_instance_norm", "Layout"]



def _running(stat, name, x_dtype, updated):
    """A running statistic: a float array, writable when it will be updated."""
    if stat is None:
        return None
    if not isinstance(stat, np.ndarray):
        _cuda.reject_device_array(stat, name)
        if not is_array_object(stat):  # a list would be updated in a copy and lost
            raise TypeError(f"{name}: expected an array (NumPy, torch, DLPack), got {type(stat).__name__}")
    stat = as_input(stat, name)  # a view of stat's memory; dtype check
    if updated and not stat.flags.writeable:
        raise ValueError(f"{name}: array is read-only, but it is updated in place in training")
    return kernel_view(stat)


def _running_norm_args(x, running_mean, running_var, weight, bias, momentum, eps, out, updates_running, epilogue):
    """The argument intake batch_norm and instance_norm share."""
    given = as_input(x, "x")
    x, bf16 = channel_input(given)
    rm = _running(running_mean, "running_mean", x.dtype, updates_running)
    rv = _running(running_var, "running_var", x.dtype, updates_running)
    if weight is not None or bias is not None:
        weight, bias = as_params(x.dtype, (weight, "weight"), (bias, "bias"))
    momentum, eps = as_momentum(momentum), as_eps(eps)
    y, copy_to = channel_output(out, x, given, epilogue)
    return x, given, bf16, rm, rv, weight, bias, momentum, eps, y, copy_to


def _stats(return_stats, shape, x_dtype):
    if not return_stats:
        return None, None
    dt = stats_dtype(x_dtype)
    return np.empty(shape, dtype=dt), np.empty(shape, dtype=dt)


def _direct_running(kernel, x, running_mean, running_var, weight, bias, flag, momentum, eps, layout, out):
    """batch_norm / instance_norm's common NumPy call straight to the kernel, or None
    (see call_direct). Running statistics must be NumPy arrays, writable where
    ``flag`` (training, use_input_stats) updates them: the core takes them read-only."""
    if type(flag) is not bool or type(momentum) is not float or (layout is not None and type(layout) is not str):
        return None
    for stat in (running_mean, running_var):
        if stat is not None and (type(stat) is not np.ndarray or (flag and not stat.flags.writeable)):
            return None
    return call_direct(kernel, x, (weight, bias), eps, out, running_mean, running_var, weight, bias, flag, momentum,
                       eps, layout, None, None, False, *PLAIN)


@same_kind_out
def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               *, layout=None, activation=None, quantize=None, scale=None, out=None, return_stats=False, stats=None,
               stream=None):
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    ``training=True`` normalizes with the batch statistics (biased variance) and
    updates ``running_mean``/``running_var`` in place when given (unbiased
    variance for ``running_var``); otherwise the running statistics are used.
    ``activation`` ("relu", "silu", "gelu", "gelu_tanh") applies after the affine;
    ``quantize`` ("int8", "float8_e4m3") with a static ``scale`` gives a quantized output.
    ``return_stats=True`` returns ``(y, mean, rstd)`` of shape (C,).
    ``stats`` (training only): a ``normkit.Moments`` of shape (C,), e.g. the
    moments of the whole batch merged over shards, used instead of x's own
    statistics, also for the running statistics (unbiased with stats' count).
    """
    if type(x) is np.ndarray and stats is None and activation is None and quantize is None and scale is None \
            and not return_stats:
        y = _direct_running(_ext.batch_norm, x, running_mean, running_var, weight, bias, training, momentum, eps,
                            layout, out)
        if y is not None:
            return y
    if stats is not None:
        return _batch_norm_with_stats(x, running_mean, running_var, weight, bias, training, momentum, eps, layout,
                                      activation, quantize, scale, out, return_stats, stats)
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        no_cuda_epilogue(x, activation, quantize, scale)
        return _cuda.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, layout, out, return_stats,
                                stream)
    training = bool(training)
    ep = parse(activation, quantize, scale, dynamic_allowed=False)
    x, given, bf16, rm, rv, weight, bias, momentum, eps, y, copy_to = _running_norm_args(
        x, running_mean, running_var, weight, bias, momentum, eps, out, training, ep)
    mean, rstd = _stats(return_stats, (batch_and_channels(x, layout)[1],), x.dtype)
    _ext.batch_norm(kernel_view(x), kernel_view(y), rm, rv, kernel_view(weight), kernel_view(bias), training,
                    momentum, eps, layout_name(layout), mean, rstd, bf16, *ep)
    y = finish_output(y, copy_to)
    return (y, mean, rstd) if return_stats else y


def _batch_norm_with_stats(x, running_mean, running_var, weight, bias, training, momentum, eps, layout, activation,
                           quantize, scale, out, return_stats, stats):
    if not isinstance(stats, Moments):
        raise TypeError(f"stats: expected a normkit.Moments (normkit.moments / merge_moments), got {type(stats).__name__}")
    if not training:
        raise ValueError("stats: only used with training=True (in eval the running statistics normalize)")
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        raise ValueError(f"stats: batch_norm with given statistics runs on the CPU; x is on cuda:{_cuda.device_of(x)}")
    ep = parse(activation, quantize, scale, dynamic_allowed=False)
    x, given, bf16, rm, rv, weight, bias, momentum, eps, y, copy_to = _running_norm_args(
        x, running_mean, running_var, weight, bias, momentum, eps, out, True, ep)
    mean, rstd = _stats(return_stats, (batch_and_channels(x, layout)[1],), x.dtype)
    _ext.batch_norm_with_stats(kernel_view(x), kernel_view(y), list(stats.shape), stats.count, stats.mean, stats.m2, rm, rv,
                               kernel_view(weight), kernel_view(bias), momentum, eps, layout_name(layout), mean, rstd,
                               bf16, *ep)
    y = finish_output(y, copy_to)
    return (y, mean, rstd) if return_stats else y


@same_kind_out
def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, layout=None, activation=None, out=None, return_stats=False, stream=None):
    """Instance normalization, as ``torch.nn.functional.instance_norm``.

    Statistics per (sample, channel) over the spatial axes when ``use_input_stats``
    (running statistics, if given, are updated in place with the batch mean of
    the per-instance statistics), else the running statistics.
    ``activation`` applies after the affine.
    ``return_stats=True`` returns ``(y, mean, rstd)`` of shape (N, C).
    """
    if type(x) is np.ndarray and activation is None and not return_stats:
        y = _direct_running(_ext.instance_norm, x, running_mean, running_var, weight, bias, use_input_stats, momentum,
                            eps, layout, out)
        if y is not None:
            return y
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        no_cuda_epilogue(x, activation, None, None)
        return _cuda.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout,
                                   out, return_stats, stream)
    use_input_stats = bool(use_input_stats)
    ep = parse(activation)
    x, given, bf16, rm, rv, weight, bias, momentum, eps, y, copy_to = _running_norm_args(
        x, running_mean, running_var, weight, bias, momentum, eps, out, use_input_stats, ep)
    mean, rstd = _stats(return_stats, batch_and_channels(x, layout), x.dtype)
    _ext.instance_norm(kernel_view(x), kernel_view(y), rm, rv, kernel_view(weight), kernel_view(bias),
                       use_input_stats, momentum, eps, layout_name(layout), mean, rstd, bf16, *ep)
    y = finish_output(y, copy_to)
    return (y, mean, rstd) if return_stats else y


@same_kind_out
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout=None, activation=None, quantize=None,
               scale=None, out=None, return_stats=False, stream=None):
    """Group normalization, as ``torch.nn.functional.group_norm``: statistics per
    (sample, group of C / num_groups channels), affine per channel.
    ``activation`` and ``quantize``/``scale`` (static) as for ``batch_norm``.
    ``return_stats=True`` returns ``(y, mean, rstd)`` of shape (N, num_groups).
    """
    if type(x) is np.ndarray:
        if (activation is None and quantize is None and scale is None and not return_stats
                and type(num_groups) is int and type(eps) is float and (layout is None or type(layout) is str)):
            y = call_direct(_ext.group_norm, x, (weight, bias), eps, out, num_groups, weight, bias, eps, layout,
                            None, None, False, *PLAIN)
            if y is not None:
                return y
    elif _cuda.is_cuda(x):
        no_cuda_epilogue(x, activation, quantize, scale)
        return _cuda.group_norm(x, num_groups, weight, bias, eps, layout, out, return_stats, stream)
    ep = parse(activation, quantize, scale, dynamic_allowed=False)
    given = as_input(x, "x")
    x, bf16 = channel_input(given)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    if weight is not None or bias is not None:
        weight, bias = as_params(x.dtype, (weight, "weight"), (bias, "bias"))
    eps = as_eps(eps)
    y, copy_to = channel_output(out, x, given, ep)
    n = x.shape[0] if x.ndim >= 1 else 0
    mean, rstd = _stats(return_stats, (n, max(int(num_groups), 0)), x.dtype)
    _ext.group_norm(kernel_view(x), kernel_view(y), int(num_groups), kernel_view(weight), kernel_view(bias), eps,
                    layout_name(layout), mean, rstd, bf16, *ep)
    y = finish_output(y, copy_to)
    return (y, mean, rstd) if return_stats else y


@same_kind_out
def adaptive_instance_norm(x, style, eps=1e-5, *, layout=None, activation=None, out=None, stream=None):
    """Adaptive instance normalization (AdaIN, Huang & Belongie 2017).

    ``y = (x - mean(x)) / sqrt(var(x) + eps) * style_std + style_mean`` per
    (sample, channel), with biased variances. ``style`` is a feature map in the
    same layout with x's N and C (any spatial size; its std is
    ``sqrt(var + eps)``), or a ``(mean, std)`` pair of arrays of shape (N, C).
    ``activation`` applies after the style's affine.
    """
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        no_cuda_epilogue(x, activation, None, None)
        return _cuda.adaptive_instance_norm(x, style, eps, layout, out, stream)
    ep = parse(activation)
    given = as_input(x, "x")
    x, bf16 = channel_input(given)
    eps = as_eps(eps)
    style_map = style_mean = style_std = None
    if isinstance(style, (tuple, list)):
        if len(style) != 2:
            raise ValueError(f"style: expected a feature map or a (mean, std) pair, got a sequence of {len(style)}")
        style_mean, style_std = as_params(x.dtype, (style[0], "style"), (style[1], "style"))
    else:
        style_map = as_input(style, "style")
        if style_map.dtype != x.dtype:
            raise TypeError(f"style: expected dtype {x.dtype} like x, got {style_map.dtype}")
        style_map = np.ascontiguousarray(style_map)
    y, copy_to = channel_output(out, x, given)
    _ext.adaptive_instance_norm(kernel_view(x), kernel_view(y), kernel_view(style_map), kernel_view(style_mean),
                                kernel_view(style_std), eps, layout_name(layout), bf16, ep.activation)
    return finish_output(y, copy_to)

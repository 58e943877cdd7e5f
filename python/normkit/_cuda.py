"""CUDA arrays: how normkit's functions take PyTorch CUDA tensors and CuPy arrays.

Every public function looks at ``x`` first: an array in CUDA device memory
(DLPack device CUDA or CUDA managed) goes to the CUDA backend
(``normkit._ext.cuda_*``, the C++ ``normkit::cuda`` entry points), and its
outputs are new arrays of the same library on the same device. The other
arrays of the call must then be on that device too, and host arrays must not
meet a CUDA ``x``, nor CUDA arrays a host ``x``: either is a clear error, never
a silent copy. In a build without CUDA, a CUDA array is a RuntimeError that
says how to build with CUDA.

``stream``: the work is queued on this CUDA stream (an integer ``cudaStream_t``,
a ``torch.cuda.Stream`` or a ``cupy.cuda.Stream``), so it runs after the work
already queued there; the call returns without waiting. ``None`` means the
caller's current stream (PyTorch's or CuPy's), as their own operations do.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _ext
from ._args import as_eps, as_momentum, as_normalized_shape, batch_and_channels, layout_name

# DLPack device types that are CUDA device memory.
_DLPACK_CUDA = 2
_DLPACK_CUDA_MANAGED = 13

_BUILD_HINT = "build normkit with CUDA: pip install . -Ccmake.define.NORMKIT_CUDA=ON"


def device_of(a):
    """The CUDA device ordinal of an array in CUDA memory; None for host arrays."""
    if a is None or type(a) is np.ndarray:
        return None
    probe = getattr(type(a), "__dlpack_device__", None)
    if probe is None:
        return None
    try:
        kind, ordinal = a.__dlpack_device__()
    except Exception:  # an object that cannot say: treat as host, its intake will complain
        return None
    if int(kind) in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
        return int(ordinal)
    return None


def is_cuda(a) -> bool:
    return device_of(a) is not None


def reject_device_array(a, name: str) -> None:
    """For a call on host arrays: `a` must not be in CUDA memory."""
    dev = device_of(a)
    if dev is None:
        return
    if not _ext.cuda_built():
        raise RuntimeError(f"{name}: is a CUDA array (cuda:{dev}), but this normkit was built without CUDA ({_BUILD_HINT})")
    raise ValueError(f"{name}: is on cuda:{dev}, but x is a host array (all arrays of one call must be on one device)")


# ---- the array libraries whose CUDA arrays normkit can allocate ----------------------


class _Torch:
    def __init__(self):
        import torch

        self.torch = torch

    def intake(self, a):
        return a.detach()  # DLPack refuses tensors that require grad

    def contiguous(self, a):
        return a if a.is_contiguous() else a.contiguous()

    def is_16bit(self, x):
        return x.dtype in (self.torch.float16, self.torch.bfloat16)

    def empty(self, like, shape, stats=False):
        dtype = self.torch.float32 if stats and self.is_16bit(like) else like.dtype
        return self.torch.empty(tuple(shape), dtype=dtype, device=like.device)

    def empty_like_param(self, p):
        return self.torch.empty_like(p, memory_format=self.torch.contiguous_format)

    def current_stream(self, x):
        return int(self.torch.cuda.current_stream(x.device).cuda_stream)


class _CuPy:
    def __init__(self):
        import cupy

        self.cupy = cupy

    def intake(self, a):
        return a

    def contiguous(self, a):
        return a if a.flags.c_contiguous else self.cupy.ascontiguousarray(a)

    def is_16bit(self, x):
        return x.dtype == np.float16

    def empty(self, like, shape, stats=False):
        dtype = np.float32 if stats and self.is_16bit(like) else like.dtype
        with self.cupy.cuda.Device(like.device.id):
            return self.cupy.empty(tuple(shape), dtype=dtype)

    def empty_like_param(self, p):
        with self.cupy.cuda.Device(p.device.id):
            return self.cupy.empty(p.shape, dtype=p.dtype)

    def current_stream(self, x):
        return int(self.cupy.cuda.get_current_stream().ptr)


def _library(x):
    root = type(x).__module__.split(".")[0]
    if root == "torch":
        return _Torch()
    if root == "cupy":
        return _CuPy()
    raise TypeError(
        f"x: a CUDA array of type {type(x).__name__}: normkit allocates its CUDA outputs with PyTorch or CuPy, "
        "so x must be a torch.Tensor or a cupy.ndarray"
    )


class _Call:
    """One call on CUDA arrays: x's device and library, the stream, the checks."""

    def __init__(self, x, stream):
        self.device = device_of(x)
        if not _ext.cuda_built():
            raise RuntimeError(f"x: is a CUDA array (cuda:{self.device}), but this normkit was built without CUDA ({_BUILD_HINT})")
        self.lib = _library(x)
        self.x = self.lib.intake(x)
        self.stream = self._stream(stream)

    def _stream(self, stream):
        if stream is None:
            return self.lib.current_stream(self.x)
        if isinstance(stream, numbers.Integral) and not isinstance(stream, bool):
            if stream < 0:
                raise ValueError(f"stream: expected a CUDA stream handle, got {stream}")
            return int(stream)
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            handle = getattr(stream, attr, None)
            if isinstance(handle, numbers.Integral):
                return int(handle)
        raise TypeError(
            f"stream: expected a CUDA stream (an int cudaStream_t, a torch.cuda.Stream or a cupy.cuda.Stream), got {stream!r}"
        )

    def array(self, a, name, contiguous=False):
        """A CUDA array argument on x's device (None stays None)."""
        if a is None:
            return None
        dev = device_of(a)
        if dev is None:
            raise ValueError(
                f"{name}: is a host array, but x is on cuda:{self.device} (all arrays of one call must be on one device)"
            )
        if dev != self.device:
            raise ValueError(f"{name}: is on cuda:{dev}, but x is on cuda:{self.device} (all arrays of one call must be on one device)")
        a = self.lib.intake(a)
        return self.lib.contiguous(a) if contiguous else a

    def output(self, out, shape):
        if out is None:
            return self.lib.empty(self.x, shape)
        return self.array(out, "out")

    def stats(self, wanted, shape):
        if not wanted:
            return None, None
        return self.lib.empty(self.x, shape, stats=True), self.lib.empty(self.x, shape, stats=True)


def _style(call, style, name="style"):
    """(map, mean, std): a style feature map, or a (mean, std) pair."""
    if isinstance(style, (tuple, list)):
        if len(style) != 2:
            raise ValueError(f"style: expected a feature map or a (mean, std) pair, got a sequence of {len(style)}")
        return None, call.array(style[0], name, True), call.array(style[1], name, True)
    return call.array(style, name, True), None, None


# ---- forward ----------------------------------------------------------------------------


def layer_norm(x, normalized_shape, weight, bias, eps, out, return_stats, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    shape = as_normalized_shape(normalized_shape)
    weight, bias = call.array(weight, "weight", True), call.array(bias, "bias", True)
    y = call.output(out, x.shape)
    mean, rstd = call.stats(return_stats, tuple(x.shape[: x.ndim - len(shape)]) + (1,) * len(shape))
    _ext.cuda_layer_norm(x, y, shape, weight, bias, as_eps(eps), mean, rstd, call.stream)
    return (y, mean, rstd) if return_stats else y


def rms_norm(x, normalized_shape, weight, eps, out, return_stats, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    shape = as_normalized_shape(normalized_shape)
    weight = call.array(weight, "weight", True)
    y = call.output(out, x.shape)
    rstd = None
    if return_stats:
        rstd = call.lib.empty(x, tuple(x.shape[: x.ndim - len(shape)]) + (1,) * len(shape), stats=True)
    _ext.cuda_rms_norm(x, y, shape, weight, None if eps is None else as_eps(eps), rstd, call.stream)
    return (y, rstd) if return_stats else y


def _running_norm(ext_fn, per_sample, x, running_mean, running_var, weight, bias, flag, momentum, eps, layout, out,
                  return_stats, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    rm, rv = call.array(running_mean, "running_mean"), call.array(running_var, "running_var")
    weight, bias = call.array(weight, "weight", True), call.array(bias, "bias", True)
    y = call.output(out, x.shape)
    n, c = batch_and_channels(x, layout)
    mean, rstd = call.stats(return_stats, (n, c) if per_sample else (c,))
    ext_fn(x, y, rm, rv, weight, bias, bool(flag), as_momentum(momentum), as_eps(eps), layout_name(layout), mean, rstd,
           call.stream)
    return (y, mean, rstd) if return_stats else y


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, layout, out, return_stats,
               stream):
    return _running_norm(_ext.cuda_batch_norm, False, x, running_mean, running_var, weight, bias, training, momentum,
                         eps, layout, out, return_stats, stream)


def instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout, out,
                  return_stats, stream):
    return _running_norm(_ext.cuda_instance_norm, True, x, running_mean, running_var, weight, bias, use_input_stats,
                         momentum, eps, layout, out, return_stats, stream)


def group_norm(x, num_groups, weight, bias, eps, layout, out, return_stats, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    weight, bias = call.array(weight, "weight", True), call.array(bias, "bias", True)
    y = call.output(out, x.shape)
    n = x.shape[0] if x.ndim >= 1 else 0
    mean, rstd = call.stats(return_stats, (n, max(int(num_groups), 0)))
    _ext.cuda_group_norm(x, y, int(num_groups), weight, bias, as_eps(eps), layout_name(layout), mean, rstd, call.stream)
    return (y, mean, rstd) if return_stats else y


def adaptive_instance_norm(x, style, eps, layout, out, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    style_map, style_mean, style_std = _style(call, style)
    y = call.output(out, x.shape)
    _ext.cuda_adaptive_instance_norm(x, y, style_map, style_mean, style_std, as_eps(eps), layout_name(layout), call.stream)
    return y


# ---- backward -----------------------------------------------------------------------------


def _param_grads(call, weight, with_bias=True):
    """dweight (and dbias) of weight's dtype and shape; None without a weight (as on the CPU)."""
    if weight is None:
        return None, None
    return call.lib.empty_like_param(weight), (call.lib.empty_like_param(weight) if with_bias else None)


def layer_norm_backward(dy, x, mean, rstd, normalized_shape, weight, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    dy = call.array(dy, "dy", True)
    mean, rstd = call.array(mean, "mean", True), call.array(rstd, "rstd", True)
    shape = as_normalized_shape(normalized_shape)
    weight = call.array(weight, "weight", True)
    dx = call.lib.empty(x, x.shape)
    dweight, dbias = _param_grads(call, weight)
    _ext.cuda_layer_norm_backward(dy, x, mean, rstd, shape, weight, dx, dweight, dbias, call.stream)
    return dx, dweight, dbias


def rms_norm_backward(dy, x, rstd, normalized_shape, weight, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    dy = call.array(dy, "dy", True)
    rstd = call.array(rstd, "rstd", True)
    shape = as_normalized_shape(normalized_shape)
    weight = call.array(weight, "weight", True)
    dx = call.lib.empty(x, x.shape)
    dweight, _ = _param_grads(call, weight, with_bias=False)
    _ext.cuda_rms_norm_backward(dy, x, rstd, shape, weight, dx, dweight, call.stream)
    return dx, dweight


def _channel_backward(ext_fn, dy, x, mean, rstd, weight, flag, layout, stream, num_groups=None):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    dy = call.array(dy, "dy", True)
    mean, rstd = call.array(mean, "mean", True), call.array(rstd, "rstd", True)
    weight = call.array(weight, "weight", True)
    dx = call.lib.empty(x, x.shape)
    dweight, dbias = _param_grads(call, weight)
    if num_groups is None:
        ext_fn(dy, x, mean, rstd, weight, dx, dweight, dbias, bool(flag), layout_name(layout), call.stream)
    else:
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
        ext_fn(dy, x, mean, rstd, int(num_groups), weight, dx, dweight, dbias, layout_name(layout), call.stream)
    return dx, dweight, dbias


def batch_norm_backward(dy, x, mean, rstd, weight, training, layout, stream):
    return _channel_backward(_ext.cuda_batch_norm_backward, dy, x, mean, rstd, weight, training, layout, stream)


def instance_norm_backward(dy, x, mean, rstd, weight, use_input_stats, layout, stream):
    return _channel_backward(_ext.cuda_instance_norm_backward, dy, x, mean, rstd, weight, use_input_stats, layout,
                             stream)


def group_norm_backward(dy, x, mean, rstd, num_groups, weight, layout, stream):
    return _channel_backward(_ext.cuda_group_norm_backward, dy, x, mean, rstd, weight, None, layout, stream,
                             num_groups=num_groups)


def adaptive_instance_norm_backward(dy, x, style, eps, layout, stream):
    call = _Call(x, stream)
    x = call.lib.contiguous(call.x)
    dy = call.array(dy, "dy", True)
    style_map, style_mean, style_std = _style(call, style)
    dx = call.lib.empty(x, x.shape)
    if style_map is None:
        dmean, dstd = call.lib.empty_like_param(style_mean), call.lib.empty_like_param(style_std)
        _ext.cuda_adaptive_instance_norm_backward(dy, x, None, style_mean, style_std, as_eps(eps), dx, None, dmean,
                                                  dstd, layout_name(layout), call.stream)
        return dx, (dmean, dstd)
    dstyle = call.lib.empty(style_map, style_map.shape)
    _ext.cuda_adaptive_instance_norm_backward(dy, x, style_map, None, None, as_eps(eps), dx, dstyle, None, None,
                                              layout_name(layout), call.stream)
    return dx, dstyle

"""The normalization functions on arrays (normkit's functional API)."""

from __future__ import annotations


import numpy as np

from . import _cuda, _ext
from ._dtypes import (as_input, call_direct, as_params, check_out, empty, indirect_output, is_bf16,
                      kernel_view, stats_dtype)
from ._args import as_eps
from ._epilogue import PLAIN, no_cuda_epilogue, parse, quantized_output, results
from ._inputs import rows_input
from ._arrays import same_kind_out

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]


def _output(out, x, k, given, epilogue=PLAIN):
    """(array the kernel writes, array to copy it into afterwards or None).
    `given` is x as the caller passed it (x itself may be a contiguous copy)."""
    if epilogue.quantize:
        return quantized_output(out, x.shape, epilogue, given)
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


def _stats_shape(x, k):
    return x.shape[: x.ndim - k] + (1,) * k


def _direct_rows(kernel, x, normalized_shape, params, eps, out, *flags):
    """The common call straight to the kernel, or None (see call_direct)."""
    shape = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
    if type(shape) is not tuple:
        return None
    return call_direct(kernel, x, params, eps, out, shape, *params, eps, *flags)


@same_kind_out
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, activation=None, quantize=None, scale=None,
               out=None, return_stats=False, stream=None):
    """Layer normalization over the trailing ``normalized_shape`` dims of ``x``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance,
    as ``torch.nn.functional.layer_norm``, then ``activation`` ("relu", "silu",
    "gelu", "gelu_tanh") and ``quantize`` ("int8", "float8_e4m3": static with
    ``scale=``, else dynamic per row). Returns ``y`` (or ``q``), then the dynamic
    scales, then ``(mean, rstd)`` with ``return_stats=True`` (statistics of shape
    ``x.shape[:-k] + (1,)*k``, float32 for 16-bit ``x``). ``out`` may be ``x`` itself.
    """
    if type(x) is np.ndarray:
        if activation is None and quantize is None and scale is None and not return_stats:
            y = _direct_rows(_ext.layer_norm, x, normalized_shape, (weight, bias), eps, out, None, None, False)
            if y is not None:
                return y
    elif _cuda.is_cuda(x):
        no_cuda_epilogue(x, activation, quantize, scale)
        return _cuda.layer_norm(x, normalized_shape, weight, bias, eps, out, return_stats, stream)
    ep = parse(activation, quantize, scale)
    x, shape, bf16, given = rows_input(x, normalized_shape)
    if weight is not None or bias is not None:
        weight, bias = as_params(x.dtype, (weight, "weight"), (bias, "bias"))
    eps = as_eps(eps)
    y, copy_to = _output(out, x, len(shape), given, ep)
    mean = rstd = None
    if return_stats:
        mean = np.empty(_stats_shape(x, len(shape)), dtype=stats_dtype(x.dtype))
        rstd = np.empty(mean.shape, dtype=mean.dtype)
    if ep is PLAIN:
        if bf16:
            _ext.layer_norm(
                kernel_view(x), kernel_view(y), shape, kernel_view(weight), kernel_view(bias), eps, mean, rstd, True
            )
        else:
            _ext.layer_norm(x, y, shape, weight, bias, eps, mean, rstd, False)
        scales = None
    else:
        scales = np.empty(_stats_shape(x, len(shape)), np.float32) if ep.dynamic else None
        _ext.layer_norm(kernel_view(x), kernel_view(y), shape, kernel_view(weight), kernel_view(bias), eps, mean, rstd,
                        bf16, *ep, scales)
    if copy_to is not None:
        np.copyto(copy_to, y)
        y = copy_to
    return results(y, scales, None, (mean, rstd) if return_stats else ())


@same_kind_out
def rms_norm(x, normalized_shape, weight=None, eps=None, *, activation=None, quantize=None, scale=None, out=None,
             return_stats=False, stream=None):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims.

    ``y = x / sqrt(mean(x**2) + eps) * weight`` as ``torch.nn.functional.rms_norm``;
    ``eps=None`` means the machine epsilon of ``x``'s dtype. ``activation`` and
    ``quantize``/``scale`` as for ``layer_norm``. Returns ``y`` (or ``q``), then the
    dynamic scales, then ``rstd`` with ``return_stats=True``.
    """
    if type(x) is np.ndarray:
        if activation is None and quantize is None and scale is None and not return_stats:
            y = _direct_rows(_ext.rms_norm, x, normalized_shape, (weight,), eps, out, None, False)
            if y is not None:
                return y
    elif _cuda.is_cuda(x):
        no_cuda_epilogue(x, activation, quantize, scale)
        return _cuda.rms_norm(x, normalized_shape, weight, eps, out, return_stats, stream)
    ep = parse(activation, quantize, scale)
    x, shape, bf16, given = rows_input(x, normalized_shape)
    if weight is not None:
        (weight,) = as_params(x.dtype, (weight, "weight"))
    eps = None if eps is None else as_eps(eps)
    y, copy_to = _output(out, x, len(shape), given, ep)
    rstd = None
    if return_stats:
        rstd = np.empty(_stats_shape(x, len(shape)), dtype=stats_dtype(x.dtype))
    if ep is PLAIN:
        if bf16:
            _ext.rms_norm(kernel_view(x), kernel_view(y), shape, kernel_view(weight), eps, rstd, True)
        else:
            _ext.rms_norm(x, y, shape, weight, eps, rstd, False)
        scales = None
    else:
        scales = np.empty(_stats_shape(x, len(shape)), np.float32) if ep.dynamic else None
        _ext.rms_norm(kernel_view(x), kernel_view(y), shape, kernel_view(weight), eps, rstd, bf16, *ep, scales)
    if copy_to is not None:
        np.copyto(copy_to, y)
        y = copy_to
    return results(y, scales, None, (rstd,) if return_stats else ())


def _viewable_rows(a, k, bf16):
    return a.flags.c_contiguous or _ext.rows_viewable(kernel_view(a), k, bf16)


def _add_rows_norm(rms, x, residual, normalized_shape, weight, bias, eps, residual_bias, activation, quantize, scale,
                   out, sum_out, return_stats):
    name = "add_rms_norm" if rms else "add_layer_norm"
    if type(x) is not np.ndarray and _cuda.is_cuda(x):
        raise ValueError(f"x: {name} takes CPU arrays (the CUDA backend has no fused forms yet)")
    ep = parse(activation, quantize, scale)
    x, shape, bf16, given = rows_input(x, normalized_shape)
    k = len(shape)
    residual = as_input(residual, "residual")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual: expected dtype {x.dtype} like x, got {residual.dtype}")
    if not _viewable_rows(residual, k, bf16):
        residual = np.ascontiguousarray(residual)  # read only: a copy is safe
    if weight is not None or bias is not None or residual_bias is not None:
        weight, bias, residual_bias = as_params(
            x.dtype, (weight, "weight"), (bias, "bias"), (residual_bias, "residual_bias")
        )
    eps = None if eps is None else as_eps(eps)
    y, copy_to = _output(out, x, k, given, ep)
    if sum_out is None:
        s, sum_copy_to = empty(x.shape, x.dtype), None
    else:
        s, sum_copy_to = check_out(sum_out, x, "sum_out"), None
        if s.shape == x.shape and not _viewable_rows(s, k, bf16):
            if any(np.shares_memory(s, a) for a in (given, residual)):
                raise ValueError("sum_out: the kernels cannot write this strided view in place; pass a contiguous array")
            s, sum_copy_to = empty(x.shape, x.dtype), s
    stats = _stats_shape(x, k)
    mean = np.empty(stats, dtype=stats_dtype(x.dtype)) if return_stats and not rms else None
    rstd = np.empty(stats, dtype=stats_dtype(x.dtype)) if return_stats else None
    scales = np.empty(stats, np.float32) if ep.dynamic else None
    _ext.add_rows_norm(rms, kernel_view(x), kernel_view(residual), kernel_view(y), kernel_view(s), shape,
                       kernel_view(weight), kernel_view(bias), eps, kernel_view(residual_bias), mean, rstd, bf16, *ep,
                       scales)
    if copy_to is not None:
        np.copyto(copy_to, y)
        y = copy_to
    if sum_copy_to is not None:
        np.copyto(sum_copy_to, s)
        s = sum_copy_to
    if not return_stats:
        return results(y, scales, s)
    return results(y, scales, s, (rstd,) if rms else (mean, rstd))


@same_kind_out
def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual_bias=None,
                   activation=None, quantize=None, scale=None, out=None, sum_out=None, return_stats=False):
    """Residual add + LayerNorm (ONNX Runtime's SkipLayerNormalization).

    ``s = x + residual (+ residual_bias)``, computed in float32 (float64 for
    float64 x) and stored once in x's dtype; ``y = layer_norm(s)`` of ``s`` as
    stored, so it equals ``layer_norm`` on the returned ``s``. ``residual`` has
    x's shape or x's trailing dims (broadcast over the leading ones).
    ``activation``/``quantize``/``scale`` as for ``layer_norm``. Returns
    ``(y, s)``; dynamic scales come after ``y``, ``(mean, rstd)`` at the end with
    ``return_stats=True``. In place: ``out=x`` and ``sum_out=residual`` (or x).
    """
    return _add_rows_norm(False, x, residual, normalized_shape, weight, bias, eps, residual_bias, activation, quantize,
                          scale, out, sum_out, return_stats)


@same_kind_out
def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, residual_bias=None, activation=None,
                 quantize=None, scale=None, out=None, sum_out=None, return_stats=False):
    """Residual add + RMSNorm (vLLM's fused_add_rms_norm, ONNX Runtime's
    SkipSimplifiedLayerNormalization): as ``add_layer_norm`` with ``y = rms_norm(s)``.
    Returns ``(y, s)``, with the dynamic scales after ``y`` and ``rstd`` at the end
    with ``return_stats=True``."""
    return _add_rows_norm(True, x, residual, normalized_shape, weight, None, eps, residual_bias, activation, quantize,
                          scale, out, sum_out, return_stats)

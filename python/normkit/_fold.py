"""BatchNorm folded into the convolution or linear layer before it (inference)."""

from __future__ import annotations

import numpy as np

from . import _ext
from ._dtypes import FLOAT32, as_input, as_int, is_16bit, is_bf16, kernel_view
from ._args import as_eps
from ._arrays import same_kind_out

__all__ = ["fold_batch_norm"]


def _array(a, name: str) -> np.ndarray:
    """An input as a NumPy array of a float dtype (torch tensors that require grad too)."""
    if type(a) is not np.ndarray and hasattr(a, "detach"):
        a = a.detach()
    return as_input(a, name)


def _vector(a, name: str, weight_dtype, allow_float32: bool):
    """An optional per-channel vector, contiguous, in the dtype the core takes:
    weight's, or (allow_float32, 16-bit weight) float32 unless it already is weight's."""
    if a is None:
        return None
    a = _array(a, name)
    if a.dtype == weight_dtype or (allow_float32 and a.dtype == FLOAT32):
        return np.asarray(a, order="C")
    return np.asarray(a, dtype=FLOAT32 if allow_float32 else weight_dtype, order="C")


def _c_out(shape: tuple, transpose: bool, groups: int) -> int:
    """Output channels of a weight; 0 where the core will refuse the weight or groups."""
    if groups <= 0 or len(shape) < (2 if transpose else 1):
        return 0
    return shape[1] * groups if transpose else shape[0]


def prepare_weight(weight, bias):
    """(weight, bias) as the core takes them: weight a contiguous float array,
    bias None or of weight's dtype."""
    if weight is None:
        raise ValueError("weight: is required")
    weight = np.asarray(_array(weight, "weight"), order="C")  # (np.ascontiguousarray makes 0-d 1-d)
    return weight, _vector(bias, "bias", weight.dtype, allow_float32=False)


def new_outputs(weight: np.ndarray, transpose: bool, groups: int):
    """Fresh (folded_weight, folded_bias) arrays."""
    return (
        np.empty(weight.shape, weight.dtype),
        np.empty((_c_out(weight.shape, transpose, groups),), weight.dtype),
    )


@same_kind_out
def fold_batch_norm(weight, bias, running_mean, running_var, eps, bn_weight, bn_bias, *, transpose=False, groups=1):
    """Folds an inference BatchNorm into the convolution or linear layer before it.

    Arguments and results as ``torch.nn.utils.fusion.fuse_conv_bn_weights``::

        a = bn_weight / sqrt(running_var + eps)
        folded_weight = weight * a (per output channel)
        folded_bias = (bias - running_mean) * a + bn_bias

    ``weight`` is ``[C_out, C_in/groups, ...]`` (a convolution; ``[out, in]`` for
    a linear layer) or with ``transpose=True`` ``[C_in, C_out/groups, ...]`` (a
    transposed convolution, whose output channel for ``weight[i, j]`` is
    ``(i // (C_in/groups)) * (C_out/groups) + j``; PyTorch gets ``groups > 1``
    wrong there). ``bias``, ``bn_weight`` and ``bn_bias`` may be None (zeros,
    ones, zeros); the vectors have ``C_out`` entries.

    Returns new arrays ``(folded_weight, folded_bias)`` of weight's dtype
    (``folded_bias`` also when ``bias`` is None); the inputs are not changed.
    Computed in float64 and rounded once. ``bias`` is cast to weight's dtype;
    the BN vectors too, or for float16/bfloat16 weights kept as float32
    (others cast to float32).
    """
    weight, bias = prepare_weight(weight, bias)
    dtype = weight.dtype
    wide = is_16bit(dtype)
    running_mean = _vector(running_mean, "running_mean", dtype, wide)
    running_var = _vector(running_var, "running_var", dtype, wide)
    bn_weight = _vector(bn_weight, "bn_weight", dtype, wide)
    bn_bias = _vector(bn_bias, "bn_bias", dtype, wide)
    eps = as_eps(eps)
    transpose = bool(transpose)
    groups = as_int(groups, "groups")
    folded_weight, folded_bias = new_outputs(weight, transpose, groups)
    arrays = [weight, bias, running_mean, running_var, bn_weight, bn_bias, folded_weight, folded_bias]
    bf16 = is_bf16(dtype)
    if bf16:
        arrays = [kernel_view(a) for a in arrays]
    w, b, rm, rv, bw, bb, fw, fb = arrays
    _ext.fold_batch_norm(w, b, rm, rv, eps, bw, bb, fw, fb, transpose, groups, bf16)
    return folded_weight, folded_bias

"""``torch.nn.functional``'s norms on normkit's kernels, with autograd: the same names,
arguments and defaults. Running statistics are updated in place, as PyTorch's are."""

from __future__ import annotations

import numbers
from typing import List, Optional

import torch
from torch import Tensor

from . import _ops

__all__ = ["layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"]


def _shape(normalized_shape) -> List[int]:
    if isinstance(normalized_shape, numbers.Integral):
        return [int(normalized_shape)]
    return [int(d) for d in normalized_shape]


def layer_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    return _ops.layer_norm_op(input, _shape(normalized_shape), weight, bias, float(eps))[0]


def rms_norm(input: Tensor, normalized_shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    return _ops.rms_norm_op(input, _shape(normalized_shape), weight, None if eps is None else float(eps))[0]


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    return _ops.group_norm_op(input, int(num_groups), weight, bias, float(eps))[0]


def _store_running(running_mean, running_var, new_mean, new_var) -> None:
    """The operators are pure: their updated running statistics go into the caller's buffers here."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(new_mean)
        if running_var is not None:
            running_var.copy_(new_var)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    y, _, _, new_mean, new_var = _ops.batch_norm_op(input, running_mean, running_var, weight, bias, bool(training),
                                                    float(momentum), float(eps))
    if training:
        _store_running(running_mean, running_var, new_mean, new_var)
    return y


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    y, _, _, new_mean, new_var = _ops.instance_norm_op(input, running_mean, running_var, weight, bias,
                                                       bool(use_input_stats), float(momentum), float(eps))
    if use_input_stats:
        _store_running(running_mean, running_var, new_mean, new_var)
    return y

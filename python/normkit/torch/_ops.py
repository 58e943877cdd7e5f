"""normkit's kernels as PyTorch custom operators, with autograd and fake implementations.

Each norm is two operators in the ``normkit`` namespace, a forward that also returns the
saved statistics and a backward, both opaque to PyTorch (``torch.library.custom_op``). The
fake implementations give the outputs' shapes, dtypes and memory formats without running
anything, so ``torch.compile`` traces through them with no graph break; ``register_autograd``
ties each forward to its backward. The backward operators have no autograd of their own:
double backward is an error from PyTorch, not a wrong answer.

The operators are pure. BatchNorm and InstanceNorm return the updated running statistics as
new tensors, which the functional forms copy into the caller's buffers (PyTorch's autograd
and functionalization want custom operators without mutation when they carry autograd).

Channels-last tensors (4-D/5-D) are computed in normkit's NHWC/NDHWC layout on a permuted,
contiguous view, so outputs keep the input's memory format and nothing is copied.
Statistics of 16-bit inputs are float32, as normkit returns them.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

import normkit

_CHANNELS_FIRST = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
_CHANNELS_LAST = {4: ("NHWC", (0, 2, 3, 1), (0, 3, 1, 2)), 5: ("NDHWC", (0, 2, 3, 4, 1), (0, 4, 1, 2, 3))}
_MEMORY_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


def _d(t: Optional[Tensor]) -> Optional[Tensor]:
    """A tensor as normkit's plain functions take it (they refuse tensors that require grad)."""
    return None if t is None else t.detach()


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """An absent output as an empty tensor (operator schemas have no optional returns)."""
    return like.new_empty(0) if t is None else t


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _is_channels_last(x: Tensor) -> bool:
    fmt = _MEMORY_FORMAT.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _channel_view(x: Tensor):
    """(x as normkit reads it, its layout name, how to turn a result back into x's dims)."""
    if x.dim() not in _CHANNELS_FIRST:
        raise ValueError(f"input: expected 2 to 5 dims (N, C, *), got {x.dim()}")
    if _is_channels_last(x):
        layout, to_last, from_last = _CHANNELS_LAST[x.dim()]
        return x.permute(to_last), layout, lambda y: y.permute(from_last)
    return x, _CHANNELS_FIRST[x.dim()], lambda y: y


def _channel_output_fake(x: Tensor) -> Tensor:
    """A fake channel-norm output: x's shape and dtype, channels_last when x is (as the real one)."""
    fmt = _MEMORY_FORMAT[x.dim()] if _is_channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=fmt)


def _channel_backward(grad_fn, dy, x, mean, rstd, weight, *args, **kwargs):
    """(dx, dweight, dbias) of a channel norm, with dy read in x's layout."""
    view, layout, back = _channel_view(_d(x))
    dy = _d(dy)
    if layout in ("NHWC", "NDHWC"):
        dy = dy.permute(_CHANNELS_LAST[x.dim()][1])
    dx, dw, db = grad_fn(dy, view, _d(mean), _d(rstd), *args, weight=_d(weight), layout=layout, **kwargs)
    return back(dx), _or_empty(dw, x), _or_empty(db, x)


def _param_grad(g: Optional[Tensor], p: Optional[Tensor]):
    """A parameter's gradient in the parameter's own dtype (normkit may compute it in float32)."""
    if p is None or g is None or g.numel() == 0 and p.numel() != 0:
        return None
    return g.to(p.dtype)


def _param_grads_fake(x: Tensor, weight: Optional[Tensor]):
    """Fake (dweight, dbias) as normkit computes them: in weight's dtype where it is x's,
    else float32 for 16-bit x and x's dtype otherwise (normkit's parameter dtype rule)."""
    if weight is None:
        return x.new_empty(0), x.new_empty(0)
    if weight.dtype == x.dtype:
        dt = x.dtype
    else:
        dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return weight.new_empty(weight.shape, dtype=dt), weight.new_empty(weight.shape, dtype=dt)


# --------------------------------------------------------------------------- LayerNorm

@torch.library.custom_op("normkit::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return normkit.layer_norm(_d(x), tuple(normalized_shape), _d(weight), _d(bias), eps, return_stats=True)


@layer_norm_op.register_fake
def _(x, normalized_shape, weight, bias, eps):
    k = len(normalized_shape)
    stats = x.new_empty(tuple(x.shape[: x.dim() - k]) + (1,) * k, dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.custom_op("normkit::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, normalized_shape: List[int],
                           weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = normkit.layer_norm_backward(_d(dy), _d(x), _d(mean), _d(rstd), tuple(normalized_shape), _d(weight))
    return dx, _or_empty(dw, x), _or_empty(db, x)


@layer_norm_backward_op.register_fake
def _(dy, x, mean, rstd, normalized_shape, weight):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *_param_grads_fake(x, weight))


def _layer_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, bias, _ = inputs
    ctx.save_for_backward(x, output[1], output[2], weight)
    ctx.normalized_shape, ctx.has_bias = normalized_shape, bias is not None


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight = ctx.saved_tensors
    dx, dw, db = layer_norm_backward_op(dy, x, mean, rstd, ctx.normalized_shape, weight)
    return dx, None, _param_grad(dw, weight), _param_grad(db, weight) if ctx.has_bias else None, None


layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# --------------------------------------------------------------------------- RMSNorm

@torch.library.custom_op("normkit::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                eps: Optional[float]) -> Tuple[Tensor, Tensor]:
    return normkit.rms_norm(_d(x), tuple(normalized_shape), _d(weight), eps, return_stats=True)


@rms_norm_op.register_fake
def _(x, normalized_shape, weight, eps):
    k = len(normalized_shape)
    rstd = x.new_empty(tuple(x.shape[: x.dim() - k]) + (1,) * k, dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=torch.contiguous_format), rstd


@torch.library.custom_op("normkit::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: Tensor, x: Tensor, rstd: Tensor, normalized_shape: List[int],
                         weight: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    dx, dw = normkit.rms_norm_backward(_d(dy), _d(x), _d(rstd), tuple(normalized_shape), _d(weight))
    return dx, _or_empty(dw, x)


@rms_norm_backward_op.register_fake
def _(dy, x, rstd, normalized_shape, weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _param_grads_fake(x, weight)[0]


def _rms_norm_setup(ctx, inputs, output):
    x, normalized_shape, weight, _ = inputs
    ctx.save_for_backward(x, output[1], weight)
    ctx.normalized_shape = normalized_shape


def _rms_norm_backward(ctx, dy, _drstd):
    x, rstd, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward_op(dy, x, rstd, ctx.normalized_shape, weight)
    return dx, None, _param_grad(dw, weight), None


rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


# --------------------------------------------------------------------------- channel norms

@torch.library.custom_op("normkit::group_norm", mutates_args=())
def group_norm_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    view, layout, back = _channel_view(_d(x))
    y, mean, rstd = normkit.group_norm(view, num_groups, _d(weight), _d(bias), eps, layout=layout, return_stats=True)
    return back(y), mean, rstd


@group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return _channel_output_fake(x), stats, torch.empty_like(stats)


@torch.library.custom_op("normkit::group_norm_backward", mutates_args=())
def group_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
                           weight: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    return _channel_backward(normkit.group_norm_backward, dy, x, mean, rstd, weight, num_groups)


@group_norm_backward_op.register_fake
def _(dy, x, mean, rstd, num_groups, weight):
    return (_channel_output_fake(x), *_param_grads_fake(x, weight))


def _group_norm_setup(ctx, inputs, output):
    x, num_groups, weight, bias, _ = inputs
    ctx.save_for_backward(x, output[1], output[2], weight)
    ctx.num_groups, ctx.has_bias = num_groups, bias is not None


def _group_norm_backward(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight = ctx.saved_tensors
    dx, dw, db = group_norm_backward_op(dy, x, mean, rstd, ctx.num_groups, weight)
    return dx, None, _param_grad(dw, weight), _param_grad(db, weight) if ctx.has_bias else None, None


group_norm_op.register_autograd(_group_norm_backward, setup_context=_group_norm_setup)


# BatchNorm and InstanceNorm: running statistics in, their updates out as new tensors.

def _running_norm(norm, x, running_mean, running_var, weight, bias, use_batch_stats, momentum, eps):
    view, layout, back = _channel_view(_d(x))
    rm = None if running_mean is None else running_mean.detach().clone()
    rv = None if running_var is None else running_var.detach().clone()
    y, mean, rstd = norm(view, rm, rv, _d(weight), _d(bias), use_batch_stats, momentum, eps, layout=layout,
                         return_stats=True)
    return back(y), mean, rstd, _or_empty(rm, x), _or_empty(rv, x)


def _running_norm_fake(x, running_mean, running_var, stats_shape):
    stats = x.new_empty(stats_shape, dtype=_stats_dtype(x))
    rm = x.new_empty(0) if running_mean is None else torch.empty_like(running_mean)
    rv = x.new_empty(0) if running_var is None else torch.empty_like(running_var)
    return _channel_output_fake(x), stats, torch.empty_like(stats), rm, rv


def _register_running_norm_autograd(op, backward_op):
    """Autograd of an operator (x, running_mean, running_var, weight, bias, flag, momentum, eps)."""

    def setup(ctx, inputs, output):
        x, _, _, weight, bias, use_batch_stats, _, _ = inputs
        ctx.save_for_backward(x, output[1], output[2], weight)
        ctx.use_batch_stats, ctx.has_bias = use_batch_stats, bias is not None

    def backward(ctx, dy, *_unused_grads):
        x, mean, rstd, weight = ctx.saved_tensors
        dx, dw, db = backward_op(dy, x, mean, rstd, weight, ctx.use_batch_stats)
        db = _param_grad(db, weight) if ctx.has_bias else None
        return dx, None, None, _param_grad(dw, weight), db, None, None, None

    op.register_autograd(backward, setup_context=setup)


@torch.library.custom_op("normkit::batch_norm", mutates_args=())
def batch_norm_op(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
                  bias: Optional[Tensor], training: bool, momentum: float,
                  eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd of shape (C,) that normalized x, new running_mean, new running_var)."""
    return _running_norm(normkit.batch_norm, x, running_mean, running_var, weight, bias, training, momentum, eps)


@batch_norm_op.register_fake
def _(x, running_mean, running_var, weight, bias, training, momentum, eps):
    return _running_norm_fake(x, running_mean, running_var, (x.shape[1],))


@torch.library.custom_op("normkit::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                           training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _channel_backward(normkit.batch_norm_backward, dy, x, mean, rstd, weight, training=training)


@batch_norm_backward_op.register_fake
def _(dy, x, mean, rstd, weight, training):
    return (_channel_output_fake(x), *_param_grads_fake(x, weight))


_register_running_norm_autograd(batch_norm_op, batch_norm_backward_op)


@torch.library.custom_op("normkit::instance_norm", mutates_args=())
def instance_norm_op(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     weight: Optional[Tensor], bias: Optional[Tensor], use_input_stats: bool, momentum: float,
                     eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd of shape (N, C), new running_mean, new running_var)."""
    return _running_norm(normkit.instance_norm, x, running_mean, running_var, weight, bias, use_input_stats,
                         momentum, eps)


@instance_norm_op.register_fake
def _(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps):
    return _running_norm_fake(x, running_mean, running_var, (x.shape[0], x.shape[1]))


@torch.library.custom_op("normkit::instance_norm_backward", mutates_args=())
def instance_norm_backward_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                              use_input_stats: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _channel_backward(normkit.instance_norm_backward, dy, x, mean, rstd, weight,
                             use_input_stats=use_input_stats)


@instance_norm_backward_op.register_fake
def _(dy, x, mean, rstd, weight, use_input_stats):
    return (_channel_output_fake(x), *_param_grads_fake(x, weight))


_register_running_norm_autograd(instance_norm_op, instance_norm_backward_op)

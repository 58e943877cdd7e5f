"""``torch.nn`` norm modules whose forward runs normkit's kernels.

Each class subclasses its ``torch.nn`` twin and overrides only the forward, so arguments,
defaults, parameters, buffers, ``state_dict`` keys, ``load_state_dict``, ``repr`` and
``isinstance`` are PyTorch's own: a torch module's state dict loads unchanged.
``replace_norms`` / ``restore_norms`` swap between the two in a model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "replace_norms", "restore_norms"]


class LayerNorm(nn.LayerNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class _BatchNormForward:
    """torch.nn's _BatchNorm.forward (momentum=None as a cumulative average, num_batches_tracked,
    batch statistics in eval without buffers) with normkit's batch_norm."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if keep_running else None,
                            self.running_var if keep_running else None, self.weight, self.bias, use_batch_stats,
                            factor, self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    pass


class _InstanceNormApply:
    """torch.nn's _InstanceNorm keeps its forward (input checks, unbatched inputs); only the
    call of the norm is normkit's."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormApply, nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormApply, nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormApply, nn.InstanceNorm3d):
    pass


# torch.nn class -> normkit class (exact types: a user's subclass of a torch norm is left alone)
TWINS = {
    nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm, nn.GroupNorm: GroupNorm,
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d, nn.InstanceNorm3d: InstanceNorm3d,
}


def _twin(module: nn.Module, cls) -> nn.Module:
    """A module of class ``cls`` holding module's very state: the same Parameter and buffer
    objects (an optimizer made before keeps working), mode, hooks and attributes."""
    twin = cls.__new__(cls)
    twin.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()})
    return twin


def _swap(model: nn.Module, mapping) -> nn.Module:
    cls = mapping.get(type(model))
    if cls is not None:
        return _twin(model, cls)
    for name, child in model.named_children():
        swapped = _swap(child, mapping)
        if swapped is not child:
            setattr(model, name, swapped)
    return model


def replace_norms(model: nn.Module) -> nn.Module:
    """Swaps every torch.nn LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d and
    InstanceNorm1d/2d/3d in ``model`` (exact types) for its normkit twin, in place, keeping
    parameters, buffers, mode and hooks. Returns the model (a twin if ``model`` is itself one
    of those norms)."""
    return _swap(model, TWINS)


def restore_norms(model: nn.Module) -> nn.Module:
    """The reverse of replace_norms: normkit's modules back to torch.nn's."""
    return _swap(model, {twin: original for original, twin in TWINS.items()})

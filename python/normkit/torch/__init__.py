"""normkit for PyTorch: normkit's CPU kernels as autograd-aware custom operators
(``torch.ops.normkit.*``, traceable by ``torch.compile``), ``torch.nn.functional``-style
functions (``normkit.torch.functional``) and ``torch.nn`` modules of the same names
(LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d), with
``replace_norms(model)`` / ``restore_norms(model)`` to swap them in a model.

Imported only on ``import normkit.torch``: ``import normkit`` never imports torch.
CPU tensors of float32, float64, float16 and bfloat16, contiguous or channels_last.
"""

from __future__ import annotations

from . import functional
from ._modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    RMSNorm,
    replace_norms,
    restore_norms,
)

__all__ = ["functional", "LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "replace_norms", "restore_norms"]

"""normkit: fast, exact normalization layers for NumPy arrays and C++ engines.

Functions: layer_norm, rms_norm, batch_norm, instance_norm, group_norm,
adaptive_instance_norm (layouts: normkit.Layout or "NCHW", "NHWC", ...),
normalize (Lp, along any dim) and mean_variance_norm (ONNX's, over any axes), and
their gradients: layer_norm_backward, ..., adaptive_instance_norm_backward,
normalize_backward;
fold_batch_norm (BatchNorm folded into the convolution before it);
moments, merge_moments, Moments (statistics that merge across shards),
recalibrate_batch_norm; normkit.distributed.SyncBatchNorm (over mpi4py).
Runtime: set_num_threads, get_num_threads, info.
See README.md for the whole surface.
"""

from __future__ import annotations

from . import _ext
from ._axes import mean_variance_norm, normalize, normalize_backward
from ._backward import (
    adaptive_instance_norm_backward,
    batch_norm_backward,
    batch_norm_grad_sums,
    group_norm_backward,
    instance_norm_backward,
    layer_norm_backward,
    rms_norm_backward,
)
from ._channels import Layout, adaptive_instance_norm, batch_norm, group_norm, instance_norm
from ._fold import fold_batch_norm
from ._functional import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from ._layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, recalibrate_batch_norm
from ._moments import Moments, merge_moments, moments
from . import distributed  # (imports mpi4py only when a SyncBatchNorm needs it)

__version__ = _ext.__version__

set_num_threads = _ext.set_num_threads
get_num_threads = _ext.get_num_threads


def info() -> dict:
    """What normkit was built with and what it found on this machine.

    Keys: version, cpu_features, kernel_path (in use), kernel_paths_compiled,
    kernel_paths_supported, num_threads, openmp, cuda_built, cuda_devices, build.
    """
    return _ext.info()


def set_output_cache_limit(nbytes: int) -> None:
    """Bytes of freed large output buffers (16 MiB and up) normkit keeps for reuse
    (default 512 MiB; 0 turns the cache off). Reusing a buffer avoids the page
    faults of a fresh allocation, which cost about as much as the norm itself."""
    _ext.set_output_cache_limit(int(nbytes))


def _set_kernel_path(name: str) -> None:
    """Switch kernels at run time ("scalar", "avx2", "avx512", "avx512_bf16"). For tests and bug
    reports; the environment variable NORMKIT_ISA does the same at start-up."""
    _ext.set_kernel_path(name)


__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "instance_norm",
    "group_norm",
    "adaptive_instance_norm",
    "normalize",
    "mean_variance_norm",
    "layer_norm_backward",
    "rms_norm_backward",
    "batch_norm_backward",
    "batch_norm_grad_sums",
    "instance_norm_backward",
    "group_norm_backward",
    "adaptive_instance_norm_backward",
    "normalize_backward",
    "fold_batch_norm",
    "Moments",
    "moments",
    "merge_moments",
    "recalibrate_batch_norm",
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "Layout",
    "set_num_threads",
    "set_output_cache_limit",
    "get_num_threads",
    "info",
    "__version__",
]

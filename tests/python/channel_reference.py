"""Independent float64 NumPy references for the channel norms: BatchNorm,
InstanceNorm, GroupNorm and adaptive instance norm (AdaIN).

As in reference.py, everything is computed in float64 from the values the
caller actually passed (16-bit and float32 inputs convert exactly), nothing
here calls normkit, and the semantics are torch.nn.functional's:

- batch_norm: statistics per channel over (N, spatial); biased variance for
  normalizing, unbiased for the running variance update
  ``new = (1 - momentum) * old + momentum * batch``.
- instance_norm: statistics per (sample, channel) over the spatial axes; the
  running statistics are updated with the batch mean of the per-instance mean
  and unbiased variance; ``use_input_stats=False`` normalizes with the running
  statistics.
- group_norm: statistics per (sample, group of C / G consecutive channels);
  per-channel affine.
- adaptive_instance_norm: ``(x - mean_x) / sqrt(var_x + eps) * std_s + mean_s``
  per (sample, channel), biased variances; for a feature-map style
  ``std_s = sqrt(var_style + eps)``.

Layouts are given by name ("NC", "NCL", "NLC", "NCHW", "NHWC", "NCDHW",
"NDHWC"); the references move the channel axis to position 1, work on an
(N, C, S) view and move it back.
"""

from __future__ import annotations

import numpy as np

from reference import f64

# name -> (rank, channel axis)
LAYOUTS = {
    "NC": (2, 1),
    "NCL": (3, 1),
    "NLC": (3, 2),
    "NCHW": (4, 1),
    "NHWC": (4, 3),
    "NCDHW": (5, 1),
    "NDHWC": (5, 4),
}
CHANNELS_FIRST = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
CHANNELS_LAST = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}


def layout_name(layout, ndim: int) -> str:
    if layout is None:
        return CHANNELS_FIRST[ndim]
    return layout if isinstance(layout, str) else layout.name


def channel_axis(layout, ndim: int) -> int:
    return LAYOUTS[layout_name(layout, ndim)][1]


def to_channels_first(x, layout):
    """x (any layout) as a channels-first array (a view)."""
    x = np.asarray(x)
    return np.moveaxis(x, channel_axis(layout, x.ndim), 1)


def from_channels_first(y, layout):
    y = np.asarray(y)
    return np.moveaxis(y, 1, channel_axis(layout, y.ndim))


def to_ncs(x, layout):
    """x as a float64 (N, C, S) array (S = product of the spatial dims)."""
    xc = f64(to_channels_first(x, layout))
    return xc.reshape(xc.shape[0], xc.shape[1], -1)


def mean_var_rows(a):
    """Mean and biased variance of each row of a 2-D float64 array.

    Shifted, corrected two-pass (as layer_norm_ref): relative to the row's first
    element, so that data with a large mean and a tiny spread keeps its full
    float64 accuracy. Empty rows give NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if a.shape[1] == 0:
            nan = np.full(a.shape[0], np.nan)
            return nan, nan.copy()
        shift = a[:, :1]
        shift = np.where(np.isfinite(shift), shift, 0.0)
        d = a - shift
        off = d.mean(axis=1, keepdims=True)
        off = off + (d - off).mean(axis=1, keepdims=True)
        dev = d - off
        var = (dev * dev).mean(axis=1)
        return (shift + off)[:, 0], var


def _affine(y_ncs, weight, bias):
    if weight is not None:
        y_ncs = y_ncs * f64(weight)[None, :, None]
    if bias is not None:
        y_ncs = y_ncs + f64(bias)[None, :, None]
    return y_ncs


def _back(y_ncs, x, layout):
    xc_shape = to_channels_first(x, layout).shape
    return from_channels_first(y_ncs.reshape(xc_shape), layout)


def _update(old, value, momentum):
    return None if old is None else (1.0 - momentum) * f64(old) + momentum * value


def batch_norm_ref(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                   layout=None):
    """(y, mean, rstd, new_running_mean, new_running_var), all float64.

    mean/rstd (C,) are the batch statistics in training, else running_mean and
    1/sqrt(running_var + eps). The new running statistics are None when none
    were given, and the (float64) old ones in inference.
    """
    x = np.asarray(x)
    a = to_ncs(x, layout)
    n, c, s = a.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if training:
            mean, var = mean_var_rows(a.transpose(1, 0, 2).reshape(c, n * s))
            count = n * s
            new_rm = _update(running_mean, mean, momentum)
            new_rv = _update(running_var, var * count / (count - 1), momentum)
        else:
            mean, var = f64(running_mean), f64(running_var)
            new_rm, new_rv = mean.copy(), var.copy()
        rstd = 1.0 / np.sqrt(var + float(eps))
        y = (a - mean[None, :, None]) * rstd[None, :, None]
        y = _affine(y, weight, bias)
    return _back(y, x, layout), mean, rstd, new_rm, new_rv


def instance_norm_ref(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                      momentum=0.1, eps=1e-5, layout=None):
    """(y, mean, rstd, new_running_mean, new_running_var), float64; mean/rstd are (N, C)
    (the running statistics repeated over N when use_input_stats is False)."""
    x = np.asarray(x)
    a = to_ncs(x, layout)
    n, c, s = a.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if use_input_stats:
            mean, var = mean_var_rows(a.reshape(n * c, s))
            mean, var = mean.reshape(n, c), var.reshape(n, c)
            new_rm = _update(running_mean, mean.mean(axis=0), momentum) if n else f64(running_mean)
            new_rv = _update(running_var, (var * s / (s - 1)).mean(axis=0), momentum) if n else f64(running_var)
        else:
            mean = np.broadcast_to(f64(running_mean), (n, c))
            var = np.broadcast_to(f64(running_var), (n, c))
            new_rm, new_rv = f64(running_mean), f64(running_var)
        rstd = 1.0 / np.sqrt(var + float(eps))
        y = (a - mean[:, :, None]) * rstd[:, :, None]
        y = _affine(y, weight, bias)
    return _back(y, x, layout), np.array(mean), np.array(rstd), new_rm, new_rv


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-5, layout=None):
    """(y, mean, rstd), float64; mean/rstd are (N, num_groups)."""
    x = np.asarray(x)
    a = to_ncs(x, layout)
    n, c, s = a.shape
    g = num_groups
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mean, var = mean_var_rows(a.reshape(n * g, (c // g) * s))
        rstd = 1.0 / np.sqrt(var + float(eps))
        y = (a.reshape(n * g, -1) - mean[:, None]) * rstd[:, None]
        y = _affine(y.reshape(n, c, s), weight, bias)
    return _back(y, x, layout), mean.reshape(n, g), rstd.reshape(n, g)


def style_stats_ref(style, eps=1e-5, layout=None):
    """(mean, std) of shape (N, C) of a feature-map style: std = sqrt(biased var + eps)."""
    a = to_ncs(style, layout)
    n, c, s = a.shape
    mean, var = mean_var_rows(a.reshape(n * c, s))
    with np.errstate(invalid="ignore"):
        return mean.reshape(n, c), np.sqrt(var.reshape(n, c) + float(eps))


def adaptive_instance_norm_ref(x, style, eps=1e-5, layout=None):
    """y in float64. style: a feature map in x's layout, or a (mean, std) pair of (N, C) arrays."""
    x = np.asarray(x)
    if isinstance(style, (tuple, list)):
        s_mean, s_std = f64(style[0]), f64(style[1])
    else:
        s_mean, s_std = style_stats_ref(style, eps, layout)
    a = to_ncs(x, layout)
    n, c, s = a.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mean, var = mean_var_rows(a.reshape(n * c, s))
        rstd = 1.0 / np.sqrt(var + float(eps))
        y = (a.reshape(n * c, s) - mean[:, None]) * rstd[:, None]
        y = y.reshape(n, c, s) * s_std[:, :, None] + s_mean[:, :, None]
    return _back(y, x, layout)

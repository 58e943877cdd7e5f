"""Independent float64 NumPy references for the gradients of every norm, and a
central finite-difference helper to validate them.

Nothing here calls normkit. Everything is computed in float64 from the values
the caller passed (16-bit and float32 inputs convert exactly). The statistics
of x are recomputed here from x itself (shifted, corrected two-pass in float64
that never rounds the mean itself, see ``_center_rows``), never taken from the forward's saved
float32 statistics, so the references hold the "exact" gradient even for data
whose mean a float32 cannot represent (mean 1e4, std 1e-2).

The formulas (derived by hand; validated against finite differences and
PyTorch autograd in test_backward.py). With ``xhat = (x - mean) * rstd``,
``rstd = 1 / sqrt(var + eps)`` (biased variance) over a reduction set of M
elements, ``y = xhat * w + b`` and ``g = dy * w``:

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))       (means over the set)
    dw = sum(dy * xhat),  db = sum(dy)                      (sums over everything
                                                             that shares the weight)

(d rstd / d x_i = -rstd^3 (x_i - mean) / M and d mean / d x_i = 1 / M give the
two subtracted terms.) RMSNorm: ``xhat = x * rstd``, ``rstd = 1/sqrt(mean(x^2) + eps)``:
``dx = rstd * (g - xhat * mean(g * xhat))``. With constant statistics (BatchNorm
eval, InstanceNorm with running statistics) ``dx = dy * w * rstd``.

AdaIN: ``y = xhat * std_s + mean_s`` per (n, c): dx is the InstanceNorm formula
with ``g = dy * std_s``; ``dmean_s = sum_S dy``, ``dstd_s = sum_S dy * xhat``; a
feature-map style (S' elements per (n, c), ``std_s = sqrt(var_s + eps)``) gives
``dstyle = dmean_s / S' + dstd_s * (style - mean_s) / (S' * std_s)``.

Every function returns the weight and bias gradients even without a weight
(then the gradients of a weight of ones / a bias of zeros), all float64.
Channel norms take the layout by name (channel_reference.LAYOUTS).
"""

from __future__ import annotations

import numpy as np

from channel_reference import from_channels_first, to_channels_first
from reference import f64, machine_eps

_ERR = dict(invalid="ignore", over="ignore", divide="ignore")


def _k(normalized_shape) -> int:
    if isinstance(normalized_shape, (int, np.integer)):
        return 1
    return len(tuple(normalized_shape))


def _centered_dx(g, xhat, rstd):
    """rstd * (g - mean(g) - xhat * mean(g * xhat)) over the last axis of 2-D arrays;
    rstd is a column (R, 1)."""
    if g.shape[1] == 0:
        return np.zeros_like(g)
    mg = g.mean(axis=1, keepdims=True)
    mgx = (g * xhat).mean(axis=1, keepdims=True)
    return rstd * (g - mg - xhat * mgx)


def _center_rows(rows):
    """(x - mean) of each row of a 2-D float64 array, and the biased variance (R, 1).

    Shifted, corrected two-pass as channel_reference.mean_var_rows, but the
    deviations are formed as ``(x - shift) - offset`` without ever rounding the
    mean itself: next to a mean of 1e4 a float64 mean carries 1e-12 of rounding,
    1e-10 of a spread of 1e-2, where the deviations here stay exact to ~1e-16.
    """
    if rows.shape[1] == 0:
        nan = np.full((rows.shape[0], 1), np.nan)
        return rows.copy(), nan
    shift = rows[:, :1]
    shift = np.where(np.isfinite(shift), shift, 0.0)
    d = rows - shift
    off = d.mean(axis=1, keepdims=True)
    off = off + (d - off).mean(axis=1, keepdims=True)
    dev = d - off
    return dev, (dev * dev).mean(axis=1, keepdims=True)


def _xhat_rows(rows, eps):
    """(xhat, rstd) of a 2-D float64 array normalized per row (rstd a column)."""
    dev, var = _center_rows(rows)
    rstd = 1.0 / np.sqrt(var + float(eps))
    return dev * rstd, rstd


# --------------------------------------------------------------------------- rows norms


def layer_norm_backward_ref(dy, x, normalized_shape, weight=None, eps=1e-5):
    """(dx, dweight, dbias) in float64; dweight/dbias have the normalized shape."""
    x64, dy64 = f64(x), f64(dy)
    k = _k(normalized_shape)
    ns = x64.shape[x64.ndim - k:]
    d = int(np.prod(ns))
    X, DY = x64.reshape(-1, d), dy64.reshape(-1, d)
    w = np.ones(d) if weight is None else f64(weight).reshape(d)
    with np.errstate(**_ERR):
        xhat, rstd = _xhat_rows(X, eps)
        dx = _centered_dx(DY * w, xhat, rstd)
        dw = (DY * xhat).sum(axis=0)
        db = DY.sum(axis=0)
    return dx.reshape(x64.shape), dw.reshape(ns), db.reshape(ns)


def rms_norm_backward_ref(dy, x, normalized_shape, weight=None, eps=None):
    """(dx, dweight) in float64; eps=None is the machine epsilon of x's dtype."""
    if eps is None:
        eps = machine_eps(np.asarray(x).dtype)
    x64, dy64 = f64(x), f64(dy)
    k = _k(normalized_shape)
    ns = x64.shape[x64.ndim - k:]
    d = int(np.prod(ns))
    X, DY = x64.reshape(-1, d), dy64.reshape(-1, d)
    w = np.ones(d) if weight is None else f64(weight).reshape(d)
    with np.errstate(**_ERR):
        rstd = 1.0 / np.sqrt((X * X).mean(axis=1, keepdims=True) + float(eps)) if X.shape[0] else np.zeros((0, 1))
        xhat = X * rstd
        g = DY * w
        dx = rstd * (g - xhat * (g * xhat).mean(axis=1, keepdims=True)) if d else np.zeros_like(g)
        dw = (DY * xhat).sum(axis=0)
    return dx.reshape(x64.shape), dw.reshape(ns)


# --------------------------------------------------------------------------- channel norms


def to_ncs(x, layout):
    """x (any layout) as a float64 (N, C, S) array; unlike channel_reference.to_ncs
    also for N = 0 or C = 0."""
    xc = f64(to_channels_first(x, layout))
    return xc.reshape(xc.shape[0], xc.shape[1], int(np.prod(xc.shape[2:], dtype=np.int64)))


def _ncs_back(a_ncs, like, layout):
    """An (N, C, S) float64 array back to the shape/layout of `like`."""
    cf_shape = to_channels_first(like, layout).shape
    return np.ascontiguousarray(from_channels_first(a_ncs.reshape(cf_shape), layout))


def _wvec(weight, c):
    return np.ones(c) if weight is None else f64(weight).reshape(c)


def batch_norm_backward_ref(dy, x, weight=None, training=True, eps=1e-5, mean=None, rstd=None, layout=None):
    """(dx, dweight, dbias) in float64, dweight/dbias of shape (C,).

    training: statistics per channel over (N, spatial), recomputed from x (mean /
    rstd are ignored); eval: `mean` and `rstd` (C,) are the constants the forward
    used (the running mean and 1/sqrt(running_var + eps)).
    """
    x = np.asarray(x)
    a, d = to_ncs(x, layout), to_ncs(dy, layout)
    n, c, s = a.shape
    w = _wvec(weight, c)
    with np.errstate(**_ERR):
        if training:
            X = a.transpose(1, 0, 2).reshape(c, n * s)
            DY = d.transpose(1, 0, 2).reshape(c, n * s)
            xhat, r = _xhat_rows(X, eps)
            dx = _centered_dx(DY * w[:, None], xhat, r)
            dx = dx.reshape(c, n, s).transpose(1, 0, 2)
            dw = (DY * xhat).sum(axis=1)
            db = DY.sum(axis=1)
        else:
            m, r = f64(mean).reshape(c), f64(rstd).reshape(c)
            xhat = (a - m[None, :, None]) * r[None, :, None]
            dx = d * (w * r)[None, :, None]
            dw = (d * xhat).sum(axis=(0, 2))
            db = d.sum(axis=(0, 2))
    return _ncs_back(dx, x, layout), dw, db


def instance_norm_backward_ref(dy, x, weight=None, use_input_stats=True, eps=1e-5, mean=None, rstd=None,
                               layout=None):
    """(dx, dweight, dbias) in float64. use_input_stats: statistics per (n, c) over the
    spatial axes recomputed from x; otherwise `mean`/`rstd` (N, C) (or (C,), broadcast
    over N) are constants."""
    x = np.asarray(x)
    a, d = to_ncs(x, layout), to_ncs(dy, layout)
    n, c, s = a.shape
    w = _wvec(weight, c)
    with np.errstate(**_ERR):
        if use_input_stats:
            X, DY = a.reshape(n * c, s), d.reshape(n * c, s)
            xhat, r = _xhat_rows(X, eps)
            xhat = xhat.reshape(n, c, s)
            g = (d * w[None, :, None]).reshape(n * c, s)
            dx = _centered_dx(g, xhat.reshape(n * c, s), r).reshape(n, c, s)
        else:
            m = np.broadcast_to(f64(mean), (n, c))
            r = np.broadcast_to(f64(rstd), (n, c))
            xhat = (a - m[:, :, None]) * r[:, :, None]
            dx = d * w[None, :, None] * r[:, :, None]
        dw = (d * xhat).sum(axis=(0, 2))
        db = d.sum(axis=(0, 2))
    return _ncs_back(dx, x, layout), dw, db


def group_norm_backward_ref(dy, x, num_groups, weight=None, eps=1e-5, layout=None):
    """(dx, dweight, dbias) in float64; statistics per (n, group of C/G channels)
    recomputed from x."""
    x = np.asarray(x)
    a, d = to_ncs(x, layout), to_ncs(dy, layout)
    n, c, s = a.shape
    G = num_groups
    w = _wvec(weight, c)
    with np.errstate(**_ERR):
        X = a.reshape(n * G, (c // G) * s)
        xhat, r = _xhat_rows(X, eps)
        g = (d * w[None, :, None]).reshape(n * G, (c // G) * s)
        dx = _centered_dx(g, xhat, r).reshape(n, c, s)
        dw = (d * xhat.reshape(n, c, s)).sum(axis=(0, 2))
        db = d.sum(axis=(0, 2))
    return _ncs_back(dx, x, layout), dw, db


def adaptive_instance_norm_backward_ref(dy, x, style, eps=1e-5, layout=None):
    """(dx, dstyle) in float64. style: a feature map in x's layout (dstyle: an array
    of style's shape) or a (mean, std) pair of (N, C) arrays (dstyle: (dmean, dstd))."""
    x = np.asarray(x)
    a, d = to_ncs(x, layout), to_ncs(dy, layout)
    n, c, s = a.shape
    pair = isinstance(style, (tuple, list))
    with np.errstate(**_ERR):
        if pair:
            s_mean, s_std = f64(style[0]).reshape(n, c), f64(style[1]).reshape(n, c)
        else:
            st = to_ncs(style, layout)
            sp = st.shape[2]
            s_dev, s_var = _center_rows(st.reshape(n * c, sp))
            s_std = np.sqrt(s_var + float(eps)).reshape(n, c)
        X = a.reshape(n * c, s)
        xhat, r = _xhat_rows(X, eps)
        g = (d * s_std[:, :, None]).reshape(n * c, s)
        dx = _centered_dx(g, xhat, r).reshape(n, c, s)
        dmean = d.sum(axis=2)
        dstd = (d * xhat.reshape(n, c, s)).sum(axis=2)
        if pair:
            return _ncs_back(dx, x, layout), (dmean, dstd)
        dev = s_dev.reshape(n, c, sp)
        dst = dmean[:, :, None] / sp + dstd[:, :, None] * dev / (sp * s_std[:, :, None])
    return _ncs_back(dx, x, layout), _ncs_back(dst, style, layout)


# --------------------------------------------------------------------------- finite differences


def finite_difference_grads(f, inputs, dy, wrt=None, h=1e-6):
    """Central finite differences, in float64, of ``L = sum(f(*inputs) * dy)``.

    f: a function of the arrays in `inputs` (a list) returning an array of dy's shape.
    wrt: the indices of the inputs to differentiate (default: all). Each element is
    moved by ``h * max(1, |value|)``; the error is O(step^2 * f''') + O(eps64 * |L| / step).
    Returns a list of float64 gradients, one per index in wrt.
    """
    inputs = [np.array(v, dtype=np.float64, copy=True) for v in inputs]
    dy = np.asarray(dy, dtype=np.float64)
    wrt = range(len(inputs)) if wrt is None else wrt

    def loss():
        return float(np.sum(np.asarray(f(*inputs), dtype=np.float64) * dy))

    grads = []
    for i in wrt:
        v = inputs[i]
        grad = np.zeros_like(v)
        flat, gflat = v.reshape(-1), grad.reshape(-1)  # views
        for j in range(flat.size):
            old = flat[j]
            step = h * max(1.0, abs(old))
            flat[j] = old + step
            lp = loss()
            flat[j] = old - step
            lm = loss()
            flat[j] = old
            gflat[j] = (lp - lm) / (2.0 * step)
        grads.append(grad)
    return grads

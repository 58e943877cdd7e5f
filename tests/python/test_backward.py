"""The backward functions (layer_norm_backward, rms_norm_backward, batch_norm_backward,
instance_norm_backward, group_norm_backward, adaptive_instance_norm_backward) against
the float64 reference (backward_reference.py), central finite differences (float64)
and PyTorch autograd (when installed), on every kernel path, in every layout.

The statistics passed to the backward functions are what the forward's
``return_stats=True`` gave; the reference recomputes the exact statistics of x in
float64 (so for data with mean 1e4 and std 1e-2 it holds the exact gradient,
whatever rounding the saved float32 mean carries).

Tolerances, relative to the gradient's scale ``scale = max |reference|`` over the
compared array; for dx at least ``max(rstd) * max|dy| * max|w_eff|``, the size of
the terms dx is made of (rstd * dy * w minus two reduced terms of the same size):
an implementation computes dx from terms that large, so its rounding error is
relative to them, and a dx that cancels to ~0 (a row of 1 element, RMSNorm on one
element) cannot be held to a relative bound of its own tiny size. Likewise the
sums (dweight, dbias, AdaIN's dstyle_mean/std) at least 1% of the average sum of
|dy| per output element (``sum_floor``).

- float64: ``GRAD_TOL64 = 1e-11``. A backward pass sums up to ~1e5 products per
  reduction and forms dx from three terms; float64 rounding gives ~1e-15 of the
  scale; the bound leaves ~100x while catching any float32 step (~1e-7).
- float32: ``GRAD_TOL32 = 1e-4``. Two reductions per statistic group in float32
  (blocked sums: error ~ sqrt(M) * eps32 relative, M up to ~1e5 here, i.e. up to
  ~4e-5 in the worst, sequentially summed case; ~1e-6 typically), the float32
  saved rstd (~1e-7 relative) and the final multiply-add. A wrong formula (a
  missing term, the wrong reduction set, a stale mean) shows at 1e-2..1.
- float16/bfloat16: float32 accumulation and one rounding of each output to the
  16-bit type: ``ULPS16`` (2) ulps of each element plus GRAD_TOL32 of the scale.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from backward_reference import (
    adaptive_instance_norm_backward_ref,
    batch_norm_backward_ref,
    finite_difference_grads,
    group_norm_backward_ref,
    instance_norm_backward_ref,
    layer_norm_backward_ref,
    rms_norm_backward_ref,
)
from channel_reference import (
    LAYOUTS,
    adaptive_instance_norm_ref,
    batch_norm_ref,
    channel_axis,
    group_norm_ref,
    instance_norm_ref,
    style_stats_ref,
)
from helpers import DTYPE_NAMES, ULPS16, dtype_name, in_layout, np_dtype, same_bits
from reference import f64, layer_norm_ref, machine_eps, rms_norm_ref, stats_dtype

# --------------------------------------------------------------------------- tolerances

GRAD_TOL64 = 1e-11
GRAD_TOL32 = 1e-4
# Finite differences (float64, step 1e-6 * max(1, |v|)): truncation ~ step^2 * |f'''|
# (~1e-12 for these well-conditioned cases) plus cancellation ~ eps64 * |L| / step
# (~1e-9 for |L| ~ 10): 1e-6 of the scale leaves a wide margin and still catches
# any wrong term (O(1) errors).
FD_TOL = 1e-6
# PyTorch's float64 autograd against the float64 reference / normkit: two float64
# computations with different formulas and summation orders (~1e-14 apart).
TORCH_TOL64 = 1e-10
# dstyle of a float64 style map with mean 1e4 and std 1e-2: the gradient holds
# (style - mean_style); a float64 mean near 1e4 is rounded by up to 0.5 ulp = 9.1e-13,
# 9.1e-11 of the spread 1e-2, unless the deviations are recentred (they are for x,
# as the contract requires; the style's statistics are not saved ones, the bound is
# that of the mean's own rounding, with a margin of 2).
HOSTILE_STYLE_TOL64 = 2e-10

LAYOUT_NAMES = list(LAYOUTS)  # NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC
ROW_COLS = [1, 3, 7, 17, 33, 100, 1000, 4099]
CHANNEL_NORMS = ["bn_train", "bn_eval", "in", "in_eval", "gn", "adain_map", "adain_pair"]
EPS = 1e-5
RMS_EPS = 1e-6

# (N, C, spatial) per rank: C covers vector tails (1, 3, 17, 65), the spatial sizes
# the tails of the channels-first rows (7, 33, 15, 35, ...).
RANK_SHAPES = {
    2: [(5, 17, ()), (4, 65, ()), (3, 3, ())],
    3: [(3, 17, (7,)), (2, 3, (33,)), (2, 65, (5,))],
    4: [(3, 17, (3, 5)), (2, 1, (7, 5)), (2, 65, (2, 3))],
    5: [(2, 17, (2, 3, 3)), (2, 3, (3, 5, 3)), (1, 65, (2, 2, 3))],
}

GRAD_NAME = {"x": "dx", "w": "dweight", "b": "dbias", "style": "dstyle", "style_mean": "dstyle_mean",
             "style_std": "dstyle_std"}


# --------------------------------------------------------------------------- comparisons


def grad_tolerance(dtype, ref, scale):
    name = dtype_name(dtype)
    if name == "float64":
        return GRAD_TOL64 * scale
    if name == "float32":
        return GRAD_TOL32 * scale
    return ULPS16 * machine_eps(dtype) * np.abs(ref) + GRAD_TOL32 * scale


def assert_grad_close(actual, ref, dtype, what, floor=0.0, tol64=None):
    """actual (of exactly `dtype` and ref's shape) against the float64 reference.

    Where the reference is not finite, actual must not be finite either (NaN and
    Inf propagate); elsewhere |actual - ref| <= tolerance with
    scale = max(max |finite ref|, floor) (1 when both are 0)."""
    assert isinstance(actual, np.ndarray), f"{what}: {type(actual).__name__}, expected an ndarray"
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape}, expected {ref.shape}"
    a = actual.astype(np.float64)
    fin = np.isfinite(ref)
    leaked = ~fin & np.isfinite(a)
    assert not leaked.any(), f"{what}: finite where the reference is NaN/Inf at {np.argwhere(leaked)[:5].tolist()}"
    mags = np.abs(ref[fin])
    scale = max(float(mags.max()) if mags.size else 0.0, float(floor))
    scale = scale if scale > 0 else 1.0
    tol = grad_tolerance(dtype, ref, scale)
    if tol64 is not None and dtype_name(dtype) == "float64":
        tol = tol64 * scale
    tol = np.broadcast_to(tol, ref.shape)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - ref)
        bad = fin & ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(err, nan=np.inf), -1.0)), ref.shape)
        raise AssertionError(
            f"{what} ({dtype_name(dtype)}): {int(bad.sum())} of {ref.size} out of tolerance; worst at {i}: "
            f"got {a[i]!r}, expected {ref[i]!r}, |err|={err[i]:.3g} > tol={tol[i]:.3g} (scale {scale:.3g})")


def assert_against(got, ref, case, what="", floor=None, dtypes=None, tol64=None, tol64_by_name=None):
    """Compares dicts of gradients (normkit's against a float64 reference/oracle).
    got[name] None (no weight) must match case["w"] None."""
    floor = dx_floor(case) if floor is None else floor
    for name, r in ref.items():
        if name not in got:
            continue
        g = got[name]
        if name in ("dweight", "dbias") and case.get("w") is None:
            assert g is None, f"{what} {name}: {type(g).__name__}, expected None without a weight"
            continue
        dt = (dtypes or {}).get(name, expected_dtype(case, name))
        t64 = (tol64_by_name or {}).get(name, tol64)
        fl = floor if name == "dx" else sum_floor(case["dy"], np.size(r)) if name != "dstyle" else 0.0
        assert_grad_close(g, r, dt, f"{what} {name}", floor=fl, tol64=t64)


def sum_floor(dy, count):
    """Floor of the scale of a gradient that is a sum (dweight, dbias, dstyle_mean/std):
    1% of the average sum of |dy| per output element. A float32 sum's rounding is
    bounded relative to the sum of its terms' magnitudes (|dy * xhat| ~ |dy|), not to
    the sum itself, which may cancel to near 0 by chance (one channel, few terms);
    GRAD_TOL32 of this floor is ~8 float32 ulps of that magnitude."""
    d = np.abs(f64(dy))
    d = d[np.isfinite(d)]
    return 0.01 * float(d.sum()) / count if count and d.size else 0.0


def expected_dtype(case, name):
    if name == "dx":
        return case["x"].dtype
    if name in ("dweight", "dbias"):
        return case["w"].dtype
    if name == "dstyle":
        return case["style"].dtype
    return case[{"dstyle_mean": "style_mean", "dstyle_std": "style_std"}[name]].dtype


def dx_floor(case):
    """max(rstd) * max|dy| * max|w_eff|: the size of the terms dx is formed from."""
    norm, x, eps = case["norm"], case["x"], case["eps"]
    dy = case["dy"]
    if x.size == 0:
        return 0.0
    w = 1.0 if case.get("w") is None else float(np.max(np.abs(f64(case["w"]))))
    lay = case.get("layout")
    with np.errstate(all="ignore"):
        if norm == "ln":
            rstd = layer_norm_ref(x, case["ns"], eps=eps)[2]
        elif norm == "rms":
            rstd = rms_norm_ref(x, case["ns"], eps=eps)[1]
        elif norm == "bn_train":
            rstd = batch_norm_ref(x, None, None, training=True, eps=eps, layout=lay)[2]
        elif norm in ("bn_eval", "in_eval"):
            rstd = 1.0 / np.sqrt(f64(case["rv"]) + eps)
        elif norm == "in":
            rstd = instance_norm_ref(x, eps=eps, layout=lay)[2]
        elif norm == "gn":
            rstd = group_norm_ref(x, case["groups"], eps=eps, layout=lay)[2]
        else:  # AdaIN: g = dy * style_std
            rstd = instance_norm_ref(x, eps=eps, layout=lay)[2]
            if norm == "adain_map":
                std = style_stats_ref(case["style"], eps, lay)[1]
            else:
                std = f64(case["style_std"])
            w = float(np.nanmax(np.abs(std))) if std.size else 1.0
        r = np.asarray(rstd, dtype=np.float64)
        r = r[np.isfinite(r)]
        d = np.abs(f64(dy))
        d = d[np.isfinite(d)]
    if not r.size or not d.size:
        return 0.0
    return float(r.max()) * float(d.max()) * w


# --------------------------------------------------------------------------- cases


def make_data(rng, shape, dtype, loc=0.5, scale=2.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def gn_groups(c, s):
    """A group count for C channels with groups of more than one element."""
    return {1: 1, 3: 3 if s > 1 else 1, 17: 17 if s > 1 else 1, 65: 5}.get(c, 1)


def channel_case(rng, norm, layout, n, c, spatial, dtype, weighted=True, param_dtype=None, x_cf=None):
    """One call's arguments (x, dy, weight, statistics/style) in `layout`."""
    dt = np.dtype(dtype)
    pd = dt if param_dtype is None else np.dtype(param_dtype)
    if x_cf is None:
        x_cf = rng.standard_normal((n, c) + spatial) * 2.0 + 0.5
        x_cf += rng.uniform(-3, 3, size=(1, c) + (1,) * len(spatial))  # channels differ
    x = in_layout(x_cf.astype(dt), layout)
    case = {"norm": norm, "layout": layout, "x": x, "dy": make_data(rng, x.shape, dt, 0.0, 1.0), "eps": EPS,
            "w": None, "b": None}
    if weighted and not norm.startswith("adain"):
        case["w"] = (1.0 + 0.5 * rng.standard_normal(c)).astype(pd)
        case["b"] = (0.5 * rng.standard_normal(c)).astype(pd)
    if norm in ("bn_eval", "in_eval"):
        sd = stats_dtype(dt)
        case["rm"] = rng.uniform(-1, 1, c).astype(sd)
        case["rv"] = rng.uniform(0.5, 3, c).astype(sd)
    if norm == "gn":
        case["groups"] = gn_groups(c, int(np.prod(spatial, dtype=np.int64)))
    if norm == "adain_map":
        sp = (spatial[0] + 1,) + spatial[1:]  # another spatial size than x's
        st = rng.standard_normal((n, c) + sp) * rng.uniform(0.3, 3, (1, c) + (1,) * len(sp)) + rng.uniform(-2, 2)
        case["style"] = in_layout(st.astype(dt), layout)
    if norm == "adain_pair":
        case["style_mean"] = rng.uniform(-2, 2, (n, c)).astype(pd)
        case["style_std"] = rng.uniform(0.2, 3, (n, c)).astype(pd)
    return case


def rows_case(rng, norm, shape, ns, dtype, weighted=True, param_dtype=None):
    dt = np.dtype(dtype)
    pd = dt if param_dtype is None else np.dtype(param_dtype)
    nsh = (ns,) if isinstance(ns, int) else tuple(ns)
    x = make_data(rng, shape, dt)
    case = {"norm": norm, "x": x, "dy": make_data(rng, shape, dt, 0.0, 1.0), "ns": ns,
            "eps": EPS if norm == "ln" else RMS_EPS, "w": None, "b": None}
    if weighted:
        case["w"] = (1.0 + 0.5 * rng.standard_normal(nsh)).astype(pd)
        case["b"] = (0.5 * rng.standard_normal(nsh)).astype(pd)
    return case


def params_of(case):
    """The differentiable inputs of a case, in order (the names of GRAD_NAME)."""
    norm = case["norm"]
    if norm == "adain_map":
        return ["x", "style"]
    if norm == "adain_pair":
        return ["x", "style_mean", "style_std"]
    if norm == "rms":
        return ["x", "w"]
    return ["x", "w", "b"]


# --------------------------------------------------------------------------- normkit

def nk_forward(case, return_stats=False):
    """normkit's forward for a case: y, or (y, *stats) with return_stats."""
    norm, x, w, b, eps, lay = case["norm"], case["x"], case.get("w"), case.get("b"), case["eps"], case.get("layout")
    rs = {"return_stats": True} if return_stats else {}
    if norm == "ln":
        return normkit.layer_norm(x, case["ns"], w, b, eps, **rs)
    if norm == "rms":
        return normkit.rms_norm(x, case["ns"], w, eps, **rs)
    if norm == "bn_train":
        return normkit.batch_norm(x, None, None, w, b, True, eps=eps, layout=lay, **rs)
    if norm == "bn_eval":
        return normkit.batch_norm(x, case["rm"], case["rv"], w, b, False, eps=eps, layout=lay, **rs)
    if norm == "in":
        return normkit.instance_norm(x, None, None, w, b, True, eps=eps, layout=lay, **rs)
    if norm == "in_eval":
        return normkit.instance_norm(x, case["rm"], case["rv"], w, b, False, eps=eps, layout=lay, **rs)
    if norm == "gn":
        return normkit.group_norm(x, case["groups"], w, b, eps, layout=lay, **rs)
    if norm == "adain_map":
        return normkit.adaptive_instance_norm(x, case["style"], eps, layout=lay)
    return normkit.adaptive_instance_norm(x, (case["style_mean"], case["style_std"]), eps, layout=lay)


def nk_grads(case, stats=None):
    """normkit's backward for a case (the statistics from its forward unless given):
    a dict of the named gradients."""
    norm, x, dy, w, lay = case["norm"], case["x"], case["dy"], case.get("w"), case.get("layout")
    if norm == "adain_map":
        dx, ds = normkit.adaptive_instance_norm_backward(dy, x, case["style"], case["eps"], layout=lay)
        return {"dx": dx, "dstyle": ds}
    if norm == "adain_pair":
        dx, ds = normkit.adaptive_instance_norm_backward(dy, x, (case["style_mean"], case["style_std"]), case["eps"],
                                                         layout=lay)
        assert isinstance(ds, tuple) and len(ds) == 2, f"dstyle for a (mean, std) style: {type(ds).__name__}"
        return {"dx": dx, "dstyle_mean": ds[0], "dstyle_std": ds[1]}
    if stats is None:
        stats = nk_forward(case, return_stats=True)[1:]
    if norm == "rms":
        out = normkit.rms_norm_backward(dy, x, stats[0], case["ns"], w)
        assert isinstance(out, tuple) and len(out) == 2
        return {"dx": out[0], "dweight": out[1]}
    mean, rstd = stats
    if norm == "ln":
        out = normkit.layer_norm_backward(dy, x, mean, rstd, case["ns"], w)
    elif norm in ("bn_train", "bn_eval"):
        out = normkit.batch_norm_backward(dy, x, mean, rstd, w, training=norm == "bn_train", layout=lay)
    elif norm in ("in", "in_eval"):
        out = normkit.instance_norm_backward(dy, x, mean, rstd, w, use_input_stats=norm == "in", layout=lay)
    else:
        out = normkit.group_norm_backward(dy, x, mean, rstd, case["groups"], w, layout=lay)
    assert isinstance(out, tuple) and len(out) == 3
    return {"dx": out[0], "dweight": out[1], "dbias": out[2]}


# --------------------------------------------------------------------------- reference


def grads_on_threads(case, stats, threads=(1, 2, 3)):
    """nk_grads(case, stats) on each of `threads` in turn, asserting the same bits
    every time; returns the first."""
    normkit.set_num_threads(threads[0])
    first = nk_grads(case, stats)
    for t in threads[1:]:
        normkit.set_num_threads(t)
        again = nk_grads(case, stats)
        for k in first:
            assert same_bits(first[k], again[k]), f"{k} differs with {t} threads"
    return first


def ref_forward(case):
    """The float64 forward references (reference.py / channel_reference.py)."""
    norm, x, w, b, eps, lay = case["norm"], case["x"], case.get("w"), case.get("b"), case["eps"], case.get("layout")
    if norm == "ln":
        return layer_norm_ref(x, case["ns"], w, b, eps)[0]
    if norm == "rms":
        return rms_norm_ref(x, case["ns"], w, eps)[0]
    if norm in ("bn_train", "bn_eval"):
        return batch_norm_ref(x, case.get("rm"), case.get("rv"), w, b, norm == "bn_train", eps=eps, layout=lay)[0]
    if norm in ("in", "in_eval"):
        return instance_norm_ref(x, case.get("rm"), case.get("rv"), w, b, norm == "in", eps=eps, layout=lay)[0]
    if norm == "gn":
        return group_norm_ref(x, case["groups"], w, b, eps, lay)[0]
    if norm == "adain_map":
        return adaptive_instance_norm_ref(x, case["style"], eps, lay)
    return adaptive_instance_norm_ref(x, (case["style_mean"], case["style_std"]), eps, lay)


def ref_grads(case):
    """The float64 reference gradients (always with dweight/dbias: of a weight of ones
    when there is none)."""
    norm, x, dy, w, eps, lay = case["norm"], case["x"], case["dy"], case.get("w"), case["eps"], case.get("layout")
    if norm == "ln":
        dx, dw, db = layer_norm_backward_ref(dy, x, case["ns"], w, eps)
    elif norm == "rms":
        dx, dw = rms_norm_backward_ref(dy, x, case["ns"], w, eps)
        return {"dx": dx, "dweight": dw}
    elif norm in ("bn_train", "bn_eval"):
        mean = rstd = None
        if norm == "bn_eval":
            mean, rstd = f64(case["rm"]), 1.0 / np.sqrt(f64(case["rv"]) + eps)
        dx, dw, db = batch_norm_backward_ref(dy, x, w, norm == "bn_train", eps, mean, rstd, lay)
    elif norm in ("in", "in_eval"):
        mean = rstd = None
        if norm == "in_eval":
            mean, rstd = f64(case["rm"]), 1.0 / np.sqrt(f64(case["rv"]) + eps)
        dx, dw, db = instance_norm_backward_ref(dy, x, w, norm == "in", eps, mean, rstd, lay)
    elif norm == "gn":
        dx, dw, db = group_norm_backward_ref(dy, x, case["groups"], w, eps, lay)
    elif norm == "adain_map":
        dx, ds = adaptive_instance_norm_backward_ref(dy, x, case["style"], eps, lay)
        return {"dx": dx, "dstyle": ds}
    else:
        dx, (dm, dsd) = adaptive_instance_norm_backward_ref(dy, x, (case["style_mean"], case["style_std"]), eps, lay)
        return {"dx": dx, "dstyle_mean": dm, "dstyle_std": dsd}
    return {"dx": dx, "dweight": dw, "dbias": db}


def fd_grads(case, forward):
    """Central finite differences (float64) of sum(forward(case) * dy) w.r.t. every
    differentiable input of the case."""
    names = params_of(case)

    def f(*vals):
        return forward({**case, **dict(zip(names, vals))})

    grads = finite_difference_grads(f, [case[n] for n in names], case["dy"])
    return {GRAD_NAME[n]: g for n, g in zip(names, grads)}


def as_float64(case):
    out = dict(case)
    for k, v in case.items():
        if isinstance(v, np.ndarray):
            out[k] = v.astype(np.float64)
    return out


# --------------------------------------------------------------------------- PyTorch


def torch_grads(torch, case):
    """Autograd gradients of sum(y * dy) in float64 through torch.nn.functional
    (channels-last arrays are moved to channels-first for torch)."""
    F = torch.nn.functional
    norm, eps, lay = case["norm"], case["eps"], case.get("layout")
    names = params_of(case)
    leaves = {n: torch.tensor(f64(case[n]), requires_grad=True) for n in names if case.get(n) is not None}
    x = leaves["x"]
    w, b = leaves.get("w"), leaves.get("b")
    if norm == "ln":
        ns = (case["ns"],) if isinstance(case["ns"], int) else tuple(case["ns"])
        y = F.layer_norm(x, ns, w, b, eps)
    elif norm == "rms":
        ns = (case["ns"],) if isinstance(case["ns"], int) else tuple(case["ns"])
        y = F.rms_norm(x, ns, w, eps)
    else:
        ax = channel_axis(lay, x.ndim)
        xc = x.movedim(ax, 1)
        t = lambda a: None if a is None else torch.tensor(f64(a))  # noqa: E731
        if norm in ("bn_train", "bn_eval"):
            yc = F.batch_norm(xc, t(case.get("rm")), t(case.get("rv")), w, b, norm == "bn_train", 0.1, eps)
        elif norm in ("in", "in_eval"):
            yc = F.instance_norm(xc, t(case.get("rm")), t(case.get("rv")), w, b, norm == "in", 0.1, eps)
        elif norm == "gn":
            yc = F.group_norm(xc, case["groups"], w, b, eps)
        else:
            dims = tuple(range(2, xc.ndim))
            xn = (xc - xc.mean(dims, keepdim=True)) / torch.sqrt(xc.var(dims, unbiased=False, keepdim=True) + eps)
            if norm == "adain_map":
                sc = leaves["style"].movedim(ax, 1)
                sm = sc.mean(dims, keepdim=True)
                ss = torch.sqrt(sc.var(dims, unbiased=False, keepdim=True) + eps)
            else:
                shape = xc.shape[:2] + (1,) * len(dims)
                sm, ss = leaves["style_mean"].reshape(shape), leaves["style_std"].reshape(shape)
            yc = xn * ss + sm
        y = yc.movedim(1, ax)
    (y * torch.tensor(f64(case["dy"]))).sum().backward()
    return {GRAD_NAME[n]: leaves[n].grad.numpy() for n in leaves}


# --------------------------------------------------------------------------- small cases (FD, torch)


def small_cases():
    """(id, builder(rng)) of small float64 cases: every norm, channel norms in several layouts."""
    cases = [
        ("ln-5", lambda r: rows_case(r, "ln", (3, 5), 5, np.float64)),
        ("ln-2x3", lambda r: rows_case(r, "ln", (2, 2, 3), (2, 3), np.float64)),
        ("rms-5", lambda r: rows_case(r, "rms", (3, 5), 5, np.float64)),
        ("rms-2x3", lambda r: rows_case(r, "rms", (2, 2, 3), (2, 3), np.float64)),
    ]
    shapes = {"NC": (4, 6, ()), "NCL": (2, 6, (4,)), "NLC": (2, 6, (4,)), "NCHW": (2, 6, (2, 2)),
              "NHWC": (2, 6, (2, 2)), "NCDHW": (2, 4, (2, 1, 2)), "NDHWC": (2, 4, (2, 1, 2))}
    per_norm = {
        "bn_train": ["NC", "NCL", "NHWC", "NCDHW"],
        "bn_eval": ["NCHW", "NLC"],
        "in": ["NCL", "NHWC", "NDHWC"],
        "in_eval": ["NCHW", "NLC"],
        "gn": ["NC", "NCHW", "NHWC", "NDHWC"],
        "adain_map": ["NCL", "NCHW", "NHWC"],
        "adain_pair": ["NCHW", "NLC"],
    }
    for norm, layouts in per_norm.items():
        for lay in layouts:
            n, c, sp = shapes[lay]

            def build(r, norm=norm, lay=lay, n=n, c=c, sp=sp):
                case = channel_case(r, norm, lay, n, c, sp, np.float64)
                if norm == "gn":
                    case["groups"] = 2 if c % 2 == 0 else 1
                return case

            cases.append((f"{norm}-{lay}", build))
    return cases


SMALL_CASES = small_cases()


# =========================================================================== the reference itself


@pytest.mark.parametrize("build", [b for _, b in SMALL_CASES], ids=[i for i, _ in SMALL_CASES])
def test_reference_matches_finite_differences(build, rng):
    """The float64 reference gradients against central differences of the float64
    forward references (no normkit involved)."""
    case = build(rng)
    ref = ref_grads(case)
    fd = fd_grads(case, ref_forward)
    for name, g in fd.items():
        assert_grad_close(g, ref[name], np.float64, f"reference {name} vs finite differences", tol64=FD_TOL)


@pytest.mark.parametrize("build", [b for _, b in SMALL_CASES], ids=[i for i, _ in SMALL_CASES])
def test_reference_matches_torch(torch, build, rng):
    """The float64 reference gradients against PyTorch autograd (float64)."""
    case = build(rng)
    ref = ref_grads(case)
    tg = torch_grads(torch, case)
    for name, g in tg.items():
        assert_grad_close(np.ascontiguousarray(g), ref[name], np.float64, f"reference {name} vs torch",
                          tol64=TORCH_TOL64)


def test_reference_eval_modes_are_constant_statistics(rng):
    """BatchNorm eval / InstanceNorm without input statistics: dx = dy * w * rstd,
    dweight = sum(dy * xhat), dbias = sum(dy) (checked against a direct formula)."""
    x = rng.standard_normal((3, 4, 5))
    dy = rng.standard_normal((3, 4, 5))
    w = rng.standard_normal(4)
    m, r = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    dx, dw, db = batch_norm_backward_ref(dy, x, w, False, mean=m, rstd=r)
    np.testing.assert_allclose(dx, dy * (w * r)[None, :, None], rtol=1e-15)
    np.testing.assert_allclose(dw, (dy * (x - m[:, None]) * r[:, None]).sum(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-13)
    dx2, dw2, db2 = instance_norm_backward_ref(dy, x, w, False, mean=np.broadcast_to(m, (3, 4)),
                                               rstd=np.broadcast_to(r, (3, 4)))
    np.testing.assert_allclose(dx2, dx, rtol=1e-15)
    np.testing.assert_allclose(dw2, dw, rtol=1e-13)


def test_reference_hostile_statistics(rng):
    """The reference's gradient is exact for data with mean 1e4 and std 1e-2: the same
    as for the data shifted to mean 0 (the gradient does not depend on the mean)."""
    x = 1e4 + rng.standard_normal((4, 33)) * 1e-2
    dy = rng.standard_normal((4, 33))
    shifted = x - 1e4  # exact (Sterbenz): the same values, mean ~0

    def gn_ref(dy, x):  # one group of 3 channels x 11
        return group_norm_backward_ref(dy.reshape(4, 3, 11), x.reshape(4, 3, 11), 1)

    for norm_ref in (lambda dy, x: layer_norm_backward_ref(dy, x, 33), gn_ref):
        a, b = norm_ref(dy, x), norm_ref(dy, shifted)
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-12 * np.abs(v).max())


# =========================================================================== normkit against the reference


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "noweight"])
@pytest.mark.parametrize("n", ROW_COLS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_rows_backward(kernel_path, norm, dtype, n, weighted, rng):
    """LayerNorm/RMSNorm gradients for every row length (vector tails), dtype and
    kernel path; x, dy, weight and the statistics are left untouched."""
    dt = np_dtype(dtype)
    case = rows_case(rng, norm, (2 if n >= 1000 else 5, n), n, dt, weighted)
    stats = nk_forward(case, return_stats=True)[1:]
    keep = [a.copy() for a in (case["x"], case["dy"], *stats) + ((case["w"],) if weighted else ())]
    got = nk_grads(case, stats)
    assert_against(got, ref_grads(case), case, what=f"{norm} n={n}")
    after = [case["x"], case["dy"], *stats] + ([case["w"]] if weighted else [])
    assert all(same_bits(a, b) for a, b in zip(keep, after)), "an input was modified"


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("shape,ns", [((2, 3, 4, 5), (4, 5)), ((3, 2, 7), (2, 7)), ((2, 3, 1, 9), (1, 9)),
                                      ((4, 6), (4, 6)), ((3, 5, 1), 1), ((7,), 7)], ids=str)
@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_rows_backward_shapes(kernel_path, norm, shape, ns, dtype, rng):
    """Several normalized dims, leading dims that collapse, a whole-array norm, a
    normalized dim of 1, a 1-D x."""
    dt = np_dtype(dtype)
    for weighted in (True, False):
        case = rows_case(rng, norm, shape, ns, dt, weighted)
        got = nk_grads(case)
        assert_against(got, ref_grads(case), case, what=f"{norm} {shape} {ns}")
        if weighted:
            nsh = (ns,) if isinstance(ns, int) else ns
            assert got["dweight"].shape == tuple(nsh)


def channel_params():
    for norm in CHANNEL_NORMS:
        for lay in LAYOUT_NAMES:
            if lay == "NC" and norm in ("in", "adain_map", "adain_pair"):
                continue  # statistics over the spatial axes: NC has one element
            for weighted in ([False] if norm.startswith("adain") else [True, False]):
                yield pytest.param(norm, lay, weighted, id=f"{norm}-{lay}-{'w' if weighted else 'now'}")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("norm,layout,weighted", list(channel_params()))
def test_channel_backward(kernel_path, norm, layout, weighted, dtype, rng):
    """Every channel norm, layout, dtype and kernel path, with and without a weight, on
    three shapes per rank (C = 1, 3, 17, 65; odd spatial sizes); the inputs
    (x, dy, weight, statistics, style) are left untouched."""
    dt = np_dtype(dtype)
    for n, c, sp in RANK_SHAPES[len(layout)]:
        case = channel_case(rng, norm, layout, n, c, sp, dt, weighted)
        stats = () if norm.startswith("adain") else nk_forward(case, return_stats=True)[1:]
        keep = {k: v.copy() for k, v in case.items() if isinstance(v, np.ndarray)}
        keep_stats = [s.copy() for s in stats]
        got = nk_grads(case, stats or None)
        assert_against(got, ref_grads(case), case, what=f"{norm} {layout} {(n, c) + sp}")
        for k, v in keep.items():
            assert same_bits(case[k], v), f"{k} was modified"
        assert all(same_bits(a, b) for a, b in zip(stats, keep_stats)), "the statistics were modified"


@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_rows_backward_weight_times_dy_beyond_float32(kernel_path, norm):
    """dy * weight overflows float32 (1e3 * 1.2e36) while dx, rstd times it, is finite:
    the kernels fold the weight with rstd first (a fuzzer finding: dx was NaN)."""
    x = np.array([[3.07075097e-4, 1.66827475e-3, -2.5e-4]], np.float32)
    dy = np.array([[376.954498, 1016.42902, -512.0]], np.float32)
    w = np.array([382914208, 1.15063591e36, 3.0e35], np.float32)
    x64, dy64, w64 = (a.astype(np.float64) for a in (x, dy, w))
    if norm == "ln":
        mean = np.array([x64.mean()], np.float32)
        rstd = np.array([4.56809299e-4], np.float32)
        xhat = (x64 - x64.mean()) * float(rstd[0])
        g = dy64 * w64
        ref = float(rstd[0]) * (g - g.mean() - xhat * (g * xhat).mean())
        dx = normkit.layer_norm_backward(dy, x, mean, rstd, (3,), w)[0]
    else:
        rstd = np.array([4.56809299e-4], np.float32)
        xhat = x64 * float(rstd[0])
        g = dy64 * w64
        ref = float(rstd[0]) * (g - xhat * (g * xhat).mean())
        dx = normkit.rms_norm_backward(dy, x, rstd, (3,), w)[0]
    assert np.all(np.isfinite(dx)), dx
    np.testing.assert_allclose(dx, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("side", ["below", "at"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("norm", ["bn_train", "bn_eval"])
def test_batch_norm_backward_planes_around_the_columns_limit(kernel_path, norm, dtype, side, rng):
    """BatchNorm's channels-first apply step takes planes under 1 KiB as rows of
    C * S columns (the columns kernel) and larger ones a row per plane: planes just
    below and at the limit, against float64."""
    dt = np_dtype(dtype)
    s = 1024 // dt.itemsize - (3 if side == "below" else 0)
    for c in (3, 17):
        case = channel_case(rng, norm, "NCL", 3, c, (s,), dt, True)
        got = nk_grads(case, nk_forward(case, return_stats=True)[1:])
        assert_against(got, ref_grads(case), case, what=f"{norm} C={c} S={s}")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("norm", ["bn_train", "bn_eval"])
def test_batch_norm_backward_small_planes_in_channel_chunks(kernel_path, norm, dtype, rng):
    """BatchNorm's channels-first apply step over planes of 49 elements with C past
    one 64 KiB table (two chunks of channels and part of a third), against float64."""
    dt = np_dtype(dtype)
    c = 2 * ((64 * 1024) // (49 * (8 if dt == np.float64 else 4))) + 7
    case = channel_case(rng, norm, "NCL", 3, c, (49,), dt, True)
    got = nk_grads(case, nk_forward(case, return_stats=True)[1:])
    assert_against(got, ref_grads(case), case, what=f"{norm} C={c}")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_batch_norm_backward_small_planes_many_samples(kernel_path, dtype, rng, restore_threads):
    """BatchNorm's training backward over more than 4 MiB of x sums over planes under
    256 bytes per (channel, position) over the samples, in bands of whole channels
    swept 16 rows at a time and flushed into double every 256 rows: 2000 samples
    (seven flushes and a part), 23 channels (bands of 10, 10 and 3 for 49-element
    planes), against float64, and the same bits on 1, 2 and 3 threads."""
    dt = np_dtype(dtype)
    s = 49 if dt.itemsize <= 4 else 25  # under 256 bytes in every dtype
    case = channel_case(rng, "bn_train", "NCL", 2000, 23, (s,), dt, True)
    case["x"] = case["x"] + np.asarray(300, case["x"].dtype)  # a mean the saved statistics round
    stats = nk_forward(case, return_stats=True)[1:]
    first = grads_on_threads(case, stats)
    assert_against(first, ref_grads(case), case, what=f"S={s}")


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_batch_norm_backward_planes_per_channel(kernel_path, dtype, n, rng, restore_threads):
    """BatchNorm's training backward channels first with a row per channel (its planes
    over the samples summed as one row, then its dx from cache): one sample (any
    plane), and planes under 1 KiB. Planes of 21 to 196 values (and 350 for one
    sample), a mean the saved statistics round, both layouts (channels last takes
    the columns sums), against float64 and the same bits on 1, 2 and 3 threads."""
    dt = np_dtype(dtype)
    shapes = ((17, (49,)), (65, (7, 3)), (6, (14, 14)), (5, (350,)), (3, (40, 50)))
    for c, spatial in shapes if n == 1 else shapes[:3]:
        lay_cf, lay_cl = ("NCL", "NLC") if len(spatial) == 1 else ("NCHW", "NHWC")
        x_cf = rng.standard_normal((n, c) + spatial) * 2.0 + 300.0
        for lay in (lay_cf, lay_cl):
            case = channel_case(rng, "bn_train", lay, n, c, spatial, dt, True, x_cf=x_cf)
            got = grads_on_threads(case, nk_forward(case, return_stats=True)[1:])
            assert_against(got, ref_grads(case), case, what=f"{lay} N={n} C={c} S={spatial}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("norm", ["ln", "rms", "bn_train", "bn_eval", "in", "in_eval", "gn", "adain_pair"])
def test_16bit_x_float32_params(kernel_path, norm, dtype, rng):
    """16-bit x with a float32 weight (or AdaIN (mean, std) pair): dx in x's dtype,
    dweight/dbias (dstyle) in float32, held to the float32 bound."""
    dt = np_dtype(dtype)
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, (5, 33), 33, dt, True, param_dtype=np.float32)
    else:
        case = channel_case(rng, norm, "NHWC", 2, 17, (3, 5), dt, True, param_dtype=np.float32)
    got = nk_grads(case)
    for name in got:
        if name != "dx":
            assert got[name].dtype == np.float32, f"{name}: {got[name].dtype}"
    assert_against(got, ref_grads(case), case, what=f"{norm} {dtype} float32 params")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("norm", ["bn_train", "in", "gn", "adain_map"])
def test_layout_enum_and_default(norm, layout, rng):
    """layout as a normkit.Layout gives the same bits as the string; no layout is
    channels-first."""
    case = channel_case(rng, norm, layout, 2, 8, (3, 5), np.float32)
    if norm == "gn":
        case["groups"] = 4
    a = nk_grads(case)
    b = nk_grads({**case, "layout": getattr(normkit.Layout, layout)})
    for k in a:
        assert same_bits(a[k], b[k]), k
    if layout == "NCHW":
        c = nk_grads({**case, "layout": None})
        for k in a:
            assert same_bits(a[k], c[k]), k


@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_rows_non_contiguous_inputs(norm, rng):
    """Strided dy/x (a column slice of a wider array, every other row) give the same
    bits as contiguous copies."""
    case = rows_case(rng, norm, (6, 37), 37, np.float32)
    base_x = make_data(rng, (12, 50), np.float32)
    base_dy = make_data(rng, (12, 50), np.float32)
    xs, dys = base_x[::2, 5:42], base_dy[::2, 3:40]
    strided = {**case, "x": xs, "dy": dys}
    contig = {**case, "x": np.ascontiguousarray(xs), "dy": np.ascontiguousarray(dys)}
    a, b = nk_grads(strided), nk_grads(contig)
    for k in a:
        assert same_bits(a[k], b[k]), k
    assert_against(a, ref_grads(contig), contig, what="strided")


@pytest.mark.parametrize("norm", ["bn_train", "in", "gn", "adain_map"])
def test_channel_non_contiguous_inputs(norm, rng):
    """Channels-last values given as non-contiguous views (a channels-first array's
    moveaxis) give the same bits as contiguous copies."""
    case = channel_case(rng, norm, "NHWC", 2, 6, (3, 5), np.float32)
    if norm == "gn":
        case["groups"] = 3
    views = {k: np.moveaxis(np.ascontiguousarray(np.moveaxis(case[k], -1, 1)), 1, -1)
             for k in ("x", "dy", "style") if k in case}
    assert not views["x"].flags.c_contiguous
    a, b = nk_grads({**case, **views}), nk_grads(case)
    for k in a:
        assert same_bits(a[k], b[k]), k


@pytest.mark.parametrize("norm", ["ln", "rms", "bn_train", "gn", "adain_map"])
def test_dy_may_be_x(norm, rng):
    """dy and x the same array (a legal, if odd, call): the same bits as with a copy,
    and the array is left as it was."""
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, (4, 19), 19, np.float32)
    else:
        case = channel_case(rng, norm, "NHWC", 2, 6, (3, 5), np.float32)
        if norm == "gn":
            case["groups"] = 3
    x_copy = case["x"].copy()
    a = nk_grads({**case, "dy": case["x"]})
    b = nk_grads({**case, "dy": x_copy})
    for k in a:
        assert same_bits(a[k], b[k]), k
    assert same_bits(case["x"], x_copy)


# =========================================================================== finite differences, PyTorch


@pytest.mark.parametrize("build", [b for _, b in SMALL_CASES], ids=[i for i, _ in SMALL_CASES])
def test_normkit_matches_finite_differences(kernel_path, build, rng):
    """normkit's float64 gradients against central differences of normkit's own
    float64 forward."""
    case = build(rng)
    got = nk_grads(case)
    fd = fd_grads(case, nk_forward)
    assert_against(got, fd, case, what="normkit vs finite differences", floor=0.0, tol64=FD_TOL)


def torch_cases():
    cases = [("ln", None), ("rms", None)]
    for norm in CHANNEL_NORMS:
        lays = ["NCL", "NLC", "NCHW", "NHWC", "NCDHW", "NDHWC"]
        if norm in ("bn_train", "bn_eval", "gn", "in_eval"):
            lays = ["NC"] + lays
        cases += [(norm, lay) for lay in lays]
    return cases


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("norm,layout", torch_cases(), ids=lambda v: str(v))
def test_normkit_matches_torch(torch, norm, layout, dtype, rng):
    """normkit's gradients against PyTorch float64 autograd (channels-last moved to
    channels-first for torch), every norm in both layouts of every rank."""
    dt = np.dtype(dtype)
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, (4, 3, 20), (3, 20), dt)
    else:
        n, c, sp = {2: (6, 8, ()), 3: (3, 8, (9,)), 4: (3, 8, (5, 3)), 5: (2, 8, (3, 2, 3))}[len(layout)]
        case = channel_case(rng, norm, layout, n, c, sp, dt)
        if norm == "gn":
            case["groups"] = 4
    got = nk_grads(case)
    tg = torch_grads(torch, case)
    assert_against(got, tg, case, what=f"normkit vs torch {norm} {layout}", tol64=TORCH_TOL64)


# =========================================================================== edge cases


def empty_cases():
    return [
        ("ln", None), ("rms", None),
        ("bn_train", "NCL"), ("bn_train", "NLC"), ("bn_eval", "NHWC"), ("bn_train", "NC"),
        ("in", "NCHW"), ("in", "NHWC"), ("in_eval", "NCL"),
        ("gn", "NCL"), ("gn", "NDHWC"),
        ("adain_map", "NCL"), ("adain_map", "NHWC"), ("adain_pair", "NCHW"),
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("norm,layout", empty_cases(), ids=str)
def test_empty_batch(norm, layout, dtype, rng):
    """N = 0: an empty dx, zero dweight/dbias (nothing to sum), empty style gradients."""
    dt = np.dtype(dtype)
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, (0, 7), 7, dt)
    else:
        sp = {2: (), 3: (5,), 4: (3, 2), 5: (2, 2, 2)}[len(layout)]
        case = channel_case(rng, norm, layout, 0, 4, sp, dt)
        if norm == "gn":
            case["groups"] = 2
    got = nk_grads(case)
    ref = ref_grads(case)
    for name, r in ref.items():
        g = got[name]
        assert isinstance(g, np.ndarray) and g.shape == r.shape, f"{name}: {getattr(g, 'shape', g)} vs {r.shape}"
        assert g.dtype == expected_dtype(case, name), f"{name}: {g.dtype}"
        assert np.all(g == 0), f"{name}: {g}"
    assert got["dx"].size == 0


HOSTILE_CASES = [("ln", "rows")] + [(norm, lay) for norm in ("bn_train", "in", "gn", "adain_map",
                                                                  "adain_map_hostile_style")
                                      for lay in ("NCHW", "NHWC")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm,where", HOSTILE_CASES, ids=str)
def test_hostile_mean_1e4_std_1e_2(kernel_path, norm, where, dtype, rng):
    """Data with mean 1e4 and std 1e-2 (a float32 mean cannot hold it to better than
    ~5e-4, 5% of the spread): the gradients still match the reference computed from
    the exact statistics of x. For AdaIN also a style map of the same kind (its
    float64 dstyle is held to HOSTILE_STYLE_TOL64, see there)."""
    dt = np.dtype(dtype)
    if norm == "ln":
        for n in (7, 100, 4099):
            case = rows_case(rng, "ln", (3, n), n, dt)
            case["x"] = (1e4 + 1e-2 * rng.standard_normal((3, n))).astype(dt)
            assert_against(nk_grads(case), ref_grads(case), case, what=f"hostile ln n={n}")
        return
    base = norm.replace("_hostile_style", "")
    x_cf = 1e4 + 1e-2 * rng.standard_normal((4, 8, 5, 7))
    case = channel_case(rng, base, where, 4, 8, (5, 7), dt, x_cf=x_cf)
    if base == "gn":
        case["groups"] = 4
    if norm == "adain_map_hostile_style":
        st = 1e4 + 1e-2 * rng.standard_normal((4, 8, 3, 4))
        case["style"] = in_layout(st.astype(dt), where)
    assert_against(nk_grads(case), ref_grads(case), case, what=f"hostile {norm} {where}",
                   tol64_by_name={"dstyle": HOSTILE_STYLE_TOL64})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["constant", "std1e-4"])
@pytest.mark.parametrize("norm,layout", [("ln", None), ("rms", None), ("bn_train", "NCHW"), ("bn_train", "NHWC"),
                                         ("in", "NCL"), ("in", "NHWC"), ("gn", "NCHW"), ("gn", "NHWC"),
                                         ("adain_map", "NHWC")], ids=str)
def test_tiny_variance(kernel_path, norm, layout, kind, dtype, rng):
    """Constant data (variance exactly 0: rstd = 1/sqrt(eps), xhat = 0) and a spread of
    1e-4 around 0.5 (variance 1e-8 well below eps): finite gradients matching the
    reference."""
    dt = np.dtype(dtype)
    spread = 0.0 if kind == "constant" else 1e-4
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, (4, 33), 33, dt)
        loc = 0.5 if norm == "ln" else 0.0
        case["x"] = (loc + spread * rng.standard_normal((4, 33)) + (0.25 if kind == "constant" else 0.0)).astype(dt)
    else:
        sp = {3: (20,), 4: (4, 5)}[len(layout)]
        x_cf = 0.5 + spread * rng.standard_normal((3, 8) + sp)
        case = channel_case(rng, norm, layout, 3, 8, sp, dt, x_cf=x_cf)
        if norm == "gn":
            case["groups"] = 2
    got = nk_grads(case)
    for k, v in got.items():
        assert v is None or np.all(np.isfinite(v)), f"{k} not finite"
    assert_against(got, ref_grads(case), case, what=f"{kind} {norm} {layout}")


@pytest.mark.parametrize("what", ["nan_x", "inf_x", "nan_dy", "inf_dy"])
@pytest.mark.parametrize("norm,layout", [("ln", None), ("rms", None), ("bn_train", "NCHW"), ("bn_train", "NHWC"),
                                         ("bn_eval", "NHWC"), ("in", "NCHW"), ("in", "NHWC"), ("gn", "NCHW"),
                                         ("gn", "NHWC"), ("adain_map", "NCHW"), ("adain_map", "NHWC")], ids=str)
def test_nan_inf_propagate(kernel_path, norm, layout, what, rng):
    """A NaN/Inf in x or dy makes every gradient it reaches non-finite (the whole row /
    channel / group of dx, by the reference's NaN pattern) and leaves the rest exact."""
    dt = np.dtype(np.float32)
    bad = np.nan if what.startswith("nan") else np.inf
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, (6, 33), 33, dt)
        idx = (2, 5)
    else:
        case = channel_case(rng, norm, layout, 3, 8, (4, 5), dt)
        if norm == "gn":
            case["groups"] = 4
        mask_cf = np.zeros((3, 8, 4, 5), bool)
        mask_cf[1, 3, 2, 1] = True
        idx = np.unravel_index(int(np.argmax(in_layout(mask_cf, layout))), case["x"].shape)
    key = "x" if what.endswith("_x") else "dy"
    case[key] = case[key].copy()
    case[key][idx] = bad
    stats = () if norm.startswith("adain") else nk_forward(case, return_stats=True)[1:]
    got = nk_grads(case, stats or None)
    ref = ref_grads(case)
    assert any(not np.isfinite(r).all() for r in ref.values())  # the bad value does reach a gradient
    assert_against(got, ref, case, what=f"{what} {norm} {layout}")


# =========================================================================== determinism


DET_CASES = [
    ("ln", None, (4096, 768)),
    ("rms", None, (4096, 768)),
    ("bn_train", "NCHW", (16, 64, (32, 32))),
    ("bn_train", "NHWC", (16, 64, (32, 32))),
    ("in", "NHWC", (8, 64, (32, 32))),
    ("gn", "NHWC", (16, 64, (32, 32))),
    ("gn", "NCHW", (16, 64, (32, 32))),
    ("adain_map", "NHWC", (8, 64, (32, 32))),
]


@pytest.mark.parametrize("norm,layout,shape", DET_CASES, ids=lambda v: str(v))
def test_deterministic(norm, layout, shape, restore_threads):
    """Bit-identical gradients from run to run and for 1, 2 and 3 threads, on sizes
    (> 1 MiB) that the kernels split over threads."""
    rng = np.random.default_rng(7)
    if norm in ("ln", "rms"):
        case = rows_case(rng, norm, shape, shape[-1], np.float32)
    else:
        n, c, sp = shape
        case = channel_case(rng, norm, layout, n, c, sp, np.float32)
        if norm == "gn":
            case["groups"] = 8
    assert case["x"].nbytes > 1 << 20
    normkit.set_num_threads(1)
    stats = () if norm.startswith("adain") else nk_forward(case, return_stats=True)[1:]
    grads_on_threads(case, stats or None, (1, 1, 2, 2, 3))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_batch_norm_backward_channel_order_matches_two_passes(dtype, restore_threads):
    """BatchNorm's channels-first training backward runs channel by channel (each
    channel's sums, then its dx while it is in cache) when x exceeds the cache (16
    MiB) and the channels share out evenly over the threads, and in two passes over
    the whole batch otherwise: 3 channels take the first on 1 and 3 threads, the
    second on 2. Same bits."""
    rng = np.random.default_rng(11)
    itemsize = np.dtype(np_dtype(dtype)).itemsize
    n = (17 << 20) // (3 * 64 * 64 * itemsize) + 1  # x just over 17 MiB
    case = channel_case(rng, "bn_train", "NCHW", n, 3, (64, 64), np_dtype(dtype))
    case["x"] = case["x"] + np.asarray(300, case["x"].dtype)  # a mean the saved statistics round
    assert case["x"].nbytes > 17 << 20
    normkit.set_num_threads(1)
    grads_on_threads(case, nk_forward(case, return_stats=True)[1:])


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_batch_norm_backward_planes_past_the_cache(kernel_path, dtype, restore_threads):
    """BatchNorm's channels-first training backward over 17 MiB of 14x14 planes, 520
    channels: a row per channel for planes under 1 KiB (float32, 16-bit), float64's
    1568-byte planes a channel at a time (or the two passes over the whole batch
    where the threads' shares of the channels are uneven). Against float64, and
    the same bits on 1, 2 and 3 threads."""
    rng = np.random.default_rng(12)
    dt = np_dtype(dtype)
    c, side = 520, 14
    n = (17 << 20) // (c * side * side * dt.itemsize) + 1  # x just over 17 MiB
    case = channel_case(rng, "bn_train", "NCHW", n, c, (side, side), dt)
    case["x"] = case["x"] + np.asarray(300, case["x"].dtype)  # a mean the saved statistics round
    normkit.set_num_threads(1)
    first = grads_on_threads(case, nk_forward(case, return_stats=True)[1:])
    assert_against(first, ref_grads(case), case, what=f"C={c} {side}x{side}")


def test_backward_exported():
    for name in ("layer_norm_backward", "rms_norm_backward", "batch_norm_backward", "instance_norm_backward",
                 "group_norm_backward", "adaptive_instance_norm_backward"):
        assert callable(getattr(normkit, name, None)), name

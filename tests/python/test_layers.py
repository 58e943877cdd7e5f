"""The layer objects (normkit.BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm).

- against torch.nn modules (skipped without torch): several training steps
  (outputs, dx, accumulated weight/bias gradients, running statistics,
  num_batches_tracked), then eval; both layouts of the channel norms; momentum=None;
  state_dict round trips in both directions;
- without torch: float64 against NumPy formulas (LayerNorm, BatchNorm, RMSNorm),
  16-bit inputs with a float32 layer;
- the Python object: shared-memory parameters, assignment, state_dict
  strict/non-strict, errors (backward without a training forward, dy of the wrong
  shape/dtype, wrong-shape assignment, bad constructor arguments), pickle and
  deepcopy, repr.

Tolerances: float64 1e-10 of the output scale (two float64 implementations with
different summation orders); float32 2e-5 of the scale for outputs and dx, and
1e-4 for the weight/bias gradients (sums over the batch of float32 products,
compared with PyTorch's own float32 sums).
"""

from __future__ import annotations

import copy
import gc
import pickle

import numpy as np
import pytest

import normkit
from helpers import np_dtype, raises_named

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

CHANNELS_LAST = ("NC", "NLC", "NHWC", "NDHWC")


# --------------------------------------------------------------------------- helpers


def _scale(ref):
    ref = np.asarray(ref, dtype=np.float64)
    return max(1.0, float(np.abs(ref).max())) if ref.size else 1.0


def close(actual, ref, dtype, what, tol32=2e-5):
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    tol = (1e-10 if np.dtype(dtype) == np.float64 else tol32) * _scale(ref)
    err = np.abs(actual - ref).max() if ref.size else 0.0
    assert err <= tol, f"{what}: max |err| {err:.3g} > {tol:.3g}"


def to_cf(a, layout):
    """An array in `layout` as channels-first (what torch takes)."""
    return np.moveaxis(a, -1, 1) if layout in CHANNELS_LAST and a.ndim > 2 else a


def from_cf(a, layout):
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if layout in CHANNELS_LAST and a.ndim > 2 else a


def tt(a):
    """A float64 torch tensor of a's values (torch computes the oracle in float64)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def randomize(layer, rng, tmod=None):
    """Random weight/bias (same in the torch module, if given)."""
    for name in ("weight", "bias"):
        current = getattr(layer, name, None)
        if current is None:
            continue
        value = (rng.standard_normal(current.shape) * 0.5 + (1.0 if name == "weight" else 0.0))
        setattr(layer, name, value)
        if tmod is not None:
            with torch.no_grad():
                getattr(tmod, name).copy_(tt(getattr(layer, name)))  # the values the layer holds


# --------------------------------------------------------------------------- cases against torch

# (id, normkit factory, torch factory, x shape in the normkit layout, layout)
def _bn_cases():
    cases = []
    shapes = {
        "NC": ((16, 6), "BatchNorm1d"),
        "NCL": ((4, 6, 9), "BatchNorm1d"),
        "NLC": ((4, 9, 6), "BatchNorm1d"),
        "NCHW": ((3, 6, 5, 4), "BatchNorm2d"),
        "NHWC": ((3, 5, 4, 6), "BatchNorm2d"),
        "NCDHW": ((2, 6, 3, 4, 2), "BatchNorm3d"),
        "NDHWC": ((2, 3, 4, 2, 6), "BatchNorm3d"),
    }
    for layout, (shape, tname) in shapes.items():
        for affine, track, momentum in ((True, True, 0.1), (False, True, 0.3), (True, False, 0.1),
                                        (True, True, None), (False, False, 0.1)):
            kw = dict(eps=1e-3, momentum=momentum, affine=affine, track_running_stats=track)
            cid = f"BatchNorm-{layout}-affine{int(affine)}-track{int(track)}-mom{momentum}"
            lay = None if layout in ("NCL", "NCHW", "NCDHW") and affine else layout  # default and explicit
            cases.append((cid, (lambda kw=kw, lay=lay, dt=None: ("BatchNorm", (6,), kw, lay)),
                          (tname, (6,), kw), shape, layout))
    return cases


def _in_cases():
    cases = []
    shapes = {
        "NCL": ((3, 5, 8), "InstanceNorm1d"),
        "NLC": ((3, 8, 5), "InstanceNorm1d"),
        "NCHW": ((2, 5, 4, 6), "InstanceNorm2d"),
        "NHWC": ((2, 4, 6, 5), "InstanceNorm2d"),
        "NCDHW": ((2, 5, 2, 3, 4), "InstanceNorm3d"),
        "NDHWC": ((2, 2, 3, 4, 5), "InstanceNorm3d"),
    }
    for layout, (shape, tname) in shapes.items():
        for affine, track, momentum in ((False, False, 0.1), (True, False, 0.1), (False, True, 0.2),
                                        (True, True, 0.1), (True, True, None)):
            kw = dict(eps=1e-5, momentum=momentum, affine=affine, track_running_stats=track)
            cid = f"InstanceNorm-{layout}-affine{int(affine)}-track{int(track)}-mom{momentum}"
            cases.append((cid, (lambda kw=kw, lay=layout: ("InstanceNorm", (5,), kw, lay)),
                          (tname, (5,), kw), shape, layout))
    return cases


def _gn_cases():
    cases = []
    for layout, shape in (("NCHW", (3, 6, 4, 5)), ("NHWC", (3, 4, 5, 6)), ("NCL", (4, 6, 7)), ("NLC", (4, 7, 6)),
                          ("NC", (5, 6)), ("NCDHW", (2, 6, 2, 3, 2))):
        for groups, affine in ((3, True), (2, False), (6, True), (1, True)):
            if layout == "NC" and groups == 6:
                continue  # one element per group: dx is 0 up to float32 rounding of rstd * dy (rstd ~ 316)
            kw = dict(eps=1e-5, affine=affine)
            cid = f"GroupNorm-{layout}-g{groups}-affine{int(affine)}"
            cases.append((cid, (lambda kw=kw, g=groups, lay=layout: ("GroupNorm", (g, 6), kw, lay)),
                          ("GroupNorm", (groups, 6), kw), shape, layout))
    return cases


def _rows_cases():
    cases = []
    for shape, ns in (((7, 32), (32,)), ((2, 3, 4, 16), (4, 16)), ((5, 3), (3,))):
        for kw in (dict(eps=1e-5), dict(eps=1e-3, elementwise_affine=False), dict(eps=1e-5, bias=False)):
            cid = f"LayerNorm-{'x'.join(map(str, shape))}-" + "-".join(f"{k}{v}" for k, v in kw.items())
            cases.append((cid, (lambda kw=kw, ns=ns: ("LayerNorm", (ns,), kw, None)), ("LayerNorm", (ns,), kw),
                          shape, None))
        for kw in (dict(eps=None), dict(eps=1e-6), dict(eps=None, elementwise_affine=False)):
            cid = f"RMSNorm-{'x'.join(map(str, shape))}-" + "-".join(f"{k}{v}" for k, v in kw.items())
            cases.append((cid, (lambda kw=kw, ns=ns: ("RMSNorm", (ns,), kw, None)), ("RMSNorm", (ns,), kw),
                          shape, None))
    return cases


TORCH_CASES = _bn_cases() + _in_cases() + _gn_cases() + _rows_cases()


def make_pair(case, dtype):
    _, nk_factory, (tname, targs, tkw), shape, layout = case
    name, args, kw, lay = nk_factory()
    kwargs = dict(kw)
    if lay is not None:
        kwargs["layout"] = lay
    layer = getattr(normkit, name)(*args, **kwargs, dtype=dtype)
    tmod = getattr(torch.nn, tname)(*targs, **tkw).to(torch.float64)  # the oracle: float64 from the same values
    return layer, tmod, shape, layout


def compare_state(layer, tmod, dtype, what):
    tsd = tmod.state_dict()
    sd = layer.state_dict()
    assert list(sd) == list(tsd), f"{what}: keys {list(sd)} != torch's {list(tsd)}"
    for k, v in tsd.items():
        if k == "num_batches_tracked":
            assert sd[k].shape == () and sd[k].dtype == np.int64
            assert int(sd[k]) == int(v), f"{what}: num_batches_tracked {int(sd[k])} != {int(v)}"
        else:
            close(sd[k], v.numpy(), dtype, f"{what}: {k}")
    # gradients accumulated over the steps, as torch's .grad
    for name, gname in (("weight", "grad_weight"), ("bias", "grad_bias")):
        p = getattr(tmod, name, None)
        if p is None or not isinstance(p, torch.nn.Parameter):
            assert getattr(layer, gname, None) is None, f"{what}: {gname} present, torch has no {name}"
            continue
        g = getattr(layer, gname)
        if p.grad is None:
            assert not g.any(), f"{what}: {gname} not zero"
        else:
            close(g, p.grad.numpy(), dtype, f"{what}: {gname}", tol32=1e-4)


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_against_torch(case, dtype, rng):
    layer, tmod, shape, layout = make_pair(case, dtype)
    randomize(layer, rng, tmod)
    compare_state(layer, tmod, dtype, "initial")
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 0.5 * step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y = layer(x)
        dx = layer.backward(dy)
        xt = tt(to_cf(x, layout)).requires_grad_(True)
        yt = tmod(xt)
        yt.backward(tt(to_cf(dy, layout)))
        close(y, from_cf(yt.detach().numpy(), layout), dtype, f"step {step}: y")
        close(dx, from_cf(xt.grad.numpy(), layout), dtype, f"step {step}: dx")
        compare_state(layer, tmod, dtype, f"step {step}")
    layer.zero_grad()
    tmod.zero_grad(set_to_none=False)
    layer.eval()
    tmod.eval()
    assert not layer.training
    x = (rng.standard_normal(shape) * 3 - 1).astype(dtype)
    y = layer(x)
    with torch.no_grad():
        yt = tmod(tt(to_cf(x, layout)))
    close(y, from_cf(yt.numpy(), layout), dtype, "eval: y")
    compare_state(layer, tmod, dtype, "eval")


@needs_torch
@pytest.mark.parametrize("case", TORCH_CASES[1::5], ids=lambda c: c[0])
def test_torch_tensor_inputs_and_eval_before_backward(case, rng):
    """x and dy as torch tensors (any array-like works); eval() between a training
    forward and its backward keeps the saved state, as torch's graph does."""
    layer, tmod, shape, layout = make_pair(case, np.float64)
    randomize(layer, rng, tmod)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    y = layer(torch.from_numpy(x))
    layer.eval()
    dx = layer.backward(torch.from_numpy(dy))
    xt = tt(to_cf(x, layout)).requires_grad_(True)
    yt = tmod(xt)
    tmod.eval()
    yt.backward(tt(to_cf(dy, layout)))
    close(y, from_cf(yt.detach().numpy(), layout), np.float64, "y")
    close(dx, from_cf(xt.grad.numpy(), layout), np.float64, "dx")
    compare_state(layer, tmod, np.float64, "after")


@needs_torch
@pytest.mark.parametrize("case", TORCH_CASES[::4], ids=lambda c: c[0])
def test_state_dict_round_trip_with_torch(case, rng):
    dtype = np.float32
    layer, tmod, shape, layout = make_pair(case, dtype)
    tmod = tmod.float()  # a float32 torch module's state dict, as users have them
    # torch -> normkit: a trained torch module's state
    with torch.no_grad():
        for p in tmod.parameters():
            p.copy_(torch.randn_like(p))
    for _ in range(2):
        tmod(tt(to_cf((rng.standard_normal(shape) + 1).astype(dtype), layout)).float())
    tmod.eval()
    layer.eval()
    result = layer.load_state_dict({k: v.numpy() for k, v in tmod.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = rng.standard_normal(shape).astype(dtype)
    with torch.no_grad():
        yt = tmod(tt(to_cf(x, layout)).float()).numpy()
    close(layer(x), from_cf(yt, layout), dtype, "torch -> normkit: y")
    # normkit -> torch
    layer.train()
    randomize(layer, rng)
    for _ in range(3):
        layer((rng.standard_normal(shape) * 2 - 1).astype(dtype))
    layer.eval()
    t2 = make_pair(case, dtype)[1].float().eval()
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()}, strict=True)
    with torch.no_grad():
        yt = t2(tt(to_cf(x, layout)).float()).numpy()
    close(layer(x), from_cf(yt, layout), dtype, "normkit -> torch: y")
    # and the keys/shapes/dtypes are torch's own
    for k, v in t2.state_dict().items():
        mine = layer.state_dict()[k]
        assert mine.shape == tuple(v.shape), k
        assert mine.dtype == v.numpy().dtype, k


@needs_torch
def test_batch_norm_momentum_none_cumulative(rng):
    layer = normkit.BatchNorm(4, momentum=None, layout="NHWC", dtype=np.float64)
    tmod = torch.nn.BatchNorm2d(4, momentum=None).double()
    for step in range(5):
        x = rng.standard_normal((3, 5, 2, 4)) * (step + 1) + step
        layer(x)
        tmod(tt(np.moveaxis(x, -1, 1)))
    assert int(layer.num_batches_tracked) == 5
    close(layer.running_mean, tmod.running_mean.numpy(), np.float64, "running_mean")
    close(layer.running_var, tmod.running_var.numpy(), np.float64, "running_var")


@needs_torch
def test_mixed_precision_float16_with_torch(rng):
    """float16 x through a float32 LayerNorm / BatchNorm: torch computes in float32 from the same values."""
    x16 = rng.standard_normal((6, 8, 16)).astype(np.float16)
    ln = normkit.LayerNorm(16)
    randomize(ln, rng)
    t = torch.nn.LayerNorm(16).double()
    with torch.no_grad():
        t.weight.copy_(tt(ln.weight))
        t.bias.copy_(tt(ln.bias))
    y = ln(x16)
    assert y.dtype == np.float16
    yt = t(tt(x16)).detach().numpy()
    np.testing.assert_allclose(y.astype(np.float32), yt, rtol=2e-3, atol=4e-3)
    dx = ln.backward(np.ones_like(x16))
    assert dx.dtype == np.float16 and dx.shape == x16.shape
    assert ln.grad_weight.dtype == np.float32


# --------------------------------------------------------------------------- float64 against NumPy (no torch)


def ln_ref(x, w, b, eps, k):
    axes = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    return xhat * w + b, xhat, rstd, axes


def ln_backward_ref(dy, xhat, rstd, w, axes):
    g = dy * w
    dx = rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    lead = tuple(range(dy.ndim - len(axes)))
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


def test_layer_norm_float64_against_numpy(rng):
    x = rng.standard_normal((4, 5, 3, 8)) * 3 + 2
    layer = normkit.LayerNorm((3, 8), eps=1e-4, dtype=np.float64)
    randomize(layer, rng)
    w, b = layer.weight.copy(), layer.bias.copy()
    y = layer(x)
    y_ref, xhat, rstd, axes = ln_ref(x, w, b, 1e-4, 2)
    close(y, y_ref, np.float64, "y")
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    dx_ref, dw_ref, db_ref = ln_backward_ref(dy, xhat, rstd, w, axes)
    close(dx, dx_ref, np.float64, "dx")
    close(layer.grad_weight, dw_ref, np.float64, "grad_weight")
    close(layer.grad_bias, db_ref, np.float64, "grad_bias")
    # a second step accumulates
    y = layer(x)
    layer.backward(dy)
    close(layer.grad_weight, 2 * dw_ref, np.float64, "grad_weight (accumulated)")
    close(layer.grad_bias, 2 * db_ref, np.float64, "grad_bias (accumulated)")
    layer.zero_grad()
    assert not layer.grad_weight.any() and not layer.grad_bias.any()


def test_rms_norm_float64_against_numpy(rng):
    x = rng.standard_normal((6, 10)) + 1
    layer = normkit.RMSNorm(10, dtype=np.float64)
    randomize(layer, rng)
    w = layer.weight.copy()
    eps = np.finfo(np.float64).eps
    rstd = 1 / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)
    close(layer(x), x * rstd * w, np.float64, "y")
    dy = rng.standard_normal(x.shape)
    xhat = x * rstd
    g = dy * w
    close(layer.backward(dy), rstd * (g - xhat * (g * xhat).mean(axis=1, keepdims=True)), np.float64, "dx")
    close(layer.grad_weight, (dy * xhat).sum(axis=0), np.float64, "grad_weight")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batch_norm_float64_against_numpy(layout, rng):
    n, c, h, w_ = 4, 3, 5, 2
    x_cf = rng.standard_normal((n, c, h, w_)) * 2 + 1
    x = from_cf(x_cf, layout)
    layer = normkit.BatchNorm(c, momentum=0.25, layout=layout, dtype=np.float64)
    randomize(layer, rng)
    wt, bs = layer.weight.copy(), layer.bias.copy()
    shape = (1, c, 1, 1)
    axes = (0, 2, 3)
    m = n * h * w_
    mean = x_cf.mean(axis=axes, keepdims=True)
    var = ((x_cf - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-5)
    xhat = (x_cf - mean) * rstd
    y = layer(x)
    close(to_cf(y, layout), xhat * wt.reshape(shape) + bs.reshape(shape), np.float64, "y")
    close(layer.running_mean, 0.25 * mean.ravel(), np.float64, "running_mean")
    close(layer.running_var, 0.75 + 0.25 * var.ravel() * m / (m - 1), np.float64, "running_var")
    assert int(layer.num_batches_tracked) == 1
    dy_cf = rng.standard_normal(x_cf.shape)
    dx = layer.backward(from_cf(dy_cf, layout))
    g = dy_cf * wt.reshape(shape)
    dx_ref = rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    close(to_cf(dx, layout), dx_ref, np.float64, "dx")
    close(layer.grad_weight, (dy_cf * xhat).sum(axis=axes), np.float64, "grad_weight")
    close(layer.grad_bias, dy_cf.sum(axis=axes), np.float64, "grad_bias")
    # eval: running statistics, dx = dy * w * rstd_running
    layer.eval()
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y = layer(x)
    r = 1 / np.sqrt(rv + 1e-5)
    close(to_cf(y, layout), (x_cf - rm.reshape(shape)) * (r * wt).reshape(shape) + bs.reshape(shape), np.float64,
          "eval y")
    assert int(layer.num_batches_tracked) == 1
    np.testing.assert_array_equal(layer.running_mean, rm)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_16bit_input_float32_layer(dtype_name, rng):
    dt = np_dtype(dtype_name)
    x = (rng.standard_normal((4, 6, 8)) + 0.5).astype(dt)
    x64 = x.astype(np.float64)
    for layer, ref in (
        (normkit.LayerNorm(8), lambda: ln_ref(x64, 1.0, 0.0, 1e-5, 1)[0]),
        (normkit.BatchNorm(6), lambda: (x64 - x64.mean(axis=(0, 2), keepdims=True))
         / np.sqrt(x64.var(axis=(0, 2), keepdims=True) + 1e-5)),
    ):
        y = layer(x)
        assert y.dtype == dt
        np.testing.assert_allclose(y.astype(np.float64), ref(), atol=0.05)
        dx = layer.backward(np.ones_like(x))
        assert dx.dtype == dt and dx.shape == x.shape
        assert layer.grad_weight.dtype == np.float32


def test_bfloat16_layer(rng):
    dt = np_dtype("bfloat16")
    layer = normkit.LayerNorm(8, dtype=dt)
    assert layer.dtype == dt and layer.weight.dtype == dt
    layer.weight = np.full(8, 2.0)
    assert layer.weight.astype(np.float32).tolist() == [2.0] * 8
    x = rng.standard_normal((3, 8)).astype(dt)
    y = layer(x)
    assert y.dtype == dt
    np.testing.assert_allclose(y.astype(np.float64), 2 * ln_ref(x.astype(np.float64), 1, 0, 1e-5, 1)[0], atol=0.05)
    sd = layer.state_dict()
    assert sd["weight"].dtype == dt
    assert "bfloat16" in repr(layer)


# --------------------------------------------------------------------------- the Python object


def test_parameters_share_memory(rng):
    layer = normkit.LayerNorm(16)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    y0 = layer(x)
    w = layer.weight
    assert w.dtype == np.float32 and w.shape == (16,) and w.flags.writeable
    assert np.shares_memory(w, layer.weight)
    w *= 3  # in place: the layer sees it
    layer.bias[:] = 1
    np.testing.assert_allclose(layer(x), y0 * 3 + 1, rtol=1e-5, atol=1e-5)
    layer.weight = np.ones(16)  # assignment copies into the same storage
    assert w.tolist() == [1.0] * 16
    layer.weight += 1  # augmented assignment works too
    assert w.tolist() == [2.0] * 16
    layer.bias = [0.0] * 16
    np.testing.assert_allclose(layer(x), y0 * 2, rtol=1e-5, atol=1e-5)


def test_running_stats_and_counter_share_memory(rng):
    layer = normkit.BatchNorm(3)
    rm, rv, nbt = layer.running_mean, layer.running_var, layer.num_batches_tracked
    assert nbt.shape == () and nbt.dtype == np.int64 and int(nbt) == 0
    layer(rng.standard_normal((8, 3)).astype(np.float32) + 5)
    assert int(nbt) == 1 and rm.min() > 0.3 and not np.allclose(rv, 1)
    layer.num_batches_tracked = 41
    layer(rng.standard_normal((8, 3)).astype(np.float32))
    assert int(nbt) == 42 and int(layer.state_dict()["num_batches_tracked"]) == 42
    nbt[...] = 7
    assert int(layer.num_batches_tracked) == 7
    layer.running_var[:] = 4.0
    layer.running_mean[:] = 1.0
    layer.eval()
    x = np.full((2, 3), 3.0, np.float32)
    np.testing.assert_allclose(layer(x), (3 - 1) / np.sqrt(4 + 1e-5), rtol=1e-6)


def test_arrays_keep_the_layer_alive():
    w = normkit.BatchNorm(4).running_var
    nbt = normkit.InstanceNorm(4, track_running_stats=True).num_batches_tracked
    gc.collect()
    assert w.tolist() == [1.0] * 4 and int(nbt) == 0
    w[:] = 2  # still writable memory


def test_absent_parameters_are_none():
    assert normkit.BatchNorm(4, affine=False).weight is None
    assert normkit.BatchNorm(4, affine=False).grad_bias is None
    bn = normkit.BatchNorm(4, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert list(bn.state_dict()) == ["weight", "bias"]
    inn = normkit.InstanceNorm(4)
    assert inn.weight is None and inn.running_mean is None and inn.state_dict() == {}
    assert list(normkit.InstanceNorm(4, affine=True, track_running_stats=True).state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    ln = normkit.LayerNorm(4, bias=False)
    assert ln.bias is None and ln.weight is not None and list(ln.state_dict()) == ["weight"]
    assert normkit.LayerNorm(4, elementwise_affine=False).state_dict() == {}
    assert list(normkit.RMSNorm(4).state_dict()) == ["weight"]
    assert normkit.RMSNorm(4, elementwise_affine=False).weight is None
    assert not hasattr(normkit.LayerNorm(4), "running_mean")
    assert list(normkit.GroupNorm(2, 4).state_dict()) == ["weight", "bias"]
    assert normkit.GroupNorm(2, 4, affine=False).bias is None


def test_initial_values():
    bn = normkit.BatchNorm(3, dtype=np.float64)
    assert bn.weight.tolist() == [1, 1, 1] and bn.bias.tolist() == [0, 0, 0]
    assert bn.running_mean.tolist() == [0, 0, 0] and bn.running_var.tolist() == [1, 1, 1]
    assert bn.grad_weight.tolist() == [0, 0, 0] and bn.grad_bias.tolist() == [0, 0, 0]
    assert bn.weight.dtype == np.float64 and bn.dtype == np.float64
    assert normkit.LayerNorm((2, 3)).weight.shape == (2, 3)


def test_wrong_assignments():
    layer = normkit.BatchNorm(4)
    raises_named(ValueError, "weight", lambda: setattr(layer, "weight", np.ones(3)))
    raises_named(ValueError, "running_var", lambda: setattr(layer, "running_var", np.ones((4, 1))))
    raises_named(ValueError, "num_batches_tracked", lambda: setattr(layer, "num_batches_tracked", np.ones(2)))
    raises_named(TypeError, "bias", lambda: setattr(layer, "bias", np.array(["a"] * 4)))
    raises_named(TypeError, "weight", lambda: setattr(layer, "weight", None))
    raises_named(ValueError, "weight", lambda: setattr(normkit.LayerNorm(4, elementwise_affine=False), "weight",
                                                       np.ones(4)))
    raises_named(ValueError, "running_mean",
                 lambda: setattr(normkit.BatchNorm(4, track_running_stats=False), "running_mean", np.ones(4)))
    assert layer.weight.tolist() == [1.0] * 4  # unchanged
    layer.grad_weight = np.full(4, 0.5)  # gradients are assignable too
    assert layer.grad_weight.tolist() == [0.5] * 4


def test_backward_errors(rng):
    layer = normkit.LayerNorm(8)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(RuntimeError, match="^backward: "):
        layer.backward(np.ones((3, 8), np.float32))  # no forward yet
    layer(x)
    raises_named(ValueError, "dy", lambda: layer.backward(np.ones((3, 7), np.float32)))
    raises_named(TypeError, "dy", lambda: layer.backward(np.ones((3, 8), np.float64)))
    raises_named(TypeError, "dy", lambda: layer.backward(np.ones((3, 8), np.int32)))
    dx = layer.backward(np.ones((3, 8), np.float32))  # the failed calls left the state saved
    assert dx.shape == (3, 8)
    with pytest.raises(RuntimeError, match="^backward: "):
        layer.backward(np.ones((3, 8), np.float32))  # consumed
    layer(x)
    layer.eval()
    layer.backward(np.ones((3, 8), np.float32))  # eval() after the training forward: still saved
    layer(x)  # eval forward saves nothing
    with pytest.raises(RuntimeError, match="^backward: "):
        layer.backward(np.ones((3, 8), np.float32))


def test_forward_errors(rng):
    bn = normkit.BatchNorm(4)
    raises_named(ValueError, "x", lambda: bn(np.ones((2, 3), np.float32)))  # channel count
    raises_named(TypeError, "x", lambda: bn(np.ones((2, 4), np.float64)))  # layer dtype
    raises_named(TypeError, "x", lambda: bn(np.ones((2, 4), np.int32)))
    with pytest.raises(ValueError, match="normalized_shape: .* x"):
        normkit.LayerNorm(8)(np.ones((2, 7), np.float32))
    raises_named(ValueError, "layout", lambda: normkit.BatchNorm(4, layout="NHWC")(np.ones((2, 4), np.float32)))
    with pytest.raises(RuntimeError, match="^backward"):
        bn.backward(np.ones((2, 4), np.float32))  # a failed forward saves nothing


def test_constructor_errors():
    raises_named(ValueError, "num_features", lambda: normkit.BatchNorm(0))
    raises_named(TypeError, "num_features", lambda: normkit.BatchNorm(4.5))
    raises_named(ValueError, "num_groups", lambda: normkit.GroupNorm(3, 8))
    raises_named(TypeError, "dtype", lambda: normkit.LayerNorm(8, dtype=np.int32))
    raises_named(ValueError, "layout", lambda: normkit.BatchNorm(4, layout="NWHC"))
    raises_named(TypeError, "layout", lambda: normkit.InstanceNorm(4, layout=3))
    raises_named(TypeError, "momentum", lambda: normkit.BatchNorm(4, momentum="fast"))
    raises_named(TypeError, "eps", lambda: normkit.RMSNorm(4, eps="small"))
    raises_named(ValueError, "normalized_shape", lambda: normkit.LayerNorm(()))


def test_non_contiguous_and_array_like_input(rng):
    wide = rng.standard_normal((6, 20)).astype(np.float32)
    layer = normkit.LayerNorm(10)
    np.testing.assert_array_equal(layer(wide[:, ::2]), layer(np.ascontiguousarray(wide[:, ::2])))
    ln64 = normkit.LayerNorm(10, dtype=np.float64)
    np.testing.assert_array_equal(ln64(wide[:, ::2].tolist()), ln64(wide[:, ::2].astype(np.float64)))
    bn = normkit.BatchNorm(3, layout="NHWC")
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # NCHW values
    y1 = bn(np.moveaxis(x, 1, -1))  # a non-contiguous NHWC view
    dx1 = bn.backward(np.ones((2, 4, 5, 3), np.float32))
    bn2 = normkit.BatchNorm(3, layout=normkit.Layout.NHWC)
    y2 = bn2(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, bn2.backward(np.ones((2, 4, 5, 3), np.float32)))


def test_layer_keeps_x_alive_for_backward(rng):
    layer = normkit.LayerNorm(64, dtype=np.float64)
    x = rng.standard_normal((32, 64))
    layer(x.copy())  # the only reference to that copy is the layer's
    gc.collect()
    junk = [np.full((32, 64), 1e6) for _ in range(8)]  # reuse freed memory, if any
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    _, xhat, rstd, axes = ln_ref(x, 1.0, 0.0, 1e-5, 1)
    close(dx, ln_backward_ref(dy, xhat, rstd, 1.0, axes)[0], np.float64, "dx")
    del junk


def test_train_eval_return_self():
    layer = normkit.GroupNorm(2, 4)
    assert layer.training is True
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and not layer.training
    layer.training = True
    assert layer.training


def test_load_state_dict_strict_and_not(rng):
    layer = normkit.BatchNorm(3)
    good = {"weight": np.full(3, 2.0), "bias": np.full(3, 0.5), "running_mean": np.ones(3),
            "running_var": np.full(3, 3.0), "num_batches_tracked": np.array(9)}
    assert tuple(layer.load_state_dict(good)) == ([], [])
    assert layer.weight.tolist() == [2.0] * 3 and int(layer.num_batches_tracked) == 9
    # missing / unexpected keys: an error listing them, nothing loaded
    partial = {"weight": np.full(3, 5.0), "extra": np.ones(3)}
    with pytest.raises(RuntimeError) as info:
        layer.load_state_dict(partial)
    msg = str(info.value)
    for key in ("bias", "running_mean", "running_var", "extra"):
        assert f'"{key}"' in msg, msg
    assert '"num_batches_tracked"' not in msg  # a missing counter is left alone, as in torch
    assert layer.weight.tolist() == [2.0] * 3
    # strict=False: loads what is there, reports the rest
    missing, unexpected = layer.load_state_dict(partial, strict=False)
    assert missing == ["bias", "running_mean", "running_var"] and unexpected == ["extra"]
    assert layer.weight.tolist() == [5.0] * 3 and layer.bias.tolist() == [0.5] * 3
    # shape mismatches are errors even with strict=False; nothing loaded
    with pytest.raises(RuntimeError, match="size mismatch for running_var"):
        layer.load_state_dict({"weight": np.zeros(3), "running_var": np.ones(4)}, strict=False)
    assert layer.weight.tolist() == [5.0] * 3
    # the loaded copies are copies
    src = {k: v.copy() for k, v in good.items()}
    layer.load_state_dict(src)
    src["weight"][:] = -1
    assert layer.weight.tolist() == [2.0] * 3
    sd = layer.state_dict()
    sd["weight"][:] = -1
    assert layer.weight.tolist() == [2.0] * 3


def _trained(layer, shape, rng, steps=2):
    randomize(layer, rng)
    for _ in range(steps):
        layer(rng.standard_normal(shape).astype(layer.dtype) + 1)
        layer.backward(rng.standard_normal(shape).astype(layer.dtype))
    return layer


COPY_CASES = [
    (lambda: normkit.BatchNorm(3, momentum=None, layout="NHWC"), (2, 4, 4, 3)),
    (lambda: normkit.InstanceNorm(3, affine=True, track_running_stats=True, dtype=np.float64), (2, 3, 5)),
    (lambda: normkit.GroupNorm(2, 4, eps=1e-3, layout="NLC"), (2, 5, 4)),
    (lambda: normkit.LayerNorm((2, 4), bias=False), (3, 2, 4)),
    (lambda: normkit.RMSNorm(4, eps=1e-6), (5, 4)),
]


@pytest.mark.parametrize("factory,shape", COPY_CASES)
def test_backward_needs_a_training_forward(factory, shape, rng):
    layer = factory()
    x = rng.standard_normal(shape).astype(layer.dtype)
    dy = np.ones(shape, layer.dtype)
    with pytest.raises(RuntimeError, match="^backward: "):
        layer.backward(dy)
    layer.eval()
    layer(x)
    with pytest.raises(RuntimeError, match="^backward: "):
        layer.backward(dy)
    layer.train()
    assert layer.forward(x).shape == shape  # forward: the same as calling the layer
    assert layer.backward(dy).shape == shape


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("factory,shape", COPY_CASES)
def test_pickle_and_deepcopy(factory, shape, how, rng):
    layer = _trained(factory(), shape, rng)
    layer.eval()
    clone = pickle.loads(pickle.dumps(layer)) if how == "pickle" else copy.deepcopy(layer)
    assert type(clone) is type(layer) and repr(clone) == repr(layer)
    assert clone.training is False
    sd, sd2 = layer.state_dict(), clone.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        np.testing.assert_array_equal(sd[k], sd2[k])
        assert sd[k].dtype == sd2[k].dtype
    for g in ("grad_weight", "grad_bias"):
        if getattr(layer, g, None) is not None:
            np.testing.assert_array_equal(getattr(layer, g), getattr(clone, g))
    x = rng.standard_normal(shape).astype(layer.dtype)
    np.testing.assert_array_equal(layer(x), clone(x))
    if clone.weight is not None:  # independent storage
        clone.weight[...] = 7
        assert not (layer.weight == 7).all()


def test_pickle_keeps_training_flag_and_subclass_attributes(rng):
    class Tagged(normkit.LayerNorm):
        def __init__(self, tag):
            super().__init__(6, eps=1e-3)
            self.tag = tag

    global _Tagged
    _Tagged = Tagged
    Tagged.__qualname__ = "_Tagged"
    layer = Tagged("hello")
    layer.weight[:] = 3
    clone = copy.deepcopy(layer)
    assert clone.training and clone.tag == "hello" and clone.weight.tolist() == [3.0] * 6
    assert pickle.loads(pickle.dumps(clone)).tag == "hello"


def test_repr():
    assert repr(normkit.BatchNorm(64)) == "BatchNorm(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    assert (repr(normkit.BatchNorm(8, momentum=None, affine=False, layout="NHWC"))
            == "BatchNorm(8, eps=1e-05, momentum=None, affine=False, track_running_stats=True, layout=NHWC)")
    assert repr(normkit.LayerNorm(768)) == "LayerNorm((768,), eps=1e-05, elementwise_affine=True)"
    assert repr(normkit.LayerNorm((4, 8), eps=1e-6)) == "LayerNorm((4, 8), eps=1e-06, elementwise_affine=True)"
    assert repr(normkit.LayerNorm(8, bias=False)) == "LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=False)"
    assert repr(normkit.GroupNorm(32, 320)) == "GroupNorm(32, 320, eps=1e-05, affine=True)"
    assert repr(normkit.RMSNorm(768)) == "RMSNorm((768,), eps=None, elementwise_affine=True)"
    assert (repr(normkit.InstanceNorm(3))
            == "InstanceNorm(3, eps=1e-05, momentum=0.1, affine=False, track_running_stats=False)")
    assert (repr(normkit.InstanceNorm(3, layout=normkit.Layout.NDHWC, dtype=np.float64))
            == "InstanceNorm(3, eps=1e-05, momentum=0.1, affine=False, track_running_stats=False, "
               "layout=NDHWC, dtype=float64)")


@needs_torch
def test_repr_matches_torch_body():
    pairs = [
        (normkit.BatchNorm(64), torch.nn.BatchNorm2d(64)),
        (normkit.LayerNorm(768), torch.nn.LayerNorm(768)),
        (normkit.GroupNorm(32, 320), torch.nn.GroupNorm(32, 320)),
        (normkit.RMSNorm(768), torch.nn.RMSNorm(768)),
        (normkit.InstanceNorm(5, affine=True), torch.nn.InstanceNorm2d(5, affine=True)),
    ]
    for mine, theirs in pairs:
        # torch 2.13 shows a `bias` flag (new in BatchNorm/InstanceNorm, which normkit does not take;
        # normkit's LayerNorm shows it only when False)
        body = repr(theirs).split("(", 1)[1].replace(" bias=True,", "").replace(", bias=True)", ")")
        assert repr(mine).split("(", 1)[1] == body


def test_attributes():
    bn = normkit.BatchNorm(5, eps=1e-3, momentum=None, affine=False, layout="NLC", dtype=np.float64)
    assert (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (5, 1e-3, None, False, True)
    assert bn.layout == normkit.Layout.NLC and bn.dtype == np.float64
    assert normkit.BatchNorm(5).layout is None
    gn = normkit.GroupNorm(2, 6)
    assert (gn.num_groups, gn.num_channels, gn.eps, gn.affine) == (2, 6, 1e-5, True)
    ln = normkit.LayerNorm([3, 4], elementwise_affine=False)
    assert ln.normalized_shape == (3, 4) and ln.elementwise_affine is False
    assert normkit.RMSNorm(4).eps is None
    assert isinstance(normkit.BatchNorm(2), normkit._ext._BatchNorm)

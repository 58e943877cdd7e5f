"""CUDA arrays: routing and errors everywhere; the GPU suite where a GPU is.

The first part runs on every machine: arrays that say they live in CUDA memory
(through ``__dlpack_device__``) must give clear errors in a build without CUDA
and when mixed with host arrays, never a crash or a silent copy.

The GPU suite compares every norm, forward and backward, on the GPU (PyTorch
CUDA tensors) with normkit's CPU results on the same values, for float32,
float16 and bfloat16 and both layouts. It runs only where normkit was built
with CUDA, a device is present and PyTorch has CUDA; otherwise it is skipped
with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit as nk
from normkit import _cuda


class FakeCudaArray:
    """Says it is CUDA memory; anything that tries to read it fails loudly."""

    def __init__(self, shape, device=0):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)
        self._device = device

    def __dlpack_device__(self):
        return (2, self._device)

    def __dlpack__(self, **kwargs):
        raise AssertionError("normkit tried to read a fake CUDA array")

    def __array__(self, *args, **kwargs):
        raise AssertionError("normkit tried to copy a fake CUDA array to the host")


CUDA_BUILT = nk._ext.cuda_built()
RNG = np.random.default_rng(7)
X2 = RNG.standard_normal((4, 8)).astype(np.float32)
X4 = RNG.standard_normal((2, 6, 3, 5)).astype(np.float32)
C6 = np.ones(6, np.float32)
NC = np.full((2, 6), 0.5, np.float32)


def fake(shape):
    return FakeCudaArray(shape)


# (call, the argument that is on the "GPU")
HOST_CALLS = [
    (lambda: nk.layer_norm(fake((4, 8)), 8), "x"),
    (lambda: nk.layer_norm(X2, 8, weight=fake((8,))), "weight"),
    (lambda: nk.layer_norm(X2, 8, bias=fake((8,))), "bias"),
    (lambda: nk.layer_norm(X2, 8, out=fake((4, 8))), "out"),
    (lambda: nk.rms_norm(fake((4, 8)), 8), "x"),
    (lambda: nk.rms_norm(X2, 8, weight=fake((8,))), "weight"),
    (lambda: nk.batch_norm(fake(X4.shape), None, None, training=True), "x"),
    (lambda: nk.batch_norm(X4, fake((6,)), C6.copy(), training=True), "running_mean"),
    (lambda: nk.batch_norm(X4, C6.copy(), fake((6,)), training=False), "running_var"),
    (lambda: nk.batch_norm(X4, None, None, fake((6,)), training=True), "weight"),
    (lambda: nk.instance_norm(fake(X4.shape)), "x"),
    (lambda: nk.instance_norm(X4, bias=fake((6,))), "bias"),
    (lambda: nk.group_norm(fake(X4.shape), 3), "x"),
    (lambda: nk.group_norm(X4, 3, weight=fake((6,))), "weight"),
    (lambda: nk.adaptive_instance_norm(fake(X4.shape), X4), "x"),
    (lambda: nk.adaptive_instance_norm(X4, fake(X4.shape)), "style"),
    (lambda: nk.adaptive_instance_norm(X4, (fake((2, 6)), NC)), "style"),
    (lambda: nk.layer_norm_backward(fake((4, 8)), X2, X2[:, :1], X2[:, :1], 8), "dy"),
    (lambda: nk.layer_norm_backward(X2, fake((4, 8)), X2[:, :1], X2[:, :1], 8), "x"),
    (lambda: nk.layer_norm_backward(X2, X2, fake((4, 1)), X2[:, :1], 8), "mean"),
    (lambda: nk.rms_norm_backward(X2, X2, fake((4, 1)), 8), "rstd"),
    (lambda: nk.batch_norm_backward(fake(X4.shape), X4, C6, C6), "dy"),
    (lambda: nk.batch_norm_backward(X4, X4, C6, C6, fake((6,))), "weight"),
    (lambda: nk.instance_norm_backward(X4, fake(X4.shape), NC, NC), "x"),
    (lambda: nk.group_norm_backward(X4, X4, fake((2, 3)), NC[:, :3], 3), "mean"),
    (lambda: nk.adaptive_instance_norm_backward(X4, X4, fake(X4.shape)), "style"),
]


@pytest.mark.parametrize("call,arg", HOST_CALLS, ids=[f"{i}-{a}" for i, (_, a) in enumerate(HOST_CALLS)])
def test_cuda_arrays_give_clear_errors(call, arg):
    if CUDA_BUILT and arg == "x":
        pytest.skip("with CUDA built, a CUDA x goes to the GPU (the GPU suite covers it)")
    if CUDA_BUILT:
        # A CUDA array among host arrays: mixed devices.
        with pytest.raises(ValueError, match=rf"^{arg}: is on cuda:0, but x is a host array"):
            call()
    else:
        with pytest.raises(RuntimeError, match=rf"^{arg}: is a CUDA array \(cuda:0\), but this normkit was built without CUDA"):
            call()


def test_layer_objects_refuse_cuda_arrays():
    with pytest.raises(ValueError, match=r"^x: is on cuda:0; normkit's layer objects .* run on the CPU"):
        nk.LayerNorm(8)(fake((4, 8)))


def test_host_arrays_are_not_cuda_arrays():
    assert _cuda.device_of(X2) is None
    assert _cuda.device_of(None) is None
    assert _cuda.device_of(fake((1,))) == 0
    assert _cuda.device_of(FakeCudaArray((1,), device=3)) == 3

    class PinnedHost:  # DLPack kDLCUDAHost (3): host memory, the CPU path takes it
        def __dlpack_device__(self):
            return (3, 0)

    assert _cuda.device_of(PinnedHost()) is None


def test_info_reports_cuda():
    info = nk.info()
    assert info["cuda_built"] is CUDA_BUILT
    assert isinstance(info["cuda_devices"], int) and info["cuda_devices"] >= 0
    if not CUDA_BUILT:
        assert info["cuda_devices"] == 0
        assert nk._ext.cuda_device_count() == 0


def test_stream_is_accepted_for_host_arrays():
    # stream= only orders CUDA work; host calls are synchronous and ignore it.
    np.testing.assert_array_equal(nk.layer_norm(X2, 8, stream=123), nk.layer_norm(X2, 8))


# ---- the GPU suite ---------------------------------------------------------------------

def _gpu_skip_reason():
    if not CUDA_BUILT:
        return "GPU suite skipped: this normkit was built without CUDA (pip install . -Ccmake.define.NORMKIT_CUDA=ON)"
    if nk._ext.cuda_device_count() == 0:
        return "GPU suite skipped: no CUDA device on this machine"
    try:
        import torch
    except ImportError:
        return "GPU suite skipped: PyTorch (with CUDA) is not installed"
    if not torch.cuda.is_available():
        return "GPU suite skipped: this PyTorch has no CUDA"
    return None


GPU_SKIP = _gpu_skip_reason()
gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")

DTYPES = ["float32", "float16", "bfloat16"]
# Worst |gpu - cpu| / max(1, |cpu|): both sides accumulate in float32 (float64
# for float64), so they differ by reduction order and the final rounding.
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
TOL_BACKWARD = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def _np_dtype(name):
    if name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_gpu(a):
    import torch

    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_to_gpu(v) for v in a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to("cuda").to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda")


def _to_host(t):
    import torch

    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_to_host(v) for v in t)
    torch.cuda.synchronize()
    if t.dtype == torch.bfloat16:
        return t.float().cpu().numpy()
    return t.cpu().numpy()


def _close(gpu_value, cpu_value, tol, what):
    if cpu_value is None:
        assert gpu_value is None, what
        return
    if isinstance(cpu_value, tuple):
        for g, c in zip(gpu_value, cpu_value):
            _close(g, c, tol, what)
        return
    g = np.asarray(gpu_value, dtype=np.float64)
    c = np.asarray(cpu_value.astype(np.float32) if cpu_value.dtype.name == "bfloat16" else cpu_value, dtype=np.float64)
    assert g.shape == c.shape, what
    err = np.abs(g - c) / np.maximum(1.0, np.abs(c))
    assert np.array_equal(np.isnan(g), np.isnan(c)), what
    worst = float(np.nanmax(err)) if err.size else 0.0
    assert worst <= tol, f"{what}: worst relative difference {worst:.3g} > {tol:.3g}"


def _data(shape, dtype, rng, offset=0.0):
    return (rng.standard_normal(shape) * 2.0 + offset).astype(_np_dtype(dtype))


def _channels_last(layout):
    return layout in ("NLC", "NHWC", "NDHWC")


# Each forward case: (id, x shape, layout, fn(x, params...) -> outputs) where the
# same fn runs on host arrays and on GPU tensors.
def _forward_cases():
    cases = []
    for shape in [(37, 300), (5, 1024), (3, 4096), (2, 12288), (2, 70001), (6, 2, 3, 7)]:
        ns = shape[-1:] if len(shape) == 2 else shape[-2:]
        cases.append((f"layer_norm{shape}", shape, None, ns,
                      lambda x, w, b, ns=ns: nk.layer_norm(x, ns, w, b, 1e-5, return_stats=True)))
        cases.append((f"rms_norm{shape}", shape, None, ns,
                      lambda x, w, b, ns=ns: nk.rms_norm(x, ns, w, 1e-6, return_stats=True)))
    for layout, shape in [("NCHW", (4, 6, 5, 7)), ("NHWC", (4, 5, 7, 6)), ("NC", (9, 6)), ("NLC", (3, 11, 6)),
                          ("NCDHW", (2, 6, 3, 4, 5))]:
        cases.append((f"batch_norm_train_{layout}", shape, layout, (6,),
                      lambda x, w, b, lay=layout: nk.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, layout=lay,
                                                                return_stats=True)))
        if layout != "NC":
            cases.append((f"instance_norm_{layout}", shape, layout, (6,),
                          lambda x, w, b, lay=layout: nk.instance_norm(x, weight=w, bias=b, layout=lay,
                                                                       return_stats=True)))
            cases.append((f"group_norm_{layout}", shape, layout, (6,),
                          lambda x, w, b, lay=layout: nk.group_norm(x, 3, w, b, layout=lay, return_stats=True)))
    return cases


FORWARD = _forward_cases()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FORWARD, ids=[c[0] for c in FORWARD])
def test_gpu_forward_matches_cpu(case, dtype):
    _, shape, layout, pshape, fn = case
    rng = np.random.default_rng(1)
    x = _data(shape, dtype, rng, offset=3.0)
    pd = np.float32 if dtype != "float64" else np.float64
    w = (rng.standard_normal(pshape) + 1).astype(pd)
    b = rng.standard_normal(pshape).astype(pd)
    cpu = fn(x, w, b)
    out = fn(_to_gpu(x), _to_gpu(w), _to_gpu(b))
    _close(_to_host(out), cpu, TOL[dtype], f"{case[0]} {dtype}")
    # the same call again: bit for bit the same (fixed reduction order)
    again = fn(_to_gpu(x), _to_gpu(w), _to_gpu(b))
    for a1, a2 in zip(_to_host(out), _to_host(again)):
        np.testing.assert_array_equal(a1, a2)


@gpu
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gpu_batch_norm_running_statistics_and_eval(layout):
    rng = np.random.default_rng(2)
    shape = (4, 6, 5, 7) if layout == "NCHW" else (4, 5, 7, 6)
    x = _data(shape, "float32", rng, offset=1.0)
    rm, rv = rng.standard_normal(6).astype(np.float32), (rng.random(6) + 0.5).astype(np.float32)
    rm_gpu, rv_gpu = _to_gpu(rm.copy()), _to_gpu(rv.copy())
    cpu = nk.batch_norm(x, rm, rv, training=True, momentum=0.3, layout=layout)
    gpu_y = nk.batch_norm(_to_gpu(x), rm_gpu, rv_gpu, training=True, momentum=0.3, layout=layout)
    _close(_to_host(gpu_y), cpu, TOL["float32"], "training")
    _close(_to_host(rm_gpu), rm, TOL["float32"], "running_mean")
    _close(_to_host(rv_gpu), rv, TOL["float32"], "running_var")
    cpu_eval = nk.batch_norm(x, rm, rv, training=False, layout=layout, return_stats=True)
    gpu_eval = nk.batch_norm(_to_gpu(x), rm_gpu, rv_gpu, training=False, layout=layout, return_stats=True)
    _close(_to_host(gpu_eval), cpu_eval, TOL["float32"], "eval")


@gpu
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_adaptive_instance_norm(layout, dtype):
    rng = np.random.default_rng(3)
    shape = (2, 6, 5, 7) if layout == "NCHW" else (2, 5, 7, 6)
    style_shape = (2, 6, 3, 4) if layout == "NCHW" else (2, 3, 4, 6)
    x, style = _data(shape, dtype, rng, 2.0), _data(style_shape, dtype, rng, -1.0)
    mean, std = rng.standard_normal((2, 6)).astype(np.float32), (rng.random((2, 6)) + 0.5).astype(np.float32)
    for s_cpu, s_gpu in [(style, _to_gpu(style)), ((mean, std), (_to_gpu(mean), _to_gpu(std)))]:
        cpu = nk.adaptive_instance_norm(x, s_cpu, layout=layout)
        out = nk.adaptive_instance_norm(_to_gpu(x), s_gpu, layout=layout)
        _close(_to_host(out), cpu, TOL[dtype], f"adain {layout} {dtype}")
        dy = _data(shape, dtype, rng)
        cpu_b = nk.adaptive_instance_norm_backward(dy, x, s_cpu, layout=layout)
        gpu_b = nk.adaptive_instance_norm_backward(_to_gpu(dy), _to_gpu(x), s_gpu, layout=layout)
        _close(_to_host(gpu_b[0]), cpu_b[0], TOL_BACKWARD[dtype], "adain dx")
        _close(_to_host(gpu_b[1]), cpu_b[1], TOL_BACKWARD[dtype], "adain dstyle")


def _backward_cases():
    cases = []
    for shape in [(37, 300), (3, 4096), (2, 70001)]:
        ns = shape[-1:]
        cases.append((f"layer_norm{shape}", shape, None, ns,
                      lambda x, w, ns=ns: nk.layer_norm(x, ns, w, None, return_stats=True)[1:],
                      lambda dy, x, st, w, ns=ns: nk.layer_norm_backward(dy, x, st[0], st[1], ns, w)))
        cases.append((f"rms_norm{shape}", shape, None, ns,
                      lambda x, w, ns=ns: nk.rms_norm(x, ns, w, return_stats=True)[1:],
                      lambda dy, x, st, w, ns=ns: nk.rms_norm_backward(dy, x, st[0], ns, w)))
    for layout, shape in [("NCHW", (4, 6, 5, 7)), ("NHWC", (4, 5, 7, 6))]:
        cases.append((f"batch_norm_{layout}", shape, layout, (6,),
                      lambda x, w, lay=layout: nk.batch_norm(x, None, None, w, None, True, layout=lay,
                                                             return_stats=True)[1:],
                      lambda dy, x, st, w, lay=layout: nk.batch_norm_backward(dy, x, st[0], st[1], w, layout=lay)))
        cases.append((f"batch_norm_eval_{layout}", shape, layout, (6,),
                      lambda x, w, lay=layout: nk.batch_norm(x, np.zeros(6, np.float32) if isinstance(x, np.ndarray)
                                                             else _to_gpu(np.zeros(6, np.float32)),
                                                             np.ones(6, np.float32) if isinstance(x, np.ndarray)
                                                             else _to_gpu(np.ones(6, np.float32)), w,
                                                             layout=lay, return_stats=True)[1:],
                      lambda dy, x, st, w, lay=layout: nk.batch_norm_backward(dy, x, st[0], st[1], w, training=False,
                                                                              layout=lay)))
        cases.append((f"instance_norm_{layout}", shape, layout, (6,),
                      lambda x, w, lay=layout: nk.instance_norm(x, weight=w, layout=lay, return_stats=True)[1:],
                      lambda dy, x, st, w, lay=layout: nk.instance_norm_backward(dy, x, st[0], st[1], w, layout=lay)))
        cases.append((f"group_norm_{layout}", shape, layout, (6,),
                      lambda x, w, lay=layout: nk.group_norm(x, 2, w, layout=lay, return_stats=True)[1:],
                      lambda dy, x, st, w, lay=layout: nk.group_norm_backward(dy, x, st[0], st[1], 2, w, layout=lay)))
    return cases


BACKWARD = _backward_cases()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BACKWARD, ids=[c[0] for c in BACKWARD])
def test_gpu_backward_matches_cpu(case, dtype):
    name, shape, _, pshape, forward, backward = case
    rng = np.random.default_rng(4)
    x, dy = _data(shape, dtype, rng, 2.0), _data(shape, dtype, rng)
    w = (rng.standard_normal(pshape) + 1).astype(np.float32)
    st = forward(x, w)
    cpu = backward(dy, x, st, w)
    gpu_args = (_to_gpu(dy), _to_gpu(x), _to_gpu(st), _to_gpu(w))
    out = backward(*gpu_args)
    _close(_to_host(out), cpu, TOL_BACKWARD[dtype], f"{name} {dtype}")
    again = backward(*gpu_args)
    for a1, a2 in zip(_to_host(out), _to_host(again)):
        np.testing.assert_array_equal(a1, a2)  # deterministic: no float atomics


@gpu
def test_gpu_large_mean_small_spread():
    # mean 1e4, std 1e-2 in float32: stable statistics on the GPU too.
    rng = np.random.default_rng(5)
    x = (1e4 + 1e-2 * rng.standard_normal((16, 2048))).astype(np.float32)
    y = _to_host(nk.layer_norm(_to_gpu(x), 2048))
    ref = (x.astype(np.float64) - x.astype(np.float64).mean(-1, keepdims=True)) / x.astype(np.float64).std(
        -1, keepdims=True)
    np.testing.assert_allclose(y, ref, atol=2e-3)
    xb = x.reshape(4, 4, 32, 64)
    yb = _to_host(nk.batch_norm(_to_gpu(xb), None, None, training=True))
    xd = xb.astype(np.float64)
    refb = (xd - xd.mean((0, 2, 3), keepdims=True)) / xd.std((0, 2, 3), keepdims=True)
    np.testing.assert_allclose(yb, refb, atol=2e-3)


@gpu
def test_gpu_stream_and_mixed_devices():
    import torch

    rng = np.random.default_rng(6)
    x = _data((64, 512), "float32", rng)
    cpu = nk.layer_norm(x, 512)
    stream = torch.cuda.Stream()
    xg = _to_gpu(x)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = nk.layer_norm(xg, 512, stream=stream)
    stream.synchronize()
    _close(_to_host(y), cpu, TOL["float32"], "on a side stream")
    y2 = nk.layer_norm(xg, 512, stream=stream.cuda_stream)  # a raw handle
    stream.synchronize()
    _close(_to_host(y2), cpu, TOL["float32"], "raw stream handle")
    with pytest.raises(ValueError, match=r"^weight: is a host array, but x is on cuda:0"):
        nk.layer_norm(xg, 512, weight=np.ones(512, np.float32))
    with pytest.raises(ValueError, match=r"^x: is on cuda:0, but x is a host array|^dy: is on cuda:0"):
        nk.layer_norm_backward(xg, x, x[:, :1], x[:, :1], 512)
    with pytest.raises(TypeError, match=r"^stream: expected a CUDA stream"):
        nk.layer_norm(xg, 512, stream="default")
    with pytest.raises(ValueError, match=r"^weight: expected shape"):
        nk.layer_norm(xg, 512, weight=_to_gpu(np.ones(511, np.float32)))

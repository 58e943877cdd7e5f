"""Any array in, the same kind out (normkit/_arrays.py).

Every public function and layer call takes PyTorch CPU tensors (bfloat16 included), objects
that speak only DLPack, DLPack capsules and buffer-protocol objects, reads them in place and
returns results in the kind of the array it normalizes (``out=`` as itself). Checked here:

- every function on torch tensors gives the same bits as on the NumPy arrays, in every
  dtype, and returns torch tensors;
- no hidden copy: the kernel reads the tensor's own memory and the returned tensor is the
  buffer the kernel wrote (a spy on the extension's entry points sees both pointers);
- running statistics given as torch buffers are updated in place;
- ``out=`` of either kind, strided torch outputs, mixed kinds (the rule: results follow x);
- DLPack-only objects (float32 and bfloat16), an object with ``__array_namespace__`` (its
  kind back), capsules (once), memoryviews;
- bad input: a tensor that requires grad, a meta tensor, integer tensors, a torch ``out``
  of the wrong dtype, a list as a running statistic.

The conversion does not depend on the kernel path, so this module runs once (conftest).
"""

from __future__ import annotations

import array

import numpy as np
import pytest

import normkit
from helpers import DLPackOnly, np_dtype, raises_prefixed, same_bits

DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _data(rng, dtype_name):
    """NumPy inputs of one dtype, and the saved statistics of their forward calls."""
    dt = np_dtype(dtype_name)

    def draw(*shape):
        return (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32).astype(dt)

    d = {"rows": draw(6, 16), "res": draw(6, 16), "w16": draw(16), "b16": draw(16),
         "chan": draw(2, 4, 3, 5), "dchan": draw(2, 4, 3, 5), "w4": draw(4), "b4": draw(4),
         "style_mean": draw(2, 4), "style_std": np.abs(draw(2, 4)) + dt.type(0.5), "dy": draw(6, 16),
         "conv_w": draw(4, 3, 3, 3), "conv_b": draw(4)}
    d["rm"], d["rv"] = np.zeros(4, dt), np.ones(4, dt)
    _, d["ln_mean"], d["ln_rstd"] = normkit.layer_norm(d["rows"], 16, return_stats=True)
    _, d["rms_rstd"] = normkit.rms_norm(d["rows"], 16, return_stats=True)
    _, d["bn_mean"], d["bn_rstd"] = normkit.batch_norm(d["chan"], None, None, training=True, return_stats=True)
    _, d["in_mean"], d["in_rstd"] = normkit.instance_norm(d["chan"], return_stats=True)
    _, d["gn_mean"], d["gn_rstd"] = normkit.group_norm(d["chan"], 2, return_stats=True)
    return d


# name -> call(k, d): k turns one NumPy array of d into the kind under test (a fresh copy).
CALLS = {
    "layer_norm": lambda k, d: normkit.layer_norm(k(d["rows"]), 16, k(d["w16"]), k(d["b16"]), return_stats=True),
    "rms_norm": lambda k, d: normkit.rms_norm(k(d["rows"]), 16, k(d["w16"]), return_stats=True),
    "add_layer_norm": lambda k, d: normkit.add_layer_norm(k(d["rows"]), k(d["res"]), 16, k(d["w16"]), k(d["b16"])),
    "add_rms_norm": lambda k, d: normkit.add_rms_norm(k(d["rows"]), k(d["res"]), 16, k(d["w16"]), return_stats=True),
    "batch_norm": lambda k, d: normkit.batch_norm(k(d["chan"]), k(d["rm"]), k(d["rv"]), k(d["w4"]), k(d["b4"]),
                                                  training=True, return_stats=True),
    "batch_norm_eval_nhwc": lambda k, d: normkit.batch_norm(k(np.ascontiguousarray(d["chan"].transpose(0, 2, 3, 1))),
                                                            k(d["rm"]), k(d["rv"]), layout="NHWC"),
    "instance_norm": lambda k, d: normkit.instance_norm(k(d["chan"]), None, None, k(d["w4"]), k(d["b4"]),
                                                        return_stats=True),
    "group_norm": lambda k, d: normkit.group_norm(k(d["chan"]), 2, k(d["w4"]), k(d["b4"]), return_stats=True),
    "adaptive_instance_norm": lambda k, d: normkit.adaptive_instance_norm(k(d["chan"]), (k(d["style_mean"]),
                                                                                         k(d["style_std"]))),
    "normalize": lambda k, d: normkit.normalize(k(d["rows"]), dim=0),
    "mean_variance_norm": lambda k, d: normkit.mean_variance_norm(k(d["chan"])),
    "layer_norm_backward": lambda k, d: normkit.layer_norm_backward(k(d["dy"]), k(d["rows"]), k(d["ln_mean"]),
                                                                    k(d["ln_rstd"]), 16, k(d["w16"])),
    "rms_norm_backward": lambda k, d: normkit.rms_norm_backward(k(d["dy"]), k(d["rows"]), k(d["rms_rstd"]), 16,
                                                                k(d["w16"])),
    "batch_norm_backward": lambda k, d: normkit.batch_norm_backward(k(d["dchan"]), k(d["chan"]), k(d["bn_mean"]),
                                                                    k(d["bn_rstd"]), k(d["w4"])),
    "batch_norm_grad_sums": lambda k, d: normkit.batch_norm_grad_sums(k(d["dchan"]), k(d["chan"]), k(d["bn_mean"])),
    "instance_norm_backward": lambda k, d: normkit.instance_norm_backward(k(d["dchan"]), k(d["chan"]),
                                                                          k(d["in_mean"]), k(d["in_rstd"]), k(d["w4"])),
    "group_norm_backward": lambda k, d: normkit.group_norm_backward(k(d["dchan"]), k(d["chan"]), k(d["gn_mean"]),
                                                                    k(d["gn_rstd"]), 2, k(d["w4"])),
    "adaptive_instance_norm_backward": lambda k, d: normkit.adaptive_instance_norm_backward(
        k(d["dchan"]), k(d["chan"]), (k(d["style_mean"]), k(d["style_std"]))),
    "normalize_backward": lambda k, d: normkit.normalize_backward(k(d["dy"]), k(d["rows"]), dim=0),
    "fold_batch_norm": lambda k, d: normkit.fold_batch_norm(k(d["conv_w"]), k(d["conv_b"]), k(d["rm"]), k(d["rv"]),
                                                            1e-5, k(d["w4"]), k(d["b4"])),
}
# Calls whose 16-bit form the functions do not take (float32 parameters/outputs only).
NOT_16BIT = {"fold_batch_norm"}


def _leaves(result):
    """The results as a flat list (tuples of tuples flattened)."""
    if isinstance(result, tuple):
        return [leaf for part in result for leaf in _leaves(part)]
    return [result]


def _bf16(dtype) -> bool:
    return dtype.itemsize == 2 and dtype != np.float16


def _tensor(torch, a):
    """A torch tensor of its own holding a copy of the NumPy array ``a`` (bfloat16 too)."""
    a = np.array(a, copy=True)
    if _bf16(a.dtype):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy(torch, t):
    """The values of a torch result as NumPy (bfloat16 as ml_dtypes.bfloat16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np_dtype("bfloat16"))
    return t.numpy()


# ------------------------------------------------------------------ torch in, torch out


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_torch_in_torch_out_same_bits(torch, rng, call, dtype_name):
    if call in NOT_16BIT and dtype_name in ("float16", "bfloat16"):
        pytest.skip(f"{call} takes float32/float64 only")
    d = _data(rng, dtype_name)
    expected = _leaves(CALLS[call](lambda a: a.copy(), d))
    got = _leaves(CALLS[call](lambda a: _tensor(torch, a), d))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, np.ndarray):
            assert isinstance(g, torch.Tensor), f"{call}: got {type(g).__name__}, not a torch tensor"
            g = _numpy(torch, g)
            assert g.dtype == e.dtype and g.shape == e.shape
            assert same_bits(g, e), f"{call}: torch result differs from the NumPy result"
        else:
            assert type(g) is type(e) and g == e  # batch_norm_grad_sums' count


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_torch_running_statistics_updated_in_place(torch, rng, norm, dtype_name):
    d = _data(rng, dtype_name)
    call = normkit.batch_norm if norm == "batch" else normkit.instance_norm
    rm, rv = d["rm"].copy(), d["rv"].copy()
    y = call(d["chan"], rm, rv, training=True) if norm == "batch" else call(d["chan"], rm, rv)
    t_rm, t_rv = _tensor(torch, d["rm"]), _tensor(torch, d["rv"])
    pointers = (t_rm.data_ptr(), t_rv.data_ptr())
    t_y = call(_tensor(torch, d["chan"]), t_rm, t_rv, training=True) if norm == "batch" else \
        call(_tensor(torch, d["chan"]), t_rm, t_rv)
    assert same_bits(_numpy(torch, t_y), y)
    assert same_bits(_numpy(torch, t_rm), rm) and same_bits(_numpy(torch, t_rv), rv)
    assert not same_bits(rm, d["rm"])  # the statistics did move
    assert (t_rm.data_ptr(), t_rv.data_ptr()) == pointers


def test_torch_layers_take_and_give_tensors(torch, rng):
    x = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for make in (lambda: normkit.LayerNorm((5, 6)), lambda: normkit.BatchNorm(3), lambda: normkit.GroupNorm(3, 3),
                 lambda: normkit.InstanceNorm(3, affine=True), lambda: normkit.RMSNorm(6)):
        ref_layer, layer = make(), make()
        y_ref, dx_ref = ref_layer(x), ref_layer.backward(dy)
        y = layer(torch.from_numpy(x.copy()))
        dx = layer.backward(torch.from_numpy(dy.copy()))
        assert isinstance(y, torch.Tensor) and isinstance(dx, torch.Tensor)
        assert same_bits(y.numpy(), y_ref) and same_bits(dx.numpy(), dx_ref)


# ------------------------------------------------------------------ no hidden copies


class _Spy:
    """Wraps one extension entry point and keeps the data addresses of its array arguments."""

    def __init__(self, monkeypatch, name):
        self.calls = []
        real = getattr(normkit._ext, name)

        def spy(*args):
            self.calls.append([a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else None for a in args])
            return real(*args)

        monkeypatch.setattr(normkit._ext, name, spy)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_torch_tensor_read_and_written_in_place(torch, rng, monkeypatch, dtype_name):
    """The kernel reads x's own memory, and the tensor returned is the array it wrote."""
    x = _tensor(torch, rng.standard_normal((6, 16)).astype(np.float32).astype(np_dtype(dtype_name)))
    spy = _Spy(monkeypatch, "layer_norm")
    y, mean, rstd = normkit.layer_norm(x, 16, return_stats=True)
    (args,) = spy.calls
    # _ext.layer_norm(x, y, shape, weight, bias, eps, mean, rstd, bf16)
    assert args[0] == x.data_ptr()
    assert args[1] == y.data_ptr() and args[6] == mean.data_ptr() and args[7] == rstd.data_ptr()

    c = _tensor(torch, rng.standard_normal((2, 5, 3, 4)).astype(np.float32)).permute(0, 2, 3, 1)  # NHWC view
    c = c.contiguous()
    spy = _Spy(monkeypatch, "group_norm")
    y = normkit.group_norm(c, 5, layout="NHWC")
    assert spy.calls[0][0] == c.data_ptr() and spy.calls[0][1] == y.data_ptr()


def test_torch_out_is_returned_and_written(torch, rng):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    expected = normkit.layer_norm(x, 16)
    out = torch.empty(6, 16)
    assert normkit.layer_norm(torch.from_numpy(x), 16, out=out) is out
    assert same_bits(out.numpy(), expected)
    # a strided torch out (a transposed view): written through
    base = torch.zeros(16, 6)
    view = base.t()
    assert normkit.layer_norm(torch.from_numpy(x), 16, out=view) is view
    assert same_bits(base.t().numpy(), expected)
    # NumPy x, torch out: the out comes back as itself, the statistics as NumPy (they follow x)
    out = torch.empty(6, 16)
    y, mean, _ = normkit.layer_norm(x, 16, out=out, return_stats=True)
    assert y is out and type(mean) is np.ndarray
    # torch x, NumPy out: the out as itself, the statistics as torch
    out_np = np.empty_like(x)
    y, mean, _ = normkit.layer_norm(torch.from_numpy(x), 16, out=out_np, return_stats=True)
    assert y is out_np and isinstance(mean, torch.Tensor)
    # in place: out=x
    t = torch.from_numpy(x.copy())
    assert normkit.layer_norm(t, 16, out=t) is t and same_bits(t.numpy(), expected)
    # add_rms_norm's two outputs
    s_out, y_out = torch.empty(6, 16), torch.empty(6, 16)
    y, s = normkit.add_rms_norm(torch.from_numpy(x), torch.from_numpy(x), 16, out=y_out, sum_out=s_out)
    assert y is y_out and s is s_out
    assert same_bits(s.numpy(), x + x)


def test_mixed_kinds_follow_x(torch, rng):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    expected = normkit.layer_norm(x, 16, w)
    y = normkit.layer_norm(x, 16, torch.from_numpy(w))
    assert type(y) is np.ndarray and same_bits(y, expected)
    y = normkit.layer_norm(torch.from_numpy(x), 16, w)
    assert isinstance(y, torch.Tensor) and same_bits(y.numpy(), expected)


def test_torch_non_contiguous_input(torch, rng):
    base = torch.from_numpy(rng.standard_normal((16, 6)).astype(np.float32))
    x = base.t()  # strided
    y = normkit.layer_norm(x, 16)
    assert isinstance(y, torch.Tensor) and same_bits(y.numpy(), normkit.layer_norm(x.numpy(), 16))
    c = torch.from_numpy(rng.standard_normal((2, 4, 3, 5)).astype(np.float32)).to(memory_format=torch.channels_last)
    y = normkit.batch_norm(c, None, None, training=True)  # NCHW dims, NHWC memory: copied once
    assert same_bits(y.numpy(), normkit.batch_norm(np.ascontiguousarray(c.numpy()), None, None, training=True))


# ------------------------------------------------------------------ other DLPack and buffer objects


class _Namespace:
    """A minimal Array API namespace: from_dlpack gives its own arrays."""

    @staticmethod
    def from_dlpack(a):
        return NamespacedArray(np.from_dlpack(a))

    @staticmethod
    def asarray(a):
        return NamespacedArray(np.asarray(a))


class NamespacedArray(DLPackOnly):
    def __array_namespace__(self, api_version=None):
        return _Namespace


def _address(a):
    return a.__array_interface__["data"][0]


def test_dlpack_only_object_read_in_place(rng, monkeypatch):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    spy = _Spy(monkeypatch, "layer_norm")
    y = normkit.layer_norm(DLPackOnly(x), 16)
    assert type(y) is np.ndarray and same_bits(y, normkit.layer_norm(x, 16))
    assert spy.calls[0][0] == _address(x)


def test_dlpack_bfloat16_object(torch, rng, monkeypatch):
    """bfloat16 through DLPack (NumPy's own from_dlpack refuses it): a torch tensor's capsule."""
    xb = rng.standard_normal((6, 16)).astype(np.float32).astype(np_dtype("bfloat16"))
    t = _tensor(torch, xb)
    spy = _Spy(monkeypatch, "layer_norm")
    y = normkit.layer_norm(DLPackOnly(t), 16)
    assert y.dtype == np_dtype("bfloat16") and same_bits(y, normkit.layer_norm(xb, 16))
    assert spy.calls[0][0] == t.data_ptr()


def test_array_namespace_object_comes_back_in_its_kind(rng):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    y, mean, rstd = normkit.layer_norm(NamespacedArray(x), 16, return_stats=True)
    assert all(type(r) is NamespacedArray for r in (y, mean, rstd))
    assert same_bits(np.from_dlpack(y), normkit.layer_norm(x, 16))


def test_dlpack_out_written_in_place(rng):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    target = np.zeros_like(x)
    out = DLPackOnly(target)
    assert normkit.layer_norm(x, 16, out=out) is out
    assert same_bits(target, normkit.layer_norm(x, 16))


def test_capsule_is_read_once(rng):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    capsule = x.__dlpack__()
    assert same_bits(normkit.layer_norm(capsule, 16), normkit.layer_norm(x, 16))
    raises_prefixed(ValueError, "x: is a DLPack capsule that was already consumed",
                    lambda: normkit.layer_norm(capsule, 16))


def test_buffer_protocol_objects(rng, monkeypatch):
    x = rng.standard_normal((6, 16)).astype(np.float32)
    spy = _Spy(monkeypatch, "layer_norm")
    y = normkit.layer_norm(memoryview(x), 16)
    assert same_bits(y, normkit.layer_norm(x, 16)) and spy.calls[0][0] == _address(x)
    flat = array.array("f", x.ravel().tolist())
    assert same_bits(normkit.layer_norm(flat, 96), normkit.layer_norm(x.ravel(), 96))
    target = np.zeros_like(x)
    normkit.layer_norm(x, 16, out=memoryview(target))
    assert same_bits(target, normkit.layer_norm(x, 16))


# ------------------------------------------------------------------ bad input


def test_torch_bad_input(torch):
    x = torch.randn(6, 16)
    raises_prefixed(ValueError, "x: requires grad, and normkit's plain functions record no autograd",
                    lambda: normkit.layer_norm(x.clone().requires_grad_(), 16))
    raises_prefixed(ValueError, "weight: requires grad",
                    lambda: normkit.layer_norm(x, 16, torch.nn.Parameter(torch.ones(16))))
    raises_prefixed(ValueError, "x: is a meta tensor",
                    lambda: normkit.layer_norm(torch.empty(6, 16, device="meta"), 16))
    raises_prefixed(TypeError, "x: expected a floating-point array",
                    lambda: normkit.layer_norm(torch.ones(6, 16, dtype=torch.int32), 16))
    raises_prefixed(TypeError, "out: expected dtype float32 like x",
                    lambda: normkit.layer_norm(x, 16, out=torch.empty(6, 16, dtype=torch.float64)))
    raises_prefixed(ValueError, "out: expected the shape of x",
                    lambda: normkit.layer_norm(x, 16, out=torch.empty(6, 15)))
    raises_prefixed(TypeError, "running_mean: expected an array",
                    lambda: normkit.batch_norm(torch.randn(2, 4, 3), [0.0] * 4, torch.ones(4), training=True))
    raises_prefixed(ValueError, "out: requires grad",
                    lambda: normkit.layer_norm(x, 16, out=torch.empty(6, 16, requires_grad=True)))
    raises_prefixed(TypeError, "x: expected a float tensor normkit takes",
                    lambda: normkit.layer_norm(torch.ones(6, 16, dtype=torch.complex64).conj(), 16))
    # nothing the caller passed was modified by the failed calls
    assert not x.requires_grad

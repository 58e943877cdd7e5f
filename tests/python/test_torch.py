"""normkit.torch against torch.nn (tests/python/test_torch_compile.py has torch.compile).

- every module next to its torch.nn twin, built from the same state dict, over three training
  steps (outputs, input gradients, weight/bias gradients, running statistics,
  num_batches_tracked) and then in eval; float32/float64 tight, float16/bfloat16 against
  torch.nn run in float64 on the same (rounded) inputs with 16-bit tolerances; contiguous and
  channels_last (whose memory format the output keeps);
- torch.autograd.gradcheck of every operator in float64;
- replace_norms / restore_norms: the same Parameter objects, mode, outputs, state dict;
- double backward is an error, not a wrong answer; bad input names the argument; meta tensors
  get shapes from the fake implementations;
- ``import normkit`` does not import torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
nt = pytest.importorskip("normkit.torch")
nn = torch.nn

# (name, make(cls_namespace, dtype), input shape)
MODULES = [
    ("LayerNorm", lambda m, dt: m.LayerNorm((5, 6), dtype=dt), (4, 3, 5, 6)),
    ("LayerNorm-nobias", lambda m, dt: m.LayerNorm(6, bias=False, dtype=dt), (4, 3, 6)),
    ("LayerNorm-noaffine", lambda m, dt: m.LayerNorm(6, elementwise_affine=False, dtype=dt), (4, 6)),
    ("RMSNorm", lambda m, dt: m.RMSNorm(6, dtype=dt), (4, 3, 6)),
    ("RMSNorm-eps", lambda m, dt: m.RMSNorm((3, 6), eps=1e-5, dtype=dt), (4, 3, 6)),
    ("GroupNorm", lambda m, dt: m.GroupNorm(2, 6, dtype=dt), (3, 6, 4, 5)),
    ("GroupNorm-3d", lambda m, dt: m.GroupNorm(3, 6, affine=False, dtype=dt), (2, 6, 7)),
    ("BatchNorm1d", lambda m, dt: m.BatchNorm1d(6, dtype=dt), (5, 6)),
    ("BatchNorm1d-NCL", lambda m, dt: m.BatchNorm1d(6, momentum=None, dtype=dt), (5, 6, 7)),
    ("BatchNorm2d", lambda m, dt: m.BatchNorm2d(6, dtype=dt), (3, 6, 4, 5)),
    ("BatchNorm2d-nostats", lambda m, dt: m.BatchNorm2d(6, track_running_stats=False, dtype=dt), (3, 6, 4, 5)),
    ("BatchNorm3d", lambda m, dt: m.BatchNorm3d(6, affine=False, dtype=dt), (2, 6, 3, 4, 2)),
    ("InstanceNorm1d", lambda m, dt: m.InstanceNorm1d(6, dtype=dt), (3, 6, 7)),
    ("InstanceNorm1d-unbatched", lambda m, dt: m.InstanceNorm1d(6, affine=True, dtype=dt), (6, 7)),
    ("InstanceNorm2d", lambda m, dt: m.InstanceNorm2d(6, affine=True, track_running_stats=True, dtype=dt),
     (3, 6, 4, 5)),
    ("InstanceNorm3d", lambda m, dt: m.InstanceNorm3d(6, affine=True, dtype=dt), (2, 6, 3, 4, 2)),
]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]


def _close(a, b, dtype, what):
    a, b = a.double(), b.double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    assert err <= _tol(dtype) * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _randomize(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 1)


# channels_last for the 4-D/5-D inputs only
MODULE_CASES = [pytest.param(name, make, shape, cl, id=f"{name}-{'channels_last' if cl else 'contiguous'}")
                for name, make, shape in MODULES for cl in ((False, True) if len(shape) in (4, 5) else (False,))]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name,make,shape,channels_last", MODULE_CASES)
def test_module_matches_torch_nn(name, make, shape, channels_last, dtype_name):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(7)
    ref_dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16) else dtype
    ours, ref = make(nt, dtype), make(nn, ref_dtype)
    assert type(ours).__name__ == type(ref).__name__ and isinstance(ours, type(ref))
    _randomize(ref, gen)
    ours.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if channels_last else None
    for step in range(4):
        if step == 3:
            ours.eval(), ref.eval()
        x = (torch.randn(shape, generator=gen) * 2 + (5 if step == 1 else 0.5)).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=gen).to(dtype)
        x_ours = x.clone().requires_grad_()
        x_ref = x.to(ref_dtype).requires_grad_()
        y, y_ref = ours(x_ours), ref(x_ref)
        assert y.dtype == dtype and y.shape == y_ref.shape
        if fmt is not None and "Norm" in name and not name.startswith(("LayerNorm", "RMSNorm")):
            assert y.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"
        _close(y, y_ref, dtype, f"step {step} y")
        y.backward(dy)
        y_ref.backward(dy.to(ref_dtype))
        _close(x_ours.grad, x_ref.grad, dtype, f"step {step} dx")
        for (pname, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
            assert p.grad.dtype == p.dtype
            _close(p.grad, p_ref.grad, dtype, f"step {step} d{pname}")
            p.grad = p_ref.grad = None
        for (bname, b), b_ref in zip(ours.named_buffers(), ref.buffers()):
            if b.is_floating_point():
                _close(b, b_ref, dtype, f"step {step} {bname}")
            else:
                assert torch.equal(b, b_ref), bname


OPS = [
    ("layer_norm", lambda x, w, b: nt.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5)),
    ("rms_norm", lambda x, w, b: nt.functional.rms_norm(x, (x.shape[-1],), w, 1e-6)),
    ("group_norm", lambda x, w, b: nt.functional.group_norm(x, 2, w, b)),
    ("batch_norm", lambda x, w, b: nt.functional.batch_norm(x, None, None, w, b, training=True)),
    ("batch_norm_eval", lambda x, w, b: nt.functional.batch_norm(
        x, torch.linspace(-1, 1, 4, dtype=x.dtype), torch.linspace(0.5, 2, 4, dtype=x.dtype), w, b, training=False)),
    ("instance_norm", lambda x, w, b: nt.functional.instance_norm(x, weight=w, bias=b)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name,op", OPS, ids=[o[0] for o in OPS])
def test_gradcheck_float64(name, op, channels_last):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 4, 3, 4, generator=gen, dtype=torch.float64) + 0.5)
    if name in ("layer_norm", "rms_norm"):
        x = x.reshape(6, 24)[:, :8].contiguous()
        w, b = (torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(2))
    else:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = (torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(op, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_replace_and_restore_norms_keep_state():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.GroupNorm(2, 8),
                          nn.Sequential(nn.Flatten(), nn.LayerNorm(8 * 6 * 6), nn.Linear(288, 4)))
    model.eval()
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert nt.replace_norms(model) is model
    assert type(model[1]) is nt.BatchNorm2d and type(model[3]) is nt.GroupNorm and type(model[4][1]) is nt.LayerNorm
    assert not model[1].training  # the mode is kept
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    model(x).sum().backward()
    optimizer.step()  # the optimizer made before the swap updates the swapped modules' parameters
    assert not torch.equal(model[1].weight, state["1.weight"])
    assert model[1].num_batches_tracked.item() == 1
    assert nt.restore_norms(model) is model
    assert type(model[1]) is nn.BatchNorm2d and type(model[4][1]) is nn.LayerNorm
    assert all(p is params[n] for n, p in model.named_parameters())
    # exact types only: a user's subclass of a torch norm stays as it is
    class MyNorm(nn.LayerNorm):
        pass
    assert type(nt.replace_norms(nn.Sequential(MyNorm(4)))[0]) is MyNorm
    # a model that is itself a norm: its twin comes back
    twin = nt.replace_norms(nn.LayerNorm(4))
    assert type(twin) is nt.LayerNorm


def test_double_backward_is_an_error():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = nt.functional.layer_norm(x, (8,))
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_bad_input_names_the_argument():
    # a meta tensor is shape propagation, as for torch's own operators: the fake implementation answers
    y = nt.functional.group_norm(torch.empty(2, 6, 3, 4, device="meta").to(memory_format=torch.channels_last), 3)
    assert y.device.type == "meta" and y.shape == (2, 6, 3, 4) and y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="^normalized_shape:"):
        nt.LayerNorm(5)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="^num_groups:"):
        nt.functional.group_norm(torch.randn(2, 6, 3), 4)
    with pytest.raises(ValueError, match="^input: expected 2 to 5 dims"):
        nt.functional.group_norm(torch.randn(1, 2, 1, 1, 1, 1), 1)
    with pytest.raises(ValueError, match="expected 2D or 3D input"):  # torch.nn's own input check, kept
        nt.BatchNorm1d(4)(torch.randn(2, 4, 3, 3))


def test_import_normkit_does_not_import_torch():
    code = "import sys, normkit; assert 'torch' not in sys.modules, 'import normkit imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr

"""Layer objects built with ``activation=``: forward (fused in eval, pre-activation
kept in training) and backward through the activation, against torch autograd in
float64 (the oracle) and against the functional forms; repr, pickle and errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import normkit
from helpers import raises_prefixed

ACTIVATIONS = ["relu", "silu", "gelu", "gelu_tanh"]

# (normkit class, its constructor arguments, the torch module factory, x's shape)
LAYERS = [
    ("BatchNorm", dict(num_features=6), lambda nn: nn.BatchNorm2d(6), (4, 6, 5, 5)),
    ("GroupNorm", dict(num_groups=3, num_channels=6), lambda nn: nn.GroupNorm(3, 6), (4, 6, 5, 5)),
    ("InstanceNorm", dict(num_features=6, affine=True), lambda nn: nn.InstanceNorm2d(6, affine=True), (4, 6, 5, 5)),
    ("LayerNorm", dict(normalized_shape=7), lambda nn: nn.LayerNorm([7]), (3, 5, 7)),
    ("RMSNorm", dict(normalized_shape=7), lambda nn: nn.RMSNorm([7]), (3, 5, 7)),
]


def _torch_activation(torch, name):
    f = torch.nn.functional
    return {"relu": f.relu, "silu": f.silu, "gelu": f.gelu,
            "gelu_tanh": lambda t: f.gelu(t, approximate="tanh")}[name]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("name,kwargs,make_torch,shape", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_training_step_matches_torch_autograd(name, kwargs, make_torch, shape, activation, rng):
    torch = pytest.importorskip("torch")
    module = make_torch(torch.nn).double()
    layer = getattr(normkit, name)(**kwargs, dtype=np.float64, activation=activation)
    with torch.no_grad():
        for key in ("weight", "bias"):
            param = getattr(module, key, None)
            if param is not None:
                value = rng.standard_normal(tuple(param.shape))
                param.copy_(torch.tensor(value))
                setattr(layer, key, value)
    x = rng.standard_normal(shape) * 2 + 0.5
    dy = rng.standard_normal(shape)
    y = layer(x)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = _torch_activation(torch, activation)(module(xt))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=1e-11)
    if module.weight is not None:
        np.testing.assert_allclose(layer.grad_weight, module.weight.grad.numpy(), rtol=0, atol=1e-11)
    layer.eval()
    module.eval()
    with torch.no_grad():
        expected = _torch_activation(torch, activation)(module(torch.tensor(x))).numpy()
    np.testing.assert_allclose(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_eval_forward_is_the_functional_form(activation, rng, kernel_path):
    x = rng.standard_normal((2, 8, 9, 4)).astype(np.float32)
    gn = normkit.GroupNorm(4, 8, activation=activation)
    gn.eval()
    assert np.array_equal(gn(x), normkit.group_norm(x, 4, gn.weight, gn.bias, activation=activation))
    ln = normkit.LayerNorm(4, activation=activation)
    ln.eval()
    assert np.array_equal(ln(x), normkit.layer_norm(x, 4, ln.weight, ln.bias, activation=activation))


def test_repr_pickle_and_errors():
    layer = normkit.BatchNorm(4, activation="silu", layout="NHWC")
    assert layer.activation == "silu"
    assert "activation='silu'" in repr(layer)
    again = pickle.loads(pickle.dumps(layer))
    assert again.activation == "silu" and type(again) is normkit.BatchNorm
    assert normkit.LayerNorm(3).activation is None
    raises_prefixed(ValueError, "activation:", lambda: normkit.LayerNorm(3, activation="tanh"))
    raises_prefixed(TypeError, "activation:", lambda: normkit.RMSNorm(3, activation=1))

"""normalize (torch.nn.functional.normalize / ONNX LpNormalization), normalize_backward
and mean_variance_norm (ONNX MeanVarianceNormalization), on every kernel path.

References are float64, written plainly here; PyTorch (forward and autograd) where it
is installed; ONNX's own operator test cases and its ReferenceEvaluator where the
onnx package is installed (pip install normkit[test]). Both norms are mappings onto
the existing rows/columns kernels (cpp/src/plan/axis_plan.hpp): every dim / set of
axes below takes a different mapping (rows, columns, merged runs).
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from helpers import DTYPE_NAMES, UNIT_VAR_TOL, assert_close, make_x, np_dtype, raises_named

PS = [2.0, 1.0, 3.0, 1.5, float("inf")]
# rows ([K, R]), columns ([R, K], [K, R, K]) and merged runs ([R, K, R], [K, R, K, R], ...).
AXES_SETS = [(0, 2, 3), (3,), (2, 3), (0,), (1,), (0, 1, 2, 3), (1, 3), (0, 2), (-1, 0), (1, 2), (0, 1)]


# --------------------------------------------------------------------------- references


def _norm_ref(x, p, dim):
    a = np.abs(np.asarray(x, np.float64))
    if np.isinf(p):
        return a.max(axis=dim, keepdims=True)
    return (a**p).sum(axis=dim, keepdims=True) ** (1.0 / p)


def normalize_ref(x, p=2.0, dim=-1, eps=1e-12):
    x = np.asarray(x, np.float64)
    den = np.maximum(_norm_ref(x, p, dim), eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den == 0, 0.0, x / den)


def normalize_backward_ref(dy, x, p=2.0, dim=-1, eps=1e-12):
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    n = _norm_ref(x, p, dim)
    den = np.maximum(n, eps)
    dot = (dy * x).sum(axis=dim, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        if np.isinf(p):
            mask = np.abs(x) == n
            g = np.sign(x) * mask / mask.sum(axis=dim, keepdims=True)
        else:
            g = np.sign(x) * (np.abs(x) / n) ** (p - 1)
        through = dy / den - g * dot / den**2
        dx = np.where((n >= eps) & (n > 0), through, dy / den)
        return np.where(den == 0, 0.0, dx)


def mvn_ref(x, axes=(0, 2, 3), eps=1e-9):
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True))
    den = std + eps
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den == 0, 0.0, (x - mean) / den)


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("p", PS)
def test_normalize_every_dim_matches_float64(kernel_path, dtype, p, rng):
    x = make_x(rng, (3, 4, 37), np_dtype(dtype))
    for dim in (-1, 0, 1, 2, -2):
        y = normkit.normalize(x, p, dim)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert_close(y, normalize_ref(x, p, dim), x.dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalize_long_rows_and_columns(kernel_path, threads, dtype, rng):
    x = make_x(rng, (4, 9000), np.dtype(dtype))  # several statistics chunks per row
    assert_close(normkit.normalize(x), normalize_ref(x), x.dtype)
    x = make_x(rng, (2, 5000, 3), np.dtype(dtype))  # several row blocks per column
    assert_close(normkit.normalize(x, dim=1), normalize_ref(x, dim=1), x.dtype)


def test_normalize_default_is_l2_over_last_dim_like_torch(torch, kernel_path, rng):
    x = make_x(rng, (8, 384), np.float32)  # a batch of sentence embeddings
    want = torch.nn.functional.normalize(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(normkit.normalize(x), want, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, float("inf")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_normalize_and_backward_match_torch_autograd(torch, kernel_path, p, dtype, rng):
    x = make_x(rng, (3, 5, 6), np.dtype(dtype))
    dy = make_x(rng, x.shape, np.dtype(dtype), loc=0.0, scale=1.0)
    x[0, 0, :] = 0.0  # a zero slice along dim -1 (clamped: dx = dy / eps)
    for dim in (-1, 0, 1):
        for eps in (1e-12, 0.5):  # 0.5: some norms below eps
            xt = torch.from_numpy(x.copy()).requires_grad_(True)
            yt = torch.nn.functional.normalize(xt, p=p, dim=dim, eps=eps)
            yt.backward(torch.from_numpy(dy))
            tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-11, atol=1e-11)
            np.testing.assert_allclose(normkit.normalize(x, p, dim, eps), yt.detach().numpy(), **tol)
            dx = normkit.normalize_backward(dy, x, p, dim, eps)
            assert dx.dtype == x.dtype and dx.shape == x.shape
            np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, float("inf")])
def test_normalize_backward_matches_float64(kernel_path, dtype, p, rng):
    x = make_x(rng, (4, 3, 10), np_dtype(dtype))
    dy = make_x(rng, x.shape, np_dtype(dtype), loc=0.0, scale=1.0)
    for dim in (-1, 1, 0):
        dx = normkit.normalize_backward(dy, x, p, dim)
        want = normalize_backward_ref(dy, x, p, dim)
        tol32 = 3e-5 if dtype == "float32" else 3e-3
        assert_close(dx, want, x.dtype, what="dx", tol32=tol32)


def test_normalize_eps_zero_zero_slice_gives_zeros(kernel_path):
    # ONNX LpNormalization's reference gives 0 there; torch would give 0/0 = NaN.
    x = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], np.float32)
    for p in PS:
        y = normkit.normalize(x, p, eps=0.0)
        assert np.array_equal(y[0], np.zeros(3, np.float32)), p
        assert not np.isnan(y).any()
    dx = normkit.normalize_backward(np.ones_like(x), x, eps=0.0)
    assert np.array_equal(dx[0], np.zeros(3, np.float32))
    # tiny eps (1/eps overflows float32): still zeros, not 0 * inf
    assert np.array_equal(normkit.normalize(x, eps=1e-45)[0], np.zeros(3, np.float32))


def test_normalize_non_finite_like_torch(torch, kernel_path):
    x = np.array([[1.0, np.nan, 2.0], [1.0, np.inf, -2.0], [1e20, 1e20, -1e20]], np.float32)
    for p in (2.0, 1.0, 3.0, float("inf")):
        y = normkit.normalize(x, p)
        want = torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float64)), p=p).numpy()
        np.testing.assert_allclose(y, want.astype(np.float32), rtol=1e-6, atol=0)  # NaN where torch has NaN


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_normalize_hostile_magnitudes(kernel_path, dtype, rng):
    dt = np_dtype(dtype)
    big = (1e4 + 1e-2 * rng.standard_normal((4, 300))).astype(dt)  # huge mean, tiny spread
    for dim in (0, 1):
        assert_close(normkit.normalize(big, dim=dim), normalize_ref(big, dim=dim), dt)
    if dtype == "float32":
        tiny = np.array([[3e-41, 4e-41], [1e-30, -1e-30]], np.float32)  # squares underflow float32
        np.testing.assert_allclose(normkit.normalize(tiny, eps=0.0), normalize_ref(tiny, eps=0.0), rtol=1e-5)
        huge = np.array([[3e38, -3e38, 1e38]], np.float32)  # squares overflow float32
        np.testing.assert_allclose(normkit.normalize(huge), normalize_ref(huge), rtol=1e-6)


def test_normalize_size_one_and_empty_dims(kernel_path):
    x = np.array([[3.0], [-4.0], [0.0]], np.float32)
    np.testing.assert_array_equal(normkit.normalize(x, dim=1), [[1.0], [-1.0], [0.0]])
    np.testing.assert_allclose(normkit.normalize(x, dim=0), x / 5.0)
    for shape, dim in (((0, 3), 0), ((0, 3), 1), ((2, 0), 1), ((2, 0, 4), 0)):
        e = np.ones(shape, np.float32)
        y = normkit.normalize(e, dim=dim)
        assert y.shape == shape and y.dtype == e.dtype
        assert normkit.normalize_backward(e, e, dim=dim).shape == shape


def test_normalize_out_in_place_strided_and_inputs_untouched(kernel_path, rng):
    x = make_x(rng, (6, 8), np.float32)
    keep = x.copy()
    want = normalize_ref(x, dim=0)
    out = np.empty_like(x)
    assert normkit.normalize(x, dim=0, out=out) is out
    assert_close(out, want, x.dtype)
    assert np.array_equal(x, keep)
    xt = np.asfortranarray(x)  # copied once to C order
    assert_close(normkit.normalize(xt, dim=0), want, x.dtype)
    strided_out = np.empty((8, 6), np.float32).T  # out the core cannot write: filled once after
    assert normkit.normalize(x, dim=0, out=strided_out) is strided_out
    assert_close(strided_out, want, x.dtype)
    inplace = x.copy()
    assert normkit.normalize(inplace, dim=0, out=inplace) is inplace
    assert_close(inplace, want, x.dtype)
    dy = make_x(rng, x.shape, np.float32)
    keep_dy = dy.copy()
    normkit.normalize_backward(dy, x, dim=1)
    assert np.array_equal(dy, keep_dy) and np.array_equal(x, keep)


def test_normalize_errors():
    x = np.ones((2, 3), np.float32)
    raises_named(ValueError, "p:", lambda: normkit.normalize(x, 0.5))
    raises_named(ValueError, "p:", lambda: normkit.normalize(x, float("nan")))
    raises_named(TypeError, "p:", lambda: normkit.normalize(x, "2"))
    raises_named(ValueError, "dim:", lambda: normkit.normalize(x, dim=2))
    raises_named(ValueError, "dim:", lambda: normkit.normalize(x, dim=-3))
    raises_named(ValueError, "dim:", lambda: normkit.normalize(x, dim=2**40))
    raises_named(TypeError, "dim:", lambda: normkit.normalize(x, dim=1.0))
    raises_named(ValueError, "dim:", lambda: normkit.normalize(np.float32(1.0)))
    raises_named(ValueError, "eps:", lambda: normkit.normalize(x, eps=-1.0))
    raises_named(ValueError, "out:", lambda: normkit.normalize(x, out=np.empty((3, 2), np.float32)))
    raises_named(TypeError, "out:", lambda: normkit.normalize(x, out=np.empty((2, 3), np.float64)))
    raises_named(TypeError, "x:", lambda: normkit.normalize(x.astype(np.int32)))
    raises_named(ValueError, "dy:", lambda: normkit.normalize_backward(np.ones((3, 2), np.float32), x))
    raises_named(TypeError, "dy:", lambda: normkit.normalize_backward(x.astype(np.float64), x))
    raises_named(ValueError, "p:", lambda: normkit.normalize_backward(x, x, p=0.0))


# --------------------------------------------------------------------------- mean_variance_norm


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("axes", AXES_SETS, ids=str)
def test_mvn_any_axes_matches_float64(kernel_path, dtype, axes, rng):
    x = make_x(rng, (3, 4, 5, 6), np_dtype(dtype))
    y = normkit.mean_variance_norm(x, axes)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, mvn_ref(x, axes), x.dtype, tol32=3e-5)


def test_mvn_default_axes_and_threads(kernel_path, threads, rng):
    x = make_x(rng, (4, 8, 30, 30), np.float32)
    assert_close(normkit.mean_variance_norm(x), mvn_ref(x), x.dtype)
    x = make_x(rng, (2, 3000, 3), np.float32)
    assert_close(normkit.mean_variance_norm(x, 1), mvn_ref(x, (1,)), x.dtype)


@pytest.mark.parametrize("axes", [(0, 2, 3), (3,), (0,)], ids=str)
def test_mvn_stable_statistics_for_a_large_mean(kernel_path, axes, rng):
    # mean 1e4, spread 1e-2 in float32: ONNX's E[x^2] - E[x]^2 loses every digit of
    # the variance; the kernels' shifted moments keep unit variance.
    x = (1e4 + 1e-2 * rng.standard_normal((4, 3, 8, 8))).astype(np.float32)
    y = normkit.mean_variance_norm(x, axes).astype(np.float64)
    assert_close(y, mvn_ref(x, axes), x.dtype, tol32=2e-3)
    assert np.all(np.abs(y.var(axis=axes) - 1.0) < UNIT_VAR_TOL)
    xf = x.astype(np.float32)
    naive_var = (xf**2).mean(axis=axes) - xf.mean(axis=axes) ** 2  # ONNX's formula, in float32
    assert np.any(np.abs(naive_var - x.astype(np.float64).var(axis=axes)) > 1e-4)  # it really is hostile


def test_mvn_constant_nan_size_one_empty(kernel_path):
    x = np.array([[2.0, 2.0, 2.0], [1.0, np.nan, 3.0]], np.float32)
    for eps in (0.0, 1e-9):
        y = normkit.mean_variance_norm(x, 1, eps)
        assert np.array_equal(y[0], np.zeros(3, np.float32))  # constant: zeros, not 0/0
        assert np.isnan(y[1]).all()
    np.testing.assert_array_equal(normkit.mean_variance_norm(np.ones((3, 1), np.float32), (1,)), np.zeros((3, 1)))
    e = np.ones((0, 3, 2, 2), np.float32)
    assert normkit.mean_variance_norm(e).shape == e.shape


def test_mvn_out_in_place_and_strided(kernel_path, rng):
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    keep = x.copy()
    want = mvn_ref(x)
    out = np.empty_like(x)
    assert normkit.mean_variance_norm(x, out=out) is out
    assert_close(out, want, x.dtype)
    assert np.array_equal(x, keep)
    t = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # NHWC data, seen as NCHW strided: one copy
    assert_close(normkit.mean_variance_norm(np.moveaxis(t, -1, 1)), want, x.dtype)
    inplace = x.copy()
    normkit.mean_variance_norm(inplace, out=inplace)
    assert_close(inplace, want, x.dtype)


def test_mvn_errors():
    x = np.ones((2, 3, 4), np.float32)
    raises_named(ValueError, "axes:", lambda: normkit.mean_variance_norm(x))  # (0, 2, 3) on rank 3
    raises_named(ValueError, "axes:", lambda: normkit.mean_variance_norm(x, (0, -3)))
    raises_named(ValueError, "axes:", lambda: normkit.mean_variance_norm(x, ()))
    raises_named(TypeError, "axes:", lambda: normkit.mean_variance_norm(x, (0.5,)))
    raises_named(ValueError, "eps:", lambda: normkit.mean_variance_norm(x, 1, float("inf")))
    raises_named(TypeError, "eps:", lambda: normkit.mean_variance_norm(x, 1, "small"))
    raises_named(ValueError, "out:", lambda: normkit.mean_variance_norm(x, 1, out=np.empty((2, 3), np.float32)))


# --------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_cases():
    """ONNX's own node test cases (inputs, outputs, attributes) for the two operators,
    from the generators the onnx package ships."""
    pytest.importorskip("onnx")
    import warnings

    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
    ops = ("LpNormalization", "MeanVarianceNormalization")
    return [c for c in cases if c.model.graph.node[0].op_type in ops]


def _attributes(node_proto):
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node_proto.attribute}


def _normkit_for(node_proto, x):
    attrs = _attributes(node_proto)
    if node_proto.op_type == "LpNormalization":
        # eps=0: ONNX divides by the norm itself (its reference gives 0 for a zero norm).
        return normkit.normalize(x, float(attrs.get("p", 2)), int(attrs.get("axis", -1)), eps=0.0)
    return normkit.mean_variance_norm(x, tuple(attrs.get("axes", (0, 2, 3))))


def _evaluate(model, x):
    from onnx.reference import ReferenceEvaluator

    with np.errstate(invalid="ignore", divide="ignore"):  # its x / norm before np.where picks 0
        return ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x})[0]


def test_onnx_node_test_cases(onnx_cases, kernel_path):
    names = {c.name for c in onnx_cases}
    assert {"test_mvn", "test_lpnormalization_default", "test_l2normalization_axis_0"} <= names
    for case in onnx_cases:
        for inputs, outputs in case.data_sets:
            x = inputs[0]
            y = _normkit_for(case.model.graph.node[0], x)
            np.testing.assert_allclose(y, outputs[0], rtol=1e-5, atol=1e-6, err_msg=case.name)
            np.testing.assert_allclose(y, _evaluate(case.model, x), rtol=1e-5, atol=1e-6, err_msg=case.name)


def _model(op, attrs, shape):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(op, ["x"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
@pytest.mark.parametrize("p", [1, 2])
def test_onnx_lp_normalization_reference_evaluator(onnx_cases, kernel_path, axis, p, rng):
    # Positive data: ONNX's reference computes sum(x**p) without abs, which for p=1
    # is the L1 norm only for non-negative x.
    x = np.abs(make_x(rng, (3, 4, 5), np.float32))
    x[0, 0, :] = 0.0
    x[:, 0, 0] = 0.0
    want = _evaluate(_model("LpNormalization", {"axis": axis, "p": p}, x.shape), x)
    np.testing.assert_allclose(normkit.normalize(x, p, axis, eps=0.0), want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("axes", [(0, 2, 3), (1,), (2, 3), (0, 1, 2, 3), (-1,), (0, 2)], ids=str)
def test_onnx_mean_variance_normalization_reference_evaluator(onnx_cases, kernel_path, axes, rng):
    x = make_x(rng, (2, 3, 4, 5), np.float32)
    want = _evaluate(_model("MeanVarianceNormalization", {"axes": list(axes)}, x.shape), x)
    # ONNX's E[x^2] - E[x]^2 in float32 costs it a few digits here; ours is float64-exact.
    np.testing.assert_allclose(normkit.mean_variance_norm(x, axes), want, rtol=1e-4, atol=1e-4)
    assert_close(normkit.mean_variance_norm(x, axes), mvn_ref(x, axes), x.dtype)

"""normkit.fold_batch_norm and BatchNorm.fold: an inference BatchNorm folded into
the convolution or linear layer before it.

- against torch.nn.utils.fusion.fuse_conv_bn_weights (skipped without torch) for
  conv2d, conv1d, linear and transposed convolutions with groups=1, where PyTorch
  is right;
- against `fold_reference` below, float64 loops written per group, for grouped
  transposed convolutions (groups 2, 4, depthwise) and grouped convolutions;
- the proof that matters (torch): conv (transposed or not, grouped) with the
  folded weights equals conv followed by BatchNorm in eval, computed by
  torch.nn.functional; and without torch, a linear layer followed by normkit's own
  BatchNorm;
- None for bias / bn_weight / bn_bias; every dtype (float32, float64, float16,
  bfloat16), the result being the float64 one rounded once; in place through the
  extension; lists and torch parameters as inputs; inputs never modified;
- bad inputs: ValueError / TypeError whose message starts with the argument's name.

Tolerances: against the reference, float64 results are equal to 1e-15 relative, the
others equal to the reference rounded to their dtype (bfloat16: within 1 ulp);
against PyTorch's float32 arithmetic 1e-6 relative (it rounds a few more times), and
1e-10 of the output's scale for float64 convolutions.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from helpers import DTYPE_NAMES, np_dtype, raises_named

# --------------------------------------------------------------------------- reference


def fold_reference(weight, bias, running_mean, running_var, eps, bn_weight, bn_bias, transpose=False, groups=1):
    """The fold in float64, one output channel at a time, written per group for
    transposed weights [C_in, C_out/groups, ...]: group g owns input rows
    g*(C_in/groups) ... and output channels g*(C_out/groups) + j, j = dim 1."""
    w = np.asarray(weight, np.float64)
    c_out = w.shape[1] * groups if transpose else w.shape[0]

    def vec(v, fill):
        return np.full(c_out, fill) if v is None else np.asarray(v, np.float64)

    b, m, var = vec(bias, 0.0), vec(running_mean, 0.0), vec(running_var, 1.0)
    gamma, beta = vec(bn_weight, 1.0), vec(bn_bias, 0.0)
    a = [gamma[c] / np.sqrt(var[c] + eps) for c in range(c_out)]
    folded_bias = np.array([(b[c] - m[c]) * a[c] + beta[c] for c in range(c_out)])
    folded = np.empty_like(w)
    if not transpose:
        for o in range(c_out):
            folded[o] = w[o] * a[o]
        return folded, folded_bias
    in_per_group, out_per_group = w.shape[0] // groups, w.shape[1]
    for g in range(groups):
        for r in range(in_per_group):
            row = g * in_per_group + r
            for j in range(out_per_group):
                folded[row, j] = w[row, j] * a[g * out_per_group + j]
    return folded, folded_bias


def make_problem(rng, shape, transpose=False, groups=1, dtype=np.float64):
    """weight, bias, running_mean, running_var, bn_weight, bn_bias of one layer."""
    c_out = shape[1] * groups if transpose else shape[0]
    weight = rng.standard_normal(shape).astype(dtype)
    vectors = [
        rng.standard_normal(c_out),  # bias
        rng.standard_normal(c_out),  # running_mean
        rng.uniform(0.1, 3.0, c_out),  # running_var
        rng.uniform(0.5, 2.0, c_out),  # bn_weight
        rng.standard_normal(c_out),  # bn_bias
    ]
    return [weight] + [v.astype(dtype) for v in vectors]


def call(problem, eps=1e-5, **kw):
    w, b, m, v, g, beta = problem
    return normkit.fold_batch_norm(w, b, m, v, eps, g, beta, **kw)


# --------------------------------------------------------------------------- float64 reference

CASES = [
    # (weight shape, transpose, groups)
    ((8, 3, 3, 3), False, 1),
    ((8, 2, 3, 3), False, 2),
    ((8, 1, 3, 3), False, 8),  # depthwise
    ((6, 4, 5), False, 3),
    ((5, 7), False, 1),  # linear
    ((4, 6, 3, 3), True, 1),
    ((8, 3, 3, 3), True, 2),
    ((8, 2, 4, 3), True, 4),
    ((12, 1, 3, 3), True, 12),  # depthwise transposed
    ((6, 5, 4), True, 2),  # conv_transpose1d
    ((4, 3, 2, 2, 2), True, 4),  # conv_transpose3d
    ((6, 4), True, 2),  # no spatial dims
]


@pytest.mark.parametrize("shape,transpose,groups", CASES, ids=[f"{s}-t{int(t)}-g{g}" for s, t, g in CASES])
def test_matches_reference(rng, shape, transpose, groups):
    problem = make_problem(rng, shape, transpose, groups)
    fw, fb = call(problem, 1e-3, transpose=transpose, groups=groups)
    rw, rb = fold_reference(*problem[:4], 1e-3, *problem[4:], transpose=transpose, groups=groups)
    assert fw.shape == shape and fw.dtype == np.float64
    assert fb.shape == (rb.size,) and fb.dtype == np.float64
    np.testing.assert_allclose(fw, rw, rtol=1e-15, atol=0)
    np.testing.assert_allclose(fb, rb, rtol=1e-15, atol=1e-15)


def test_grouped_transpose_is_not_dim1_scaling(rng):
    """The mapping PyTorch uses (scale dim 1 by a C_out vector) cannot even be
    applied for groups > 1: dim 1 has C_out/groups entries. Ours differs per group."""
    problem = make_problem(rng, (4, 3, 2, 2), True, 2)
    problem[0][:] = 1.0
    fw, _ = call(problem, transpose=True, groups=2)
    a = problem[4] / np.sqrt(problem[3] + 1e-5)
    np.testing.assert_allclose(fw[0, :, 0, 0], a[:3], rtol=1e-15)  # group 0: channels 0..2
    np.testing.assert_allclose(fw[2, :, 0, 0], a[3:], rtol=1e-15)  # group 1: channels 3..5


@pytest.mark.parametrize("transpose", [False, True])
def test_absent_vectors_are_zeros_ones_zeros(rng, transpose):
    w, _, m, v, _, _ = make_problem(rng, (6, 4, 3), transpose, 2)
    c = m.size
    fw1, fb1 = normkit.fold_batch_norm(w, None, m, v, 1e-5, None, None, transpose=transpose, groups=2)
    fw2, fb2 = normkit.fold_batch_norm(w, np.zeros(c), m, v, 1e-5, np.ones(c), np.zeros(c), transpose=transpose,
                                       groups=2)
    np.testing.assert_array_equal(fw1, fw2)
    np.testing.assert_array_equal(fb1, fb2)
    np.testing.assert_array_equal(fb1, -m * (1.0 / np.sqrt(v + 1e-5)))


def test_variance_minus_eps_gives_inf_and_nan():
    w = np.array([2.0, 3.0, 4.0])
    fw, fb = normkit.fold_batch_norm(w, None, np.zeros(3), np.array([-1e-5, -1e-5, -1.0]), 1e-5,
                                     np.array([1.0, 0.0, 1.0]), None)
    assert np.isposinf(fw[0]) and np.isnan(fw[1]) and np.isnan(fw[2])
    assert np.isnan(fb[0])  # 0 * inf


def test_empty_weight():
    fw, fb = normkit.fold_batch_norm(np.zeros((0, 2, 3)), None, np.zeros(4), np.ones(4), 0.0, None, None,
                                     transpose=True, groups=2)
    assert fw.shape == (0, 2, 3)
    np.testing.assert_array_equal(fb, np.zeros(4))


# --------------------------------------------------------------------------- dtypes


def _as(a, dtype):
    return None if a is None else a.astype(dtype)


@pytest.mark.parametrize("name", DTYPE_NAMES)
@pytest.mark.parametrize("vectors", ["same", "float32", "float64"])
def test_dtypes(rng, name, vectors):
    """The float64 fold of the values as given, rounded once to weight's dtype.
    BN vectors of another dtype are cast (to weight's, or float32 for 16-bit
    weights: float64 vectors then lose only float32 rounding)."""
    dtype = np_dtype(name)
    problem = make_problem(rng, (6, 2, 3, 3), True, 3)
    w = problem[0].astype(dtype)
    b = problem[1].astype(dtype)
    vec_dtype = dtype if vectors == "same" else np.dtype(vectors)
    bn = [p.astype(vec_dtype) for p in problem[2:]]
    fw, fb = normkit.fold_batch_norm(w, b, bn[0], bn[1], 1e-5, bn[2], bn[3], transpose=True, groups=3)
    assert fw.dtype == dtype and fb.dtype == dtype
    # What the core sees: the vectors cast as documented.
    core_vec = dtype if vec_dtype == dtype else (np.dtype(np.float32) if dtype.itemsize == 2 else dtype)
    seen = [p.astype(core_vec).astype(np.float64) for p in bn]
    rw, rb = fold_reference(w, b.astype(np.float64), seen[0], seen[1], 1e-5, seen[2], seen[3], True, 3)
    if name == "bfloat16":
        ulp = np.spacing(np.abs(rw).astype(np.float32)) * 2**16  # float32 spacing * 2^16 = bfloat16 spacing
        assert np.all(np.abs(fw.astype(np.float64) - rw) <= ulp)
        ulp = np.spacing(np.abs(rb).astype(np.float32)) * 2**16
        assert np.all(np.abs(fb.astype(np.float64) - rb) <= ulp)
    else:
        np.testing.assert_array_equal(fw, rw.astype(dtype))
        np.testing.assert_array_equal(fb, rb.astype(dtype))


def test_float16_rounds_once():
    """a = 1 + 2^-11 + 2^-40 is just above the float16 tie between 1 and 1 + 2^-10:
    rounding through float32 first would give 1."""
    a = 1.0 + 2.0**-11 + 2.0**-40
    fw, fb = normkit.fold_batch_norm(np.ones(1, np.float16), np.ones(1, np.float16), np.zeros(1, np.float32),
                                     np.zeros(1, np.float32), 1.0 / (a * a), None, None)
    assert fw[0] == np.float16(1 + 2.0**-10) and fb[0] == np.float16(1 + 2.0**-10)


def test_bias_cast_to_weight_dtype(rng):
    w, b, m, v, g, beta = make_problem(rng, (4, 3), dtype=np.float32)
    fw, fb = normkit.fold_batch_norm(w, b.astype(np.float64), m, v, 1e-5, g, beta)
    fw2, fb2 = normkit.fold_batch_norm(w, b, m, v, 1e-5, g, beta)
    np.testing.assert_array_equal(fb, fb2)
    assert fb.dtype == np.float32


def test_lists_and_non_contiguous(rng):
    problem = make_problem(rng, (3, 4), False, 1)
    w, b, m, v, g, beta = problem
    fw, fb = normkit.fold_batch_norm(w.tolist(), b.tolist(), m.tolist(), v.tolist(), 1e-5, g.tolist(),
                                     beta.tolist())
    rw, rb = call(problem)
    np.testing.assert_array_equal(fw, rw)
    np.testing.assert_array_equal(fb, rb)
    # A transposed view of a [4, 3] array is a non-contiguous [3, 4] weight.
    wt = np.ascontiguousarray(w.T).T
    assert not wt.flags.c_contiguous
    fw2, _ = normkit.fold_batch_norm(wt, b, m, v, 1e-5, g, beta)
    np.testing.assert_array_equal(fw2, rw)


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_inputs_unchanged(rng, name):
    dtype = np_dtype(name)
    problem = [p.astype(dtype) for p in make_problem(rng, (4, 2, 3, 3), True, 2)]
    before = [p.copy() for p in problem]
    fw, fb = call(problem, transpose=True, groups=2)
    for p, q in zip(problem, before):
        assert p.tobytes() == q.tobytes()
    assert not np.shares_memory(fw, problem[0]) and not np.shares_memory(fb, problem[1])


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_in_place_through_the_extension(rng, name):
    """The C++ core allows folded_weight = weight and folded_bias = bias."""
    dtype = np_dtype(name)
    problem = [p.astype(dtype) for p in make_problem(rng, (8, 2, 3), True, 4)]
    want_w, want_b = call(problem, transpose=True, groups=4)
    w, b, m, v, g, beta = problem
    bf16 = name == "bfloat16"
    view = (lambda a: a.view(np.uint16)) if bf16 else (lambda a: a)
    normkit._ext.fold_batch_norm(view(w), view(b), view(m), view(v), 1e-5, view(g), view(beta), view(w), view(b),
                                 True, 4, bf16)
    assert w.tobytes() == want_w.tobytes() and b.tobytes() == want_b.tobytes()


# --------------------------------------------------------------------------- the layer method


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_layer_fold(rng, affine):
    bn = normkit.BatchNorm(6, eps=1e-3, affine=affine)
    bn.running_mean = rng.standard_normal(6)
    bn.running_var = rng.uniform(0.5, 2.0, 6)
    if affine:
        bn.weight = rng.uniform(0.5, 2.0, 6)
        bn.bias = rng.standard_normal(6)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    state = {k: np.copy(v) for k, v in bn.state_dict().items()}
    fw, fb = bn.fold(w, b, transpose=True, groups=2)
    want = normkit.fold_batch_norm(w, b, bn.running_mean, bn.running_var, 1e-3, bn.weight, bn.bias,
                                   transpose=True, groups=2)
    np.testing.assert_array_equal(fw, want[0])
    np.testing.assert_array_equal(fb, want[1])
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    fw0, fb0 = bn.fold(w, transpose=True, groups=2)  # no bias
    np.testing.assert_array_equal(fb0, normkit.fold_batch_norm(w, None, bn.running_mean, bn.running_var, 1e-3,
                                                               bn.weight, bn.bias, transpose=True, groups=2)[1])


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_batch_norm_layer_fold_16bit_weight(rng, name):
    dtype = np_dtype(name)
    bn = normkit.BatchNorm(4)
    bn.running_var = rng.uniform(0.5, 2.0, 4)
    w = rng.standard_normal((4, 2)).astype(dtype)
    fw, fb = bn.fold(w)
    assert fw.dtype == dtype and fb.dtype == dtype
    want = normkit.fold_batch_norm(w, None, bn.running_mean, bn.running_var, 1e-5, bn.weight, bn.bias)
    assert fw.tobytes() == want[0].tobytes()


def test_linear_then_batch_norm_equals_folded_linear(rng):
    """Without torch: y = BN(x @ W.T + b) by normkit's BatchNorm in eval equals
    x @ W_f.T + b_f."""
    bn = normkit.BatchNorm(5, dtype=np.float64).eval()
    bn.running_mean = rng.standard_normal(5)
    bn.running_var = rng.uniform(0.5, 2.0, 5)
    bn.weight = rng.uniform(0.5, 2.0, 5)
    bn.bias = rng.standard_normal(5)
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    x = rng.standard_normal((16, 7))
    fw, fb = bn.fold(w, b)
    np.testing.assert_allclose(x @ fw.T + fb, bn(x @ w.T + b), rtol=1e-12, atol=1e-12)


def test_batch_norm_layer_fold_errors(rng):
    w = np.ones((4, 2, 3), np.float32)
    raises_named(ValueError, "fold", lambda: normkit.BatchNorm(4, track_running_stats=False).fold(w))
    raises_named(TypeError, "weight", lambda: normkit.BatchNorm(4).fold(w.astype(np.float64)))
    raises_named(ValueError, "weight", lambda: normkit.BatchNorm(5).fold(w))
    raises_named(ValueError, "weight", lambda: normkit.BatchNorm(4).fold(w, transpose=True))  # C_out = 2
    raises_named(ValueError, "bias", lambda: normkit.BatchNorm(4).fold(w, np.zeros(3, np.float32)))
    raises_named(ValueError, "groups", lambda: normkit.BatchNorm(4).fold(w, groups=3))
    raises_named(TypeError, "groups", lambda: normkit.BatchNorm(4).fold(w, groups=2.0))


# --------------------------------------------------------------------------- errors


def test_errors(rng):
    w, b, m, v, g, beta = make_problem(rng, (8, 2, 3, 3))
    f = normkit.fold_batch_norm
    msg = raises_named(ValueError, "running_var", lambda: f(w, b, m, v[:4], 1e-5, g, beta))
    assert msg == "running_var: expected shape (8,), got (4,)"
    raises_named(ValueError, "running_mean", lambda: f(w, b, m[:3], v, 1e-5, g, beta))
    raises_named(ValueError, "bias", lambda: f(w, b[:3], m, v, 1e-5, g, beta))
    raises_named(ValueError, "bn_weight", lambda: f(w, b, m, v, 1e-5, g.reshape(2, 4), beta))
    raises_named(ValueError, "bn_bias", lambda: f(w, b, m, v, 1e-5, g, beta[:1]))
    raises_named(ValueError, "running_mean", lambda: f(w, None, m, v, 1e-5, g, beta, transpose=True, groups=2))
    raises_named(ValueError, "running_mean", lambda: f(w, b, None, v, 1e-5, g, beta))
    raises_named(ValueError, "running_var", lambda: f(w, b, m, None, 1e-5, g, beta))
    raises_named(ValueError, "weight", lambda: f(None, b, m, v, 1e-5, g, beta))
    # dtypes
    raises_named(TypeError, "weight", lambda: f(w.astype(np.int32), b, m, v, 1e-5, g, beta))
    raises_named(TypeError, "running_var", lambda: f(w, b, m, v.astype(np.int64), 1e-5, g, beta))
    raises_named(TypeError, "bn_weight", lambda: f(w, b, m, v, 1e-5, g.astype(np.int8), beta))
    raises_named(TypeError, "bias", lambda: f(w, ["a"] * 8, m, v, 1e-5, g, beta))
    # eps
    raises_named(ValueError, "eps", lambda: f(w, b, m, v, -1e-5, g, beta))
    raises_named(ValueError, "eps", lambda: f(w, b, m, v, float("nan"), g, beta))
    raises_named(ValueError, "eps", lambda: f(w, b, m, v, float("inf"), g, beta))
    raises_named(TypeError, "eps", lambda: f(w, b, m, v, "1e-5", g, beta))
    # groups and rank
    raises_named(ValueError, "groups", lambda: f(w, b, m, v, 1e-5, g, beta, groups=0))
    raises_named(ValueError, "groups", lambda: f(w, b, m, v, 1e-5, g, beta, groups=-1, transpose=True))
    raises_named(ValueError, "groups", lambda: f(w, b, m, v, 1e-5, g, beta, groups=3))
    raises_named(ValueError, "groups", lambda: f(w, b, m, v, 1e-5, g, beta, groups=3, transpose=True))
    raises_named(TypeError, "groups", lambda: f(w, b, m, v, 1e-5, g, beta, groups=True))
    raises_named(TypeError, "groups", lambda: f(w, b, m, v, 1e-5, g, beta, groups=1.5))
    raises_named(ValueError, "weight", lambda: f(np.float64(1.0), b, m, v, 1e-5, g, beta))
    raises_named(ValueError, "weight", lambda: f(np.ones(8), b, m, v, 1e-5, g, beta, transpose=True))
    # 16-bit weight: bias must become its dtype, the vectors float32 or its own
    raises_named(ValueError, "running_mean", lambda: f(w.astype(np.float16), None, m[:2], v, 1e-5, None, None))


def test_errors_through_the_extension():
    """What the Python layer never sends: int8 weights, outputs overlapping inputs."""
    ext = normkit._ext.fold_batch_norm
    base = np.ones(13)
    w, fw = base[:12].reshape(4, 3), np.empty((4, 3))
    m, v, fb = np.zeros(4), np.ones(4), np.empty(4)
    raises_named(TypeError, "weight", lambda: ext(w.astype(np.int8), None, m, v, 1e-5, None, None, fw, fb, False, 1,
                                                 False))
    msg = raises_named(ValueError, "folded_weight",
                       lambda: ext(w, None, m, v, 1e-5, None, None, base[1:].reshape(4, 3), fb, False, 1, False))
    assert "overlaps weight" in msg
    msg = raises_named(ValueError, "folded_bias", lambda: ext(w, None, m, v, 1e-5, None, None, fw, v, False, 1, False))
    assert "running_var" in msg
    msg = raises_named(ValueError, "folded_bias",
                       lambda: ext(w, None, m, v, 1e-5, None, None, fw, base[8:12], False, 1, False))
    assert "weight" in msg


# --------------------------------------------------------------------------- against PyTorch


def _torch():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    return torch, fuse_conv_bn_weights


def _torch_fold(torch, fuse, problem, eps, transpose, absent=()):
    t = [None if p is None else torch.from_numpy(p) for p in problem]
    w, b, m, v, g, beta = t
    b = None if "bias" in absent else b
    g = None if "bn_weight" in absent else g
    beta = None if "bn_bias" in absent else beta
    fw, fb = fuse(w, b, m, v, eps, g, beta, transpose=transpose)
    return fw.detach().numpy(), fb.detach().numpy()


TORCH_CASES = [
    ((16, 8, 3, 3), False),  # conv2d
    ((12, 5, 7), False),  # conv1d
    ((10, 20), False),  # linear [out, in]
    ((6, 9, 3, 3), True),  # conv_transpose2d, groups 1
    ((6, 9, 4), True),  # conv_transpose1d, groups 1
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,transpose", TORCH_CASES, ids=[f"{s}-t{int(t)}" for s, t in TORCH_CASES])
def test_matches_torch(rng, shape, transpose, dtype):
    torch, fuse = _torch()
    problem = make_problem(rng, shape, transpose, 1, dtype)
    fw, fb = call(problem, 1e-5, transpose=transpose)
    tw, tb = _torch_fold(torch, fuse, problem, 1e-5, transpose)
    rtol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(fw, tw, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(fb, tb, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("absent", [("bias",), ("bn_weight",), ("bn_bias",), ("bias", "bn_weight", "bn_bias")])
def test_matches_torch_absent(rng, absent):
    torch, fuse = _torch()
    problem = make_problem(rng, (8, 4, 3, 3), False, 1, np.float32)
    names = ["weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias"]
    ours = [None if n in absent else p for n, p in zip(names, problem)]
    fw, fb = call(ours)
    tw, tb = _torch_fold(torch, fuse, problem, 1e-5, False, absent)
    np.testing.assert_allclose(fw, tw, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fb, tb, rtol=1e-6, atol=1e-6)


def test_torch_parameters_as_inputs(rng):
    """conv.weight (a Parameter that requires grad) goes in as it is."""
    torch, _ = _torch()
    conv = torch.nn.Conv2d(3, 6, 3)
    bn = torch.nn.BatchNorm2d(6).eval()
    fw, fb = normkit.fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
                                     bn.bias)
    # results follow the first argument's kind: torch tensors, which record no autograd
    assert isinstance(fw, torch.Tensor) and fw.dtype == torch.float32 and fb.shape == (6,)
    assert not fw.requires_grad and not fb.requires_grad


def _bn_eval(torch, y, problem, eps):
    _, _, m, v, g, beta = [torch.from_numpy(p) for p in problem]
    return torch.nn.functional.batch_norm(y, m, v, g, beta, training=False, eps=eps)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_folded_conv_transpose_equals_conv_transpose_then_batch_norm(rng, groups):
    """The real proof: conv_transpose2d with the folded weights gives what
    conv_transpose2d followed by BatchNorm (eval) gives, for grouped convolutions
    too (where torch.nn.utils.fusion.fuse_conv_bn_weights is wrong)."""
    torch, _ = _torch()
    c_in, out_per_group = 8, 3
    problem = make_problem(rng, (c_in, out_per_group, 3, 3), True, groups)
    x = torch.from_numpy(rng.standard_normal((2, c_in, 5, 6)))
    w, b = torch.from_numpy(problem[0]), torch.from_numpy(problem[1])
    f = torch.nn.functional.conv_transpose2d
    want = _bn_eval(torch, f(x, w, b, stride=2, padding=1, groups=groups), problem, 1e-3).numpy()
    fw, fb = call(problem, 1e-3, transpose=True, groups=groups)
    got = f(x, torch.from_numpy(fw), torch.from_numpy(fb), stride=2, padding=1, groups=groups).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_folded_conv_equals_conv_then_batch_norm(rng, groups):
    torch, _ = _torch()
    c_in, c_out = 8, 12
    problem = make_problem(rng, (c_out, c_in // groups, 3, 3), False, groups)
    x = torch.from_numpy(rng.standard_normal((2, c_in, 7, 7)))
    w, b = torch.from_numpy(problem[0]), torch.from_numpy(problem[1])
    f = torch.nn.functional.conv2d
    want = _bn_eval(torch, f(x, w, b, padding=1, groups=groups), problem, 1e-5).numpy()
    fw, fb = call(problem, 1e-5, groups=groups)
    got = f(x, torch.from_numpy(fw), torch.from_numpy(fb), padding=1, groups=groups).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(want).max()))


def test_batch_norm_layer_fold_equals_torch_modules(rng):
    """normkit.BatchNorm loaded from a torch BatchNorm2d folds into a grouped
    ConvTranspose2d as the two modules compute."""
    torch, _ = _torch()
    conv = torch.nn.ConvTranspose2d(8, 6, 3, groups=2).double()
    tbn = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        tbn.running_mean.copy_(torch.from_numpy(rng.standard_normal(6)))
        tbn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 6)))
        tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, 6)))
        tbn.bias.copy_(torch.from_numpy(rng.standard_normal(6)))
    bn = normkit.BatchNorm(6, dtype=np.float64)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    fw, fb = bn.fold(conv.weight, conv.bias, transpose=True, groups=2)
    x = torch.from_numpy(rng.standard_normal((2, 8, 4, 4)))
    with torch.no_grad():
        want = tbn(conv(x)).numpy()
        got = torch.nn.functional.conv_transpose2d(x, torch.from_numpy(fw), torch.from_numpy(fb), groups=2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(want).max()))

"""Bad input to batch_norm / instance_norm / group_norm / adaptive_instance_norm.

Every error is a ValueError or TypeError whose message starts with the name of
the offending argument ("x: ...", "running_mean: ...", "layout: ...", ...).
Each test checks the exception type and the name, and that nothing was written
into `out` or into the running statistics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normkit
from helpers import raises_named, raises_prefixed, to_last

N, C, H, W = 2, 6, 3, 5


def good_x(dtype=np.float32, shape=(N, C, H, W)):
    return (np.arange(np.prod(shape), dtype=np.float64).reshape(shape) % 7).astype(dtype)


def running(c=C, dtype=np.float32):
    return np.zeros(c, dtype), np.ones(c, dtype)


# Each norm as a function of (x, **overrides); defaults make a valid call.
def _bn(x, running_mean="default", running_var="default", **kw):
    c = kw.pop("c", C)
    rm, rv = running(c)
    rm = rm if isinstance(running_mean, str) else running_mean
    rv = rv if isinstance(running_var, str) else running_var
    return normkit.batch_norm(x, rm, rv, **kw)


def _bn_train(x, **kw):
    return _bn(x, training=True, **kw)


def _in(x, **kw):
    kw.pop("c", None)
    return normkit.instance_norm(x, **kw)


def _gn(x, num_groups=2, **kw):
    kw.pop("c", None)
    return normkit.group_norm(x, num_groups, **kw)


def _adain(x, style="default", **kw):
    kw.pop("c", None)
    if isinstance(style, str):
        style = np.asarray(x).copy()
    return normkit.adaptive_instance_norm(x, style, **kw)


NORMS = {"bn_eval": _bn, "bn_train": _bn_train, "in": _in, "gn": _gn, "adain": _adain}
AFFINE_NORMS = {"bn_eval": _bn, "bn_train": _bn_train, "in": _in, "gn": _gn}


@pytest.fixture(params=list(NORMS))
def norm(request):
    return NORMS[request.param]


def test_good_calls_work(norm):
    """The defaults above are valid calls (so every failure below is the bad argument's)."""
    y = norm(good_x())
    assert y.shape == (N, C, H, W)


# --------------------------------------------------------------------------- x


BAD_X = {
    "int32": np.arange(N * C * H * W, dtype=np.int32).reshape(N, C, H, W),
    "int64": np.arange(N * C * H * W, dtype=np.int64).reshape(N, C, H, W),
    "uint8": np.arange(N * C * H * W, dtype=np.uint8).reshape(N, C, H, W),
    "bool": np.ones((N, C, H, W), dtype=bool),
    "complex64": np.ones((N, C, H, W), dtype=np.complex64),
    "complex128": np.ones((N, C, H, W), dtype=np.complex128),
    "object": np.ones((N, C, H, W), dtype=object),
    "str": np.full((N, C, H, W), "a"),
}


@pytest.mark.parametrize("kind", list(BAD_X))
def test_bad_x_dtype(norm, kind):
    x = BAD_X[kind]
    if norm is _adain:
        raises_named(TypeError, "x", lambda: normkit.adaptive_instance_norm(x, good_x()))
    else:
        raises_named(TypeError, "x", lambda: norm(x))


@pytest.mark.parametrize("x", [None, "abc", object()], ids=["None", "str", "object"])
def test_x_not_an_array(norm, x):
    if norm is _adain:
        raises_named(TypeError, "x", lambda: normkit.adaptive_instance_norm(x, good_x()))
    else:
        raises_named(TypeError, "x", lambda: norm(x))


@pytest.mark.parametrize("shape", [(), (6,), (1, 2, 3, 4, 5, 6)], ids=["0d", "1d", "6d"])
def test_x_rank_without_a_layout(norm, shape):
    """Ranks that no channel layout has: refused (naming x or layout), never guessed."""
    x = np.ones(shape, np.float32)
    raises_prefixed(ValueError, ("x", "layout"), lambda: norm(x, c=shape[1] if len(shape) > 1 else 1))


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("layout", ["NHCW", "nchw", "", "NCHWD", "CHW", "channels_last"])
def test_unknown_layout_string(norm, layout):
    raises_named(ValueError, "layout", lambda: norm(good_x(), layout=layout))


@pytest.mark.parametrize("layout", [4, 1.5, object(), b"NCHW"], ids=["int", "float", "object", "bytes"])
def test_layout_of_wrong_type(norm, layout):
    raises_prefixed((TypeError, ValueError), "layout", lambda: norm(good_x(), layout=layout))


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((N, C, H, W), "NCL"),
        ((N, C, H, W), "NDHWC"),
        ((N, C, H, W), "NC"),
        ((N, C, H), "NCHW"),
        ((N, C, H), "NHWC"),
        ((N, C, H), "NC"),
        ((N, C), "NCL"),
        ((N, C), "NHWC"),
        ((N, C, 2, H, W), "NCHW"),
        ((N, C, 2, H, W), "NLC"),
    ],
    ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)),
)
def test_layout_not_fitting_rank(norm, shape, layout):
    x = good_x(shape=shape)
    raises_named(ValueError, "layout", lambda: norm(x, layout=layout))
    enum = getattr(normkit.Layout, layout)
    raises_named(ValueError, "layout", lambda: norm(x, layout=enum))


# --------------------------------------------------------------------------- running statistics


@pytest.mark.parametrize("fn", [_bn, _bn_train], ids=["eval", "train"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("length", [C - 1, C + 1, 0, 1])
def test_running_stat_wrong_length(fn, which, length):
    bad = np.zeros(length, np.float32)
    other = np.zeros(C, np.float32)
    other_copy = other.copy()
    kw = {which: bad, ("running_var" if which == "running_mean" else "running_mean"): other}
    raises_named(ValueError, which, lambda: fn(good_x(), **kw))
    assert np.array_equal(other, other_copy), "the good running statistic was updated by a failing call"


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stat_wrong_shape_2d(which):
    bad = np.zeros((1, C), np.float32)
    kw = {which: bad}
    raises_named(ValueError, which, lambda: _bn_train(good_x(), **kw))


@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_instance_norm_running_stat_wrong_length(which, use_input_stats):
    rm, rv = running()
    kw = {"running_mean": rm, "running_var": rv, "use_input_stats": use_input_stats}
    kw[which] = np.zeros(C + 1, np.float32)
    raises_named(ValueError, which, lambda: normkit.instance_norm(good_x(), **kw))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, bool, np.complex64])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("fn", ["bn_eval", "bn_train", "in"])
def test_running_stat_dtype_kind(fn, which, dtype):
    rm, rv = running()
    kw = {"running_mean": rm, "running_var": rv}
    kw[which] = np.zeros(C, dtype) if dtype is not bool else np.ones(C, bool)
    if fn == "in":
        call = lambda: normkit.instance_norm(good_x(), **kw)  # noqa: E731
    else:
        call = lambda: normkit.batch_norm(good_x(), training=fn == "bn_train", **kw)  # noqa: E731
    raises_named(TypeError, which, call)


def test_float64_running_stats_for_float32_x():
    """Running statistics must be float32 or x's dtype: float64 for float32 x is
    either accepted or refused as a TypeError naming the statistic."""
    rm = np.zeros(C, np.float64)
    rv = np.ones(C, np.float64)
    try:
        normkit.batch_norm(good_x(), rm, rv, training=True)
    except TypeError as e:
        assert str(e).startswith("running_mean"), str(e)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_16bit_running_stats_for_float32_x(dtype):
    """16-bit running statistics with float32 x (neither float32 nor x's dtype): TypeError."""
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    rm = np.zeros(C, dtype)
    rv = np.ones(C, dtype)
    raises_named(TypeError, "running_mean", lambda: normkit.batch_norm(good_x(), rm, rv, training=True))


@pytest.mark.parametrize("given", ["none", "mean_only", "var_only"])
def test_batch_norm_inference_needs_running_stats(given):
    rm, rv = running()
    rm_arg = rm if given == "mean_only" else None
    rv_arg = rv if given == "var_only" else None
    name = "running_var" if given == "mean_only" else "running_mean"
    raises_named(ValueError, name, lambda: normkit.batch_norm(good_x(), rm_arg, rv_arg, training=False))


def test_instance_norm_without_input_stats_needs_running_stats():
    raises_named(ValueError, "running_mean", lambda: normkit.instance_norm(good_x(), use_input_stats=False))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_training_with_only_one_running_stat(which):
    rm, rv = running()
    kw = {"running_mean": rm if which == "running_mean" else None, "running_var": rv if which == "running_var" else None}
    before = (rm.copy(), rv.copy())
    raises_prefixed(ValueError, ("running_mean", "running_var"),
                    lambda: normkit.batch_norm(good_x(), kw["running_mean"], kw["running_var"], training=True))
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1])


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("fn", ["bn_train", "in"])
def test_read_only_running_stats_in_training(fn, which):
    rm, rv = running()
    {"running_mean": rm, "running_var": rv}[which].flags.writeable = False
    before = (rm.copy(), rv.copy())
    if fn == "in":
        call = lambda: normkit.instance_norm(good_x(), rm, rv)  # noqa: E731
    else:
        call = lambda: normkit.batch_norm(good_x(), rm, rv, training=True)  # noqa: E731
    raises_named(ValueError, which, call)
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1]), "running statistics changed"


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_not_arrays(which):
    """Running statistics are updated in place: a list cannot be (a TypeError naming it)."""
    rm, rv = running()
    kw = {"running_mean": rm, "running_var": rv}
    kw[which] = kw[which].tolist()
    raises_prefixed((TypeError, ValueError), which, lambda: normkit.batch_norm(good_x(), training=True, **kw))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_non_contiguous_running_stats(which):
    """A strided running statistic is either updated correctly in place or refused naming it."""
    rm, rv = running()
    base = np.zeros(2 * C, np.float32) if which == "running_mean" else np.ones(2 * C, np.float32)
    kw = {"running_mean": rm, "running_var": rv}
    kw[which] = base[::2]
    expected = {"running_mean": rm.copy(), "running_var": rv.copy()}
    normkit.batch_norm(good_x(), expected["running_mean"], expected["running_var"], training=True)
    try:
        normkit.batch_norm(good_x(), kw["running_mean"], kw["running_var"], training=True)
    except (ValueError, TypeError) as e:
        assert str(e).startswith(which), str(e)
    else:
        np.testing.assert_array_equal(base[::2], expected[which])
        assert np.all(base[1::2] == (0.0 if which == "running_mean" else 1.0)), "wrote between the elements"


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1), (1, C, 1, 1, 1)], ids=str)
def test_batch_norm_training_one_value_per_channel(shape):
    rm, rv = running()
    raises_named(ValueError, "x", lambda: normkit.batch_norm(np.ones(shape, np.float32), rm, rv, training=True))
    assert np.all(rm == 0) and np.all(rv == 1)


@pytest.mark.parametrize("shape,layout", [((N, C), None), ((N, C, 1), None), ((N, 1, C), "NLC"),
                                          ((N, C, 1, 1), None), ((N, 1, 1, C), "NHWC")], ids=str)
def test_instance_norm_one_spatial_element(shape, layout):
    rm, rv = running()
    raises_named(ValueError, "x", lambda: normkit.instance_norm(np.ones(shape, np.float32), rm, rv, layout=layout))
    assert np.all(rm == 0) and np.all(rv == 1)


# --------------------------------------------------------------------------- num_groups


@pytest.mark.parametrize("groups", [0, -1, -6, 4, 5, 7, 12])
def test_num_groups_not_a_positive_divisor(groups):
    raises_named(ValueError, "num_groups", lambda: normkit.group_norm(good_x(), groups))
    xl = to_last(good_x())
    raises_named(ValueError, "num_groups", lambda: normkit.group_norm(xl, groups, layout="NHWC"))


@pytest.mark.parametrize("groups", [2.0, "2", None, True], ids=["float", "str", "None", "bool"])
def test_num_groups_not_an_int(groups):
    raises_named(TypeError, "num_groups", lambda: normkit.group_norm(good_x(), groups))


def test_num_groups_numpy_int_accepted():
    x = good_x()
    y = normkit.group_norm(x, np.int64(3))
    assert np.array_equal(y, normkit.group_norm(x, 3))


# --------------------------------------------------------------------------- weight / bias


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("length", [C - 1, C + 1, 1, 0])
@pytest.mark.parametrize("fn", list(AFFINE_NORMS))
def test_affine_wrong_length(fn, name, length):
    bad = np.ones(length, np.float32)
    raises_named(ValueError, name, lambda: AFFINE_NORMS[fn](good_x(), **{name: bad}))


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("fn", list(AFFINE_NORMS))
def test_affine_wrong_rank(fn, name):
    bad = np.ones((1, C), np.float32)
    raises_named(ValueError, name, lambda: AFFINE_NORMS[fn](good_x(), **{name: bad}))


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("fn", list(AFFINE_NORMS))
def test_affine_channels_last_length_is_c(fn, name):
    """In NHWC the channel count is the last dim: a weight of the second dim's length is wrong."""
    x = to_last(good_x())  # (N, H, W, C)
    raises_named(ValueError, name, lambda: AFFINE_NORMS[fn](x, layout="NHWC", **{name: np.ones(H, np.float32)}))


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("dtype", [np.int32, bool, np.complex64])
def test_affine_wrong_dtype_kind(name, dtype):
    bad = np.ones(C, dtype)
    raises_named(TypeError, name, lambda: normkit.group_norm(good_x(), 2, **{name: bad}))
    raises_named(TypeError, name, lambda: _bn_train(good_x(), **{name: bad}))


# --------------------------------------------------------------------------- AdaIN style


@pytest.mark.parametrize(
    "style_shape",
    [(N + 1, C, H, W), (N, C + 1, H, W), (1, C, H, W), (N, 1, H, W), (N, C - 1, 7, 2)],
    ids=lambda v: "x".join(map(str, v)),
)
def test_style_map_wrong_n_or_c(style_shape):
    style = good_x(shape=style_shape)
    raises_named(ValueError, "style", lambda: normkit.adaptive_instance_norm(good_x(), style))


def test_style_map_wrong_c_channels_last():
    x = to_last(good_x())
    style = good_x(shape=(N, 4, 4, C + 1))
    raises_named(ValueError, "style", lambda: normkit.adaptive_instance_norm(x, style, layout="NHWC"))


@pytest.mark.parametrize("style_shape", [(N, C, H), (N, C), (N, C, 2, H, W)], ids=str)
def test_style_map_other_rank(style_shape):
    style = good_x(shape=style_shape)
    raises_named(ValueError, "style", lambda: normkit.adaptive_instance_norm(good_x(), style))


@pytest.mark.parametrize("shapes", [((N, C + 1), (N, C)), ((N, C), (N + 1, C)), ((C,), (C,)), ((N, C, 1), (N, C, 1)),
                                    ((1, C), (1, C))], ids=str)
def test_style_pair_wrong_shape(shapes):
    mean = np.zeros(shapes[0], np.float32)
    std = np.ones(shapes[1], np.float32)
    raises_named(ValueError, "style", lambda: normkit.adaptive_instance_norm(good_x(), (mean, std)))


@pytest.mark.parametrize("n_items", [1, 3])
def test_style_sequence_not_a_pair(n_items):
    items = tuple(np.ones((N, C), np.float32) for _ in range(n_items))
    raises_named(ValueError, "style", lambda: normkit.adaptive_instance_norm(good_x(), items))


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.float64, np.float16])
def test_style_map_dtype(dtype):
    """A style map of another dtype than x (float32) is a TypeError naming style."""
    style = good_x().astype(dtype)
    raises_named(TypeError, "style", lambda: normkit.adaptive_instance_norm(good_x(), style))


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, bool])
def test_style_pair_dtype_kind(dtype):
    mean = np.zeros((N, C), dtype)
    std = np.ones((N, C), dtype)
    raises_named(TypeError, "style", lambda: normkit.adaptive_instance_norm(good_x(), (mean, std)))


# --------------------------------------------------------------------------- eps, momentum


@pytest.mark.parametrize("eps", [-1e-5, -1.0, math.nan, -math.inf, math.inf])
def test_bad_eps_value(norm, eps):
    if eps == math.inf:
        # an infinite eps is refused or gives zeros/finite values; never a crash
        try:
            norm(good_x(), eps=eps)
        except ValueError as e:
            assert str(e).startswith("eps")
        return
    raises_named(ValueError, "eps", lambda: norm(good_x(), eps=eps))


@pytest.mark.parametrize("eps", ["1e-5", None, [1e-5]], ids=["str", "None", "list"])
def test_bad_eps_type(norm, eps):
    raises_named(TypeError, "eps", lambda: norm(good_x(), eps=eps))


@pytest.mark.parametrize("fn", ["bn_train", "in"])
@pytest.mark.parametrize("momentum", [math.nan, math.inf])
def test_bad_momentum_value(fn, momentum):
    rm, rv = running()
    if fn == "in":
        call = lambda: normkit.instance_norm(good_x(), rm, rv, momentum=momentum)  # noqa: E731
    else:
        call = lambda: normkit.batch_norm(good_x(), rm, rv, training=True, momentum=momentum)  # noqa: E731
    raises_named(ValueError, "momentum", call)
    assert np.all(rm == 0) and np.all(rv == 1)


@pytest.mark.parametrize("momentum", ["0.1", [0.1]], ids=["str", "list"])
def test_bad_momentum_type(momentum):
    rm, rv = running()
    raises_named(TypeError, "momentum", lambda: normkit.batch_norm(good_x(), rm, rv, training=True, momentum=momentum))


# --------------------------------------------------------------------------- out


@pytest.mark.parametrize("shape", [(N, C, H, W + 1), (N, C, H * W), (N, H, W, C), (N * C * H * W,)], ids=str)
def test_out_wrong_shape(norm, shape):
    out = np.full(shape, 7.0, np.float32)
    raises_named(ValueError, "out", lambda: norm(good_x(), out=out))
    assert np.all(out == 7.0), "out written by a failing call"


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_out_wrong_dtype(norm, dtype):
    out = np.full((N, C, H, W), 7, dtype)
    raises_named(TypeError, "out", lambda: norm(good_x(), out=out))
    assert np.all(out == 7), "out written by a failing call"


def test_out_read_only(norm):
    out = np.full((N, C, H, W), 7.0, np.float32)
    out.flags.writeable = False
    raises_named(ValueError, "out", lambda: norm(good_x(), out=out))


def test_out_not_an_array(norm):
    raises_prefixed(TypeError, "out", lambda: norm(good_x(), out=[[0.0]]))


def test_out_partially_overlapping_x(norm):
    base = np.zeros(N * C * H * W + 3, np.float32)
    base[: N * C * H * W] = good_x().ravel()
    x = base[: N * C * H * W].reshape(N, C, H, W)
    out = base[3:].reshape(N, C, H, W)
    before = base.copy()
    raises_named(ValueError, "out", lambda: norm(x, out=out))
    assert np.array_equal(base, before), "a failing call wrote into x/out"


def test_bad_input_leaves_out_and_stats_untouched():
    """A late error (bad eps) after out and the running statistics were accepted: nothing written."""
    rm, rv = running()
    out = np.full((N, C, H, W), 7.0, np.float32)
    raises_named(ValueError, "eps", lambda: normkit.batch_norm(good_x(), rm, rv, training=True, eps=-1.0, out=out))
    assert np.all(out == 7.0) and np.all(rm == 0) and np.all(rv == 1)
    raises_named(ValueError, "num_groups", lambda: normkit.group_norm(good_x(), 4, out=out))
    assert np.all(out == 7.0)

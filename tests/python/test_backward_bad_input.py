"""Bad input to the backward functions (layer_norm_backward, rms_norm_backward,
batch_norm_backward, instance_norm_backward, group_norm_backward,
adaptive_instance_norm_backward).

Every error is a ValueError or TypeError whose message starts with the name of
the offending argument ("dy: ...", "mean: ...", "weight: ...", "layout: ...").
Every call here, failing or not, leaves the arrays passed in unchanged (compared
bit for bit with copies taken before the call).
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit
from helpers import raises_named, raises_prefixed, same_bits, to_last

N, C, H, W = 2, 6, 3, 5
ROWS, COLS = 3, 8
G = 2

NORMS = ["ln", "rms", "bn_train", "bn_eval", "in", "in_eval", "gn", "adain_map", "adain_pair"]
STAT_NORMS = ["ln", "rms", "bn_train", "bn_eval", "in", "in_eval", "gn"]
AFFINE_NORMS = ["ln", "rms", "bn_train", "bn_eval", "in", "in_eval", "gn"]
CHANNEL_NORMS = ["bn_train", "bn_eval", "in", "in_eval", "gn", "adain_map", "adain_pair"]


def _x(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)


def good_args(norm, dtype=np.float32, layout=None):
    """A valid call's arguments: x, dy, the statistics the forward returned, a weight
    (and the layout, num_groups, normalized_shape or style it needs)."""
    if norm in ("ln", "rms"):
        x = _x((ROWS, COLS), dtype)
        a = {"x": x, "dy": _x(x.shape, dtype, 1), "normalized_shape": COLS, "weight": _x(COLS, dtype, 2)}
        if norm == "ln":
            _, a["mean"], a["rstd"] = normkit.layer_norm(x, COLS, return_stats=True)
        else:
            _, a["rstd"] = normkit.rms_norm(x, COLS, return_stats=True)
        return a
    x = _x((N, C, H, W), dtype)
    if layout == "NHWC":
        x = to_last(x)
    a = {"x": x, "dy": _x(x.shape, dtype, 1), "layout": layout}
    sd = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    if norm.startswith("adain"):
        if norm == "adain_map":
            a["style"] = _x(x.shape, dtype, 3)
        else:
            a["style"] = (_x((N, C), dtype, 3), np.abs(_x((N, C), dtype, 4)) + 0.5)
        return a
    a["weight"] = _x(C, dtype, 2)
    rm, rv = np.zeros(C, sd), np.ones(C, sd)
    if norm == "bn_train":
        _, a["mean"], a["rstd"] = normkit.batch_norm(x, None, None, training=True, layout=layout, return_stats=True)
    elif norm == "bn_eval":
        _, a["mean"], a["rstd"] = normkit.batch_norm(x, rm, rv, training=False, layout=layout, return_stats=True)
    elif norm == "in":
        _, a["mean"], a["rstd"] = normkit.instance_norm(x, layout=layout, return_stats=True)
    elif norm == "in_eval":
        _, a["mean"], a["rstd"] = normkit.instance_norm(x, rm, rv, use_input_stats=False, layout=layout,
                                                        return_stats=True)
    else:
        a["num_groups"] = G
        _, a["mean"], a["rstd"] = normkit.group_norm(x, G, layout=layout, return_stats=True)
    return a


def call(norm, a):
    """The backward function of `norm` on the arguments in `a`."""
    if norm == "ln":
        return normkit.layer_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["normalized_shape"], a["weight"])
    if norm == "rms":
        return normkit.rms_norm_backward(a["dy"], a["x"], a["rstd"], a["normalized_shape"], a["weight"])
    if norm in ("bn_train", "bn_eval"):
        return normkit.batch_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["weight"],
                                           training=norm == "bn_train", layout=a["layout"])
    if norm in ("in", "in_eval"):
        return normkit.instance_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["weight"],
                                              use_input_stats=norm == "in", layout=a["layout"])
    if norm == "gn":
        return normkit.group_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["num_groups"], a["weight"],
                                           layout=a["layout"])
    return normkit.adaptive_instance_norm_backward(a["dy"], a["x"], a["style"], a.get("eps", 1e-5),
                                                   layout=a["layout"])


def _arrays(a):
    out = []
    for k, v in a.items():
        if isinstance(v, np.ndarray):
            out.append((k, v))
        elif isinstance(v, tuple):
            out += [(f"{k}[{i}]", e) for i, e in enumerate(v) if isinstance(e, np.ndarray)]
    return out


def fails(norm, a, exc, name):
    """call(norm, a) raises exc naming `name`, and modifies none of the arrays passed."""
    before = [(k, v.copy()) for k, v in _arrays(a)]
    if isinstance(name, tuple):
        msg = raises_prefixed(exc, name, lambda: call(norm, a))
    else:
        msg = raises_named(exc, name, lambda: call(norm, a))
    for (k, old), (_, new) in zip(before, _arrays(a)):
        assert same_bits(old, new), f"{k} modified by a failing call"
    return msg


def bad(norm, exc, name, dtype=np.float32, layout=None, **override):
    a = good_args(norm, dtype, layout)
    a.update(override)
    return fails(norm, a, exc, name)


@pytest.fixture(params=NORMS)
def norm(request):
    return request.param


@pytest.fixture(params=STAT_NORMS)
def stat_norm(request):
    return request.param


# --------------------------------------------------------------------------- good calls


@pytest.mark.parametrize("layout", [None, "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_good_calls_work_and_modify_nothing(norm, dtype, layout):
    """The defaults are valid calls (so each failure below is the bad argument's), in
    every dtype; a successful call modifies none of its inputs."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    if layout and norm in ("ln", "rms"):
        pytest.skip("no layout for the rows norms")
    a = good_args(norm, np.dtype(dtype), layout)
    before = [(k, v.copy()) for k, v in _arrays(a)]
    out = call(norm, a)
    assert isinstance(out, tuple) and out[0].shape == a["x"].shape and out[0].dtype == a["x"].dtype
    for (k, old), (_, new) in zip(before, _arrays(a)):
        assert same_bits(old, new), f"{k} was modified"
        assert not any(np.shares_memory(new, o) for o in out if isinstance(o, np.ndarray)), f"output aliases {k}"


# --------------------------------------------------------------------------- dy


def _dy_shapes(norm):
    if norm in ("ln", "rms"):
        return [(ROWS, COLS + 1), (ROWS + 1, COLS), (COLS, ROWS), (ROWS * COLS,), (1, ROWS, COLS)]
    return [(N, C, H, W + 1), (N + 1, C, H, W), (N, C + 1, H, W), (N, W, H, C), (N, C, H * W), (1, N, C, H, W)]


@pytest.mark.parametrize("k", range(5))
def test_dy_wrong_shape(norm, k):
    shape = _dy_shapes(norm)[k]
    bad(norm, ValueError, "dy", dy=np.ones(shape, np.float32))


def test_dy_wrong_shape_channels_last(norm):
    if norm in ("ln", "rms"):
        pytest.skip("channel norms")
    # dy given channels-first for a channels-last x (same size, other shape)
    a = good_args(norm, np.float32, "NHWC")
    a["dy"] = np.ones((N, C, H, W), np.float32)
    fails(norm, a, ValueError, "dy")


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16", "int32", "int64", "bool", "complex64"])
def test_dy_wrong_dtype(norm, dtype):
    """dy must have x's dtype (float32 here): another float dtype is refused too, never
    silently computed at another precision."""
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    x_shape = good_args(norm)["x"].shape
    bad(norm, TypeError, "dy", dy=np.ones(x_shape, dtype))


def test_dy_float32_for_16bit_x(norm):
    x_shape = good_args(norm, np.float16)["x"].shape
    bad(norm, TypeError, "dy", dtype=np.float16, dy=np.ones(x_shape, np.float32))


@pytest.mark.parametrize("dy", [None, "abc", object(), 1.5], ids=["None", "str", "object", "float"])
def test_dy_not_an_array(norm, dy):
    bad(norm, (TypeError, ValueError), "dy", dy=dy)


# --------------------------------------------------------------------------- x


@pytest.mark.parametrize("x", [None, "abc", object()], ids=["None", "str", "object"])
def test_x_not_an_array(norm, x):
    bad(norm, TypeError, "x", x=x)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex128"])
def test_x_wrong_dtype(norm, dtype):
    a = good_args(norm)
    a["x"] = a["x"].astype(dtype)
    fails(norm, a, TypeError, "x")


# --------------------------------------------------------------------------- mean / rstd


def _stat_names(norm):
    return ["rstd"] if norm == "rms" else ["mean", "rstd"]


def _stats_params():
    return [(n, s) for n in STAT_NORMS for s in _stat_names(n)]


@pytest.mark.parametrize("delta", [-1, 1], ids=["short", "long"])
@pytest.mark.parametrize("norm,which", _stats_params(), ids=str)
def test_stat_wrong_size(norm, which, delta):
    a = good_args(norm)
    s = a[which].reshape(-1)
    a[which] = np.concatenate([s, s[:1]]) if delta > 0 else s[:-1].copy()
    fails(norm, a, ValueError, which)


@pytest.mark.parametrize("norm,which", _stats_params(), ids=str)
def test_stat_empty(norm, which):
    a = good_args(norm)
    a[which] = np.zeros(0, a[which].dtype)
    fails(norm, a, ValueError, which)


@pytest.mark.parametrize("norm", ["bn_train", "in", "gn"])
def test_stats_of_another_norm(norm):
    """Statistics of another norm's shape (BatchNorm (C,) given to InstanceNorm (N, C) ...)."""
    a = good_args(norm)
    if norm == "bn_train":
        a["mean"], a["rstd"] = np.zeros((N, C), np.float32), np.ones((N, C), np.float32)
    elif norm == "in":
        a["mean"], a["rstd"] = np.zeros(C, np.float32), np.ones(C, np.float32)
    else:
        a["mean"], a["rstd"] = np.zeros((N, C), np.float32), np.ones((N, C), np.float32)
    fails(norm, a, ValueError, "mean")


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex64", "float16"])
@pytest.mark.parametrize("norm,which", _stats_params(), ids=str)
def test_stat_wrong_dtype(norm, which, dtype):
    """Saved statistics are float32 for float32 x: an int, complex or 16-bit one is refused."""
    a = good_args(norm)
    a[which] = a[which].astype(dtype)
    fails(norm, a, TypeError, which)


@pytest.mark.parametrize("norm,which", _stats_params(), ids=str)
def test_stat_float64_for_float32_x(norm, which):
    """The forward gives float32 statistics for float32 x: float64 ones are not what it
    gave, refused (TypeError naming them)."""
    a = good_args(norm)
    a[which] = a[which].astype(np.float64)
    fails(norm, a, TypeError, which)


@pytest.mark.parametrize("x_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("norm,which", _stats_params(), ids=str)
def test_stat_16bit_for_16bit_x(norm, which, x_dtype):
    """16-bit x: the forward's statistics are float32; 16-bit ones are refused."""
    if x_dtype == "bfloat16":
        x_dtype = pytest.importorskip("ml_dtypes").bfloat16
    a = good_args(norm, np.dtype(x_dtype))
    a[which] = a[which].astype(x_dtype)
    fails(norm, a, TypeError, which)


@pytest.mark.parametrize("value", [None, "abc", object()], ids=["None", "str", "object"])
@pytest.mark.parametrize("norm,which", _stats_params(), ids=str)
def test_stat_not_an_array(norm, which, value):
    bad(norm, (TypeError, ValueError), which, **{which: value})


# --------------------------------------------------------------------------- weight


def _weight_shapes(norm):
    if norm in ("ln", "rms"):
        return [(COLS + 1,), (COLS - 1,), (1, COLS), (ROWS, COLS), ()]
    return [(C + 1,), (C - 1,), (1, C), (C, 1), ()]


@pytest.mark.parametrize("k", range(5))
@pytest.mark.parametrize("norm", AFFINE_NORMS)
def test_weight_wrong_shape(norm, k):
    shape = _weight_shapes(norm)[k]
    bad(norm, ValueError, "weight", weight=np.ones(shape, np.float32))


@pytest.mark.parametrize("norm", ["bn_train", "in", "gn"])
def test_weight_channels_last_length_is_c(norm):
    """Channels-last x (N, H, W, C): the weight has C elements, not W."""
    a = good_args(norm, np.float32, "NHWC")
    a["weight"] = np.ones(W, np.float32)
    fails(norm, a, ValueError, "weight")


@pytest.mark.parametrize("dtype", ["int32", "bool", "complex64"])
@pytest.mark.parametrize("norm", AFFINE_NORMS)
def test_weight_wrong_dtype(norm, dtype):
    a = good_args(norm)
    a["weight"] = np.ones(a["weight"].shape, dtype)
    fails(norm, a, TypeError, "weight")


@pytest.mark.parametrize("norm", AFFINE_NORMS)
def test_weight_not_an_array(norm):
    bad(norm, (TypeError, ValueError), "weight", weight="abc")


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("layout", ["NCL", "NDHWC", "NC", "nchw", "NHCW", ""])
@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_layout_not_matching_rank_or_unknown(norm, layout):
    """x is 4-D: a layout of another rank, or no layout at all, is refused naming layout."""
    a = good_args(norm)
    a["layout"] = layout
    fails(norm, a, ValueError, "layout")


@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_layout_enum_not_matching_rank(norm):
    a = good_args(norm)
    a["layout"] = normkit.Layout.NCL
    fails(norm, a, ValueError, "layout")


@pytest.mark.parametrize("norm", CHANNEL_NORMS)
def test_layout_wrong_type(norm):
    a = good_args(norm)
    a["layout"] = 4
    fails(norm, a, (TypeError, ValueError), "layout")


@pytest.mark.parametrize("norm", ["bn_train", "in", "gn", "adain_map"])
def test_x_rank_without_a_channel_layout(norm):
    """A 1-D or 6-D x has no channel layout: refused naming x or layout."""
    for shape in [(C,), (1, 2, 3, 4, 5, 6)]:
        a = good_args(norm)
        a["x"] = np.ones(shape, np.float32)
        a["dy"] = np.ones(shape, np.float32)
        if norm == "adain_map":
            a["style"] = np.ones(shape, np.float32)
        fails(norm, a, (ValueError, TypeError), ("x", "layout"))


# --------------------------------------------------------------------------- num_groups / normalized_shape


@pytest.mark.parametrize("groups", [4, 5, 7, 12, 0, -1, -2])
def test_num_groups_not_a_positive_divisor(groups):
    msg = bad("gn", ValueError, "num_groups", num_groups=groups)
    assert str(groups) in msg


def test_num_groups_not_matching_the_statistics():
    """num_groups 3 divides C = 6, but the statistics are (N, 2): refused naming them."""
    bad("gn", ValueError, ("mean", "rstd", "num_groups"), num_groups=3)


@pytest.mark.parametrize("groups", [2.0, "2", None, [2]], ids=str)
def test_num_groups_wrong_type(groups):
    bad("gn", TypeError, "num_groups", num_groups=groups)


@pytest.mark.parametrize("ns", [COLS + 1, COLS - 1, (ROWS + 1, COLS), (2, ROWS, COLS), -COLS], ids=str)
@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_normalized_shape_mismatch(norm, ns):
    bad(norm, ValueError, "normalized_shape", normalized_shape=ns)


@pytest.mark.parametrize("ns", [8.0, "8", None], ids=str)
@pytest.mark.parametrize("norm", ["ln", "rms"])
def test_normalized_shape_wrong_type(norm, ns):
    bad(norm, TypeError, "normalized_shape", normalized_shape=ns)


# --------------------------------------------------------------------------- AdaIN style


@pytest.mark.parametrize("shape", [(N + 1, C, H, W), (N, C + 1, H, W), (N, C, H), (N, C)], ids=str)
def test_style_map_wrong_n_c_or_rank(shape):
    bad("adain_map", ValueError, "style", style=np.ones(shape, np.float32))


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_style_map_wrong_dtype(dtype):
    bad("adain_map", TypeError, "style", style=np.ones((N, C, 2, 2), dtype))


@pytest.mark.parametrize("shapes", [((N, C + 1), (N, C)), ((N, C), (N + 1, C)), ((C,), (C,)), ((N, C, 1), (N, C, 1))],
                         ids=str)
def test_style_pair_wrong_shape(shapes):
    pair = tuple(np.ones(s, np.float32) for s in shapes)
    bad("adain_pair", ValueError, "style", style=pair)


@pytest.mark.parametrize("n_items", [1, 3])
def test_style_sequence_not_a_pair(n_items):
    bad("adain_pair", ValueError, "style", style=tuple(np.ones((N, C), np.float32) for _ in range(n_items)))


def test_style_pair_wrong_dtype():
    bad("adain_pair", TypeError, "style", style=(np.ones((N, C), np.int32), np.ones((N, C), np.int32)))


@pytest.mark.parametrize("style", [None, "abc", object()], ids=["None", "str", "object"])
def test_style_not_an_array(style):
    bad("adain_map", (TypeError, ValueError), "style", style=style)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")], ids=str)
def test_adain_bad_eps(eps):
    bad("adain_map", ValueError, "eps", eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None], ids=str)
def test_adain_eps_wrong_type(eps):
    bad("adain_map", TypeError, "eps", eps=eps)


# --------------------------------------------------------------------------- keyword-only arguments


def test_layout_and_flags_are_keyword_only():
    """training / use_input_stats / layout are keyword-only (as in the contract):
    passing them positionally is a TypeError."""
    a = good_args("bn_train")
    with pytest.raises(TypeError):
        normkit.batch_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["weight"], True)
    a = good_args("in")
    with pytest.raises(TypeError):
        normkit.instance_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], a["weight"], True)
    a = good_args("gn")
    with pytest.raises(TypeError):
        normkit.group_norm_backward(a["dy"], a["x"], a["mean"], a["rstd"], G, a["weight"], "NCHW")
    a = good_args("adain_map")
    with pytest.raises(TypeError):
        normkit.adaptive_instance_norm_backward(a["dy"], a["x"], a["style"], 1e-5, "NCHW")

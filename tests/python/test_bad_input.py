"""Bad input to layer_norm / rms_norm and the runtime functions.

Every error is a ValueError or TypeError whose message starts with the name of
the offending argument ("x: ...", "weight: ...", ...). Each test checks the
exception type and the name, and that nothing was written into `out`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normkit
from helpers import raises_named, raises_prefixed

N = 8
FUNCS = {
    "layer": lambda x, ns, weight=None, bias=None, eps=1e-5, **kw: normkit.layer_norm(x, ns, weight, bias, eps, **kw),
    "rms": lambda x, ns, weight=None, bias=None, eps=None, **kw: normkit.rms_norm(x, ns, weight, eps, **kw),
}


@pytest.fixture(params=list(FUNCS))
def norm(request):
    return FUNCS[request.param]


def good_x(dtype=np.float32):
    return np.arange(3 * N, dtype=np.float64).reshape(3, N).astype(dtype)


# --------------------------------------------------------------------------- x


BAD_X = {
    "int32": np.arange(24, dtype=np.int32).reshape(3, N),
    "int64": np.arange(24, dtype=np.int64).reshape(3, N),
    "uint8": np.arange(24, dtype=np.uint8).reshape(3, N),
    "bool": np.ones((3, N), dtype=bool),
    "complex64": np.ones((3, N), dtype=np.complex64),
    "complex128": np.ones((3, N), dtype=np.complex128),
    "object": np.ones((3, N), dtype=object),
    "str": np.full((3, N), "a"),
    "bytes": np.full((3, N), b"a"),
    "longdouble": np.ones((3, N), dtype=np.longdouble),
    "datetime": np.zeros((3, N), dtype="datetime64[s]"),
}


@pytest.mark.parametrize("kind", list(BAD_X))
def test_bad_x_dtype(norm, kind):
    x = BAD_X[kind]
    if kind == "longdouble" and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("longdouble is float64 on this platform")
    raises_named(TypeError, "x", lambda: norm(x, N))


@pytest.mark.parametrize("x", [None, "abc", object(), [[1, "a"]]], ids=["None", "str", "object", "mixed_list"])
def test_x_not_an_array(norm, x):
    raises_named(TypeError, "x", lambda: norm(x, N))


ML_DTYPES_BAD = ["float8_e4m3fn", "float8_e5m2", "float8_e4m3b11fnuz", "int4", "uint4", "float4_e2m1fn"]


@pytest.mark.parametrize("name", ML_DTYPES_BAD)
def test_bad_x_ml_dtypes(norm, name):
    """ml_dtypes' other types (8/4-bit floats, 4-bit ints) are not inputs normkit takes."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    if not hasattr(ml_dtypes, name):
        pytest.skip(f"ml_dtypes has no {name}")
    x = np.ones((3, N), getattr(ml_dtypes, name))
    raises_named(TypeError, "x", lambda: norm(x, N))


def test_bad_x_dtype_message_says_what_is_expected():
    msg = raises_named(TypeError, "x", lambda: normkit.layer_norm(BAD_X["int64"], N))
    assert "int64" in msg and "float" in msg


# --------------------------------------------------------------------------- normalized_shape


@pytest.mark.parametrize(
    "ns",
    [N + 1, N - 1, (3, N + 1), (4, N), (2, 3, N), [N, 1], (1, N, 1), -N],
    ids=["n+1", "n-1", "3xn+1", "4xn", "2x3xn", "n_1", "1xnx1", "negative"],
)
def test_normalized_shape_mismatch(norm, ns):
    x = good_x()
    out = np.full_like(x, 7.0)
    msg = raises_named(ValueError, "normalized_shape", lambda: norm(x, ns, out=out))
    assert "(3, 8)" in msg or "trailing" in msg or "match" in msg
    assert np.all(out == 7.0), "out written despite the error"


@pytest.mark.parametrize("ns", [8.0, "8", None, [8.0], [[8]], {"a": 8}, 1j], ids=str)
def test_normalized_shape_wrong_type(norm, ns):
    raises_named(TypeError, "normalized_shape", lambda: norm(good_x(), ns))


def test_normalized_shape_empty(norm):
    raises_named(ValueError, "normalized_shape", lambda: norm(good_x(), ()))


def test_normalized_shape_longer_than_x(norm):
    raises_named(ValueError, "normalized_shape", lambda: norm(np.ones(N, np.float32), (1, N)))


# --------------------------------------------------------------------------- weight / bias


PARAM_NAMES = ["weight", "bias"]


def call_with_param(func, name, value, x=None, **kw):
    x = good_x() if x is None else x
    if func == "rms":
        assert name == "weight"
        return normkit.rms_norm(x, N, value, **kw)
    return normkit.layer_norm(x, N, **{name: value}, **kw)


FUNC_PARAM = [("layer", "weight"), ("layer", "bias"), ("rms", "weight")]


@pytest.mark.parametrize("func,name", FUNC_PARAM)
@pytest.mark.parametrize(
    "shape", [(N + 1,), (N - 1,), (1,), (1, N), (N, 1), (3, N), ()], ids=lambda s: "x".join(map(str, s)) or "scalar"
)
def test_param_wrong_shape(func, name, shape):
    value = np.ones(shape, np.float32)
    raises_named(ValueError, name, lambda: call_with_param(func, name, value))


@pytest.mark.parametrize("func,name", FUNC_PARAM)
def test_param_wrong_shape_multi_dim(func, name):
    x = np.ones((2, 3, 4), np.float32)
    value = np.ones(12, np.float32)  # right size, wrong shape for normalized_shape (3, 4)
    if func == "rms":
        fn = lambda: normkit.rms_norm(x, (3, 4), value)  # noqa: E731
    else:
        fn = lambda: normkit.layer_norm(x, (3, 4), **{name: value})  # noqa: E731
    raises_named(ValueError, name, fn)


@pytest.mark.parametrize("func,name", FUNC_PARAM)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool, np.complex64, np.complex128, object])
def test_param_wrong_dtype(func, name, dtype):
    value = np.ones(N, dtype=dtype)
    raises_named(TypeError, name, lambda: call_with_param(func, name, value))


@pytest.mark.parametrize("func,name", FUNC_PARAM)
def test_param_string(func, name):
    raises_named(TypeError, name, lambda: call_with_param(func, name, "abcdefgh"))


@pytest.mark.parametrize("func,name", FUNC_PARAM)
@pytest.mark.parametrize("x_dtype", [np.float16, "bfloat16"])
def test_param_wrong_dtype_for_16bit_x(func, name, x_dtype):
    if x_dtype == "bfloat16":
        x_dtype = pytest.importorskip("ml_dtypes").bfloat16
    x = good_x(x_dtype)
    raises_named(TypeError, name, lambda: call_with_param(func, name, np.ones(N, np.int16), x=x))
    raises_named(ValueError, name, lambda: call_with_param(func, name, np.ones(N + 1, np.float32), x=x))


# --------------------------------------------------------------------------- eps


@pytest.mark.parametrize("eps", [-1e-5, -1.0, -0.0 - 1e-300, math.nan, math.inf, -math.inf], ids=str)
def test_bad_eps_value(norm, eps):
    x = good_x()
    out = np.full_like(x, 7.0)
    raises_named(ValueError, "eps", lambda: norm(x, N, eps=eps, out=out))
    assert np.all(out == 7.0)


@pytest.mark.parametrize("eps", [[1e-5], 1j, object(), np.ones(2)], ids=["list", "complex", "object", "array"])
def test_bad_eps_type(norm, eps):
    raises_prefixed((TypeError, ValueError), "eps", lambda: norm(good_x(), N, eps=eps))


def test_layer_norm_eps_none_is_refused():
    # only RMSNorm gives eps=None a meaning (the dtype's machine epsilon)
    raises_named(TypeError, "eps", lambda: normkit.layer_norm(good_x(), N, eps=None))


def test_eps_zero_and_numpy_scalars_are_fine():
    x = good_x()
    assert np.all(np.isfinite(normkit.layer_norm(x, N, eps=0)))
    assert np.all(np.isfinite(normkit.rms_norm(x, N, eps=np.float32(1e-6))))


# --------------------------------------------------------------------------- out


@pytest.mark.parametrize("shape", [(3, N + 1), (N, 3), (3 * N,), (1, 3, N), (3, 1)], ids=str)
def test_out_wrong_shape(norm, shape):
    out = np.zeros(shape, np.float32)
    raises_named(ValueError, "out", lambda: norm(good_x(), N, out=out))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.complex64])
def test_out_wrong_dtype(norm, dtype):
    out = np.zeros((3, N), dtype)
    raises_named(TypeError, "out", lambda: norm(good_x(), N, out=out))
    assert np.all(out == 0)


@pytest.mark.parametrize(
    "x_dtype,out_dtype",
    [("float16", "bfloat16"), ("float32", "bfloat16"), ("bfloat16", "float16"), ("bfloat16", "float32")],
)
def test_out_wrong_dtype_bfloat16(norm, x_dtype, out_dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = {"float16": np.float16, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    x = good_x(dt[x_dtype])
    out = np.zeros((3, N), dt[out_dtype])
    raises_named(TypeError, "out", lambda: norm(x, N, out=out))
    assert np.all(out.astype(np.float32) == 0)


def test_out_read_only(norm):
    out = np.zeros((3, N), np.float32)
    out.flags.writeable = False
    raises_named(ValueError, "out", lambda: norm(good_x(), N, out=out))
    assert np.all(out == 0)


def test_out_is_read_only_x(norm):
    x = good_x()
    x.flags.writeable = False
    raises_named(ValueError, "out", lambda: norm(x, N, out=x))
    # a read-only x is fine as input
    assert norm(x, N).shape == x.shape


@pytest.mark.parametrize("shift", [1, N, 2 * N - 1, -1, -N])
def test_out_partially_overlapping_x(norm, shift):
    """out overlapping x without being x (shifted by whole rows or by single elements)."""
    buf = np.arange(8 * N, dtype=np.float32)
    start = 2 * N
    x = buf[start : start + 3 * N].reshape(3, N)
    out = buf[start + shift : start + shift + 3 * N].reshape(3, N)
    before = buf.copy()
    raises_named(ValueError, "out", lambda: norm(x, N, out=out))
    assert np.array_equal(buf, before), "memory written despite the error"


def test_out_same_memory_other_strides(norm):
    """A view of x's memory with other strides (x.T of a square array) is not x."""
    buf = np.arange(N * N, dtype=np.float32).reshape(N, N)
    x = buf
    out = buf.T
    before = buf.copy()
    raises_prefixed(ValueError, "out", lambda: norm(x, N, out=out))
    assert np.array_equal(buf, before)


def test_out_interleaved_with_x(norm):
    """out and x interleave in one buffer (every other element): they share no element, which is fine
    (or, if refused, refused as an `out` error)."""
    buf = np.arange(2 * 3 * N, dtype=np.float32).reshape(3, 2 * N)
    x = buf[:, 0::2]
    out = buf[:, 1::2]
    x_before = x.copy()
    try:
        res = norm(x, N, out=out)
    except ValueError as e:
        assert str(e).startswith("out"), str(e)
    else:
        assert res is out
        assert np.array_equal(x, x_before)
        np.testing.assert_array_equal(out, norm(x_before, N))


def test_out_not_an_array(norm):
    raises_named(TypeError, "out", lambda: norm(good_x(), N, out=[[0.0] * N] * 3))


def test_out_bad_input_leaves_x_alone(norm):
    x = good_x()
    before = x.copy()
    with pytest.raises(TypeError):
        norm(x, N, out=np.zeros((3, N), np.float64))
    assert np.array_equal(x, before)


# --------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("n", [0, -1, -100])
def test_set_num_threads_bad(n, restore_threads):
    before = normkit.get_num_threads()
    with pytest.raises(ValueError) as info:
        normkit.set_num_threads(n)
    assert "thread" in str(info.value) or str(info.value).startswith("n")
    assert normkit.get_num_threads() == before


@pytest.mark.parametrize("n", [1.5, "2", None])
def test_set_num_threads_wrong_type(n, restore_threads):
    with pytest.raises(TypeError):
        normkit.set_num_threads(n)


@pytest.mark.parametrize("name", ["bogus", "", "AVX2", "sse2", "avx512 "])
def test_set_kernel_path_unknown(name):
    before = normkit.info()["kernel_path"]
    with pytest.raises(ValueError) as info:
        normkit._set_kernel_path(name)
    assert repr(name) in str(info.value) or name in str(info.value)
    assert normkit.info()["kernel_path"] == before, "a refused path changed the kernels"


def test_set_kernel_path_unsupported():
    info = normkit.info()
    missing = [p for p in info["kernel_paths_compiled"] if p not in info["kernel_paths_supported"]]
    if not missing:
        pytest.skip("this CPU supports every compiled kernel path")
    with pytest.raises(ValueError) as exc:
        normkit._set_kernel_path(missing[0])
    assert missing[0] in str(exc.value)
    assert normkit.info()["kernel_path"] == info["kernel_path"]


def test_rank_above_the_maximum_names_x():
    """normkit handles up to 8 dimensions; more is a ValueError naming x, not a crash."""
    x = np.ones((1,) * 9 + (4,), np.float32)
    with pytest.raises(ValueError, match="^x: 10 dimensions exceed"):
        normkit.layer_norm(x, 4)
    with pytest.raises(ValueError, match="^x: 10 dimensions exceed"):
        normkit.batch_norm(x, None, None, training=True)

"""The fused forms of issue 11: add_layer_norm / add_rms_norm, activation= on every
forward norm, quantize= / scale= (int8, float8_e4m3fn; static and dynamic per-row
scales), against the float64 references (fused_reference.py on top of reference.py
and channel_reference.py), against the unfused calls bit for bit, and against ONNX
Runtime and PyTorch when installed.

Tolerances: the y comparisons use helpers.assert_close (relative to the output's
scale). A quantized value q is checked against the float64 reference r = v / scale:
q must lie between Q(r - e) and Q(r + e), where Q is the reference quantizer and e
bounds the error of r from the accumulation type (e = 2 * TOL * max(1, max |v|) /
scale, TOL = TOL64 for float64 x, TOL32 otherwise, since v is never rounded to a
16-bit type before the quantizer). Away from a rounding boundary that is exact
equality; within e of one (a .5 tie for int8) both neighbours are accepted. The
constructed tie cases (exact v / scale = k + 0.5) are compared exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normkit
from channel_reference import (
    LAYOUTS,
    adaptive_instance_norm_ref,
    batch_norm_ref,
    group_norm_ref,
    instance_norm_ref,
    to_channels_first,
)
from fused_reference import (
    ACTIVATIONS,
    QMAX,
    QUANTIZE_KINDS,
    activation_ref,
    add_sum_ref,
    dynamic_scales_ref,
    e4m3_round,
    quantize_ref,
    quantized_dtype,
    row_max_finite,
)
from helpers import (
    DTYPE_NAMES,
    TOL32,
    TOL64,
    UNIT_VAR_TOL,
    assert_close,
    dtype_name,
    in_layout,
    make_params,
    make_x,
    np_dtype,
    raises_named,
    raises_prefixed,
    same_bits,
)
from reference import layer_norm_ref, rms_norm_ref

ml_dtypes = pytest.importorskip("ml_dtypes")

ROW_FUNCS = ["layer", "rms", "add_layer", "add_rms"]
ADD_FUNCS = ["add_layer", "add_rms"]
ROW_LENGTHS = [1, 7, 33, 768 + 3]
EPS = {"layer": 1e-5, "rms": 1e-6}
# Static scales: not powers of two (v / scale rounds), chosen so that some values
# of a N(0.5, 2) input saturate int8 (|v| > 127 * 0.03 = 3.8) and come near 448 for
# float8 (|v| > 4.48).
STATIC_SCALE = {"int8": 0.03, "float8_e4m3": 0.01}


# --------------------------------------------------------------------------- helpers


def base(func):
    """The plain norm an add_ form ends in: 'layer' or 'rms'."""
    return func[4:] if func.startswith("add_") else func


def n_stats(func):
    return 2 if base(func) == "layer" else 1


def acc_tol(dtype):
    return TOL64 if dtype_name(dtype) == "float64" else TOL32


class Rows:
    """One rows-norm call: x, its arguments, and the ways to run it and its reference."""

    def __init__(self, func, x, ns, weight=None, bias=None, eps="default", residual=None, residual_bias=None):
        self.func, self.x, self.ns = func, x, ns
        self.weight, self.bias = weight, (bias if base(func) == "layer" else None)
        self.eps = EPS[base(func)] if eps == "default" else eps
        self.residual, self.residual_bias = residual, residual_bias
        self.k = 1 if isinstance(ns, int) else len(ns)

    def inputs(self):
        return [a for a in (self.x, self.weight, self.bias, self.residual, self.residual_bias) if a is not None]

    def call(self, **kw):
        if self.func == "layer":
            return normkit.layer_norm(self.x, self.ns, self.weight, self.bias, self.eps, **kw)
        if self.func == "rms":
            return normkit.rms_norm(self.x, self.ns, self.weight, self.eps, **kw)
        if self.func == "add_layer":
            return normkit.add_layer_norm(self.x, self.residual, self.ns, self.weight, self.bias, self.eps,
                                          residual_bias=self.residual_bias, **kw)
        return normkit.add_rms_norm(self.x, self.residual, self.ns, self.weight, self.eps,
                                    residual_bias=self.residual_bias, **kw)

    def plain(self, inp, **kw):
        """The plain norm of `inp` (the stored sum for the add_ forms) with these arguments."""
        if base(self.func) == "layer":
            return normkit.layer_norm(inp, self.ns, self.weight, self.bias, self.eps, **kw)
        return normkit.rms_norm(inp, self.ns, self.weight, self.eps, **kw)

    def s_ref(self):
        return add_sum_ref(self.x, self.residual, self.residual_bias) if self.func in ADD_FUNCS else None

    def v_ref(self, activation=None, inp=None):
        """float64 act(affine(norm)) of the norm's input (the reference sum by default)."""
        if inp is None:
            inp = self.s_ref() if self.func in ADD_FUNCS else self.x
        if base(self.func) == "layer":
            v = layer_norm_ref(inp, self.ns, self.weight, self.bias, self.eps)[0]
        else:
            v = rms_norm_ref(inp, self.ns, self.weight, self.eps)[0]
        return activation_ref(v, activation)


def make_rows(func, rng, shape, ns, dtype, residual_shape=None, residual_bias=False):
    dt = np_dtype(dtype)
    x = make_x(rng, shape, dt)
    nshape = (ns,) if isinstance(ns, int) else tuple(ns)
    weight, bias = make_params(rng, nshape, dt, "both")
    residual = rb = None
    if func in ADD_FUNCS:
        residual = make_x(rng, shape if residual_shape is None else residual_shape, dt, loc=-0.25, scale=1.0)
        if residual_bias:
            rb = (0.25 * rng.standard_normal(nshape)).astype(dt)
    return Rows(func, x, ns, weight, bias, residual=residual, residual_bias=rb)


def split(func, result, quantize=None, dynamic=False, return_stats=False):
    """The contract's output order: output, dynamic scales, s (add_ forms), statistics.
    Returns a dict; checks the count and that several outputs come as a tuple."""
    names = ["y"]
    if quantize is not None and dynamic:
        names.append("scales")
    if func in ADD_FUNCS:
        names.append("s")
    if return_stats:
        names += ["mean", "rstd"] if base(func) == "layer" else ["rstd"]
    if len(names) == 1:
        assert isinstance(result, np.ndarray), f"expected one array, got {type(result).__name__}"
        return {"y": result}
    assert isinstance(result, tuple), f"expected a tuple of {names}, got {type(result).__name__}"
    assert len(result) == len(names), f"expected {names}, got {len(result)} outputs"
    return dict(zip(names, result))


def snapshot(arrays):
    return [a.copy() for a in arrays]


def assert_unchanged(arrays, copies, what="input"):
    for i, (a, c) in enumerate(zip(arrays, copies)):
        assert same_bits(a, c), f"{what} {i} was modified"


def assert_quantized(q, v_ref, scale, kind, x_dtype, rows_k=None, what="q"):
    """q against the float64 reference v / scale (see the module docstring).
    scale: a float or an array broadcasting against v (the reference's scales);
    rows_k: k for dynamic (per row) scales, None for a static scale."""
    assert q.dtype == quantized_dtype(kind), f"{what}: dtype {q.dtype}, expected {quantized_dtype(kind)}"
    assert q.shape == v_ref.shape, f"{what}: shape {q.shape} != {v_ref.shape}"
    qa = q.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        r = v_ref / scale
        if rows_k is None:
            finite = np.abs(v_ref[np.isfinite(v_ref)])
            mag = max(1.0, float(finite.max())) if finite.size else 1.0
        else:
            mag = np.maximum(1.0, row_max_finite(v_ref, rows_k))
        e = 2.0 * acc_tol(x_dtype) * mag / scale
        lo, hi = quantize_ref(r - e, kind), quantize_ref(r + e, kind)
        ok = (qa >= lo) & (qa <= hi)
        ok |= np.isnan(qa) & np.isnan(lo)
    if not ok.all():
        i = np.unravel_index(np.argmin(ok), ok.shape)
        raise AssertionError(
            f"{what} ({kind}, x {dtype_name(x_dtype)}): {(~ok).sum()} of {ok.size} wrong; first at {i}: got {qa[i]!r}, "
            f"reference v/scale = {r[i]!r} -> accepted [{lo[i]!r}, {hi[i]!r}]"
        )


def assert_scales(scales, v_ref, k, kind, x_dtype):
    """Dynamic scales: float32 of the statistics' shape, max finite |v| / qmax (1 for
    rows with no nonzero finite value)."""
    expected_shape = v_ref.shape[: v_ref.ndim - k] + (1,) * k
    assert scales.dtype == np.float32, f"scales: dtype {scales.dtype}, expected float32"
    assert scales.shape == expected_shape, f"scales: shape {scales.shape}, expected {expected_shape}"
    ref = dynamic_scales_ref(v_ref, k, kind)
    m = row_max_finite(v_ref, k)
    tol = 2.0 * acc_tol(x_dtype) * np.maximum(1.0, m) / QMAX[kind] + 2.0**-23 * ref
    err = np.abs(scales.astype(np.float64) - ref)
    assert np.all(err <= tol), f"scales: max |err| {err.max():.3g}; got {scales.ravel()[:8]}, expected {ref.ravel()[:8]}"


def assert_quantizes(q, y, scale, kind, what="q"):
    """q is the quantization of the float32/float64 unquantized y (v itself) by
    `scale` (a float or the returned scales), up to the rounding of the division:
    one step either way is allowed where y / scale is within 1e-4 of a boundary
    (int8) or within a relative 1e-6 (float8)."""
    r = y.astype(np.float64) / np.asarray(scale, dtype=np.float64)
    e = 1e-4 if kind == "int8" else 1e-6 * np.abs(r)
    qa = q.astype(np.float64)
    with np.errstate(invalid="ignore"):
        lo, hi = quantize_ref(r - e, kind), quantize_ref(r + e, kind)
        ok = ((qa >= lo) & (qa <= hi)) | (np.isnan(qa) & np.isnan(lo))
    if not ok.all():
        i = np.unravel_index(np.argmin(ok), ok.shape)
        raise AssertionError(f"{what}: got {qa[i]!r} for y/scale = {r[i]!r} (accepted [{lo[i]!r}, {hi[i]!r}])")


# --------------------------------------------------------------------------- the references themselves


def e4m3_values():
    every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    finite = np.unique(every[np.isfinite(every)])
    mids = (finite[:-1] + finite[1:]) / 2
    table = [0.0, -0.0, 2.0**-10, 3 * 2.0**-10, 2.0**-9, 5 * 2.0**-11, 2.0**-6, 1.0625, 1.1875, -1.0625, 17.0,
             19.0, 1e-30, 440.0, 447.9, 448.0, 449.0, 464.0, 465.0, 479.9, 480.0, 1000.0, 1e30, math.inf, -math.inf,
             math.nan, 0.1, 0.3, 232.0, 240.0, 248.0]
    rng = np.random.default_rng(5)
    return np.concatenate([table, finite, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                           rng.standard_normal(2000) * 50, rng.standard_normal(2000) * 0.01])


def test_reference_float8_oracle_matches_bit_level_rounding():
    """The oracle (clip to +-448, then ml_dtypes' cast) equals a hand-written E4M3
    round-to-nearest-even with saturation on every value of a table: every finite
    E4M3 value, every midpoint and its neighbours, subnormals, ties, 448..480, inf, NaN."""
    values = e4m3_values()
    hand = np.array([e4m3_round(float(v)) for v in values])
    oracle = quantize_ref(values, "float8_e4m3")
    same = (hand == oracle) | (np.isnan(hand) & np.isnan(oracle))
    assert same.all(), f"oracle and bit-level rounding differ at {values[~same][:10]}"
    assert np.array_equal(np.signbit(hand), np.signbit(oracle))
    # spot checks of the rules themselves
    assert e4m3_round(1.0625) == 1.0 and e4m3_round(1.1875) == 1.25  # ties to even
    assert e4m3_round(2.0**-10) == 0.0 and e4m3_round(3 * 2.0**-10) == 2.0**-8  # subnormal ties
    assert e4m3_round(17.0) == 16.0 and e4m3_round(19.0) == 20.0
    assert e4m3_round(math.inf) == 448.0 and e4m3_round(-1e9) == -448.0 and math.isnan(e4m3_round(math.nan))


def test_reference_int8_rules():
    r = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, 1e9, -np.inf, np.inf, np.nan, 3.4999])
    expected = [0, 2, 2, 0, -2, -2, 126, 127, -127, 127, -127, 127, 0, 3]
    assert quantize_ref(r, "int8").tolist() == expected


def test_reference_activations_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    v = np.concatenate([np.random.default_rng(3).standard_normal(500) * 4, [0.0, 30.0, -30.0, 100.0, -100.0, np.nan]])
    t = torch.from_numpy(v)
    theirs = {"relu": F.relu(t), "silu": F.silu(t), "gelu": F.gelu(t), "gelu_tanh": F.gelu(t, approximate="tanh")}
    for name in ACTIVATIONS:
        ours, other = activation_ref(v, name), theirs[name].numpy()
        assert np.array_equal(np.isnan(ours), np.isnan(other)), name
        ok = ~np.isnan(ours)
        assert np.max(np.abs(ours[ok] - other[ok])) < 1e-14, name


def test_reference_dynamic_scales_rules():
    v = np.array([[1.0, -254.0, np.nan], [0.0, 0.0, 0.0], [np.nan, np.inf, 0.0], [np.inf, -3.0, np.nan]])
    assert dynamic_scales_ref(v, 1, "int8").ravel().tolist() == [2.0, 1.0, 1.0, 3.0 / 127]
    assert dynamic_scales_ref(v, 1, "float8_e4m3").ravel().tolist() == [254.0 / 448, 1.0, 1.0, 3.0 / 448]


def test_reference_sum_is_numpy_float32():
    rng = np.random.default_rng(4)
    x, r, b = (rng.standard_normal((3, 8)).astype(np.float32) for _ in range(3))
    assert same_bits(add_sum_ref(x, r, b[0]), (x + r) + b[0])


# --------------------------------------------------------------------------- add_layer_norm / add_rms_norm

RESIDUAL_SHAPES = {"full": lambda lead, n: lead + (n,), "2d": lambda lead, n: lead[1:] + (n,),
                   "3d1": lambda lead, n: (1,) + lead[1:] + (n,)}


@pytest.mark.parametrize("residual_bias", [False, True], ids=["nobias", "rbias"])
@pytest.mark.parametrize("residual", list(RESIDUAL_SHAPES))
@pytest.mark.parametrize("n", ROW_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ADD_FUNCS)
def test_add_norm(kernel_path, func, dtype, n, residual, residual_bias, rng):
    """s is (x + residual) (+ residual_bias) rounded once (bit for bit), y is the plain
    norm of the returned s bit for bit (and close to the float64 reference), the
    statistics are the plain norm's, and nothing the caller passed changes."""
    lead = (2, 3)
    c = make_rows(func, rng, lead + (n,), n, dtype, RESIDUAL_SHAPES[residual](lead, n), residual_bias)
    dt = c.x.dtype
    inputs = c.inputs()
    copies = snapshot(inputs)

    out = split(func, c.call())
    y, s = out["y"], out["s"]
    assert y.dtype == dt and s.dtype == dt and y.shape == c.x.shape and s.shape == c.x.shape
    assert same_bits(s, c.s_ref()), "s is not (x + residual) (+ residual_bias) rounded once to x's dtype"
    assert same_bits(y, c.plain(s)), "fused y differs from the plain norm of the returned s"
    assert_close(y, c.v_ref(inp=s), dt)
    assert_unchanged(inputs, copies)

    full = split(func, c.call(return_stats=True), return_stats=True)
    plain = c.plain(s, return_stats=True)
    assert same_bits(full["y"], y) and same_bits(full["s"], s), "return_stats changed y or s"
    assert same_bits(full["rstd"], plain[-1]), "rstd differs from the plain norm's"
    if func == "add_layer":
        assert same_bits(full["mean"], plain[1]), "mean differs from the plain norm's"
    assert_unchanged(inputs, copies)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ADD_FUNCS)
def test_add_norm_defaults(kernel_path, func, dtype, rng):
    """No weight/bias and the default eps (1e-5; machine epsilon for RMSNorm)."""
    dt = np_dtype(dtype)
    x, res = make_x(rng, (4, 33), dt), make_x(rng, (4, 33), dt)
    if func == "add_layer":
        y, s = normkit.add_layer_norm(x, res, 33)
        assert same_bits(y, normkit.layer_norm(s, 33))
    else:
        y, s = normkit.add_rms_norm(x, res, 33)
        assert same_bits(y, normkit.rms_norm(s, 33))
    assert same_bits(s, add_sum_ref(x, res))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("func", ADD_FUNCS)
def test_add_norm_multi_dim_normalized_shape(kernel_path, func, dtype, rng):
    """normalized_shape of two dims; residual broadcasting over the one leading dim;
    dynamic scales and statistics of shape lead + (1, 1)."""
    c = make_rows(func, rng, (4, 3, 11), (3, 11), dtype, (3, 11), residual_bias=True)
    out = split(func, c.call(quantize="int8", return_stats=True), "int8", True, True)
    s = out["s"]
    assert same_bits(s, c.s_ref())
    q, scales, *stats = c.plain(s, quantize="int8", return_stats=True)
    assert same_bits(out["y"], q) and same_bits(out["scales"], scales)
    assert out["scales"].shape == (4, 1, 1) and out["rstd"].shape == (4, 1, 1)
    assert same_bits(out["rstd"], stats[-1])


IN_PLACE = ["sum_out=residual", "out=x", "both", "sum_out=x", "given"]


@pytest.mark.parametrize("mode", IN_PLACE)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ADD_FUNCS)
def test_add_norm_in_place(kernel_path, func, dtype, mode, rng):
    """sum_out=residual (vLLM's convention), out=x, both together, sum_out=x, and
    fresh out/sum_out arrays: the results equal the out-of-place call bit for bit
    and the returned arrays ARE the given ones."""
    c = make_rows(func, rng, (5, 33), 33, dtype, residual_bias=True)
    y0, s0 = c.call()
    x_copy, res_copy = c.x.copy(), c.residual.copy()
    kw = {}
    if mode in ("sum_out=residual", "both"):
        kw["sum_out"] = c.residual
    if mode in ("out=x", "both"):
        kw["out"] = c.x
    if mode == "sum_out=x":
        kw["sum_out"] = c.x
    if mode == "given":
        kw = {"out": np.empty_like(c.x), "sum_out": np.empty_like(c.x)}
    y, s = c.call(**kw)
    assert same_bits(y, y0), f"{mode}: y differs from the out-of-place call"
    assert same_bits(s, s0), f"{mode}: s differs from the out-of-place call"
    if "out" in kw:
        assert y is kw["out"], f"{mode}: the returned y is not out"
    if "sum_out" in kw:
        assert s is kw["sum_out"], f"{mode}: the returned s is not sum_out"
    if mode == "sum_out=residual":
        assert same_bits(c.x, x_copy), "x changed although it is neither out nor sum_out"
    if mode == "out=x":
        assert same_bits(c.residual, res_copy), "residual changed although it is neither out nor sum_out"
    if mode == "given":
        assert same_bits(c.x, x_copy) and same_bits(c.residual, res_copy)


@pytest.mark.parametrize("func", ADD_FUNCS)
def test_add_norm_in_place_quantized(kernel_path, func, rng):
    """add + norm into int8 with dynamic scales, the sum written over residual
    (the transformer block step), and the statistics: (q, scales, s, stats)."""
    c = make_rows(func, rng, (6, 771), 771, "float32")
    q0, scales0, s0, *stats0 = c.call(quantize="int8", return_stats=True)
    q_out = np.empty(c.x.shape, np.int8)
    res = c.residual
    out = split(func, c.call(quantize="int8", out=q_out, sum_out=res, return_stats=True), "int8", True, True)
    assert out["y"] is q_out and out["s"] is res
    assert same_bits(q_out, q0) and same_bits(res, s0) and same_bits(out["scales"], scales0)
    assert same_bits(out["rstd"], stats0[-1])


@pytest.mark.parametrize("func", ADD_FUNCS)
def test_add_norm_hostile(kernel_path, func, rng):
    """x of mean 1e4 and std 1e-2 (float32) plus a small residual: y matches the
    reference of the stored s, and the LayerNorm output has unit variance."""
    x = (1e4 + 1e-2 * rng.standard_normal((6, 771))).astype(np.float32)
    c = make_rows(func, rng, (6, 771), 771, "float32", residual_bias=True)
    c.x = x
    c.weight = c.bias = None
    c.residual = (1e-3 * rng.standard_normal((6, 771))).astype(np.float32)
    y, s = c.call()
    assert same_bits(s, c.s_ref())
    assert same_bits(y, c.plain(s))
    assert_close(y, c.v_ref(inp=s), np.float32)
    if func == "add_layer":
        var = y.astype(np.float64).var(axis=1)
        assert np.all(np.abs(var - 1.0) < UNIT_VAR_TOL), var


@pytest.mark.parametrize("quantize", [None, "int8", "float8_e4m3"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("func", ROW_FUNCS)
def test_nan_row_leaves_other_rows_exact(kernel_path, func, dtype, quantize, rng):
    """A NaN in one row of x: the other rows (y or q, dynamic scales, s) are bit for
    bit those of the call without the NaN; the NaN row's y is NaN (int8: 0)."""
    c = make_rows(func, rng, (5, 33), 33, dtype)
    clean = split(func, c.call(quantize=quantize), quantize, True)
    c.x = c.x.copy()
    c.x[2, 7] = np.nan
    dirty = split(func, c.call(quantize=quantize), quantize, True)
    keep = [0, 1, 3, 4]
    for name in clean:
        assert same_bits(dirty[name][keep], clean[name][keep]), f"{name}: rows without the NaN changed"
    y = dirty["y"].astype(np.float64)
    if quantize == "int8":
        assert np.all(y[2] == 0), "int8 of a NaN row (v all NaN) must be 0"
        assert dirty["scales"][2, 0] == 1.0, "a row with no finite value gets scale 1"
    else:
        assert np.isnan(y[2]).all(), "the NaN row must be NaN"
        if quantize is not None:
            assert dirty["scales"][2, 0] == 1.0
    if "s" in dirty:
        assert np.isnan(dirty["s"][2, 7]) and not np.isnan(np.delete(dirty["s"][2], 7)).any()


@pytest.mark.parametrize("func", ROW_FUNCS)
def test_empty_and_size_one_rows(kernel_path, func, rng):
    """Empty arrays (no rows) give empty outputs of the right shapes and dtypes;
    rows of one element match the reference (and the quantized form)."""
    for shape in [(0, 8), (2, 0, 8)]:
        c = make_rows(func, rng, shape, 8, "float32")
        out = split(func, c.call(quantize="int8", return_stats=True), "int8", True, True)
        assert out["y"].shape == shape and out["y"].dtype == np.int8
        assert out["scales"].shape == shape[:-1] + (1,) and out["scales"].dtype == np.float32
        assert out["rstd"].shape == shape[:-1] + (1,)
        if "s" in out:
            assert out["s"].shape == shape
        plain = split(func, c.call())
        assert plain["y"].shape == shape
    c = make_rows(func, rng, (4, 1), 1, "float32")
    out = split(func, c.call())
    assert_close(out["y"], c.v_ref(inp=out.get("s")), np.float32)
    out = split(func, c.call(quantize="int8"), "int8", True)
    v = c.v_ref(inp=out.get("s"))
    assert_scales(out["scales"], v, 1, "int8", np.float32)
    assert_quantized(out["y"], v, dynamic_scales_ref(v, 1, "int8"), "int8", np.float32, rows_k=1)


# --------------------------------------------------------------------------- activation


@pytest.mark.parametrize("n", [7, 771])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("func", ROW_FUNCS)
def test_activation_rows(kernel_path, func, activation, dtype, n, rng):
    """y = act(affine(norm)) against the float64 reference; the statistics are those
    of the call without activation; the add_ forms equal the plain norm of s with
    the same activation bit for bit."""
    c = make_rows(func, rng, (3, n), n, dtype, residual_bias=True)
    inputs = c.inputs()
    copies = snapshot(inputs)
    out = split(func, c.call(activation=activation, return_stats=True), return_stats=True)
    ref_out = split(func, c.call(return_stats=True), return_stats=True)
    y = out["y"]
    assert y.dtype == c.x.dtype and y.shape == c.x.shape
    inp = out.get("s")
    assert_close(y, c.v_ref(activation, inp=inp), c.x.dtype)
    for name in out:
        if name != "y":
            assert same_bits(out[name], ref_out[name]), f"{name} changed with the activation"
    if func in ADD_FUNCS:
        assert same_bits(y, c.plain(inp, activation=activation))
    assert_unchanged(inputs, copies)


def test_activation_none_is_default(kernel_path, rng):
    x = make_x(rng, (3, 33), np.float32)
    assert same_bits(normkit.layer_norm(x, 33, activation=None), normkit.layer_norm(x, 33))
    assert same_bits(normkit.group_norm(x.reshape(3, 3, 11), 3, activation=None), normkit.group_norm(x.reshape(3, 3, 11), 3))


class Channel:
    """One channel-norm call in a layout; `call` returns (result, running stats after)."""

    SHAPES = {2: (33, 19), 3: (3, 18, 33), 4: (2, 18, 3, 5)}

    def __init__(self, norm, layout, dtype, rng):
        dt = np_dtype(dtype)
        rank = LAYOUTS[layout][0]
        shape_cf = self.SHAPES[rank]
        c = shape_cf[1]
        self.norm, self.layout, self.dtype = norm, layout, dt
        self.x = in_layout(make_x(rng, shape_cf, dt), layout)
        self.weight, self.bias = make_params(rng, (c,), dt, "both")
        self.rm = (0.1 * rng.standard_normal(c)).astype(dt)
        self.rv = (0.5 + rng.random(c)).astype(dt)
        self.groups = 3
        self.style = in_layout(make_x(rng, shape_cf, dt, loc=1.0, scale=0.5), layout) if norm == "adain" else None

    def inputs(self):
        return [a for a in (self.x, self.weight, self.bias, self.style) if a is not None]

    def call(self, **kw):
        rm, rv = self.rm.copy(), self.rv.copy()
        if self.norm in ("batch_train", "batch_eval"):
            r = normkit.batch_norm(self.x, rm, rv, self.weight, self.bias, self.norm == "batch_train", 0.1, 1e-5,
                                   layout=self.layout, **kw)
        elif self.norm == "instance":
            r = normkit.instance_norm(self.x, rm, rv, self.weight, self.bias, True, 0.1, 1e-5, layout=self.layout, **kw)
        elif self.norm == "group":
            r = normkit.group_norm(self.x, self.groups, self.weight, self.bias, 1e-5, layout=self.layout, **kw)
        else:
            r = normkit.adaptive_instance_norm(self.x, self.style, 1e-5, layout=self.layout, **kw)
        return r, (rm, rv)

    def v_ref(self, activation=None):
        if self.norm in ("batch_train", "batch_eval"):
            v = batch_norm_ref(self.x, self.rm, self.rv, self.weight, self.bias, self.norm == "batch_train", 0.1, 1e-5,
                               self.layout)[0]
        elif self.norm == "instance":
            v = instance_norm_ref(self.x, self.rm, self.rv, self.weight, self.bias, True, 0.1, 1e-5, self.layout)[0]
        elif self.norm == "group":
            v = group_norm_ref(self.x, self.groups, self.weight, self.bias, 1e-5, self.layout)[0]
        else:
            v = adaptive_instance_norm_ref(self.x, self.style, 1e-5, self.layout)
        return activation_ref(v, activation)


CHANNEL_CASES = (
    [("batch_train", lay) for lay in ["NC", "NCL", "NLC", "NCHW", "NHWC"]]
    + [("batch_eval", lay) for lay in ["NC", "NCHW", "NHWC"]]
    + [("instance", lay) for lay in ["NCL", "NLC", "NCHW", "NHWC"]]
    + [("group", lay) for lay in ["NCL", "NLC", "NCHW", "NHWC"]]
    + [("adain", lay) for lay in ["NCHW", "NHWC"]]
)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm,layout", CHANNEL_CASES, ids=[f"{n}-{lay}" for n, lay in CHANNEL_CASES])
def test_activation_channels(kernel_path, norm, layout, activation, dtype, rng):
    """Every channel norm in both layouts: act(affine(norm)) against the reference;
    running statistics updated as without the activation; inputs unchanged."""
    c = Channel(norm, layout, dtype, rng)
    inputs = c.inputs()
    copies = snapshot(inputs)
    y, running = c.call(activation=activation)
    _, running0 = c.call()
    assert y.dtype == c.dtype and y.shape == c.x.shape
    assert_close(y, c.v_ref(activation), c.dtype)
    for a, b in zip(running, running0):
        assert same_bits(a, b), "running statistics differ with the activation"
    assert_unchanged(inputs, copies)


def test_relu_keeps_nan(kernel_path, rng):
    x = make_x(rng, (3, 33), np.float32)
    x[1, 4] = np.nan
    y = normkit.rms_norm(x, 33, activation="relu")
    assert np.isnan(y[1]).all() and not np.isnan(y[[0, 2]]).any()
    assert np.all(y[[0, 2]] >= 0)
    xc = make_x(rng, (2, 4, 9), np.float32)
    xc[1, 2, 3] = np.nan
    yc = normkit.group_norm(xc, 2, activation="relu")
    assert np.isnan(yc[1, 2:]).all() and not np.isnan(yc[0]).any() and not np.isnan(yc[1, :2]).any()


# --------------------------------------------------------------------------- quantization, rows


@pytest.mark.parametrize("n", [1, 33, 771])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("func", ROW_FUNCS)
def test_quantize_rows(kernel_path, func, kind, mode, dtype, n, rng):
    """q against the float64 reference; dynamic scales; for float32/float64 x q is
    the quantization of the unquantized y by the same scale; the add_ forms equal
    the plain norm of s with the same quantization bit for bit."""
    c = make_rows(func, rng, (4, n), n, dtype, residual_bias=True)
    dynamic = mode == "dynamic"
    scale = None if dynamic else STATIC_SCALE[kind]
    inputs = c.inputs()
    copies = snapshot(inputs)
    out = split(func, c.call(quantize=kind, scale=scale), kind, dynamic)
    q = out["y"]
    inp = out.get("s")
    if inp is not None:
        assert same_bits(inp, c.s_ref())
    v = c.v_ref(inp=inp)
    if dynamic:
        assert_scales(out["scales"], v, 1, kind, c.x.dtype)
        assert_quantized(q, v, dynamic_scales_ref(v, 1, kind), kind, c.x.dtype, rows_k=1)
    else:
        assert_quantized(q, v, scale, kind, c.x.dtype)
    if dtype_name(c.x.dtype) in ("float32", "float64"):
        y = split(func, c.call())["y"]
        assert_quantizes(q, y, out["scales"] if dynamic else scale, kind)
    if func in ADD_FUNCS:
        plain = c.plain(inp, quantize=kind, scale=scale)
        plain = plain if isinstance(plain, tuple) else (plain,)
        assert same_bits(q, plain[0]), "fused q differs from the plain norm of s"
        if dynamic:
            assert same_bits(out["scales"], plain[1])
    assert_unchanged(inputs, copies)


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("func", ROW_FUNCS)
def test_quantize_after_activation(kernel_path, func, activation, kind, rng):
    """The activation applies before the quantizer (static and dynamic)."""
    c = make_rows(func, rng, (4, 33), 33, "float32")
    out = split(func, c.call(activation=activation, quantize=kind), kind, True)
    v = c.v_ref(activation, inp=out.get("s"))
    assert_scales(out["scales"], v, 1, kind, np.float32)
    assert_quantized(out["y"], v, dynamic_scales_ref(v, 1, kind), kind, np.float32, rows_k=1)
    q = split(func, c.call(activation=activation, quantize=kind, scale=STATIC_SCALE[kind]), kind, False)["y"]
    assert_quantized(q, v, STATIC_SCALE[kind], kind, np.float32)


def _tie_rows(kind):
    """Rows whose values x make v / scale == x exactly for rms_norm (see
    test_quantize_ties_rows), and the exact quantized results."""
    if kind == "int8":
        rows = [
            [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5],
            [4.5, 5.5, 6.5, 7.5, -4.5, -5.5, -6.5, -7.5],
            [126.5, 127.5, -126.5, -127.5, 125.5, 120.5, -121.5, 200.0],  # 127.5 and 200 saturate
        ]
    else:
        rows = [
            [1.0625, 1.1875, -1.0625, -1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-10), -3 * 2.0**-10],
            [17.0, 19.0, -17.0, -19.0, 1.3125, 1.4375, 0.5, 0.0],
            [464.0, 500.0, -464.0, -1024.0, 232.0, 248.0, 320.0, 352.0],  # 464 up: saturate to 448
        ]
    x = np.array(rows, dtype=np.float64)
    return x, quantize_ref(x, kind)


def _lowest_bit(value):
    """The largest power of two dividing value (a nonzero float)."""
    m, e = math.frexp(value)  # value = m * 2**e, m has at most 53 bits
    units = int(m * 2.0**53)
    return 2.0 ** (e - 53 + ((units & -units).bit_length() - 1))


def _rms_tie_case(row):
    """eps with mean(row**2) + eps == 4**m exactly, so rstd = 2**-m exactly; every
    partial sum of the squares is exact in float32 (checked)."""
    row = np.asarray(row, dtype=np.float64)
    squares = row * row
    quantum = min(_lowest_bit(float(sq)) for sq in squares if sq)
    total = squares.sum()
    assert total / quantum < 2.0**24, "partial sums of the squares would round in float32"
    ms = total / row.size
    m = max(0, math.ceil(math.log(2 * ms, 4)))
    eps = 4.0**m - ms
    assert float(np.float32(eps)) == eps and eps > 0
    return eps, 2.0**-m


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("func", ["rms", "add_rms"])
def test_quantize_ties_rows(kernel_path, func, kind, dtype):
    """rms_norm with an eps that makes rstd a power of two and scale = rstd: v / scale
    is x exactly, placed on .5 ties (int8) and on E4M3 midpoints (float8); the result
    must be round-half-to-even, with saturation, exactly."""
    dt = np_dtype(dtype)
    x64, expected = _tie_rows(kind)
    for x_row, exp_row in zip(x64, expected):
        x = x_row.reshape(1, -1).astype(dt)
        assert np.array_equal(x.astype(np.float64), x_row.reshape(1, -1)), "tie value not representable"
        eps, rstd = _rms_tie_case(x_row)
        if func == "rms":
            q, got_rstd = normkit.rms_norm(x, 8, None, eps, quantize=kind, scale=rstd, return_stats=True)
        else:
            residual = np.zeros_like(x)
            q, _, got_rstd = normkit.add_rms_norm(x, residual, 8, None, eps, quantize=kind, scale=rstd,
                                                  return_stats=True)
        assert float(got_rstd[0, 0]) == rstd, f"rstd {got_rstd[0, 0]!r} is not exactly {rstd}: not a rounding test"
        got = q.astype(np.float64)[0]
        assert np.array_equal(got, exp_row), f"{kind}: v/scale = {x_row.tolist()} gave {got.tolist()}, expected {exp_row.tolist()}"


# --------------------------------------------------------------------------- quantization, channels


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_quantize_ties_batch_norm(kernel_path, layout, kind, dtype):
    """BatchNorm eval with running_mean 0, running_var 1 - eps (eps 0.25, so rstd is
    exactly 1), weight 1, bias 0: v = x exactly; ties must round to even."""
    dt = np_dtype(dtype)
    x64, expected = _tie_rows(kind)
    values = x64.ravel()
    exp = expected.ravel()
    c = 4
    n = values.size // c  # 24 values -> (6, 4)
    shape_cf = {"NC": (n, c), "NCHW": (n, c, 1, 1), "NHWC": (n, c, 1, 1)}[layout]
    x_cf = values.reshape(shape_cf).astype(dt)
    x = in_layout(x_cf, layout)
    rm, rv = np.zeros(c, dt), np.full(c, 0.75, dt)
    w, b = np.ones(c, dt), np.zeros(c, dt)
    for scale, factor in [(1.0, 1.0), (0.25, 0.25)]:
        q = normkit.batch_norm((x.astype(np.float64) * factor).astype(dt), rm, rv, w, b, False, 0.1, 0.25,
                               layout=layout, quantize=kind, scale=scale)
        got = to_channels_first(q, layout).astype(np.float64).ravel()
        assert np.array_equal(got, exp), f"{kind} scale {scale}: got {got.tolist()}, expected {exp.tolist()}"


CHANNEL_Q_CASES = (
    [("batch_train", lay) for lay in ["NC", "NCL", "NLC", "NCHW", "NHWC"]]
    + [("batch_eval", lay) for lay in ["NC", "NCHW", "NHWC"]]
    + [("group", lay) for lay in ["NCL", "NLC", "NCHW", "NHWC"]]
)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("norm,layout", CHANNEL_Q_CASES, ids=[f"{n}-{lay}" for n, lay in CHANNEL_Q_CASES])
def test_quantize_channels(kernel_path, norm, layout, kind, dtype, rng):
    """batch_norm / group_norm with a static scale (values that saturate included):
    q against the reference; with return_stats (q, mean, rstd) with the statistics
    and running statistics of the unquantized call; q the quantization of the
    unquantized y for float32/float64."""
    c = Channel(norm, layout, dtype, rng)
    scale = STATIC_SCALE[kind]
    inputs = c.inputs()
    copies = snapshot(inputs)
    q, running = c.call(quantize=kind, scale=scale)
    assert isinstance(q, np.ndarray)
    v = c.v_ref()
    assert_quantized(q, v, scale, kind, c.dtype)
    (q2, mean, rstd), running2 = c.call(quantize=kind, scale=scale, return_stats=True)
    (y, mean0, rstd0), running0 = c.call(return_stats=True)
    assert same_bits(q2, q) and same_bits(mean, mean0) and same_bits(rstd, rstd0)
    for a, b in zip(running + running2, running0 + running0):
        assert same_bits(a, b), "running statistics differ with quantize"
    if dtype_name(c.dtype) in ("float32", "float64"):
        assert_quantizes(q, y, scale, kind)
    assert_unchanged(inputs, copies)


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_epilogue_over_channel_chunks(kernel_path, training, kind, rng):
    """BatchNorm channels first on 7x7 planes with C past one 64 KiB table, so the
    apply takes three chunks of channels: relu and a static-scale quantization in the
    output stage against the float64 reference, and the quantization of the plain
    call's relu output."""
    c = 2 * ((64 * 1024) // (49 * 4)) + 7
    x = make_x(rng, (2, c, 7, 7), np.float32)
    rm, rv = (0.1 * rng.standard_normal(c)).astype(np.float32), (0.5 + rng.random(c)).astype(np.float32)
    w, b = make_params(rng, (c,), np.float32, "both")
    scale = STATIC_SCALE[kind]
    q = normkit.batch_norm(x, rm.copy(), rv.copy(), w, b, training, activation="relu", quantize=kind, scale=scale)
    v = batch_norm_ref(x, rm, rv, w, b, training, 0.1, 1e-5, "NCHW")[0]
    assert_quantized(q, activation_ref(v, "relu"), scale, kind, np.float32)
    y = normkit.batch_norm(x, rm.copy(), rv.copy(), w, b, training, activation="relu")
    assert_quantizes(q, y, scale, kind)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_quantize_channels_after_activation(kernel_path, layout, kind, activation, rng):
    c = Channel("group", layout, "float32", rng)
    q, _ = c.call(activation=activation, quantize=kind, scale=STATIC_SCALE[kind])
    assert_quantized(q, c.v_ref(activation), STATIC_SCALE[kind], kind, np.float32)


# --------------------------------------------------------------------------- saturation and special rows


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_quantize_saturates(kernel_path, kind, rng):
    """A tiny static scale saturates everything to +-127 / +-448 (sign kept);
    NaN gives 0 (int8) or NaN (float8)."""
    x = make_x(rng, (3, 33), np.float32)
    x[2, 5] = np.nan
    q = normkit.layer_norm(x, 33, quantize=kind, scale=1e-6).astype(np.float64)
    v = layer_norm_ref(x, 33)[0]
    qmax = QMAX[kind]
    rows = v[:2]
    assert np.array_equal(q[:2], np.where(rows > 0, qmax, np.where(rows < 0, -qmax, 0.0)))
    if kind == "int8":
        assert np.all(q[2] == 0)
    else:
        assert np.isnan(q[2]).all()
    # batch_norm and group_norm saturate too
    xc = make_x(rng, (2, 4, 9), np.float32)
    qg = normkit.group_norm(xc, 2, quantize=kind, scale=1e-6).astype(np.float64)
    assert set(np.unique(np.abs(qg))) <= {qmax, 0.0}


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
def test_dynamic_scales_special_rows(kernel_path, kind, rng):
    """Dynamic scales: a row of zeros gets scale 1 and q 0; a row whose weight makes
    some v infinite takes its scale from the finite values (inf ignored) and the
    infinite values saturate; a NaN in v is ignored by the scale (NaN -> 0 for int8)."""
    x = make_x(rng, (3, 16), np.float32)
    x[0] = 0.0
    q, scales = normkit.rms_norm(x, 16, None, 1e-6, quantize=kind)
    assert scales[0, 0] == 1.0 and np.all(q[0].astype(np.float64) == 0)
    v = rms_norm_ref(x, 16, None, 1e-6)[0]
    assert_scales(scales[1:], v[1:], 1, kind, np.float32)

    weight = np.ones(16, np.float32)
    weight[3] = np.inf
    x = make_x(rng, (3, 16), np.float32)
    x[:, 3] = np.where(x[:, 3] == 0, 1.0, x[:, 3])
    q, scales = normkit.rms_norm(x, 16, weight, 1e-6, quantize=kind)
    v = rms_norm_ref(x, 16, weight, 1e-6)[0]
    assert np.isinf(v[:, 3]).all()
    assert_scales(scales, v, 1, kind, np.float32)
    assert np.array_equal(q[:, 3].astype(np.float64), np.sign(v[:, 3]) * QMAX[kind])
    assert_quantized(q, v, dynamic_scales_ref(v, 1, kind), kind, np.float32, rows_k=1)

    # NaN in v without NaN in the statistics: weight NaN at one position
    weight = np.ones(16, np.float32)
    weight[5] = np.nan
    x = make_x(rng, (3, 16), np.float32)
    q, scales = normkit.rms_norm(x, 16, weight, 1e-6, quantize=kind)
    v = rms_norm_ref(x, 16, weight, 1e-6)[0]
    assert_scales(scales, v, 1, kind, np.float32)
    assert_quantized(q, v, dynamic_scales_ref(v, 1, kind), kind, np.float32, rows_k=1)


# --------------------------------------------------------------------------- output order


ORDER_FUNCS = ROW_FUNCS + ["batch", "group"]
QUANT_MODES = [None, ("int8", 0.05), ("int8", None), ("float8_e4m3", 0.05), ("float8_e4m3", None)]


@pytest.mark.parametrize("return_stats", [False, True])
@pytest.mark.parametrize("qmode", QUANT_MODES, ids=lambda m: "none" if m is None else f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("func", ORDER_FUNCS)
def test_output_order(kernel_path, func, qmode, return_stats, rng):
    """Every combination: output, dynamic scales, s, statistics; each element is what
    the simpler calls return."""
    kind, scale = (None, None) if qmode is None else qmode
    kw = {"return_stats": return_stats}
    if kind is not None:
        kw.update(quantize=kind, scale=scale)
    if func in ("batch", "group"):
        if kind is not None and scale is None:
            pytest.skip("channel norms take static scales only (see test_errors)")
        x = make_x(rng, (3, 4, 5), np.float32)
        if func == "batch":
            r = normkit.batch_norm(x, None, None, training=True, **kw)
            plain = normkit.batch_norm(x, None, None, training=True, return_stats=True)
        else:
            r = normkit.group_norm(x, 2, **kw)
            plain = normkit.group_norm(x, 2, return_stats=True)
        parts = r if isinstance(r, tuple) else (r,)
        assert len(parts) == (3 if return_stats else 1) and (return_stats or isinstance(r, np.ndarray))
        assert parts[0].dtype == (np.float32 if kind is None else quantized_dtype(kind))
        if return_stats:
            assert same_bits(parts[1], plain[1]) and same_bits(parts[2], plain[2])
        return
    c = make_rows(func, rng, (3, 33), 33, "float32", residual_bias=True)
    out = split(func, c.call(**kw), kind, scale is None, return_stats)
    assert out["y"].dtype == (np.float32 if kind is None else quantized_dtype(kind))
    assert out["y"].shape == c.x.shape
    if "scales" in out:
        assert out["scales"].dtype == np.float32 and out["scales"].shape == (3, 1)
    base_out = split(func, c.call(return_stats=True), return_stats=True)
    for name in ("s", "mean", "rstd"):
        if name in out:
            assert same_bits(out[name], base_out[name]), f"{name} is not in its place"
    if kind is not None:
        alone = c.call(quantize=kind, scale=scale)
        alone = alone[0] if isinstance(alone, tuple) else alone
        assert same_bits(out["y"], alone)


@pytest.mark.parametrize("kind", QUANTIZE_KINDS)
@pytest.mark.parametrize("func", ROW_FUNCS + ["batch", "group"])
def test_quantized_out(kernel_path, func, kind, rng):
    """out= of the quantized dtype is written and returned; out of x's dtype for a
    quantized call is a TypeError naming out."""
    x = make_x(rng, (3, 4, 5), np.float32)
    res = make_x(rng, (3, 4, 5), np.float32)
    qdt = quantized_dtype(kind)

    def call(**kw):
        if func == "layer":
            return normkit.layer_norm(x, 5, quantize=kind, scale=0.05, **kw)
        if func == "rms":
            return normkit.rms_norm(x, 5, quantize=kind, scale=0.05, **kw)
        if func == "add_layer":
            return normkit.add_layer_norm(x, res, 5, quantize=kind, scale=0.05, **kw)[0]
        if func == "add_rms":
            return normkit.add_rms_norm(x, res, 5, quantize=kind, scale=0.05, **kw)[0]
        if func == "batch":
            return normkit.batch_norm(x, None, None, training=True, quantize=kind, scale=0.05, **kw)
        return normkit.group_norm(x, 2, quantize=kind, scale=0.05, **kw)

    q0 = call()
    out = np.zeros(x.shape, qdt)
    assert call(out=out) is out
    assert same_bits(out, q0)
    raises_named(TypeError, "out", lambda: call(out=np.empty(x.shape, np.float32)))


def test_no_quantize_on_instance_and_adain(rng):
    """instance_norm and adaptive_instance_norm have no quantize/scale keywords."""
    x = make_x(rng, (2, 4, 9), np.float32)
    with pytest.raises(TypeError):
        normkit.instance_norm(x, quantize="int8", scale=0.1)
    with pytest.raises(TypeError):
        normkit.adaptive_instance_norm(x, x, quantize="int8", scale=0.1)


# --------------------------------------------------------------------------- bad input

_X = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8) / 7
_R = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8) / 5
_XC = np.arange(2 * 4 * 9, dtype=np.float32).reshape(2, 4, 9) / 7
_BUF = np.zeros((3, 3, 8), np.float32)


def _rms(**kw):
    return lambda: normkit.rms_norm(_X, 8, **kw)


def _add(func, x=_X, res=_R, **kw):
    name = "add_layer_norm" if func == "add_layer" else "add_rms_norm"
    return lambda: getattr(normkit, name)(x, res, 8, **kw)


ERRORS = [
    # (id, call, exception, message start)
    ("activation unknown layer", lambda: normkit.layer_norm(_X, 8, activation="swish"), ValueError, "activation:"),
    ("activation unknown rms", _rms(activation="tanh"), ValueError, "activation:"),
    ("activation unknown batch", lambda: normkit.batch_norm(_XC, None, None, training=True, activation="elu"),
     ValueError, "activation:"),
    ("activation unknown instance", lambda: normkit.instance_norm(_XC, activation="gelu_erf"), ValueError, "activation:"),
    ("activation unknown group", lambda: normkit.group_norm(_XC, 2, activation="sigmoid"), ValueError, "activation:"),
    ("activation unknown adain", lambda: normkit.adaptive_instance_norm(_XC, _XC, activation="prelu"), ValueError,
     "activation:"),
    ("activation unknown add", _add("add_rms", activation="Gelu2"), ValueError, "activation:"),
    ("activation not a string", _rms(activation=1), (TypeError, ValueError), "activation:"),
    ("quantize unknown", _rms(quantize="int4", scale=0.1), ValueError, "quantize:"),
    ("quantize unknown add", _add("add_layer", quantize="fp8", scale=0.1), ValueError, "quantize:"),
    ("quantize unknown batch", lambda: normkit.batch_norm(_XC, None, None, training=True, quantize="uint8", scale=0.1),
     ValueError, "quantize:"),
    ("scale zero", _rms(quantize="int8", scale=0.0), ValueError, "scale:"),
    ("scale negative", _rms(quantize="float8_e4m3", scale=-1.0), ValueError, "scale:"),
    ("scale NaN", _add("add_rms", quantize="int8", scale=float("nan")), ValueError, "scale:"),
    ("scale inf", lambda: normkit.group_norm(_XC, 2, quantize="int8", scale=float("inf")), ValueError, "scale:"),
    ("scale without quantize", _rms(scale=0.5), ValueError, "scale:"),
    ("scale without quantize add", _add("add_layer", scale=0.5), ValueError, "scale:"),
    ("scale without quantize batch", lambda: normkit.batch_norm(_XC, None, None, training=True, scale=0.5), ValueError,
     "scale:"),
    ("batch_norm quantize without scale", lambda: normkit.batch_norm(_XC, None, None, training=True, quantize="int8"),
     ValueError, "scale:"),
    ("group_norm quantize without scale", lambda: normkit.group_norm(_XC, 2, quantize="float8_e4m3"), ValueError,
     "scale:"),
    ("residual not broadcasting (lead)", _add("add_rms", res=np.ones((2, 8), np.float32)), ValueError, "residual:"),
    ("residual not broadcasting (rows)", _add("add_layer", res=np.ones((4, 8), np.float32)), ValueError, "residual:"),
    ("residual of another last dim", _add("add_rms", res=np.ones((2, 3, 7), np.float32)), ValueError, "residual:"),
    ("residual of higher rank", _add("add_rms", res=np.ones((1, 2, 3, 8), np.float32)), ValueError, "residual:"),
    ("residual of another dtype", _add("add_layer", res=_R.astype(np.float64)), TypeError, "residual:"),
    ("residual float16 for float32 x", _add("add_rms", res=_R.astype(np.float16)), TypeError, "residual:"),
    ("residual_bias wrong shape", _add("add_rms", residual_bias=np.ones(7, np.float32)), ValueError, "residual_bias:"),
    ("sum_out wrong shape", _add("add_rms", sum_out=np.empty((2, 3, 7), np.float32)), ValueError, "sum_out:"),
    ("sum_out wrong dtype", _add("add_layer", sum_out=np.empty((2, 3, 8), np.float64)), TypeError, "sum_out:"),
    ("sum_out overlapping x", lambda: normkit.add_rms_norm(_BUF[:2], _R, 8, sum_out=_BUF[1:]), ValueError, "sum_out:"),
    ("sum_out = residual of broadcast shape",
     lambda: normkit.add_rms_norm(_X, np.ones((3, 8), np.float32), 8, sum_out=np.ones((3, 8), np.float32)),
     ValueError, "sum_out:"),
    ("out is sum_out", lambda: (lambda o: normkit.add_layer_norm(_X, _R, 8, out=o, sum_out=o))(np.empty_like(_X)),
     ValueError, ("out", "sum_out")),
    ("out = x = sum_out", lambda: (lambda x: normkit.add_rms_norm(x, _R, 8, out=x, sum_out=x))(_X.copy()),
     ValueError, ("out", "sum_out")),
    ("out float32 for quantized", _rms(quantize="int8", scale=0.1, out=np.empty(_X.shape, np.float32)), TypeError,
     "out:"),
    ("out int8 for float8", _rms(quantize="float8_e4m3", scale=0.1, out=np.empty(_X.shape, np.int8)), TypeError,
     "out:"),
    ("out int8 without quantize", _rms(out=np.empty(_X.shape, np.int8)), TypeError, "out:"),
]


@pytest.mark.parametrize("call,exc,prefix", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(call, exc, prefix):
    """A clear ValueError/TypeError whose message starts with the argument's name;
    the module-level inputs are unchanged afterwards."""
    copies = snapshot([_X, _R, _XC])
    raises_prefixed(exc, prefix, call)
    assert_unchanged([_X, _R, _XC], copies)


def test_errors_leave_sum_out_target_alone():
    """A refused call does not write its in-place targets."""
    x, res = _X.copy(), _R.copy()
    with pytest.raises(ValueError):
        normkit.add_rms_norm(x, res, 8, sum_out=res, quantize="int8", scale=-1.0)
    assert same_bits(res, _R) and same_bits(x, _X)


# --------------------------------------------------------------------------- ONNX Runtime


def _ort_session(op, dtype, x_shape, skip_shape, hidden, beta, bias, eps):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    names = ["input", "skip", "gamma"]
    if op == "SkipLayerNormalization":
        names.append("beta" if beta else "")
    names.append("bias" if bias else "")
    while names[-1] == "":
        names.pop()
    shapes = {"input": x_shape, "skip": skip_shape, "gamma": [hidden], "beta": [hidden], "bias": [hidden]}
    inputs = [helper.make_tensor_value_info(nm, elem, list(shapes[nm])) for nm in names if nm]
    node = helper.make_node(op, names, ["output", "", "", "input_skip_bias_sum"], domain="com.microsoft", epsilon=eps)
    outputs = [helper.make_tensor_value_info("output", elem, list(x_shape)),
               helper.make_tensor_value_info("input_skip_bias_sum", elem, list(x_shape))]
    graph = helper.make_graph([node], "fused", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("skip", ["full", "2d", "3d1"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("func", ADD_FUNCS)
def test_against_onnxruntime(func, dtype, skip, with_bias, rng):
    """SkipLayerNormalization / SkipSimplifiedLayerNormalization (com.microsoft, CPU):
    the sum input + skip + bias equals s bit for bit (both add in float32 and round
    once); y within float32 tolerance, and for float16 within 2 ulps of float16 at
    the output's scale (ORT applies gamma/beta after rounding to float16)."""
    dt = np.dtype(dtype)
    lead, hidden = (2, 5), 771
    op = "SkipLayerNormalization" if func == "add_layer" else "SkipSimplifiedLayerNormalization"
    c = make_rows(func, rng, lead + (hidden,), hidden, dtype, RESIDUAL_SHAPES[skip](lead, hidden), with_bias)
    eps = 1e-5
    c.eps = eps
    sess = _ort_session(op, dt, c.x.shape, c.residual.shape, hidden, func == "add_layer", with_bias, eps)
    feeds = {"input": c.x, "skip": c.residual, "gamma": c.weight}
    if func == "add_layer":
        feeds["beta"] = c.bias
    if with_bias:
        feeds["bias"] = c.residual_bias
    y_ort, s_ort = sess.run(None, feeds)
    y, s = c.call()
    assert same_bits(s, s_ort), "s differs from ONNX Runtime's input_skip_bias_sum"
    ref = y_ort.astype(np.float64)
    scale = max(1.0, float(np.abs(ref).max()))
    tol = TOL32 * scale if dtype == "float32" else 2 * 2.0**-10 * scale
    err = np.abs(y.astype(np.float64) - ref).max()
    assert err <= tol, f"max |y - ORT| = {err:.3g} > {tol:.3g}"


# --------------------------------------------------------------------------- PyTorch


def _torch_act(F, t, name):
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    return getattr(F, name)(t)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", ["layer", "rms", "add_layer", "add_rms", "group", "batch_train", "batch_eval"])
def test_against_torch(torch, kernel_path, norm, activation, dtype, rng):
    """normkit's fused activation against torch.nn.functional's norm followed by the
    activation, in float32 and float64."""
    F = torch.nn.functional
    dt = np.dtype(dtype)
    T = torch.from_numpy
    if norm in ("layer", "rms", "add_layer", "add_rms"):
        c = make_rows(norm, rng, (4, 33), 33, dtype)
        out = split(norm, c.call(activation=activation))
        inp = T(out["s"]) if norm in ADD_FUNCS else T(c.x)
        if norm in ADD_FUNCS:
            assert same_bits(out["s"], (T(c.x) + T(c.residual)).numpy())
        if base(norm) == "layer":
            t = F.layer_norm(inp, (33,), T(c.weight), T(c.bias), c.eps)
        else:
            t = F.rms_norm(inp, (33,), T(c.weight), c.eps)
        y = out["y"]
    else:
        x = make_x(rng, (3, 6, 5, 7), dt)
        w, b = make_params(rng, (6,), dt, "both")
        if norm == "group":
            y = normkit.group_norm(x, 3, w, b, 1e-5, activation=activation)
            t = F.group_norm(T(x), 3, T(w), T(b), 1e-5)
        else:
            training = norm == "batch_train"
            rm, rv = np.zeros(6, dt), (0.5 + rng.random(6)).astype(dt)
            trm, trv = T(rm.copy()), T(rv.copy())
            y = normkit.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, activation=activation)
            t = F.batch_norm(T(x), trm, trv, T(w), T(b), training, 0.1, 1e-5)
            tol = TOL32 if dtype == "float32" else TOL64
            np.testing.assert_allclose(rm, trm.numpy(), rtol=tol, atol=tol)
            np.testing.assert_allclose(rv, trv.numpy(), rtol=tol, atol=tol)
    ref = _torch_act(F, t, activation).numpy()
    assert_close(y, ref, dt, what=f"{norm}+{activation} vs torch")

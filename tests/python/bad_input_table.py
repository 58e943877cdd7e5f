"""Every kind of bad input the Python surface can get, in one table: the call, the
exception and the start of its message. docs/bad_input.md is generated from it and
test_bad_input_table.py holds normkit to it (one test per row).

    python tests/python/bad_input_table.py --markdown docs/bad_input.md

Rows whose expected exception is None are inputs that are odd but valid (negative or
zero strides): they must work and give the same result as a contiguous copy.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np

import normkit
from helpers import DLPackOnly

X = np.arange(2 * 4 * 3 * 3, dtype=np.float32).reshape(2, 4, 3, 3) / 7
R = np.arange(6 * 8, dtype=np.float32).reshape(6, 8) / 5
C4 = np.ones(4, np.float32)


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _consumed_capsule(call):
    capsule = R.__dlpack__()
    call(capsule)  # reads it: DLPack capsules are single-use
    return call(capsule)


_CAPSULE_TARGET = ctypes.c_int(1)


def _other_capsule():
    """A capsule of another kind, as C extensions hand out."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(_CAPSULE_TARGET), b"not_a_tensor", None)


# (group, input, call, exception or None, message start)
ROWS = [
    # dtypes
    ("dtype", "x of int32", lambda: normkit.layer_norm(R.astype(np.int32), 8), TypeError, "x: expected a floating-point array"),
    ("dtype", "x of bool", lambda: normkit.batch_norm(X > 1, None, None, training=True), TypeError, "x: expected a floating-point array"),
    ("dtype", "x of complex64", lambda: normkit.rms_norm(R.astype(np.complex64), 8), TypeError, "x: expected a floating-point array"),
    ("dtype", "x of object", lambda: normkit.group_norm(X.astype(object), 2), TypeError, "x: expected a floating-point array"),
    ("dtype", "x a DLPack capsule already consumed", lambda: _consumed_capsule(lambda c: normkit.layer_norm(c, 8)), ValueError, "x: is a DLPack capsule that was already consumed"),
    ("dtype", "x a capsule that is not DLPack", lambda: normkit.layer_norm(_other_capsule(), 8), ValueError, "x: is a capsule that is not a DLPack tensor"),
    ("dtype", "x a string", lambda: normkit.layer_norm("abc", 3), TypeError, "x: expected a floating-point array"),
    ("dtype", "weight of int64", lambda: normkit.layer_norm(R, 8, np.ones(8, np.int64)), TypeError, "weight: expected a floating-point array"),
    ("dtype", "dy of float64 for float32 x", lambda: normkit.layer_norm_backward(R.astype(np.float64), R, R[:, :1], R[:, :1], 8), TypeError, "dy: expected dtype float32"),
    # shapes
    ("shape", "normalized_shape not the trailing dims", lambda: normkit.layer_norm(R, 6), ValueError, "normalized_shape:"),
    ("shape", "normalized_shape empty", lambda: normkit.layer_norm(R, ()), ValueError, "normalized_shape: must name at least one dimension"),
    ("shape", "normalized_shape of floats", lambda: normkit.layer_norm(R, 8.0), TypeError, "normalized_shape: expected an int or a sequence of ints"),
    ("shape", "weight of the wrong length", lambda: normkit.layer_norm(R, 8, np.ones(7, np.float32)), ValueError, "weight: expected shape (8,)"),
    ("shape", "channel weight of the wrong length", lambda: normkit.batch_norm(X, None, None, np.ones(3, np.float32), training=True), ValueError, "weight: expected shape (4,)"),
    ("shape", "dy of the wrong shape", lambda: normkit.layer_norm_backward(R[:5], R, R[:, :1], R[:, :1], 8), ValueError, "dy: expected the shape of x"),
    ("shape", "saved mean of the wrong size", lambda: normkit.layer_norm_backward(R, R, R[:5, :1], R[:, :1], 8), ValueError, "mean: expected 6 elements"),
    ("shape", "one value per channel in BatchNorm training", lambda: normkit.batch_norm(np.ones((1, 4), np.float32), None, None, training=True), ValueError, "x: expected more than 1 value per channel when training"),
    ("shape", "one spatial element in InstanceNorm", lambda: normkit.instance_norm(np.ones((2, 4, 1), np.float32)), ValueError, "x: expected more than 1 spatial element"),
    # layouts
    ("layout", "layout for another rank", lambda: normkit.batch_norm(X, None, None, training=True, layout="NLC"), ValueError, "layout: NLC describes 3-D arrays"),
    ("layout", "unknown layout name", lambda: normkit.group_norm(X, 2, layout="NCWH"), ValueError, "layout:"),
    ("layout", "layout of the wrong type", lambda: normkit.group_norm(X, 2, layout=4), TypeError, "layout: expected a layout name"),
    ("layout", "x of rank 6 for a channel norm", lambda: normkit.group_norm(np.ones((1, 2, 1, 1, 1, 1), np.float32), 1), ValueError, "x: rank 6 has no channel layout"),
    # groups
    ("groups", "num_groups not dividing C", lambda: normkit.group_norm(X, 3), ValueError, "num_groups: must be a positive divisor"),
    ("groups", "num_groups zero", lambda: normkit.group_norm(X, 0), ValueError, "num_groups: must be a positive divisor"),
    ("groups", "num_groups a float", lambda: normkit.group_norm(X, 2.0), TypeError, "num_groups: expected an int"),
    # eps
    ("eps", "eps negative", lambda: normkit.layer_norm(R, 8, eps=-1e-5), ValueError, "eps: must be a finite number >= 0"),
    ("eps", "eps NaN", lambda: normkit.batch_norm(X, None, None, training=True, eps=float("nan")), ValueError, "eps: must be a finite number >= 0"),
    ("eps", "eps inf", lambda: normkit.group_norm(X, 2, eps=float("inf")), ValueError, "eps: must be a finite number >= 0"),
    ("eps", "eps a string", lambda: normkit.layer_norm(R, 8, eps="small"), TypeError, "eps: expected a real number"),
    # out
    ("out", "out of the wrong shape", lambda: normkit.layer_norm(R, 8, out=np.empty((6, 7), np.float32)), ValueError, "out: expected the shape of x"),
    ("out", "out of the wrong dtype", lambda: normkit.layer_norm(R, 8, out=np.empty((6, 8), np.float64)), TypeError, "out: expected dtype float32"),
    ("out", "out read-only", lambda: normkit.group_norm(X, 2, out=_ro(X)), ValueError, "out: array is read-only"),
    ("out", "out overlapping x in part", lambda: (lambda b: normkit.layer_norm(b[:6], 8, out=b[1:7]))(np.ones((7, 8), np.float32)), ValueError, "out: overlaps x"),
    ("out", "out a list", lambda: normkit.layer_norm(R, 8, out=[0.0] * 48), TypeError, "out: expected an array to write into"),
    ("out", "out read-only through DLPack (the producer's flag)", lambda: normkit.layer_norm(R, 8, out=DLPackOnly(_ro(R))), ValueError, "out: array is read-only"),
    ("out", "out a broadcast view (zero strides)", lambda: normkit.layer_norm(R, 8, out=np.broadcast_to(np.float32(0), R.shape)), ValueError, "out: array is read-only"),
    ("out", "out a writable broadcast view (as_strided, zero strides)", lambda: normkit.layer_norm(R, 8, out=np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), R.shape, (0, 4))), ValueError, "out: its elements overlap each other"),
    ("out", "out with rows overlapping each other", lambda: normkit.group_norm(X, 2, out=np.lib.stride_tricks.as_strided(np.zeros(80, np.float32), X.shape, (4, 4, 12, 4))), ValueError, "out: its elements overlap each other"),
    # running statistics
    ("running", "running_mean of the wrong length", lambda: normkit.batch_norm(X, np.zeros(3, np.float32), np.ones(4, np.float32), training=True), ValueError, "running_mean: expected shape (4,)"),
    ("running", "running_var of int dtype", lambda: normkit.batch_norm(X, np.zeros(4, np.float32), np.ones(4, np.int32), training=True), TypeError, "running_var: expected a floating-point array"),
    ("running", "running_mean read-only in training", lambda: normkit.batch_norm(X, _ro(np.zeros(4, np.float32)), np.ones(4, np.float32), training=True), ValueError, "running_mean: array is read-only"),
    ("running", "running statistics missing in eval", lambda: normkit.batch_norm(X, None, None, training=False), ValueError, "running_mean: required when training is false"),
    ("running", "only one running statistic", lambda: normkit.batch_norm(X, np.zeros(4, np.float32), None, training=True), ValueError, "running_var: running_mean and running_var must be given together"),
    ("running", "momentum a string", lambda: normkit.batch_norm(X, None, None, training=True, momentum="fast"), TypeError, "momentum: expected a real number"),
    # style
    ("style", "style with another N", lambda: normkit.adaptive_instance_norm(X, X[:1]), ValueError, "style: expected N=2 and C=4"),
    ("style", "style of another rank", lambda: normkit.adaptive_instance_norm(X, X[:, :, 0]), ValueError, "style: expected a feature map of rank 4"),
    ("style", "style of another dtype", lambda: normkit.adaptive_instance_norm(X, X.astype(np.float64)), TypeError, "style: expected dtype float32"),
    ("style", "style a sequence of 3", lambda: normkit.adaptive_instance_norm(X, (C4, C4, C4)), ValueError, "style: expected a feature map or a (mean, std) pair"),
    ("style", "style (mean, std) of the wrong shape", lambda: normkit.adaptive_instance_norm(X, (C4, C4)), ValueError, "style_mean: expected shape (2, 4)"),
    # layers
    ("layer", "backward before a training forward", lambda: normkit.LayerNorm(8).backward(R), RuntimeError, "backward:"),
    ("layer", "parameter assigned with the wrong shape", lambda: setattr(normkit.BatchNorm(4), "weight", np.ones(3, np.float32)), ValueError, "weight: expected shape (4,)"),
    ("layer", "BatchNorm with num_features 0", lambda: normkit.BatchNorm(0), ValueError, "num_features:"),
    # fused forms: store stage (activation, quantize, scale) and residual add
    ("fused", "unknown activation name", lambda: normkit.layer_norm(R, 8, activation="tanh"), ValueError, "activation: expected None or one of"),
    ("fused", "activation not a name", lambda: normkit.group_norm(X, 2, activation=1), TypeError, "activation: expected None or one of"),
    ("fused", "unknown quantize name", lambda: normkit.rms_norm(R, 8, quantize="int4"), ValueError, "quantize: expected None or one of"),
    ("fused", "scale without quantize", lambda: normkit.layer_norm(R, 8, scale=0.5), ValueError, "scale: given without quantize"),
    ("fused", "scale zero", lambda: normkit.rms_norm(R, 8, quantize="int8", scale=0.0), ValueError, "scale: must be a finite number > 0"),
    ("fused", "scale NaN", lambda: normkit.batch_norm(X, None, None, training=True, quantize="int8", scale=float("nan")), ValueError, "scale: must be a finite number > 0"),
    ("fused", "scale inf", lambda: normkit.layer_norm(R, 8, quantize="float8_e4m3", scale=float("inf")), ValueError, "scale: must be a finite number > 0"),
    ("fused", "channel norm quantized without a scale", lambda: normkit.group_norm(X, 2, quantize="int8"), ValueError, "scale: required with quantize='int8'"),
    ("fused", "quantize on instance_norm", lambda: normkit.instance_norm(X, quantize="int8"), TypeError, "instance_norm() got an unexpected keyword argument 'quantize'"),
    ("fused", "quantized out of x's dtype", lambda: normkit.rms_norm(R, 8, quantize="int8", out=np.empty_like(R)), TypeError, "out: expected dtype int8 for quantize='int8'"),
    ("fused", "quantized out inside x", lambda: (lambda x: normkit.rms_norm(x, 8, quantize="int8", scale=1.0, out=x.view(np.int8)[:, :8]))(R.copy()), ValueError, "out: shares memory with x"),
    ("fused", "residual that does not broadcast", lambda: normkit.add_rms_norm(R, R[:, :4], 8), ValueError, "residual: shape (6, 4) does not broadcast"),
    ("fused", "residual with other leading dims", lambda: normkit.add_layer_norm(R, R[:3], 8), ValueError, "residual: shape (3, 8) does not broadcast"),
    ("fused", "residual of another dtype", lambda: normkit.add_rms_norm(R, R.astype(np.float64), 8), TypeError, "residual: expected dtype float32 like x"),
    ("fused", "sum_out of the wrong shape", lambda: normkit.add_rms_norm(R, R, 8, sum_out=np.empty((6, 7), np.float32)), ValueError, "sum_out: expected the shape of x"),
    ("fused", "sum_out overlapping x in part", lambda: (lambda b: normkit.add_rms_norm(b[:6], R, 8, sum_out=b[1:7]))(np.ones((7, 8), np.float32)), ValueError, "sum_out: overlaps x"),
    ("fused", "out and sum_out the same array", lambda: (lambda o: normkit.add_layer_norm(R, R, 8, out=o, sum_out=o))(np.empty_like(R)), ValueError, "sum_out: shares memory with out"),
    ("fused", "residual_bias of the wrong shape", lambda: normkit.add_layer_norm(R, R, 8, residual_bias=np.ones(7, np.float32)), ValueError, "residual_bias: expected shape (8,)"),
    ("moments", "moments of an unknown norm", lambda: normkit.moments(X, norm="rms"), ValueError, "norm: expected one of"),
    ("moments", "group moments without num_groups", lambda: normkit.moments(X, norm="group"), ValueError, "num_groups: required for norm='group'"),
    ("moments", "merging moments of different shapes", lambda: normkit.merge_moments(normkit.moments(X), normkit.moments(X, layout="NHWC")), ValueError, "parts[1]: expected moments of shape (4,)"),
    ("moments", "batch_norm stats of another norm", lambda: normkit.batch_norm(X, None, None, training=True, stats=normkit.moments(X, norm="instance")), ValueError, "stats: expected moments of shape (4,)"),
    ("moments", "batch_norm stats in eval", lambda: normkit.batch_norm(X, C4 * 0, C4, stats=normkit.moments(X)), ValueError, "stats: only used with training=True"),
    ("moments", "global sums without count", lambda: normkit.batch_norm_backward(X, X, C4, C4, sum_dy=C4, sum_dy_xmu=C4), ValueError, "count: required with sum_dy"),
    # norms along any axes: normalize (Lp) and mean_variance_norm (ONNX MVN)
    ("axes", "normalize with p below 1", lambda: normkit.normalize(R, p=0.5), ValueError, "p: must be >= 1 (or inf)"),
    ("axes", "normalize along a dim x lacks", lambda: normkit.normalize(R, dim=2), ValueError, "dim: 2 is out of range"),
    ("axes", "normalize_backward with dy of another dtype", lambda: normkit.normalize_backward(R.astype(np.float64), R), TypeError, "dy: expected dtype float32"),
    ("axes", "mean_variance_norm's default axes (0, 2, 3) on a 2-D x", lambda: normkit.mean_variance_norm(R), ValueError, "axes: 2 is out of range"),
    ("axes", "mean_variance_norm naming an axis twice", lambda: normkit.mean_variance_norm(X, (1, -3)), ValueError, "axes: axis 1 is named twice"),
    # strides: valid, handled (these calls return (result, result on a contiguous copy))
    ("strides", "x with negative strides (x[::-1])",
     lambda: (normkit.layer_norm(R[::-1], 8), normkit.layer_norm(R[::-1].copy(), 8)), None,
     "works: the same result as on a contiguous copy"),
    ("strides", "x a broadcast view (zero strides)",
     lambda: (normkit.layer_norm(np.broadcast_to(R[:1], R.shape), 8),
              normkit.layer_norm(np.broadcast_to(R[:1], R.shape).copy(), 8)), None,
     "works: the same result as on a contiguous copy"),
    ("strides", "channel x not contiguous in its layout",
     lambda: (normkit.group_norm(np.moveaxis(X, 1, -1), 2, layout="NHWC"),
              normkit.group_norm(np.moveaxis(X, 1, -1).copy(), 2, layout="NHWC")), None,
     "works: the same result as on a contiguous copy"),
]


def check_row(row):
    """Runs one row; returns (ok, what happened)."""
    group, what, call, exc, start = row
    try:
        with np.errstate(all="ignore"):
            result = call()
    except Exception as e:  # noqa: BLE001 - the table is about which exceptions come out
        if exc is None:
            return False, f"raised {type(e).__name__}: {e}"
        message = str(e)
        ok = isinstance(e, exc) and message.startswith(start)
        return ok, f"{type(e).__name__}: {message}"
    if exc is not None:
        return False, "no error"
    got, expected = result
    if not np.array_equal(got, expected):
        return False, "differs from the result on a contiguous copy"
    return True, "works"


def markdown():
    lines = [
        "# Bad input",
        "",
        "What the Python surface does with each kind of bad input: the exception and the start of its",
        "message (messages always start with the argument's name). Generated from",
        "tests/python/bad_input_table.py, which tests/python/test_bad_input_table.py runs row by row:",
        "",
        "    python tests/python/bad_input_table.py --markdown docs/bad_input.md",
        "",
        "None of these crashes the interpreter or writes outside the arrays given; inputs are never",
        "modified (running statistics in training excepted). The last rows are odd but valid inputs.",
        "",
        "| kind | input | exception | message starts with |",
        "| --- | --- | --- | --- |",
    ]
    for group, what, _, exc, start in ROWS:
        lines.append(f"| {group} | {what} | {exc.__name__ if exc else '-'} | `{start}` |" if exc else
                     f"| {group} | {what} | - | {start} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    bad = 0
    for row in ROWS:
        ok, happened = check_row(row)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {row[0]:8s} {row[1]:55s} {happened[:100]}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

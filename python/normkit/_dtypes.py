"""Array intake shared by every normkit function: dtype checks, bfloat16 views.
Arrays of other libraries arrive as NumPy views through _arrays."""

from __future__ import annotations

import operator

import numpy as np

from . import _cuda, _ext
from ._arrays import BFLOAT16, FLOAT8_E4M3, foreign_out, to_numpy

FLOAT16 = np.dtype(np.float16)
FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)

_EXPECTED = "a floating-point array (float32, float64, float16 or ml_dtypes.bfloat16)"


def is_bf16(dtype) -> bool:
    return BFLOAT16 is not None and dtype == BFLOAT16


def is_16bit(dtype) -> bool:
    return dtype == FLOAT16 or is_bf16(dtype)


def stats_dtype(dtype) -> np.dtype:
    """float32 statistics for 16-bit inputs, the input's dtype otherwise."""
    return FLOAT32 if is_16bit(dtype) else np.dtype(dtype)


def as_input(x, name: str) -> np.ndarray:
    """x as a NumPy array of a supported float dtype (no copy when it already is one, nor
    for a torch tensor or DLPack array: a view of its memory)."""
    if not isinstance(x, np.ndarray):
        _cuda.reject_device_array(x, name)
        x = to_numpy(x, name)
    dt = x.dtype
    if dt == FLOAT32 or dt == FLOAT64 or dt == FLOAT16 or is_bf16(dt):
        return x
    raise TypeError(f"{name}: expected {_EXPECTED}, got dtype {dt}")


def as_int(value, name: str) -> int:
    """An integer argument (bools refused, anything with __index__ taken)."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r}") from None


def as_params(x_dtype, *named):
    """Weight/bias vectors, given as (array or None, name) pairs, in the one
    dtype the kernels take for all of them: x's dtype, or for 16-bit x float32
    unless every given one already has x's dtype. Contiguous."""
    # Fast path (the common call): contiguous NumPy arrays already of x's dtype.
    ready = []
    for p, _ in named:
        if p is not None and not is_plain(p, x_dtype):
            break
        ready.append(p)
    else:
        return ready
    arrays = [None if p is None else as_input(p, name) for p, name in named]
    if is_16bit(x_dtype) and any(a is not None and a.dtype != x_dtype for a in arrays):
        target = FLOAT32
    else:
        target = x_dtype
    return [None if a is None else np.ascontiguousarray(a, dtype=target) for a in arrays]


def kernel_view(a: np.ndarray | None):
    """What the extension receives: bfloat16 travels as a uint16 view, float8_e4m3fn
    (a quantized output) as a uint8 view."""
    if a is not None:
        if is_bf16(a.dtype):
            return a.view(np.uint16)
        if FLOAT8_E4M3 is not None and a.dtype == FLOAT8_E4M3:
            return a.view(np.uint8)
    return a


def check_out(out, x: np.ndarray, name: str = "out") -> np.ndarray:
    """A caller-given output array: a writable array of x's dtype (of any kind: a view of
    its memory). Its shape and overlap with x are checked by the C++ core, which names
    it `out` too."""
    if not isinstance(out, np.ndarray):
        out = foreign_out(out, name)
    if out.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} like x, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    if elements_overlap(out):
        raise ValueError(
            f"{name}: its elements overlap each other (a broadcast or self-overlapping view, strides "
            f"{out.strides}); pass an array with one element per memory location"
        )
    return out


def elements_overlap(a: np.ndarray) -> bool:
    """Whether two elements of `a` share bytes (a writable broadcast view made
    with as_strided, say): writing such an output would keep one of several
    results at random."""
    if a.size <= 1 or a.flags.c_contiguous or a.flags.f_contiguous:
        return False  # a contiguous array has one element per location
    dims = sorted((abs(s), n) for n, s in zip(a.shape, a.strides) if n > 1)
    reach = 0  # bytes spanned by the dims of smaller stride
    for stride, n in dims:
        if stride < reach + a.itemsize:
            break
        reach += (n - 1) * stride
    else:
        return False  # each dim steps past everything the smaller ones span
    # Interleaved strides, rare: compare the elements' byte offsets exactly.
    offsets = np.zeros((), np.int64)
    for n, s in zip(a.shape, a.strides):
        offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * s)
    offsets = np.sort(offsets, axis=None)
    return bool(np.any(np.diff(offsets) < a.itemsize))


# Outputs of at least this many bytes come from normkit's output cache (see
# python/src/output_cache.hpp): below it glibc already reuses freed memory.
CACHED_OUTPUT_MIN_BYTES = 16 << 20


def empty(shape, dtype) -> np.ndarray:
    """np.empty, with large buffers reused from normkit's output cache."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if nbytes < CACHED_OUTPUT_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    return _ext.cached_buffer(nbytes).view(dtype).reshape(shape)


DIRECT_DTYPES = frozenset(np.dtype(d) for d in (np.float32, np.float64, np.float16))


def is_plain(a, dtype):
    """``a`` is a C-contiguous NumPy array (not a subclass) of ``dtype``: what the
    fast paths (as_params, call_direct, the backward's) take as it is."""
    return type(a) is np.ndarray and a.dtype == dtype and a.flags.c_contiguous


def direct_output(x, params, eps, out):
    """The output of a plain NumPy call that may go straight to the kernel, or None when it
    needs the general intake: x a contiguous float32/64/16 NumPy array, parameters of x's
    dtype (or None), a float eps (or None), and a fresh output below the output cache's
    size or a contiguous writable NumPy ``out`` of x's dtype."""
    if (x.dtype not in DIRECT_DTYPES or not x.flags.c_contiguous or (type(eps) is not float and eps is not None)):
        return None
    for p in params:
        if p is not None and not is_plain(p, x.dtype):
            return None
    if out is None:
        if x.nbytes >= CACHED_OUTPUT_MIN_BYTES:
            return None  # served from the output cache by the general intake
        return np.empty(x.shape, x.dtype)
    if is_plain(out, x.dtype) and out.flags.writeable:
        return out
    return None


def call_direct(kernel, x, params, eps, out, *args):
    """A plain NumPy call straight to the kernel, ``kernel(x, y, *args)``: its output y,
    or None when the call needs the general intake: a call direct_output does not take,
    or one the core refuses (the general intake then gives its messages; the core checks
    every argument before it writes). The intake costs 2-4 us, a fifth of a small call."""
    y = direct_output(x, params, eps, out)
    if y is None:
        return None
    try:
        kernel(x, y, *args)
    except (TypeError, ValueError):
        return None
    return y


def indirect_output(out, given, x):
    """For an `out` the kernels cannot write in place: a fresh array to compute
    into (the caller copies it into `out` once). `given` is x as the caller
    passed it (x itself may be a contiguous copy); out=given is in place and
    fine, any other overlap with it is refused."""
    is_given = (
        out.__array_interface__["data"][0] == given.__array_interface__["data"][0]
        and out.strides == given.strides
    )
    if not is_given and np.shares_memory(out, given):
        raise ValueError("out: overlaps x without being x itself (pass out=x to work in place)")
    return empty(x.shape, x.dtype)

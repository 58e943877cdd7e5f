"""The data a benchmark case is built from: where its buffers lie (``placed_empty``,
``placed_array``), its random inputs (``random_rows``, ``random_channels``), the layouts it is read
in (``channels_last``, ``as_ncs``, ``from_ncs``) and which rows or samples of it the float64
reference is computed for (``sampled_rows``, ``sampled_batch``). NumPy comes from _libs at call time.
"""

from __future__ import annotations

import _libs

# --------------------------------------------------------------------------------------------
# placement

HUGE = 2 << 20


def placed_empty(shape, dtype, offset: int = 0, fill=0):
    """A C-contiguous array starting ``offset`` bytes after a 2 MiB boundary, pages touched.

    Where an output lies relative to its input matters on this machine: with y - x within 64
    bytes above a multiple of 1 MiB (what two back-to-back NumPy allocations of a size that is a
    multiple of 1 MiB give), memcpy ran ~1.7x and a normalization kernel up to 3x slower than with
    x and y both on 2 MiB boundaries. So the benchmark places its buffers itself: x at a 2 MiB
    boundary and every preallocated output at ``offset`` after one (0 by default).
    """
    np = _libs.np
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + HUGE + offset, np.uint8)
    start = (-buf.ctypes.data) % HUGE + offset
    a = buf[start:start + nbytes].view(dtype).reshape(shape)
    if fill is not None:
        a.fill(fill)
    return a


def placed_array(a32, dtype):
    """An input placed on a 2 MiB boundary (placed_empty) holding the float32 values a32 in dtype."""
    a = placed_empty(a32.shape, dtype, 0, fill=None)
    a[...] = a32 if dtype == _libs.np.float32 else a32.astype(dtype)
    return a


# --------------------------------------------------------------------------------------------
# random inputs


def random_rows(rng, shape):
    """float32 standard normal values times 2 plus 0.5: the row norms' x (rows with mean 0.5, std 2)."""
    x32 = rng.standard_normal(shape, dtype=_libs.np.float32)
    x32 *= 2.0
    x32 += 0.5
    return x32


def random_channels(rng, phys, channels_last):
    """float32 standard normal values of shape phys, scaled and shifted per channel (scale uniform in
    [0.5, 2), shift in [-1, 1)) so that the channel statistics differ: (x32, scale, shift). The
    channels are phys's last axis if channels_last, else its second."""
    np = _libs.np
    c = phys[-1] if channels_last else phys[1]
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
    shift = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    bshape = (1,) * (len(phys) - 1) + (c,) if channels_last else (1, c) + (1,) * (len(phys) - 2)
    x32 = rng.standard_normal(phys, dtype=np.float32)
    x32 *= scale.reshape(bshape)
    x32 += shift.reshape(bshape)
    return x32, scale, shift


# --------------------------------------------------------------------------------------------
# layouts


def channels_last(layout):
    """Whether a layout name (NHWC, NLC, NDHWC; NCHW, NC, ...; None for the row norms) keeps the
    channels last."""
    return layout in ("NHWC", "NLC", "NDHWC")


def as_ncs(a, layout):
    """View of a batch (physical layout) as (N, C, S); channels-last gives a transposed view."""
    if channels_last(layout):
        return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(0, 2, 1)
    return a.reshape(a.shape[0], a.shape[1], -1)


def from_ncs(a_ncs, layout, shape):
    """Inverse of as_ncs: an (N, C, S) array back to the physical shape (a copy for channels-last)."""
    if channels_last(layout):
        return _libs.np.ascontiguousarray(a_ncs.transpose(0, 2, 1)).reshape(shape)
    return a_ncs.reshape(shape)


# --------------------------------------------------------------------------------------------
# what the float64 reference is computed for


def sampled_rows(m):
    """Up to 256 distinct rows of m, drawn with a fixed seed, sorted."""
    np = _libs.np
    return np.unique(np.random.default_rng(1).integers(0, m, size=min(m, 256)))


def sampled_batch(n):
    """The first, middle and last sample of a batch of n, sorted and distinct."""
    np = _libs.np
    return np.unique(np.array([0, n // 2, n - 1]))

"""The data a benchmark case is built from: where its buffers lie (``placed_empty``). NumPy comes
from _libs at call time.
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

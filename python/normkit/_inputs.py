"""x as the kernels read it and the output they write: the intake every front end shares
(rows norms, channel norms, axis norms).

Imports only the leaf modules below the front ends (_ext, _args, _dtypes, _epilogue).
"""

from __future__ import annotations

import numpy as np

from . import _ext
from ._args import as_normalized_shape
from ._dtypes import as_input, check_out, empty, indirect_output, is_bf16, kernel_view
from ._epilogue import PLAIN, quantized_output


def rows_input(x, normalized_shape):
    """(x, shape, bf16, given): x checked against normalized_shape, copied once if the kernels
    cannot view it; ``given`` is x as passed (for out= checks)."""
    x = as_input(x, "x")
    shape = as_normalized_shape(normalized_shape)
    k = len(shape)
    if x.ndim < k or x.shape[x.ndim - k :] != shape:
        raise ValueError(
            f"normalized_shape: {shape} does not match the trailing dims of x, whose shape is {x.shape}"
        )
    bf16 = is_bf16(x.dtype)
    given = x
    if not x.flags.c_contiguous and not _ext.rows_viewable(kernel_view(x), k, bf16):
        # The normalized dims must be dense and the leading ones collapse to one
        # stride; anything else is copied once, here.
        x = np.ascontiguousarray(x)
    return x, shape, bf16, given


def channel_input(x):
    """(x contiguous in its layout (copied once if not), bf16) for the channel norms."""
    x = as_input(x, "x")
    return (x if x.flags.c_contiguous else np.ascontiguousarray(x)), is_bf16(x.dtype)


def channel_output(out, x, given, epilogue=PLAIN):
    """(array the kernel writes, array to copy it into afterwards or None) for an output of
    x's shape, contiguous: ``out`` itself, a fresh array, or a contiguous stand-in for a
    strided ``out`` (copied into it by ``finish_output``)."""
    if epilogue.quantize:
        return quantized_output(out, x.shape, epilogue, given)
    if out is None:
        return empty(x.shape, x.dtype), None
    out = check_out(out, x)
    if out.shape == x.shape and not out.flags.c_contiguous:
        return indirect_output(out, given, x), out
    return out, None


def finish_output(y, copy_to):
    """The result: y, or the caller's ``out`` after y is copied into it."""
    if copy_to is not None:
        np.copyto(copy_to, y)
        return copy_to
    return y

"""x as the kernels read it: the intake every front end shares (rows norms, channel norms).

Imports only the leaf modules below the front ends (_ext, _args, _dtypes).
"""

from __future__ import annotations

import numpy as np

from . import _ext
from ._args import as_normalized_shape
from ._dtypes import as_input, is_bf16, kernel_view


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

"""Argument handling the front ends share: layouts, eps, momentum, normalized shapes.

A leaf module (it imports only the compiled core), so every front end and the
CUDA adapter can use it. Each check raises TypeError / ValueError naming the argument.
"""

from __future__ import annotations

import numbers
import operator

from . import _ext

Layout = _ext.Layout

_CHANNELS_LAST = ("NC", "NLC", "NHWC", "NDHWC")


def layout_name(layout):
    """None (channels-first of x's rank), or the layout's name; TypeError naming ``layout`` otherwise."""
    if layout is None or isinstance(layout, str):
        return layout
    if isinstance(layout, Layout):
        return layout.name
    raise TypeError(f"layout: expected a layout name such as 'NHWC' or a normkit.Layout, got {layout!r}")


def batch_and_channels(x, layout):
    """(N, C) of a channel-norm input in ``layout`` ((0, 0) below rank 2: the core reports that)."""
    if x.ndim < 2:
        return 0, 0
    return x.shape[0], x.shape[-1] if layout_name(layout) in _CHANNELS_LAST else x.shape[1]


def as_eps(eps) -> float:
    if not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a real number, got {eps!r}")
    return float(eps)


def as_momentum(momentum) -> float:
    if not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum: expected a real number, got {momentum!r}")
    return float(momentum)


def as_normalized_shape(normalized_shape) -> tuple:
    if type(normalized_shape) is int:  # the common case, fast
        return (normalized_shape,)
    try:
        if isinstance(normalized_shape, (tuple, list)):
            shape = tuple(operator.index(d) for d in normalized_shape)
        else:
            shape = (operator.index(normalized_shape),)
    except TypeError:
        raise TypeError(
            f"normalized_shape: expected an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if not shape:
        raise ValueError("normalized_shape: must name at least one dimension")
    return shape

"""Layout arguments: a name such as "NHWC" or a normkit.Layout, to the name the core takes.

A leaf module (it imports only the compiled core), so every front end can use it.
"""

from __future__ import annotations

from . import _ext

Layout = _ext.Layout


def layout_name(layout):
    """None (channels-first of x's rank), or the layout's name; TypeError naming ``layout`` otherwise."""
    if layout is None or isinstance(layout, str):
        return layout
    if isinstance(layout, Layout):
        return layout.name
    raise TypeError(f"layout: expected a layout name such as 'NHWC' or a normkit.Layout, got {layout!r}")

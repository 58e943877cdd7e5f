"""Typed use of normkit's public API, for mypy (tests/python/test_stubs.py runs
`mypy --strict` on this file against the installed package).

Not a test module (pytest collects test_*.py only) and never executed by the
tests: mypy reads it. It must type-check cleanly: every public name has to be
visible to mypy (normkit ships py.typed and the stub normkit/_ext.pyi), and the
typed parts of the API (the runtime functions, Layout, the layer attributes from
the stub) have to accept what the README shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

import normkit
from normkit import Layout, layer_norm, rms_norm

F32 = npt.NDArray[np.float32]


def functional(x: F32, w: F32, b: F32) -> list[Any]:
    img = np.zeros((2, 4, 4, 8), np.float32)  # NHWC
    rm, rv = np.zeros(8, np.float32), np.ones(8, np.float32)
    outs: list[Any] = [
        layer_norm(x, 768, w, b),
        layer_norm(x, (4, 768), return_stats=True),
        rms_norm(x, 768, w),
        normkit.layer_norm(x, 768, w, b, out=x),
        normkit.rms_norm(x, [768], eps=None, out=None, return_stats=True),
        normkit.batch_norm(img, rm, rv, training=True, layout="NHWC"),
        normkit.batch_norm(img, rm, rv, None, None, False, 0.1, 1e-5, layout=Layout.NHWC, return_stats=True),
        normkit.instance_norm(img, layout="NHWC"),
        normkit.group_norm(img, 2, layout=normkit.Layout.NHWC),
        normkit.adaptive_instance_norm(img, img, layout="NHWC"),
        normkit.adaptive_instance_norm(img, (np.zeros((2, 8)), np.ones((2, 8))), eps=1e-5, layout="NHWC"),
        normkit.normalize(x),
        normkit.normalize(img, p=float("inf"), dim=1, eps=0.0, out=None),
        normkit.normalize_backward(x, x, 2.0, -1, 1e-12),
        normkit.mean_variance_norm(img),
        normkit.mean_variance_norm(img, axes=(1, 2), eps=1e-9, out=img),
    ]
    return outs


def gradients(dy: F32, x: F32, w: F32) -> list[Any]:
    y, mean, rstd = normkit.layer_norm(x, 768, w, return_stats=True)
    _, rstd2 = normkit.rms_norm(x, 768, w, return_stats=True)
    img = np.zeros((2, 8, 4, 4), np.float32)
    _, m, r = normkit.batch_norm(img, None, None, training=True, return_stats=True)
    _, gm, gr = normkit.group_norm(img, 2, return_stats=True)
    _, im, ir = normkit.instance_norm(img, return_stats=True)
    return [
        normkit.layer_norm_backward(dy, x, mean, rstd, 768, w),
        normkit.rms_norm_backward(dy, x, rstd2, (768,), w),
        normkit.batch_norm_backward(img, img, m, r, None, training=True, layout="NCHW"),
        normkit.instance_norm_backward(img, img, im, ir, use_input_stats=True),
        normkit.group_norm_backward(img, img, gm, gr, 2, None, layout=Layout.NCHW),
        normkit.adaptive_instance_norm_backward(img, img, img, 1e-5, layout="NCHW"),
    ]


def layers(x: F32) -> None:
    ln = normkit.LayerNorm(768, eps=1e-5, elementwise_affine=True, bias=True, dtype=np.float32)
    rms = normkit.RMSNorm((768,), eps=None)
    bn = normkit.BatchNorm(8, momentum=None, layout="NHWC")
    inorm = normkit.InstanceNorm(8, affine=True, track_running_stats=True)
    gn = normkit.GroupNorm(2, 8, layout=Layout.NCHW)
    y = ln(x)
    dx = ln.backward(y)
    ln.zero_grad()
    ln.train().eval()
    training: bool = ln.training
    eps: float = ln.eps
    rms_eps: float | None = rms.eps
    affine: bool = ln.elementwise_affine
    shape: tuple[Any, ...] = ln.normalized_shape
    state: dict[Any, Any] = ln.state_dict()
    ln.load_state_dict(state, strict=True)
    _ = (rms(x), bn, inorm, gn, dx, training, eps, rms_eps, affine, shape, ln.weight, ln.dtype)


def runtime() -> None:
    normkit.set_num_threads(2)
    n: int = normkit.get_num_threads()
    normkit.set_output_cache_limit(0)
    about: dict[Any, Any] = normkit.info()
    version: str = normkit.__version__
    layout: Layout = Layout.NCHW
    name: str = layout.name
    assert n > 0 and about and version and name
    assert len(normkit.__all__) > 0

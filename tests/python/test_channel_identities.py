"""Identities between the norms (issue 3): they hold whatever kernel path runs.

- GroupNorm with one group is LayerNorm over (C, spatial) without affine.
- GroupNorm with C groups is InstanceNorm.
- channels-last results are the transposed channels-first results.
- BatchNorm in eval with running stats (0, 1) is x / sqrt(1 + eps) (times weight, plus bias).
"""

import numpy as np
import pytest

import normkit
from channel_reference import CHANNELS_FIRST as FIRST, CHANNELS_LAST as LAST
from helpers import from_last, to_last

SHAPES = [(2, 3, 7), (3, 17, 5, 4), (2, 4, 3, 2, 5), (1, 65, 33)]
# float32 results computed along different paths (fused rows vs columns, LayerNorm
# vs GroupNorm) agree to a few float32 ulps of the unit-scale output.
TOL = 5e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_group_norm_one_group_is_layer_norm(kernel_path, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    g = normkit.group_norm(x, 1)
    ln = normkit.layer_norm(x, x.shape[1:])
    np.testing.assert_allclose(g, ln, rtol=0, atol=TOL)
    g_last = normkit.group_norm(to_last(x), 1, layout=LAST[x.ndim])
    np.testing.assert_allclose(from_last(g_last), ln, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_group_norm_c_groups_is_instance_norm(kernel_path, rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 2 - 5
    c = x.shape[1]
    w = rng.standard_normal(c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    for layout, arr, back in ((FIRST[x.ndim], x, lambda a: a), (LAST[x.ndim], to_last(x), from_last)):
        g, gm, gr = normkit.group_norm(arr, c, w, b, layout=layout, return_stats=True)
        i, im, ir = normkit.instance_norm(arr, weight=w, bias=b, layout=layout, return_stats=True)
        np.testing.assert_allclose(back(g), back(i), rtol=0, atol=TOL)
        np.testing.assert_allclose(gm, im, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gr, ir, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "adain"])
def test_channels_last_is_transposed_channels_first(kernel_path, rng, shape, norm):
    x = rng.standard_normal(shape).astype(np.float32)
    c = x.shape[1]
    w = rng.standard_normal(c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)

    def run(arr, layout):
        if norm == "batch":
            rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
            y = normkit.batch_norm(arr, rm, rv, w, b, training=True, layout=layout)
            return y, rm, rv
        if norm == "instance":
            return (normkit.instance_norm(arr, weight=w, bias=b, layout=layout),)
        if norm == "group":
            return (normkit.group_norm(arr, 1 if c % 2 else 2, w, b, layout=layout),)
        style = (rng.standard_normal((x.shape[0], c)).astype(np.float32),
                 rng.uniform(0.5, 2, (x.shape[0], c)).astype(np.float32))
        return (normkit.adaptive_instance_norm(arr, style, layout=layout),)

    state = rng.bit_generator.state
    first = run(x, FIRST[x.ndim])
    rng.bit_generator.state = state
    last = run(to_last(x), LAST[x.ndim])
    np.testing.assert_allclose(from_last(last[0]), first[0], rtol=0, atol=TOL)
    for a, b_ in zip(first[1:], last[1:]):  # running statistics
        np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-7)


def test_batch_norm_eval_identity_stats(rng):
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float64)
    w = rng.standard_normal(3)
    b = rng.standard_normal(3)
    y = normkit.batch_norm(x, np.zeros(3), np.ones(3), w, b, eps=1e-5)
    expected = x / np.sqrt(1 + 1e-5) * w[None, :, None, None] + b[None, :, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)

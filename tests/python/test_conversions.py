"""Every 16-bit conversion a kernel path does, on all 65536 bit patterns.

The kernels widen float16 / bfloat16 inputs to float32 and narrow float32
results back on store, with a different instruction sequence per path (F16C,
shift-and-round, the AVX512_BF16 VCVTNEPS2BF16 with its denormal fix-up, the
portable bit code of the scalar path). Each must round to nearest even, keep
infinities, denormals and signed zeros, and keep NaN a NaN of the same sign.

A norm is made to pass a chosen float32 value through unchanged: with x = 0 the
output is ``0 * scale + shift``, so a per-channel (BatchNorm inference) or a
per-column (LayerNorm) float32 shift puts any float32 bit pattern in front of
the narrowing store; with weight 1 and shift 0, BatchNorm returns x itself, so
every 16-bit pattern goes through the widening load. The columns kernel
(channels-last BatchNorm) and the rows kernel (LayerNorm) are both covered.
The references are integer bit arithmetic (bfloat16) and NumPy's float16 cast,
independent of normkit.
"""

from __future__ import annotations

import numpy as np
import pytest

import normkit

ml_dtypes = pytest.importorskip("ml_dtypes")

PATTERNS = np.arange(1 << 16, dtype=np.uint32)
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def bf16_reference(u32: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (NaN handled by the caller)."""
    u = u32.astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def narrowing_inputs(name: str, rng) -> list[np.ndarray]:
    """float32 values that hit every 16-bit result: each 16-bit value itself, the
    ties halfway to the next one, one float32 ulp either side of the ties, and
    random low bits."""
    if name == "bfloat16":
        lows = [0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
        sets = [(PATTERNS << 16) | low for low in lows]
        sets.append((PATTERNS << 16) | rng.integers(0, 1 << 16, PATTERNS.size, dtype=np.uint32))
    else:
        exact = PATTERNS.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
        half_ulp = 1 << 12  # of a normal float16, in float32 bits
        sets = [exact + np.uint32(d) for d in (0, half_ulp - 1, half_ulp, half_ulp + 1)]
        sets.append(exact + rng.integers(0, 1 << 13, PATTERNS.size, dtype=np.uint32))
    return [s.astype(np.uint32).view(np.float32) for s in sets]


def check_narrowed(values: np.ndarray, got: np.ndarray, name: str, what: str) -> None:
    got_bits = got.view(np.uint16).ravel()
    nan = np.isnan(values)
    got_float = got.astype(np.float32).ravel()
    assert np.all(np.isnan(got_float[nan])), f"{what}: a NaN input narrowed to a non-NaN"
    assert np.array_equal(np.signbit(got_float[nan]), np.signbit(values[nan])), f"{what}: NaN lost its sign"
    if name == "bfloat16":
        expected = bf16_reference(values.view(np.uint32))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            expected = values.astype(np.float16).view(np.uint16)
    finite_or_inf = ~nan
    bad = np.flatnonzero(got_bits[finite_or_inf] != expected[finite_or_inf])
    assert bad.size == 0, (
        f"{what}: {bad.size} values narrowed wrongly, e.g. float32 bits "
        f"{values[finite_or_inf][bad[0]].view(np.uint32):#010x} -> {got_bits[finite_or_inf][bad[0]]:#06x}, "
        f"expected {expected[finite_or_inf][bad[0]]:#06x}")


@pytest.mark.parametrize("name", DTYPES)
def test_narrowing_columns_kernel(name, rng):
    """Channels-last BatchNorm inference: y[c] = 0 * 1 + shift[c], one channel per value."""
    dt = DTYPES[name]
    c = PATTERNS.size
    zeros = np.zeros((2, c), dt)  # two rows: the table wraps once per row
    for values in narrowing_inputs(name, rng):
        y = normkit.batch_norm(zeros, np.zeros(c, np.float32), np.ones(c, np.float32), np.ones(c, np.float32),
                               values, training=False, eps=0.0)
        # 0 * 1 + (-0) is +0 in float32: the value the store sees.
        with np.errstate(invalid="ignore"):
            seen = np.float32(0) * np.float32(1) + values
        for row in range(2):
            check_narrowed(seen, y[row], name, f"{name} columns kernel, row {row}")


@pytest.mark.parametrize("name", DTYPES)
def test_narrowing_rows_kernel(name, rng):
    """LayerNorm of a constant row with weight 0: y = 0 * 0 + bias, one column per value."""
    dt = DTYPES[name]
    c = PATTERNS.size
    zeros = np.zeros((1, c), dt)
    for values in narrowing_inputs(name, rng):
        y = normkit.layer_norm(zeros, c, np.zeros(c, np.float32), values, eps=1.0)
        with np.errstate(invalid="ignore"):
            seen = np.float32(0) * np.float32(0) + values
        check_narrowed(seen, y[0], name, f"{name} rows kernel")


@pytest.mark.parametrize("name", DTYPES)
def test_widening_every_pattern(name):
    """BatchNorm inference with scale 1 and shift 0 returns x: every 16-bit
    pattern widened and narrowed back is itself (-0 becomes +0: -0 + 0 = +0)."""
    dt = DTYPES[name]
    c = PATTERNS.size
    x = PATTERNS.astype(np.uint16).view(dt).reshape(1, c)
    y = normkit.batch_norm(x, np.zeros(c, np.float32), np.ones(c, np.float32), np.ones(c, np.float32),
                           np.zeros(c, np.float32), training=False, eps=0.0)
    x32 = x.astype(np.float32).ravel()
    with np.errstate(invalid="ignore"):
        expected = (x32 * np.float32(1) + np.float32(0)).astype(dt).view(np.uint16)
    nan = np.isnan(x32)
    got = y.ravel().view(np.uint16)
    assert np.array_equal(got[~nan], expected[~nan])
    assert np.all(np.isnan(y.ravel().astype(np.float32)[nan]))
    assert np.array_equal(np.signbit(y.ravel().astype(np.float32)[nan]), np.signbit(x32[nan]))

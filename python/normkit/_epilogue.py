"""The store stage of the forward functions: ``activation=``, ``quantize=`` and ``scale=``.

A leaf module (it imports no front end): the names are checked here once and
become the codes the extension takes, in the order of the C++ enums
``normkit::Activation`` and ``normkit::Quantize`` (normkit/fused.hpp).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ._arrays import foreign_out
from ._dtypes import FLOAT8_E4M3, elements_overlap, empty

ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh")
QUANTIZE = ("int8", "float8_e4m3")

INT8 = np.dtype(np.int8)


class Epilogue(NamedTuple):
    activation: int = 0  # 0: none, then ACTIVATIONS' order
    quantize: int = 0  # 0: none, then QUANTIZE's order
    scale: float | None = None  # static scale, or None (dynamic when quantize)

    @property
    def dynamic(self) -> bool:
        return self.quantize != 0 and self.scale is None


PLAIN = Epilogue()


def _code(value, argument: str, names: tuple) -> int:
    """0 for None, else 1 + the index of the name."""
    if value is None:
        return 0
    if value not in names:
        choices = ", ".join(map(repr, names))
        if not isinstance(value, str):
            raise TypeError(f"{argument}: expected None or one of {choices}, got {value!r}")
        raise ValueError(f"{argument}: expected None or one of {choices}, got {value!r}")
    return 1 + names.index(value)


def parse(activation, quantize=None, scale=None, *, dynamic_allowed=True) -> Epilogue:
    """Checks the store-stage arguments; errors name the argument."""
    if activation is None and quantize is None and scale is None:
        return PLAIN
    act = _code(activation, "activation", ACTIVATIONS)
    q = _code(quantize, "quantize", QUANTIZE)
    if quantize == "float8_e4m3" and FLOAT8_E4M3 is None:
        raise ValueError("quantize: 'float8_e4m3' outputs are ml_dtypes.float8_e4m3fn arrays: install ml_dtypes")
    if scale is not None:
        if q == 0:
            raise ValueError("scale: given without quantize (a scale is for quantized outputs)")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a positive float or None, got {scale!r}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    elif q != 0 and not dynamic_allowed:
        raise ValueError(
            f"scale: required with quantize={quantize!r} here (a static per-tensor scale; dynamic per-row "
            "scales are for the rows norms)"
        )
    return Epilogue(act, q, scale)


def output_dtype(epilogue: Epilogue, x_dtype) -> np.dtype:
    """The dtype of the output: x's, int8, or float8_e4m3fn."""
    if epilogue.quantize == 1:
        return INT8
    if epilogue.quantize == 2:
        return FLOAT8_E4M3
    return np.dtype(x_dtype)


def check_quantized_out(out, epilogue: Epilogue) -> np.ndarray:
    """A caller-given output for a quantized call: a writable array (of any kind) of the
    quantized dtype (shape and overlap are checked by the C++ core)."""
    name = QUANTIZE[epilogue.quantize - 1]
    if not isinstance(out, np.ndarray):
        out = foreign_out(out, "out")
    expected = output_dtype(epilogue, None)
    if out.dtype != expected:
        raise TypeError(f"out: expected dtype {expected} for quantize={name!r}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out: array is read-only")
    if elements_overlap(out):
        raise ValueError(f"out: its elements overlap each other (a broadcast or self-overlapping view, strides {out.strides})")
    return out


def quantized_output(out, shape, epilogue: Epilogue, given):
    """(array the kernel writes, array to copy it into afterwards or None) for a
    quantized call: a fresh array, `out` itself, or for a non-contiguous `out`
    a fresh array copied into it once. `given` is x as the caller passed it: a
    quantized output may not share memory with it (the core checks the direct case)."""
    dtype = output_dtype(epilogue, None)
    if out is None:
        return empty(shape, dtype), None
    out = check_quantized_out(out, epilogue)
    if out.shape == tuple(shape) and not out.flags.c_contiguous:
        if np.shares_memory(out, given):
            raise ValueError("out: shares memory with x (an output must not overlap any other argument)")
        return empty(shape, dtype), out
    return out, None


def results(y, scales=None, sum_=None, stats=()):
    """The outputs in the contract's order: y (or q), dynamic scales, the sum, the statistics."""
    parts = [y]
    if scales is not None:
        parts.append(scales)
    if sum_ is not None:
        parts.append(sum_)
    parts.extend(stats)
    return parts[0] if len(parts) == 1 else tuple(parts)


def no_cuda_epilogue(x, activation, quantize, scale):
    """The CUDA backend has no fused store stage: a CUDA x with any of them is a ValueError."""
    if activation is not None or quantize is not None or scale is not None:
        raise ValueError("activation: the CUDA backend has no fused store stage yet (activation, quantize and scale "
                         "are for CPU arrays)")

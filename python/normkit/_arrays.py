"""Arrays of other libraries in, the same kind out.

Every normkit function computes on NumPy arrays. This module is the one place that turns
the arrays callers hold into NumPy views of the same memory, and NumPy results back into
the caller's kind:

- a PyTorch CPU tensor is read in place (``Tensor.numpy()``; bfloat16 through an int16
  view); a tensor that requires grad, a meta tensor or one on another device is refused
  with an error naming the argument (the plain functions record no autograd:
  ``normkit.torch`` has the autograd functions and ``torch.nn`` modules);
- any other object that speaks DLPack (JAX, an Array API library, a raw DLPack capsule,
  used once) is read in place through the extension's DLPack import, bfloat16 included;
- anything else goes through ``np.asarray``: the buffer protocol and
  ``__array_interface__`` without a copy, nested lists with one.

Results follow the normalized array (the function's first argument): a torch tensor in, torch
tensors out (sharing the NumPy result's memory, no copy); an object with an
``__array_namespace__`` in, that namespace's ``from_dlpack`` of the result; NumPy otherwise.
An ``out=`` / ``sum_out=`` the caller passed is returned as itself, whatever its kind.

Imports only the compiled core and the CUDA routing (to leave CUDA arrays to it).
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import numpy as np

from . import _cuda, _ext

try:  # bfloat16 / float8 arrays come from ml_dtypes (optional)
    import ml_dtypes as _ml_dtypes

    BFLOAT16 = np.dtype(_ml_dtypes.bfloat16)
    FLOAT8_E4M3 = np.dtype(_ml_dtypes.float8_e4m3fn)  # quantized outputs only
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = FLOAT8_E4M3 = None

_EXPECTED = "an array (NumPy, a PyTorch CPU tensor, any DLPack or buffer-protocol array)"
_NO_ML_DTYPES = "bfloat16 arrays need ml_dtypes (pip install ml_dtypes)"

# The outputs a caller may pass; each is returned as itself.
_OUT_ARGS = ("out", "sum_out")
_NUMPY_OR_NONE = (np.ndarray, type(None))


def _torch():
    """The torch module if the caller's process imported it (normkit never imports it here)."""
    return sys.modules.get("torch")


def is_torch_tensor(a) -> bool:
    torch = _torch()
    return torch is not None and isinstance(a, torch.Tensor)


def torch_to_numpy(t, name: str) -> np.ndarray:
    """A CPU tensor as a NumPy view of its memory (bfloat16 as ml_dtypes.bfloat16)."""
    torch = _torch()
    if t.device.type != "cpu":
        if t.device.type == "meta":
            raise ValueError(f"{name}: is a meta tensor (a shape without data); normkit computes on CPU or CUDA tensors")
        raise ValueError(f"{name}: is on device {t.device}; normkit's functions take CPU (or CUDA) tensors")
    if t.requires_grad:
        raise ValueError(
            f"{name}: requires grad, and normkit's plain functions record no autograd: use normkit.torch "
            f"(autograd functions and torch.nn modules), or pass {name}.detach()"
        )
    try:
        if t.dtype == torch.bfloat16:
            if BFLOAT16 is None:
                raise TypeError(f"{name}: {_NO_ML_DTYPES}")
            return t.view(torch.int16).numpy().view(BFLOAT16)
        if t.dtype == torch.float8_e4m3fn and FLOAT8_E4M3 is not None:  # a quantized out=
            return t.view(torch.uint8).numpy().view(FLOAT8_E4M3)
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        if str(exc).startswith(name + ":"):
            raise
        raise TypeError(f"{name}: expected a float tensor normkit takes, got {t.dtype} ({exc})") from None


def numpy_to_torch(a: np.ndarray):
    """A NumPy result as a torch tensor sharing its memory."""
    torch = _torch()
    if BFLOAT16 is not None:
        if a.dtype == BFLOAT16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        if a.dtype == FLOAT8_E4M3:
            return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(a)


def _dlpack_to_numpy(a, name: str) -> np.ndarray:
    view, bf16 = _ext.dlpack_view(a, name)
    if bf16:
        if BFLOAT16 is None:
            raise TypeError(f"{name}: {_NO_ML_DTYPES}")
        view = view.view(BFLOAT16)
    return view


def to_numpy(a, name: str) -> np.ndarray:
    """``a`` (not a NumPy array) as a NumPy array, a view of its memory where it has one."""
    if is_torch_tensor(a):
        return torch_to_numpy(a, name)
    if hasattr(type(a), "__dlpack__") or type(a).__name__ == "PyCapsule":
        return _dlpack_to_numpy(a, name)
    try:
        return np.asarray(a)
    except Exception as exc:  # objects that refuse conversion
        raise TypeError(f"{name}: expected {_EXPECTED}, got {type(a).__name__}") from exc


def is_array_object(a) -> bool:
    """Whether ``a`` is an array whose memory to_numpy views (not a list it would copy)."""
    return is_torch_tensor(a) or hasattr(type(a), "__dlpack__") or isinstance(a, memoryview)


def foreign_out(out, name: str) -> np.ndarray:
    """A caller's output that is not a NumPy array, as a view of its memory (a list or other
    object np.asarray would copy is refused: the results would be lost in the copy)."""
    _cuda.reject_device_array(out, name)
    if not is_array_object(out):
        raise TypeError(f"{name}: expected an array to write into (NumPy, torch, DLPack), got {type(out).__name__}")
    return to_numpy(out, name)


def _data_address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _restorer(x, given_outs):
    """How a NumPy result goes back to the caller: as one of the outputs it passed, or
    converted to x's kind."""
    outs = [(o, o if type(o) is np.ndarray else to_numpy(o, name)) for name, o in given_outs]

    if is_torch_tensor(x):
        convert = numpy_to_torch
    elif type(x) is not np.ndarray and hasattr(type(x), "__array_namespace__"):
        xp = x.__array_namespace__()

        def convert(r):
            try:
                return xp.from_dlpack(r)
            except Exception:  # e.g. bfloat16, which NumPy cannot export through DLPack
                return xp.asarray(r)
    else:
        convert = None

    def restore(r):
        if type(r) is tuple:  # adaptive_instance_norm_backward's (dmean, dstd)
            return tuple(restore(part) for part in r)
        if type(r) is not np.ndarray:
            return r
        for o, view in outs:
            if r.shape == view.shape and _data_address(r) == _data_address(view):
                return o
        return r if convert is None else convert(r)

    return restore


def like_input(x, result, kwargs=None):
    """``result`` (one NumPy array or a tuple) as the caller gets it back: a passed ``out=``
    / ``sum_out=`` as itself, other arrays in x's kind."""
    given_outs = [(n, kwargs[n]) for n in _OUT_ARGS if kwargs.get(n) is not None] if kwargs else ()
    if type(x) is np.ndarray and all(type(o) is np.ndarray for _, o in given_outs):
        return result
    if _cuda.is_cuda(x):
        return result  # the CUDA backend's outputs are already x's kind
    return _restorer(x, given_outs)(result)


F = TypeVar("F", bound=Callable)


def same_kind_out(fn: F) -> F:
    """Decorates a public function whose first argument is the array it normalizes: its
    NumPy results come back in that array's kind, and a passed ``out=`` as itself."""

    @functools.wraps(fn)
    def call(x, *args, **kwargs):
        result = fn(x, *args, **kwargs)
        # The common call, NumPy in and out (layout= and the like are keywords too): as it is.
        if type(x) is np.ndarray and type(kwargs.get("out")) in _NUMPY_OR_NONE and "sum_out" not in kwargs:
            return result
        return like_input(x, result, kwargs)

    return call  # type: ignore[return-value]

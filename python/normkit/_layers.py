"""Layer objects, as torch.nn modules: BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.

Each class is a thin Python subclass of the bound C++ layer (normkit/layers.hpp),
which owns the parameters, their gradients and the running statistics::

    bn = normkit.BatchNorm(64, layout="NHWC")
    y = bn(x)                      # training mode: batch statistics, running ones updated
    dx = bn.backward(dy)           # grad_weight / grad_bias accumulate (zero_grad() resets)
    bn.eval(); y = bn(x)           # inference: running statistics
    bn.weight *= 2                 # NumPy views of the C++ storage, writable
    bn.load_state_dict({k: v.numpy() for k, v in torch_bn.state_dict().items()})

Semantics and defaults are PyTorch's (BatchNorm is BatchNorm1d/2d/3d in one class,
InstanceNorm likewise; `layout` names where the channel axis is, default
channels-first of x's rank). Differences and choices:

- ``layer(x)`` takes x of the layer's dtype, or float16/bfloat16 x with a float32
  layer (mixed precision). A non-contiguous x is copied once. In training mode the
  layer keeps a reference to (not a copy of) the x it normalized, for
  ``backward``: modifying x in place before ``backward`` gives wrong gradients.
- ``backward(dy)`` needs a forward in training mode since the last backward; it
  returns dx (x's shape and dtype) and adds to ``grad_weight``/``grad_bias``.
  Without such a forward it raises RuntimeError (as PyTorch does for a second
  backward through a freed graph). dy must have x's shape and dtype
  (ValueError / TypeError naming ``dy``).
- ``weight``, ``bias``, ``running_mean``, ``running_var``, ``grad_weight``,
  ``grad_bias`` are NumPy arrays sharing memory with the layer (None when the
  layer has none); ``num_batches_tracked`` is a 0-d int64 array, likewise.
  Assigning an array copies it into the layer's storage (same shape required:
  otherwise ValueError naming the attribute).
- ``load_state_dict`` raises RuntimeError, as PyTorch does, for missing or
  unexpected keys (strict=True) and for shape mismatches (always); nothing is
  loaded then. It returns ``(missing_keys, unexpected_keys)``.
- Pickle and ``copy.deepcopy`` keep the constructor arguments, the state dict,
  the gradients and the training flag (not a pending forward's saved input).
"""

from __future__ import annotations

import collections
import numbers

import numpy as np

from . import _cuda, _ext
from ._args import Layout, as_eps, as_normalized_shape, layout_name
from ._arrays import like_input
from ._dtypes import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, as_input, as_int, empty, is_bf16
from ._epilogue import ACTIVATIONS
from ._epilogue import parse as parse_epilogue
from ._fold import new_outputs, prepare_weight
from ._moments import Moments, merge_moments, moments

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "recalibrate_batch_norm"]

_UINT16 = np.dtype(np.uint16)

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str) and dtype == "bfloat16":
        if BFLOAT16 is None:
            raise TypeError("dtype: bfloat16 layers need the ml_dtypes package")
        return "bfloat16"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected float32, float64, float16 or bfloat16, got {dtype!r}") from None
    if dt == FLOAT32 or dt == FLOAT64 or dt == FLOAT16:
        return dt.name
    if is_bf16(dt):
        return "bfloat16"
    raise TypeError(f"dtype: expected float32, float64, float16 or bfloat16, got {dt}")


def _optional_real(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number or None, got {value!r}")
    return float(value)


def _array_value(value, name: str) -> np.ndarray:
    """A value assigned to a parameter or buffer, as a NumPy array of real numbers."""
    if not isinstance(value, np.ndarray):
        if hasattr(value, "detach"):  # a torch tensor that may require grad
            value = value.detach()
        try:
            value = np.asarray(value)
        except Exception as exc:
            raise TypeError(f"{name}: expected an array, got {type(value).__name__}") from exc
    if value.dtype.kind not in "fiu" and not is_bf16(value.dtype):
        raise TypeError(f"{name}: expected an array of real numbers, got dtype {value.dtype}")
    return value


def _buffer_property(name: str, doc: str):
    def fget(self):
        a = self._buffer(name)
        if a is not None and a.dtype == _UINT16:  # bfloat16 storage travels as uint16
            a = a.view(BFLOAT16)
        return a

    def fset(self, value):
        self._assign(name, value)

    return property(fget, fset, doc=doc)


def _num_batches_tracked_property():
    def fget(self):
        return self._num_batches_tracked()

    def fset(self, value):
        self._assign("num_batches_tracked", value)

    return property(fget, fset, doc="Training forwards counted (0-d int64 array sharing memory), or None.")


class _Layer:
    """What the five layer classes share (mixed in before the bound C++ class)."""

    # State dict keys in PyTorch's order (parameters, then buffers); absent ones are skipped.
    _STATE_KEYS: tuple = ()

    # ----------------------------------------------------------------- forward / backward

    def __call__(self, x):
        """y = layer(x): a new array of x's shape and dtype (and kind: torch in, torch out)."""
        given = x
        if type(x) is not np.ndarray or not x.flags.c_contiguous:
            if _cuda.is_cuda(x):
                raise ValueError(
                    f"x: is on cuda:{_cuda.device_of(x)}; normkit's layer objects hold their parameters in host "
                    "memory and run on the CPU (the normkit functions take CUDA arrays)"
                )
            x = as_input(x, "x")
            if not x.flags.c_contiguous:
                x = np.ascontiguousarray(x)
        y = empty(x.shape, x.dtype)
        self._saved_x = None  # the C++ layer drops its saved state too if forward throws
        if is_bf16(x.dtype):
            self._forward(x.view(_UINT16), y.view(_UINT16), True)
        else:
            self._forward(x, y, False)
        if self.training:
            self._saved_x = x  # the C++ layer keeps a view of x for backward
        return y if type(given) is np.ndarray else like_input(given, y)

    forward = __call__

    def backward(self, dy):
        """dx for the last training-mode forward; adds to grad_weight / grad_bias."""
        x = self._saved_x
        if x is None:
            raise RuntimeError(
                "backward: needs a forward in training mode since the last backward "
                "(call layer.train() and run layer(x) first)"
            )
        given = dy
        if type(dy) is not np.ndarray:
            dy = as_input(dy, "dy")
        if dy.dtype != x.dtype:
            as_input(dy, "dy")  # a TypeError for non-float dtypes
            raise TypeError(f"dy: expected dtype {x.dtype} like x, got {dy.dtype}")
        if dy.shape != x.shape:
            raise ValueError(f"dy: expected shape {x.shape} like x, got {dy.shape}")
        if not dy.flags.c_contiguous:
            dy = np.ascontiguousarray(dy)
        dx = empty(x.shape, x.dtype)
        if is_bf16(x.dtype):
            self._backward(dy.view(_UINT16), dx.view(_UINT16), True)
        else:
            self._backward(dy, dx, False)
        self._saved_x = None  # backward consumed the saved state
        return dx if type(given) is np.ndarray else like_input(given, dx)

    # ----------------------------------------------------------------- mode

    def train(self, mode: bool = True):
        """Training mode (batch statistics; saves for backward). Returns self."""
        self._train(bool(mode))
        return self

    def eval(self):
        """Inference mode (running statistics where tracked). Returns self."""
        self._train(False)
        return self

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the parameters, gradients and running statistics."""
        name = self._dtype_name
        return BFLOAT16 if name == "bfloat16" else np.dtype(name)

    # ----------------------------------------------------------------- parameters

    def _assign(self, name: str, value) -> None:
        if name == "num_batches_tracked":
            current = self._num_batches_tracked()
        else:
            current = getattr(self, name)
        if current is None:
            if value is None:
                return
            raise ValueError(f"{name}: this layer has no {name} ({self._absent_reason(name)})")
        if value is None:
            raise TypeError(f"{name}: expected an array of shape {current.shape}, got None (it cannot be removed)")
        a = _array_value(value, name)
        if a.shape != current.shape:
            raise ValueError(f"{name}: expected shape {current.shape}, got {a.shape}")
        np.copyto(current, a, casting="unsafe")

    def _absent_reason(self, name: str) -> str:
        if name in ("running_mean", "running_var", "num_batches_tracked"):
            return "track_running_stats=False"
        if hasattr(self, "elementwise_affine"):
            if name in ("bias", "grad_bias") and self.elementwise_affine:
                return "bias=False"
            return "elementwise_affine=False"
        return "affine=False"

    # ----------------------------------------------------------------- state dict

    def state_dict(self) -> dict:
        """Copies of the parameters and buffers under PyTorch's key names."""
        state = {}
        for key in self._STATE_KEYS:
            value = self._num_batches_tracked() if key == "num_batches_tracked" else getattr(self, key)
            if value is not None:
                state[key] = value.copy()
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copies a state dict (arrays, or anything np.asarray takes) into the layer.

        As in PyTorch: with ``strict``, missing and unexpected keys are an error;
        a shape mismatch always is (RuntimeError listing every problem; nothing is
        loaded then). A missing num_batches_tracked is left as it is, as PyTorch
        does. Returns ``(missing_keys, unexpected_keys)``.
        """
        current = {}
        for key in self._STATE_KEYS:
            value = self._num_batches_tracked() if key == "num_batches_tracked" else getattr(self, key)
            if value is not None:
                current[key] = value
        missing = [k for k in current if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in current]
        errors = []
        if strict:
            if missing:
                errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
            if unexpected:
                errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
        loads = []
        for key, target in current.items():
            if key not in state_dict:
                continue
            try:
                value = _array_value(state_dict[key], key)
            except TypeError as exc:
                errors.append(str(exc))
                continue
            if value.shape != target.shape:
                errors.append(
                    f"size mismatch for {key}: copying an array with shape {value.shape}, "
                    f"the shape in the current layer is {target.shape}."
                )
                continue
            loads.append((target, value))
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors)
            )
        for target, value in loads:
            np.copyto(target, value, casting="unsafe")
        return IncompatibleKeys(missing, unexpected)

    # ----------------------------------------------------------------- repr, pickle

    def _extra_repr(self) -> str:
        return ""

    def _set_activation_name(self, activation) -> None:
        self._set_activation(parse_epilogue(activation).activation)

    @property
    def activation(self):
        """The activation after the affine ("relu", "silu", "gelu", "gelu_tanh"), or None."""
        code = self._activation_code
        return None if code == 0 else ACTIVATIONS[code - 1]

    def __repr__(self) -> str:
        extra = self._extra_repr()
        layout = getattr(self, "_layout_name", None)
        if layout is not None:
            extra += f", layout={layout}"
        if self.activation is not None:
            extra += f", activation={self.activation!r}"
        if self._dtype_name != "float32":
            extra += f", dtype={self._dtype_name}"
        return f"{type(self).__name__}({extra})"

    def _init_args(self) -> dict:
        raise NotImplementedError

    def __reduce__(self):
        grads = {}
        for key in ("grad_weight", "grad_bias"):
            value = getattr(self, key, None)
            if value is not None:
                grads[key] = value.copy()
        extra = {k: v for k, v in self.__dict__.items() if k != "_saved_x"}
        init_args = dict(self._init_args(), activation=self.activation)
        return (_rebuild, (type(self), init_args, self.state_dict(), grads, self.training, extra))


def _rebuild(cls, init_args, state, grads, training, extra):
    """Unpickling: a layer of `cls` (possibly a user subclass with another
    constructor) built by normkit's constructor, then its state restored."""
    base = next(c for c in cls.__mro__ if c in _PUBLIC)
    layer = cls.__new__(cls)
    base.__init__(layer, **init_args)
    layer.load_state_dict(state)
    for key, value in grads.items():
        setattr(layer, key, value)
    layer.train(training)
    layer.__dict__.update(extra)
    return layer


# --------------------------------------------------------------------------- the five layers

_WEIGHT = _buffer_property("weight", "Scale per channel / element (NumPy array sharing memory), or None.")
_BIAS = _buffer_property("bias", "Shift per channel / element (NumPy array sharing memory), or None.")
_GRAD_WEIGHT = _buffer_property("grad_weight", "Accumulated gradient of weight (shares memory), or None.")
_GRAD_BIAS = _buffer_property("grad_bias", "Accumulated gradient of bias (shares memory), or None.")
_RUNNING_MEAN = _buffer_property("running_mean", "Running mean per channel (shares memory), or None.")
_RUNNING_VAR = _buffer_property("running_var", "Running (unbiased) variance per channel (shares memory), or None.")


def _layout_property():
    def fget(self):
        name = self._layout_name
        return None if name is None else Layout[name]

    return property(fget, doc="The layout given at construction (a normkit.Layout), or None: channels-first.")


class _RunningNorm(_Layer):
    """BatchNorm and InstanceNorm: same constructor, same state."""

    _STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    weight, bias, grad_weight, grad_bias = _WEIGHT, _BIAS, _GRAD_WEIGHT, _GRAD_BIAS
    running_mean, running_var = _RUNNING_MEAN, _RUNNING_VAR
    num_batches_tracked = _num_batches_tracked_property()
    layout = _layout_property()

    def _init(self, base, num_features, eps, momentum, affine, track_running_stats, layout, dtype, activation):
        base.__init__(
            self,
            as_int(num_features, "num_features"),
            as_eps(eps),
            _optional_real(momentum, "momentum"),
            bool(affine),
            bool(track_running_stats),
            layout_name(layout),
            _dtype_name(dtype),
        )
        self._set_activation_name(activation)
        self._saved_x = None

    def _extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _init_args(self) -> dict:
        return dict(
            num_features=self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            layout=self._layout_name,
            dtype=self._dtype_name,
        )


class BatchNorm(_RunningNorm, _ext._BatchNorm):
    """Batch normalization, as torch.nn.BatchNorm1d/2d/3d (one class; ``layout``
    picks the channel axis, default channels-first of x's rank).

    Training: normalizes with the batch statistics (biased variance), updates
    running_mean / running_var (unbiased variance) with ``momentum`` (None: the
    cumulative average) when ``track_running_stats``, counts num_batches_tracked.
    Eval: the running statistics (the batch ones when not tracked).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 layout=None, dtype=np.float32, activation=None):
        self._init(_ext._BatchNorm, num_features, eps, momentum, affine, track_running_stats, layout, dtype, activation)

    def recalibrate(self, batches):
        """Sets running_mean / running_var to the exact population mean and
        unbiased variance of all values of ``batches`` (an iterable of arrays of
        any batch sizes, in the layer's layout), in one pass with memory for one
        batch's statistics (as fvcore's PreciseBN, but exact rather than an
        average of per-batch statistics). num_batches_tracked is left alone.
        Returns self."""
        if not self.track_running_stats:
            raise ValueError("recalibrate: the layer has no running statistics (track_running_stats=False)")
        total = Moments(0, np.zeros(self.num_features), np.zeros(self.num_features))
        for i, x in enumerate(batches):
            m = moments(x, norm="batch", layout=self._layout_name)
            if m.shape != total.shape:
                raise ValueError(f"batches[{i}]: expected {self.num_features} channels (num_features), got "
                                 f"statistics of shape {m.shape}")
            total = merge_moments(total, m)
        total = self._merge_recalibration(total)
        if total.count < 2:
            raise ValueError(f"batches: expected more than 1 value per channel in all, got {total.count}")
        self.running_mean = total.mean
        self.running_var = total.var(1)
        return self

    def _merge_recalibration(self, total):
        return total  # SyncBatchNorm: merged over the ranks

    def fold(self, weight, bias=None, *, transpose=False, groups=1):
        """The layer, in inference form, folded into the convolution or linear
        layer before it: ``normkit.fold_batch_norm`` with this layer's running
        statistics, eps and (if affine) weight and bias. Returns new arrays
        ``(folded_weight, folded_bias)`` of weight's dtype, which must be the
        layer's (or float16/bfloat16 for a float32 layer); C_out must be
        num_features. Needs ``track_running_stats``. Changes nothing.
        """
        weight, bias = prepare_weight(weight, bias)
        transpose = bool(transpose)
        groups = as_int(groups, "groups")
        folded_weight, folded_bias = new_outputs(weight, transpose, groups)
        if is_bf16(weight.dtype):
            self._fold(weight.view(_UINT16), None if bias is None else bias.view(_UINT16),
                       folded_weight.view(_UINT16), folded_bias.view(_UINT16), transpose, groups, True)
        else:
            self._fold(weight, bias, folded_weight, folded_bias, transpose, groups, False)
        return folded_weight, folded_bias


class InstanceNorm(_RunningNorm, _ext._InstanceNorm):
    """Instance normalization, as torch.nn.InstanceNorm1d/2d/3d (one class;
    ``layout`` picks the channel axis). Statistics per (sample, channel) in
    training or when not tracking; the running ones in eval when tracked
    (updated in training with the batch mean of the per-instance statistics;
    momentum=None leaves them unchanged and num_batches_tracked is never
    incremented, as in PyTorch).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, *,
                 layout=None, dtype=np.float32, activation=None):
        self._init(_ext._InstanceNorm, num_features, eps, momentum, affine, track_running_stats, layout, dtype,
                   activation)


class GroupNorm(_Layer, _ext._GroupNorm):
    """Group normalization, as torch.nn.GroupNorm: statistics per (sample, group
    of num_channels / num_groups channels), affine per channel; ``layout`` picks
    the channel axis."""

    _STATE_KEYS = ("weight", "bias")
    weight, bias, grad_weight, grad_bias = _WEIGHT, _BIAS, _GRAD_WEIGHT, _GRAD_BIAS
    layout = _layout_property()

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, layout=None, dtype=np.float32,
                 activation=None):
        _ext._GroupNorm.__init__(
            self,
            as_int(num_groups, "num_groups"),
            as_int(num_channels, "num_channels"),
            as_eps(eps),
            bool(affine),
            layout_name(layout),
            _dtype_name(dtype),
        )
        self._set_activation_name(activation)
        self._saved_x = None

    def _extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    def _init_args(self) -> dict:
        return dict(num_groups=self.num_groups, num_channels=self.num_channels, eps=self.eps, affine=self.affine,
                    layout=self._layout_name, dtype=self._dtype_name)


class LayerNorm(_Layer, _ext._LayerNorm):
    """Layer normalization over the trailing ``normalized_shape`` dims, as
    torch.nn.LayerNorm (weight and bias of that shape)."""

    _STATE_KEYS = ("weight", "bias")
    weight, bias, grad_weight, grad_bias = _WEIGHT, _BIAS, _GRAD_WEIGHT, _GRAD_BIAS

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32,
                 activation=None):
        _ext._LayerNorm.__init__(
            self, list(as_normalized_shape(normalized_shape)), as_eps(eps), bool(elementwise_affine), bool(bias),
            _dtype_name(dtype))
        self._set_activation_name(activation)
        self._saved_x = None

    @property
    def normalized_shape(self) -> tuple:
        return tuple(self._normalized_shape)

    def _has_bias(self) -> bool:
        return self._buffer("bias") is not None or not self.elementwise_affine

    def _extra_repr(self) -> str:
        extra = "" if self._has_bias() else ", bias=False"
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{extra}"

    def _init_args(self) -> dict:
        return dict(normalized_shape=self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
                    bias=self._has_bias(), dtype=self._dtype_name)


class RMSNorm(_Layer, _ext._RMSNorm):
    """Root-mean-square normalization over the trailing ``normalized_shape``
    dims, as torch.nn.RMSNorm (``eps=None``: the machine epsilon of x's dtype)."""

    _STATE_KEYS = ("weight",)
    weight, grad_weight = _WEIGHT, _GRAD_WEIGHT

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32, activation=None):
        _ext._RMSNorm.__init__(
            self, list(as_normalized_shape(normalized_shape)), None if eps is None else as_eps(eps),
            bool(elementwise_affine), _dtype_name(dtype))
        self._set_activation_name(activation)
        self._saved_x = None

    @property
    def normalized_shape(self) -> tuple:
        return tuple(self._normalized_shape)

    def _extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def _init_args(self) -> dict:
        return dict(normalized_shape=self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
                    dtype=self._dtype_name)


_PUBLIC = (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm)


def recalibrate_batch_norm(layer, batches):
    """``layer.recalibrate(batches)``: a BatchNorm's running statistics set to the exact
    population mean and unbiased variance over ``batches``. Returns the layer."""
    if not isinstance(layer, BatchNorm):
        raise TypeError(f"layer: expected a normkit.BatchNorm, got {type(layer).__name__}")
    return layer.recalibrate(batches)

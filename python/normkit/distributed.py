"""Distributed BatchNorm over MPI (mpi4py): ``SyncBatchNorm``, as ``torch.nn.SyncBatchNorm``.

Every rank holds one shard of the global batch; in training each shard is
normalized with the statistics of the whole batch and the running statistics
are the same on every rank::

    from mpi4py import MPI
    from normkit.distributed import SyncBatchNorm
    bn = SyncBatchNorm(64, layout="NHWC")          # comm: MPI.COMM_WORLD by default
    y = bn(x_shard)                                # one Allgather of 2C + 1 values
    dx = bn.backward(dy_shard)                     # one all-reduce of 2C values

The communication is MPI's (mpi4py and an MPI library, e.g. ``pip install mpi4py
mpich``; both optional: normkit imports without them, and only a SyncBatchNorm
without a ``comm`` needs them). The forward gathers each rank's (count, mean,
M2) and merges them in rank order by Chan's formula, so uneven and empty shards
are exact and every rank computes the same bits. The backward's all-reduce of
(sum_dy, sum_dy_xmu) is an Allgather summed in rank order, for the same reason
(an MPI Allreduce may round differently on different ranks).
"""

from __future__ import annotations

import numpy as np

import types

from ._backward import batch_norm_backward, batch_norm_grad_sums
from ._args import batch_and_channels
from ._channels import batch_norm
from ._cuda import reject_device_array
from ._dtypes import as_input, is_16bit
from ._layers import BatchNorm
from ._moments import Moments, merge_moments, moments

__all__ = ["SyncBatchNorm"]


def _world():
    try:
        from mpi4py import MPI  # an optional dependency: imported only when the default communicator is needed
    except ImportError as exc:
        raise ImportError(
            "comm: SyncBatchNorm without a communicator uses mpi4py's MPI.COMM_WORLD, and mpi4py is not "
            "installed (pip install mpi4py mpich)"
        ) from exc
    return MPI.COMM_WORLD


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics span every rank of ``comm``.

    Same constructor as ``BatchNorm`` plus ``comm`` (an mpi4py communicator;
    None: ``MPI.COMM_WORLD`` at first use). In training, on every rank: outputs
    and input gradients equal BatchNorm's on the concatenated global batch,
    ``grad_weight``/``grad_bias`` are the global batch's (summed over ranks),
    and the running statistics (momentum, or the cumulative average with
    momentum=None) are updated identically. In eval it is a plain BatchNorm
    (no communication). Every rank must call forward and backward the same
    number of times (they are collectives). No ``activation``: the distributed
    backward is BatchNorm's own. A pickled SyncBatchNorm comes back with the
    default communicator.
    """

    _comm = None
    _sync_saved = None  # (x, merged moments) of the last training forward

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 layout=None, comm=None, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, layout=layout, dtype=dtype)
        self._comm = comm

    @property
    def comm(self):
        """The communicator the statistics are merged over."""
        if self._comm is None:
            self._comm = _world()
        return self._comm

    # ----------------------------------------------------------------- collectives

    def _merged(self, local: Moments) -> Moments:
        """The moments of every rank's shard, merged in rank order (one Allgather of 2C + 1 values)."""
        comm = self.comm
        send = local.to_buffer()
        recv = np.empty((comm.Get_size(), send.size), dtype=np.float64)
        comm.Allgather(send, recv)
        return merge_moments([Moments.from_buffer(row, local.shape) for row in recv])

    def _summed(self, *arrays):
        """Each (C,) array summed over the ranks in rank order: an all-reduce, done as one
        Allgather so that every rank adds in the same order and gets the same bits."""
        comm = self.comm
        send = np.concatenate(arrays).astype(np.float64)
        recv = np.empty((comm.Get_size(), send.size), dtype=np.float64)
        comm.Allgather(send, recv)
        total = recv[0].copy()
        for row in recv[1:]:
            total += row
        return np.split(total, len(arrays))

    # ----------------------------------------------------------------- forward / backward

    def _training_input(self, x):
        reject_device_array(x, "x")
        x = as_input(x, "x")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        if x.dtype != self.dtype and not (self._dtype_name == "float32" and is_16bit(x.dtype)):
            raise TypeError(f"x: dtype {x.dtype} does not match the layer's {self._dtype_name} (x must have the "
                            "layer's dtype, or be float16/bfloat16 with a float32 layer)")
        channels = batch_and_channels(x, self._layout_name)[1]
        if x.ndim >= 2 and channels != self.num_features and (self.affine or self.track_running_stats):
            raise ValueError(f"x: expected {self.num_features} channels (num_features), got {channels} in shape "
                             f"{x.shape}")
        return x

    def __call__(self, x):
        """y = layer(x); in training, with the statistics of all ranks' x together."""
        self._sync_saved = None
        if not self.training:
            return super().__call__(x)
        x = self._training_input(x)
        m = self._merged(moments(x, norm="batch", layout=self._layout_name))
        momentum = 0.0
        if self.track_running_stats:
            tracked = self._num_batches_tracked()
            momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked + 1)
        y = batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=True,
                       momentum=momentum, eps=self.eps, layout=self._layout_name, stats=m)
        if self.track_running_stats:
            tracked += 1  # the layer's own counter (a 0-d view of it)
        self._sync_saved = (x, m)
        return y

    forward = __call__

    def backward(self, dy):
        """dx for the last training forward; adds the global batch's gradients to grad_weight / grad_bias."""
        if self._sync_saved is None:
            return super().backward(dy)  # no training forward since the last backward: BatchNorm's error
        x, m = self._sync_saved
        layout = self._layout_name
        sum_dy, sum_dy_xmu, _ = batch_norm_grad_sums(dy, x, m.mean, layout=layout)
        sum_dy, sum_dy_xmu = self._summed(sum_dy, sum_dy_xmu)
        dx, dweight, dbias = batch_norm_backward(dy, x, m.mean, m.rstd(self.eps), self.weight, training=True,
                                                 layout=layout, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu, count=m.count)
        if dweight is not None:
            self.grad_weight += dweight
            self.grad_bias += dbias
        self._sync_saved = None
        return dx

    def train(self, mode: bool = True):
        self._sync_saved = None
        return super().train(mode)

    def _merge_recalibration(self, total: Moments) -> Moments:
        return self._merged(total)

    def __reduce__(self):
        fn, (cls, init_args, state, grads, training, extra) = super().__reduce__()
        extra = {k: v for k, v in extra.items() if k not in ("_comm", "_sync_saved")}
        return (fn, (cls, init_args, state, grads, training, extra))

    # ----------------------------------------------------------------- conversion

    @classmethod
    def convert(cls, layer_or_model, comm=None):
        """BatchNorm layers to SyncBatchNorm, as torch.nn.SyncBatchNorm.convert_sync_batchnorm:
        a BatchNorm gives a new SyncBatchNorm with its parameters, buffers, gradients
        and mode; a list, tuple or dict gives a new one of converted items; any other
        object has its attributes converted in place and is returned."""
        return _convert(layer_or_model, _is_plain_batch_norm, lambda layer: _rebuilt(layer, cls, comm=comm), set())

    @staticmethod
    def revert(layer_or_model):
        """The reverse of ``convert``: SyncBatchNorm layers back to BatchNorm."""
        return _convert(layer_or_model, lambda v: isinstance(v, SyncBatchNorm), lambda v: _rebuilt(v, BatchNorm),
                        set())


def _is_plain_batch_norm(value) -> bool:
    return isinstance(value, BatchNorm) and not isinstance(value, SyncBatchNorm)


def _rebuilt(layer, cls, **kwargs):
    """A layer of `cls` with `layer`'s constructor arguments, state, gradients and mode."""
    if layer.activation is not None:
        raise ValueError(f"layer_or_model: a BatchNorm with activation={layer.activation!r} has no SyncBatchNorm "
                         "twin (SyncBatchNorm has no activation)")
    new = cls(**layer._init_args(), **kwargs)
    new.load_state_dict(layer.state_dict())
    for key in ("grad_weight", "grad_bias"):
        if getattr(layer, key) is not None:
            setattr(new, key, getattr(layer, key))
    return new.train(layer.training)


_LEAVES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, np.ndarray)


def _convert(value, match, make, seen):
    if match(value):
        return make(value)
    if isinstance(value, list):
        return [_convert(v, match, make, seen) for v in value]
    if isinstance(value, tuple):
        return tuple(_convert(v, match, make, seen) for v in value)
    if isinstance(value, dict):
        return {k: _convert(v, match, make, seen) for k, v in value.items()}
    if isinstance(value, _LEAVES) or not hasattr(value, "__dict__") or id(value) in seen:
        return value
    seen.add(id(value))  # a model object: its attributes, in place
    for key, attr in list(vars(value).items()):
        new = _convert(attr, match, make, seen)
        if new is not attr:
            setattr(value, key, new)
    return value

"""Statistics that merge: a norm's partial moments (count, mean, M2) and their exact merge.

When a batch is split (over processes, threads or a stream of batches), each
part's statistics are a ``Moments``; merged in a fixed order by Chan's formula
they are the statistics of the whole batch, exactly (within float64 rounding),
where sum / sum-of-squares merges lose everything on data with a large mean::

    parts = [normkit.moments(x, layout="NHWC") for x in shards]     # (C,) each
    m = normkit.merge_moments(*parts)                                # the whole batch's
    y = normkit.batch_norm(shard, rm, rv, training=True, layout="NHWC", stats=m)

The merge itself is the C++ core's (normkit/moments.hpp), the same one its
kernels' partials go through.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import _ext
from ._dtypes import as_input, is_bf16, kernel_view
from ._args import as_eps, layout_name
from ._inputs import rows_input

__all__ = ["Moments", "moments", "merge_moments"]

_NORMS = ("batch", "instance", "group", "layer")
_F64 = np.dtype(np.float64)


class Moments:
    """Partial statistics of a norm: ``count`` values behind each statistic,
    their ``mean`` and ``m2`` (sum of squared deviations from the mean), both
    float64 arrays of the statistics' ``shape`` (BatchNorm (C,), InstanceNorm
    (N, C), GroupNorm (N, G), LayerNorm x's leading dims).

    float64 throughout: the accumulators of the merge must not round a large
    mean's low bits away. Pickles (``comm.allgather(m)`` in mpi4py works), and
    ``to_buffer`` / ``from_buffer`` give one float64 array of 2K+1 values
    (count, mean, m2) for MPI's buffer collectives.
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise TypeError(f"count: expected an int >= 0, got {count!r}")
        mean = np.ascontiguousarray(mean, dtype=_F64)
        m2 = np.ascontiguousarray(m2, dtype=_F64)
        if mean.shape != m2.shape:
            raise ValueError(f"m2: expected the shape of mean {mean.shape}, got {m2.shape}")
        self.count = int(count)
        self.mean = mean
        self.m2 = m2

    @property
    def shape(self) -> tuple:
        """The statistics' shape."""
        return self.mean.shape

    def var(self, correction: int = 0) -> np.ndarray:
        """``m2 / (count - correction)`` (0: biased, 1: unbiased); NaN where count <= correction."""
        if isinstance(correction, bool) or not isinstance(correction, numbers.Integral) or correction < 0:
            raise ValueError(f"correction: expected an int >= 0 (0 or 1), got {correction!r}")
        if self.count <= correction:
            return np.full(self.shape, np.nan)
        return self.m2 / float(self.count - correction)

    def rstd(self, eps: float = 1e-5) -> np.ndarray:
        """``1 / sqrt(var() + eps)``: what the norms normalize with."""
        eps = as_eps(eps)
        if not eps >= 0 or not np.isfinite(eps):
            raise ValueError(f"eps: must be finite and >= 0, got {eps}")
        return 1.0 / np.sqrt(self.var(0) + eps)

    def merge(self, *others: "Moments") -> "Moments":
        """This merged with ``others``, in that order (a new Moments)."""
        return merge_moments(self, *others)

    def to_buffer(self) -> np.ndarray:
        """One float64 array ``[count, mean..., m2...]`` (2K + 1 values; counts are exact below 2**53)."""
        return np.concatenate(([float(self.count)], self.mean.ravel(), self.m2.ravel()))

    @classmethod
    def from_buffer(cls, buffer, shape) -> "Moments":
        """The Moments of statistics ``shape`` that ``to_buffer`` wrote into ``buffer``."""
        buffer = np.asarray(buffer, dtype=_F64).ravel()
        shape = tuple(int(d) for d in shape)
        k = int(np.prod(shape, dtype=np.int64))
        if buffer.size != 2 * k + 1:
            raise ValueError(f"buffer: expected {2 * k + 1} values for moments of shape {shape}, got {buffer.size}")
        count = buffer[0]
        if not (count >= 0 and count == int(count)):
            raise ValueError(f"buffer: its first value (the count) must be an integer >= 0, got {count}")
        return cls(int(count), buffer[1:k + 1].reshape(shape), buffer[k + 1:].reshape(shape))

    def __reduce__(self):
        return (Moments, (self.count, self.mean, self.m2))

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, shape={self.shape})"


def moments(x, *, norm="batch", layout=None, num_groups=None, normalized_shape=None) -> Moments:
    """The statistics ``norm`` would normalize x with, as a mergeable ``Moments``.

    ``norm``: "batch" (shape (C,)), "instance" ((N, C)), "group" ((N, num_groups);
    ``num_groups`` required) or "layer" (x.shape[:-k]; ``normalized_shape``
    required). ``layout`` for the channel norms, as in ``batch_norm``. float64
    results for every input dtype (16-bit x is accumulated in float32 per block,
    then merged in float64). An empty x gives count 0.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm: expected one of {', '.join(map(repr, _NORMS))}, got {norm!r}")
    if norm == "group":
        if num_groups is None:
            raise ValueError("num_groups: required for norm='group'")
        if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
            raise TypeError(f"num_groups: expected an int, got {num_groups!r}")
    elif num_groups is not None:
        raise ValueError(f"num_groups: only used with norm='group', got norm={norm!r}")
    if norm == "layer":
        if normalized_shape is None:
            raise ValueError("normalized_shape: required for norm='layer'")
        if layout is not None:
            raise ValueError("layout: not used with norm='layer' (it normalizes the trailing dims)")
        x, shape, _, _ = rows_input(x, normalized_shape)
    else:
        if normalized_shape is not None:
            raise ValueError(f"normalized_shape: only used with norm='layer', got norm={norm!r}")
        shape = ()
        x = as_input(x, "x")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
    stats_shape, count, mean, m2 = _ext.moments(norm, kernel_view(x), layout_name(layout),
                                                int(num_groups or 0), list(shape), is_bf16(x.dtype))
    return Moments(count, mean, m2)


def merge_moments(*parts) -> Moments:
    """Merges Moments of one shape in the order given (``merge_moments(a, b, c)``
    or ``merge_moments([a, b, c])``). The same parts in the same order give the
    same bits; any grouping agrees within float64 rounding; an empty part
    (count 0) is skipped, so merging with one is exact."""
    if len(parts) == 1 and not isinstance(parts[0], Moments):
        parts = tuple(parts[0])
    if not parts:
        raise ValueError("parts: expected at least one Moments to merge, got none")
    for i, p in enumerate(parts):
        if not isinstance(p, Moments):
            raise TypeError(f"parts[{i}]: expected a normkit.Moments, got {type(p).__name__}")
        if p.shape != parts[0].shape:
            raise ValueError(f"parts[{i}]: expected moments of shape {parts[0].shape} like parts[0], got {p.shape}")
    if len(parts) == 1:
        return Moments(parts[0].count, parts[0].mean.copy(), parts[0].m2.copy())
    _, count, mean, m2 = _ext.merge_moments(list(parts[0].shape), [p.count for p in parts],
                                            [p.mean.ravel() for p in parts], [p.m2.ravel() for p in parts])
    return Moments(count, mean.reshape(parts[0].shape), m2.reshape(parts[0].shape))

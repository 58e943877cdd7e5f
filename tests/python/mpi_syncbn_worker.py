"""Run by test_distributed.py under ``mpiexec -n K`` (not a pytest file).

Every rank builds the same global batches (same seed), keeps its shard (uneven
sizes, some empty) and runs a SyncBatchNorm over several training steps, then
eval; each step is checked against single-process normkit BatchNorm on the
concatenated batch (outputs, input gradients, weight gradients, running
statistics) and, where PyTorch is installed, against torch.nn.BatchNorm on the
concatenated batch. Running statistics must be bit-identical on every rank.
Rank 0 prints one JSON line with the counts; any failure prints the case and
aborts the whole job (non-zero exit), so no rank waits forever.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import normkit  # noqa: E402
from channel_reference import to_channels_first  # noqa: E402
from helpers import assert_close, in_layout, np_dtype  # noqa: E402
from normkit.distributed import SyncBatchNorm  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

LAYOUTS = {"NC": (), "NCL": (7,), "NLC": (7,), "NCHW": (3, 4), "NHWC": (3, 4), "NCDHW": (2, 3, 2), "NDHWC": (2, 3, 2)}
DTYPES = ["float32", "float64", "float16", "bfloat16"]
C = 5
STEPS = 3
# Shard sizes per world size, varied per case: uneven, and with 2 or more ranks some lists hold an empty shard.
SIZES = {1: [[6], [4]], 2: [[2, 5], [0, 6], [4, 1]], 3: [[4, 0, 3], [1, 5, 2], [0, 0, 5]]}


def _check(actual, expected, dtype, what, tol32=1e-5):
    try:
        assert_close(actual, np.asarray(expected).astype(np.float64), dtype, what=what, tol32=tol32)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def _torch_twin(layout, nd, dtype, weight, bias, momentum, affine, track):
    cls = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[nd]
    t = cls(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=getattr(torch, dtype))
    if affine:
        with torch.no_grad():
            t.weight.copy_(torch.from_numpy(weight.astype(np.float64)))
            t.bias.copy_(torch.from_numpy(bias.astype(np.float64)))
    return t


def run_case(comm, index, layout, dtype, momentum, affine, track):
    rank, size = comm.Get_rank(), comm.Get_size()
    options = SIZES[size]
    sizes = options[index % len(options)]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    total = sum(sizes)
    rng = np.random.default_rng(1000 + index)  # the same data on every rank
    dt = np_dtype(dtype)
    layer_dtype = np.float32 if dtype == "float16" else dt  # float16: mixed precision with a float32 layer
    spatial = LAYOUTS[layout]
    sync = SyncBatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track, layout=layout,
                         dtype=layer_dtype, comm=comm)
    ref = normkit.BatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track, layout=layout,
                            dtype=layer_dtype)
    weight = (1 + 0.3 * rng.standard_normal(C)).astype(layer_dtype)
    bias = (0.2 * rng.standard_normal(C)).astype(layer_dtype)
    if affine:
        for layer in (sync, ref):
            layer.weight, layer.bias = weight, bias
    twin = None
    if torch is not None and dtype in ("float32", "float64"):
        twin = _torch_twin(layout, len(spatial), dtype, weight, bias, momentum, affine, track)
    tol32 = 1e-5 if dtype == "float32" else 1e-4
    grad_tol = 1e-4
    for step in range(STEPS):
        loc = 1e3 if step == 1 else 0.5  # one step with a large mean: the merged statistics must stay exact
        x_all = in_layout((rng.standard_normal((total, C, *spatial)) * 2 + loc).astype(dt), layout)
        dy_all = in_layout(rng.standard_normal((total, C, *spatial)).astype(dt), layout)
        y = sync(x_all[lo:hi])
        dx = sync.backward(dy_all[lo:hi])
        y_ref = ref(x_all)
        dx_ref = ref.backward(dy_all)
        what = f"step {step}"
        _check(y, y_ref[lo:hi], dt, f"{what} y", tol32)
        _check(dx, dx_ref[lo:hi], dt, f"{what} dx", grad_tol)
        if affine:
            _check(sync.grad_weight, ref.grad_weight, layer_dtype, f"{what} grad_weight", grad_tol)
            _check(sync.grad_bias, ref.grad_bias, layer_dtype, f"{what} grad_bias", grad_tol)
        if track:
            _check(sync.running_mean, ref.running_mean, layer_dtype, f"{what} running_mean")
            _check(sync.running_var, ref.running_var, layer_dtype, f"{what} running_var")
            assert int(sync.num_batches_tracked) == step + 1
            mine = np.concatenate([sync.running_mean.view(np.uint8), sync.running_var.view(np.uint8)])
            for other in comm.allgather(mine.tobytes()):
                assert other == mine.tobytes(), f"{what}: running statistics differ between ranks"
        if twin is not None:
            xt = torch.from_numpy(np.ascontiguousarray(to_channels_first(x_all, layout))).requires_grad_(True)
            yt = twin(xt)
            yt.backward(torch.from_numpy(np.ascontiguousarray(to_channels_first(dy_all, layout))))
            # (torch's float32 statistics are not exact on the large-mean step: its outputs are compared on the others)
            if step != 1 or dtype == "float64":
                _check(to_channels_first(y, layout), yt.detach().numpy()[lo:hi], dt, f"{what} y vs torch", tol32)
                _check(to_channels_first(dx, layout), xt.grad.numpy()[lo:hi], dt, f"{what} dx vs torch", grad_tol)
            if affine and (step != 1 or dtype == "float64"):
                _check(sync.grad_weight, twin.weight.grad.numpy(), dt, f"{what} grad_weight vs torch", grad_tol)
                _check(sync.grad_bias, twin.bias.grad.numpy(), dt, f"{what} grad_bias vs torch", grad_tol)
            if track:
                _check(sync.running_mean, twin.running_mean.numpy(), dt, f"{what} running_mean vs torch")
                _check(sync.running_var, twin.running_var.numpy(), dt, f"{what} running_var vs torch")
    # eval: running statistics when tracked (no communication); the shard's own batch statistics otherwise
    sync.eval()
    ref.eval()
    x_all = in_layout((rng.standard_normal((total, C, *spatial)) + 0.5).astype(dt), layout)
    y = sync(x_all[lo:hi])
    y_ref = ref(x_all)[lo:hi] if track else ref(x_all[lo:hi])
    if y.size:
        _check(y, y_ref, dt, "eval y", tol32)
    return 1 + (twin is not None)


def check_recalibration(comm):
    """SyncBatchNorm.recalibrate over each rank's own batches: the population statistics of all of them."""
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(77)
    per_rank = [[int(rng.integers(0, 4)) for _ in range(3)] for _ in range(size)]  # batch sizes, some 0
    per_rank[0][0] += 2  # at least 2 values in all
    batches = [[(rng.standard_normal((n, C, 3, 2)) * 0.01 + 1e4).astype(np.float32) for n in sizes]
               for sizes in per_rank]
    sync = SyncBatchNorm(C, comm=comm).recalibrate(iter(batches[rank]))
    every = np.concatenate([b.astype(np.float64) for bs in batches for b in bs])
    values = np.moveaxis(every, 1, 0).reshape(C, -1)
    _check(sync.running_mean, values.mean(axis=1), np.float32, "recalibrated running_mean")
    np.testing.assert_allclose(sync.running_var, values.var(axis=1, ddof=1), rtol=1e-4)


def main():
    comm = MPI.COMM_WORLD
    cases = [
        (layout, dtype, momentum, affine, track)
        for layout in LAYOUTS
        for dtype in DTYPES
        for momentum, affine, track in ((0.1, True, True),)
    ]
    # momentum=None (cumulative average), no affine, no running statistics
    cases += [("NCHW", "float32", None, True, True), ("NHWC", "float64", 0.3, False, True),
              ("NCL", "float32", 0.1, True, False), ("NHWC", "bfloat16", None, False, False)]
    checked = torch_checked = 0
    for index, case in enumerate(cases):
        try:
            n = run_case(comm, index, *case)
        except Exception:  # report, then abort every rank (the others may wait in a collective)
            sys.stdout.write(f"FAIL rank {comm.Get_rank()} of {comm.Get_size()}, case {case}:\n{traceback.format_exc()}")
            sys.stdout.flush()
            comm.Abort(1)
        checked += 1
        torch_checked += n - 1
    try:
        check_recalibration(comm)
    except Exception:
        sys.stdout.write(f"FAIL rank {comm.Get_rank()}, recalibration:\n{traceback.format_exc()}")
        sys.stdout.flush()
        comm.Abort(1)
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": comm.Get_size(), "cases": checked, "torch_cases": torch_checked,
                          "recalibration": True}), flush=True)


if __name__ == "__main__":
    main()

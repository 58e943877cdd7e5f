"""normkit.distributed.SyncBatchNorm.

The MPI runs start their own processes (``mpiexec -n 1/2/3`` on
mpi_syncbn_worker.py, each bounded by a timeout) and check, on every rank,
against single-process BatchNorm and PyTorch on the concatenated batch. The
rest (conversion, state dict, pickling, eval without communication) runs here.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import normkit
from normkit.distributed import SyncBatchNorm

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_syncbn_worker.py")
WORKER_CASES = 32


def _mpiexec():
    local = os.path.join(sysconfig.get_path("scripts"), "mpiexec")  # the mpich wheel's, beside this Python
    return local if os.path.exists(local) else shutil.which("mpiexec")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sync_batch_norm_over_mpi_equals_the_concatenated_batch(ranks):
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 3 ranks on 2 cores: no oversubscribed OpenMP teams
    proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, WORKER], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"mpiexec -n {ranks} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ranks"] == ranks and summary["cases"] == WORKER_CASES and summary["recalibration"]
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    assert summary["torch_cases"] > 0


class _NoComm:
    """A communicator that must not be used."""

    def __getattr__(self, name):
        raise AssertionError(f"communication ({name}) where none is needed")


class _Model:
    def __init__(self):
        self.stem = normkit.BatchNorm(4, layout="NHWC")
        self.blocks = [normkit.BatchNorm(8), normkit.LayerNorm(8)]
        self.heads = {"a": normkit.BatchNorm(3, momentum=None, affine=False)}
        self.name = "model"


def test_convert_and_revert_keep_state_and_mode(rng):
    model = _Model()
    model.stem.weight = rng.standard_normal(4).astype(np.float32)
    model.stem.running_var = rng.random(4).astype(np.float32) + 0.5
    model.stem.num_batches_tracked = 7
    model.stem.grad_bias = np.full(4, 0.25, np.float32)
    model.blocks[0].eval()
    before = model.stem.state_dict()
    same = SyncBatchNorm.convert(model, comm=_NoComm())
    assert same is model
    assert type(model.stem) is SyncBatchNorm and type(model.blocks[0]) is SyncBatchNorm
    assert type(model.heads["a"]) is SyncBatchNorm and type(model.blocks[1]) is normkit.LayerNorm
    assert model.stem.layout == normkit.Layout.NHWC and model.heads["a"].momentum is None
    assert not model.heads["a"].affine and not model.blocks[0].training and model.stem.training
    after = model.stem.state_dict()
    assert list(after) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for key in before:
        assert np.array_equal(before[key], after[key]), key
    assert np.array_equal(model.stem.grad_bias, np.full(4, 0.25, np.float32))
    SyncBatchNorm.revert(model)
    assert type(model.stem) is normkit.BatchNorm and type(model.blocks[0]) is normkit.BatchNorm
    assert np.array_equal(model.stem.state_dict()["running_var"], before["running_var"])
    single = SyncBatchNorm.convert(normkit.BatchNorm(5, dtype=np.float64))
    assert isinstance(single, SyncBatchNorm) and single.dtype == np.float64


def test_convert_refuses_an_activation():
    with pytest.raises(ValueError, match="^layer_or_model: .*activation"):
        SyncBatchNorm.convert(normkit.BatchNorm(4, activation="relu"))


def test_eval_and_pickle_need_no_communication(rng):
    bn = SyncBatchNorm(3, comm=_NoComm())
    bn.running_mean = np.array([1.0, 2.0, 3.0], np.float32)
    bn.eval()
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    plain = normkit.BatchNorm(3).eval()
    plain.running_mean = bn.running_mean
    assert np.array_equal(bn(x), plain(x))
    back = pickle.loads(pickle.dumps(bn))
    assert type(back) is SyncBatchNorm and not back.training
    assert np.array_equal(back.running_mean, bn.running_mean)


def test_backward_without_a_training_forward_is_an_error(rng):
    bn = SyncBatchNorm(3, comm=_NoComm()).eval()
    bn(rng.standard_normal((4, 3)).astype(np.float32))
    with pytest.raises(RuntimeError, match="^backward"):
        bn.backward(np.ones((4, 3), np.float32))


def test_training_input_checks_come_before_any_communication(rng):
    bn = SyncBatchNorm(3, comm=_NoComm())
    with pytest.raises(TypeError, match="^x: dtype float64"):
        bn(np.ones((4, 3)))
    with pytest.raises(ValueError, match="^x: expected 3 channels"):
        bn(np.ones((4, 5), np.float32))

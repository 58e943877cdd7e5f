"""Shared fixtures for normkit's Python tests.

- ``kernel_path``: runs a test once per kernel path this CPU supports
  (normkit.info()["kernel_paths_supported"]), switching with
  normkit._set_kernel_path and restoring the original path afterwards.
- ``threads``: runs a test with 1 and with 2 threads, restoring the count.
- ``torch``: PyTorch with one intra-op thread (the test is skipped without it).
- ``rng``: a seeded NumPy Generator (a fresh one per test, so tests do not
  depend on their order).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from any rootdir/import mode

import normkit  # noqa: E402

SUPPORTED_PATHS = list(normkit.info()["kernel_paths_supported"])


def _current_path() -> str:
    return normkit.info()["kernel_path"]


@pytest.fixture(params=SUPPORTED_PATHS)
def kernel_path(request):
    """Each supported kernel path in turn; the original path is restored after."""
    original = _current_path()
    normkit._set_kernel_path(request.param)
    assert normkit.info()["kernel_path"] == request.param
    try:
        yield request.param
    finally:
        if original in SUPPORTED_PATHS:
            normkit._set_kernel_path(original)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    """1 and 2 threads; the original count is restored after."""
    original = normkit.get_num_threads()
    normkit.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        normkit.set_num_threads(original)


@pytest.fixture
def restore_threads():
    """Restores the thread count after a test that changes it."""
    original = normkit.get_num_threads()
    yield original
    normkit.set_num_threads(original)


@pytest.fixture
def rng():
    return np.random.default_rng(20240607)


@pytest.fixture
def torch():
    """PyTorch (skipped when not installed), one intra-op thread while the test runs
    (next to normkit's OpenMP threads on 2 cores its thread pool is ~10x slower)."""
    torch = pytest.importorskip("torch")
    original = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield torch
    finally:
        torch.set_num_threads(original)

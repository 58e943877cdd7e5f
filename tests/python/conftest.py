"""Shared fixtures for normkit's Python tests.

- Every test runs once per kernel path this CPU supports
  (normkit.info()["kernel_paths_supported"]), as Highway runs every test on every
  target: the path is switched with normkit._set_kernel_path before the test and
  restored after it. A test that names the ``kernel_path`` fixture gets the path
  as its argument; modules in ``PATH_FREE_MODULES`` (no kernel reached, or their
  own path handling: subprocesses, the runtime's switching itself) run once. A
  compiled path this CPU lacks is reported as not tested in the summary.
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
UNTESTED_PATHS = [p for p in normkit.info()["kernel_paths_compiled"] if p not in SUPPORTED_PATHS]

# Modules that run once, on the default path: they reach no kernel (stubs, import graph,
# examples, the bad-input table's docs check), run their kernels in subprocesses (MPI, the
# examples), test the path switching itself, target the CUDA backend, or test the array
# intake, which is the same on every path, or compile models (torch.compile, once).
PATH_FREE_MODULES = {
    "test_runtime", "test_stubs", "test_import_graph", "test_examples", "test_cuda", "test_distributed",
    "test_concurrency", "test_memory", "test_arrays", "test_torch_compile",
}


def _current_path() -> str:
    return normkit.info()["kernel_path"]


def pytest_generate_tests(metafunc):
    """Every test of a kernel-reaching module, once per supported path (see the module docstring)."""
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "kernel_path" in metafunc.fixturenames or module not in PATH_FREE_MODULES:
        if "kernel_path" not in metafunc.fixturenames:
            metafunc.fixturenames.append("kernel_path")
        metafunc.parametrize("kernel_path", SUPPORTED_PATHS, indirect=True)


@pytest.fixture
def kernel_path(request):
    """The kernel path this test runs on (switched before it, restored after)."""
    original = _current_path()
    normkit._set_kernel_path(request.param)
    assert normkit.info()["kernel_path"] == request.param
    try:
        yield request.param
    finally:
        if original in SUPPORTED_PATHS:
            normkit._set_kernel_path(original)


def pytest_report_header(config):
    line = f"normkit kernel paths tested: {', '.join(SUPPORTED_PATHS)}"
    if UNTESTED_PATHS:
        line += f"; NOT TESTED (compiled, but this CPU lacks it): {', '.join(UNTESTED_PATHS)}"
    return line


def pytest_terminal_summary(terminalreporter):
    if UNTESTED_PATHS:
        terminalreporter.write_line(
            f"kernel paths NOT TESTED on this CPU: {', '.join(UNTESTED_PATHS)} (compiled; the same generic code and "
            f"tests ran on {', '.join(SUPPORTED_PATHS)})")


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

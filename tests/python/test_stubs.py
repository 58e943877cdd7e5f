"""Type stubs: the installed package ships normkit/_ext.pyi and py.typed, the stub
is what nanobind's stubgen makes of the installed extension, and mypy sees the
public API (tests/python/typing_usage.py type-checks; wrong uses are errors).

The stub is generated at build time (python/CMakeLists.txt, nanobind_add_stub
with INCLUDE_PRIVATE); regenerating it here with the same options (-P) must give
the same text. Needs nanobind (stubgen) and mypy in the test environment; the
parts that need them skip with a message where they are missing.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import normkit

PKG = pathlib.Path(normkit.__file__).resolve().parent
HERE = pathlib.Path(__file__).resolve().parent
USAGE = HERE / "typing_usage.py"

# Keep in step with nanobind_add_stub(... INCLUDE_PRIVATE ...) in python/CMakeLists.txt.
STUBGEN_ARGS = ["-q", "-P", "-m", "normkit._ext"]


def _normalized(text: str) -> list[str]:
    """The stub's lines without trailing whitespace or runs of blank lines (stubgen's
    output is deterministic; this only keeps the comparison about content)."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return out


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install normkit[test] installs it)")


def test_package_ships_stub_and_marker():
    stub = PKG / "_ext.pyi"
    assert stub.is_file(), f"{stub} is missing: the build did not generate it (NORMKIT_PYTHON_STUBS=OFF? cross-compiled?)"
    assert (PKG / "py.typed").is_file(), f"{PKG / 'py.typed'} is missing"
    text = stub.read_text()
    for name in ("def layer_norm(", "class Layout(", "class _LayerNorm:", "def set_num_threads(", "def info("):
        assert name in text, f"{name!r} not in {stub}"


def test_stub_matches_stubgen(tmp_path):
    _needs("nanobind")
    out = tmp_path / "_ext.pyi"
    # cwd=tmp_path: stubgen puts the working directory on sys.path; normkit must
    # come from site-packages, as the installed stub describes that module.
    result = subprocess.run(
        [sys.executable, "-m", "nanobind.stubgen", *STUBGEN_ARGS, "-o", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installed = _normalized((PKG / "_ext.pyi").read_text())
    fresh = _normalized(out.read_text())
    if installed != fresh:
        import nanobind

        diff = "\n".join(difflib.unified_diff(installed, fresh, "installed _ext.pyi", "stubgen now", lineterm=""))
        pytest.fail(
            "the installed normkit/_ext.pyi differs from what nanobind.stubgen "
            f"{nanobind.__version__} makes of the installed module (stale build, or the package was "
            "built with another nanobind version, e.g. in an isolated build: reinstall with "
            "--no-build-isolation):\n" + diff
        )


def _mypy(tmp_path, *args: str) -> subprocess.CompletedProcess:
    _needs("mypy")
    env = dict(os.environ, MYPY_FORCE_COLOR="0")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "mypy-cache"),
         "--config-file", os.devnull, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )


def test_mypy_typing_usage(tmp_path):
    # --allow-untyped-calls: the Python functions are not annotated (their types
    # come out as Any); everything else of --strict holds.
    result = _mypy(tmp_path, "--strict", "--allow-untyped-calls", str(USAGE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_sees_the_api(tmp_path):
    # Wrong uses must be errors: proves mypy reads normkit (py.typed) and the stub,
    # rather than treating the package as Any.
    bad = tmp_path / "bad_usage.py"
    bad.write_text(
        "import normkit\n"
        "normkit.no_such_function\n"  # 2
        "normkit.set_num_threads('two')\n"  # 3: from the stub
        "n: str = normkit.get_num_threads()\n"  # 4: from the stub
        "normkit.Layout.NOPE\n"  # 5: enum from the stub
        "e: str = normkit.LayerNorm(8).eps\n"  # 6: layer attribute, from the stub's _LayerNorm
    )
    result = _mypy(tmp_path, str(bad))
    lines = set(re.findall(r"^[^\n]*bad_usage\.py:(\d+): error:", result.stdout, re.M))
    assert lines == {"2", "3", "4", "5", "6"}, result.stdout + result.stderr

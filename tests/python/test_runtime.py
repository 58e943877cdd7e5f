"""normkit's runtime surface: info(), threads, kernel-path selection (at run time and
through NORMKIT_ISA at start-up), and `python -m normkit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import normkit

KNOWN_PATHS = {"scalar", "avx2", "avx512", "avx512_bf16"}
INFO_KEYS = {
    "version": str,
    "cpu_features": list,
    "kernel_path": str,
    "kernel_paths_compiled": list,
    "kernel_paths_supported": list,
    "num_threads": int,
    "openmp": str,
    "cuda_built": bool,
    "cuda_devices": int,
    "build": dict,
}


def run_python(code: str, env_extra: dict | None = None, drop=("NORMKIT_ISA",), timeout=120):
    env = dict(os.environ)
    for key in drop:
        env.pop(key, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- info()


def test_info_keys_and_types():
    info = normkit.info()
    assert isinstance(info, dict)
    missing = set(INFO_KEYS) - set(info)
    assert not missing, f"info() lacks {missing}"
    for key, typ in INFO_KEYS.items():
        assert isinstance(info[key], typ), f"info()[{key!r}] is {type(info[key]).__name__}, expected {typ.__name__}"
    for key in ("cpu_features", "kernel_paths_compiled", "kernel_paths_supported"):
        assert all(isinstance(v, str) for v in info[key]), key
    assert info["num_threads"] >= 1
    assert info["cuda_devices"] >= 0
    if not info["cuda_built"]:
        assert info["cuda_devices"] == 0


def test_info_version_matches_package():
    info = normkit.info()
    assert info["version"] == normkit.__version__
    assert info["version"] and info["version"][0].isdigit()


def test_info_kernel_paths():
    info = normkit.info()
    compiled, supported = info["kernel_paths_compiled"], info["kernel_paths_supported"]
    assert "scalar" in compiled and "scalar" in supported  # the portable path is always there
    assert set(compiled) <= KNOWN_PATHS
    assert set(supported) <= set(compiled)
    assert len(set(compiled)) == len(compiled)
    assert info["kernel_path"] in set(compiled) & set(supported)


def test_default_kernel_path_is_the_widest_supported():
    """Without NORMKIT_ISA a fresh process picks the best path the CPU supports."""
    proc = run_python("import normkit, json; print(json.dumps(normkit.info()))")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    best = max(info["kernel_paths_supported"], key=order.index)
    assert info["kernel_path"] == best


def test_info_cpu_features_consistent_with_supported_paths():
    info = normkit.info()
    features = set(info["cpu_features"])
    if "avx2" in info["kernel_paths_supported"]:
        assert {"avx2", "fma"} <= features
    if "avx512" in info["kernel_paths_supported"]:
        assert {"avx512f", "avx512bw", "avx512vl"} <= features
    if "avx512_bf16" in info["kernel_paths_supported"]:
        assert {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= features


def test_info_build_section():
    build = normkit.info()["build"]
    assert isinstance(build, dict) and build
    flags = " ".join(map(str, build.get("kernel_flags", [])))
    assert "-march=native" not in flags, "kernels must not be built for the build machine only"


def test_set_kernel_path_round_trip():
    original = normkit.info()["kernel_path"]
    x = np.random.default_rng(0).standard_normal((4, 37)).astype(np.float32)
    try:
        for name in normkit.info()["kernel_paths_supported"]:
            normkit._set_kernel_path(name)
            assert normkit.info()["kernel_path"] == name
            assert np.all(np.isfinite(normkit.layer_norm(x, 37)))
    finally:
        normkit._set_kernel_path(original)
    assert normkit.info()["kernel_path"] == original


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_num_threads_round_trip(n, restore_threads):
    normkit.set_num_threads(n)
    assert normkit.get_num_threads() == n
    assert normkit.info()["num_threads"] == n
    # still works (and is right) with more threads than cores
    x = np.random.default_rng(n).standard_normal((512, 512)).astype(np.float32)
    y = normkit.rms_norm(x, 512)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(axis=1, keepdims=True) + np.finfo(np.float32).eps)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_default_num_threads_from_omp_num_threads():
    proc = run_python("import normkit; print(normkit.get_num_threads())", {"OMP_NUM_THREADS": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"


# --------------------------------------------------------------------------- NORMKIT_ISA


def test_normkit_isa_scalar_is_honoured():
    code = (
        "import json, numpy as np, normkit\n"
        "y = normkit.layer_norm(np.arange(40, dtype=np.float32).reshape(2, 20), 20)\n"
        "print(json.dumps({'path': normkit.info()['kernel_path'], 'finite': bool(np.isfinite(y).all())}))\n"
    )
    proc = run_python(code, {"NORMKIT_ISA": "scalar"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"path": "scalar", "finite": True}


@pytest.mark.parametrize("name", sorted(KNOWN_PATHS))
def test_normkit_isa_each_supported_path(name):
    if name not in normkit.info()["kernel_paths_supported"]:
        pytest.skip(f"{name} is not supported here")
    proc = run_python("import normkit; print(normkit.info()['kernel_path'])", {"NORMKIT_ISA": name})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == name


_REFUSAL_PROBE = (
    "import json, numpy as np, normkit\n"
    "info = normkit.info()\n"
    "result = {'kernel_path': info['kernel_path']}\n"
    "try:\n"
    "    normkit.layer_norm(np.ones((2, 8), np.float32), 8)\n"
    "    result['error'] = None\n"
    "except ValueError as e:\n"
    "    result['error'] = str(e)\n"
    "    result['type'] = 'ValueError'\n"
    "except Exception as e:\n"
    "    result['error'] = str(e)\n"
    "    result['type'] = type(e).__name__\n"
    "print(json.dumps(result))\n"
)


def test_normkit_isa_unsupported_path_is_refused():
    info = normkit.info()
    missing = [p for p in info["kernel_paths_compiled"] if p not in info["kernel_paths_supported"]]
    if not missing:
        pytest.skip("this CPU supports every compiled kernel path")
    name = missing[0]
    proc = run_python(_REFUSAL_PROBE, {"NORMKIT_ISA": name})
    assert proc.returncode == 0, proc.stderr  # info() works and the import does not crash
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernel_path"].startswith("unavailable"), result
    assert result["error"] is not None, "a path the CPU lacks was not refused"
    assert result["type"] == "ValueError", result
    assert "NORMKIT_ISA" in result["error"] and name in result["error"], result


@pytest.mark.parametrize("value", ["bogus", "AVX2", "sse4"])
def test_normkit_isa_unknown_name_is_refused(value):
    proc = run_python(_REFUSAL_PROBE, {"NORMKIT_ISA": value})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kernel_path"].startswith("unavailable"), result
    assert result["error"] is not None, f"NORMKIT_ISA={value} was not refused"
    assert result["type"] == "ValueError", result
    assert "NORMKIT_ISA" in result["error"] and value in result["error"], result


def test_normkit_isa_refused_then_set_kernel_path_recovers():
    code = (
        "import numpy as np, normkit\n"
        "normkit._set_kernel_path('scalar')\n"
        "print(normkit.info()['kernel_path'])\n"
        "print(float(normkit.rms_norm(np.ones((1, 4), np.float32), 4, eps=0.0).sum()))\n"
    )
    proc = run_python(code, {"NORMKIT_ISA": "bogus"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[0] == "scalar" and float(lines[1]) == 4.0


def test_empty_normkit_isa_means_automatic():
    proc = run_python("import normkit; print(normkit.info()['kernel_path'])", {"NORMKIT_ISA": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in normkit.info()["kernel_paths_supported"]


# --------------------------------------------------------------------------- python -m normkit


def test_python_m_normkit():
    env = dict(os.environ)
    env.pop("NORMKIT_ISA", None)
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run(
        [sys.executable, "-m", "normkit"], env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(__file__)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert normkit.__version__ in out
    assert "max |error|" in out
    assert normkit.info()["kernel_path"] in out
    # the reported errors are small numbers
    errors = []
    for line in out.splitlines():
        if "max |error|" in line:
            tail = line.split("=", 1)[1].split()[0]
            errors.append(float(tail))
    assert errors and all(e < 1e-2 for e in errors), errors

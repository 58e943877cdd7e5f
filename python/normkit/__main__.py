"""python -m normkit: what normkit found on this machine, then a short demo.

The demo normalizes a transformer-like activation tensor (a few outlier
channels, a large common offset) with LayerNorm and RMSNorm, checks the result
against a float64 NumPy reference, and times normkit next to plain NumPy.
"""

from __future__ import annotations

import time

import numpy as np

import normkit


def _print_info() -> None:
    info = normkit.info()
    print(f"normkit {info['version']}")
    print(f"  kernel path      : {info['kernel_path']}  (compiled: {', '.join(info['kernel_paths_compiled'])};"
          f" supported here: {', '.join(info['kernel_paths_supported'])})")
    print(f"  CPU features     : {' '.join(info['cpu_features']) or '(none detected)'}")
    print(f"  threads          : {info['num_threads']}  ({info['openmp']})")
    print(f"  CUDA             : {'built' if info['cuda_built'] else 'not built'}, devices found: {info['cuda_devices']}")
    print(f"  compiler         : {info['build']['compiler']}")
    for flags in info["build"]["kernel_flags"]:
        print(f"  kernel flags     : {flags}")


def _median_time(fn, repeat: int = 15) -> float:
    fn()  # warm up (page faults, thread pool)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _activations(rng, tokens: int, hidden: int) -> np.ndarray:
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    x[:, rng.choice(hidden, 4, replace=False)] *= 40.0  # outlier channels, as in real LLM activations
    return x + np.float32(3.0)


def _numpy_layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _numpy_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def main() -> None:
    _print_info()
    rng = np.random.default_rng(0)
    tokens, hidden = 8192, 768
    x = _activations(rng, tokens, hidden)
    w = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    b = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    eps = 1e-5
    print(f"\nDemo: activations [{tokens}, {hidden}] float32, {normkit.get_num_threads()} thread(s)")

    x64 = x.astype(np.float64)
    ref = _numpy_layer_norm(x64, w.astype(np.float64), b.astype(np.float64), eps)
    y = normkit.layer_norm(x, hidden, w, b, eps)
    t_nk = _median_time(lambda: normkit.layer_norm(x, hidden, w, b, eps))
    t_np = _median_time(lambda: _numpy_layer_norm(x, w, b, eps))
    print(f"  layer_norm : max |error| vs float64 = {np.max(np.abs(y - ref)):.2e}   "
          f"normkit {t_nk * 1e3:7.3f} ms   numpy {t_np * 1e3:7.3f} ms   ({t_np / t_nk:5.1f}x)")

    rms_eps = float(np.finfo(np.float32).eps)
    ref = _numpy_rms_norm(x64, w.astype(np.float64), rms_eps)
    y = normkit.rms_norm(x, hidden, w)
    t_nk = _median_time(lambda: normkit.rms_norm(x, hidden, w))
    t_np = _median_time(lambda: _numpy_rms_norm(x, w, rms_eps))
    print(f"  rms_norm   : max |error| vs float64 = {np.max(np.abs(y - ref)):.2e}   "
          f"normkit {t_nk * 1e3:7.3f} ms   numpy {t_np * 1e3:7.3f} ms   ({t_np / t_nk:5.1f}x)")

    xh = x.astype(np.float16)
    ref = _numpy_layer_norm(xh.astype(np.float64), w.astype(np.float64), b.astype(np.float64), eps)
    y = normkit.layer_norm(xh, hidden, w, b, eps)
    print(f"  layer_norm float16 in/out, float32 statistics: max |error| vs float64 = "
          f"{np.max(np.abs(y.astype(np.float64) - ref)):.2e} (float16 rounding is ~{np.finfo(np.float16).eps:.0e} relative)")


if __name__ == "__main__":
    main()

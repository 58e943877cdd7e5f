#!/usr/bin/env python3
"""What a layer object costs over the bare functions: forward + backward of LayerNorm [8192,768].

    python bench/python/bench_layer_overhead.py [--threads 1,2] [--reps 40] [--shape 8192,768]

Per repetition, both variants run once, alternating which goes first (the machine is shared and
noisy: interleaving puts both under the same conditions); the figure is the median of each, and
the ratio is layer / functions. The target (issue 4): at most 1.05.

- functions: ``y, mean, rstd = normkit.layer_norm(x, D, w, b, return_stats=True)`` then
  ``normkit.layer_norm_backward(dy, x, mean, rstd, D, w)`` -- the bare kernels from Python.
- layer: ``ln = normkit.LayerNorm(D)``; ``ln(x)`` then ``ln.backward(dy)`` (which also adds the
  weight and bias gradients into ``ln.grad_weight`` / ``ln.grad_bias``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import normkit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--shape", default="8192,768")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, cols), dtype=np.float32)
    dy = rng.standard_normal((rows, cols), dtype=np.float32)
    ln = normkit.LayerNorm(cols)
    w, b = ln.weight.copy(), ln.bias.copy()

    def functions():
        _, mean, rstd = normkit.layer_norm(x, cols, w, b, return_stats=True)
        normkit.layer_norm_backward(dy, x, mean, rstd, cols, w)

    def layer():
        ln(x)
        ln.backward(dy)

    def once(f):
        start = time.perf_counter()
        f()
        return time.perf_counter() - start

    print(f"LayerNorm [{rows},{cols}] float32, forward + backward; median of {args.reps} interleaved samples")
    print("| threads | functions (ms) | layer object (ms) | layer / functions |")
    print("| --- | --- | --- | --- |")
    for threads in (int(t) for t in args.threads.split(",")):
        normkit.set_num_threads(threads)
        for f in (functions, layer):
            f()  # warm up: output cache, pages, OpenMP team
        # per repetition both once, alternating which goes first
        fn, ly = _timing.interleaved_medians([functions, layer], args.reps, once)
        print(f"| {threads} | {fn * 1e3:.2f} | {ly * 1e3:.2f} | {ly / fn:.3f} |")


if __name__ == "__main__":
    main()

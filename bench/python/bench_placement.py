#!/usr/bin/env python3
"""How much where `out=` lies relative to x costs (issue 12, item 5: 4K aliasing and misalignment).

    python bench/python/bench_placement.py [--threads 2] [--reps 40] [--offsets 0,16,32,64,1040,2048]
                                           [--cases ln_f32,...] [--markdown FILE]

x starts on a 2 MiB boundary; each output starts `offset` bytes after another one (_data.placed_empty),
so offset 16 is y 16 bytes past x modulo 2 MiB (what two NumPy allocations can give), 1040 is 16 bytes
past a line but 1 KiB away modulo 4 KiB, and 64 / 2048 are line-aligned. Per repetition every offset
runs once in turn (the machine's bandwidth drifts: interleaving puts them under the same conditions);
the figure is each offset's median, and the table gives each offset's time over offset 0's. 1.00 everywhere is the goal: a kernel whose speed does not depend on the placement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import normkit  # noqa: E402
import _data  # noqa: E402
import _libs  # noqa: E402
import _machine  # noqa: E402
import _timing  # noqa: E402

CASES = {
    # name: (label, shape, dtype name, call(x, out))
    "ln_f32": ("LayerNorm [8192,768] float32", (8192, 768), "float32",
               lambda x, y: normkit.layer_norm(x, 768, out=y)),
    "ln_f16": ("LayerNorm [8192,768] float16", (8192, 768), "float16",
               lambda x, y: normkit.layer_norm(x, 768, out=y)),
    "ln_small_f32": ("LayerNorm [64,1024] float32", (64, 1024), "float32",
                     lambda x, y: normkit.layer_norm(x, 1024, out=y)),
    "ln_bf16": ("LayerNorm [8192,768] bfloat16", (8192, 768), "bfloat16",
                lambda x, y: normkit.layer_norm(x, 768, out=y)),
    "gn_nchw_f16": ("GroupNorm G=32 [8,320,64,64] NCHW float16", (8, 320, 64, 64), "float16",
                    lambda x, y: normkit.group_norm(x, 32, out=y)),
    "gn_nhwc_f32": ("GroupNorm G=32 [8,64,64,320] NHWC float32", (8, 64, 64, 320), "float32",
                    lambda x, y: normkit.group_norm(x, 32, layout="NHWC", out=y)),
    "gn_nhwc_f16": ("GroupNorm G=32 [8,64,64,320] NHWC float16", (8, 64, 64, 320), "float16",
                    lambda x, y: normkit.group_norm(x, 32, layout="NHWC", out=y)),
    "bn_nhwc_f32": ("BatchNorm2d inference [32,56,56,64] NHWC float32", (32, 56, 56, 64), "float32",
                    lambda x, y: normkit.batch_norm(x, np.zeros(64, np.float32), np.ones(64, np.float32),
                                                    layout="NHWC", out=y)),
}


def _timing_one(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--offsets", default="0,16,32,64,1040,2048")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    offsets = [int(v) for v in args.offsets.split(",")]
    if offsets[0] != 0:
        offsets.insert(0, 0)
    normkit.set_num_threads(args.threads)
    _libs.np = np  # _data's arrays come from _libs' NumPy
    rng = np.random.default_rng(0)
    lines = [
        f"cpu: {_machine.cpu_model()}; kernel path: {normkit.info()['kernel_path']}; threads: {args.threads}",
        "",
        "time at each offset of `out=` from x (bytes, modulo 2 MiB) over the time at offset 0",
        "",
        "| case | offset 0 (ms) | " + " | ".join(f"+{o}" for o in offsets[1:]) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in offsets[1:]) + " |",
    ]
    print("\n".join(lines), flush=True)
    for name in args.cases.split(","):
        label, shape, dtype_name, call = CASES[name]
        if dtype_name == "bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                print(f"| {label} | skipped: needs ml_dtypes |")
                continue
            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(dtype_name)
        x = _data.placed_array(_data.random_rows(rng, shape), dtype)
        outs = [_data.placed_empty(shape, dtype, o) for o in offsets]
        for y in outs:  # warm-up: pages touched, code paths loaded
            call(x, y)
            call(x, y)
        # Small problems: enough calls per sample for ~2 ms, the figure per call.
        inner = max(1, round(2e-3 / _timing_one(lambda: call(x, outs[0]))))

        def repeated(y):
            for _ in range(inner):
                call(x, y)

        calls = [(lambda y=y: repeated(y)) for y in outs]
        medians = [m / inner for m in _timing.interleaved_medians(calls, args.reps, _timing_one)]
        best = dict(zip(offsets, medians))
        row = f"| {label} | {best[0] * 1e3:.3f} | " + " | ".join(f"{best[o] / best[0]:.2f}" for o in offsets[1:]) + " |"
        lines.append(row)
        print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

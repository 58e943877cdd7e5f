#!/usr/bin/env python3
"""normkit's CUDA backend against PyTorch CUDA (torch.nn.functional), on one GPU, in one process.

    python bench/python/bench_cuda.py                    # all cases
    python bench/python/bench_cuda.py --quick            # fewer repetitions
    python bench/python/bench_cuda.py --markdown FILE    # also write the table as markdown

Needs normkit built with CUDA (pip install . -Ccmake.define.NORMKIT_CUDA=ON), a CUDA device and
PyTorch with CUDA. Cases (issue 7): LayerNorm and RMSNorm [8192,4096] and [4096,12288] in bfloat16
and float32; BatchNorm training NHWC [64,128,56,56]; GroupNorm (32 groups) [8,320,64,64] NCHW;
forward and backward each.

Timing: CUDA events around `reps` back-to-back calls on the current stream, after warm-up; the
figure is the median of `trials` such runs, normkit and PyTorch interleaved trial by trial. Outputs
are fresh tensors from PyTorch's caching allocator on both sides (normkit allocates through it too).

Bytes and the limit: a forward moves x read + y written (2 times x's bytes), a backward x and dy
read + dx written (3 times); GB/s counts those bytes. The limit is a device-to-device copy
(`dst.copy_(src)`) of as many bytes, timed the same way in the same run; "frac" = the copy's time /
the norm's time (1.0 = at the copy's bandwidth). "x torch" = PyTorch's time / normkit's time.

PyTorch's backward: the ATen backward ops autograd runs (native_layer_norm_backward,
_fused_rms_norm_backward where it exists else autograd of F.rms_norm, native_batch_norm_backward,
native_group_norm_backward), called directly.

Every normkit result is first checked against PyTorch's (relative tolerance of the dtype).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402  (standard library only)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", help="write the results table to this file")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    import normkit as nk

    if not nk.info()["cuda_built"]:
        print("normkit was built without CUDA: pip install . -Ccmake.define.NORMKIT_CUDA=ON")
        return 2
    if not torch.cuda.is_available() or nk.info()["cuda_devices"] == 0:
        print("no CUDA device (or PyTorch without CUDA): nothing to measure")
        return 2
    dev = torch.device("cuda")
    reps, trials = (5, 3) if args.quick else (20, 7)

    def timed(fn):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps * 1e-3  # seconds per call

    def check(a, b, dtype, what):
        tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            if u is None or v is None:
                continue
            err = ((u.float() - v.float()).abs() / v.float().abs().clamp_min(1.0)).max().item()
            if not err <= tol:
                raise SystemExit(f"{what}: normkit differs from PyTorch by {err:.3g} (> {tol})")

    rows = []

    def run(name, x, moved_bytes, nk_fn, torch_fn):
        check(nk_fn(), torch_fn(), x.dtype, name)
        n = moved_bytes // 2 // x.element_size() + 1
        src = torch.empty(n, dtype=x.dtype, device=dev)
        dst = torch.empty_like(src)
        # trials runs of each, interleaved, the order rotated trial by trial
        t_nk, t_torch, t_copy = _timing.interleaved_medians([nk_fn, torch_fn, lambda: dst.copy_(src)], trials, timed)
        rows.append((name, moved_bytes / t_nk / 1e9, t_copy / t_nk, t_torch / t_nk))
        print(f"{name:44s} {moved_bytes / t_nk / 1e9:8.1f} GB/s  frac {t_copy / t_nk:5.2f}  x torch {t_torch / t_nk:5.2f}",
              flush=True)

    g = torch.Generator(device=dev).manual_seed(0)

    def randn(shape, dtype):
        return torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    for (rows_n, cols), dtype in [((8192, 4096), torch.bfloat16), ((8192, 4096), torch.float32),
                                  ((4096, 12288), torch.bfloat16), ((4096, 12288), torch.float32)]:
        x, dy = randn((rows_n, cols), dtype), randn((rows_n, cols), dtype)
        w, b = randn((cols,), dtype) + 1, randn((cols,), dtype)
        tag = f"[{rows_n},{cols}] {str(dtype).split('.')[-1]}"
        xb = x.numel() * x.element_size()
        run(f"layer_norm fwd {tag}", x, 2 * xb, lambda: nk.layer_norm(x, cols, w, b),
            lambda: F.layer_norm(x, (cols,), w, b))
        run(f"rms_norm fwd {tag}", x, 2 * xb, lambda: nk.rms_norm(x, cols, w, 1e-6),
            lambda: F.rms_norm(x, (cols,), w, 1e-6))
        _, mean, rstd = nk.layer_norm(x, cols, w, b, return_stats=True)
        _, tmean, trstd = torch.ops.aten.native_layer_norm(x, (cols,), w, b, 1e-5)
        run(f"layer_norm bwd {tag}", x, 3 * xb, lambda: nk.layer_norm_backward(dy, x, mean, rstd, cols, w),
            lambda: torch.ops.aten.native_layer_norm_backward(dy, x, (cols,), tmean, trstd, w, b,
                                                              [True, True, True]))
        _, rrstd = nk.rms_norm(x, cols, w, 1e-6, return_stats=True)
        xg = x.detach().requires_grad_(True)
        wg = w.detach().requires_grad_(True)
        yg = F.rms_norm(xg, (cols,), wg, 1e-6)
        run(f"rms_norm bwd {tag}", x, 3 * xb, lambda: nk.rms_norm_backward(dy, x, rrstd, cols, w),
            lambda: torch.autograd.grad(yg, (xg, wg), dy, retain_graph=True))

    # BatchNorm training, NHWC [64,128,56,56]: torch gets channels_last NCHW tensors.
    x = randn((64, 56, 56, 128), torch.float32)
    dy = randn((64, 56, 56, 128), torch.float32)
    w, b = randn((128,), torch.float32) + 1, randn((128,), torch.float32)
    xt, dyt = x.permute(0, 3, 1, 2), dy.permute(0, 3, 1, 2)
    xb = x.numel() * 4
    run("batch_norm train fwd NHWC [64,128,56,56] float32", x, 2 * xb,
        lambda: nk.batch_norm(x, None, None, w, b, True, layout="NHWC"),
        lambda: F.batch_norm(xt, None, None, w, b, True))
    _, mean, rstd = nk.batch_norm(x, None, None, w, b, True, layout="NHWC", return_stats=True)
    _, smean, sinv = torch.ops.aten.native_batch_norm(xt, w, b, None, None, True, 0.1, 1e-5)[:3]
    run("batch_norm train bwd NHWC [64,128,56,56] float32", x, 3 * xb,
        lambda: nk.batch_norm_backward(dy, x, mean, rstd, w, layout="NHWC"),
        lambda: torch.ops.aten.native_batch_norm_backward(dyt, xt, w, None, None, smean, sinv, True, 1e-5,
                                                          [True, True, True]))

    # GroupNorm, 32 groups, NCHW [8,320,64,64].
    x, dy = randn((8, 320, 64, 64), torch.float32), randn((8, 320, 64, 64), torch.float32)
    w, b = randn((320,), torch.float32) + 1, randn((320,), torch.float32)
    xb = x.numel() * 4
    run("group_norm fwd NCHW [8,320,64,64] float32", x, 2 * xb, lambda: nk.group_norm(x, 32, w, b),
        lambda: F.group_norm(x, 32, w, b))
    _, mean, rstd = nk.group_norm(x, 32, w, b, return_stats=True)
    _, gmean, grstd = torch.ops.aten.native_group_norm(x, w, b, 8, 320, 64 * 64, 32, 1e-5)
    run("group_norm bwd NCHW [8,320,64,64] float32", x, 3 * xb,
        lambda: nk.group_norm_backward(dy, x, mean, rstd, 32, w),
        lambda: torch.ops.aten.native_group_norm_backward(dy, x, gmean, grstd, w, 8, 320, 64 * 64, 32,
                                                          [True, True, True]))

    name = torch.cuda.get_device_name()
    table = [f"Device: {name}; PyTorch {torch.__version__}; normkit {nk.__version__}", "",
             "| case | GB/s | frac of D2D copy | x torch |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r[0]} | {r[1]:.0f} | {r[2]:.2f} | {r[3]:.2f} |" for r in rows]
    print("\n".join(table))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""normkit backward (LayerNorm / RMSNorm / BatchNorm / GroupNorm) against PyTorch's, in one process.

    python bench/python/bench_backward.py                  # full run (a few minutes on 2 cores)
    python bench/python/bench_backward.py --quick          # smoke test
    python bench/python/bench_backward.py --threads 1,2 --markdown backward.md

Cases (issue 4, backward): LayerNorm [8192,768] float32 with weight and bias, BatchNorm2d training
[32,64,56,56] NCHW and NHWC, RMSNorm [8192,4096] float32, GroupNorm G=32 [8,320,64,64] NCHW; secondary:
LayerNorm [8192,768] float16/bfloat16 (float32 weight and bias: PyTorch's mixed-type path) and GroupNorm
NHWC. Shapes are written logically as [N, C, spatial...]; an NHWC case stores x (and dy) as (N, H, W, C).

Only the backward is timed. Its inputs -- x, dy (standard normal) and the statistics of a forward
run once beforehand -- are fixed; every call returns fresh gradients (dx, dweight[, dbias]):

- normkit: ``normkit.*_backward(dy, x, mean, rstd, ...)`` with the statistics its forward returned
  (``return_stats=True``); normkit's backward has no out=.
- torch aten: the ATen op autograd calls, directly -- ``torch.ops.aten.native_layer_norm_backward``,
  ``native_batch_norm_backward`` (train=True), ``native_group_norm_backward`` -- with the statistics of
  the matching ATen forward. The kernel alone, without the autograd engine: the fairer comparison.
  RMSNorm has none on the CPU (``F.rms_norm`` is a composite of elementwise ops there, and
  ``aten::_fused_rms_norm_backward`` has no CPU kernel), so it has only the autograd row.
- torch autograd: the graph of ``torch.nn.functional.layer_norm/rms_norm/batch_norm/group_norm`` on x,
  weight and bias requiring grad is built once per thread count (untimed), and each call is
  ``torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)``: what ``y.backward(dy,
  retain_graph=True)`` runs (the same engine, the same backward nodes), minus the accumulation into
  ``.grad`` (from its second call on, ``backward`` would add dx to x.grad: one more read and write of
  dx that is not part of a backward kernel).
- NHWC: PyTorch gets x and dy as channels_last NCHW tensors (``.permute(0, 3, 1, 2)`` of the NHWC
  arrays), so its channels-last kernels run; dx comes back channels_last.

The timing machinery is the forward benchmarks' (bench_rows.py, bench_channels.py, _run.py): per
case and thread count, every implementation is timed round-robin (one sample of each per repetition,
rotating who goes first) together with the bandwidth limit's copies, and the figure is the median. See
bench_rows.py for the thread-fairness (--spin, --gap-ms, --prime), allocator (--hugepages) and
placement (--out-offset) measurements behind the defaults used here. x and dy each start on a 2 MiB
boundary; every output is fresh, so --out-offset moves only the copy's destination.

Bytes and the limit: the least a backward can move is x read + dy read + dx written (3 times x's
bytes; the statistics and the parameters and their gradients are negligible). GB/s counts those
bytes; the limit is the fastest copy moving as many bytes -- 1.5 times x's bytes read and written --
with glibc memcpy on 1 and 2 threads, with and without forced non-temporal stores; "frac" = limit time
/ time. A backward that needs per-row or per-channel sums before it can write dx (all of these but
BatchNorm inference) reads x and dy twice unless they stay in cache; it is held to the same limit.
The traffic mix differs from a copy's (2 reads : 1 write against 1 : 1), so the limit is an estimate.

Each implementation is checked once before it is timed, against a float64 NumPy reference computed
from x and dy alone (statistics recomputed in float64): dx on sampled rows (LayerNorm/RMSNorm) or a
few whole samples of the batch (BatchNorm/GroupNorm), dweight and dbias whole (float32 sums of 8192
to 100352 terms: tolerance 2e-3 relative, dx the forward benchmarks' tolerance; for 16-bit x dweight
and dbias are reported, not checked, as PyTorch sums them with 16-bit roundings); the check string gives
the errors of dx/dweight/dbias and the same against normkit's gradients on the whole arrays. One that
disagrees is reported and left out.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402  (the bench modules import only the standard library: the environment is set first)
import _libs  # noqa: E402
import _data  # noqa: E402
from _data import as_ncs, channels_last, from_ncs  # noqa: E402
import _check  # noqa: E402
from _check import Impl  # noqa: E402
import _peers  # noqa: E402
import _report  # noqa: E402
import _run  # noqa: E402

# ---------------------------------------------------------------------------------------------
# cases

BN2D = (32, 64, 56, 56)
# A late ResNet stage: planes of 49 elements (196 bytes of float32), 25 MiB like BN2D.
BN2D_7x7 = (256, 512, 7, 7)
# ResNet-50's last stage: 2048 channels of 7x7 planes (C * S past one 64 KiB table), 25 MiB.
BN2D_2048x7x7 = (64, 2048, 7, 7)
# ResNet-50's third stage: 1024 channels of 14x14 planes (784 bytes; C * S past 256 KiB: the rows kernel), 25 MiB.
BN2D_1024x14x14 = (32, 1024, 14, 14)
# The last stage at batch 8: 3 MiB, in cache; per-call costs weigh.
BN2D_B8_2048x7x7 = (8, 2048, 7, 7)
# One sample of ResNet-50's last stage but one (batch-1 fine-tuning): 100 KiB; per-call costs weigh.
BN2D_B1_512x7x7 = (1, 512, 7, 7)
GN = (8, 320, 64, 64)
GROUPS = 32
EPS = 1e-5  # LayerNorm, BatchNorm, GroupNorm
RMS_EPS = 1e-6
# dweight/dbias are float32 sums over M = 8192 (rows) to 100352 (BatchNorm) terms; their rounding error
# grows with M (PyTorch's reached 3-5e-4 relative here, normkit's 4e-5), so they get a looser tolerance
# than dx (_check.tolerance: 1000 float32 epsilons, 8 epsilons of a 16-bit dtype).
PARAM_TOL = 2e-3
# PyTorch CPU's 16-bit LayerNorm backward sums dweight/dbias with 16-bit roundings (float32 weight or not):
# measured here, off by up to 1.7% (float16) / 13% (bfloat16) of the largest value, where normkit's (float32
# sums) are within 5e-5 of float64. For 16-bit x they are reported, not checked; dx is checked.
PARAM_NOTE_16 = ("16-bit x: dweight/dbias errors are reported, not checked -- PyTorch CPU sums them with "
                 "16-bit roundings (about 1.7% (float16) / 13% (bfloat16) of the largest value off float64 "
                 "here; normkit's float32 sums within 5e-5); dx is checked")

CASES = {
    # name: (op, logical shape ([M, n] for the rows norms, [N, C, spatial...] otherwise), layout, dtype)
    "ln_8192x768": ("layer_norm", (8192, 768), None, "float32"),
    "bn_train_nchw": ("batch_norm", BN2D, "NCHW", "float32"),
    "bn_train_nhwc": ("batch_norm", BN2D, "NHWC", "float32"),
    "rms_8192x4096": ("rms_norm", (8192, 4096), None, "float32"),
    "gn_nchw": ("group_norm", GN, "NCHW", "float32"),
    # secondary
    "ln_8192x768_f16": ("layer_norm", (8192, 768), None, "float16"),
    "ln_8192x768_bf16": ("layer_norm", (8192, 768), None, "bfloat16"),
    "gn_nhwc": ("group_norm", GN, "NHWC", "float32"),
    "bn_train_nchw_7x7": ("batch_norm", BN2D_7x7, "NCHW", "float32"),
    "bn_train_nchw_2048x7x7": ("batch_norm", BN2D_2048x7x7, "NCHW", "float32"),
    "bn_train_nchw_1024x14x14": ("batch_norm", BN2D_1024x14x14, "NCHW", "float32"),
    "bn_train_nchw_b8_2048x7x7": ("batch_norm", BN2D_B8_2048x7x7, "NCHW", "float32"),
    "bn_train_nchw_b1_512x7x7": ("batch_norm", BN2D_B1_512x7x7, "NCHW", "float32"),
}

# Targets from the issue (2 threads): normkit's backward at least 2x PyTorch autograd's backward.
# The same speedup over the ATen op alone is shown next to it (stricter: no engine overhead).
PRIMARY = ("ln_8192x768", "bn_train_nchw", "bn_train_nhwc", "rms_8192x4096", "gn_nchw")
TARGETS = {case: [("torch autograd", 2.0), ("torch aten", 2.0)] for case in PRIMARY}
TARGETS["rms_8192x4096"] = [("torch autograd", 2.0)]  # no ATen RMSNorm backward on the CPU

PEERS_NOTE = ("torch aten = the ATen backward op alone (native_layer_norm_backward, native_batch_norm_backward, "
              "native_group_norm_backward; the fairer comparison, no autograd engine); torch autograd = "
              "torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True) through a graph built once (what "
              "y.backward(dy, retain_graph=True) runs, without accumulating into .grad). RMSNorm: autograd only "
              "(F.rms_norm is a composite of elementwise ops on the CPU; aten::_fused_rms_norm_backward has no CPU "
              "kernel)")

LIBS = ("normkit", "torch")

ARGS = _cli.parse_args(__doc__, CASES, LIBS, reps_default=15,
                       out_offset_note=" (the backward's outputs are all fresh: this moves only the copy's "
                                       "destination)")
_libs.configure_environment(ARGS)
_libs.load_libraries(ARGS)  # NumPy, normkit (first), ml_dtypes, PyTorch
np, normkit, torch, F = _libs.np, _libs.normkit, _libs.torch, _libs.F


# ---------------------------------------------------------------------------------------------
# data and float64 reference


def norm_backward64(x, dy, w, axes, centered, eps):
    """float64 gradients of y = (x - mean) * rstd * w (+ b) over ``axes`` (mean 0 if not centered),
    w broadcast against x: returns dx and the un-summed terms dy * xhat (for dweight) of this block."""
    mean = x.mean(axis=axes, keepdims=True) if centered else 0.0
    xc = x - mean
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=axes, keepdims=True) + eps)
    xhat = xc * rstd
    g = dy * w
    dx = g - (g * xhat).mean(axis=axes, keepdims=True) * xhat
    if centered:
        dx -= g.mean(axis=axes, keepdims=True)
    return dx * rstd, dy * xhat


class Case:
    def __init__(self, name):
        self.name = name
        self.op, self.shape, self.layout, self.dtype_name = CASES[name]
        self.dtype = _libs.np_dtype(self.dtype_name)
        self.rows = self.op in ("layer_norm", "rms_norm")
        self.eps = RMS_EPS if self.op == "rms_norm" else EPS
        dims = "[" + ",".join(map(str, self.shape)) + "]"
        rng = np.random.default_rng(0)
        if self.rows:
            self.m, self.n = self.shape
            self.phys = self.shape
            kind = "LayerNorm" if self.op == "layer_norm" else "RMSNorm"
            self.label = f"{kind} bwd {dims} {self.dtype_name}"
            nparam = self.n
            x32 = _data.random_rows(rng, self.phys)
        else:
            n, c = self.shape[:2]
            spatial = self.shape[2:]
            self.n, self.c, self.s = n, c, int(np.prod(spatial))
            self.phys = (n,) + spatial + (c,) if channels_last(self.layout) else self.shape
            if self.op == "batch_norm":
                self.label = f"BatchNorm2d train bwd {dims} {self.layout} {self.dtype_name}"
            else:
                self.label = f"GroupNorm G={GROUPS} bwd {dims} {self.layout} {self.dtype_name}"
            nparam = c
            # per-channel scale and shift, so that the channel statistics differ
            x32 = _data.random_channels(rng, self.phys, channels_last(self.layout))[0]
        self.x = _data.placed_array(x32, self.dtype)
        rng.standard_normal(self.phys, dtype=np.float32, out=x32)
        self.dy = _data.placed_array(x32, self.dtype)
        del x32
        # float32 weight and bias for every dtype (mixed types for 16-bit x, as PyTorch allows)
        self.w = rng.uniform(0.5, 1.5, nparam).astype(np.float32)
        self.b = None if self.op == "rms_norm" else (0.1 * rng.standard_normal(nparam)).astype(np.float32)
        self.bytes = 3 * self.x.nbytes  # x read + dy read + dx written
        self.limit_nbytes = self.bytes // 2  # a copy of 1.5 x's bytes moves as many
        self.is16 = self.dtype != np.float32
        # dx, dweight, dbias (None: reported, not checked)
        self.tol = (_check.tolerance(self.dtype),) + ((None, None) if self.is16 else (PARAM_TOL, PARAM_TOL))

    # ---- float64 reference: (dx at idx, dweight, dbias)

    def reference(self, idx):
        w = self.w.astype(np.float64)
        if self.rows:
            centered = self.op == "layer_norm"
            dx, _ = norm_backward64(self.x[idx].astype(np.float64), self.dy[idx].astype(np.float64), w,
                                    -1, centered, self.eps)
            dw, db = np.zeros(self.n), np.zeros(self.n)
            step = max(1, (2 << 20) // self.n)
            for i in range(0, self.m, step):
                dyc = self.dy[i:i + step].astype(np.float64)
                _, dyx = norm_backward64(self.x[i:i + step].astype(np.float64), dyc, w, -1, centered, self.eps)
                dw += dyx.sum(axis=0)
                db += dyc.sum(axis=0)
            return dx, dw, (db if centered else None)
        wc = w[None, :, None]
        dw, db = np.zeros(self.c), np.zeros(self.c)
        if self.op == "batch_norm":  # statistics over the whole batch: all of it at once (51 MiB in float64)
            x = as_ncs(self.x, self.layout).astype(np.float64)
            dy = as_ncs(self.dy, self.layout).astype(np.float64)
            dx, dyx = norm_backward64(x, dy, wc, (0, 2), True, self.eps)
            dx = from_ncs(dx[idx], self.layout, self.x[idx].shape)
            return dx, dyx.sum(axis=(0, 2)), dy.sum(axis=(0, 2))
        dxs = []  # GroupNorm: sample by sample
        for i in range(self.n):
            x = as_ncs(self.x[i:i + 1], self.layout).astype(np.float64).reshape(1, GROUPS, -1, self.s)
            dy = as_ncs(self.dy[i:i + 1], self.layout).astype(np.float64).reshape(1, GROUPS, -1, self.s)
            dx, dyx = norm_backward64(x, dy, w.reshape(1, GROUPS, -1, 1), (2, 3), True, self.eps)
            dw += dyx.sum(axis=(0, 3)).reshape(-1)
            db += dy.sum(axis=(0, 3)).reshape(-1)
            if i in idx:
                dxs.append(from_ncs(dx.reshape(1, self.c, self.s), self.layout, self.x[i:i + 1].shape))
        return np.concatenate(dxs), dw, db


# ---------------------------------------------------------------------------------------------
# implementations


def normkit_impls(c):
    x, dy, w, b, eps = c.x, c.dy, c.w, c.b, c.eps
    if c.op == "layer_norm":
        _, mean, rstd = normkit.layer_norm(x, c.n, w, b, eps, return_stats=True)
        f = lambda: normkit.layer_norm_backward(dy, x, mean, rstd, c.n, w)  # noqa: E731
    elif c.op == "rms_norm":
        _, rstd = normkit.rms_norm(x, c.n, w, eps, return_stats=True)
        f = lambda: normkit.rms_norm_backward(dy, x, rstd, c.n, w)  # noqa: E731
    elif c.op == "batch_norm":
        rm, rv = np.zeros(c.c, np.float32), np.ones(c.c, np.float32)
        _, mean, rstd = normkit.batch_norm(x, rm, rv, w, b, training=True, eps=eps, layout=c.layout,
                                           return_stats=True)
        f = lambda: normkit.batch_norm_backward(dy, x, mean, rstd, w, training=True, layout=c.layout)  # noqa: E731
    else:
        _, mean, rstd = normkit.group_norm(x, GROUPS, w, b, eps, layout=c.layout, return_stats=True)
        f = lambda: normkit.group_norm_backward(dy, x, mean, rstd, GROUPS, w, layout=c.layout)  # noqa: E731
    return [Impl("normkit", f, f, "normkit")]


def torch_output(c, grads, notes):
    """PyTorch's gradients as NumPy arrays, dx in x's physical layout."""
    return ((_peers.from_torch_nchw(grads[0], channels_last(c.layout), notes, "dx"),)
            + tuple(None if g is None else _peers.from_torch(g) for g in grads[1:]))


def torch_impls(c, notes):
    # x and dy as PyTorch sees them: NHWC as a channels_last NCHW view
    cl = channels_last(c.layout)
    tx, tdy = _peers.to_torch_nchw(c.x, cl), _peers.to_torch_nchw(c.dy, cl)
    tw, tb = _peers.to_torch(c.w), _peers.to_torch(c.b)
    eps = c.eps
    aten = torch.ops.aten
    mask = [True, True, True]
    impls = []

    # the ATen backward op, with the statistics of the ATen forward
    if c.op == "layer_norm":
        _, tmean, trstd = aten.native_layer_norm(tx, [c.n], tw, tb, eps)
        f = lambda: aten.native_layer_norm_backward(tdy, tx, [c.n], tmean, trstd, tw, tb, mask)  # noqa: E731
    elif c.op == "batch_norm":
        trm, trv = torch.zeros(c.c), torch.ones(c.c)
        _, tmean, tinvstd = aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, eps)
        f = lambda: aten.native_batch_norm_backward(tdy, tx, tw, trm, trv, tmean, tinvstd, True, eps,  # noqa: E731
                                                    mask)
    elif c.op == "group_norm":
        _, tmean, trstd = aten.native_group_norm(tx, tw, tb, c.n, c.c, c.s, GROUPS, eps)
        f = lambda: aten.native_group_norm_backward(tdy, tx, tmean, trstd, tw, c.n, c.c, c.s, GROUPS,  # noqa: E731
                                                    mask)
    else:
        f = None
    if f is not None:
        impls.append(Impl("torch aten", f, lambda: torch_output(c, f(), notes), "torch"))

    # autograd: the graph built once, its backward run again and again (retain_graph)
    xr = tx.detach().requires_grad_()
    wr = tw.detach().clone().requires_grad_()
    br = None if tb is None else tb.detach().clone().requires_grad_()
    if c.op == "layer_norm":
        y = F.layer_norm(xr, (c.n,), wr, br, eps)
    elif c.op == "rms_norm":
        y = F.rms_norm(xr, (c.n,), wr, eps)
    elif c.op == "batch_norm":
        y = F.batch_norm(xr, torch.zeros(c.c), torch.ones(c.c), wr, br, training=True, eps=eps)
    else:
        y = F.group_norm(xr, GROUPS, wr, br, eps)
    inputs = (xr, wr) if br is None else (xr, wr, br)
    g = lambda: torch.autograd.grad(y, inputs, tdy, retain_graph=True)  # noqa: E731
    impls.append(Impl("torch autograd", g, lambda: torch_output(c, g(), notes), "torch"))
    return impls


# ---------------------------------------------------------------------------------------------
# running


def sample_index(c):
    """Rows (LayerNorm/RMSNorm) or samples of the batch the float64 reference gives dx for."""
    if c.rows:
        return _data.sampled_rows(c.m)
    return _data.sampled_batch(c.n)


def run_case(c, limit, log, results, notes):
    log(f"\n=== {c.label}   x {_report.mib(c.x.nbytes):.2f} MiB, x+dy+dx {_report.mib(c.bytes):.2f} MiB ===")
    idx = sample_index(c)
    ref = c.reference(idx)

    def make_impls(t, case_notes):
        impls = normkit_impls(c)
        if torch is not None:
            impls += torch_impls(c, case_notes)
        return impls

    what = f"sampled rows ({len(idx)})" if c.rows else "samples " + ",".join(map(str, idx))
    check_what = (f"max rel err dx/dweight/dbias vs float64 reference, dx on {what} "
                  "| the same vs normkit, whole arrays")
    if PEERS_NOTE not in notes:
        notes.append(PEERS_NOTE)
    if c.is16:
        log(f"   note: {PARAM_NOTE_16}")
        if PARAM_NOTE_16 not in notes:
            notes.append(PARAM_NOTE_16)
    _run.run_threads(c, ARGS, limit, log, results, notes, make_impls, idx, ref, check_what)


def header_lines(limit_helper_ok):
    extra = [
        ("bytes", "GB/s counts x read + dy read + dx written (3 times x's bytes; statistics, parameters and "
                  "their gradients left out); the limit copies 1.5 times x's bytes (as many bytes moved). "
                  "Every backward here but a pure elementwise one needs row/channel/group sums of dy and "
                  "dy*xhat before it writes dx (x and dy read twice unless they stay in cache) and is held "
                  "to the same limit"),
        ("parameters", f"eps {EPS:g} (RMSNorm {RMS_EPS:g}); GroupNorm {GROUPS} groups; weight/bias float32 for "
                       "every x dtype (for 16-bit x PyTorch's mixed-type path); dx in x's dtype, dweight/dbias "
                       "float32; x and dy standard normal (x scaled and shifted), fixed across calls"),
    ]
    return _report.header_lines(
        ARGS, limit_helper_ok,
        "normkit.*_backward with the statistics of normkit's forward (return_stats=True), fresh outputs "
        "(no out=); torch aten: torch.ops.aten.native_layer_norm_backward / native_batch_norm_backward "
        "(train) / native_group_norm_backward with the statistics of the matching ATen forward (the "
        "kernel autograd calls, without the engine; none for RMSNorm on the CPU); torch autograd: "
        "torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True) on a graph of "
        "torch.nn.functional.* built once per thread count (y.backward(dy, retain_graph=True) without "
        "the .grad accumulation); PyTorch on torch.from_numpy views (NHWC: .permute(0,3,1,2), a "
        "channels_last NCHW tensor; bfloat16 through an int16 view), outside inference_mode",
        extra=extra, limit_what="1.5 times x's bytes (read + write = x + dy read + dx written)")


LEGEND = ("Every call returns fresh gradients (normkit's backward has no out=). GB/s counts x read + dy read + "
          "dx written. frac = bandwidth-limit time / time, the limit being a copy moving as many bytes. "
          "x nk = this row's time / normkit's (normkit's speedup over it). torch aten = the ATen backward "
          "op alone; torch autograd = torch.autograd.grad through the retained graph.")


def target_rows(results):
    return _report.target_rows(results, ARGS, TARGETS, {})


def main():
    _run.main(ARGS, "normkit backward benchmark", "LayerNorm / RMSNorm / BatchNorm / GroupNorm backward",
              4, header_lines, Case, run_case, target_rows, skip_failed_cases=True,
              report_total_time=True, inference_mode=False, legend=LEGEND)


if __name__ == "__main__":
    main()

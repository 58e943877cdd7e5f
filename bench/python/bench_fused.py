#!/usr/bin/env python3
"""normkit's fused norms (issue 11) against ONNX Runtime's fused ops, PyTorch and unfused composites, in one process.

    python bench/python/bench_fused.py                        # full run, 2 threads (a few minutes on 2 cores)
    python bench/python/bench_fused.py --check                # the same, each case checked strictly first
    python bench/python/bench_fused.py --quick --tiny --check # smoke test on tiny shapes (seconds; numbers meaningless)
    python bench/python/bench_fused.py --cases 'add*' --markdown fused.md --json fused.json

Cases (the performance table of issue 11; 2 threads by default, --threads 1,2 for both):

- ``addrms_8192x768``, ``addrms_4096x4096``: ``normkit.add_rms_norm(x, residual, (H,), weight, eps)`` float32,
  against ONNX Runtime's com.microsoft SkipSimplifiedLayerNormalization (inputs x, skip, gamma; outputs
  output and input_skip_bias_sum), against NumPy's add followed by ``normkit.rms_norm`` ("np.add+nk.rms"),
  and against PyTorch (``torch.add``, then ``F.rms_norm``; not a target, shown for reference).
- ``addln_8192x768``, ``addln_4096x4096``: ``normkit.add_layer_norm`` float32 against ORT's
  SkipLayerNormalization (gamma and beta) and PyTorch (``torch.add``, then ``F.layer_norm``); NumPy's add +
  ``normkit.layer_norm`` shown for reference.
- ``addrms_4096x4096_f16``: ``add_rms_norm`` float16 (weight float16) against ORT's float16
  SkipSimplifiedLayerNormalization and PyTorch (float16 add, then float16 ``F.rms_norm``).
- ``gn_silu_nchw``, ``gn_silu_nhwc``: ``normkit.group_norm(x, 32, w, b, eps, activation="silu")`` on
  [8,320,64,64] float32 (NHWC: ``layout="NHWC"`` on an array of shape (8,64,64,320)), against plain
  ``normkit.group_norm`` without activation ("nk plain gn": target fused time <= 1.1x of it) and against
  PyTorch ``F.silu(F.group_norm(x), inplace=True)`` (NHWC: a channels_last NCHW view of the array, so
  PyTorch's channels-last kernel runs and its output is channels_last).
- ``rms_int8_8192x4096``: ``normkit.rms_norm(x, (H,), w, eps, quantize="int8")`` with dynamic per-row
  scales (scale=None) on float32 [8192,4096], returning (int8 q, float32 scales), against the PyTorch
  composite: ``F.rms_norm``, the per-row amax (``torch.linalg.vector_norm(y, inf, dim=-1)``: max|y| in one
  pass, no |y| temporary), ``scale = amax / 127`` (1 for a zero row), ``y.div_(scale).round_().clamp_(-127,
  127).to(torch.int8)`` -- in place where PyTorch allows.

Fresh outputs and out=: every normkit function is timed with fresh outputs ("normkit") and with
preallocated ones ("normkit out=": ``out=`` and, for the add_* functions, ``sum_out=``). A fresh output per
call pays page faults (see PERFORMANCE.md); normkit serves fresh outputs of 16 MiB and more from its
cache of freed output buffers. The composites get the same two forms where their APIs allow:
"np.add+nk.rms out=" is ``np.add(x, r, out=s)`` then ``normkit.rms_norm(s, ..., out=y)``; ORT's out= is
run_with_iobinding into preallocated y and s; "nk plain gn out=" writes into out=. PyTorch is fresh only
(no out= in F.layer_norm/rms_norm/group_norm). All preallocated outputs of a case are the same arrays
(each starts --out-offset bytes after a 2 MiB boundary; x and residual on 2 MiB boundaries), so every
implementation writes to the same placement. The rms_int8 case's out= passes ``out=`` for q only (the
scales are small and fresh); if this normkit build refuses that, the out= row is left out with a note.

Bytes and the limit: add_* read x and residual and write y and s (16 bytes per float32 element, 8 per
float16 element); group_norm reads x and writes y; rms_norm int8 reads 4 bytes and writes 1 per element.
GB/s counts those bytes; the limit is the fastest copy moving as many bytes (half of them read, half
written: glibc memcpy on 1 and 2 threads, and with forced non-temporal stores in a helper process),
measured in the same rounds; "frac" = limit time / time. The int8 case's traffic is 4 reads : 1 write
against a copy's 1 : 1, so its limit is an estimate; it sets the bar high rather than low (PERFORMANCE.md:
2 threads read DRAM at ~35 GB/s, a streaming copy moves ~49 GB/s).

Timing (see bench_rows.py for the measurements behind the defaults of --spin, --gap-ms, --prime,
--hugepages and --out-offset): per case and thread count, every implementation is timed round-robin
with the others and the limit's copies (one sample of each per repetition, rotating who goes first),
the figure is the median.

Validation: each implementation is checked once before it is timed against a float64 NumPy
reference -- y on sampled rows (a few whole samples for GroupNorm) computed from the sum as stored in
x's dtype, s = x + residual as NumPy computes it in x's dtype on the whole array, and for int8 the
rounded (half to even) and clamped q in units of one quantum over 127 (so off by one quantum passes,
two fail) and the scales on every row -- and against normkit on the whole arrays (reported); one that
disagrees is reported and left out. ``--check`` makes that strict: any implementation that fails to
run or disagrees (with the float64 reference, or with normkit on the whole arrays beyond twice the
tolerance) stops the run with an AssertionError before anything of that case is timed.

normkit functions this build does not have (before issue 11 landed: add_rms_norm, add_layer_norm,
group_norm(activation=), rms_norm(quantize=)) are reported in the header and their rows left out, so the
peers can be run and checked anyway; a peer library that is not installed is left out ("-" in the
target block: "peer not timed"). ``--tiny`` shrinks every case (rows, batch and image size, not the
normalized sizes) for a smoke test of the script itself.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cli  # noqa: E402  (the bench modules import only the standard library: the environment is set first)
import _libs  # noqa: E402
import _data  # noqa: E402
import _check  # noqa: E402
from _check import Impl  # noqa: E402
import _peers  # noqa: E402
import _report  # noqa: E402
import _run  # noqa: E402

# ---------------------------------------------------------------------------------------------
# cases

GN = (8, 320, 64, 64)
GROUPS = 32
LN_EPS = 1e-5
RMS_EPS = 1e-6
GN_EPS = 1e-5
QMAX = 127.0

CASES = {
    # name: (op, logical shape (rows, H) or [N, C, H, W], layout, dtype)
    "addrms_8192x768": ("add_rms_norm", (8192, 768), None, "float32"),
    "addrms_4096x4096": ("add_rms_norm", (4096, 4096), None, "float32"),
    "addln_8192x768": ("add_layer_norm", (8192, 768), None, "float32"),
    "addln_4096x4096": ("add_layer_norm", (4096, 4096), None, "float32"),
    "addrms_4096x4096_f16": ("add_rms_norm", (4096, 4096), None, "float16"),
    "gn_silu_nchw": ("group_norm_silu", GN, "NCHW", "float32"),
    "gn_silu_nhwc": ("group_norm_silu", GN, "NHWC", "float32"),
    "rms_int8_8192x4096": ("rms_norm_int8", (8192, 4096), None, "float32"),
}

# --tiny: the same normalized sizes, few rows / a small batch
TINY = {
    "addrms_8192x768": (64, 768), "addrms_4096x4096": (16, 4096), "addln_8192x768": (64, 768),
    "addln_4096x4096": (16, 4096), "addrms_4096x4096_f16": (16, 4096), "gn_silu_nchw": (2, 320, 8, 8),
    "gn_silu_nhwc": (2, 320, 8, 8), "rms_int8_8192x4096": (32, 4096),
}

# Targets from the issue (2 threads): normkit's speedup over the peer, fresh vs fresh (and out= vs out=).
TARGETS = {
    "addrms_8192x768": [("onnxruntime", 1.5), ("np.add+nk.rms", 1.8)],
    "addrms_4096x4096": [("onnxruntime", 1.5), ("np.add+nk.rms", 1.8)],
    "addln_8192x768": [("onnxruntime", 2.0), ("torch", 1.8)],
    "addln_4096x4096": [("onnxruntime", 2.0), ("torch", 1.8)],
    "addrms_4096x4096_f16": [("onnxruntime", 1.5), ("torch", 1.5)],
    "gn_silu_nchw": [("torch", 2.0)],
    "gn_silu_nhwc": [("torch", 2.0)],
    "rms_int8_8192x4096": [("torch", 4.0)],
}
FRACTION_TARGETS = {"addrms_8192x768": 0.8, "addrms_4096x4096": 0.8, "rms_int8_8192x4096": 0.8}
# fused group_norm time / plain group_norm time must be <= this
PLAIN_RATIO_TARGETS = {"gn_silu_nchw": ("nk plain gn", 1.1), "gn_silu_nhwc": ("nk plain gn", 1.1)}

LIBS = ("normkit", "numpy", "torch", "onnxruntime")


def _extra_args(ap):
    ap.add_argument("--check", action="store_true",
                    help="assert before timing each case that every implementation runs and agrees with the "
                         "float64 reference and with normkit on the whole arrays (AssertionError otherwise)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny shapes (same normalized sizes, few rows): a smoke test of the script; "
                         "the numbers mean nothing")


ARGS = _cli.parse_args(__doc__, CASES, LIBS, reps_default=15, threads_default="2", extra_args=_extra_args,
                       out_offset_note=". 16 reproduces y allocated right after x by NumPy, a placement that "
                                       "is slow on some machines")
_libs.configure_environment(ARGS)
_libs.load_libraries(ARGS)  # NumPy, normkit (first), ml_dtypes, PyTorch, ONNX Runtime
np, normkit, torch, F, ort = _libs.np, _libs.normkit, _libs.torch, _libs.F, _libs.ort


# ---------------------------------------------------------------------------------------------
# which of issue 11's normkit functions this build has


def _probe_normkit():
    """feature -> None if this normkit build runs it on a tiny input, else why not."""
    f32 = np.float32
    x, r = np.ones((2, 8), f32), np.full((2, 8), 0.5, f32)
    y, s = np.empty((2, 8), f32), np.empty((2, 8), f32)
    g = np.ones((1, 32, 2, 2), f32)
    probes = {
        "add_rms_norm": lambda: normkit.add_rms_norm(x, r, (8,), None, RMS_EPS),
        "add_rms_norm out=": lambda: normkit.add_rms_norm(x, r, (8,), None, RMS_EPS, out=y, sum_out=s),
        "add_layer_norm": lambda: normkit.add_layer_norm(x, r, (8,), None, None, LN_EPS),
        "add_layer_norm out=": lambda: normkit.add_layer_norm(x, r, (8,), None, None, LN_EPS, out=y, sum_out=s),
        "group_norm(activation=)": lambda: normkit.group_norm(g, GROUPS, None, None, GN_EPS, activation="silu"),
        "group_norm(activation=) out=": lambda: normkit.group_norm(g, GROUPS, None, None, GN_EPS,
                                                                   activation="silu", out=np.empty_like(g)),
        "rms_norm(quantize=)": lambda: normkit.rms_norm(x, (8,), None, RMS_EPS, quantize="int8"),
        "rms_norm(quantize=) out=": lambda: normkit.rms_norm(x, (8,), None, RMS_EPS, quantize="int8",
                                                             out=np.empty((2, 8), np.int8)),
    }
    got = {}
    for name, call in probes.items():
        try:
            call()
            got[name] = None
        except Exception as exc:  # AttributeError / TypeError before issue 11, anything else: reported
            got[name] = f"{type(exc).__name__}: {_check.first_line(exc)[:120]}"
    return got


NK = _probe_normkit()
NK_FEATURE = {"add_rms_norm": "add_rms_norm", "add_layer_norm": "add_layer_norm",
              "group_norm_silu": "group_norm(activation=)", "rms_norm_int8": "rms_norm(quantize=)"}


# ---------------------------------------------------------------------------------------------
# data and float64 references


def silu64(a):
    a = np.asarray(a, dtype=np.float64)
    return a / (1.0 + np.exp(-a))


def rows_ref64(s64, w, b, op):
    """float64 LayerNorm / RMSNorm of the rows s64 (float64)."""
    w = w.astype(np.float64)
    if op == "add_layer_norm":
        mean = s64.mean(-1, keepdims=True)
        var = ((s64 - mean) ** 2).mean(-1, keepdims=True)
        return (s64 - mean) / np.sqrt(var + LN_EPS) * w + b.astype(np.float64)
    return s64 / np.sqrt((s64 * s64).mean(-1, keepdims=True) + RMS_EPS) * w


def quantize_ref64(y64):
    """float64 dynamic per-row int8 quantization: (q as float64, scales float64 per row)."""
    amax = np.abs(y64).max(-1, keepdims=True)
    scale = np.where(amax > 0, amax / QMAX, 1.0)
    return np.clip(np.rint(y64 / scale), -QMAX, QMAX), scale[..., 0]


def q_units(q):
    """int8 q in units of 1/127 (validation only): an error of one quantum is 1/127 whatever |q| is."""
    return np.asarray(q, dtype=np.float32) * np.float32(1.0 / QMAX)


class Case:
    def __init__(self, name):
        self.name = name
        self.op, shape, self.layout, self.dtype_name = CASES[name]
        self.shape = TINY[name] if ARGS.tiny else shape
        self.dtype = _libs.np_dtype(self.dtype_name)
        self.feature = NK_FEATURE[self.op]
        self.nk_missing = NK[self.feature]
        self.nk_out_missing = NK[self.feature + " out="]
        rng = np.random.default_rng(0)
        dims = "[" + ", ".join(map(str, self.shape)) + "]"
        if self.op == "group_norm_silu":
            n, c, hh, ww = self.shape
            self.c = c
            self.phys = (n, hh, ww, c) if self.layout == "NHWC" else self.shape
            self.label = f"GroupNorm+SiLU G={GROUPS} {dims} {self.layout} {self.dtype_name}"
            x32 = _data.random_channels(rng, self.phys, self.layout == "NHWC")[0]  # channel statistics differ
            self.x = _data.placed_array(x32, self.dtype)
            del x32
            self.w = rng.uniform(0.5, 1.5, c).astype(np.float32)
            self.b = (0.1 * rng.standard_normal(c)).astype(np.float32)
            self.y_out = _data.placed_empty(self.phys, self.dtype, ARGS.out_offset)
            self.bytes = 2 * self.x.nbytes  # x read + y written
            return
        rows, n = self.shape
        self.n = n
        self.phys = self.shape
        kind = {"add_rms_norm": "add_rms_norm", "add_layer_norm": "add_layer_norm",
                "rms_norm_int8": "rms_norm int8 (dynamic per-row scales)"}[self.op]
        self.label = f"{kind} {dims} {self.dtype_name}"
        self.x = _data.placed_array(_data.random_rows(rng, self.shape), self.dtype)
        self.w = rng.uniform(0.5, 1.5, n).astype(np.float32).astype(self.dtype)
        self.b = (0.1 * rng.standard_normal(n)).astype(np.float32).astype(self.dtype) \
            if self.op == "add_layer_norm" else None
        if self.op == "rms_norm_int8":
            self.q_out = _data.placed_empty(self.shape, np.int8, ARGS.out_offset)
            self.bytes = self.x.nbytes + self.q_out.nbytes  # 4 bytes read + 1 written per element
            self.limit_nbytes = self.bytes // 2
            return
        self.r = _data.placed_array(rng.standard_normal(self.shape, dtype=np.float32), self.dtype)
        self.y_out = _data.placed_empty(self.shape, self.dtype, ARGS.out_offset)
        self.s_out = _data.placed_empty(self.shape, self.dtype, ARGS.out_offset)
        self.bytes = 4 * self.x.nbytes  # x and residual read, y and s written
        self.limit_nbytes = 2 * self.x.nbytes

    def sample_index(self):
        if self.op == "group_norm_silu":
            return _data.sampled_batch(self.shape[0])
        return _data.sampled_rows(self.shape[0])

    def reference(self, idx):
        """The float64 reference validate_impls takes, and the tolerance (per output element)."""
        tol = _check.tolerance(self.dtype)
        if self.op == "group_norm_silu":
            xs = self.x[idx].astype(np.float64)
            if self.layout == "NHWC":
                xs = xs.transpose(0, 3, 1, 2)
            k = xs.shape[0]
            g = xs.reshape(k, GROUPS, -1)
            mean = g.mean(axis=2, keepdims=True)
            var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
            y = ((g - mean) / np.sqrt(var + GN_EPS)).reshape(xs.shape)
            y = silu64(y * self.w[None, :, None, None] + self.b[None, :, None, None])
            if self.layout == "NHWC":
                y = y.transpose(0, 2, 3, 1)
            return y, tol
        if self.op == "rms_norm_int8":
            q, _ = quantize_ref64(rows_ref64(self.x[idx].astype(np.float64), self.w, None, "rms_norm"))
            scales = np.empty(self.shape[0])
            step = max(1, (1 << 22) // self.n)
            for i in range(0, self.shape[0], step):  # every row's scale, in float64 chunks
                scales[i:i + step] = quantize_ref64(
                    rows_ref64(self.x[i:i + step].astype(np.float64), self.w, None, "rms_norm"))[1]
            # q in units of 1/127: one quantum off passes, two fail; scales to float32 accuracy
            return (q / QMAX, scales), (1.01 / QMAX, tol)
        s = np.add(self.x, self.r)  # the sum as stored in x's dtype
        y = rows_ref64(s[idx].astype(np.float64), self.w, self.b, self.op)
        return (y, s), (tol, tol)


# ---------------------------------------------------------------------------------------------
# implementations


def normkit_impls(c):
    """normkit's fused call, fresh and out= (those this build has)."""
    if c.nk_missing:
        return []
    x, w, b = c.x, c.w, c.b
    if c.op == "group_norm_silu":
        y = c.y_out
        fresh = lambda: normkit.group_norm(x, GROUPS, w, b, GN_EPS, layout=c.layout, activation="silu")  # noqa: E731
        into = lambda: normkit.group_norm(x, GROUPS, w, b, GN_EPS, layout=c.layout, activation="silu",  # noqa: E731
                                          out=y)
        impls = [Impl("normkit", fresh, fresh, "normkit")]
        if not c.nk_out_missing:
            impls.append(Impl("normkit out=", into, lambda: (into(), y)[1], "normkit"))
        return impls
    n = c.n
    if c.op == "rms_norm_int8":
        q = c.q_out

        def fresh():
            return normkit.rms_norm(x, (n,), w, RMS_EPS, quantize="int8")

        def into():
            return normkit.rms_norm(x, (n,), w, RMS_EPS, quantize="int8", out=q)

        def out_of(call):
            def f():
                qq, scales = call()[:2]
                return q_units(qq), scales
            return f
        impls = [Impl("normkit", fresh, out_of(fresh), "normkit")]
        if not c.nk_out_missing:
            impls.append(Impl("normkit out=", into, out_of(into), "normkit"))
        return impls
    r, y, s = c.r, c.y_out, c.s_out
    if c.op == "add_rms_norm":
        fresh = lambda: normkit.add_rms_norm(x, r, (n,), w, RMS_EPS)  # noqa: E731
        into = lambda: normkit.add_rms_norm(x, r, (n,), w, RMS_EPS, out=y, sum_out=s)  # noqa: E731
    else:
        fresh = lambda: normkit.add_layer_norm(x, r, (n,), w, b, LN_EPS)  # noqa: E731
        into = lambda: normkit.add_layer_norm(x, r, (n,), w, b, LN_EPS, out=y, sum_out=s)  # noqa: E731
    impls = [Impl("normkit", fresh, lambda: tuple(fresh()[:2]), "normkit")]
    if not c.nk_out_missing:
        impls.append(Impl("normkit out=", into, lambda: (into(), (y, s))[1], "normkit"))
    return impls


def unfused_impls(c):
    """The unfused normkit forms: plain group_norm (the SiLU target's basis), NumPy add + normkit norm."""
    x, w, b = c.x, c.w, c.b
    if c.op == "group_norm_silu":
        y = c.y_out
        plain = lambda: normkit.group_norm(x, GROUPS, w, b, GN_EPS, layout=c.layout)  # noqa: E731
        into = lambda: normkit.group_norm(x, GROUPS, w, b, GN_EPS, layout=c.layout, out=y)  # noqa: E731
        # output for validation only: SiLU applied in float64 to plain group_norm's y
        return [Impl("nk plain gn", plain, lambda: silu64(plain()), "normkit"),
                Impl("nk plain gn out=", into, lambda: (into(), silu64(y))[1], "normkit")]
    if c.op not in ("add_rms_norm", "add_layer_norm") or c.dtype != np.float32 or "numpy" not in ARGS.libs:
        return []
    r, y, s, n = c.r, c.y_out, c.s_out, c.n
    if c.op == "add_rms_norm":
        name = "np.add+nk.rms"

        def fresh():
            t = np.add(x, r)
            return normkit.rms_norm(t, (n,), w, RMS_EPS), t

        def into():
            np.add(x, r, out=s)
            normkit.rms_norm(s, (n,), w, RMS_EPS, out=y)
    else:
        name = "np.add+nk.ln"

        def fresh():
            t = np.add(x, r)
            return normkit.layer_norm(t, (n,), w, b, LN_EPS), t

        def into():
            np.add(x, r, out=s)
            normkit.layer_norm(s, (n,), w, b, LN_EPS, out=y)
    return [Impl(name, fresh, fresh, "numpy"), Impl(name + " out=", into, lambda: (into(), (y, s))[1], "numpy")]


def torch_impls(c, notes):
    tw, tb = _peers.to_torch(c.w), _peers.to_torch(c.b)
    if c.op == "group_norm_silu":
        cl = c.layout == "NHWC"
        tx = _peers.to_torch_nchw(c.x, cl)
        f = lambda: F.silu(F.group_norm(tx, GROUPS, tw, tb, GN_EPS), inplace=True)  # noqa: E731
        return [Impl("torch", f, lambda: _peers.from_torch_nchw(f(), cl, notes, "group_norm output"), "torch")]
    tx, n = _peers.to_torch(c.x), c.n
    if c.op == "rms_norm_int8":
        inf = float("inf")

        def f():
            y = F.rms_norm(tx, (n,), tw, RMS_EPS)
            amax = torch.linalg.vector_norm(y, inf, dim=-1, keepdim=True)
            scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
            return y.div_(scale).round_().clamp_(-QMAX, QMAX).to(torch.int8), scale

        def output():
            q, scale = f()
            return q_units(q.numpy()), scale.numpy().reshape(-1)
        return [Impl("torch", f, output, "torch")]
    tr = _peers.to_torch(c.r)
    if c.op == "add_rms_norm":
        def f():
            s = torch.add(tx, tr)
            return F.rms_norm(s, (n,), tw, RMS_EPS), s
    else:
        def f():
            s = torch.add(tx, tr)
            return F.layer_norm(s, (n,), tw, tb, LN_EPS), s
    return [Impl("torch", f, lambda: tuple(_peers.from_torch(t) for t in f()), "torch")]


# ONNX Runtime ----------------------------------------------------------------------------------

ORT_OPS = {"add_rms_norm": "SkipSimplifiedLayerNormalization", "add_layer_norm": "SkipLayerNormalization"}


def ort_model(c):
    """One com.microsoft Skip*Normalization node: inputs X, R (skip), W (gamma) [, B (beta)]; outputs
    Y (output) and S (input_skip_bias_sum; mean and inv_std_var not requested)."""
    op = ORT_OPS[c.op]
    et = _peers.ort_elem_type(c.dtype)
    inits = [_peers.ort_initializer("W", c.w)] + ([_peers.ort_initializer("B", c.b)] if c.b is not None else [])
    node = _libs.helper.make_node(op, ["X", "R"] + [t.name for t in inits], ["Y", "", "", "S"],
                                  domain="com.microsoft", epsilon=LN_EPS if c.op == "add_layer_norm" else RMS_EPS)
    vi = lambda name: _libs.helper.make_tensor_value_info(name, et, ["N", c.n])  # noqa: E731
    return op, _peers.ort_model_bytes(node, [vi("X"), vi("R")], [vi("Y"), vi("S")], inits, 17,
                                      domains=[("com.microsoft", 1)])


def ort_prepare(c):
    """(op, model bytes) if ORT builds and runs a session for c, and a line for the log; (None,
    reason) otherwise. Correctness is checked with every other implementation."""
    if c.op not in ORT_OPS:
        return None, None
    try:
        op, model = ort_model(c)
        sess, nodes = _peers.ort_optimized_session(model)
        sess.run(["Y", "S"], {"X": c.x[:2], "R": c.r[:2]})
    except Exception as exc:
        return None, f"onnxruntime: skipped ({_check.first_line(exc)[:200]})"
    return (op, model), (f"onnxruntime: com.microsoft {op}, graph after optimization: {', '.join(nodes)}")


# ---------------------------------------------------------------------------------------------
# running


def strict_check(c, impls, idx, ref, tol):
    """--check: every implementation runs and agrees with the float64 reference (validate_impls) and
    with normkit on the whole arrays (within twice the tolerance, as both are within it of the
    reference); AssertionError naming the disagreement otherwise."""
    problems = []
    good, checks = _check.validate_impls(impls, idx, ref, tol, problems)
    nk = next((im for im in good if im.name == "normkit"), None)
    if nk is not None:
        tols = tol if isinstance(tol, tuple) else (tol,)
        a = nk.output()
        a = tuple(np.array(e, copy=True) for e in a) if isinstance(a, tuple) else (np.array(a, copy=True),)
        for im in good:
            if im is nk:
                continue
            b = im.output()
            b = b if isinstance(b, tuple) else (b,)
            for k, (ea, eb, t) in enumerate(zip(a, b, tols)):
                err = _check.max_rel_err_chunked(np.asarray(eb), ea)
                if not err <= 2 * t:
                    problems.append(f"{im.name}: output {k} differs from normkit's on the whole array "
                                    f"(max rel err {err:.2e}, allowed {2 * t:.1e})")
            del b
        del a
    print(f"   --check {c.name}: " + ", ".join(checks))
    assert not problems, f"--check failed on {c.name}: " + "; ".join(problems)
    print(f"   --check {c.name}: passed, {len(good)} implementations agree"
          + (f" (normkit not checked: {c.feature} not in this build)" if nk is None else ""))


def run_case(c, limit, log, results, notes):
    log(_report.case_title(c) + f"  (counted bytes {_report.mib(c.bytes):.2f} MiB)")
    idx = c.sample_index()
    ref, tol = c.reference(idx)
    c.tol = tol
    if c.nk_missing:
        msg = f"normkit {c.feature}: not in this build ({c.nk_missing}); normkit not timed"
        log(msg)
        notes.append(f"{c.name}: {msg}")
    elif c.nk_out_missing:
        msg = f"normkit {c.feature} with out=: refused by this build ({c.nk_out_missing}); out= not timed"
        log(msg)
        notes.append(f"{c.name}: {msg}")

    ort_info = None
    if ort is not None:
        ort_info, detail = ort_prepare(c)
        if detail:
            log(detail)
            notes.append(f"{c.name}: {detail}")

    def make_impls(t, case_notes):
        impls = normkit_impls(c) + unfused_impls(c)
        if torch is not None:
            impls += torch_impls(c, case_notes)
        if ort_info is not None:
            try:
                impls += _peers.ort_impls(ort_info[1], t, c.x, c.y_out, extra_outputs=[("S", c.s_out)],
                                          extra_inputs=[("R", c.r)], all_outputs=True)
            except Exception as exc:
                case_notes.append(f"onnxruntime skipped at {t} threads: {exc}")
        return impls

    _libs.set_threads(ARGS.threads[0])
    first = make_impls(ARGS.threads[0], [])
    if not first:
        log("nothing to time (normkit's function missing and no peer installed)")
        notes.append(f"{c.name}: not timed: nothing to time")
        return
    if ARGS.check:
        strict_check(c, first, idx, ref, tol)
    del first

    what = {"group_norm_silu": "max rel err vs float64 reference on samples "
                               + ",".join(map(str, idx)) + " | vs normkit, whole array",
            "rms_norm_int8": "q in quanta/127 on sampled rows / scales on all rows vs float64 | vs normkit",
            }.get(c.op, "y on sampled rows / s whole vs float64 (from s as stored) | vs normkit")
    _run.run_threads(c, ARGS, limit, log, results, notes, make_impls, idx, ref, what)


def header_lines(limit_helper_ok):
    have = [k for k, v in NK.items() if v is None]
    lacking = [f"{k} ({v})" for k, v in NK.items() if v is not None]
    extra = [
        ("normkit fused functions", "present: " + (", ".join(have) or "none")
         + ("; MISSING: " + "; ".join(lacking) if lacking else "")),
        ("bytes", "add_*: x and residual read, y and s written (4 times x's bytes); group_norm: x read, "
                  "y written; rms_norm int8: 4 bytes read + 1 written per element; the limit is a copy "
                  "moving as many bytes (half read, half written)"),
        ("parameters", f"eps: LayerNorm {LN_EPS:g}, RMSNorm {RMS_EPS:g}, GroupNorm {GN_EPS:g} ({GROUPS} groups); "
                       "weight (and bias) in x's dtype for the row norms, float32 for GroupNorm; no "
                       "residual_bias; int8 dynamic per-row scales = max|y| / 127"),
    ]
    if ARGS.tiny:
        extra.insert(0, ("TINY SHAPES", "--tiny: a smoke test of the script; the numbers mean nothing"))
    return _report.header_lines(
        ARGS, limit_helper_ok,
        "normkit.add_rms_norm/add_layer_norm (fresh; out= + sum_out=), group_norm(activation='silu') "
        "and rms_norm(quantize='int8') (fresh; out=); unfused normkit: group_norm without activation "
        "(fresh; out=), NumPy np.add then normkit.rms_norm/layer_norm (fresh; np.add(out=) + out=); "
        "PyTorch (fresh, torch.from_numpy views under inference_mode): torch.add then F.rms_norm/"
        "F.layer_norm, F.silu(F.group_norm(x), inplace=True) (NHWC: channels_last view), the int8 "
        "composite rms_norm + vector_norm(inf) + div_/round_/clamp_/to(int8); ONNX Runtime: one "
        "com.microsoft SkipSimplifiedLayerNormalization / SkipLayerNormalization node (gamma/beta "
        "initializers; outputs output and input_skip_bias_sum), session.run() (fresh) and "
        "run_with_iobinding into preallocated y and s (out=)",
        extra=extra, limit_what="as many bytes as the case moves")


def target_rows(results):
    """The issue's targets: harness rows (speedups, fractions; "-" for a peer or normkit not timed)
    and the GroupNorm + SiLU time relative to plain group_norm."""
    by = {(r["case"], r["threads"], r["impl"]): r for r in results}
    t = 2 if 2 in ARGS.threads else max(ARGS.threads)
    rows = []
    for case, *rest in _report.target_rows(results, ARGS, TARGETS, FRACTION_TARGETS):
        rows.append((case, *rest) if rest[2] != "peer not timed" else (case, rest[0], rest[1], "-", "-"))
    for case in ARGS.cases:  # normkit not timed: _report.target_rows leaves the case out
        if (case, t, "normkit") not in by:
            wanted = [f">= {need:g}x {peer}" for peer, need in TARGETS.get(case, [])]
            if case in FRACTION_TARGETS:
                wanted.append(f"fraction of limit >= {FRACTION_TARGETS[case]:g}")
            rows += [(case, t, w, "- (normkit not timed)", "-") for w in wanted]
    for case, (basis, most) in PLAIN_RATIO_TARGETS.items():
        if case not in ARGS.cases:
            continue
        nk, nko = by.get((case, t, "normkit")), by.get((case, t, "normkit out="))
        p, po = by.get((case, t, basis)), by.get((case, t, basis + " out="))
        what = f"<= {most:g}x the time of {basis}"
        if not nk or not p:
            row = (case, t, what, "-", "-")
        else:
            a = nk["median_s"] / p["median_s"]
            b = nko["median_s"] / po["median_s"] if nko and po else None
            row = (case, t, what, f"{a:.2f}x {'met' if a <= most else 'MISSED'}",
                   f"{b:.2f}x {'met' if b <= most else 'MISSED'}" if b is not None else "")
        last = max([i for i, r in enumerate(rows) if r[0] == case], default=len(rows) - 1)
        rows.insert(last + 1, row)
    return rows


LEGEND = ("Fresh output: new arrays per call. `out=`: into preallocated arrays (normkit out= and sum_out=, "
          "np.add(out=) + out=, ORT io_binding; PyTorch has no out= here). GB/s counts the bytes the case "
          "moves (add_*: x, residual read, y, s written; int8: 4 read + 1 written per element). frac = "
          "bandwidth-limit time / time. x nk = this row's time / normkit's fused call (normkit's speedup "
          "over it); x nk out= the same against normkit with out=.")


def main():
    _run.main(ARGS, "normkit fused benchmark", "add + LayerNorm/RMSNorm, GroupNorm + SiLU, RMSNorm + int8", 11,
              header_lines, Case, run_case, target_rows, skip_failed_cases=True, report_total_time=True,
              legend=LEGEND)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""normkit BatchNorm / GroupNorm / InstanceNorm forward against PyTorch and ONNX Runtime, in one process.

    python bench/python/bench_channels.py                  # full run (2-3 minutes on 2 cores)
    python bench/python/bench_channels.py --quick          # smoke test (about 1.5 minutes)
    python bench/python/bench_channels.py --threads 2 --cases 'bn_*' --markdown /tmp/channels.md

Cases (issue 3): BatchNorm2d [32,64,56,56] inference and training in NCHW and NHWC, BatchNorm1d
[4096,1024] inference (layout NC), GroupNorm G=32 [8,320,64,64] NCHW and NHWC, InstanceNorm2d
[16,64,128,128] NCHW, and float16/bfloat16 versions of the BatchNorm2d and GroupNorm cases. Shapes are
written logically as [N, C, spatial...]; an NHWC case stores x as (N, H, W, C).

The timing machinery is the rows benchmark's (bench_rows.py, _harness.py): per case and thread count,
every implementation is timed round-robin (one sample of each per repetition, rotating who goes
first), the figure is the median; the bandwidth limit is the fastest copy of an array of x's size
(np.copyto / glibc memcpy on 1 and 2 threads, and with forced non-temporal stores in a helper process)
measured in the same rounds. See bench_rows.py for the thread-fairness (--spin, --gap-ms, --prime),
allocator (--hugepages) and placement (--out-offset) measurements behind the defaults used here.

Each implementation is checked once before it is timed: against a float64 reference on a few whole
samples of the batch (with BatchNorm training's statistics taken over the whole batch in float64),
and against normkit on the whole array; in training, normkit's and PyTorch's running-statistics
update after one call is checked against the float64 batch statistics too. One that disagrees is
reported and left out.

Columns: median time per call; effective GB/s = (bytes of x read + bytes of y written) / time; "frac" =
limit time / time; "x nk" = that row's time / normkit's time (normkit's speedup over the row) with a
fresh output per call; "x nk out=" the same against normkit writing into a preallocated out=.

Bytes: every case counts x read once and y written once, as the rows benchmark does. BatchNorm training
needs x's statistics before it can write y, so it reads x twice unless x stays in cache (x is 24.5 MiB
in float32 here, x + y 49 MiB); its limit is still the 1-read + 1-write copy.

Running statistics (BatchNorm): float32 running_mean/running_var for every dtype. Every implementation
has its own copies (training updates them in place); they start near the data's true channel
statistics and, with momentum 0.1, converge to the batch statistics and stay there, so repeated calls
do not drift. ONNX Runtime returns updated statistics as new outputs (ONNX semantics: momentum 0.9
means PyTorch's 0.1; the running variance is the biased one), so only its y is checked.

ONNX Runtime: BatchNormalization (opset 15; training_mode=1 for training), GroupNormalization (opset 21;
ORT has no CPU kernel, it expands the ONNX function into a graph of elementwise/reduce ops) and
InstanceNormalization (opset 17), channels-first only: ORT's CPU execution provider has no NHWC
BatchNormalization or GroupNormalization (the ONNX ops are defined on channels-first tensors; a
Transpose-wrapped graph would time the transposes), so the NHWC cases have no ORT row.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import os
import platform
import shlex
import sys
import time
from collections import Counter

# ---------------------------------------------------------------------------------------------
# cases

BN2D = (32, 64, 56, 56)
BN1D = (4096, 1024)
GN = (8, 320, 64, 64)
IN2D = (16, 64, 128, 128)
GROUPS = 32
MOMENTUM = 0.1
EPS = 1e-5

CASES = {
    # name: (op, logical shape [N, C, spatial...], layout, training, dtype)
    "bn_inf_nchw": ("batch_norm", BN2D, "NCHW", False, "float32"),
    "bn_inf_nhwc": ("batch_norm", BN2D, "NHWC", False, "float32"),
    "bn_train_nchw": ("batch_norm", BN2D, "NCHW", True, "float32"),
    "bn_train_nhwc": ("batch_norm", BN2D, "NHWC", True, "float32"),
    "bn1d_inf": ("batch_norm", BN1D, "NC", False, "float32"),
    "gn_nchw": ("group_norm", GN, "NCHW", True, "float32"),
    "gn_nhwc": ("group_norm", GN, "NHWC", True, "float32"),
    "in_nchw": ("instance_norm", IN2D, "NCHW", True, "float32"),
}
for _dt, _suffix in (("float16", "f16"), ("bfloat16", "bf16")):
    for _base in ("bn_inf_nchw", "bn_inf_nhwc", "bn_train_nchw", "bn_train_nhwc", "gn_nchw", "gn_nhwc"):
        CASES[f"{_base}_{_suffix}"] = CASES[_base][:4] + (_dt,)

# Targets from the issue (2 threads, normkit speedup over the peer, fresh output vs fresh output).
TARGETS = {
    "bn_inf_nchw": [("torch", 1.2)],
    "bn_inf_nhwc": [("torch", 1.2)],
    "bn1d_inf": [("torch", 1.2)],
    "bn_train_nchw": [("torch", 2.5)],
    "bn_train_nhwc": [("torch", 1.8)],
    "gn_nchw": [("torch", 2.0)],
    "gn_nhwc": [("torch", 2.0)],
    "in_nchw": [("torch", 4.0)],
}
for _name in CASES:
    if _name.endswith(("_f16", "_bf16")):
        TARGETS[_name] = [("torch", 1.5)]
FRACTION_TARGETS = {"bn_inf_nchw": 0.85, "bn_inf_nhwc": 0.85, "bn1d_inf": 0.85}

LIBS = ("normkit", "torch", "onnxruntime")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions, short samples (smoke test)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--cases", default="all",
                    help="comma-separated case names or globs (default all): " + ", ".join(CASES))
    ap.add_argument("--libs", default=",".join(LIBS),
                    help="comma-separated implementations to time (default all): " + ", ".join(LIBS)
                    + " (normkit is always timed; the others are skipped if not installed)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the results as markdown to FILE")
    ap.add_argument("--reps", type=int, help="samples per implementation (default 11, which keeps the full run within about 4 minutes on a busy 2-core machine; 5 with --quick)")
    ap.add_argument("--warmup", type=int, help="warm-up calls before calibration (default 3; 1 with --quick)")
    ap.add_argument("--sample-ms", type=float,
                    help="small problems are batched so one sample lasts this long (default 5; 2 with --quick)")
    ap.add_argument("--spin", choices=("bounded", "passive", "default"), default="bounded",
                    help="idle-thread policy, applied to all libraries alike. bounded (default): libgomp "
                         "default (spin ~ms then sleep), ORT spin_duration_us=5000, and --gap-ms sleep "
                         "between samples at >1 thread; passive: OMP_WAIT_POLICY=PASSIVE and ORT "
                         "allow_spinning=0, no gap; default: every library's own defaults, no gap "
                         "(shows the interference)")
    ap.add_argument("--gap-ms", type=float,
                    help="sleep between two samples at >1 thread (default 20 for --spin bounded, else 0)")
    ap.add_argument("--prime", choices=("auto", "always", "never"), default="auto",
                    help="make one untimed call of the same implementation right before each sample, so that "
                         "it starts with that library's threads awake, as in a loop of calls (auto, the "
                         "default: at >1 thread, where threads sleep during the gaps)")
    ap.add_argument("--hugepages", choices=("on", "off", "lib-default"), default="on",
                    help="transparent huge pages for large fresh outputs. on (default): for every "
                         "library (NumPy's madvise, as NumPy does by default, and PyTorch's "
                         "THP_MEM_ALLOC_ENABLE=1); off: for none; lib-default: each library's own "
                         "default (NumPy on, PyTorch off)")
    ap.add_argument("--out-offset", type=int, default=0, metavar="BYTES",
                    help="x starts on a 2 MiB boundary; every preallocated output (out=, ORT io_binding, "
                         "copy destination) starts BYTES after one (default 0)")
    ap.add_argument("--no-streaming-limit", action="store_true",
                    help="do not start the helper process that measures memcpy with non-temporal stores")
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not args.threads or min(args.threads) < 1:
        ap.error("--threads: positive integers, e.g. 1,2")
    names = []
    for pat in args.cases.split(","):
        pat = pat.strip()
        if pat in ("all", ""):
            matched = list(CASES)
        else:
            matched = [c for c in CASES if fnmatch.fnmatchcase(c, pat)]
        if not matched:
            ap.error(f"--cases: {pat!r} matches none of: {', '.join(CASES)}")
        names += [m for m in matched if m not in names]
    args.cases = names
    args.libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    bad = [s for s in args.libs if s not in LIBS]
    if bad:
        ap.error(f"--libs: unknown {bad}; choose from {', '.join(LIBS)}")
    if "normkit" not in args.libs:
        args.libs.insert(0, "normkit")
    if args.reps is None:
        args.reps = 5 if args.quick else 11
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.sample_ms is None:
        args.sample_ms = 2.0 if args.quick else 5.0
    if args.gap_ms is None:
        args.gap_ms = 20.0 if args.spin == "bounded" else 0.0
    return args


def configure_environment(args):
    """Set what the libraries read when they load. Must run before numpy/normkit/torch import.

    A variable the user already exported is left alone (and shown in the header)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # NumPy's BLAS is not used; keep its pool away
    if args.spin == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.hugepages == "on":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    elif args.hugepages == "off":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")


ARGS = parse_args()
configure_environment(ARGS)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import normkit  # noqa: E402  (first: it brings the libgomp it was built with; PyTorch shares it)

try:
    import ml_dtypes  # noqa: E402

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    ml_dtypes = None
    BF16 = None

torch = ort = onnx = None
SKIPPED_LIBS = {}
if "torch" in ARGS.libs:
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402
    except ImportError as exc:
        SKIPPED_LIBS["torch"] = f"not installed ({exc})"
if "onnxruntime" in ARGS.libs:
    try:
        import onnx  # noqa: E402
        import onnxruntime as ort  # noqa: E402
        from onnx import TensorProto, helper, numpy_helper  # noqa: E402
    except ImportError as exc:
        SKIPPED_LIBS["onnxruntime"] = f"not installed ({exc})"

if ARGS.hugepages == "off":
    np._core.multiarray._set_madvise_hugepage(False) if hasattr(np, "_core") else \
        np.core.multiarray._set_madvise_hugepage(False)

ORT_SPIN = {
    "bounded": {"session.intra_op.spin_duration_us": "5000"},
    "passive": {"session.intra_op.allow_spinning": "0"},
    "default": {},
}[ARGS.spin]

ORT_NHWC_NOTE = ("onnxruntime: not timed in NHWC: its CPU execution provider has no channels-last "
                 "BatchNormalization/GroupNormalization/InstanceNormalization (the ONNX ops are channels-first)")


# ---------------------------------------------------------------------------------------------
# helpers


def np_dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            raise RuntimeError("bfloat16 cases need ml_dtypes")
        return BF16
    return np.dtype(name)


def eps_of(dtype):
    if BF16 is not None and np.dtype(dtype) == BF16:
        return float(ml_dtypes.finfo(BF16).eps)
    return float(np.finfo(dtype).eps)


def mib(n):
    return n / 2**20


def channels_last(layout):
    return layout in ("NHWC", "NLC", "NDHWC")


def as_ncs(a, layout):
    """View of a batch (physical layout) as (N, C, S); channels-last gives a transposed view."""
    if channels_last(layout):
        return a.reshape(a.shape[0], -1, a.shape[-1]).transpose(0, 2, 1)
    return a.reshape(a.shape[0], a.shape[1], -1)


def from_ncs(a_ncs, layout, shape):
    """Inverse of as_ncs: an (N, C, S) array back to the physical shape (a copy for channels-last)."""
    if channels_last(layout):
        return np.ascontiguousarray(a_ncs.transpose(0, 2, 1)).reshape(shape)
    return a_ncs.reshape(shape)


class Case:
    def __init__(self, name):
        self.name = name
        self.op, self.shape, self.layout, self.training, self.dtype_name = CASES[name]
        self.dtype = np_dtype(self.dtype_name)
        self.is16 = self.dtype != np.float32
        n, c = self.shape[:2]
        spatial = self.shape[2:]
        self.n, self.c, self.s = n, c, int(np.prod(spatial)) if spatial else 1
        self.phys = (n,) + spatial + (c,) if channels_last(self.layout) else self.shape
        dims = "[" + ",".join(map(str, self.shape)) + "]"
        if self.op == "batch_norm":
            kind = "BatchNorm1d" if not spatial else f"BatchNorm{len(spatial)}d"
            self.label = f"{kind} {'train' if self.training else 'inference'} {dims} {self.layout} {self.dtype_name}"
        elif self.op == "group_norm":
            self.label = f"GroupNorm G={GROUPS} {dims} {self.layout} {self.dtype_name}"
        else:
            self.label = f"InstanceNorm{len(spatial)}d {dims} {self.layout} {self.dtype_name}"
        rng = np.random.default_rng(0)
        # per-channel scale and shift, so that the channel statistics differ
        self.scale_c = rng.uniform(0.5, 2.0, c).astype(np.float32)
        self.shift_c = rng.uniform(-1.0, 1.0, c).astype(np.float32)
        bshape = (1,) * (len(self.phys) - 1) + (c,) if channels_last(self.layout) else \
            (1, c) + (1,) * (len(self.phys) - 2)
        x32 = rng.standard_normal(self.phys, dtype=np.float32)
        x32 *= self.scale_c.reshape(bshape)
        x32 += self.shift_c.reshape(bshape)
        self.x = H.placed_empty(self.phys, self.dtype, 0, fill=None)
        self.x[...] = x32 if self.dtype == np.float32 else x32.astype(self.dtype)
        del x32
        # float32 affine parameters and running statistics for every dtype (mixed types for 16-bit x)
        self.w = rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.b = (0.1 * rng.standard_normal(c)).astype(np.float32)
        self.rm0 = (self.shift_c + 0.05 * rng.standard_normal(c)).astype(np.float32)
        self.rv0 = (self.scale_c.astype(np.float64) ** 2 * rng.uniform(0.9, 1.1, c)).astype(np.float32)
        self.bytes = 2 * self.x.nbytes  # x read + y written
        self._batch_stats = None

    # ---- float64 reference

    def batch_stats(self):
        """BatchNorm training: float64 (mean, biased var) per channel over the whole batch (two passes)."""
        if self._batch_stats is None:
            step = max(1, (4 << 20) // (self.c * self.s))
            tot = np.zeros(self.c)
            for i in range(0, self.n, step):
                tot += as_ncs(self.x[i:i + step], self.layout).astype(np.float64).sum(axis=(0, 2))
            mean = tot / (self.n * self.s)
            sq = np.zeros(self.c)
            for i in range(0, self.n, step):
                d = as_ncs(self.x[i:i + step], self.layout).astype(np.float64) - mean[None, :, None]
                sq += np.einsum("ncs,ncs->c", d, d)
            self._batch_stats = (mean, sq / (self.n * self.s))
        return self._batch_stats

    def reference(self, idx):
        """float64 y for the samples idx of the batch, in x's physical layout."""
        xs = self.x[idx]
        x = as_ncs(xs, self.layout).astype(np.float64)  # (k, C, S)
        k = x.shape[0]
        if self.op == "batch_norm":
            if self.training:
                mean, var = self.batch_stats()
            else:
                mean, var = self.rm0.astype(np.float64), self.rv0.astype(np.float64)
            mean, var = mean[None, :, None], var[None, :, None]
        elif self.op == "instance_norm":
            mean = x.mean(axis=2, keepdims=True)
            var = ((x - mean) ** 2).mean(axis=2, keepdims=True)
        else:
            g = x.reshape(k, GROUPS, -1)
            mean = g.mean(axis=2, keepdims=True)
            var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
            mean = np.broadcast_to(mean, g.shape).reshape(x.shape)
            var = np.broadcast_to(var, g.shape).reshape(x.shape)
        y = (x - mean) / np.sqrt(var + EPS) * self.w[None, :, None] + self.b[None, :, None]
        return from_ncs(y, self.layout, xs.shape)

    def expected_running(self):
        mean, var = self.batch_stats()
        m = self.n * self.s
        return ((1 - MOMENTUM) * self.rm0 + MOMENTUM * mean,
                (1 - MOMENTUM) * self.rv0 + MOMENTUM * var * m / (m - 1))


def max_rel_err(a, ref):
    a = np.asarray(a).astype(np.float64) if a.dtype != np.float64 else a
    ref = np.asarray(ref).astype(np.float64) if ref.dtype != np.float64 else ref
    return float(np.max(np.abs(a - ref) / np.maximum(1.0, np.abs(ref)))) if a.size else 0.0


def max_rel_err_chunked(a, ref, chunk=1 << 22):
    a = a.reshape(-1)
    ref = ref.reshape(-1)
    worst = 0.0
    for i in range(0, a.size, chunk):
        worst = max(worst, max_rel_err(a[i:i + chunk].astype(np.float32), ref[i:i + chunk].astype(np.float32)))
    return worst


def tolerance(dtype):
    # fp32: accumulation order differs between libraries; 16-bit: a couple of output roundings.
    return 1000 * eps_of(np.float32) if dtype == np.float32 else 8 * eps_of(dtype)


RUNNING_TOL = 1e-4  # relative, running statistics after one training step (float32 accumulation)


# ---------------------------------------------------------------------------------------------
# implementations


class Impl:
    """An implementation: a call to time, how to get its output once for validation, and (training)
    how to reset its running statistics, make one call and return them (None if not checked)."""

    def __init__(self, name, fn, output, lib, running=None):
        self.name, self.fn, self.output, self.lib, self.running = name, fn, output, lib, running


def out_buffer(c):
    return H.placed_empty(c.phys, c.dtype, ARGS.out_offset)


def running_check(call, rm, rv, c):
    """A closure: reset the running statistics rm/rv (arrays updated in place) to c's initial ones,
    make one call, return copies of them."""
    def f():
        rm[...] = c.rm0
        rv[...] = c.rv0
        call()
        return np.array(rm, copy=True), np.array(rv, copy=True)
    return f


def normkit_impls(c):
    x, w, b, L = c.x, c.w, c.b, c.layout
    y = out_buffer(c)
    impls = []
    for name, into in (("normkit", None), ("normkit out=", y)):
        if c.op == "batch_norm":
            rm, rv = c.rm0.copy(), c.rv0.copy()  # each implementation its own running statistics
            tr = c.training

            def f(rm=rm, rv=rv, into=into):
                return normkit.batch_norm(x, rm, rv, w, b, training=tr, momentum=MOMENTUM, eps=EPS,
                                          layout=L, out=into)
            running = running_check(f, rm, rv, c) if tr else None
        elif c.op == "group_norm":
            running = None

            def f(into=into):
                return normkit.group_norm(x, GROUPS, w, b, EPS, layout=L, out=into)
        else:
            running = None

            def f(into=into):
                return normkit.instance_norm(x, None, None, w, b, eps=EPS, layout=L, out=into)
        impls.append(Impl(name, f, f, "normkit", running))
    return impls


def to_torch(a):
    if a is None:
        return None
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def from_torch(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def torch_impls(c, notes):
    tx = to_torch(c.x)
    if channels_last(c.layout):
        tx = tx.permute(0, 3, 1, 2)  # a channels_last-strided NCHW view of the NHWC array
        assert tx.is_contiguous(memory_format=torch.channels_last)
    tw, tb = to_torch(c.w), to_torch(c.b)
    running = None
    if c.op == "batch_norm":
        rm, rv = c.rm0.copy(), c.rv0.copy()
        trm, trv = torch.from_numpy(rm), torch.from_numpy(rv)
        tr = c.training
        f = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=tr, momentum=MOMENTUM, eps=EPS)  # noqa: E731
        if tr:
            running = running_check(f, rm, rv, c)
    elif c.op == "group_norm":
        f = lambda: F.group_norm(tx, GROUPS, tw, tb, EPS)  # noqa: E731
    else:
        f = lambda: F.instance_norm(tx, weight=tw, bias=tb, eps=EPS)  # noqa: E731

    def output():
        t = f()
        if channels_last(c.layout):
            if not t.is_contiguous(memory_format=torch.channels_last):
                notes.append("torch: output is not channels_last for a channels_last input")
            t = t.permute(0, 2, 3, 1)
        return from_torch(t)
    return [Impl("torch", f, output, "torch", running)]


# ONNX Runtime ----------------------------------------------------------------------------------

ORT_OPS = {"batch_norm": ("BatchNormalization", 15), "group_norm": ("GroupNormalization", 21),
           "instance_norm": ("InstanceNormalization", 17)}


def ort_elem_type(dtype):
    return {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            BF16: TensorProto.BFLOAT16}[np.dtype(dtype)]


def ort_initializer(name, a):
    if a.dtype == BF16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, a.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(a, name)


def ort_outputs(c):
    return ["Y", "RM", "RV"] if c.op == "batch_norm" and c.training else ["Y"]


def ort_model(c):
    op, opset = ORT_OPS[c.op]
    et = ort_elem_type(c.dtype)
    if c.op == "batch_norm":
        # scale/B (T1) and mean/var (T2) may be float32 with 16-bit X (opset 15)
        inits = [ort_initializer(n, a) for n, a in (("W", c.w), ("B", c.b), ("M", c.rm0), ("V", c.rv0))]
        attrs = {"epsilon": EPS}
        if c.training:
            attrs.update(training_mode=1, momentum=1.0 - MOMENTUM)
    else:
        # GroupNormalization-21 / InstanceNormalization: scale and bias in X's type
        inits = [ort_initializer("W", c.w.astype(c.dtype)), ort_initializer("B", c.b.astype(c.dtype))]
        attrs = {"epsilon": EPS}
        if c.op == "group_norm":
            attrs["num_groups"] = GROUPS
    outs = ort_outputs(c)
    node = helper.make_node(op, ["X"] + [t.name for t in inits], outs, **attrs)
    vi = [helper.make_tensor_value_info("Y", et, list(c.phys))]
    vi += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [c.c]) for o in outs[1:]]
    graph = helper.make_graph([node], "norm", [helper.make_tensor_value_info("X", et, list(c.phys))], vi,
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return op, opset, model.SerializeToString()


def ort_session(model, threads, optimized_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for k, v in ORT_SPIN.items():
        so.add_session_config_entry(k, v)
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_ortvalue(a):
    if a.dtype == BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(a)


def describe_graph(nodes):
    if len(nodes) <= 6:
        return ", ".join(nodes)
    counts = Counter(nodes)
    return f"{len(nodes)} nodes (" + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items()) + ")"


def ort_prepare(c):
    """(op, opset, model bytes) if ORT builds and runs a session for c, and a line for the log;
    (None, reason) otherwise. Correctness is checked with every other implementation."""
    if channels_last(c.layout):
        return None, ORT_NHWC_NOTE
    import tempfile

    try:
        op, opset, model = ort_model(c)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "opt.onnx")
            sess = ort_session(model, 1, optimized_path=path)
            nodes = [n.op_type for n in onnx.load(path).graph.node]
        sess.run(None, {"X": c.x})
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"onnxruntime: skipped ({msg[:200]})"
    how = "function expanded by ORT, no CPU kernel" if len(nodes) > 3 and op not in nodes else \
        ("float32 kernel between Casts" if "Cast" in nodes else "one kernel")
    return (op, opset, model), (f"onnxruntime: {op} (opset {opset}), graph after optimization: "
                                f"{describe_graph(nodes)} [{how}]")


def ort_impls(c, model_info, threads):
    """model_info: (op, opset, model bytes); a fresh session with ``threads`` intra-op threads."""
    _, _, model = model_info
    sess = ort_session(model, threads)
    outs = ort_outputs(c)
    impls = []
    if c.dtype != BF16:
        feeds = {"X": c.x}
        f = lambda: sess.run(outs, feeds)  # noqa: E731
        impls.append(Impl("onnxruntime", f, lambda: f()[0], "onnxruntime"))
    y = out_buffer(c)
    extra = [np.empty(c.c, np.float32) for _ in outs[1:]]
    xv, yv = ort_ortvalue(c.x), ort_ortvalue(y)
    if xv.data_ptr() != c.x.ctypes.data or yv.data_ptr() != y.ctypes.data:
        raise RuntimeError("OrtValue does not share the NumPy buffer")
    bind = sess.io_binding()
    bind.bind_ortvalue_input("X", xv)
    bind.bind_ortvalue_output("Y", yv)
    ev = [ort.OrtValue.ortvalue_from_numpy(e) for e in extra]
    for name, v in zip(outs[1:], ev):
        bind.bind_ortvalue_output(name, v)
    g = lambda: sess.run_with_iobinding(bind)  # noqa: E731
    impls.append(Impl("onnxruntime out=", g, lambda: (g(), y)[1], "onnxruntime"))
    return impls  # the closures keep the session, the binding and the buffers alive


# ---------------------------------------------------------------------------------------------
# running


def set_threads(t):
    normkit.set_num_threads(t)
    got = {"normkit": normkit.get_num_threads()}
    if torch is not None:
        torch.set_num_threads(t)
        got["torch"] = torch.get_num_threads()
    if ort is not None:
        got["onnxruntime"] = f"{t} (intra_op_num_threads, fresh session)"
    return got


def fmt_ms(s):
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def sample_index(c):
    """Samples of the batch the float64 reference is computed for."""
    if c.s == 1:  # BatchNorm1d: rows
        return np.unique(np.random.default_rng(1).integers(0, c.n, size=min(c.n, 256)))
    return np.unique(np.array([0, c.n // 2, c.n - 1]))


def run_case(c, threads_list, limit, log, results, notes):
    log(f"\n=== {c.label}   x {mib(c.x.nbytes):.2f} MiB, x+y {mib(c.bytes):.2f} MiB ===")
    idx = sample_index(c)
    ref = c.reference(idx)
    exp_running = c.expected_running() if c.op == "batch_norm" and c.training else None

    ort_info = None
    if ort is not None:
        ort_info, detail = ort_prepare(c)
        log(detail)
        if detail != ORT_NHWC_NOTE:
            notes.append(f"{c.name}: {detail}")
        elif ORT_NHWC_NOTE not in notes:
            notes.append(ORT_NHWC_NOTE)

    limit.setup(c.x.nbytes, ARGS.out_offset)
    for t in threads_list:
        t_start = time.perf_counter()
        got = set_threads(t)
        case_notes = []
        impls = normkit_impls(c)
        if torch is not None:
            impls += torch_impls(c, case_notes)
        if ort_info is not None:
            try:
                impls += ort_impls(c, ort_info, t)
            except Exception as exc:
                case_notes.append(f"onnxruntime skipped at {t} threads: {exc}")

        # validate every implementation once, before timing
        nk_y = np.array(impls[0].output(), copy=True)  # normkit's fresh output may be a reused buffer
        good, checks = [], []
        for im in impls:
            try:
                y = im.output()
            except Exception as exc:
                case_notes.append(f"{im.name}: failed to run ({exc}); not timed")
                continue
            err = max_rel_err(np.asarray(y[idx]), ref)
            vs_nk = max_rel_err_chunked(y, nk_y)
            ok = err <= tolerance(c.dtype)
            msg = f"{im.name} {err:.1e}|{vs_nk:.1e}"
            if not ok:
                case_notes.append(f"{im.name}: max rel err {err:.2e} against the float64 reference "
                                  f"(tolerance {tolerance(c.dtype):.1e}); not timed")
            del y
            if ok and im.running is not None and exp_running is not None:
                rm, rv = im.running()
                rerr = max(max_rel_err(rm, exp_running[0]), max_rel_err(rv, exp_running[1]))
                msg += f"|run {rerr:.1e}"
                if not rerr <= RUNNING_TOL:
                    ok = False
                    case_notes.append(f"{im.name}: running statistics after one step off by {rerr:.2e} "
                                      f"(tolerance {RUNNING_TOL:.0e}); not timed")
            checks.append(msg)
            if ok:
                good.append(im)
        del nk_y
        gc.collect()

        lib_entries = [H.Entry(im.name, fn=im.fn) for im in good]
        copy_entries = limit.entries(t)
        entries = lib_entries + copy_entries
        gap = ARGS.gap_ms / 1e3 if t > 1 else 0.0
        H.run_round_robin(entries, reps=ARGS.reps, warmup=ARGS.warmup,
                          sample_s=ARGS.sample_ms / 1e3, gap_s=gap,
                          prime=ARGS.prime == "always" or (ARGS.prime == "auto" and t > 1))

        best_copy = min(copy_entries, key=lambda e: e.median)
        lim = best_copy.median
        med = {e.name: e.median for e in lib_entries}
        nk_fresh = med.get("normkit")
        nk_out = med.get("normkit out=")
        log(f"\n-- {c.label} | {t} thread{'s' if t > 1 else ''} | threads set: "
            + ", ".join(f"{k}={v}" for k, v in got.items()) + f" | took {time.perf_counter() - t_start:.0f} s")
        log("   check (max rel err vs float64 reference on samples " + ",".join(map(str, idx[:3]))
            + ("..." if len(idx) > 3 else "") + " | vs normkit, whole array"
            + (" | running stats after one step vs float64" if exp_running is not None else "") + "): "
            + ", ".join(checks))
        log("   limit: " + ", ".join(f"{e.name} {fmt_ms(e.median)} ms" for e in copy_entries)
            + f"  -> {c.bytes / lim / 1e9:.1f} GB/s ({best_copy.name})")
        hdr = f"   {'implementation':<18}{'median ms':>11}{'IQR%':>6}{'batch':>7}{'GB/s':>8}{'frac':>7}" \
              f"{'x nk':>8}{'x nk out=':>11}"
        log(hdr)
        for e in lib_entries:
            row = {
                "case": c.name, "label": c.label, "dtype": c.dtype_name, "threads": t, "impl": e.name,
                "median_s": e.median, "iqr": e.spread, "k": e.k, "gbps": c.bytes / e.median / 1e9,
                "frac": lim / e.median,
                "x_nk": e.median / nk_fresh if nk_fresh else float("nan"),
                "x_nk_out": e.median / nk_out if nk_out else float("nan"),
                "limit_s": lim, "limit_gbps": c.bytes / lim / 1e9, "limit_name": best_copy.name,
            }
            results.append(row)
            log(f"   {e.name:<18}{fmt_ms(e.median):>11}{100 * e.spread:>5.0f}%{e.k:>7}{row['gbps']:>8.1f}"
                f"{row['frac']:>7.2f}{row['x_nk']:>7.2f}x{row['x_nk_out']:>10.2f}x")
        for n in case_notes:
            log(f"   note: {n}")
        for n in case_notes:
            n = f"{c.name} @{t}T: {n}"
            if n not in notes:
                notes.append(n)
        del impls, good, lib_entries, entries
        gc.collect()
    limit.release()


def header_lines(limit_helper_ok):
    info = normkit.info()
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}",
                f"normkit {info.get('version')}"]
    if torch is not None:
        versions.append(f"torch {torch.__version__}")
    if ort is not None:
        versions += [f"onnxruntime {ort.__version__}", f"onnx {onnx.__version__}"]
    if ml_dtypes is not None:
        versions.append(f"ml_dtypes {ml_dtypes.__version__}")
    gomp = H.loaded_libraries(["libgomp", "libiomp", "libomp"])
    nt = H.glibc_nt_threshold()
    env_keys = ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES",
                "NORMKIT_ISA", "LD_PRELOAD", "MALLOC_ARENA_MAX"]
    env = ", ".join(f"{k}={os.environ[k]}" if k in os.environ else f"{k} unset" for k in env_keys)
    madv = np._core.multiarray._get_madvise_hugepage() if hasattr(np, "_core") else "?"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    cache = ""
    if hasattr(normkit, "set_output_cache_limit"):
        try:
            from normkit import _dtypes as nk_dtypes

            cache = (f"; normkit takes fresh outputs of >= {mib(nk_dtypes.CACHED_OUTPUT_MIN_BYTES):g} MiB "
                     "from its cache of freed output buffers (already mapped: no page faults)")
        except (ImportError, AttributeError):
            cache = "; normkit reuses large freed output buffers (output cache)"
    lines = [
        ("command", "python " + " ".join(shlex.quote(a) for a in sys.argv)),
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")),
        ("cpu", f"{H.cpu_model()}; {affinity} CPUs usable; features {' '.join(info.get('cpu_features', []))}; "
                f"load average at start {H.loadavg()}"),
        ("versions", ", ".join(versions)),
        ("normkit kernel path", f"{info.get('kernel_path')} (compiled {info.get('kernel_paths_compiled')}, "
                                f"openmp {info.get('openmp')})"),
        ("OpenMP runtime loaded", (", ".join(gomp) or "none")
            + (" (one copy, shared by normkit and PyTorch)" if len(gomp) == 1 and torch is not None else "")),
        ("thread policy", f"--spin {ARGS.spin}; ORT session config {ORT_SPIN or 'defaults'}; "
                          f"gap between samples at >1 thread {ARGS.gap_ms:g} ms"),
        ("allocator", f"--hugepages {ARGS.hugepages}; NumPy madvise(HUGEPAGE) {madv}; kernel THP "
                      f"{H.read_text('/sys/kernel/mm/transparent_hugepage/enabled')}; glibc malloc defaults"
                      + cache),
        ("environment", env),
        ("placement", f"x on a 2 MiB boundary; preallocated outputs and copy destinations {ARGS.out_offset} "
                      "bytes after one; fresh outputs wherever each library's allocator puts them"),
        ("timing", f"median of {ARGS.reps} interleaved samples, {ARGS.warmup} warm-up calls, small problems "
                   f"batched to ~{ARGS.sample_ms:g} ms per sample, "
                   + {"never": "no priming",
                      "always": "each sample right after one untimed call of the same implementation",
                      "auto": "at >1 thread each sample right after one untimed call of the same implementation"
                      }[ARGS.prime]),
        ("bandwidth limit", "fastest of np.copyto (glibc memcpy) of x's bytes on 1 thread / 2 threads"
            + (f", default non-temporal threshold {mib(nt):.0f} MiB" if nt else "")
            + (", and the same with non-temporal stores forced (helper process, threshold 1 MiB)"
               if limit_helper_ok else "")),
        ("bytes", "GB/s and the limit count x read once + y written once in every case; BatchNorm "
                  "training needs x's statistics before it writes y (x read twice unless it stays in "
                  "cache), yet is held to the same 1-read + 1-write limit, as in the rows benchmark"),
        ("parameters", f"eps {EPS:g}; GroupNorm {GROUPS} groups; weight/bias float32, and BatchNorm "
                       f"running_mean/running_var float32 (momentum {MOMENTUM:g}, one copy per "
                       "implementation, updated in place in training), for every x dtype -- for 16-bit x "
                       "PyTorch's mixed-type path; ONNX Runtime's GroupNormalization/InstanceNormalization "
                       "take scale/bias in x's dtype"),
    ]
    lines.append(("implementations", "normkit.batch_norm/group_norm/instance_norm (layout= the case's), "
                  "fresh output and out=; PyTorch: torch.nn.functional.batch_norm/group_norm/instance_norm "
                  "on torch.from_numpy views (NHWC: .permute(0,3,1,2), a channels_last NCHW tensor; "
                  "bfloat16 through an int16 view) under inference_mode, fresh output only (no out= in "
                  "that API); ONNX Runtime (channels-first only): a one-node model (parameters as "
                  "initializers), session.run() (fresh output, returned as a NumPy array) and "
                  "run_with_iobinding into a preallocated array (out=); bfloat16 only through io_binding"))
    if SKIPPED_LIBS:
        lines.append(("skipped", "; ".join(f"{k}: {v}" for k, v in SKIPPED_LIBS.items())))
    return lines


def target_rows(results):
    out = []
    by = {(r["case"], r["threads"], r["impl"]): r for r in results}
    t = 2 if 2 in ARGS.threads else max(ARGS.threads)
    for case in ARGS.cases:
        nk = by.get((case, t, "normkit"))
        nko = by.get((case, t, "normkit out="))
        if not nk:
            continue
        for peer, need in TARGETS.get(case, []):
            p = by.get((case, t, peer))
            po = by.get((case, t, peer + " out=")) or p
            if not p:
                out.append((case, t, f">= {need:g}x {peer}", "peer not timed", ""))
                continue
            sp = p["median_s"] / nk["median_s"]
            spo = po["median_s"] / nko["median_s"] if nko else float("nan")
            out.append((case, t, f">= {need:g}x {peer}",
                        f"{sp:.2f}x {'met' if sp >= need else 'MISSED'}",
                        f"{spo:.2f}x {'met' if spo >= need else 'MISSED'}"))
        if case in FRACTION_TARGETS:
            need = FRACTION_TARGETS[case]
            f = nk["frac"]
            fo = nko["frac"] if nko else float("nan")
            out.append((case, t, f"fraction of limit >= {need:g}",
                        f"{f:.2f} {'met' if f >= need else 'MISSED'}",
                        f"{fo:.2f} {'met' if fo >= need else 'MISSED'}"))
    return out


def write_markdown(path, header, results, targets, notes):
    L = ["# normkit channels benchmark: BatchNorm / GroupNorm / InstanceNorm forward", ""]
    for k, v in header:
        L.append(f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}")
    L += ["", "Fresh output: a new array per call. `out=`: into a preallocated array (PyTorch has no out= "
          "for these functions). GB/s counts x read + y written. frac = bandwidth-limit time / time. "
          "x nk = this row's time / normkit's (normkit's speedup over it); x nk out= the same against "
          "normkit with out=.", ""]
    L.append("| case | threads | implementation | median ms | GB/s | frac of limit | x nk | x nk out= | limit GB/s |")
    L.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        L.append(f"| {r['label']} | {r['threads']} | {r['impl']} | {fmt_ms(r['median_s'])} | {r['gbps']:.1f} | "
                 f"{r['frac']:.2f} | {r['x_nk']:.2f} | {r['x_nk_out']:.2f} | {r['limit_gbps']:.1f} |")
    if targets:
        L += ["", "## Targets (issue 3)", "",
              "| case | threads | target | normkit (fresh vs fresh) | normkit out= (vs peer out= if any) |",
              "| --- | ---: | --- | --- | --- |"]
        for case, t, what, a, b in targets:
            L.append(f"| {case} | {t} | {what} | {a} | {b} |")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def main():
    t0 = time.perf_counter()
    limit = H.BandwidthLimit(streaming_helper=not ARGS.no_streaming_limit)
    header = header_lines(limit.remote is not None)
    print("normkit channels benchmark")
    for k, v in header:
        print(f"  {k}: {v}")
    if limit.remote_error:
        print(f"  note: streaming-copy helper unavailable: {limit.remote_error}")
    results, notes = [], []
    ctx = torch.inference_mode() if torch is not None else None
    try:
        if ctx is not None:
            ctx.__enter__()
        for name in ARGS.cases:
            try:
                c = Case(name)
            except RuntimeError as exc:  # e.g. bfloat16 without ml_dtypes
                print(f"\n=== {name}: skipped ({exc}) ===")
                notes.append(f"{name}: skipped ({exc})")
                continue
            run_case(c, ARGS.threads, limit, print, results, notes)
            del c
            gc.collect()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        limit.close()

    targets = target_rows(results)
    if targets:
        print("\n=== targets (issue 3), normkit speedup at "
              f"{targets[0][1]} threads; fresh vs fresh | normkit out= vs peer out= (or fresh) ===")
        for case, t, what, a, b in targets:
            print(f"   {case:<20} {what:<28} {a:<16} {b}")
    print(f"\nload average at end: {H.loadavg()}; whole run {time.perf_counter() - t0:.0f} s")
    if ARGS.markdown:
        header.append(("load average at end", H.loadavg()))
        write_markdown(ARGS.markdown, header, results, targets, notes)
        print(f"wrote {ARGS.markdown}")


if __name__ == "__main__":
    main()

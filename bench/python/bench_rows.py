#!/usr/bin/env python3
"""normkit LayerNorm / RMSNorm forward against NumPy, PyTorch and ONNX Runtime, in one process.

    python bench/python/bench_rows.py                     # full run (a few minutes on 2 cores)
    python bench/python/bench_rows.py --quick             # smoke test (about a minute)
    python bench/python/bench_rows.py --threads 2 --cases 'ln_*' --markdown bench/RESULTS.md

Per case and thread count, every implementation is timed round-robin (one sample of each per
repetition, rotating who goes first) so that drift hits all of them alike; the figure is the
median. Each implementation is checked once before it is timed, against a float64 reference on
sampled rows (and compared with normkit on the whole array); one that disagrees is reported and
left out.

Columns: median time per call; effective GB/s = (bytes of x read + bytes of y written) / time;
"frac" = limit time / time, where the limit is the fastest copy of an array of x's size (read x
bytes + write x bytes) measured in the same rounds: glibc memcpy (np.copyto) on 1 thread and split
over 2 threads, with glibc's default and with forced non-temporal stores (a helper process);
"x nk" = that row's time / normkit's time (normkit's speedup over the row) with a fresh output per
call, and "x nk out=" the same against normkit writing into a preallocated out=.

Thread fairness (--spin, --gap-ms, --prime): only one libgomp is loaded, whichever library is
imported first brings it, and normkit and PyTorch share its pool; ONNX Runtime has its own pool.
Idle workers spin after a call -- libgomp about 5 ms, ORT about 50 ms by default -- and steal one of
the two cores from whatever is timed next. Measured on the 2-vCPU VM at 2 threads, LayerNorm
[8192,768]: normkit and PyTorch ran 2.2-2.4x slower right after an ORT call (still so 20 ms later),
ORT 2.2-2.4x slower right after a normkit or PyTorch call; normkit right after PyTorch was not
affected (same pool). OMP_WAIT_POLICY=PASSIVE plus ORT allow_spinning=0 removes the interference
but makes every library 1.7-1.9x slower at 2 threads here (each call waits for a sleeping thread
on an idle virtual CPU), so it is not the default. The default (--spin bounded) keeps each
library's own spinning, bounds ORT's to 5 ms (session.intra_op.spin_duration_us), sleeps 20 ms
after every sample at >1 thread so no spinner overlaps another library's sample, and makes one
untimed call of the same implementation right before each sample so it starts with its threads
awake (as in a loop of calls; waking them costs ~0.4 ms here). With that, every library timed
within noise of running back-to-back on its own.

Allocator (--hugepages): a fresh output per call pays page faults. NumPy (so normkit's fresh
output) madvises large arrays to huge pages by default, PyTorch does not unless
THP_MEM_ALLOC_ENABLE=1; that difference alone made PyTorch's fresh-output LayerNorm [4096,4096]
about 2x slower than with huge pages, so the default turns huge pages on for both. ONNX
Runtime's run() returns arrays backed by its own arena (the same block comes back on every call),
so its fresh output pays no page faults at all.

Placement (--out-offset): x sits on a 2 MiB boundary and every preallocated output 0 bytes after
one. With the output 16 bytes after (what `y = np.empty_like(x)` right after x gives for sizes
that are multiples of 1 MiB), float16 LayerNorm [8192,768] out= ran 2.7x slower for normkit and
3x slower for ONNX Runtime on this machine, so the placement is fixed and shown in the header.
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

# ---------------------------------------------------------------------------------------------
# cases

CASES = {
    # name: (op, shape, dtype)
    "ln_8192x768": ("layer_norm", (8192, 768), "float32"),
    "ln_4096x4096": ("layer_norm", (4096, 4096), "float32"),
    "ln_2048x12288": ("layer_norm", (2048, 12288), "float32"),
    "ln_64x1024": ("layer_norm", (64, 1024), "float32"),
    "rms_8192x4096": ("rms_norm", (8192, 4096), "float32"),
    "ln_8192x768_f16": ("layer_norm", (8192, 768), "float16"),
    "ln_8192x768_bf16": ("layer_norm", (8192, 768), "bfloat16"),
    "rms_8192x4096_f16": ("rms_norm", (8192, 4096), "float16"),
    "rms_8192x4096_bf16": ("rms_norm", (8192, 4096), "bfloat16"),
}
LATENCY_CASES = {"ln_64x1024"}

# Targets from the issue (2 threads, normkit speedup over the peer, fresh output vs fresh output).
TARGETS = {
    "ln_8192x768": [("torch", 1.5)],
    "ln_4096x4096": [("torch", 2.0)],
    "ln_2048x12288": [("torch", 2.0)],
    "ln_64x1024": [("torch", 1.5)],
    "rms_8192x4096": [("torch", 3.0), ("onnxruntime", 1.0)],
    "ln_8192x768_f16": [("torch", 2.5)],
    "ln_8192x768_bf16": [("torch", 2.5)],
}
FRACTION_TARGET = 0.8

LIBS = ("normkit", "numpy", "torch", "onnxruntime")


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
    ap.add_argument("--reps", type=int, help="samples per implementation (default 15; 5 with --quick)")
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
                         "copy destination) starts BYTES after one (default 0). 16 reproduces y allocated "
                         "right after x by NumPy, a placement that is slow on some machines")
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
        args.reps = 5 if args.quick else 15
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


class Case:
    def __init__(self, name):
        self.name = name
        self.op, self.shape, self.dtype_name = CASES[name]
        self.dtype = np_dtype(self.dtype_name)
        self.n = self.shape[-1]
        self.eps = 1e-5 if self.op == "layer_norm" else 1e-6
        kind = "LayerNorm" if self.op == "layer_norm" else "RMSNorm"
        self.label = f"{kind} [{', '.join(map(str, self.shape))}] {self.dtype_name}"
        rng = np.random.default_rng(0)
        x32 = rng.standard_normal(self.shape, dtype=np.float32)
        x32 *= 2.0
        x32 += 0.5
        self.x = H.placed_empty(self.shape, self.dtype, 0, fill=None)
        self.x[...] = x32 if self.dtype == np.float32 else x32.astype(self.dtype)
        del x32
        self.w = rng.uniform(0.5, 1.5, self.n).astype(np.float32).astype(self.dtype)
        self.b = (0.1 * rng.standard_normal(self.n)).astype(np.float32).astype(self.dtype) \
            if self.op == "layer_norm" else None
        self.bytes = 2 * self.x.nbytes  # x read + y written

    def reference_rows(self, idx):
        x = self.x[idx].astype(np.float64)
        w = self.w.astype(np.float64)
        if self.op == "layer_norm":
            mean = x.mean(-1, keepdims=True)
            var = ((x - mean) ** 2).mean(-1, keepdims=True)
            return (x - mean) / np.sqrt(var + self.eps) * w + self.b.astype(np.float64)
        ms = (x * x).mean(-1, keepdims=True)
        return x / np.sqrt(ms + self.eps) * w


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


# ---------------------------------------------------------------------------------------------
# implementations


class Impl:
    """An implementation: a call to time, and how to get its output once for validation."""

    def __init__(self, name, fn, output, lib):
        self.name, self.fn, self.output, self.lib = name, fn, output, lib


def out_buffer(c):
    return H.placed_empty(c.shape, c.dtype, ARGS.out_offset)


def normkit_impls(c):
    x, w, b, n, eps = c.x, c.w, c.b, c.n, c.eps
    y = out_buffer(c)
    if c.op == "layer_norm":
        fresh = lambda: normkit.layer_norm(x, n, w, b, eps)  # noqa: E731
        into = lambda: normkit.layer_norm(x, n, w, b, eps, out=y)  # noqa: E731
    else:
        fresh = lambda: normkit.rms_norm(x, n, w, eps)  # noqa: E731
        into = lambda: normkit.rms_norm(x, n, w, eps, out=y)  # noqa: E731
    return [Impl("normkit", fresh, fresh, "normkit"),
            Impl("normkit out=", into, lambda: (into(), y)[1], "normkit")]


def numpy_impls(c):
    if c.dtype != np.float32:
        return [], "NumPy: float32 only (its 16-bit arithmetic is not a meaningful peer)"
    x, w, b, eps = c.x, c.w, c.b, c.eps
    if c.op == "layer_norm":
        def f():
            mean = x.mean(-1, keepdims=True)
            xc = x - mean
            var = np.mean(np.square(xc), -1, keepdims=True)
            xc *= 1.0 / np.sqrt(var + eps)
            xc *= w
            xc += b
            return xc
    else:
        def f():
            ms = np.mean(np.square(x), -1, keepdims=True)
            y = x * (1.0 / np.sqrt(ms + eps))
            y *= w
            return y
    return [Impl("numpy", f, f, "numpy")], ""


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


def torch_impls(c):
    tx, tw, tb, n, eps = to_torch(c.x), to_torch(c.w), to_torch(c.b), c.n, c.eps
    if c.op == "layer_norm":
        f = lambda: F.layer_norm(tx, (n,), tw, tb, eps)  # noqa: E731
    else:
        f = lambda: F.rms_norm(tx, (n,), tw, eps)  # noqa: E731
    return [Impl("torch", f, lambda: from_torch(f()), "torch")]


# ONNX Runtime ----------------------------------------------------------------------------------

ORT_OPS = {
    "layer_norm": [("LayerNormalization", 17)],
    # RMSNormalization is standard from opset 23; ORT's own fused SimplifiedLayerNormalization is
    # the fallback (ORT registers it in the default domain).
    "rms_norm": [("RMSNormalization", 23), ("SimplifiedLayerNormalization", 17)],
}


def ort_elem_type(dtype):
    return {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            BF16: TensorProto.BFLOAT16}[np.dtype(dtype)]


def ort_initializer(name, a):
    if a.dtype == BF16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, a.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(a, name)


def ort_model(c, op, opset):
    et = ort_elem_type(c.dtype)
    inits = [ort_initializer("W", c.w)] + ([ort_initializer("B", c.b)] if c.b is not None else [])
    node = helper.make_node(op, ["X"] + [t.name for t in inits], ["Y"], axis=-1, epsilon=c.eps)
    graph = helper.make_graph([node], "norm", [helper.make_tensor_value_info("X", et, ["N", c.n])],
                              [helper.make_tensor_value_info("Y", et, ["N", c.n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()


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


def ort_impls(c, model_info, threads):
    """model_info: (op, opset, model bytes); a fresh session with ``threads`` intra-op threads."""
    _, _, model = model_info
    sess = ort_session(model, threads)
    impls = []
    if c.dtype != BF16:
        feeds = {"X": c.x}
        f = lambda: sess.run(["Y"], feeds)  # noqa: E731
        impls.append(Impl("onnxruntime", f, lambda: f()[0], "onnxruntime"))
    y = out_buffer(c)
    xv, yv = ort_ortvalue(c.x), ort_ortvalue(y)
    if xv.data_ptr() != c.x.ctypes.data or yv.data_ptr() != y.ctypes.data:
        raise RuntimeError("OrtValue does not share the NumPy buffer")
    bind = sess.io_binding()
    bind.bind_ortvalue_input("X", xv)
    bind.bind_ortvalue_output("Y", yv)
    g = lambda: sess.run_with_iobinding(bind)  # noqa: E731
    impls.append(Impl("onnxruntime out=", g, lambda: (g(), y)[1], "onnxruntime"))
    return impls  # the closures keep the session and the binding alive


def ort_choose_model(c):
    """First ORT op that builds a session and agrees with normkit; (op, opset, bytes, graph) or reason."""
    reasons = []
    ref = normkit_impls(c)[0].output()
    import tempfile

    for op, opset in ORT_OPS[c.op]:
        try:
            model = ort_model(c, op, opset)
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "opt.onnx")
                sess = ort_session(model, 1, optimized_path=path)
                nodes = [n.op_type for n in onnx.load(path).graph.node]
            y = out_buffer(c)
            bind = sess.io_binding()
            bind.bind_ortvalue_input("X", ort_ortvalue(c.x))
            bind.bind_ortvalue_output("Y", ort_ortvalue(y))
            sess.run_with_iobinding(bind)
            err = max_rel_err_chunked(y, ref)
            if not err <= tolerance(c.dtype):
                reasons.append(f"{op}: output differs from normkit (max rel err {err:.2e})")
                continue
            return (op, opset, model), nodes
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reasons.append(f"{op}(opset {opset}): {msg[:160]}")
    return None, "; ".join(reasons)


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


def run_case(c, threads_list, limit, log, results, notes):
    log(f"\n=== {c.label}   x {mib(c.x.nbytes):.2f} MiB, x+y {mib(c.bytes):.2f} MiB ===")
    # every implementation is checked against a float64 reference on sampled rows (and compared with
    # normkit on the whole array) before it is timed
    rows = c.shape[0]
    idx = np.unique(np.random.default_rng(1).integers(0, rows, size=min(rows, 256)))
    ref_rows = c.reference_rows(idx)

    ort_info = None
    if ort is not None:
        ort_info, detail = ort_choose_model(c)
        if ort_info is None:
            log(f"onnxruntime: skipped ({detail})")
            notes.append(f"{c.name}: onnxruntime skipped: {detail}")
        else:
            msg = f"onnxruntime: {ort_info[0]} (opset {ort_info[1]}), graph after optimization: {', '.join(detail)}"
            log(msg)
            notes.append(f"{c.name}: {msg}")

    limit.setup(c.x.nbytes, ARGS.out_offset)
    for t in threads_list:
        t_start = time.perf_counter()
        got = set_threads(t)
        impls = normkit_impls(c)
        case_notes = []
        if "numpy" in ARGS.libs:
            more, note = numpy_impls(c)
            impls += more
            if note:
                case_notes.append(note)
        if torch is not None:
            impls += torch_impls(c)
        if ort_info is not None:
            try:
                impls += ort_impls(c, ort_info, t)
            except Exception as exc:
                case_notes.append(f"onnxruntime skipped at {t} threads: {exc}")

        # validate every implementation once, before timing
        nk_y = impls[0].output()
        good, checks = [], []
        for im in impls:
            try:
                y = im.output()
            except Exception as exc:
                case_notes.append(f"{im.name}: failed to run ({exc}); not timed")
                continue
            err = max_rel_err(np.asarray(y[idx]), ref_rows)
            vs_nk = max_rel_err_chunked(y, nk_y)
            checks.append(f"{im.name} {err:.1e}|{vs_nk:.1e}")
            if err <= tolerance(c.dtype):
                good.append(im)
            else:
                case_notes.append(f"{im.name}: max rel err {err:.2e} against the float64 reference "
                                  f"(tolerance {tolerance(c.dtype):.1e}); not timed")
            del y
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
        log("   check (max rel err vs float64 reference on sampled rows | vs normkit, whole array): "
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
            n = n if n.startswith("NumPy: float32 only") else f"{c.name} @{t}T: {n}"
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
                      f"{H.read_text('/sys/kernel/mm/transparent_hugepage/enabled')}; glibc malloc defaults"),
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
    ]
    lines.append(("implementations", "normkit.layer_norm/rms_norm, fresh output and out=; NumPy: plain float32 "
                  "mean/var/normalize (float32 cases only); PyTorch: torch.nn.functional.layer_norm/rms_norm "
                  "on torch.from_numpy views under inference_mode, fresh output only (no out= in that API); "
                  "ONNX Runtime: a one-node model (weights as initializers), session.run() (fresh output, "
                  "returned as a NumPy array) and run_with_iobinding into a preallocated array (out=); "
                  "bfloat16 only through io_binding"))
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
                out.append((case, t, f"{need:g}x {peer}", "peer not timed", "", ""))
                continue
            sp = p["median_s"] / nk["median_s"]
            spo = po["median_s"] / nko["median_s"] if nko else float("nan")
            out.append((case, t, f">= {need:g}x {peer}" if need > 1 else f"faster than {peer}",
                        f"{sp:.2f}x {'met' if sp >= need else 'MISSED'}",
                        f"{spo:.2f}x {'met' if spo >= need else 'MISSED'}", ""))
        if case not in LATENCY_CASES:
            f = nk["frac"]
            fo = nko["frac"] if nko else float("nan")
            out.append((case, t, f"fraction of limit >= {FRACTION_TARGET}",
                        f"{f:.2f} {'met' if f >= FRACTION_TARGET else 'missed'}",
                        f"{fo:.2f} {'met' if fo >= FRACTION_TARGET else 'missed'}", ""))
    return out


def write_markdown(path, header, results, targets, notes):
    L = ["# normkit rows benchmark: LayerNorm / RMSNorm forward", ""]
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
        L += ["", "## Targets (issue 2)", "",
              "| case | threads | target | normkit (fresh vs fresh) | normkit out= (vs peer out= if any) |",
              "| --- | ---: | --- | --- | --- |"]
        for case, t, what, a, b, _ in targets:
            L.append(f"| {case} | {t} | {what} | {a} | {b} |")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def main():
    limit = H.BandwidthLimit(streaming_helper=not ARGS.no_streaming_limit)
    header = header_lines(limit.remote is not None)
    print("normkit rows benchmark")
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
            c = Case(name)
            run_case(c, ARGS.threads, limit, print, results, notes)
            del c
            gc.collect()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        limit.close()

    targets = target_rows(results)
    if targets:
        print("\n=== targets (issue 2), normkit speedup at "
              f"{targets[0][1]} threads; fresh vs fresh | normkit out= vs peer out= (or fresh) ===")
        for case, t, what, a, b, _ in targets:
            print(f"   {case:<20} {what:<28} {a:<16} {b}")
    print(f"\nload average at end: {H.loadavg()}")
    if ARGS.markdown:
        header.append(("load average at end", H.loadavg()))
        write_markdown(ARGS.markdown, header, results, targets, notes)
        print(f"wrote {ARGS.markdown}")


if __name__ == "__main__":
    main()

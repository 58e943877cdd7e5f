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

ARGS = _cli.parse_args(__doc__, CASES, LIBS, reps_default=15,
                       out_offset_note=". 16 reproduces y allocated right after x by NumPy, a placement that "
                                       "is slow on some machines")
_libs.configure_environment(ARGS)
_libs.load_libraries(ARGS)  # NumPy, normkit (first), ml_dtypes, PyTorch, ONNX Runtime
np, normkit, torch, F, ort = _libs.np, _libs.normkit, _libs.torch, _libs.F, _libs.ort


# ---------------------------------------------------------------------------------------------
# reference data and float64 reference


class Case:
    def __init__(self, name):
        self.name = name
        self.op, self.shape, self.dtype_name = CASES[name]
        self.dtype = _libs.np_dtype(self.dtype_name)
        self.n = self.shape[-1]
        self.eps = 1e-5 if self.op == "layer_norm" else 1e-6
        kind = "LayerNorm" if self.op == "layer_norm" else "RMSNorm"
        self.label = f"{kind} [{', '.join(map(str, self.shape))}] {self.dtype_name}"
        rng = np.random.default_rng(0)
        self.x = _data.placed_array(_data.random_rows(rng, self.shape), self.dtype)
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


# ---------------------------------------------------------------------------------------------
# implementations


def out_buffer(c):
    return _data.placed_empty(c.shape, c.dtype, ARGS.out_offset)


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


def torch_impls(c):
    tx, tw, tb, n, eps = _peers.to_torch(c.x), _peers.to_torch(c.w), _peers.to_torch(c.b), c.n, c.eps
    if c.op == "layer_norm":
        f = lambda: F.layer_norm(tx, (n,), tw, tb, eps)  # noqa: E731
    else:
        f = lambda: F.rms_norm(tx, (n,), tw, eps)  # noqa: E731
    return [Impl("torch", f, lambda: _peers.from_torch(f()), "torch")]


# ONNX Runtime ----------------------------------------------------------------------------------

ORT_OPS = {
    "layer_norm": [("LayerNormalization", 17)],
    # RMSNormalization is standard from opset 23; ORT's own fused SimplifiedLayerNormalization is
    # the fallback (ORT registers it in the default domain).
    "rms_norm": [("RMSNormalization", 23), ("SimplifiedLayerNormalization", 17)],
}


def ort_model(c, op, opset):
    et = _peers.ort_elem_type(c.dtype)
    inits = [_peers.ort_initializer("W", c.w)] + ([_peers.ort_initializer("B", c.b)] if c.b is not None else [])
    node = _libs.helper.make_node(op, ["X"] + [t.name for t in inits], ["Y"], axis=-1, epsilon=c.eps)
    return _peers.ort_model_bytes(node, [_libs.helper.make_tensor_value_info("X", et, ["N", c.n])],
                                  [_libs.helper.make_tensor_value_info("Y", et, ["N", c.n])], inits, opset)


def ort_choose_model(c):
    """First ORT op that builds a session and agrees with normkit; (op, opset, bytes, graph) or reason."""
    reasons = []
    ref = normkit_impls(c)[0].output()

    for op, opset in ORT_OPS[c.op]:
        try:
            model = ort_model(c, op, opset)
            sess, nodes = _peers.ort_optimized_session(model)
            y = out_buffer(c)
            bind = sess.io_binding()
            bind.bind_ortvalue_input("X", _peers.ort_ortvalue(c.x))
            bind.bind_ortvalue_output("Y", _peers.ort_ortvalue(y))
            sess.run_with_iobinding(bind)
            err = _check.max_rel_err_chunked(y, ref)
            if not err <= _check.tolerance(c.dtype):
                reasons.append(f"{op}: output differs from normkit (max rel err {err:.2e})")
                continue
            return (op, opset, model), nodes
        except Exception as exc:
            reasons.append(f"{op}(opset {opset}): {_check.first_line(exc)[:160]}")
    return None, "; ".join(reasons)


# ---------------------------------------------------------------------------------------------
# running


def run_case(c, limit, log, results, notes):
    log(_report.case_title(c))
    # every implementation is checked against a float64 reference on sampled rows (and compared with
    # normkit on the whole array) before it is timed
    idx = _data.sampled_rows(c.shape[0])
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

    def make_impls(t, case_notes):
        impls = normkit_impls(c)
        if "numpy" in ARGS.libs:
            more, note = numpy_impls(c)
            impls += more
            if note:
                case_notes.append(note)
        if torch is not None:
            impls += torch_impls(c)
        if ort_info is not None:
            try:
                impls += _peers.ort_impls(ort_info[2], t, c.x, out_buffer(c))
            except Exception as exc:
                case_notes.append(f"onnxruntime skipped at {t} threads: {exc}")
        return impls

    _run.run_threads(c, ARGS, limit, log, results, notes, make_impls, idx, ref_rows,
                     "max rel err vs float64 reference on sampled rows | vs normkit, whole array",
                     unprefixed_notes=("NumPy: float32 only",))


def header_lines(limit_helper_ok):
    return _report.header_lines(
        ARGS, limit_helper_ok,
        "normkit.layer_norm/rms_norm, fresh output and out=; NumPy: plain float32 "
        "mean/var/normalize (float32 cases only); PyTorch: torch.nn.functional.layer_norm/rms_norm "
        "on torch.from_numpy views under inference_mode, fresh output only (no out= in that API); "
        "ONNX Runtime: a one-node model (weights as initializers), session.run() (fresh output, "
        "returned as a NumPy array) and run_with_iobinding into a preallocated array (out=); "
        "bfloat16 only through io_binding")


def target_rows(results):
    fraction = {case: FRACTION_TARGET for case in CASES if case not in LATENCY_CASES}
    return _report.target_rows(results, ARGS, TARGETS, fraction, untimed_prefix="", fraction_missed="missed")


def main():
    _run.main(ARGS, "normkit rows benchmark", "LayerNorm / RMSNorm forward", 2,
              header_lines, Case, run_case, target_rows)


if __name__ == "__main__":
    main()

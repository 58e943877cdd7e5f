#!/usr/bin/env python3
"""normkit BatchNorm / GroupNorm / InstanceNorm forward against PyTorch and ONNX Runtime, in one process.

    python bench/python/bench_channels.py                  # full run (2-3 minutes on 2 cores)
    python bench/python/bench_channels.py --quick          # smoke test (about 1.5 minutes)
    python bench/python/bench_channels.py --threads 2 --cases 'bn_*' --markdown channels.md

Cases (issue 3): BatchNorm2d [32,64,56,56] inference and training in NCHW and NHWC, BatchNorm1d
[4096,1024] inference (layout NC), GroupNorm G=32 [8,320,64,64] NCHW and NHWC, [1,320,64,64] NHWC (one
sample, in cache) and float32 [1,1280,8,8] and [1,320,32,32] NCHW and NHWC (`gn_*_unet8`, `gn_*_unet32`: a
diffusion UNet's inner blocks at batch 1), InstanceNorm2d [16,64,128,128] NCHW, and float16/bfloat16 versions
of the BatchNorm2d and the first three GroupNorm cases. Shapes are written logically as [N, C, spatial...]; an NHWC case stores x as (N, H, W, C).

The timing machinery is the rows benchmark's (bench_rows.py, _run.py): per case and thread count,
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

import os
import sys
from collections import Counter

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
# The last stage at batch 8, as an inference server runs it: 3 MiB, in cache; per-call costs weigh.
BN2D_B8_2048x7x7 = (8, 2048, 7, 7)
# One sample of ResNet-50's last stage but one (batch-1 fine-tuning): 100 KiB; per-call costs weigh.
BN2D_B1_512x7x7 = (1, 512, 7, 7)
BN1D = (4096, 1024)
GN = (8, 320, 64, 64)
GN1 = (1, 320, 64, 64)  # one sample: the common inference case (issue 12), 5 MiB of float32, in cache
# Smaller single samples, as the inner blocks of a diffusion UNet (320 KiB and 1.25 MiB of float32):
# per-call costs that do not grow with the data weigh here.
GN_UNET8 = (1, 1280, 8, 8)
GN_UNET32 = (1, 320, 32, 32)
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
    "bn_train_nchw_7x7": ("batch_norm", BN2D_7x7, "NCHW", True, "float32"),
    "bn_inf_nchw_2048x7x7": ("batch_norm", BN2D_2048x7x7, "NCHW", False, "float32"),
    "bn_train_nchw_2048x7x7": ("batch_norm", BN2D_2048x7x7, "NCHW", True, "float32"),
    "bn_train_nchw_1024x14x14": ("batch_norm", BN2D_1024x14x14, "NCHW", True, "float32"),
    "bn_inf_nchw_b8_2048x7x7": ("batch_norm", BN2D_B8_2048x7x7, "NCHW", False, "float32"),
    "bn_train_nchw_b8_2048x7x7": ("batch_norm", BN2D_B8_2048x7x7, "NCHW", True, "float32"),
    "bn_train_nchw_b1_512x7x7": ("batch_norm", BN2D_B1_512x7x7, "NCHW", True, "float32"),
    "bn1d_inf": ("batch_norm", BN1D, "NC", False, "float32"),
    "gn_nchw": ("group_norm", GN, "NCHW", True, "float32"),
    "gn_nhwc": ("group_norm", GN, "NHWC", True, "float32"),
    "gn_nhwc_n1": ("group_norm", GN1, "NHWC", True, "float32"),
    "gn_nchw_unet8": ("group_norm", GN_UNET8, "NCHW", True, "float32"),
    "gn_nhwc_unet8": ("group_norm", GN_UNET8, "NHWC", True, "float32"),
    "gn_nchw_unet32": ("group_norm", GN_UNET32, "NCHW", True, "float32"),
    "gn_nhwc_unet32": ("group_norm", GN_UNET32, "NHWC", True, "float32"),
    "in_nchw": ("instance_norm", IN2D, "NCHW", True, "float32"),
}
for _dt, _suffix in (("float16", "f16"), ("bfloat16", "bf16")):
    for _base in ("bn_inf_nchw", "bn_inf_nhwc", "bn_train_nchw", "bn_train_nhwc", "gn_nchw", "gn_nhwc", "gn_nhwc_n1"):
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
    "gn_nhwc_n1": [("torch", 2.0)],
    "gn_nhwc_unet8": [("torch", 2.0)],
    "gn_nhwc_unet32": [("torch", 2.0)],
    "in_nchw": [("torch", 4.0)],
}
for _name in CASES:
    if _name.endswith(("_f16", "_bf16")):
        TARGETS[_name] = [("torch", 1.5)]
FRACTION_TARGETS = {"bn_inf_nchw": 0.85, "bn_inf_nhwc": 0.85, "bn1d_inf": 0.85}

LIBS = ("normkit", "torch", "onnxruntime")


ARGS = _cli.parse_args(__doc__, CASES, LIBS, reps_default=11,
                       reps_note=", which keeps the full run within about 4 minutes on a busy 2-core machine")
_libs.configure_environment(ARGS)
_libs.load_libraries(ARGS)  # NumPy, normkit (first), ml_dtypes, PyTorch, ONNX Runtime
np, normkit, torch, F, ort = _libs.np, _libs.normkit, _libs.torch, _libs.F, _libs.ort

ORT_NHWC_NOTE = ("onnxruntime: not timed in NHWC: its CPU execution provider has no channels-last "
                 "BatchNormalization/GroupNormalization/InstanceNormalization (the ONNX ops are channels-first)")


# ---------------------------------------------------------------------------------------------
# reference data and float64 reference


class Case:
    def __init__(self, name):
        self.name = name
        self.op, self.shape, self.layout, self.training, self.dtype_name = CASES[name]
        self.dtype = _libs.np_dtype(self.dtype_name)
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
        x32, self.scale_c, self.shift_c = _data.random_channels(rng, self.phys, channels_last(self.layout))
        self.x = _data.placed_array(x32, self.dtype)
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


RUNNING_TOL = 1e-4  # relative, running statistics after one training step (float32 accumulation)


# ---------------------------------------------------------------------------------------------
# implementations


def out_buffer(c):
    return _data.placed_empty(c.phys, c.dtype, ARGS.out_offset)


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


def torch_impls(c, notes):
    cl = channels_last(c.layout)
    tx = _peers.to_torch_nchw(c.x, cl)
    tw, tb = _peers.to_torch(c.w), _peers.to_torch(c.b)
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
    return [Impl("torch", f, lambda: _peers.from_torch_nchw(f(), cl, notes), "torch", running)]


# ONNX Runtime ----------------------------------------------------------------------------------

ORT_OPS = {"batch_norm": ("BatchNormalization", 15), "group_norm": ("GroupNormalization", 21),
           "instance_norm": ("InstanceNormalization", 17)}


def ort_outputs(c):
    return ["Y", "RM", "RV"] if c.op == "batch_norm" and c.training else ["Y"]


def ort_model(c):
    op, opset = ORT_OPS[c.op]
    et = _peers.ort_elem_type(c.dtype)
    if c.op == "batch_norm":
        # scale/B (T1) and mean/var (T2) may be float32 with 16-bit X (opset 15)
        inits = [_peers.ort_initializer(n, a) for n, a in (("W", c.w), ("B", c.b), ("M", c.rm0), ("V", c.rv0))]
        attrs = {"epsilon": EPS}
        if c.training:
            attrs.update(training_mode=1, momentum=1.0 - MOMENTUM)
    else:
        # GroupNormalization-21 / InstanceNormalization: scale and bias in X's type
        inits = [_peers.ort_initializer("W", c.w.astype(c.dtype)), _peers.ort_initializer("B", c.b.astype(c.dtype))]
        attrs = {"epsilon": EPS}
        if c.op == "group_norm":
            attrs["num_groups"] = GROUPS
    outs = ort_outputs(c)
    node = _libs.helper.make_node(op, ["X"] + [t.name for t in inits], outs, **attrs)
    vi = [_libs.helper.make_tensor_value_info("Y", et, list(c.phys))]
    vi += [_libs.helper.make_tensor_value_info(o, _libs.TensorProto.FLOAT, [c.c]) for o in outs[1:]]
    x_info = [_libs.helper.make_tensor_value_info("X", et, list(c.phys))]
    return op, opset, _peers.ort_model_bytes(node, x_info, vi, inits, opset)


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
    try:
        op, opset, model = ort_model(c)
        sess, nodes = _peers.ort_optimized_session(model)
        sess.run(None, {"X": c.x})
    except Exception as exc:
        return None, f"onnxruntime: skipped ({_check.first_line(exc)[:200]})"
    how = "function expanded by ORT, no CPU kernel" if len(nodes) > 3 and op not in nodes else \
        ("float32 kernel between Casts" if "Cast" in nodes else "one kernel")
    return (op, opset, model), (f"onnxruntime: {op} (opset {opset}), graph after optimization: "
                                f"{describe_graph(nodes)} [{how}]")


def ort_impls(c, model_info, threads):
    """model_info: (op, opset, model bytes); a fresh session with ``threads`` intra-op threads."""
    extra = [(name, np.empty(c.c, np.float32)) for name in ort_outputs(c)[1:]]
    return _peers.ort_impls(model_info[2], threads, c.x, out_buffer(c), extra)


# ---------------------------------------------------------------------------------------------
# running


def sample_index(c):
    """Samples of the batch the float64 reference is computed for."""
    if c.s == 1:  # BatchNorm1d: rows
        return _data.sampled_rows(c.n)
    return _data.sampled_batch(c.n)


def run_case(c, limit, log, results, notes):
    log(_report.case_title(c))
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

    def make_impls(t, case_notes):
        impls = normkit_impls(c)
        if torch is not None:
            impls += torch_impls(c, case_notes)
        if ort_info is not None:
            try:
                impls += ort_impls(c, ort_info, t)
            except Exception as exc:
                case_notes.append(f"onnxruntime skipped at {t} threads: {exc}")
        return impls

    check_what = ("max rel err vs float64 reference on samples " + ",".join(map(str, idx[:3]))
                  + ("..." if len(idx) > 3 else "") + " | vs normkit, whole array"
                  + (" | running stats after one step vs float64" if exp_running is not None else ""))
    _run.run_threads(c, ARGS, limit, log, results, notes, make_impls, idx, ref, check_what,
                     exp_running=exp_running, running_tol=RUNNING_TOL)


def header_lines(limit_helper_ok):
    cache = ""
    if hasattr(normkit, "set_output_cache_limit"):
        try:
            from normkit import _dtypes as nk_dtypes

            cache = (f"; normkit takes fresh outputs of >= {_report.mib(nk_dtypes.CACHED_OUTPUT_MIN_BYTES):g} MiB "
                     "from its cache of freed output buffers (already mapped: no page faults)")
        except (ImportError, AttributeError):
            cache = "; normkit reuses large freed output buffers (output cache)"
    extra = [
        ("bytes", "GB/s and the limit count x read once + y written once in every case; BatchNorm "
                  "training needs x's statistics before it writes y (x read twice unless it stays in "
                  "cache), yet is held to the same 1-read + 1-write limit, as in the rows benchmark"),
        ("parameters", f"eps {EPS:g}; GroupNorm {GROUPS} groups; weight/bias float32, and BatchNorm "
                       f"running_mean/running_var float32 (momentum {MOMENTUM:g}, one copy per "
                       "implementation, updated in place in training), for every x dtype -- for 16-bit x "
                       "PyTorch's mixed-type path; ONNX Runtime's GroupNormalization/InstanceNormalization "
                       "take scale/bias in x's dtype"),
    ]
    return _report.header_lines(
        ARGS, limit_helper_ok,
        "normkit.batch_norm/group_norm/instance_norm (layout= the case's), "
        "fresh output and out=; PyTorch: torch.nn.functional.batch_norm/group_norm/instance_norm "
        "on torch.from_numpy views (NHWC: .permute(0,3,1,2), a channels_last NCHW tensor; "
        "bfloat16 through an int16 view) under inference_mode, fresh output only (no out= in "
        "that API); ONNX Runtime (channels-first only): a one-node model (parameters as "
        "initializers), session.run() (fresh output, returned as a NumPy array) and "
        "run_with_iobinding into a preallocated array (out=); bfloat16 only through io_binding",
        allocator_note=cache, extra=extra)


def target_rows(results):
    return _report.target_rows(results, ARGS, TARGETS, FRACTION_TARGETS)


def main():
    _run.main(ARGS, "normkit channels benchmark", "BatchNorm / GroupNorm / InstanceNorm forward", 3,
              header_lines, Case, run_case, target_rows, skip_failed_cases=True, report_total_time=True)


if __name__ == "__main__":
    main()

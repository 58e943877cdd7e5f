"""Shared machinery for normkit's Python benchmarks.

- ``Entry`` / ``run_round_robin``: interleave several implementations round-robin, one sample of
  each per repetition (rotating the start so nobody always runs right after the same neighbour),
  optionally sleeping between two samples so that threads left spinning by one library have gone
  to sleep before the next one is timed.
- ``BandwidthLimit``: the memory-bandwidth limit for a working set, measured like the norm itself
  (read an array, write an array of the same size) with ``np.copyto`` -- glibc ``memcpy`` -- on 1
  thread, and split in two halves on 2 Python threads (NumPy releases the GIL while copying).
  glibc switches to non-temporal (streaming) stores only for single copies above
  ``x86_non_temporal_threshold`` (about 41 MiB here), so two halves of a 64 MiB array would be
  copied with ordinary stores and understate what 2 threads can do; a helper process started with
  a low threshold (``GLIBC_TUNABLES``) supplies the streaming variant. The limit is the fastest of
  all the variants, so "fraction of limit" never flatters a kernel.
- ``copy_server_main``: that helper (``python _harness.py --copy-server``).
- What the benchmark scripts (bench_rows.py, bench_channels.py, bench_backward.py, bench_fused.py)
  share around their cases: the command line (``parse_args``), the environment and the libraries under test
  (``configure_environment``, ``load_libraries``), validation (``Impl``, ``validate_impls``,
  ``max_rel_err``, ``tolerance``), PyTorch and ONNX Runtime plumbing (``to_torch``,
  ``ort_session``, ``ort_impls``, ...), the per-thread-count run (``run_threads``), the header,
  the target block, the markdown file and the raw numbers as JSON (``header_lines``, ``target_rows``,
  ``print_targets``, ``write_markdown``, ``write_json``) and the main loop (``main``).

Importing this module imports only the standard library, so that a benchmark script can parse
its command line and set the environment (OpenMP, OpenBLAS, allocator) first; NumPy is imported by
``import_numpy`` (``load_libraries`` calls it), and the libraries under test by ``load_libraries``,
which binds them as module globals (``np``, ``normkit``, ``torch``, ``F``, ``ort``, ...).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

# Set by import_numpy / load_libraries (see the module docstring); None until then.
np = None
normkit = ml_dtypes = BF16 = None
torch = F = None
ort = onnx = TensorProto = helper = numpy_helper = None
SKIPPED_LIBS = {}  # library -> why it is not timed
ORT_SPIN = {}  # ONNX Runtime session config entries for the --spin policy


def import_numpy():
    """Import NumPy (after configure_environment) into this module and return it."""
    global np
    if np is None:
        import numpy

        np = numpy
    return np

# --------------------------------------------------------------------------------------------
# timing


@dataclass
class Entry:
    """One thing to time. ``fn`` is a call to time; or ``sampler(k)`` returns seconds per call."""

    name: str
    fn: Optional[Callable[[], object]] = None
    sampler: Optional[Callable[[int], float]] = None
    k: int = 1  # calls per sample (set by calibration)
    samples: list = field(default_factory=list)

    def sample(self, k: int) -> float:
        if self.sampler is not None:
            return self.sampler(k)
        fn = self.fn
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (noise indicator)."""
        s = sorted(self.samples)
        if len(s) < 4:
            return float("nan")
        q1, q3 = np.percentile(s, [25, 75])
        return (q3 - q1) / statistics.median(s)


def run_round_robin(entries, reps: int, warmup: int, sample_s: float, gap_s: float,
                    prime: bool = True, max_k: int = 2000) -> None:
    """Warm up and calibrate every entry, then take ``reps`` interleaved samples of each.

    gap_s: sleep after every sample, so that worker threads one library left spinning are asleep
    before the next one is timed. prime: make one untimed call right before every sample, so that
    the sample sees the library's own threads awake (as in a loop of calls) rather than paying for
    waking them (and, in a VM, an idle virtual CPU) -- about 0.4 ms measured here.
    """

    def pause():
        if gap_s > 0:
            time.sleep(gap_s)

    for e in entries:
        for _ in range(warmup):
            e.sample(1)
        t1 = min(e.sample(1) for _ in range(3))  # min: one preempted call must not decide the batch
        if t1 < sample_s:  # small problem: batch calls so that a sample lasts about sample_s
            t1 = min(t1, e.sample(8))
            e.k = int(max(1, min(max_k, math.ceil(sample_s / max(t1, 1e-9)))))
        else:
            e.k = 1
        e.samples = []
        pause()
    n = len(entries)
    for r in range(reps):
        start = r % n
        for e in entries[start:] + entries[:start]:
            if prime:
                e.sample(1)
            e.samples.append(e.sample(e.k))
            pause()


# --------------------------------------------------------------------------------------------
# placement

HUGE = 2 << 20


def placed_empty(shape, dtype, offset: int = 0, fill=0):
    """A C-contiguous array starting ``offset`` bytes after a 2 MiB boundary, pages touched.

    Where an output lies relative to its input matters on this machine: with y - x within 64
    bytes above a multiple of 1 MiB (what two back-to-back NumPy allocations of a size that is a
    multiple of 1 MiB give), memcpy ran ~1.7x and a normalization kernel up to 3x slower than with
    x and y both on 2 MiB boundaries. So the benchmark places its buffers itself: x at a 2 MiB
    boundary and every preallocated output at ``offset`` after one (0 by default).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + HUGE + offset, np.uint8)
    start = (-buf.ctypes.data) % HUGE + offset
    a = buf[start:start + nbytes].view(dtype).reshape(shape)
    if fill is not None:
        a.fill(fill)
    return a


# --------------------------------------------------------------------------------------------
# bandwidth limit


class SplitCopier:
    """np.copyto(dst, src) on two threads: this one copies the first half, a worker the second."""

    def __init__(self):
        self._go = threading.Event()
        self._done = threading.Event()
        self._job = None
        self._stop = False
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self):
        while True:
            self._go.wait()
            self._go.clear()
            if self._stop:
                return
            dst, src = self._job
            np.copyto(dst, src)
            self._done.set()

    def copy(self, dst, src):
        h = (src.size // 2) & ~63  # split on a cache-line multiple
        self._job = (dst[h:], src[h:])
        self._go.set()
        np.copyto(dst[:h], src[:h])
        self._done.wait()
        self._done.clear()

    def close(self):
        self._stop = True
        self._go.set()
        self._thread.join(timeout=1)


def _copy_buffers(nbytes: int, offset: int = 0):
    n = max(64, (nbytes + 3) // 4)
    src = placed_empty((n,), np.float32, 0, fill=None)
    src[...] = np.random.default_rng(1).random(n, dtype=np.float32)
    dst = placed_empty((n,), np.float32, offset)  # pages faulted in before timing
    return src, dst


class _LocalCopier:
    def __init__(self):
        self.src = self.dst = None
        self.split = SplitCopier()

    def setup(self, nbytes, offset=0):
        self.src, self.dst = _copy_buffers(nbytes, offset)

    def time(self, threads, k):
        src, dst = self.src, self.dst
        if threads == 1:
            t0 = time.perf_counter()
            for _ in range(k):
                np.copyto(dst, src)
        else:
            copy = self.split.copy
            t0 = time.perf_counter()
            for _ in range(k):
                copy(dst, src)
        return (time.perf_counter() - t0) / k

    def release(self):
        self.src = self.dst = None

    def close(self):
        self.split.close()


def copy_server_main():
    """Line protocol on stdin/stdout: {"setup": nbytes} | {"time": [threads, k]} | {"release": 1}."""
    c = _LocalCopier()
    out = sys.stdout
    for line in sys.stdin:
        msg = json.loads(line)
        if "setup" in msg:
            c.setup(int(msg["setup"]), int(msg.get("offset", 0)))
            reply = {"ok": 1}
        elif "time" in msg:
            reply = {"t": c.time(*msg["time"])}
        elif "release" in msg:
            c.release()
            reply = {"ok": 1}
        elif "info" in msg:
            reply = {"ok": 1, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
        else:
            reply = {"error": "bad message"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _RemoteCopier:
    """A copy helper in a separate process with a low glibc non-temporal threshold."""

    def __init__(self, nt_threshold: int):
        env = dict(os.environ)
        tun = f"glibc.cpu.x86_non_temporal_threshold={nt_threshold:#x}"
        env["GLIBC_TUNABLES"] = (env["GLIBC_TUNABLES"] + ":" + tun) if env.get("GLIBC_TUNABLES") else tun
        env["OPENBLAS_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--copy-server"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._ask({"info": 1})

    def _ask(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("copy helper process died")
        return json.loads(line)

    def setup(self, nbytes, offset=0):
        self._ask({"setup": int(nbytes), "offset": int(offset)})

    def time(self, threads, k):
        return self._ask({"time": [threads, k]})["t"]

    def release(self):
        self._ask({"release": 1})

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()


def glibc_nt_threshold() -> Optional[int]:
    """glibc's x86_non_temporal_threshold for this process's environment (None if unknown)."""
    for ld in ("/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        if os.path.exists(ld):
            try:
                txt = subprocess.run([ld, "--list-tunables"], capture_output=True, text=True,
                                     timeout=5).stdout
            except Exception:
                return None
            for line in txt.splitlines():
                if line.startswith("glibc.cpu.x86_non_temporal_threshold:"):
                    return int(line.split(":")[1].split()[0], 16)
    return None


class BandwidthLimit:
    """Copy entries (memcpy 1T / 2T, and streaming memcpy 1T / 2T) for one working set."""

    def __init__(self, streaming_helper: bool = True, nt_threshold: int = 1 << 20):
        self.local = _LocalCopier()
        self.remote = None
        self.remote_error = None
        if streaming_helper:
            try:
                self.remote = _RemoteCopier(nt_threshold)
            except Exception as exc:  # pragma: no cover - best effort
                self.remote_error = str(exc)
        self.nbytes = 0

    def setup(self, nbytes: int, offset: int = 0):
        """nbytes: the size of x (the copy reads nbytes and writes nbytes, like the norm); source
        and destination placed like x and a preallocated output (see placed_empty)."""
        self.nbytes = nbytes
        self.local.setup(nbytes, offset)
        if self.remote:
            self.remote.setup(nbytes, offset)

    def entries(self, threads: int):
        out = [Entry("copy memcpy 1T", sampler=lambda k: self.local.time(1, k))]
        if threads >= 2:
            out.append(Entry("copy memcpy 2T", sampler=lambda k: self.local.time(2, k)))
        if self.remote:
            out.append(Entry("copy streaming 1T", sampler=lambda k: self.remote.time(1, k)))
            if threads >= 2:
                out.append(Entry("copy streaming 2T", sampler=lambda k: self.remote.time(2, k)))
        return out

    def release(self):
        self.local.release()
        if self.remote:
            self.remote.release()

    def close(self):
        self.local.close()
        if self.remote:
            self.remote.close()


# --------------------------------------------------------------------------------------------
# environment facts


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def loaded_libraries(substrings) -> list:
    """Paths of shared objects mapped into this process whose file name contains a substring."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    path = parts[-1]
                    base = os.path.basename(path)
                    if any(s in base for s in substrings) and path not in found:
                        found.append(path)
    except OSError:
        pass
    return found


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (a busy machine makes every number noisy)."""
    return " ".join(read_text("/proc/loadavg").split()[:3])


# --------------------------------------------------------------------------------------------
# command line, environment and the libraries under test


def parse_args(doc, cases, libs, reps_default, reps_note="", out_offset_note="", argv=None,
               threads_default="1,2", extra_args=None):
    """The benchmark scripts' common command line. doc: the script's docstring (its first paragraph
    is the description); cases: the case names (--cases takes names or globs); libs: the
    implementations --libs may name; reps_default: --reps without --quick. reps_note and
    out_offset_note: text added to those options' help. threads_default: --threads without it.
    extra_args(ap): adds a script's own options to the argparse parser."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions, short samples (smoke test)")
    ap.add_argument("--threads", default=threads_default,
                    help=f"comma-separated thread counts (default {threads_default})")
    ap.add_argument("--cases", default="all",
                    help="comma-separated case names or globs (default all): " + ", ".join(cases))
    ap.add_argument("--libs", default=",".join(libs),
                    help="comma-separated implementations to time (default all): " + ", ".join(libs)
                    + " (normkit is always timed; the others are skipped if not installed)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the results as markdown to FILE")
    ap.add_argument("--json", metavar="FILE",
                    help="also write the raw numbers (header, every result row with its samples' "
                         "median, targets, notes) as JSON to FILE")
    ap.add_argument("--reps", type=int,
                    help=f"samples per implementation (default {reps_default}{reps_note}; 5 with --quick)")
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
                         "copy destination) starts BYTES after one (default 0)" + out_offset_note)
    ap.add_argument("--no-streaming-limit", action="store_true",
                    help="do not start the helper process that measures memcpy with non-temporal stores")
    if extra_args is not None:
        extra_args(ap)
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not args.threads or min(args.threads) < 1:
        ap.error("--threads: positive integers, e.g. 1,2")
    names = []
    for pat in args.cases.split(","):
        pat = pat.strip()
        if pat in ("all", ""):
            matched = list(cases)
        else:
            matched = [c for c in cases if fnmatch.fnmatchcase(c, pat)]
        if not matched:
            ap.error(f"--cases: {pat!r} matches none of: {', '.join(cases)}")
        names += [m for m in matched if m not in names]
    args.cases = names
    args.libs = [s.strip() for s in args.libs.split(",") if s.strip()]
    bad = [s for s in args.libs if s not in libs]
    if bad:
        ap.error(f"--libs: unknown {bad}; choose from {', '.join(libs)}")
    if "normkit" not in args.libs:
        args.libs.insert(0, "normkit")
    if args.reps is None:
        args.reps = 5 if args.quick else reps_default
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


def load_libraries(args):
    """Import NumPy, normkit (first: it brings the libgomp it was built with; PyTorch shares it),
    ml_dtypes and the peers named in args.libs into this module's globals; a peer that is not
    installed goes to SKIPPED_LIBS. Also applies --hugepages off to NumPy and sets ORT_SPIN."""
    global normkit, ml_dtypes, BF16, torch, F, ort, onnx, TensorProto, helper, numpy_helper, ORT_SPIN
    import_numpy()
    import normkit

    try:
        import ml_dtypes

        BF16 = np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover
        ml_dtypes = None
        BF16 = None
    if "torch" in args.libs:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError as exc:
            torch = F = None
            SKIPPED_LIBS["torch"] = f"not installed ({exc})"
    if "onnxruntime" in args.libs:
        try:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper, numpy_helper
        except ImportError as exc:
            onnx = ort = None
            SKIPPED_LIBS["onnxruntime"] = f"not installed ({exc})"
    if args.hugepages == "off":
        np._core.multiarray._set_madvise_hugepage(False) if hasattr(np, "_core") else \
            np.core.multiarray._set_madvise_hugepage(False)
    ORT_SPIN = {
        "bounded": {"session.intra_op.spin_duration_us": "5000"},
        "passive": {"session.intra_op.allow_spinning": "0"},
        "default": {},
    }[args.spin]


def set_threads(t):
    """Set every loaded library to t threads; what each reports back (ORT: per fresh session)."""
    normkit.set_num_threads(t)
    got = {"normkit": normkit.get_num_threads()}
    if torch is not None:
        torch.set_num_threads(t)
        got["torch"] = torch.get_num_threads()
    if ort is not None:
        got["onnxruntime"] = f"{t} (intra_op_num_threads, fresh session)"
    return got


# --------------------------------------------------------------------------------------------
# dtypes and validation


def np_dtype(name):
    """The NumPy dtype for a case's dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        if BF16 is None:
            raise RuntimeError("bfloat16 cases need ml_dtypes")
        return BF16
    return np.dtype(name)


def eps_of(dtype):
    """Machine epsilon of dtype (bfloat16 included)."""
    if BF16 is not None and np.dtype(dtype) == BF16:
        return float(ml_dtypes.finfo(BF16).eps)
    return float(np.finfo(dtype).eps)


def mib(n):
    return n / 2**20


def fmt_ms(s):
    """Seconds as milliseconds, 3 decimals below 100 ms, 1 above."""
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def max_rel_err(a, ref):
    """max |a - ref| / max(1, |ref|), in float64."""
    a = np.asarray(a).astype(np.float64) if a.dtype != np.float64 else a
    ref = np.asarray(ref).astype(np.float64) if ref.dtype != np.float64 else ref
    return float(np.max(np.abs(a - ref) / np.maximum(1.0, np.abs(ref)))) if a.size else 0.0


def max_rel_err_chunked(a, ref, chunk=1 << 22):
    """max_rel_err of two large arrays, in float32 chunks (bounded memory)."""
    a = a.reshape(-1)
    ref = ref.reshape(-1)
    worst = 0.0
    for i in range(0, a.size, chunk):
        worst = max(worst, max_rel_err(a[i:i + chunk].astype(np.float32), ref[i:i + chunk].astype(np.float32)))
    return worst


def tolerance(dtype):
    """Allowed max_rel_err against the float64 reference."""
    # fp32: accumulation order differs between libraries; 16-bit: a couple of output roundings.
    return 1000 * eps_of(np.float32) if dtype == np.float32 else 8 * eps_of(dtype)


class Impl:
    """An implementation: a call to time, how to get its output once for validation, and (BatchNorm
    training) how to reset its running statistics, make one call and return them (None if not checked)."""

    def __init__(self, name, fn, output, lib, running=None):
        self.name, self.fn, self.output, self.lib, self.running = name, fn, output, lib, running


def validate_impls(impls, idx, ref, tol, case_notes, exp_running=None, running_tol=None):
    """Run every implementation once and check it: its output at idx against the float64 reference
    ref (within tol), the whole output against normkit's (impls[0], reported only), and with
    exp_running its running statistics after one call (within running_tol). Returns the ones that
    pass and one check string per implementation; why one fails goes to case_notes.

    An output may be a tuple of arrays (a backward's (dx, dweight, dbias)): ref is then a tuple too,
    its first element checked at idx and the others whole (None in either: not checked), and tol
    may be a tuple (one tolerance per element; None: reported, not checked); the errors are reported
    element by element ("/")."""
    nk_y = _copy_output(impls[0].output())  # normkit's fresh output may be a reused buffer
    good, checks = [], []
    for im in impls:
        try:
            y = im.output()
        except Exception as exc:
            case_notes.append(f"{im.name}: failed to run ({exc}); not timed")
            continue
        errs = _output_errs(y, ref, idx)
        vs_nk = _output_errs(y, nk_y)
        tols = tol if isinstance(tol, tuple) else (tol,) * len(errs)
        bad = [(e, t) for e, t in zip(errs, tols) if e is not None and t is not None and not e <= t]
        ok = not bad
        msg = f"{im.name} {_fmt_errs(errs)}|{_fmt_errs(vs_nk)}"
        if not ok:
            err, t = max(bad, key=lambda b: b[0] / b[1])
            case_notes.append(f"{im.name}: max rel err {err:.2e} against the float64 reference "
                              f"(tolerance {t:.1e}); not timed")
        del y
        if ok and im.running is not None and exp_running is not None:
            rm, rv = im.running()
            rerr = max(max_rel_err(rm, exp_running[0]), max_rel_err(rv, exp_running[1]))
            msg += f"|run {rerr:.1e}"
            if not rerr <= running_tol:
                ok = False
                case_notes.append(f"{im.name}: running statistics after one step off by {rerr:.2e} "
                                  f"(tolerance {running_tol:.0e}); not timed")
        checks.append(msg)
        if ok:
            good.append(im)
    del nk_y
    gc.collect()
    return good, checks


def _copy_output(y):
    if isinstance(y, tuple):
        return tuple(None if a is None else np.array(a, copy=True) for a in y)
    return np.array(y, copy=True)


def _output_errs(y, ref, idx=None):
    """max rel errs of an output against ref, one per element (a list of one for an array): at idx
    if given, else whole (chunked); a tuple output element by element, the first at idx, the others
    whole, None where either side is None."""
    if not isinstance(y, tuple):
        if idx is not None:
            return [max_rel_err(np.asarray(y[idx]), ref)]
        return [max_rel_err_chunked(np.asarray(y), np.asarray(ref))]
    errs = _output_errs(y[0], ref[0], idx)
    for a, r in zip(y[1:], ref[1:]):
        errs.append(None if a is None or r is None else max_rel_err_chunked(np.asarray(a), np.asarray(r)))
    return errs


def _fmt_errs(errs):
    return "/".join("-" if e is None else f"{e:.1e}" for e in errs)


# --------------------------------------------------------------------------------------------
# PyTorch and ONNX Runtime plumbing


def to_torch(a):
    """A tensor sharing a NumPy array's memory (bfloat16 through an int16 view); None stays None."""
    if a is None:
        return None
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def from_torch(t):
    """A NumPy array sharing a CPU tensor's memory (bfloat16 as ml_dtypes.bfloat16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def ort_elem_type(dtype):
    """The ONNX element type of a NumPy dtype."""
    return {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            BF16: TensorProto.BFLOAT16}[np.dtype(dtype)]


def ort_initializer(name, a):
    """An ONNX initializer holding array a (bfloat16 as raw bytes)."""
    if a.dtype == BF16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, a.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(a, name)


def ort_model_bytes(node, inputs, outputs, inits, opset, domains=()):
    """A serialized one-node ONNX model (graph "norm", default domain at opset, IR version <= 10).
    domains: further (domain, version) opset imports, e.g. ("com.microsoft", 1) for ORT's contrib ops."""
    graph = helper.make_graph([node], "norm", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, v) for d, v in domains])
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()


def ort_session(model, threads, optimized_path=None):
    """A sequential CPU session with ``threads`` intra-op threads and the --spin policy (ORT_SPIN)."""
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


def ort_optimized_session(model):
    """A 1-thread session for model and the op types of its graph after ORT's optimizations."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        sess = ort_session(model, 1, optimized_path=path)
        nodes = [n.op_type for n in onnx.load(path).graph.node]
    return sess, nodes


def ort_ortvalue(a):
    """An OrtValue sharing a NumPy array's memory (bfloat16 through a uint16 view)."""
    if a.dtype == BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(a)


def ort_impls(model, threads, x, y, extra_outputs=(), extra_inputs=(), all_outputs=False):
    """ONNX Runtime on a fresh session with ``threads`` intra-op threads: session.run() (fresh
    output; not for bfloat16) and run_with_iobinding into the preallocated y ("onnxruntime out=").
    The model reads "X", then the inputs named in extra_inputs, a list of (name, array), and writes
    "Y", then the outputs named in extra_outputs, a list of (name, preallocated array) bound for
    the out= variant. all_outputs: the implementations' output for validation is the tuple of
    every output (else Y alone)."""
    sess = ort_session(model, threads)
    outs = ["Y"] + [name for name, _ in extra_outputs]
    impls = []
    if x.dtype != BF16:
        feeds = {"X": x, **dict(extra_inputs)}
        f = lambda: sess.run(outs, feeds)  # noqa: E731
        impls.append(Impl("onnxruntime", f, (lambda: tuple(f())) if all_outputs else (lambda: f()[0]),
                          "onnxruntime"))
    xv, yv = ort_ortvalue(x), ort_ortvalue(y)
    if xv.data_ptr() != x.ctypes.data or yv.data_ptr() != y.ctypes.data:
        raise RuntimeError("OrtValue does not share the NumPy buffer")
    bind = sess.io_binding()
    bind.bind_ortvalue_input("X", xv)
    iv = [ort_ortvalue(a) for _, a in extra_inputs]
    for (name, _), v in zip(extra_inputs, iv):
        bind.bind_ortvalue_input(name, v)
    bind.bind_ortvalue_output("Y", yv)
    ev = [ort_ortvalue(a) for _, a in extra_outputs]
    for (name, _), v in zip(extra_outputs, ev):
        bind.bind_ortvalue_output(name, v)
    g = lambda: sess.run_with_iobinding(bind)  # noqa: E731
    outs_bound = (y,) + tuple(a for _, a in extra_outputs)
    impls.append(Impl("onnxruntime out=", g,
                      (lambda: (g(), outs_bound)[1]) if all_outputs else (lambda: (g(), y)[1]), "onnxruntime"))
    return impls  # the closures keep the session, the binding and the buffers alive


def first_line(exc):
    """The first line of an exception's message (its type name if it has none)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --------------------------------------------------------------------------------------------
# running a case


def run_threads(c, args, limit, log, results, notes, make_impls, idx, ref, check_what,
                exp_running=None, running_tol=None, unprefixed_notes=()):
    """Time case c at every thread count in args.threads and log a table per thread count.

    c needs name, label, dtype, dtype_name, x and bytes (x read + y written), and may have limit_nbytes:
    the size of the bandwidth limit's copy (default x's size; bytes / 2 moves as many bytes) and tol
    (validate_impls's; default tolerance(c.dtype)). make_impls(t,
    case_notes) builds the implementations at t threads (normkit's fresh output first); they are
    validated (validate_impls against ref at idx; check_what describes the check columns), timed
    round-robin together with the bandwidth limit's copies, and one row per implementation is
    appended to results. Notes go to the log and, prefixed with case and threads unless they start
    with one of unprefixed_notes, once each to notes."""
    limit.setup(getattr(c, "limit_nbytes", c.x.nbytes), args.out_offset)
    for t in args.threads:
        t_start = time.perf_counter()
        got = set_threads(t)
        case_notes = []
        impls = make_impls(t, case_notes)
        good, checks = validate_impls(impls, idx, ref, getattr(c, "tol", None) or tolerance(c.dtype),
                                      case_notes, exp_running, running_tol)

        lib_entries = [Entry(im.name, fn=im.fn) for im in good]
        copy_entries = limit.entries(t)
        entries = lib_entries + copy_entries
        gap = args.gap_ms / 1e3 if t > 1 else 0.0
        run_round_robin(entries, reps=args.reps, warmup=args.warmup,
                        sample_s=args.sample_ms / 1e3, gap_s=gap,
                        prime=args.prime == "always" or (args.prime == "auto" and t > 1))

        log(f"\n-- {c.label} | {t} thread{'s' if t > 1 else ''} | threads set: "
            + ", ".join(f"{k}={v}" for k, v in got.items()) + f" | took {time.perf_counter() - t_start:.0f} s")
        log(f"   check ({check_what}): " + ", ".join(checks))
        log_results(c, t, lib_entries, copy_entries, log, results)
        for n in case_notes:
            log(f"   note: {n}")
        for n in case_notes:
            n = n if unprefixed_notes and n.startswith(tuple(unprefixed_notes)) else f"{c.name} @{t}T: {n}"
            if n not in notes:
                notes.append(n)
        del impls, good, lib_entries, entries
        gc.collect()
    limit.release()


def log_results(c, t, lib_entries, copy_entries, log, results):
    """Log the limit line and the table of timed implementations; append their result rows."""
    best_copy = min(copy_entries, key=lambda e: e.median)
    lim = best_copy.median
    med = {e.name: e.median for e in lib_entries}
    nk_fresh = med.get("normkit")
    nk_out = med.get("normkit out=")
    log("   limit: " + ", ".join(f"{e.name} {fmt_ms(e.median)} ms" for e in copy_entries)
        + f"  -> {c.bytes / lim / 1e9:.1f} GB/s ({best_copy.name})")
    hdr = f"   {'implementation':<18}{'median ms':>11}{'IQR%':>6}{'batch':>7}{'GB/s':>8}{'frac':>7}" \
          f"{'x nk':>8}" + (f"{'x nk out=':>11}" if nk_out else "")
    log(hdr)
    for e in lib_entries:
        row = {
            "case": c.name, "label": c.label, "dtype": c.dtype_name, "threads": t, "impl": e.name,
            "median_s": e.median, "iqr": e.spread, "k": e.k, "gbps": c.bytes / e.median / 1e9,
            "frac": lim / e.median,
            "x_nk": e.median / nk_fresh if nk_fresh else float("nan"),
            "x_nk_out": e.median / nk_out if nk_out else float("nan"),
            "limit_s": lim, "limit_gbps": c.bytes / lim / 1e9, "limit_name": best_copy.name,
            "bytes": c.bytes, "samples_s": list(e.samples),
            "limit_samples_s": {ce.name: list(ce.samples) for ce in copy_entries},
        }
        results.append(row)
        log(f"   {e.name:<18}{fmt_ms(e.median):>11}{100 * e.spread:>5.0f}%{e.k:>7}{row['gbps']:>8.1f}"
            f"{row['frac']:>7.2f}{row['x_nk']:>7.2f}x" + (f"{row['x_nk_out']:>10.2f}x" if nk_out else ""))


def case_title(c):
    """The line that opens a case in the log."""
    return f"\n=== {c.label}   x {mib(c.x.nbytes):.2f} MiB, x+y {mib(c.bytes):.2f} MiB ==="


# --------------------------------------------------------------------------------------------
# header, targets, markdown and the main loop


def header_lines(args, limit_helper_ok, implementations, allocator_note="", extra=(), limit_what="x's bytes"):
    """(key, value) lines describing the run: command, machine, versions, thread policy,
    allocator (+ allocator_note), environment, placement, timing, bandwidth limit, then the
    script's extra lines, implementations and the skipped libraries. limit_what: what the bandwidth
    limit's copy copies."""
    info = normkit.info()
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}",
                f"normkit {info.get('version')}"]
    if torch is not None:
        versions.append(f"torch {torch.__version__}")
    if ort is not None:
        versions += [f"onnxruntime {ort.__version__}", f"onnx {onnx.__version__}"]
    if ml_dtypes is not None:
        versions.append(f"ml_dtypes {ml_dtypes.__version__}")
    gomp = loaded_libraries(["libgomp", "libiomp", "libomp"])
    nt = glibc_nt_threshold()
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
        ("cpu", f"{cpu_model()}; {affinity} CPUs usable; features {' '.join(info.get('cpu_features', []))}; "
                f"load average at start {loadavg()}"),
        ("versions", ", ".join(versions)),
        ("normkit kernel path", f"{info.get('kernel_path')} (compiled {info.get('kernel_paths_compiled')}, "
                                f"openmp {info.get('openmp')})"),
        ("OpenMP runtime loaded", (", ".join(gomp) or "none")
            + (" (one copy, shared by normkit and PyTorch)" if len(gomp) == 1 and torch is not None else "")),
        ("thread policy", f"--spin {args.spin}; ORT session config {ORT_SPIN or 'defaults'}; "
                          f"gap between samples at >1 thread {args.gap_ms:g} ms"),
        ("allocator", f"--hugepages {args.hugepages}; NumPy madvise(HUGEPAGE) {madv}; kernel THP "
                      f"{read_text('/sys/kernel/mm/transparent_hugepage/enabled')}; glibc malloc defaults"
                      + allocator_note),
        ("environment", env),
        ("placement", f"x on a 2 MiB boundary; preallocated outputs and copy destinations {args.out_offset} "
                      "bytes after one; fresh outputs wherever each library's allocator puts them"),
        ("timing", f"median of {args.reps} interleaved samples, {args.warmup} warm-up calls, small problems "
                   f"batched to ~{args.sample_ms:g} ms per sample, "
                   + {"never": "no priming",
                      "always": "each sample right after one untimed call of the same implementation",
                      "auto": "at >1 thread each sample right after one untimed call of the same implementation"
                      }[args.prime]),
        ("bandwidth limit", f"fastest of np.copyto (glibc memcpy) of {limit_what} on 1 thread / 2 threads"
            + (f", default non-temporal threshold {mib(nt):.0f} MiB" if nt else "")
            + (", and the same with non-temporal stores forced (helper process, threshold 1 MiB)"
               if limit_helper_ok else "")),
    ]
    lines += list(extra)
    lines.append(("implementations", implementations))
    if SKIPPED_LIBS:
        lines.append(("skipped", "; ".join(f"{k}: {v}" for k, v in SKIPPED_LIBS.items())))
    return lines


def target_rows(results, args, targets, fraction_targets, untimed_prefix=">= ", fraction_missed="MISSED"):
    """The target block at 2 threads (else the most timed): for every case, normkit's speedup over
    each peer in targets[case] ([(peer, needed speedup)]), fresh vs fresh and out= vs the peer's out=
    (or fresh), then normkit's fraction of the limit if fraction_targets has the case. Rows are
    (case, threads, target, fresh result, out= result). untimed_prefix and fraction_missed: how the
    target of a peer that was not timed starts, and the word for a missed fraction."""
    out = []
    by = {(r["case"], r["threads"], r["impl"]): r for r in results}
    t = 2 if 2 in args.threads else max(args.threads)
    for case in args.cases:
        nk = by.get((case, t, "normkit"))
        nko = by.get((case, t, "normkit out="))
        if not nk:
            continue
        for peer, need in targets.get(case, []):
            p = by.get((case, t, peer))
            po = by.get((case, t, peer + " out=")) or p
            if not p:
                out.append((case, t, f"{untimed_prefix}{need:g}x {peer}", "peer not timed", ""))
                continue
            sp = p["median_s"] / nk["median_s"]
            spo = po["median_s"] / nko["median_s"] if nko else float("nan")
            out.append((case, t, f">= {need:g}x {peer}" if need > 1 else f"faster than {peer}",
                        f"{sp:.2f}x {'met' if sp >= need else 'MISSED'}",
                        f"{spo:.2f}x {'met' if spo >= need else 'MISSED'}" if nko else ""))
        if case in fraction_targets:
            need = fraction_targets[case]
            f = nk["frac"]
            fo = nko["frac"] if nko else float("nan")
            out.append((case, t, f"fraction of limit >= {need:g}",
                        f"{f:.2f} {'met' if f >= need else fraction_missed}",
                        f"{fo:.2f} {'met' if fo >= need else fraction_missed}" if nko else ""))
    return out


def print_targets(targets, issue, with_out=True):
    """Print the target block (nothing if there are no targets). with_out=False: normkit has no out=
    variant (the block's second result column is empty)."""
    if targets:
        print(f"\n=== targets (issue {issue}), normkit speedup at {targets[0][1]} threads; "
              + ("fresh vs fresh | normkit out= vs peer out= (or fresh) ===" if with_out else "normkit vs peer ==="))
        for case, t, what, a, b in targets:
            print(f"   {case:<20} {what:<28} {a:<16} {b}")


def has_out_variant(results):
    """Whether normkit was timed with out= (the backward functions have no out=)."""
    return any(r["impl"] == "normkit out=" for r in results)


def write_markdown(path, title, issue, header, results, targets, notes, legend=None):
    """The header, the result table, the target block and the notes as markdown. legend: the
    paragraph above the table (default: the forward benchmarks'). Without normkit out= rows the
    out= columns are left out."""
    with_out = has_out_variant(results)
    L = [f"# {title}", ""]
    for k, v in header:
        L.append(f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}")
    if legend is None:
        legend = ("Fresh output: a new array per call. `out=`: into a preallocated array (PyTorch has no out= "
                  "for these functions). GB/s counts x read + y written. frac = bandwidth-limit time / time. "
                  "x nk = this row's time / normkit's (normkit's speedup over it); x nk out= the same against "
                  "normkit with out=.")
    L += ["", legend, ""]
    L.append("| case | threads | implementation | median ms | GB/s | frac of limit | x nk | "
             + ("x nk out= | " if with_out else "") + "limit GB/s |")
    L.append("| --- | ---: | --- | ---: | ---: | ---: | ---: | " + ("---: | " if with_out else "") + "---: |")
    for r in results:
        L.append(f"| {r['label']} | {r['threads']} | {r['impl']} | {fmt_ms(r['median_s'])} | {r['gbps']:.1f} | "
                 f"{r['frac']:.2f} | {r['x_nk']:.2f} | " + (f"{r['x_nk_out']:.2f} | " if with_out else "")
                 + f"{r['limit_gbps']:.1f} |")
    if targets:
        L += ["", f"## Targets (issue {issue})", ""]
        if with_out:
            L += ["| case | threads | target | normkit (fresh vs fresh) | normkit out= (vs peer out= if any) |",
                  "| --- | ---: | --- | --- | --- |"]
        else:
            L += ["| case | threads | target | normkit |", "| --- | ---: | --- | --- |"]
        for case, t, what, a, b in targets:
            L.append(f"| {case} | {t} | {what} | {a} | {b} |" if with_out else f"| {case} | {t} | {what} | {a} |")
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def _json_safe(v):
    """v with NaN/inf floats as None and tuples as lists (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if np is not None and isinstance(v, np.generic):
        return _json_safe(v.item())
    return v


def write_json(path, title, issue, header, results, targets, notes):
    """The raw numbers as JSON: header (key -> value), results (one dict per implementation and
    thread count: median_s, iqr, frac, x_nk, ...), targets (case, threads, target, fresh, out=) and
    notes."""
    doc = {"title": title, "issue": issue, "header": dict(header), "results": results,
           "targets": [dict(zip(("case", "threads", "target", "fresh", "out"), t)) for t in targets],
           "notes": notes}
    with open(path, "w") as f:
        json.dump(_json_safe(doc), f, indent=1, allow_nan=False)
        f.write("\n")


def main(args, name, what, issue, make_header, make_case, run_case, make_targets,
         skip_failed_cases=False, report_total_time=False, inference_mode=True, legend=None):
    """A benchmark script's main loop: print the header, run every case of args.cases (make_case(name),
    then run_case(case, limit, log, results, notes)) under torch.inference_mode, print the target
    block (make_targets(results)) and write the markdown file. name: "normkit rows benchmark" and
    the like; what: the ops, for the markdown title; make_header(limit_helper_ok): header_lines.
    skip_failed_cases: a case whose construction raises RuntimeError is reported and skipped;
    report_total_time: the last line gives the whole run's time. inference_mode=False: run the cases
    outside torch.inference_mode (a backward benchmark needs autograd). legend: see write_markdown."""
    t0 = time.perf_counter()
    limit = BandwidthLimit(streaming_helper=not args.no_streaming_limit)
    header = make_header(limit.remote is not None)
    print(name)
    for k, v in header:
        print(f"  {k}: {v}")
    if limit.remote_error:
        print(f"  note: streaming-copy helper unavailable: {limit.remote_error}")
    results, notes = [], []
    ctx = torch.inference_mode() if torch is not None and inference_mode else None
    try:
        if ctx is not None:
            ctx.__enter__()
        for case_name in args.cases:
            try:
                c = make_case(case_name)
            except RuntimeError as exc:  # e.g. bfloat16 without ml_dtypes
                if not skip_failed_cases:
                    raise
                print(f"\n=== {case_name}: skipped ({exc}) ===")
                notes.append(f"{case_name}: skipped ({exc})")
                continue
            run_case(c, limit, print, results, notes)
            del c
            gc.collect()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        limit.close()

    targets = make_targets(results)
    print_targets(targets, issue, has_out_variant(results))
    print(f"\nload average at end: {loadavg()}"
          + (f"; whole run {time.perf_counter() - t0:.0f} s" if report_total_time else ""))
    if args.markdown:
        header.append(("load average at end", loadavg()))
        write_markdown(args.markdown, f"{name}: {what}", issue, header, results, targets, notes, legend)
        print(f"wrote {args.markdown}")
    if getattr(args, "json", None):
        if not args.markdown:
            header.append(("load average at end", loadavg()))
        write_json(args.json, f"{name}: {what}", issue, header, results, targets, notes)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--copy-server":
        import_numpy()
        copy_server_main()
    else:
        print(__doc__)

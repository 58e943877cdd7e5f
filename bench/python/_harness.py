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

Only the standard library and NumPy are imported here, so the benchmark script can set the
environment (OpenMP, allocator) before it imports the libraries it times.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--copy-server":
        copy_server_main()
    else:
        print(__doc__)

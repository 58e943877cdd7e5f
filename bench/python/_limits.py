"""The memory-bandwidth limit for a working set, for normkit's Python benchmarks, measured like the
norm itself (read an array, write an array of the same size) with ``np.copyto`` -- glibc ``memcpy`` --
on 1 thread, and split in two halves on 2 Python threads (NumPy releases the GIL while copying).

glibc switches to non-temporal (streaming) stores only for single copies above
``x86_non_temporal_threshold`` (about 41 MiB here), so two halves of a 64 MiB array would be copied
with ordinary stores and understate what 2 threads can do; a helper process started with a low
threshold (``GLIBC_TUNABLES``) supplies the streaming variant. The limit is the fastest of all the
variants, so "fraction of limit" never flatters a kernel.

- ``BandwidthLimit``: the copy entries (memcpy 1T / 2T, streaming memcpy 1T / 2T) for one working
  set, timed round-robin with the implementations (_timing.Entry).
- ``copy_server_main``: that helper (``python _limits.py --copy-server``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import _libs
from _data import placed_empty
from _timing import Entry


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
            _libs.np.copyto(dst, src)
            self._done.set()

    def copy(self, dst, src):
        h = (src.size // 2) & ~63  # split on a cache-line multiple
        self._job = (dst[h:], src[h:])
        self._go.set()
        _libs.np.copyto(dst[:h], src[:h])
        self._done.wait()
        self._done.clear()

    def close(self):
        self._stop = True
        self._go.set()
        self._thread.join(timeout=1)


def _copy_buffers(nbytes: int, offset: int = 0):
    np = _libs.np
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
            copyto = _libs.np.copyto
            t0 = time.perf_counter()
            for _ in range(k):
                copyto(dst, src)
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--copy-server":
        _libs.import_numpy()
        copy_server_main()
    else:
        print(__doc__)

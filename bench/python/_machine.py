"""Facts about the machine a benchmark runs on, for its header: the CPU model, the shared objects
loaded (which OpenMP runtime), glibc's non-temporal threshold, sysfs/procfs text, the load average.
Standard library only."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional


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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
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

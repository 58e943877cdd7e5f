"""SyncBatchNorm over MPI against plain BatchNorm on the same shard (issue: statistics that merge).

    python bench/python/bench_sync.py [--ranks 2] [--reps 15] [--markdown FILE]

Starts ``mpiexec -n RANKS`` on itself. Every rank holds a shard [16, 64, 56, 56] (float32, NCHW and
NHWC) and times, interleaved round-robin in one run: a training forward of normkit.BatchNorm on its
shard (no communication), the same of normkit.distributed.SyncBatchNorm (one Allgather of 2C+1
values), and forward + backward of each (SyncBatchNorm's backward: one more Allgather of 2C values).
Each rank runs one OpenMP thread (RANKS processes share the cores); every sample starts after a
barrier, so the ranks run side by side as in data-parallel training. The time per rank is the larger
of the ranks' medians. Target: SyncBatchNorm <= 1.25x BatchNorm, forward and forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np

SHARD = (16, 64, 56, 56)
TARGET = 1.25


def _worker(reps: int) -> None:
    from mpi4py import MPI

    import normkit
    from _timing import interleaved_medians
    from normkit.distributed import SyncBatchNorm

    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.Get_rank())
    rows = []
    for layout in ("NCHW", "NHWC"):
        n, c, h, w = SHARD
        shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        plain = normkit.BatchNorm(c, layout=layout)
        sync = SyncBatchNorm(c, layout=layout, comm=comm)

        def fwd(layer):
            return lambda: layer(x)

        def fwd_bwd(layer):
            return lambda: (layer(x), layer.backward(dy))

        fns = [fwd(plain), fwd(sync), fwd_bwd(plain), fwd_bwd(sync)]

        def sample(fn):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        for fn in fns:  # warm-up: first-touch of outputs, MPI connections
            sample(fn)
        medians = interleaved_medians(fns, reps, sample)
        worst = np.max(comm.allgather(medians), axis=0)
        rows.append({"layout": layout, "plain_fwd": float(worst[0]), "sync_fwd": float(worst[1]),
                     "plain_fwd_bwd": float(worst[2]), "sync_fwd_bwd": float(worst[3])})
    if comm.Get_rank() == 0:
        print(json.dumps({"rows": rows, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                          "ranks": comm.Get_size(), "kernel_path": normkit.info()["kernel_path"]}))


def _mpiexec():
    local = os.path.join(sysconfig.get_path("scripts"), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.reps)
        return 0
    from _machine import cpu_model

    mpiexec = _mpiexec()
    if mpiexec is None:
        print("no mpiexec: pip install mpi4py mpich", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([mpiexec, "-n", str(args.ranks), sys.executable, os.path.abspath(__file__), "--worker",
                           "--reps", str(args.reps)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = [
        f"SyncBatchNorm vs BatchNorm, {result['ranks']} ranks, shard {list(SHARD)} float32 per rank, "
        f"1 thread per rank, {result['mpi']}, kernel path {result['kernel_path']}, CPU: {cpu_model()}.",
        f"Command: `python bench/python/bench_sync.py --ranks {args.ranks} --reps {args.reps}`. "
        f"Time per rank (the slower rank's median); target SyncBatchNorm <= {TARGET}x BatchNorm.",
        "",
        "| layout | BatchNorm fwd | SyncBatchNorm fwd | ratio | BatchNorm fwd+bwd | SyncBatchNorm fwd+bwd | ratio | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ok = True
    for r in result["rows"]:
        f = r["sync_fwd"] / r["plain_fwd"]
        b = r["sync_fwd_bwd"] / r["plain_fwd_bwd"]
        met = f <= TARGET and b <= TARGET
        ok &= met
        lines.append(f"| {r['layout']} | {r['plain_fwd'] * 1e3:.2f} ms | {r['sync_fwd'] * 1e3:.2f} ms | {f:.3f}x | "
                     f"{r['plain_fwd_bwd'] * 1e3:.2f} ms | {r['sync_fwd_bwd'] * 1e3:.2f} ms | {b:.3f}x | "
                     f"{'met' if met else 'missed'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())

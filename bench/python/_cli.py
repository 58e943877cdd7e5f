"""The command line the benchmark scripts share (bench_rows.py, bench_channels.py, bench_backward.py,
bench_fused.py): ``parse_args``. Standard library only, so that a script parses its options before
any library under test is imported."""

from __future__ import annotations

import argparse
import fnmatch


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

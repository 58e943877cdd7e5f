"""The main loop of normkit's Python benchmarks (bench_rows.py, bench_channels.py, bench_backward.py,
bench_fused.py): ``main`` prints the header, runs every case and writes the target block, the markdown
file and the JSON; ``run_threads`` times one case at every thread count.

The bench modules, each one job, each importing only those above it in this list:

- _cli.py: the command line (``parse_args``);
- _machine.py: facts about the machine (CPU, load, OpenMP runtime, glibc's non-temporal threshold);
- _libs.py: the libraries under test: environment, import, threads, dtypes;
- _timing.py: round-robin timing (``Entry``, ``run_round_robin``, ``interleaved_medians``);
- _data.py: a case's data: placed buffers, random inputs, layouts, sampled rows;
- _check.py: validation (``Impl``, ``validate_impls``, ``tolerance``);
- _limits.py: the memory-bandwidth limit (``BandwidthLimit``, the streaming-copy helper process);
- _peers.py: PyTorch and ONNX Runtime plumbing;
- _report.py: the log table, the header, the targets, markdown and JSON;
- _run.py: this loop.

Importing any of them imports only the standard library, so that a benchmark script can parse its
command line and set the environment (_libs.configure_environment) before NumPy, normkit and the
peers load (_libs.load_libraries).
"""

from __future__ import annotations

import gc
import time

import _libs
from _check import tolerance, validate_impls
from _limits import BandwidthLimit
from _machine import loadavg
from _report import has_out_variant, log_results, print_targets, write_json, write_markdown
from _timing import Entry, run_round_robin


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
        got = _libs.set_threads(t)
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


def main(args, name, what, issue, make_header, make_case, run_case, make_targets,
         skip_failed_cases=False, report_total_time=False, inference_mode=True, legend=None):
    """A benchmark script's main loop: print the header, run every case of args.cases (make_case(name),
    then run_case(case, limit, log, results, notes)) under torch.inference_mode, print the target
    block (make_targets(results)) and write the markdown file. name: "normkit rows benchmark" and
    the like; what: the ops, for the markdown title; make_header(limit_helper_ok): header_lines.
    skip_failed_cases: a case whose construction raises RuntimeError is reported and skipped;
    report_total_time: the last line gives the whole run's time. inference_mode=False: run the cases
    outside torch.inference_mode (a backward benchmark needs autograd). legend: see write_markdown."""
    torch = _libs.torch
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

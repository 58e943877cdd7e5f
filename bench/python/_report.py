"""What normkit's Python benchmarks print and write: units (``mib``, ``fmt_ms``), the case's title and
result table in the log (``case_title``, ``log_results``), the header describing the run
(``header_lines``), the target block (``target_rows``, ``print_targets``), the markdown file
(``write_markdown``) and the raw numbers as JSON (``write_json``). The libraries come from _libs at
call time; the machine's facts from _machine."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys

import _libs
from _machine import cpu_model, glibc_nt_threshold, loadavg, loaded_libraries, read_text

# --------------------------------------------------------------------------------------------
# units


def mib(n):
    return n / 2**20


def fmt_ms(s):
    """Seconds as milliseconds, 3 decimals below 100 ms, 1 above."""
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


# --------------------------------------------------------------------------------------------
# the log: a case's title and its table per thread count


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
# header, targets, markdown and JSON


def header_lines(args, limit_helper_ok, implementations, allocator_note="", extra=(), limit_what="x's bytes"):
    """(key, value) lines describing the run: command, machine, versions, thread policy,
    allocator (+ allocator_note), environment, placement, timing, bandwidth limit, then the
    script's extra lines, implementations and the skipped libraries. limit_what: what the bandwidth
    limit's copy copies."""
    np, normkit, ml_dtypes, torch, ort, onnx = (_libs.np, _libs.normkit, _libs.ml_dtypes, _libs.torch, _libs.ort,
                                                _libs.onnx)
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
        ("thread policy", f"--spin {args.spin}; ORT session config {_libs.ORT_SPIN or 'defaults'}; "
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
    if _libs.SKIPPED_LIBS:
        lines.append(("skipped", "; ".join(f"{k}: {v}" for k, v in _libs.SKIPPED_LIBS.items())))
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
    np = _libs.np
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

"""Validation for normkit's Python benchmarks: an implementation (``Impl``: a call to time and how to
get its output), how far an output is from a reference (``max_rel_err``, ``max_rel_err_chunked``,
``tolerance``), checking every implementation once before it is timed (``validate_impls``) and the
one line an exception is reported in (``first_line``). NumPy comes from _libs at call time."""

from __future__ import annotations

import gc

import _libs
from _libs import eps_of


def max_rel_err(a, ref):
    """max |a - ref| / max(1, |ref|), in float64."""
    np = _libs.np
    a = np.asarray(a).astype(np.float64) if a.dtype != np.float64 else a
    ref = np.asarray(ref).astype(np.float64) if ref.dtype != np.float64 else ref
    return float(np.max(np.abs(a - ref) / np.maximum(1.0, np.abs(ref)))) if a.size else 0.0


def max_rel_err_chunked(a, ref, chunk=1 << 22):
    """max_rel_err of two large arrays, in float32 chunks (bounded memory)."""
    np = _libs.np
    a = a.reshape(-1)
    ref = ref.reshape(-1)
    worst = 0.0
    for i in range(0, a.size, chunk):
        worst = max(worst, max_rel_err(a[i:i + chunk].astype(np.float32), ref[i:i + chunk].astype(np.float32)))
    return worst


def tolerance(dtype):
    """Allowed max_rel_err against the float64 reference."""
    np = _libs.np
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
    np = _libs.np
    if isinstance(y, tuple):
        return tuple(None if a is None else np.array(a, copy=True) for a in y)
    return np.array(y, copy=True)


def _output_errs(y, ref, idx=None):
    """max rel errs of an output against ref, one per element (a list of one for an array): at idx
    if given, else whole (chunked); a tuple output element by element, the first at idx, the others
    whole, None where either side is None."""
    np = _libs.np
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


def first_line(exc):
    """The first line of an exception's message (its type name if it has none)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__

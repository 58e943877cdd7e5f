"""Smoke test for an installed normkit wheel (run by scripts/check_wheel.sh in a fresh venv).

Imports normkit (from wherever it is installed: run it from outside the source tree),
prints normkit.info(), then on every kernel path this CPU supports
(info()["kernel_paths_supported"], switched with normkit._set_kernel_path) runs
every norm forward in a channels-first and a channels-last layout, every backward,
and the LayerNorm and BatchNorm layer objects (forward + backward), and checks each
result against a float64 NumPy reference written here (max error relative to the
reference's magnitude <= 1e-4 for float32). Only NumPy is needed.

    python wheel_smoke.py [--expect-bundled-openmp]

--expect-bundled-openmp: also fail unless the OpenMP runtime the process loaded is
the copy auditwheel bundled into the wheel (normkit.libs/: libomp-*.so, LLVM's runtime
in the release wheel of scripts/build_wheel.sh; libgomp-*.so* or libiomp5-*.so are
accepted as well).
Exits 0 when everything matches, 1 on any mismatch or error.
"""

from __future__ import annotations

import argparse
import os
import pprint
import sys
import time
import traceback

import numpy as np

TOL = 1e-4  # float32 results against float64 references
EPS = 1e-5

# ----------------------------------------------------------------------------------------
# float64 references. Channel norms are written for channels-first x (N, C, *spatial);
# channels-last inputs are moved to channels-first for the reference and back.


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _cf(x, layout_last):
    """Channels-first view of x (moves the channel axis from last to 1 if needed)."""
    return np.moveaxis(x, -1, 1) if layout_last else x


def _from_cf(y, layout_last):
    return np.moveaxis(y, 1, -1) if layout_last else y


def _bshape(ndim, c_axis=1):
    """Shape that broadcasts a (C,) vector along axis 1 of a rank-`ndim` array."""
    s = [1] * ndim
    s[c_axis] = -1
    return s


def ref_norm(x, axes, eps, rms=False):
    """(xhat, mean, rstd) with statistics over `axes` (keepdims)."""
    x = _f64(x)
    if rms:
        mean = np.zeros_like(x.mean(axis=axes, keepdims=True))
        rstd = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    else:
        mean = x.mean(axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return (x - mean) * rstd, mean, rstd


def ref_norm_backward(xhat, rstd, g, axes, rms=False):
    """dx of y = xhat * w + b, xhat = (x - mean) * rstd over `axes`, given g = dy * w."""
    mean_g = 0.0 if rms else g.mean(axis=axes, keepdims=True)
    return rstd * (g - mean_g - xhat * (g * xhat).mean(axis=axes, keepdims=True))


def ref_group_stats_shape(x_cf, num_groups):
    n, c = x_cf.shape[:2]
    return x_cf.reshape(n, num_groups, c // num_groups, -1)


# ----------------------------------------------------------------------------------------


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = []
        self.path = "?"

    def check(self, name, got, ref, tol=TOL):
        got64, ref64 = _f64(got), _f64(ref)
        label = f"[{self.path}] {name}"
        if got64.shape != ref64.shape:
            self.failed.append(f"{label}: shape {got64.shape} != reference {ref64.shape}")
            print(f"  FAIL {label}: shape {got64.shape} != {ref64.shape}")
            return
        if not np.all(np.isfinite(got64)):
            self.failed.append(f"{label}: non-finite values")
            print(f"  FAIL {label}: non-finite values")
            return
        scale = max(1.0, float(np.max(np.abs(ref64)))) if ref64.size else 1.0
        err = float(np.max(np.abs(got64 - ref64))) / scale if ref64.size else 0.0
        if err <= tol:
            self.passed += 1
        else:
            self.failed.append(f"{label}: relative max error {err:.3e} > {tol:.0e}")
            print(f"  FAIL {label}: relative max error {err:.3e} > {tol:.0e}")

    def run(self, name, fn):
        """Run one group of checks; an exception counts as a failure (and is printed)."""
        before = len(self.failed)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a smoke test reports everything
            self.failed.append(f"[{self.path}] {name}: {type(exc).__name__}: {exc}")
            print(f"  FAIL [{self.path}] {name}: raised {type(exc).__name__}: {exc}")
            traceback.print_exc()
        status = "ok" if len(self.failed) == before else "FAILED"
        print(f"  {name:<44s} {status}")


def smoke_path(nk, ck, rng):
    f32 = np.float32

    def rand(*shape, scale=1.0, shift=0.0):
        return (rng.standard_normal(shape) * scale + shift).astype(f32)

    # Shapes with SIMD tails (odd sizes) and, for the big ones, enough work for threads.
    N, C, H, W = 3, 24, 7, 9          # channel norms: 63 spatial elements (odd)
    G = 6
    R, D = 37, 203                     # rows norms: 203-wide rows (16-lane tail)

    # ---------------- layer_norm / rms_norm: normalized over the last k dims -----------
    def rows_norms():
        # "channels-last": tokens (N, L, D) normalized over D;
        # "channels-first": images (N, C, H, W) normalized over (C, H, W).
        for tag, x, nshape in (
            ("(R,D) over D", rand(R, D, scale=2.0, shift=3.0), (D,)),
            ("NLC over C", rand(2, 19, D), (D,)),
            ("NCHW over CHW", rand(N, C, H, W, shift=-1.0), (C, H, W)),
        ):
            k = len(nshape)
            axes = tuple(range(x.ndim - k, x.ndim))
            w = rand(*nshape, shift=1.0)
            b = rand(*nshape)
            dy = rand(*x.shape)
            bshape = (1,) * (x.ndim - k) + nshape

            xhat, mean, rstd = ref_norm(x, axes, EPS)
            y, m, r = nk.layer_norm(x, nshape, w, b, eps=EPS, return_stats=True)
            ck.check(f"layer_norm {tag}", y, xhat * _f64(w).reshape(bshape) + _f64(b).reshape(bshape))
            ck.check(f"layer_norm {tag} mean", m, mean)
            ck.check(f"layer_norm {tag} rstd", r, rstd)
            dx, dw, db = nk.layer_norm_backward(dy, x, m, r, nshape, w)
            g = _f64(dy) * _f64(w).reshape(bshape)
            lead = tuple(range(x.ndim - k))
            ck.check(f"layer_norm_backward {tag} dx", dx, ref_norm_backward(xhat, rstd, g, axes))
            ck.check(f"layer_norm_backward {tag} dweight", dw, (_f64(dy) * xhat).sum(axis=lead))
            ck.check(f"layer_norm_backward {tag} dbias", db, _f64(dy).sum(axis=lead))

            xhat, _, rstd = ref_norm(x, axes, EPS, rms=True)
            y, r = nk.rms_norm(x, nshape, w, eps=EPS, return_stats=True)
            ck.check(f"rms_norm {tag}", y, xhat * _f64(w).reshape(bshape))
            ck.check(f"rms_norm {tag} rstd", r, rstd)
            dx, dw = nk.rms_norm_backward(dy, x, r, nshape, w)
            ck.check(f"rms_norm_backward {tag} dx",
                     dx, ref_norm_backward(xhat, rstd, _f64(dy) * _f64(w).reshape(bshape), axes, rms=True))
            ck.check(f"rms_norm_backward {tag} dweight", dw, (_f64(dy) * xhat).sum(axis=lead))

    ck.run("layer_norm, rms_norm (+ backward)", rows_norms)

    # ---------------- channel norms, NCHW and NHWC ----------------------------------------
    layouts = (("NCHW", False), ("NHWC", True))

    def make(layout_last):
        shape = (N, H, W, C) if layout_last else (N, C, H, W)
        return rand(*shape, scale=1.5, shift=0.5), rand(*shape)

    def batch_norm():
        for layout, last in layouts:
            x, dy = make(last)
            w, b = rand(C, shift=1.0), rand(C)
            xc, dyc = _f64(_cf(x, last)), _f64(_cf(dy, last))
            axes = (0, 2, 3)
            bs = _bshape(4)
            n = xc.size // C
            # training: batch statistics, running statistics updated in place
            rm0, rv0 = rand(C), np.abs(rand(C)) + 0.5
            rm, rv = rm0.copy(), rv0.copy()
            y, m, r = nk.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=EPS,
                                    layout=layout, return_stats=True)
            xhat, mean, rstd = ref_norm(xc, axes, EPS)
            yref = xhat * _f64(w).reshape(bs) + _f64(b).reshape(bs)
            ck.check(f"batch_norm train {layout}", y, _from_cf(yref, last))
            ck.check(f"batch_norm train {layout} mean", m, mean.reshape(C))
            ck.check(f"batch_norm train {layout} rstd", r, rstd.reshape(C))
            var_unbiased = xc.var(axis=axes) * n / (n - 1)
            ck.check(f"batch_norm train {layout} running_mean", rm, 0.9 * _f64(rm0) + 0.1 * mean.reshape(C))
            ck.check(f"batch_norm train {layout} running_var", rv, 0.9 * _f64(rv0) + 0.1 * var_unbiased)
            dx, dw, db = nk.batch_norm_backward(dy, x, m, r, w, training=True, layout=layout)
            g = dyc * _f64(w).reshape(bs)
            ck.check(f"batch_norm_backward train {layout} dx", dx,
                     _from_cf(ref_norm_backward(xhat, rstd, g, axes), last))
            ck.check(f"batch_norm_backward train {layout} dweight", dw, (dyc * xhat).sum(axis=axes))
            ck.check(f"batch_norm_backward train {layout} dbias", db, dyc.sum(axis=axes))
            # eval: running statistics, left unchanged
            rm_before, rv_before = rm.copy(), rv.copy()
            y, m, r = nk.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, layout=layout, return_stats=True)
            rmean = _f64(rm_before).reshape(bs)
            rrstd = 1.0 / np.sqrt(_f64(rv_before).reshape(bs) + EPS)
            xhat_e = (xc - rmean) * rrstd
            ck.check(f"batch_norm eval {layout}", y,
                     _from_cf(xhat_e * _f64(w).reshape(bs) + _f64(b).reshape(bs), last))
            ck.check(f"batch_norm eval {layout} running stats unchanged",
                     np.concatenate([rm, rv]), np.concatenate([rm_before, rv_before]), tol=0.0)
            dx, dw, db = nk.batch_norm_backward(dy, x, m, r, w, training=False, layout=layout)
            ck.check(f"batch_norm_backward eval {layout} dx", dx,
                     _from_cf(dyc * _f64(w).reshape(bs) * rrstd, last))
            ck.check(f"batch_norm_backward eval {layout} dweight", dw, (dyc * xhat_e).sum(axis=axes))
            ck.check(f"batch_norm_backward eval {layout} dbias", db, dyc.sum(axis=axes))

    ck.run("batch_norm train/eval (+ backward)", batch_norm)

    def instance_norm():
        for layout, last in layouts:
            x, dy = make(last)
            w, b = rand(C, shift=1.0), rand(C)
            xc, dyc = _f64(_cf(x, last)), _f64(_cf(dy, last))
            axes = (2, 3)
            bs = _bshape(4)
            y, m, r = nk.instance_norm(x, weight=w, bias=b, eps=EPS, layout=layout, return_stats=True)
            xhat, mean, rstd = ref_norm(xc, axes, EPS)
            ck.check(f"instance_norm {layout}", y,
                     _from_cf(xhat * _f64(w).reshape(bs) + _f64(b).reshape(bs), last))
            ck.check(f"instance_norm {layout} mean", m, mean.reshape(N, C))
            ck.check(f"instance_norm {layout} rstd", r, rstd.reshape(N, C))
            dx, dw, db = nk.instance_norm_backward(dy, x, m, r, w, layout=layout)
            g = dyc * _f64(w).reshape(bs)
            ck.check(f"instance_norm_backward {layout} dx", dx,
                     _from_cf(ref_norm_backward(xhat, rstd, g, axes), last))
            ck.check(f"instance_norm_backward {layout} dweight", dw, (dyc * xhat).sum(axis=(0, 2, 3)))
            ck.check(f"instance_norm_backward {layout} dbias", db, dyc.sum(axis=(0, 2, 3)))

    ck.run("instance_norm (+ backward)", instance_norm)

    def group_norm():
        for layout, last in layouts:
            x, dy = make(last)
            w, b = rand(C, shift=1.0), rand(C)
            xc, dyc = _f64(_cf(x, last)), _f64(_cf(dy, last))
            bs = _bshape(4)
            y, m, r = nk.group_norm(x, G, w, b, eps=EPS, layout=layout, return_stats=True)
            xg = ref_group_stats_shape(xc, G)                      # (N, G, C/G, HW)
            xhat_g, mean, rstd = ref_norm(xg, (2, 3), EPS)
            xhat = xhat_g.reshape(xc.shape)
            ck.check(f"group_norm {layout}", y,
                     _from_cf(xhat * _f64(w).reshape(bs) + _f64(b).reshape(bs), last))
            ck.check(f"group_norm {layout} mean", m, mean.reshape(N, G))
            ck.check(f"group_norm {layout} rstd", r, rstd.reshape(N, G))
            dx, dw, db = nk.group_norm_backward(dy, x, m, r, G, w, layout=layout)
            g = (dyc * _f64(w).reshape(bs)).reshape(xg.shape)
            dx_ref = ref_norm_backward(xhat_g, rstd, g, (2, 3)).reshape(xc.shape)
            ck.check(f"group_norm_backward {layout} dx", dx, _from_cf(dx_ref, last))
            ck.check(f"group_norm_backward {layout} dweight", dw, (dyc * xhat).sum(axis=(0, 2, 3)))
            ck.check(f"group_norm_backward {layout} dbias", db, dyc.sum(axis=(0, 2, 3)))

    ck.run("group_norm (+ backward)", group_norm)

    def adain():
        for layout, last in layouts:
            x, dy = make(last)
            sshape = (N, 5, 4, C) if last else (N, C, 5, 4)       # any spatial size
            style = rand(*sshape, scale=2.0, shift=1.0)
            xc, dyc, sc = _f64(_cf(x, last)), _f64(_cf(dy, last)), _f64(_cf(style, last))
            axes = (2, 3)
            xhat, _, rstd = ref_norm(xc, axes, EPS)
            s_mean = sc.mean(axis=axes, keepdims=True)
            s_std = np.sqrt(sc.var(axis=axes, keepdims=True) + EPS)
            y = nk.adaptive_instance_norm(x, style, eps=EPS, layout=layout)
            ck.check(f"adaptive_instance_norm {layout} (style map)", y, _from_cf(xhat * s_std + s_mean, last))
            dx, dstyle = nk.adaptive_instance_norm_backward(dy, x, style, eps=EPS, layout=layout)
            dx_ref = ref_norm_backward(xhat, rstd, dyc * s_std, axes)
            ck.check(f"adaptive_instance_norm_backward {layout} dx", dx, _from_cf(dx_ref, last))
            d_mean = dyc.sum(axis=axes, keepdims=True)
            d_std = (dyc * xhat).sum(axis=axes, keepdims=True)
            ms = sc.shape[2] * sc.shape[3]
            dstyle_ref = d_mean / ms + d_std * (sc - s_mean) / (ms * s_std)
            ck.check(f"adaptive_instance_norm_backward {layout} dstyle", dstyle, _from_cf(dstyle_ref, last))
            # style given as (mean, std), each (N, C)
            mu, sd = rand(N, C), np.abs(rand(N, C)) + 0.5
            y = nk.adaptive_instance_norm(x, (mu, sd), eps=EPS, layout=layout)
            ref = xhat * _f64(sd)[:, :, None, None] + _f64(mu)[:, :, None, None]
            ck.check(f"adaptive_instance_norm {layout} (mean, std)", y, _from_cf(ref, last))
            dx, (dmu, dsd) = nk.adaptive_instance_norm_backward(dy, x, (mu, sd), eps=EPS, layout=layout)
            ck.check(f"adaptive_instance_norm_backward {layout} (mean, std) dx", dx,
                     _from_cf(ref_norm_backward(xhat, rstd, dyc * _f64(sd)[:, :, None, None], axes), last))
            ck.check(f"adaptive_instance_norm_backward {layout} dmean", dmu, d_mean.reshape(N, C))
            ck.check(f"adaptive_instance_norm_backward {layout} dstd", dsd, d_std.reshape(N, C))

    ck.run("adaptive_instance_norm (+ backward)", adain)

    # ---------------- layer objects --------------------------------------------------------
    def layers():
        x, dy = rand(R, D, shift=2.0), rand(R, D)
        ln = nk.LayerNorm(D, eps=EPS)
        ln.weight = rand(D, shift=1.0)
        ln.bias = rand(D)
        y = ln(x)
        xhat, _, rstd = ref_norm(x, (1,), EPS)
        ck.check("LayerNorm layer forward", y, xhat * _f64(ln.weight) + _f64(ln.bias))
        dx = ln.backward(dy)
        ck.check("LayerNorm layer backward dx", dx,
                 ref_norm_backward(xhat, rstd, _f64(dy) * _f64(ln.weight), (1,)))
        ck.check("LayerNorm layer grad_weight", ln.grad_weight, (_f64(dy) * xhat).sum(axis=0))
        ck.check("LayerNorm layer grad_bias", ln.grad_bias, _f64(dy).sum(axis=0))

        for layout, last in layouts:
            x, dy = make(last)
            bn = nk.BatchNorm(C, eps=EPS, momentum=0.1, layout=layout)
            bn.weight = rand(C, shift=1.0)
            bn.bias = rand(C)
            xc, dyc = _f64(_cf(x, last)), _f64(_cf(dy, last))
            bs = _bshape(4)
            axes = (0, 2, 3)
            y = bn(x)
            xhat, mean, rstd = ref_norm(xc, axes, EPS)
            ck.check(f"BatchNorm layer {layout} forward (train)", y,
                     _from_cf(xhat * _f64(bn.weight).reshape(bs) + _f64(bn.bias).reshape(bs), last))
            ck.check(f"BatchNorm layer {layout} running_mean", bn.running_mean, 0.1 * mean.reshape(C))
            dx = bn.backward(dy)
            g = dyc * _f64(bn.weight).reshape(bs)
            ck.check(f"BatchNorm layer {layout} backward dx", dx,
                     _from_cf(ref_norm_backward(xhat, rstd, g, axes), last))
            ck.check(f"BatchNorm layer {layout} grad_weight", bn.grad_weight, (dyc * xhat).sum(axis=axes))
            ck.check(f"BatchNorm layer {layout} grad_bias", bn.grad_bias, dyc.sum(axis=axes))
            bn.eval()
            y = bn(x)
            rr = 1.0 / np.sqrt(_f64(bn.running_var).reshape(bs) + EPS)
            ref = (xc - _f64(bn.running_mean).reshape(bs)) * rr * _f64(bn.weight).reshape(bs) \
                + _f64(bn.bias).reshape(bs)
            ck.check(f"BatchNorm layer {layout} forward (eval)", y, _from_cf(ref, last))

    ck.run("LayerNorm, BatchNorm layer objects", layers)

    # ---------------- inputs big enough for the threaded kernels ----------------------------
    def large():
        x = rand(1024, 1024, shift=1.0)
        w, b = rand(1024, shift=1.0), rand(1024)
        xhat, _, _ = ref_norm(x, (1,), EPS)
        ck.check("layer_norm (1024, 1024)", nk.layer_norm(x, 1024, w, b, eps=EPS), xhat * _f64(w) + _f64(b))
        img = rand(16, 32, 32, 64)
        rm, rv = np.zeros(64, f32), np.ones(64, f32)
        y = nk.batch_norm(img, rm, rv, training=True, eps=EPS, layout="NHWC")
        xhat, _, _ = ref_norm(img, (0, 1, 2), EPS)
        ck.check("batch_norm NHWC (16, 32, 32, 64) train", y, xhat)

    ck.run("large inputs (threads)", large)


def loaded_openmp_runtimes():
    """Paths of the OpenMP runtimes mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return None
    return sorted(p for p in paths if any(k in os.path.basename(p) for k in ("libgomp", "libomp", "libiomp")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect-bundled-openmp", action="store_true",
                    help="fail unless the OpenMP runtime loaded is the one bundled in the wheel (normkit.libs)")
    args = ap.parse_args()

    import normkit as nk

    print(f"normkit {nk.__version__} from {os.path.dirname(nk.__file__)}")
    print(f"Python {sys.version.split()[0]}, NumPy {np.__version__}")
    info = nk.info()
    pprint.pprint(info, width=100)
    paths = list(info["kernel_paths_supported"])
    if not paths:
        print("FAIL: info()['kernel_paths_supported'] is empty")
        return 1
    default_path = info["kernel_path"]

    ck = Checker()
    t0 = time.perf_counter()
    for path in paths:
        nk._set_kernel_path(path)
        if nk.info()["kernel_path"] != path:
            ck.failed.append(f"[{path}] _set_kernel_path did not switch (info says {nk.info()['kernel_path']})")
            continue
        ck.path = path
        print(f"\n--- kernel path {path} ---")
        smoke_path(nk, ck, np.random.default_rng(1234))
    nk._set_kernel_path(default_path)

    print()
    gomp = loaded_openmp_runtimes()
    print(f"OpenMP runtime(s) loaded: {gomp}")
    if args.expect_bundled_openmp:
        if not info.get("openmp"):
            ck.failed.append("--expect-bundled-openmp: this normkit was built without OpenMP")
        elif not gomp or not all("normkit.libs" in p.replace(os.sep, "/").split("/") for p in gomp):
            ck.failed.append(f"--expect-bundled-openmp: loaded OpenMP runtime(s) {gomp} are not the "
                             "copy bundled in normkit.libs/")

    elapsed = time.perf_counter() - t0
    print(f"\nwheel smoke test: kernel paths {paths}; {ck.passed} checks passed, "
          f"{len(ck.failed)} failed ({elapsed:.1f} s)")
    for f in ck.failed:
        print(f"  FAILED: {f}")
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Outputs placed a few bytes above their input modulo 4 KiB.

Streamed stores just above the loads of the same row are what 4K aliasing punishes, so
the kernels' writers then run their loads a group of vectors ahead of their stores
(``loads_ahead`` in cpp/src/kernels/store_stage.inc). That is a second loop in every
streamed writer: it must give the same bits as the usual one, on every kernel path and
dtype, for rows shorter than a group, rows that end mid-group and rows of many groups,
and write nothing outside ``out``. NORMKIT_STREAMING_MIN_BYTES=0 (an internal knob) makes
every output a streamed one, so small arrays reach it. Outputs written to cache (the
default for arrays this small) are checked the same way: where y lies moves the split
of each row into an aligning head, a body and an edge, and the bits must not depend on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ml_dtypes
    import normkit

    PAGE = 4096
    SENTINEL = 0x5A
    rng = np.random.default_rng(7)

    def ln_ref(x, axes):
        x = x.astype(np.float64)
        m = x.mean(axis=axes, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(axis=axes, keepdims=True) + 1e-5)

    def rms_ref(x, axes):
        x = x.astype(np.float64)
        return x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + 1e-6)

    def groups_ref(x, groups, channels_last):
        x64 = x.astype(np.float64)
        if channels_last:
            x64 = np.moveaxis(x64, -1, 1)
        n, c = x64.shape[:2]
        g = x64.reshape(n, groups, -1)
        y = ln_ref(g, (2,)).reshape(x64.shape)
        return np.moveaxis(y, 1, -1) if channels_last else y

    def bn_inference_ref(x, mean, var, channels_last):
        shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        return (x.astype(np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5)

    # (name, shape, call(x, out), float64 reference of x)
    stats_mean = np.linspace(-1, 1, 64).astype(np.float32)
    stats_var = np.linspace(0.5, 2, 64).astype(np.float32)
    cases = []
    for n in (1, 17, 33, 100, 257, 1031):
        cases.append((f"layer_norm n={n}", (5, n), lambda x, o, n=n: normkit.layer_norm(x, n, out=o),
                      lambda x, n=n: ln_ref(x, (1,))))
        cases.append((f"rms_norm n={n}", (5, n), lambda x, o, n=n: normkit.rms_norm(x, n, eps=1e-6, out=o),
                      lambda x, n=n: rms_ref(x, (1,))))
    for shape in ((2, 3, 7, 9), (2, 3, 33, 31)):
        cases.append((f"batch_norm train NCHW {shape}", shape,
                      lambda x, o: normkit.batch_norm(x, None, None, training=True, out=o),
                      lambda x: ln_ref(x, (0, 2, 3))))
        c = shape[1]
        cases.append((f"batch_norm inference NCHW {shape}", shape,
                      lambda x, o, c=c: normkit.batch_norm(x, stats_mean[:c], stats_var[:c], out=o),
                      lambda x, c=c: bn_inference_ref(x, stats_mean[:c].astype(np.float64),
                                                      stats_var[:c].astype(np.float64), False)))
    cases.append(("group_norm NCHW", (2, 6, 5, 37), lambda x, o: normkit.group_norm(x, 3, out=o),
                  lambda x: groups_ref(x, 3, False)))
    for shape, groups in (((2, 5, 7, 40), 8), ((2, 3, 3, 320), 32), ((2, 4, 4, 17), 1), ((2, 9, 9, 5), 5)):
        cases.append((f"group_norm NHWC {shape} G={groups}", shape,
                      lambda x, o, g=groups: normkit.group_norm(x, g, layout="NHWC", out=o),
                      lambda x, g=groups: groups_ref(x, g, True)))
    cases.append(("batch_norm inference NHWC", (2, 5, 7, 64),
                  lambda x, o: normkit.batch_norm(x, stats_mean, stats_var, layout="NHWC", out=o),
                  lambda x: bn_inference_ref(x, stats_mean.astype(np.float64), stats_var.astype(np.float64), True)))
    cases.append(("batch_norm train NHWC", (3, 5, 7, 48),
                  lambda x, o: normkit.batch_norm(x, None, None, training=True, layout="NHWC", out=o),
                  lambda x: ln_ref(x, (0, 1, 2))))

    TOL = {np.float32: 1e-5, np.float64: 1e-12, np.float16: 3e-3, ml_dtypes.bfloat16: 2.5e-2}

    def placed(buf, base, offset, shape, dt):
        start = base + offset
        return buf[start : start + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)

    checked = 0
    path = sys.argv[1]
    normkit._set_kernel_path(path)
    for dt, tol in TOL.items():
        size = np.dtype(dt).itemsize
        for name, shape, call, ref in cases:
            nbytes = int(np.prod(shape)) * size
            span = (nbytes // PAGE + 2) * PAGE
            raw = np.empty(2 * span + PAGE, np.uint8)
            first = (-raw.ctypes.data) % PAGE  # the first page boundary in raw
            values = (rng.standard_normal(shape) * 2 + 3).astype(dt)
            for x_offset in (0, 16):
                first_bits = None
                # out this many bytes above x modulo 4 KiB: 0 and 144 take the usual
                # loop, the others the loads-ahead one where the path's groups reach
                for d in (0, 2, 16, 48, 64, 96, 128, 144):
                    if d % size:
                        continue
                    raw[:] = SENTINEL
                    x = placed(raw, first, x_offset, shape, dt)
                    x[...] = values
                    out = placed(raw, first + span, x_offset + d, shape, dt)
                    y = call(x, out)
                    assert y is out, name
                    bits = out.view(np.uint8).copy()
                    guards = np.r_[raw[first + span : first + span + x_offset + d],
                                   raw[first + span + x_offset + d + nbytes :]]
                    where = f"{path} {np.dtype(dt)} {name} x+{x_offset} out+{d}"
                    if not np.all(guards == SENTINEL):
                        print("WROTE OUTSIDE out:", where); sys.exit(1)
                    if not np.array_equal(x.view(np.uint8), values.view(np.uint8)):
                        print("MODIFIED x:", where); sys.exit(1)
                    if d == 0:
                        r = ref(x)
                        err = np.max(np.abs(out.astype(np.float64) - r) / np.maximum(1, np.abs(r)))
                        if not err <= tol:
                            print("FAR FROM float64:", where, err); sys.exit(1)
                        first_bits = bits
                    elif not np.array_equal(bits, first_bits):
                        print("NOT THE BITS OF out+0:", where); sys.exit(1)
                    checked += 1
    print("OK", checked)
    """
)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "cached"])
def test_outputs_just_above_their_input_give_the_usual_bits(kernel_path, streamed):
    pytest.importorskip("ml_dtypes")
    env = dict(os.environ)
    env.pop("NORMKIT_STREAMING_MIN_BYTES", None)
    if streamed:
        env["NORMKIT_STREAMING_MIN_BYTES"] = "0"
    env.pop("NORMKIT_ISA", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kernel_path], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("OK"), proc.stdout + proc.stderr

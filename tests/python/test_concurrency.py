"""Concurrency from Python: normkit releases the GIL while its kernels run, so many
Python threads may call it at once (each call also uses OpenMP threads inside).
Results must equal those of serial calls, bit for bit."""

from __future__ import annotations

import threading

import numpy as np

import normkit

THREADS = 8
ROUNDS = 6


def _calls(rng):
    """(name, function) pairs covering every norm, forward and backward, large enough
    to release the GIL (>= 16384 elements) and to use OpenMP inside."""
    x = rng.standard_normal((256, 768)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(768).astype(np.float32)
    img = rng.standard_normal((4, 16, 32, 32)).astype(np.float32)
    img_last = np.ascontiguousarray(img.transpose(0, 2, 3, 1))
    dimg = rng.standard_normal(img.shape).astype(np.float32)
    c = rng.standard_normal(16).astype(np.float32)
    _, m, r = normkit.layer_norm(x, 768, w, w, return_stats=True)
    _, bm, br = normkit.batch_norm(img, None, None, c, c, training=True, return_stats=True)
    _, gm, gr = normkit.group_norm(img_last, 4, c, c, layout="NHWC", return_stats=True)
    return [
        ("layer_norm", lambda: normkit.layer_norm(x, 768, w, w)),
        ("rms_norm", lambda: normkit.rms_norm(x, 768, w)),
        ("batch_norm", lambda: normkit.batch_norm(img, None, None, c, c, training=True)),
        ("instance_norm", lambda: normkit.instance_norm(img_last, weight=c, bias=c, layout="NHWC")),
        ("group_norm", lambda: normkit.group_norm(img, 4, c, c)),
        ("adain", lambda: normkit.adaptive_instance_norm(img, img[::-1].copy())),
        ("layer_norm_backward", lambda: normkit.layer_norm_backward(dy, x, m, r, 768, w)),
        ("batch_norm_backward", lambda: normkit.batch_norm_backward(dimg, img, bm, br, c)),
        ("group_norm_backward", lambda: normkit.group_norm_backward(
            np.ascontiguousarray(dimg.transpose(0, 2, 3, 1)), img_last, gm, gr, 4, c, layout="NHWC")),
    ]


def _as_list(result):
    if isinstance(result, tuple):
        return [a for a in result if a is not None]
    return [result]


def test_many_python_threads_match_serial_calls(rng):
    calls = _calls(rng)
    serial = {name: _as_list(f()) for name, f in calls}
    failures = []
    barrier = threading.Barrier(THREADS)

    def worker(k):
        barrier.wait()  # start together
        for i in range(ROUNDS):
            name, f = calls[(k + i) % len(calls)]
            got = _as_list(f())
            if not all(np.array_equal(a, b) for a, b in zip(got, serial[name])):
                failures.append((k, name))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, f"results differ from serial calls: {failures}"


def test_layer_objects_in_separate_threads(rng):
    """One layer object per thread (a layer itself is not shared between threads)."""
    x = rng.standard_normal((64, 32, 16, 16)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    reference = normkit.BatchNorm(32)
    y_ref, dx_ref = reference(x), reference.backward(dy)
    results = [None] * THREADS

    def worker(k):
        bn = normkit.BatchNorm(32)
        y = bn(x)
        dx = bn.backward(dy)
        results[k] = (y, dx, bn.running_mean.copy(), bn.grad_weight.copy())

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for y, dx, rm, gw in results:
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        np.testing.assert_array_equal(rm, reference.running_mean)
        np.testing.assert_array_equal(gw, reference.grad_weight)

"""The peers normkit is timed against, for normkit's Python benchmarks: PyTorch tensors sharing NumPy
arrays' memory (``to_torch``, ``from_torch``; ``to_torch_nchw``, ``from_torch_nchw`` for channels-last
arrays) and ONNX Runtime one-node models, sessions and implementations (``ort_*``). Whether a peer
is installed is settled by _libs.load_libraries (None there, and the reason in _libs.SKIPPED_LIBS);
the libraries come from _libs at call time."""

from __future__ import annotations

import os
import tempfile

import _libs
from _check import Impl


def to_torch(a):
    """A tensor sharing a NumPy array's memory (bfloat16 through an int16 view); None stays None."""
    np, BF16, torch = _libs.np, _libs.BF16, _libs.torch
    if a is None:
        return None
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def from_torch(t):
    """A NumPy array sharing a CPU tensor's memory (bfloat16 as ml_dtypes.bfloat16)."""
    BF16, torch = _libs.BF16, _libs.torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def to_torch_nchw(a, channels_last):
    """to_torch; for a channels-last array (N, H, W, C), the channels_last-strided NCHW view of it,
    so that PyTorch's channels-last kernels run."""
    t = to_torch(a)
    if channels_last:
        t = t.permute(0, 3, 1, 2)  # a channels_last-strided NCHW view of the NHWC array
        assert t.is_contiguous(memory_format=_libs.torch.channels_last)
    return t


def from_torch_nchw(t, channels_last, notes, what="output"):
    """Inverse of to_torch_nchw for a result t: with channels_last, back to (N, H, W, C) (a note in
    notes if PyTorch did not return ``what`` channels_last), then from_torch."""
    if channels_last:
        if not t.is_contiguous(memory_format=_libs.torch.channels_last):
            notes.append(f"torch: {what} is not channels_last for a channels_last input")
        t = t.permute(0, 2, 3, 1)
    return from_torch(t)


def ort_elem_type(dtype):
    """The ONNX element type of a NumPy dtype."""
    np, BF16, TensorProto = _libs.np, _libs.BF16, _libs.TensorProto
    return {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
            BF16: TensorProto.BFLOAT16}[np.dtype(dtype)]


def ort_initializer(name, a):
    """An ONNX initializer holding array a (bfloat16 as raw bytes)."""
    np, BF16, TensorProto = _libs.np, _libs.BF16, _libs.TensorProto
    helper, numpy_helper = _libs.helper, _libs.numpy_helper
    if a.dtype == BF16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, a.view(np.uint16).tobytes(), raw=True)
    return numpy_helper.from_array(a, name)


def ort_model_bytes(node, inputs, outputs, inits, opset, domains=()):
    """A serialized one-node ONNX model (graph "norm", default domain at opset, IR version <= 10).
    domains: further (domain, version) opset imports, e.g. ("com.microsoft", 1) for ORT's contrib ops."""
    helper = _libs.helper
    graph = helper.make_graph([node], "norm", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]
                              + [helper.make_opsetid(d, v) for d, v in domains])
    model.ir_version = min(model.ir_version, 10)
    return model.SerializeToString()


def ort_session(model, threads, optimized_path=None):
    """A sequential CPU session with ``threads`` intra-op threads and the --spin policy (ORT_SPIN)."""
    ort = _libs.ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for k, v in _libs.ORT_SPIN.items():
        so.add_session_config_entry(k, v)
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_optimized_session(model):
    """A 1-thread session for model and the op types of its graph after ORT's optimizations."""
    onnx = _libs.onnx
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "opt.onnx")
        sess = ort_session(model, 1, optimized_path=path)
        nodes = [n.op_type for n in onnx.load(path).graph.node]
    return sess, nodes


def ort_ortvalue(a):
    """An OrtValue sharing a NumPy array's memory (bfloat16 through a uint16 view)."""
    np, BF16, ort, TensorProto = _libs.np, _libs.BF16, _libs.ort, _libs.TensorProto
    if a.dtype == BF16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a.view(np.uint16), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(a)


def ort_impls(model, threads, x, y, extra_outputs=(), extra_inputs=(), all_outputs=False):
    """ONNX Runtime on a fresh session with ``threads`` intra-op threads: session.run() (fresh
    output; not for bfloat16) and run_with_iobinding into the preallocated y ("onnxruntime out=").
    The model reads "X", then the inputs named in extra_inputs, a list of (name, array), and writes
    "Y", then the outputs named in extra_outputs, a list of (name, preallocated array) bound for
    the out= variant. all_outputs: the implementations' output for validation is the tuple of
    every output (else Y alone)."""
    BF16 = _libs.BF16
    sess = ort_session(model, threads)
    outs = ["Y"] + [name for name, _ in extra_outputs]
    impls = []
    if x.dtype != BF16:
        feeds = {"X": x, **dict(extra_inputs)}
        f = lambda: sess.run(outs, feeds)  # noqa: E731
        impls.append(Impl("onnxruntime", f, (lambda: tuple(f())) if all_outputs else (lambda: f()[0]),
                          "onnxruntime"))
    xv, yv = ort_ortvalue(x), ort_ortvalue(y)
    if xv.data_ptr() != x.ctypes.data or yv.data_ptr() != y.ctypes.data:
        raise RuntimeError("OrtValue does not share the NumPy buffer")
    bind = sess.io_binding()
    bind.bind_ortvalue_input("X", xv)
    iv = [ort_ortvalue(a) for _, a in extra_inputs]
    for (name, _), v in zip(extra_inputs, iv):
        bind.bind_ortvalue_input(name, v)
    bind.bind_ortvalue_output("Y", yv)
    ev = [ort_ortvalue(a) for _, a in extra_outputs]
    for (name, _), v in zip(extra_outputs, ev):
        bind.bind_ortvalue_output(name, v)
    g = lambda: sess.run_with_iobinding(bind)  # noqa: E731
    outs_bound = (y,) + tuple(a for _, a in extra_outputs)
    impls.append(Impl("onnxruntime out=", g,
                      (lambda: (g(), outs_bound)[1]) if all_outputs else (lambda: (g(), y)[1]), "onnxruntime"))
    return impls  # the closures keep the session, the binding and the buffers alive

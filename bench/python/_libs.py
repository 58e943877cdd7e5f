"""The libraries under test, for normkit's Python benchmarks: the environment they read when they
load (``configure_environment``), importing them (``import_numpy``, ``load_libraries``), the thread
count of each (``set_threads``) and the dtypes they share (``np_dtype``, ``eps_of``: bfloat16 through
ml_dtypes).

Importing this module imports only the standard library, so that a benchmark script can parse its
command line and set the environment (OpenMP, OpenBLAS, allocator) first; NumPy is imported by
``import_numpy`` (``load_libraries`` calls it), and the libraries under test by ``load_libraries``,
which binds them as module globals (``np``, ``normkit``, ``torch``, ``F``, ``ort``, ...). The other
bench modules read them from here at call time (``_libs.np``), never at import time.
"""

from __future__ import annotations

import os

# Set by import_numpy / load_libraries (see the module docstring); None until then.
np = None
normkit = ml_dtypes = BF16 = None
torch = F = None
ort = onnx = TensorProto = helper = numpy_helper = None
SKIPPED_LIBS = {}  # library -> why it is not timed
ORT_SPIN = {}  # ONNX Runtime session config entries for the --spin policy


def import_numpy():
    """Import NumPy (after configure_environment) into this module and return it."""
    global np
    if np is None:
        import numpy

        np = numpy
    return np


def configure_environment(args):
    """Set what the libraries read when they load. Must run before numpy/normkit/torch import.

    A variable the user already exported is left alone (and shown in the header)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # NumPy's BLAS is not used; keep its pool away
    if args.spin == "passive":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.hugepages == "on":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    elif args.hugepages == "off":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "0")


def load_libraries(args):
    """Import NumPy, normkit (first: it brings the libgomp it was built with; PyTorch shares it),
    ml_dtypes and the peers named in args.libs into this module's globals; a peer that is not
    installed goes to SKIPPED_LIBS. Also applies --hugepages off to NumPy and sets ORT_SPIN."""
    global normkit, ml_dtypes, BF16, torch, F, ort, onnx, TensorProto, helper, numpy_helper, ORT_SPIN
    import_numpy()
    import normkit

    try:
        import ml_dtypes

        BF16 = np.dtype(ml_dtypes.bfloat16)
    except ImportError:  # pragma: no cover
        ml_dtypes = None
        BF16 = None
    if "torch" in args.libs:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError as exc:
            torch = F = None
            SKIPPED_LIBS["torch"] = f"not installed ({exc})"
    if "onnxruntime" in args.libs:
        try:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper, numpy_helper
        except ImportError as exc:
            onnx = ort = None
            SKIPPED_LIBS["onnxruntime"] = f"not installed ({exc})"
    if args.hugepages == "off":
        np._core.multiarray._set_madvise_hugepage(False) if hasattr(np, "_core") else \
            np.core.multiarray._set_madvise_hugepage(False)
    ORT_SPIN = {
        "bounded": {"session.intra_op.spin_duration_us": "5000"},
        "passive": {"session.intra_op.allow_spinning": "0"},
        "default": {},
    }[args.spin]


def set_threads(t):
    """Set every loaded library to t threads; what each reports back (ORT: per fresh session)."""
    normkit.set_num_threads(t)
    got = {"normkit": normkit.get_num_threads()}
    if torch is not None:
        torch.set_num_threads(t)
        got["torch"] = torch.get_num_threads()
    if ort is not None:
        got["onnxruntime"] = f"{t} (intra_op_num_threads, fresh session)"
    return got


# --------------------------------------------------------------------------------------------
# dtypes and validation


def np_dtype(name):
    """The NumPy dtype for a case's dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        if BF16 is None:
            raise RuntimeError("bfloat16 cases need ml_dtypes")
        return BF16
    return np.dtype(name)


def eps_of(dtype):
    """Machine epsilon of dtype (bfloat16 included)."""
    if BF16 is not None and np.dtype(dtype) == BF16:
        return float(ml_dtypes.finfo(BF16).eps)
    return float(np.finfo(dtype).eps)

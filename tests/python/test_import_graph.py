"""The Python package's modules import downward only: leaf modules (argument handling, device
routing, dtypes) import nothing of the front ends, front ends do not import each other sideways,
no import of the package happens inside a function (the way cycles get dodged), and
``import normkit`` runs every module once."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import normkit

PACKAGE = os.path.dirname(normkit.__file__)

# Lowest first; a module may import only modules of strictly lower layers.
LAYERS = [
    ["_ext"],
    ["_args"],                       # argument handling (layouts, eps, momentum, normalized shapes)
    ["_cuda"],                       # device routing: CUDA arrays to the CUDA backend
    ["_arrays"],                     # arrays of other libraries in (NumPy views), the same kind out
    ["_dtypes"],                     # dtypes, array intake, outputs
    ["_epilogue"],                   # the store stage's arguments
    ["_inputs"],                     # x as the kernels read it, the output they write
    ["_moments", "_functional", "_fold", "_axes"],
    ["_channels"],
    ["_backward"],
    ["_layers"],
    ["distributed"],                 # (and the normkit.torch package, which only `import normkit.torch` loads)
    ["__init__", "__main__"],
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _package_imports(path):
    """(module-level intra-package imports, intra-package imports inside functions) of one file."""
    tree = ast.parse(open(path).read(), path)
    top, nested = set(), []

    def names(node):
        if node.level == 1:
            if node.module:
                return [node.module.split(".")[0]]
            return [a.name for a in node.names]
        if node.level == 0 and node.module and node.module.split(".")[0] == "normkit":
            parts = node.module.split(".")
            return [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        return []

    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            top.update(names(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and names(inner):
                    nested.append((node.name, names(inner)))
    return top, nested


def _modules():
    return sorted(f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py"))


def test_every_module_has_a_layer():
    assert set(_modules()) <= set(LAYER_OF), f"place these in LAYERS: {set(_modules()) - set(LAYER_OF)}"


def test_imports_go_downward_only_and_none_hides_in_a_function():
    problems = []
    for module in _modules():
        top, nested = _package_imports(os.path.join(PACKAGE, module + ".py"))
        for target in sorted(top):
            if target in LAYER_OF and LAYER_OF[target] >= LAYER_OF[module]:
                problems.append(f"{module} imports {target} (layer {LAYER_OF[target]} >= its own {LAYER_OF[module]})")
        for function, targets in nested:
            problems.append(f"{module}.{function} imports {targets} inside a function")
    assert not problems, "\n".join(problems)


def test_import_normkit_runs_each_module_once():
    code = (
        "import builtins, collections, sys\n"
        "counts = collections.Counter()\n"
        "import importlib._bootstrap as b\n"
        "original = b._load_unlocked\n"
        "def counting(spec):\n"
        "    counts[spec.name] += 1\n"
        "    return original(spec)\n"
        "b._load_unlocked = counting\n"
        "import normkit\n"
        "mine = {k: v for k, v in counts.items() if k == 'normkit' or k.startswith('normkit.')}\n"
        "assert mine and all(v == 1 for v in mine.values()), mine\n"
        "assert 'mpi4py' not in sys.modules, 'import normkit imported mpi4py'\n"
        "assert 'torch' not in sys.modules, 'import normkit imported torch'\n"
        "print(len(mine))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert int(result.stdout.strip()) >= 10

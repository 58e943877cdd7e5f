"""The Python examples run and do what they say (they are what users copy)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python"


@pytest.mark.parametrize("script", ["normalize_activations.py", "train_mlp.py"])
def test_example_runs(script):
    # train_mlp.py exits non-zero unless its loss falls well below the first epoch's.
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "the example printed nothing"

"""Normalize a batch of transformer activations with normkit, as a NumPy user would.

Run: python examples/python/normalize_activations.py
"""

import numpy as np

import normkit

rng = np.random.default_rng(0)
batch, tokens, hidden = 4, 256, 768
x = rng.standard_normal((batch, tokens, hidden), dtype=np.float32)
gamma = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
beta = rng.uniform(-0.1, 0.1, hidden).astype(np.float32)

# LayerNorm over the hidden dim, keeping the statistics a backward pass needs.
y, mean, rstd = normkit.layer_norm(x, hidden, gamma, beta, eps=1e-5, return_stats=True)
print("layer_norm:", y.shape, y.dtype, "| stats:", mean.shape, rstd.shape)

# RMSNorm (eps=None: machine epsilon of float32, as PyTorch), written into a buffer we own.
out = np.empty_like(x)
normkit.rms_norm(x, hidden, gamma, out=out)
print("rms_norm into out=: per-token RMS after normalization / gamma ~ 1:",
      float(np.sqrt(np.mean((out / gamma) ** 2, axis=-1)).mean()))

# float16 activations: float32 statistics inside, float16 out.
y16 = normkit.layer_norm(x.astype(np.float16), hidden, gamma, beta)
print("float16 layer_norm:", y16.dtype, "max |diff| vs float32:", float(np.abs(y16 - y).max()))

print("kernel path:", normkit.info()["kernel_path"], "| threads:", normkit.get_num_threads())

"""Whole torch.nn models with and without normkit.torch.replace_norms (issue: drops into PyTorch).

    python bench/python/bench_torch.py [--reps 9] [--threads 1 2] [--markdown FILE]

Two models built from torch.nn modules only, each timed as it is and as a copy after
``replace_norms``, interleaved round-robin in one run, at each thread count (torch and normkit
set alike), per forward (no_grad, eval) and per forward + backward (train):

- encoder: ``torch.nn.TransformerEncoder`` of 4 ``TransformerEncoderLayer`` (d_model 512, 8 heads,
  feed-forward 2048, pre-norm, plus a final LayerNorm), a batch of 8 x 128 tokens, float32;
- cnn: a ResNet-style network (a stem, 4 basic blocks of conv3x3-BatchNorm2d-ReLU, channels
  64-128), a batch of 16 x 3 x 64 x 64, float32, channels_last.

TransformerEncoderLayer's fused "fast path" (eval under no_grad) calls torch's own fused kernel
and never the norm modules, so it is turned off for both runs
(``torch.backends.mha.set_fastpath_enabled(False)``): both then run the same module code and
differ in the norms only. Outputs of the two are compared (max relative difference printed).
Ratios are torch time / normkit time (> 1: replace_norms is faster).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import normkit
import normkit.torch as nt
from _machine import cpu_model, loadavg
from _timing import interleaved_medians


def _encoder():
    layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, 4, norm=nn.LayerNorm(512), enable_nested_tensor=False), (8, 128, 512)


class _Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.skip(x))


def _cnn():
    model = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          _Block(64, 64, 1), _Block(64, 128, 2), _Block(128, 128, 1), _Block(128, 128, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    return model.to(memory_format=torch.channels_last), (16, 3, 64, 64)


MODELS = {"encoder": _encoder, "cnn": _cnn}


def _input(name, shape):
    x = torch.randn(shape)
    return x.contiguous(memory_format=torch.channels_last) if name == "cnn" else x


def _measure(name, threads, reps):
    torch.manual_seed(0)
    ref, shape = MODELS[name]()
    ours = nt.replace_norms(copy.deepcopy(ref))
    x = _input(name, shape)
    torch.set_num_threads(threads)
    normkit.set_num_threads(threads)
    ref.eval(), ours.eval()
    with torch.no_grad():
        a, b = ref(x), ours(x)
    diff = ((a - b).abs().max() / a.abs().max()).item()

    def forward(model):
        def run():
            model.eval()
            with torch.no_grad():
                model(x)
        return run

    def forward_backward(model):
        def run():
            model.train()
            model(x).square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    def sample(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    fns = [forward(ref), forward(ours), forward_backward(ref), forward_backward(ours)]
    for fn in fns:
        fn()  # warm-up
    t = interleaved_medians(fns, reps, sample)
    return {"model": name, "threads": threads, "fwd": (t[0], t[1]), "fwd_bwd": (t[2], t[3]), "diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    torch.backends.mha.set_fastpath_enabled(False)
    rows = [_measure(name, n, args.reps) for n in args.threads for name in MODELS]
    lines = [
        f"torch.nn models as built vs. after normkit.torch.replace_norms, PyTorch {torch.__version__}, normkit "
        f"{normkit.__version__} (kernel path {normkit.info()['kernel_path']}), CPU: {cpu_model()}, "
        f"load average before: {loadavg()}.",
        f"Command: `python bench/python/bench_torch.py --reps {args.reps} --threads "
        f"{' '.join(map(str, args.threads))}`. Medians of interleaved runs; ratio = torch / normkit.",
        "",
        "| model | threads | forward: torch | normkit | ratio | fwd+bwd: torch | normkit | ratio | max rel. diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        (f0, f1), (b0, b1) = r["fwd"], r["fwd_bwd"]
        lines.append(f"| {r['model']} | {r['threads']} | {f0 * 1e3:.1f} ms | {f1 * 1e3:.1f} ms | {f0 / f1:.2f}x | "
                     f"{b0 * 1e3:.1f} ms | {b1 * 1e3:.1f} ms | {b0 / b1:.2f}x | {r['diff']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

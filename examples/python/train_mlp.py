"""Train a small MLP with normkit's layer objects and plain NumPy.

    python examples/python/train_mlp.py

The network (3 classes of points on noisy spirals in 2-D, lifted to 16 features):

    x -> Linear(16, 64) -> LayerNorm(64) -> ReLU -> Linear(64, 64) -> BatchNorm(64) -> ReLU -> Linear(64, 3)
      -> softmax cross-entropy

Linear layers and ReLU are a few lines of NumPy each; the norms are normkit.LayerNorm
and normkit.BatchNorm: ``y = norm(x)`` in training mode saves what ``norm.backward(dy)``
needs, which returns dx and accumulates ``norm.grad_weight`` / ``norm.grad_bias``.
Their ``weight`` and ``bias`` are NumPy arrays sharing memory with the layer, so the
SGD step updates them in place. Prints the loss per epoch; exits with status 1 if
the loss did not fall.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import normkit


def make_spirals(n_per_class, lift, rng):
    """3 interleaved noisy spirals in 2-D, lifted to 16 features by the matrix `lift` (2, 8)."""
    xs, ys = [], []
    for k in range(3):
        t = rng.uniform(0.1, 1.0, n_per_class)
        angle = 6.0 * t + k * 2.0 * np.pi / 3 + rng.normal(0, 0.25, n_per_class)
        xs.append(np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1))
        ys.append(np.full(n_per_class, k))
    x2, y = np.concatenate(xs), np.concatenate(ys)
    x = np.concatenate([x2 @ lift, np.sin(2 * x2 @ lift)], axis=1)
    return x.astype(np.float32), y


class Linear:
    def __init__(self, n_in, n_out, rng):
        self.weight = (rng.normal(0, 1, (n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        self.bias = np.zeros(n_out, np.float32)

    def __call__(self, x):
        self.x = x
        return x @ self.weight + self.bias

    def backward(self, dy):
        self.grad_weight = self.x.T @ dy
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight.T


def relu(x):
    return np.maximum(x, 0)


def softmax_cross_entropy(logits, labels):
    """Mean loss and its gradient with respect to the logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    dlogits = p
    dlogits[np.arange(n), labels] -= 1
    return float(loss), (dlogits / n).astype(np.float32)


def main():
    rng = np.random.default_rng(0)
    lift = rng.normal(0, 1, (2, 8))
    x_train, y_train = make_spirals(1000, lift, rng)
    x_test, y_test = make_spirals(300, lift, rng)

    fc1, fc2, fc3 = Linear(16, 64, rng), Linear(64, 64, rng), Linear(64, 3, rng)
    ln = normkit.LayerNorm(64)
    bn = normkit.BatchNorm(64)  # (N, C) input: like torch.nn.BatchNorm1d

    def forward(x):
        h1 = fc1(x)
        a1 = ln(h1)
        r1 = relu(a1)
        h2 = fc2(r1)
        a2 = bn(h2)
        r2 = relu(a2)
        return fc3(r2), (a1, a2)

    lr, batch, epochs = 0.1, 100, 20
    losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            logits, (a1, a2) = forward(x_train[idx])
            loss, dlogits = softmax_cross_entropy(logits, y_train[idx])
            total += loss * len(idx)

            # backward, layer by layer (ReLU's gradient: pass where the input was > 0)
            d = fc3.backward(dlogits)
            d = bn.backward(d * (a2 > 0))
            d = fc2.backward(d)
            d = ln.backward(d * (a1 > 0))
            fc1.backward(d)

            # plain SGD; the norms' parameters are updated in place, then their gradients zeroed
            for layer in (fc1, fc2, fc3, ln, bn):
                layer.weight -= lr * layer.grad_weight
                layer.bias -= lr * layer.grad_bias
            ln.zero_grad()
            bn.zero_grad()

        losses.append(total / len(x_train))
        print(f"epoch {epoch + 1:2d}  loss {losses[-1]:.4f}")

    bn.eval()  # inference: BatchNorm uses its running statistics
    logits, _ = forward(x_test)
    accuracy = (logits.argmax(axis=1) == y_test).mean()
    print(f"test accuracy {accuracy:.1%}  ({time.perf_counter() - start:.1f} s; BatchNorm saw "
          f"{int(bn.num_batches_tracked)} batches)")

    if not losses[-1] < 0.5 * losses[0]:
        print(f"FAILED: the loss did not fall clearly ({losses[0]:.4f} -> {losses[-1]:.4f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

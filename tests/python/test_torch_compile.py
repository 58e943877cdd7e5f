"""normkit.torch under torch.compile, and the custom operators' registrations (opcheck).

Runs once, not per kernel path (conftest: PATH_FREE_MODULES): compiling costs tens of seconds,
and what it checks (tracing through the fake implementations with no graph break, the
schemas, autograd registration) does not depend on the kernels.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nt = pytest.importorskip("normkit.torch")
nn = torch.nn


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.GroupNorm(4, 8), nn.InstanceNorm2d(8, affine=True),
        nn.Flatten(), nn.LayerNorm(8 * 6 * 6), nn.Linear(288, 16), nn.RMSNorm(16),
    )
    return nt.replace_norms(model)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_equals_eager(backend):
    eager, compiled_model = _model(), _model()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)  # fullgraph: no graph break allowed
    for step in range(2):
        x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
        for (name, p), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step} {name}: {m}")
            p.grad = p_c.grad = None
    # the running statistics the compiled graph updated are the eager ones
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
    assert compiled_model[1].num_batches_tracked.item() == 2
    eager.eval(), compiled_model.eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def _samples():
    g = torch.Generator().manual_seed(1)

    def r(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)

    ops = torch.ops.normkit
    cl = r(2, 4, 3, 3, grad=False).contiguous(memory_format=torch.channels_last).requires_grad_()
    return [
        (ops.layer_norm, (r(3, 8), [8], r(8), r(8), 1e-5)),
        (ops.layer_norm, (r(3, 8, dtype=torch.bfloat16), [8], r(8), None, 1e-5)),
        (ops.rms_norm, (r(3, 8), [8], r(8), None)),
        (ops.group_norm, (r(2, 4, 5), 2, r(4), r(4), 1e-5)),
        (ops.group_norm, (cl, 2, None, None, 1e-5)),
        (ops.batch_norm, (r(3, 4, 5), torch.zeros(4), torch.ones(4), r(4), r(4), True, 0.1, 1e-5)),
        (ops.batch_norm, (cl, None, None, None, None, True, 0.1, 1e-5)),
        (ops.instance_norm, (r(2, 4, 5), None, None, r(4), r(4), True, 0.1, 1e-5)),
    ]


@pytest.mark.parametrize("case", range(8))
def test_opcheck(case):
    op, args = _samples()[case]
    torch.library.opcheck(op, args)

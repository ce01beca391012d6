"""torch.compile(fullgraph=True) of GivensLinear models: no graph break, eager's numbers.

The Triton path is the custom op ``torch.ops.qgoft.rotate`` (opaque to the compiler, with a
fake implementation and a registered backward); the PyTorch path is traced like any torch
code. On a CPU-only machine the op runs the kernels in the interpreter.
"""
import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close


def _model(device, gen):
    torch.manual_seed(0)
    model = nn.Sequential(qk.GivensLinear(40, 24, block="quasi", scale=True), nn.GELU(),
                          qk.GivensLinear(24, 24, block="givens"), nn.Linear(24, 3)).to(device)
    with torch.no_grad():
        for m in model:
            if isinstance(m, qk.GivensLinear):
                m.rotation.add_(0.2 * torch.randn(m.rotation.shape, generator=gen).to(device))
    return model


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        if torch.cuda.is_available():
            pytest.skip("the PyTorch path is taken by CPU tensors only")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def test_fullgraph_matches_eager(path, device, gen):
    model = _model(device, gen)
    x = torch.randn(2, 5, 40, generator=gen).to(device).requires_grad_()
    leaves = [x] + [p for p in model.parameters() if p.requires_grad]
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), leaves)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    assert_close(out, eager_out)
    assert len(grads) == 1 + 2 + 1 + 2  # x; rotation, scale; rotation; the head's weight, bias
    for g, e in zip(grads, eager_grads):
        assert_close(g, e)


def test_custom_op_is_registered_with_fake_and_autograd():
    x = torch.randn(3, 7)
    params = torch.randn(6, 2, 2)
    torch.library.opcheck(torch.ops.qgoft.rotate.default, (x, params, None, "quasi", "tree", False),
                          test_utils=("test_schema", "test_faketensor"))


def test_autograd_function_matches_the_op(device, gen):
    x = torch.randn(6, 33, generator=gen).to(device).requires_grad_()
    params = (torch.eye(2) + 0.2 * torch.randn(32, 2, 2, generator=gen)).to(device).requires_grad_()
    scale = (1 + 0.1 * torch.randn(33, generator=gen)).to(device).requires_grad_()
    dy = torch.randn(6, 33, generator=gen).to(device)
    a = qk.GivensRotationFunction.apply(x, params, scale, "quasi", "tree", True)
    ga = torch.autograd.grad(a, (x, params, scale), dy)
    b = qk.givens_rotate(x, params, block="quasi", scale=scale, transpose=True, backend="triton")
    gb = torch.autograd.grad(b, (x, params, scale), dy)
    assert torch.equal(a, b)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))

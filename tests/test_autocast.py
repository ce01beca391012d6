"""torch.autocast: outputs in the autocast dtype, fp32 parameters, correct gradients."""
import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close


def _model(device):
    torch.manual_seed(0)
    model = nn.Sequential(qk.GivensLinear(32, 32, block="quasi", scale=True), nn.GELU(),
                          qk.GivensLinear(32, 8, block="givens")).to(device)
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(device, dtype, gen):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bf16")
    model = _model(device)
    x = torch.randn(6, 32, generator=gen).to(device)
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), qk.trainable_parameters(model))
    with torch.autocast(device.type, dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    assert all(p.dtype == torch.float32 for p in qk.trainable_parameters(model))
    grads = torch.autograd.grad(out.float().square().sum(), qk.trainable_parameters(model))
    assert all(g.dtype == torch.float32 for g in grads)
    # the whole model, frozen matmuls included, runs in the autocast dtype: several roundings,
    # not the one of a single op; the fp32 gradients carry them too
    assert_close(out, ref, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=5e-2)

"""GPU tier: the sizes real models use, many rows, bf16 (skipped without CUDA)."""
import pytest
import torch

import qgoft_kernels as qk
from qgoft_kernels.verify import Case, assert_case_ok, assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.kernel]

GPU_DIMS = [768, 3072, 4096, 11008, 16384, 28672]


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
@pytest.mark.parametrize("d", GPU_DIMS, ids=lambda d: f"d{d}")
def test_quasi_scale_bf16_many_rows(d, transpose, device, gen):
    assert_case_ok(Case(d, 16384, "quasi", True, transpose, torch.bfloat16), device, gen)


@pytest.mark.parametrize("d", GPU_DIMS, ids=lambda d: f"d{d}")
def test_givens_fp32(d, device, gen):
    assert_case_ok(Case(d, 4096, "givens", False, False, torch.float32), device, gen)


def test_merge_4096(device, gen):
    layer = qk.GivensLinear(4096, 4096, block="quasi", scale=True, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.rotation.add_(0.1 * torch.randn(layer.rotation.shape, generator=gen).to(device))
    merged = layer.merged_linear()
    x = torch.randn(256, 4096, generator=gen).to(device, torch.bfloat16)
    # both sides bf16 end to end (the rotation, then a bf16 matmul over 4096 terms)
    assert_close(merged(x), layer(x), rtol=2e-2)

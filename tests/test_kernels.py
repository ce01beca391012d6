"""The Triton kernels (GPU, or the interpreter on the CPU) against the float64 oracle.

Every case compares the output and every gradient (one shared upstream gradient), with
outputs poisoned before each launch (conftest sets QGOFT_POISON).
"""
import pytest
import torch
import triton
import triton.language as tl

import qgoft_kernels as qk
from qgoft_kernels.kernels.tree import _count, _offset
from qgoft_kernels.schedule import param_offsets, stage_counts
from qgoft_kernels.verify import Case, assert_case_ok, assert_close, random_inputs

pytestmark = pytest.mark.kernel

#: `make test` covers every code path once; `make test-all` (CI) adds the rest of the matrix (marked full)
FULL = pytest.mark.full
DIMS = [1, 2, 3, 5, 8, 17, 64, 100, 128, 257, pytest.param(768, marks=FULL)]
COMBOS = [(b, s, t) for b in ("givens", "quasi") for s in (False, True) for t in (False, True)]


def _ids(combo):
    block, scale, transpose = combo
    return f"{block}{'-scale' if scale else ''}{'-T' if transpose else ''}"


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
@pytest.mark.parametrize("d", DIMS, ids=lambda d: f"d{d}")
def test_fp32(d, combo, device, gen):
    assert_case_ok(Case(d, 37, *combo, torch.float32), device, gen)


# fp16 at d = 257 is in the full matrix only: its path is the bf16 one's, and fp16's own at d <= 100
LOW = [pytest.param(d, dtype, id=f"d{d}-{name}", marks=FULL if (d, name) == (257, "fp16") else ())
       for d in (1, 3, 17, 100, 257) for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))]


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
@pytest.mark.parametrize("d, dtype", LOW)
def test_low_precision(d, combo, dtype, device, gen):
    assert_case_ok(Case(d, 37, *combo, dtype), device, gen)


@pytest.mark.parametrize("combo", [("quasi", True, False), ("givens", True, True)], ids=_ids)
def test_float64_inputs(combo, device, gen):
    assert_case_ok(Case(33, 9, *combo, torch.float64), device, gen)


@pytest.mark.parametrize("rows", [1, 2, 65, 300])
def test_row_counts(rows, device, gen):
    assert_case_ok(Case(40, rows, "quasi", True, False, torch.float32), device, gen)


def _grads(x, params, scale, dy, **kw):
    leaves = [t for t in (x, params, scale) if t is not None and t.requires_grad]
    y = qk.givens_rotate(x, params, scale=scale, **kw)
    return (y, *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
def test_non_contiguous_and_3d_input(transpose, device, gen):
    d = 48
    _, params, scale, _ = random_inputs(Case(d, 1, "quasi", True, transpose, torch.float32), device, gen)
    base = torch.randn(4, 2 * d, 6, generator=gen).to(device)
    x = base.transpose(1, 2)[..., ::2]  # [4, 6, d], strides everywhere
    assert not x.is_contiguous()
    dy = torch.randn(4, 6, d, generator=gen).to(device)
    x_c = x.detach().clone().requires_grad_()
    x = x.detach().requires_grad_()
    params.requires_grad_()
    scale.requires_grad_()
    tri = _grads(x, params, scale, dy, block="quasi", transpose=transpose, backend="triton")
    ref = _grads(x_c.double(), params.double(), scale.double(), dy.double(), block="quasi",
                 transpose=transpose, backend="torch")
    assert tri[0].shape == x.shape and tri[1].shape == x.shape
    for t, r in zip(tri, ref):
        assert_close(t, r)


def test_zero_rows(device):
    d = 20
    x = torch.randn(0, 3, d, device=device, requires_grad=True)
    params = torch.randn(d - 1, 2, 2, device=device, requires_grad=True)
    scale = torch.randn(d, device=device, requires_grad=True)
    y = qk.givens_rotate(x, params, block="quasi", scale=scale, backend="triton")
    assert y.shape == (0, 3, d)
    dx, dp, ds = torch.autograd.grad(y.sum(), (x, params, scale))
    assert dx.shape == x.shape
    assert torch.equal(dp, torch.zeros_like(params)) and torch.equal(ds, torch.zeros_like(scale))


@pytest.mark.parametrize("block", [pytest.param("givens", marks=FULL), "quasi"])
def test_parameter_gradients_are_deterministic(block, device, gen, monkeypatch):
    # several programs, each with several row blocks: the reduction order matters
    monkeypatch.setenv("QGOFT_BLOCK_N", "4")
    monkeypatch.setenv("QGOFT_PROGRAMS", "3")
    case = Case(100, 150, block, True, False, torch.float32)
    x, params, scale, dy = random_inputs(case, device, gen)
    params.requires_grad_()
    scale.requires_grad_()
    runs = [_grads(x, params, scale, dy, block=block, backend="triton")[1:] for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    ref = _grads(x.double(), params.double(), scale.double(), dy.double(), block=block, backend="torch")[1:]
    for a, r in zip(runs[0], ref):
        assert_close(a, r)


@pytest.mark.parametrize("which", ["x", "params", "scale", "x+scale"])
def test_only_the_requested_gradients(which, device, gen):
    """``needs_input_grad`` subsets take other launch paths; each must still be right."""
    case = Case(70, 20, "quasi", True, False, torch.float32)
    x, params, scale, dy = random_inputs(case, device, gen)
    for name, t in (("x", x), ("params", params), ("scale", scale)):
        t.requires_grad_(name in which.split("+"))
    tri = _grads(x, params, scale, dy, block="quasi", backend="triton")
    ref = _grads(*(t.double().requires_grad_(t.requires_grad) for t in (x, params, scale)), dy.double(),
                 block="quasi", backend="torch")
    assert len(tri) == len(ref) == 1 + len(which.split("+"))
    for t, r in zip(tri, ref):
        assert_close(t, r)


@pytest.mark.parametrize("block_n, programs", [pytest.param(1, 1, marks=FULL), (2, 5), (16, 2), (64, 7)])
def test_launch_configurations(block_n, programs, device, gen, monkeypatch):
    monkeypatch.setenv("QGOFT_BLOCK_N", str(block_n))
    monkeypatch.setenv("QGOFT_PROGRAMS", str(programs))
    assert_case_ok(Case(129, 45, "quasi", True, True, torch.float32), device, gen)
    assert_case_ok(Case(129, 45, "givens", True, False, torch.float32), device, gen)


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
@pytest.mark.parametrize("chunk, dims", [(1, (2, 5, 17)), (4, (5, 100)), (32, (33, 257))],
                         ids=["chunk1", "chunk4", "chunk32"])
def test_chunked_rows(chunk, dims, combo, device, gen, monkeypatch):
    """Rows split into chunks whose roots a second launch finishes (the path for long rows), at small sizes."""
    monkeypatch.setenv("QGOFT_CHUNK", str(chunk))
    monkeypatch.setenv("QGOFT_PROGRAMS", "3")
    for d in dims:
        assert_case_ok(Case(d, 19, *combo, torch.float32), device, gen)


def test_chunked_bf16_and_determinism(device, gen, monkeypatch):
    monkeypatch.setenv("QGOFT_CHUNK", "16")
    assert_case_ok(Case(200, 33, "quasi", True, False, torch.bfloat16), device, gen)
    case = Case(200, 70, "quasi", True, True, torch.float32)
    x, params, scale, dy = random_inputs(case, device, gen)
    params.requires_grad_()
    scale.requires_grad_()
    first = _grads(x, params, scale, dy, block="quasi", transpose=True, backend="triton")
    again = _grads(x, params, scale, dy, block="quasi", transpose=True, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_auto_backend_uses_the_kernels(device):
    # on the CPU only because conftest set TRITON_INTERPRET=1
    from qgoft_kernels.function import _check_inputs

    x = torch.randn(2, 8, device=device)
    assert _check_inputs(x, torch.zeros(7, device=device), "givens", "tree", None, False, "auto") == "triton"


def test_double_backward_is_refused_clearly(device, gen):
    """The kernels' backward is first order only: differentiating it says so (the PyTorch path can)."""
    x = torch.randn(4, 9, generator=gen).to(device).requires_grad_()
    params = torch.randn(8, generator=gen).to(device).requires_grad_()
    y = qk.givens_rotate(x, params, backend="triton")
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='torch'"):
        dx.sum().backward()
    # the PyTorch path has second derivatives
    inputs = (x.detach().double().cpu().requires_grad_(), params.detach().double().cpu().requires_grad_())
    assert torch.autograd.gradgradcheck(lambda a, p: qk.givens_rotate(a, p, backend="torch"), inputs)


@triton.jit
def _offsets_probe(offsets, counts, d, L: tl.constexpr):
    for r in tl.static_range(1, L + 2):
        tl.store(offsets + r - 1, _offset(d, r))
    for r in tl.static_range(1, L + 1):
        tl.store(counts + r - 1, _count(d, r))


@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 17, 100, 257, 1000, 11008])
def test_kernel_offsets_match_the_schedule(d, device):
    """The kernels find each stage's parameters from a closed form; it must be the schedule's."""
    L = qk.num_stages(d)
    offsets = torch.full((L + 1,), -1, dtype=torch.int32, device=device)
    counts = torch.full((max(L, 1),), -1, dtype=torch.int32, device=device)
    _offsets_probe[(1,)](offsets=offsets, counts=counts, d=d, L=L)
    assert offsets.tolist() == list(param_offsets(d))
    assert counts[:L].tolist() == list(stage_counts(d))

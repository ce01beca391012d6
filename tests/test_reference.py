"""The PyTorch paths against the dense oracle, and the stage-wise reference's gradcheck (runs anywhere).

``rotate_reference`` (one index-copy per stage) is the oracle's stage-wise twin;
``rotate_sweeps`` (the kernels' compact algorithm in torch ops) and ``rotate_dense`` (block
factors and batched matmuls; blocks of 32, and of 2 so that most stages are on the roots)
are the ``backend="torch"`` formulations. All are held to the dense ``givens_matrix``.
"""
import functools

import pytest
import torch

import qgoft_kernels as qk
from qgoft_kernels.dense import rotate_dense
from qgoft_kernels.reference import blocks_from_params, rotate_reference
from qgoft_kernels.schedule import schedule
from qgoft_kernels.sweeps import rotate_sweeps
from qgoft_kernels.verify import Case, assert_close, random_inputs

DIMS = [1, 2, 3, 5, 6, 8, 17, 64, 100, 257]


def _dense_step(d, params, block, scale, stage_pairs):
    """``P_L ... P_1 diag(scale)`` written out entry by entry, independent of givens_matrix."""
    B = blocks_from_params(params, block)
    R = torch.eye(d, dtype=torch.float64)
    p = 0
    for pairs in stage_pairs:
        P = torch.eye(d, dtype=torch.float64)
        for i, j in pairs:
            P[i, i], P[i, j], P[j, i], P[j, j] = B[p, 0, 0], B[p, 0, 1], B[p, 1, 0], B[p, 1, 1]
            p += 1
        R = P @ R
    return R if scale is None else R @ torch.diag(scale)


@pytest.mark.parametrize("block", ["givens", "quasi"])
@pytest.mark.parametrize("d", [1, 2, 6, 9, 16])
def test_givens_matrix_matches_entrywise_construction(d, block, gen):
    x, params, scale, _ = random_inputs(Case(d, 1, block, True, False, torch.float64), "cpu", gen)
    params, scale = params.double(), scale.double()
    stages = schedule(d).stages
    ref = _dense_step(d, params, block, scale, stages)
    assert_close(qk.givens_matrix(d, params, block=block, scale=scale), ref, atol=1e-14)


def test_givens_d4_by_hand():
    # stage 1: (0,1),(2,3); stage 2: (0,2). R = P2 @ P1
    t = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)

    def G(n, i, j, a):
        g = torch.eye(n, dtype=torch.float64)
        g[i, i] = g[j, j] = torch.cos(a)
        g[i, j], g[j, i] = -torch.sin(a), torch.sin(a)
        return g

    expected = G(4, 0, 2, t[2]) @ G(4, 0, 1, t[0]) @ G(4, 2, 3, t[1])
    assert_close(qk.givens_matrix(4, t), expected, atol=1e-15)


@pytest.mark.parametrize("d", [2, 8, 100, 768])
def test_givens_is_a_rotation(d, gen):
    _, params, _, _ = random_inputs(Case(d, 1, "givens", False, False, torch.float64), "cpu", gen)
    R = qk.givens_matrix(d, params.double())
    assert_close(R.T @ R, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert_close(torch.linalg.det(R), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)


PATHS = [rotate_reference, rotate_sweeps, functools.partial(rotate_dense, block_width=32),
         functools.partial(rotate_dense, block_width=2)]
PATH_IDS = ["reference", "sweeps", "dense-b32", "dense-b2"]
# the gradients and the identity of the torch path's formulations are tests/test_torch_path.py's


@pytest.mark.parametrize("rotate", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
@pytest.mark.parametrize("scale", [False, True], ids=["noscale", "scale"])
@pytest.mark.parametrize("block", ["givens", "quasi"])
@pytest.mark.parametrize("d", DIMS)
def test_stagewise_matches_dense(d, block, scale, transpose, rotate, gen):
    case = Case(d, 13, block, scale, transpose, torch.float64)
    x, params, s, _ = random_inputs(case, "cpu", gen)
    params = params.double()
    s = None if s is None else s.double()
    R = qk.givens_matrix(d, params, block=block, scale=s)
    ref = x @ (R.T if transpose else R)
    out = rotate(x, params, block=block, scale=s, transpose=transpose)
    assert_close(out, ref, rtol=1e-13)


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
@pytest.mark.parametrize("block", ["givens", "quasi"])
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 13])
def test_gradcheck(d, block, transpose, gen):
    rotate = rotate_reference
    case = Case(d, 4, block, True, transpose, torch.float64)
    x, params, s, _ = random_inputs(case, "cpu", gen)
    inputs = (x.requires_grad_(), params.double().requires_grad_(), s.double().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, p, sc: rotate(a, p, block=block, scale=sc, transpose=transpose), inputs)


def test_identity_parameters_give_identity():
    rotate = rotate_reference
    d = 37
    x = torch.randn(5, d, dtype=torch.float64)
    for block, params in (("givens", torch.zeros(d - 1)), ("quasi", torch.eye(2).repeat(d - 1, 1, 1))):
        assert torch.equal(qk.givens_matrix(d, params.double(), block=block), torch.eye(d, dtype=torch.float64))
        assert torch.equal(rotate(x, params, block=block), x)


@pytest.mark.parametrize("rotate", PATHS, ids=PATH_IDS)
def test_shapes_dtype_and_strides(rotate):
    d = 12
    params = torch.randn(d - 1)
    x = torch.randn(3, 4, 2 * d, dtype=torch.bfloat16)[..., ::2]  # 3-D, non-contiguous
    out = rotate(x, params)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    ref = x.double() @ qk.givens_matrix(d, params.double())
    assert_close(out, ref)
    assert rotate(x[:0], params).shape == (0, 4, d)

"""Mixed batches (``adapter_index``): every row against the float64 oracle of its own adapter.

Both paths: the Triton kernel (GPU, or the interpreter on the CPU) and the PyTorch path. The
oracle is built here, row by row, from ``givens_matrix`` in float64; gradients from autograd
through it.
"""
import pytest
import torch
import torch.nn.functional as F

import qgoft_kernels as qk
from qgoft_kernels.verify import LOW_ATOL, LOW_FACTOR, assert_close, rel_error

#: "torch-aten": the PyTorch path without the compiled CPU kernels (QGOFT_NATIVE=0), which
#: otherwise run a mixed batch that autograd does not record
BACKENDS = ["triton", "torch", "torch-aten"]


@pytest.fixture(autouse=True)
def _aten_path(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "torch-aten":
        monkeypatch.setenv("QGOFT_NATIVE", "0")


def _backend(name: str) -> str:
    return "torch" if name == "torch-aten" else name


def _stack(d, n_adapters, block, scale, gen, device):
    """Random stacked parameters: blocks near the identity, angles in [-pi, pi], scales near 1."""
    n = qk.num_pairs(d)
    if block == "quasi":
        params = torch.eye(2).repeat(n_adapters, n, 1, 1) + 0.3 * torch.randn(n_adapters, n, 2, 2, generator=gen)
    else:
        params = (torch.rand(n_adapters, n, generator=gen) * 2 - 1) * torch.pi
    s = 1 + 0.3 * torch.randn(n_adapters, d, generator=gen) if scale else None
    return params.to(device), None if s is None else s.to(device)


def _oracle(x, params, scale, index, block):
    """float64 ``x[r] @ R_{index[r]}`` per row (``-1``: ``x[r]``), differentiable in params/scale."""
    d = x.shape[-1]
    rows = x.reshape(-1, d).double()
    flat = index.reshape(-1)
    if flat.numel() != rows.shape[0]:
        flat = flat.repeat_interleave(rows.shape[0] // flat.numel())
    out = []
    for r in range(rows.shape[0]):
        a = int(flat[r])
        if a < 0:
            out.append(rows[r])
        else:
            R = qk.givens_matrix(d, params[a].double(), block=block, scale=None if scale is None else scale[a].double())
            out.append(rows[r] @ R)
    return torch.stack(out).reshape(x.shape)


def _index(n, n_adapters, gen, device, runs=1):
    """Random adapters in runs of ``runs`` rows, about a fifth of them -1."""
    picks = torch.randint(-1, n_adapters, (-(-n // runs),), generator=gen)
    picks[torch.rand(picks.shape, generator=gen) < 0.2] = -1
    return picks.repeat_interleave(runs)[:n].to(device)


COMBOS = [(b, s) for b in ("givens", "quasi") for s in (False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}{'-scale' if c[1] else ''}")
@pytest.mark.parametrize("d", [1, 2, 3, 17, 77], ids=lambda d: f"d{d}")
def test_each_row_matches_its_adapter(d, combo, backend, device, gen):
    block, scale = combo
    params, s = _stack(d, 4, block, scale, gen, device)
    x = torch.randn(13, d, generator=gen).to(device)
    index = _index(13, 4, gen, device, runs=3)
    y = qk.givens_rotate(x, params, block=block, scale=s, adapter_index=index, backend=_backend(backend))
    assert_close(y, _oracle(x, params, s, index, block), name="y")


@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("block_n", [1, 2])
@pytest.mark.parametrize("d", [16, 77], ids=lambda d: f"d{d}")
def test_kernel_programs_walk_many_segments(d, block_n, programs, device, gen, monkeypatch):
    """The Triton kernel's persistent programs, each over a share of the row blocks that starts and
    ends inside tiles and crosses many adapters (more segments than the two written out, the rest
    in its loop), base tiles and short tiles' empty slots among them: every row its adapter's."""
    monkeypatch.setenv("QGOFT_BLOCK_N", str(block_n))
    monkeypatch.setenv("QGOFT_PROGRAMS", str(programs))
    params, s = _stack(d, 5, "quasi", True, gen, device)
    x = torch.randn(61, d, generator=gen).to(device)
    index = torch.cat([_index(40, 5, gen, device, runs=1), _index(21, 5, gen, device, runs=7)])
    y = qk.givens_rotate(x, params, block="quasi", scale=s, adapter_index=index, backend="triton")
    assert_close(y, _oracle(x, params, s, index, "quasi"), name="y")
    base = index.reshape(-1) < 0
    assert torch.equal(y[base], x[base])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_rows_within_twice_the_torch_path(dtype, backend, device, gen):
    d, n_adapters = 77, 3
    params, s = _stack(d, n_adapters, "quasi", True, gen, device)
    x = torch.randn(20, d, generator=gen).to(device, dtype)
    index = _index(20, n_adapters, gen, device)
    y = qk.givens_rotate(x, params, block="quasi", scale=s, adapter_index=index, backend=_backend(backend))
    ref = _oracle(x, params, s, index, "quasi")
    # the PyTorch path in the same dtype, one sample at a time with its adapter: the bound
    alone = torch.stack([x[r] if int(index[r]) < 0 else
                         qk.givens_rotate(x[r:r + 1], params[int(index[r])], block="quasi",
                                          scale=s[int(index[r])], backend="torch")[0] for r in range(20)])
    assert y.dtype == dtype
    assert_close(y, ref, rtol=LOW_FACTOR * rel_error(alone, ref) + LOW_ATOL, name="y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_rows_pass_through_bit_for_bit(backend, device, gen):
    d = 33
    params, s = _stack(d, 2, "quasi", True, gen, device)
    x = torch.randn(6, d, generator=gen).to(device, torch.bfloat16)
    x[1, :4] = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan")])
    x[4, 3] = -0.0
    index = torch.tensor([0, -1, 1, -1, -1, 0], device=device)
    y = qk.givens_rotate(x, params, block="quasi", scale=s, adapter_index=index, backend=_backend(backend))
    for r in (1, 3, 4):
        assert torch.equal(y[r].view(torch.int16), x[r].view(torch.int16)), f"row {r} changed"
    # the adapted rows of a row with inf/nan elsewhere are unaffected by it
    assert torch.isfinite(y[[0, 2, 5]].float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_adapter_per_sample_equals_each_sample_alone(backend, device, gen):
    d, n_adapters = 17, 3
    params, s = _stack(d, n_adapters, "givens", True, gen, device)
    x = torch.randn(4, 5, d, generator=gen).to(device)
    index = torch.tensor([2, -1, 0, 2], device=device)
    y = qk.givens_rotate(x, params, block="givens", scale=s, adapter_index=index, backend=_backend(backend))
    for b in range(4):
        a = int(index[b])
        alone = x[b] if a < 0 else qk.givens_rotate(x[b], params[a], block="givens", scale=s[a],
                                                    backend=_backend(backend))
        assert_close(y[b], alone, name=f"sample {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeats_are_bit_identical_and_reordering_moves_rows_only(backend, device, gen):
    d, n = 40, 24
    params, s = _stack(d, 5, "quasi", False, gen, device)
    x = torch.randn(n, d, generator=gen).to(device)
    index = _index(n, 5, gen, device)
    y = qk.givens_rotate(x, params, block="quasi", adapter_index=index, backend=_backend(backend))
    assert torch.equal(y, qk.givens_rotate(x, params, block="quasi", adapter_index=index, backend=_backend(backend)))
    perm = torch.randperm(n, generator=gen).to(device)
    y_perm = qk.givens_rotate(x[perm], params, block="quasi", adapter_index=index[perm], backend=_backend(backend))
    assert_close(y_perm, y[perm], name="reordered")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_built_once_serves_layers_of_other_widths(backend, device, gen):
    index = torch.tensor([1, 1, 0, -1, 1], device=device)
    batch = qk.MixedBatch(index, 2)
    assert batch.adapters() == [0, 1]
    for d in (8, 19):
        params, s = _stack(d, 2, "quasi", True, gen, device)
        x = torch.randn(5, d, generator=gen).to(device)
        y = qk.givens_rotate(x, params, block="quasi", scale=s, adapter_index=batch, backend=_backend(backend))
        assert_close(y, _oracle(x, params, s, index, "quasi"), name=f"d{d}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_givens_linear_with_adapter_index(backend, device, gen):
    d, k = 21, 9
    params, s = _stack(d, 3, "quasi", True, gen, device)
    weight, bias = torch.randn(k, d, generator=gen).to(device), torch.randn(k, generator=gen).to(device)
    x = torch.randn(7, d, generator=gen).to(device)
    index = _index(7, 3, gen, device)
    h = qk.function.givens_linear(x, weight, bias, params, block="quasi", scale=s, adapter_index=index,
                                  backend=_backend(backend))
    ref = F.linear(_oracle(x, params, s, index, "quasi"), weight.double(), bias.double())
    assert_close(h, ref, name="h")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}{'-scale' if c[1] else ''}")
def test_gradients_match_the_oracle(combo, backend, device, gen):
    block, scale = combo
    d, n, n_adapters = 19, 11, 3
    params, s = _stack(d, n_adapters, block, scale, gen, device)
    x = torch.randn(n, d, generator=gen).to(device)
    dy = torch.randn(n, d, generator=gen).to(device)
    index = _index(n, n_adapters, gen, device, runs=2)
    index[0] = 1    # one adapter never used: its gradient is zero
    index[index == 2] = 1
    leaves = [t.clone().requires_grad_() for t in (x, params) + ((s,) if scale else ())]
    y = qk.givens_rotate(leaves[0], leaves[1], block=block, scale=leaves[2] if scale else None,
                         adapter_index=index, backend=_backend(backend))
    tri = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_y = _oracle(ref_leaves[0], ref_leaves[1], ref_leaves[2] if scale else None, index, block)
    ref = torch.autograd.grad(ref_y, ref_leaves, dy.double())
    for name, got, want in zip(("dx", "dparams", "dscale"), tri, ref):
        assert_close(got, want, name=name)
    assert torch.count_nonzero(tri[1][2]) == 0


def test_gradcheck_on_the_torch_path(gen):
    d, n_adapters = 6, 2
    params, s = _stack(d, n_adapters, "quasi", True, gen, "cpu")
    x = torch.randn(5, d, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, -1, 0, 1, 1])

    def f(x, p, sc):
        return qk.givens_rotate(x, p, block="quasi", scale=sc, adapter_index=index, backend="torch")

    assert torch.autograd.gradcheck(f, (x, params.double().requires_grad_(), s.double().requires_grad_()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_all_base_rows(backend, device, gen):
    params, _ = _stack(9, 2, "givens", False, gen, device)
    empty = torch.randn(0, 9).to(device)
    assert qk.givens_rotate(empty, params, adapter_index=torch.zeros(0, dtype=torch.long, device=device),
                            backend=_backend(backend)).shape == (0, 9)
    x = torch.randn(4, 9, generator=gen).to(device)
    y = qk.givens_rotate(x, params, adapter_index=torch.full((4,), -1, device=device), backend=_backend(backend))
    assert torch.equal(y, x)


def test_tiles_cover_every_row_once():
    index = torch.tensor([3, 3, 3, 3, 3, -1, 0, 3, 0, -1])
    batch = qk.MixedBatch(index, 5)
    tiles = batch.tiles(2)
    covered = torch.cat([batch.order[f:f + n] for f, n, _ in tiles.tolist()])
    assert sorted(covered.tolist()) == list(range(10))
    for first, n, adapter in tiles.tolist():
        assert 1 <= n <= 2
        assert (index[batch.order[first:first + n]] == adapter).all()
    assert batch.adapters() == [0, 3]
    assert "adapters used=2" in repr(batch)


@pytest.mark.parametrize("bad, error, words", [
    (torch.tensor([0, 3, 1]), ValueError, "holds 3"),
    (torch.tensor([0, -2, 1]), ValueError, "holds -2"),
    (torch.tensor([0.0, 1.0, 1.0]), TypeError, "integer dtype"),
    (torch.tensor([True, False, True]), TypeError, "integer dtype"),
    (torch.tensor([0, 1]), ValueError, "row shape"),
    ([0, 1, 1], TypeError, "torch.Tensor"),
], ids=["too-large", "below-minus-one", "float", "bool", "wrong-length", "list"])
def test_bad_index_is_refused_clearly(bad, error, words, gen):
    params, _ = _stack(5, 3, "givens", False, gen, "cpu")
    x = torch.randn(3, 5, generator=gen)
    before = (x.clone(), params.clone())
    with pytest.raises(error, match=words):
        qk.givens_rotate(x, params, adapter_index=bad)
    assert torch.equal(x, before[0]) and torch.equal(params, before[1])


def test_bad_stacks_are_refused_clearly(gen):
    x = torch.randn(3, 5, generator=gen)
    index = torch.tensor([0, 1, -1])
    params, s = _stack(5, 2, "quasi", True, gen, "cpu")
    with pytest.raises(ValueError, match="stack the adapters"):
        qk.givens_rotate(x, params[0], block="quasi", adapter_index=index)
    with pytest.raises(ValueError, match=r"shape \(A, 4\) .* block='givens'"):
        qk.givens_rotate(x, params, block="givens", adapter_index=index)
    wider, _ = _stack(6, 2, "quasi", False, gen, "cpu")
    with pytest.raises(ValueError, match=r"shape \(A, 4, 2, 2\) .* d=5"):
        qk.givens_rotate(x, wider, block="quasi", adapter_index=index)
    with pytest.raises(ValueError, match=r"scale must stack one \[d\] scale per adapter"):
        qk.givens_rotate(x, params, block="quasi", scale=s[0], adapter_index=index)
    with pytest.raises(ValueError, match="transpose=False"):
        qk.givens_rotate(x, params, block="quasi", transpose=True, adapter_index=index)
    with pytest.raises(ValueError, match="built for n_adapters=3"):
        qk.givens_rotate(x, params, block="quasi", adapter_index=qk.MixedBatch(index, 3))
    with pytest.raises(ValueError, match="n_adapters must be an int"):
        qk.MixedBatch(index, 0)

"""The PyTorch path's formulations (sweeps, dense factors at several block widths): each
against the float64 oracle, gradcheck and gradgradcheck, determinism, and the switch.

Runs anywhere: ``backend="torch"`` takes CPU and CUDA tensors alike; the formulation is
forced with ``QGOFT_TORCH_PATH`` / ``QGOFT_DENSE_BLOCK`` as a user would.
"""
import json
import os
from contextlib import nullcontext

import pytest
import torch

import qgoft_kernels as qk
from qgoft_kernels import dense, native
from qgoft_kernels.dense import DenseRotation, dense_factors, layout
from qgoft_kernels.torch_path import choose, dense_block, formulation
from qgoft_kernels.verify import Case, assert_close, check_case, random_inputs

# (QGOFT_TORCH_PATH, QGOFT_DENSE_BLOCK): block widths 1 (every stage on the roots), 2, 4, the
# default 32, and one past every d here (the whole dense R)
FORMULATIONS = [("sweeps", ""), ("dense", "1"), ("dense", "2"), ("dense", "4"), ("dense", "32"),
                ("dense", "4096")]
FORMULATION_IDS = ["sweeps", "dense-b1", "dense-b2", "dense-b4", "dense-b32", "dense-R"]
COMBOS = [(b, s, t) for b in ("givens", "quasi") for s in (False, True) for t in (False, True)]


@pytest.fixture(params=FORMULATIONS, ids=FORMULATION_IDS)
def forced(request, monkeypatch):
    path, width = request.param
    monkeypatch.setenv("QGOFT_TORCH_PATH", path)
    monkeypatch.setenv("QGOFT_DENSE_BLOCK", width)
    # GivensLinear on CPU tensors takes the PyTorch path (not the interpreter conftest sets)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def _ids(combo):
    block, scale, transpose = combo
    return f"{block}{'-scale' if scale else ''}{'-T' if transpose else ''}"


def _use_compiled(monkeypatch, on: bool):
    """The dense row passes by the compiled kernels (qgoft_kernels.native) or ATen's ops."""
    monkeypatch.setenv("QGOFT_NATIVE", "1" if on else "0")
    if on and native.library() is None:
        pytest.skip("no C compiler here: the compiled kernels are not built")


@pytest.fixture(params=["compiled", "batched", "per-block"])
def block_calls(request, monkeypatch):
    """Every way the dense blocks are applied to rows: the compiled kernels, and with ATen's
    ops one batched call into a block-major buffer (a few rows) or a call per block on the
    rows' layout (many rows)."""
    _use_compiled(monkeypatch, request.param == "compiled")
    monkeypatch.setattr(dense, "SMALL_ROWS", 1 << 30 if request.param == "batched" else 0)
    return request.param


@pytest.fixture(params=["compiled", "aten"])
def kernels(request, monkeypatch):
    _use_compiled(monkeypatch, request.param == "compiled")
    return request.param


#: the fused layer's row passes: the compiled kernels, or ATen's ops with both ways of calling
#: the blocks (block_calls: dense.SMALL_ROWS) and both layouts of x @ R, in the rows' layout or
#: made as its transpose (dense.TRANSPOSED_ROWS)
ROW_PASSES = {"compiled": None, "aten-batched-rows": ("batched", "rows"),
              "aten-batched-transposed": ("batched", "transposed"), "aten-per-block-rows": ("per-block", "rows"),
              "aten-per-block-transposed": ("per-block", "transposed")}


@pytest.fixture(params=list(ROW_PASSES))
def row_passes(request, monkeypatch):
    _use_compiled(monkeypatch, request.param == "compiled")
    if ROW_PASSES[request.param] is not None:
        calls, layout_ = ROW_PASSES[request.param]
        monkeypatch.setattr(dense, "SMALL_ROWS", 1 << 30 if calls == "batched" else 0)
        monkeypatch.setattr(dense, "TRANSPOSED_ROWS", 1 << 30 if layout_ == "rows" else 0)
    return request.param


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
@pytest.mark.parametrize("d", [3, 100])
def test_dense_both_block_calls_against_the_oracle(d, combo, block_calls, device, gen, monkeypatch):
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    monkeypatch.setenv("QGOFT_DENSE_BLOCK", "4")
    result = check_case(Case(d, 37, *combo, torch.float32), device, backend="torch", generator=gen)
    assert all(r[2] for r in result.values()), result


# many widths for the default dense blocks, fewer for the sweeps (tests/test_reference.py holds
# them to float64 too) and the other block widths
ORACLE_DIMS = {"sweeps": (1, 3, 17, 100, 768), "dense-b32": (1, 2, 3, 17, 64, 100, 257, 768)}
ORACLE_CASES = [pytest.param(path, width, d, id=f"{name}-d{d}")
                for (path, width), name in zip(FORMULATIONS, FORMULATION_IDS)
                for d in ORACLE_DIMS.get(name, (3, 100))]
# the formulations whose code paths differ: sweeps, roots of one column each, the default, R
FEW = [pytest.param(FORMULATIONS[i], id=FORMULATION_IDS[i]) for i in (0, 1, 4, 5)]


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
@pytest.mark.parametrize("path, width, d", ORACLE_CASES)
def test_fp32_against_the_oracle(path, width, d, combo, device, gen, monkeypatch):
    """Output and every gradient within the fp32 bound of the float64 oracle (docs/method.md §4)."""
    monkeypatch.setenv("QGOFT_TORCH_PATH", path)
    monkeypatch.setenv("QGOFT_DENSE_BLOCK", width)
    result = check_case(Case(d, 37, *combo, torch.float32), device, backend="torch", generator=gen)
    bad = {n: r for n, r in result.items() if not r[2]}
    assert not bad, "; ".join(f"{n}: error {e:.3e} > bound {b:.3e} ({detail})" for n, (e, b, _, detail) in bad.items())


@pytest.mark.parametrize("formulation", FEW)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
@pytest.mark.parametrize("d", [33, 384])
def test_other_dtypes(d, dtype, formulation, device, gen, monkeypatch):
    monkeypatch.setenv("QGOFT_TORCH_PATH", formulation[0])
    monkeypatch.setenv("QGOFT_DENSE_BLOCK", formulation[1])
    for combo in (("quasi", True, False), ("givens", False, True)):
        result = check_case(Case(d, 29, *combo, dtype), device, backend="torch", generator=gen)
        assert all(r[2] for r in result.values()), result


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
@pytest.mark.parametrize("block", ["givens", "quasi"])
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 13])
def test_gradcheck_and_gradgradcheck(d, block, transpose, forced, kernels, gen):
    case = Case(d, 4, block, True, transpose, torch.float64)
    x, params, scale, _ = random_inputs(case, "cpu", gen)
    inputs = (x.requires_grad_(), params.double().requires_grad_(), scale.double().requires_grad_())

    def rotate(a, p, s):
        return qk.givens_rotate(a, p, block=block, scale=s, transpose=transpose, backend="torch")

    assert torch.autograd.gradcheck(rotate, inputs)
    # second derivatives: slow, so at two widths (one with roots at every small block width)
    if d in (2, 5):
        assert torch.autograd.gradgradcheck(rotate, inputs)


@pytest.mark.parametrize("which", ["x", "params", "scale", "params+scale", "x+scale"])
@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
def test_only_the_requested_gradients(which, transpose, forced, kernels, gen):
    """The backward computes only what autograd asks for; each subset must still be right."""
    case = Case(70, 20, "quasi", True, transpose, torch.float32)
    x, params, scale, dy = random_inputs(case, "cpu", gen)
    ref_in = [t.double().requires_grad_() for t in (x, params, scale)]
    ref = torch.autograd.grad(qk.givens_rotate(ref_in[0], ref_in[1], block="quasi", scale=ref_in[2],
                                               transpose=transpose, backend="torch"), ref_in, dy.double())
    names = which.split("+")
    leaves = [t.requires_grad_() for n, t in (("x", x), ("params", params), ("scale", scale)) if n in names]
    got = torch.autograd.grad(qk.givens_rotate(x, params, block="quasi", scale=scale, transpose=transpose,
                                               backend="torch"), leaves, dy)
    expected = [r for n, r in zip(("x", "params", "scale"), ref) if n in names]
    for g, r in zip(got, expected):
        assert_close(g, r)


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
def test_bit_identical_repeats(transpose, forced, kernels, gen):
    """Same inputs, same output and gradients to the bit (many rows: the parameter reductions run long)."""
    case = Case(300, 1500, "quasi", True, transpose, torch.float32)
    x, params, scale, dy = random_inputs(case, "cpu", gen)
    leaves = [x.requires_grad_(), params.requires_grad_(), scale.requires_grad_()]

    def run():
        y = qk.givens_rotate(x, params, block="quasi", scale=scale, transpose=transpose, backend="torch")
        return (y, *torch.autograd.grad(y, leaves, dy))

    first = run()
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))


def test_zero_rows_and_leading_dimensions(forced):
    d = 40
    params = (torch.eye(2) + 0.1 * torch.randn(d - 1, 2, 2)).requires_grad_()
    scale = torch.randn(d, requires_grad=True)
    x = torch.randn(0, 3, d, requires_grad=True)
    y = qk.givens_rotate(x, params, block="quasi", scale=scale, backend="torch")
    assert y.shape == (0, 3, d)
    dx, dp, ds = torch.autograd.grad(y.sum(), (x, params, scale))
    assert dx.shape == x.shape
    assert torch.equal(dp, torch.zeros_like(params)) and torch.equal(ds, torch.zeros_like(scale))
    x = torch.randn(3, 4, 2 * d, dtype=torch.float64)[..., ::2]  # 3-D, non-contiguous
    ref = x @ qk.givens_matrix(d, params.double(), block="quasi", scale=scale.double())
    assert_close(qk.givens_rotate(x, params, block="quasi", scale=scale, backend="torch"), ref, rtol=1e-6)


def test_identity_parameters_give_identity(forced):
    d = 37
    x = torch.randn(5, d)
    for block, params in (("givens", torch.zeros(d - 1)), ("quasi", torch.eye(2).repeat(d - 1, 1, 1))):
        assert torch.equal(qk.givens_rotate(x, params, block=block, backend="torch"), x)


@pytest.mark.parametrize("d, width", [(1, 32), (8, 32), (100, 32), (100, 1), (257, 16), (1024, 32)])
def test_dense_factors_multiply_to_R(d, width, gen):
    """``U @ blockdiag(blocks)`` is ``givens_matrix`` (float64, to rounding)."""
    _, params, scale, _ = random_inputs(Case(d, 1, "quasi", True, False, torch.float64), "cpu", gen)
    blocks, Q = dense_factors(d, params.double(), block="quasi", structure="tree", scale=scale.double(),
                              block_width=width, dtype=torch.float64)
    m, b, nb = layout(d, width)
    assert blocks.shape == (nb, b, b) and (Q is None) == (nb == 1)
    n = nb * b
    U = torch.eye(n, dtype=torch.float64)
    if Q is not None:
        U[::b, ::b] = Q
    R = (U @ torch.block_diag(*blocks))[:d, :d]
    assert_close(R, qk.givens_matrix(d, params.double(), block="quasi", scale=scale.double()), rtol=1e-13)


@pytest.mark.parametrize("transpose", [False, True], ids=["xR", "xRT"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rotation_takes_the_compiled_kernels(transpose, dtype, monkeypatch, gen):
    """``givens_rotate`` on CPU rows runs its dense passes, forward and backward, in the
    compiled kernels where they are built, and agrees with ATen's ops on every output."""
    _use_compiled(monkeypatch, True)
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    calls = []
    for name in ("rotate", "backward"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    case = Case(96, 70, "quasi", True, transpose, dtype)
    x, params, scale, dy = random_inputs(case, "cpu", gen)
    leaves = [t.requires_grad_() for t in (x, params, scale)]

    def run():
        y = qk.givens_rotate(x, params, block="quasi", scale=scale, transpose=transpose, backend="torch")
        return (y, *torch.autograd.grad(y, leaves, dy))

    compiled = run()
    assert "rotate" in calls and "backward" in calls, calls
    monkeypatch.setenv("QGOFT_NATIVE", "0")
    calls.clear()
    aten = run()
    assert not calls
    for a, b in zip(compiled, aten):
        assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 1e-12)


def test_double_backward_through_the_dense_function(gen):
    x = torch.randn(6, 20, dtype=torch.float64, generator=gen, requires_grad=True)
    blocks = torch.randn(5, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    Q = torch.randn(5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    for transpose in (False, True):
        assert torch.autograd.gradgradcheck(lambda a, b, q: DenseRotation.apply(a, b, q, transpose), (x, blocks, Q))


def test_the_switch(monkeypatch):
    monkeypatch.delenv("QGOFT_TORCH_PATH", raising=False)
    monkeypatch.delenv("QGOFT_DENSE_BLOCK", raising=False)
    assert formulation() == "auto" and dense_block() == 32
    monkeypatch.setenv("QGOFT_TORCH_PATH", " Sweeps ")
    assert formulation() == "sweeps"
    monkeypatch.setenv("QGOFT_TORCH_PATH", "fast")
    with pytest.raises(ValueError, match="QGOFT_TORCH_PATH must be one of .*'fast'"):
        qk.givens_rotate(torch.randn(2, 8), torch.zeros(7), backend="torch")
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    # "²" and "٤" pass str.isdigit() but not int() / the ASCII rule: the error must still name the variable
    for bad in ("0", "12", "x", "-4", "\u00b2", "\u0664"):
        monkeypatch.setenv("QGOFT_DENSE_BLOCK", bad)
        with pytest.raises(ValueError, match="QGOFT_DENSE_BLOCK must be a power of two"):
            qk.givens_rotate(torch.randn(2, 8), torch.zeros(7), backend="torch")


def test_compiled_sweeps_match_eager(gen, monkeypatch):
    """torch.compile(fullgraph=True) of the sweeps (tests/test_torch_compile.py compiles the
    default, the dense formulation, with roots at d = 40 and one block at d = 24)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("QGOFT_TORCH_PATH", "sweeps")
    torch._dynamo.reset()
    model = torch.nn.Sequential(qk.GivensLinear(40, 24, block="quasi", scale=True), torch.nn.GELU(),
                                qk.GivensLinear(24, 16, block="givens"))
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 5, 40, generator=gen, requires_grad=True)
    leaves = [x] + qk.trainable_parameters(model)
    eager = model(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), leaves)
    compiled = torch.compile(model, fullgraph=True)(x)
    grads = torch.autograd.grad(compiled.square().sum(), leaves)
    torch._dynamo.reset()
    assert_close(compiled, eager)
    for g, e in zip(grads, eager_grads):
        assert_close(g, e)


def test_choose_is_one_of_the_formulations():
    for d in (1, 16, 384, 4096, 65536):
        for rows in (0, 1, 64, 1280, 100000):
            for training in (False, True):
                assert choose(d, rows, training) in ("sweeps", "dense")


def test_choose_agrees_with_the_committed_crossover():
    """Wherever the committed measurement has a clear winner (by more than 1.4x; repeated runs
    on a shared 2-core machine differ by up to 25% at the few-row points) between the sweeps
    and the default dense width, for the training pass or the inference forward, the rule
    picks it: the rule is the measurement's, not a guess."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "crossover-cpu-x86_64-2t.json")
    with open(path) as fh:
        rows = json.load(fh)["rows"]
    times = {(r["d"], r["rows"], r["pass"], r["formulation"]): r["ms"]["median"] for r in rows if r["ms"]}
    default = f"dense b={dense_block()}"
    checked = 0
    for (d, n, pass_name, name), sweeps in times.items():
        dense = times.get((d, n, pass_name, default))
        if name != "sweeps" or dense is None:
            continue
        training = pass_name == "train"
        if sweeps > 1.4 * dense:
            assert choose(d, n, training) == "dense", (d, n, pass_name, sweeps, dense)
        elif dense > 1.4 * sweeps:
            assert choose(d, n, training) == "sweeps", (d, n, pass_name, sweeps, dense)
        checked += 1
    assert checked >= 20


# GivensLinear's fused forward (qgoft_kernels.function.givens_linear): the weight's rows are
# rotated when they are the cheaper operand (dense.rotates_weight), else x's rows
@pytest.mark.parametrize("k, rows", [(16, 40), (100, 40), (24, 1), (24, 0)], ids=["W-side", "x-side", "T1", "T0"])
@pytest.mark.parametrize("d", [64, 100, 192])
def test_layer_against_the_oracle(d, k, rows, forced, row_passes, gen):
    """Output and the gradients of x, rotation and scale, and of an unfrozen weight and bias."""
    assert dense.rotates_weight(k, rows) == (k == 16)
    for block, scale, dtype in (("quasi", True, torch.float32), ("givens", False, torch.float64)):
        layer = qk.GivensLinear(d, k, block=block, scale=scale, dtype=dtype)
        with torch.no_grad():
            layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen))
            if scale:
                layer.scale.add_(0.2 * torch.randn(d, generator=gen))
        layer.weight.requires_grad_(dtype == torch.float64)
        layer.bias.requires_grad_(dtype == torch.float64)
        x = torch.randn(rows, d, generator=gen, dtype=dtype).requires_grad_()
        dy = torch.randn(rows, k, generator=gen, dtype=dtype)
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(layer(x), leaves, dy)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        named = dict(zip([id(t) for t in leaves], ref_leaves))
        R = qk.givens_matrix(d, named[id(layer.rotation)], block=block,
                             scale=named[id(layer.scale)] if scale else None)
        weight = named.get(id(layer.weight), layer.weight.double())
        bias = named.get(id(layer.bias), layer.bias.double())
        ref = torch.nn.functional.linear(ref_leaves[0] @ R, weight, bias)
        assert_close(layer(x), ref, name="output")
        for g, r, t in zip(grads, torch.autograd.grad(ref, ref_leaves, dy.double()), leaves):
            assert_close(g, r, name=f"gradient of a {tuple(t.shape)} tensor")


@pytest.mark.parametrize("which", ["x", "rotation", "scale", "rotation+scale", "x+scale"])
@pytest.mark.parametrize("k, rows", [(16, 40), (100, 40)], ids=["W-side", "x-side"])
def test_layer_only_the_requested_gradients(k, rows, which, forced, kernels, gen):
    """The fused layer's backward computes only what autograd asks for (the factors' gradients
    are made only for the rotation or the scale); each subset must still be right."""
    d = 64
    layer = qk.GivensLinear(d, k, block="quasi", scale=True)
    with torch.no_grad():
        layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen))
        layer.scale.add_(0.2 * torch.randn(d, generator=gen))
    x = torch.randn(rows, d, generator=gen)
    dy = torch.randn(rows, k, generator=gen)
    tensors = {"x": x, "rotation": layer.rotation, "scale": layer.scale}
    ref_in = {n: t.detach().double().requires_grad_() for n, t in tensors.items()}
    R = qk.givens_matrix(d, ref_in["rotation"], block="quasi", scale=ref_in["scale"])
    ref = torch.nn.functional.linear(ref_in["x"] @ R, layer.weight.double(), layer.bias.double())
    expected = dict(zip(ref_in, torch.autograd.grad(ref, list(ref_in.values()), dy.double())))
    names = which.split("+")
    for n, t in tensors.items():
        t.requires_grad_(n in names)
    layer(x).backward(dy)
    for n, t in tensors.items():
        if n in names:
            assert_close(t.grad, expected[n], name=f"gradient of {n}")
        else:
            assert t.grad is None, n


def test_layer_low_precision_and_padding_take_the_composition(gen, monkeypatch):
    """bf16 layers and widths that are not a multiple of the block width are the plain composition."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for d, dtype in ((64, torch.bfloat16), (70, torch.float32)):
        layer = qk.GivensLinear(d, 12, block="quasi", scale=True, dtype=dtype)
        with torch.no_grad():
            layer.rotation.add_(0.2 * torch.randn(layer.rotation.shape, generator=gen))
        x = torch.randn(30, d, generator=gen).to(dtype)
        expected = torch.nn.functional.linear(layer.rotate(x), layer.weight, layer.bias)
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("k, rows", [(3, 6), (9, 4)], ids=["W-side", "x-side"])
def test_layer_gradgradcheck(k, rows, forced, gen):
    assert dense.rotates_weight(k, rows) == (k == 3)
    d = 8
    layer = qk.GivensLinear(d, k, block="quasi", scale=True, dtype=torch.float64)
    with torch.no_grad():
        layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().requires_grad_()

    def run(a, p, s, w):
        return qk.function.givens_linear(a, w, layer.bias, p, block="quasi", scale=s, backend="torch")

    # the module's rotation is float32 whatever its dtype: gradcheck needs float64 leaves
    inputs = (x, layer.rotation.detach().double().requires_grad_(), layer.scale.detach().double().requires_grad_(),
              weight)
    assert torch.autograd.gradcheck(run, inputs)
    assert torch.autograd.gradgradcheck(run, inputs)


@pytest.mark.parametrize("k", [64, 2000], ids=["W-side", "x-side"])
def test_layer_bit_identical_repeats(k, forced, kernels, gen):
    assert dense.rotates_weight(k, 1000) == (k == 64)
    layer = qk.GivensLinear(384, k, block="quasi", scale=True)
    with torch.no_grad():
        layer.rotation.add_(0.2 * torch.randn(layer.rotation.shape, generator=gen))
    x = torch.randn(1000, 384, generator=gen, requires_grad=True)
    dy = torch.randn(1000, k, generator=gen)

    def run():
        out = layer(x)
        return (out, *torch.autograd.grad(out, (x, layer.rotation, layer.scale), dy))

    first = run()
    assert all(torch.equal(a, b) for a, b in zip(first, run()))


def _layer_step(layer, x, dy):
    """Output, and the gradients of x and of every trainable parameter, for upstream ``dy``."""
    x = x.detach().requires_grad_()
    out = layer(x)
    return (out, *torch.autograd.grad(out, [x, *(p for p in layer.parameters() if p.requires_grad)], dy))


# the intermediates of the fused layer live in reused per-thread buffers (dense._scratch): what
# a call returns must never be one of them, whatever the shapes and dtypes that follow
@pytest.mark.parametrize("rows", [40, 300], ids=["few-rows", "many-rows"])
def test_scratch_buffers_never_reach_the_caller(rows, kernels, gen, monkeypatch):
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dense, "_SCRATCH", dense._ScratchBuffers())
    layers = []
    for d, k, dtype in ((64, 16, torch.float32), (64, 500, torch.float32), (128, 16, torch.float64),
                        (32, 600, torch.float64)):
        layer = qk.GivensLinear(d, k, block="quasi", scale=True, dtype=dtype)
        with torch.no_grad():
            layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen))
        x = torch.randn(rows, d, generator=gen, dtype=dtype)
        layers.append((layer, x, torch.randn(rows, k, generator=gen, dtype=dtype)))
    assert {dense.rotates_weight(layer.out_features, rows) for layer, _, _ in layers} == {True, False}
    first = [_layer_step(*case) for case in layers]
    kept = [[t.clone() for t in result] for result in first]
    # every layer again, on other inputs: the buffers are rewritten, grown and shrunk
    for layer, x, dy in reversed(layers):
        _layer_step(layer, 2 * x + 1, -dy)
    for result, copy in zip(first, kept):
        assert all(torch.equal(a, b) for a, b in zip(result, copy))
    assert dense._SCRATCH.buffers, "the fused layer used no scratch buffer"
    dense.release_buffers()
    assert not dense._SCRATCH.buffers
    # the same numbers without the buffers (every intermediate fresh): bit-identical
    monkeypatch.setattr(dense, "SCRATCH_LIMIT_BYTES", 0)
    for case, copy in zip(layers, kept):
        assert all(torch.equal(a, b) for a, b in zip(_layer_step(*case), copy))


def test_scratch_buffers_made_in_inference_mode_serve_training(gen, monkeypatch):
    """A buffer first made under ``torch.inference_mode`` is written again outside it."""
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dense, "_SCRATCH", dense._ScratchBuffers())
    layer = qk.GivensLinear(64, 8, block="givens")
    x, dy = torch.randn(50, 64, generator=gen), torch.randn(50, 8, generator=gen)
    with torch.inference_mode():
        inferred = layer(x)
    assert dense._SCRATCH.buffers
    out, *grads = _layer_step(layer, x, dy)
    assert torch.equal(out, inferred)
    monkeypatch.setattr(dense, "SCRATCH_LIMIT_BYTES", 0)
    assert all(torch.equal(a, b) for a, b in zip(_layer_step(layer, x, dy), (out, *grads)))


@pytest.mark.parametrize("block", ["quasi", "givens"])
def test_factor_indices_cached_in_inference_mode_serve_the_double_backward(block, gen, monkeypatch):
    """The factors' cached index (and sign) tensors, first made under ``torch.inference_mode``,
    can be saved by a later double backward (an inference tensor cannot be), which then
    gives what it gives when they were made outside it."""
    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = qk.GivensLinear(48, 8, block=block, scale=True)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x = torch.randn(20, 48, generator=gen)
    params = [p for p in layer.parameters() if p.requires_grad]

    def second_order():
        xg = x.clone().requires_grad_()
        grads = torch.autograd.grad(layer(xg).square().sum(), [xg, *params], create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), [xg, *params])

    results = []
    for first_call in (torch.inference_mode, nullcontext):
        dense._indices.cache_clear()
        with first_call():
            layer(x)
        results.append(second_order())
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_scratch_buffers_are_per_thread(gen, monkeypatch):
    """Layers stepping in several threads at once get the numbers each gets alone."""
    import threading

    monkeypatch.setenv("QGOFT_TORCH_PATH", "dense")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cases = []
    for k in (16, 24, 400, 500):
        layer = qk.GivensLinear(64, k, block="quasi", scale=True)
        with torch.no_grad():
            layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen))
        cases.append((layer, torch.randn(300, 64, generator=gen), torch.randn(300, k, generator=gen)))
    alone = [_layer_step(*case) for case in cases]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = _layer_step(*cases[i])
                if not all(torch.equal(a, b) for a, b in zip(results[i], alone[i])):
                    errors.append(i)
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == len(cases)


@pytest.mark.parametrize("rows", [3, 300], ids=["rotate-x", "rotate-W"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_meta_tensors_on_the_default_formulation(rows, dtype, monkeypatch):
    """Meta tensors (no data, no autocast for their device): the layer's and the rotation's
    shapes and dtypes, forward and backward."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("QGOFT_TORCH_PATH", raising=False)
    layer = qk.GivensLinear(64, 16, block="quasi", scale=True, device="meta", dtype=dtype)
    x = torch.randn(rows, 64, device="meta", dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == (rows, 16) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.rotation.grad.shape == layer.rotation.shape
    params = torch.zeros(qk.num_pairs(64), device="meta")
    for transpose in (False, True):
        r = qk.givens_rotate(x, params, backend="torch", transpose=transpose)
        assert r.device.type == "meta" and r.shape == x.shape and r.dtype == dtype


def test_fake_tensor_mode_on_the_default_formulation(monkeypatch):
    """A GivensLinear made and run inside FakeTensorMode: fake outputs of the right shape and
    dtype, with the compiled kernels (which would read the fakes' data) and the caches left
    alone; real calls afterwards still work."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("QGOFT_TORCH_PATH", raising=False)
    with FakeTensorMode():
        layer = qk.GivensLinear(64, 16, block="quasi", scale=True)
        outputs = []
        for rows in (3, 300):
            x = torch.randn(rows, 64, requires_grad=True)
            y = layer(x)
            y.sum().backward()
            outputs.append((rows, y, x.grad))
        r = qk.givens_rotate(torch.randn(5, 64), torch.zeros(qk.num_pairs(64)), backend="torch")
    for rows, y, dx in outputs:
        assert isinstance(y, FakeTensor) and y.shape == (rows, 16) and y.dtype == torch.float32
        assert isinstance(dx, FakeTensor) and dx.shape == (rows, 64)
    assert isinstance(r, FakeTensor) and r.shape == (5, 64)
    real = qk.GivensLinear(64, 16, block="quasi", scale=True)
    x = torch.randn(300, 64)
    assert_close(real(x), torch.nn.functional.linear(x, real.weight, real.bias))


@pytest.mark.parametrize("force", ["auto", "dense"])
def test_torch_func_transforms_over_the_default_formulation(force, gen, monkeypatch):
    """vmap and jacrev over a GivensLinear and givens_rotate on the dense formulation failed with
    PyTorch's message about setup_context: under a transform the sweeps run."""
    monkeypatch.setenv("QGOFT_TORCH_PATH", force)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the layer's CPU path, as a user gets it
    layer = qk.GivensLinear.from_linear(torch.nn.Linear(16, 8), block="quasi", scale=True)
    with torch.no_grad():
        for p in qk.trainable_parameters(layer):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x = torch.randn(4, 16, generator=gen, dtype=torch.float64)
    layer = layer.double()
    assert_close(torch.func.vmap(layer)(x), layer(x))
    jac = torch.func.jacrev(layer)(x[0])
    assert_close(jac, torch.autograd.functional.jacobian(layer, x[0]))
    params = layer.rotation.detach()
    grad = torch.func.grad(lambda p: qk.givens_rotate(x, p, block="quasi", backend="torch").square().sum())(params)
    p = params.clone().requires_grad_(True)
    qk.givens_rotate(x, p, block="quasi", backend="torch").square().sum().backward()
    assert_close(grad, p.grad)

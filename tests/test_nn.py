"""GivensLinear: identity at init, merging, penalty, frozen base, parameter counts."""
import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run the module through the PyTorch path, or through the kernels (interpreted on CPU)."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        if torch.cuda.is_available():
            pytest.skip("the CPU PyTorch path is exercised on CPU tensors only")
    return request.param


def randomize(layer, gen):
    with torch.no_grad():
        layer.rotation.add_(0.3 * torch.randn(layer.rotation.shape, generator=gen).to(layer.rotation.device))
        if layer.scale is not None:
            layer.scale.add_(0.2 * torch.randn(layer.scale.shape, generator=gen).to(layer.scale.device))


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("block", ["givens", "quasi"])
def test_identity_at_init(block, scale, backend, device, gen):
    base = nn.Linear(24, 7).to(device)
    layer = qk.GivensLinear.from_linear(base, block=block, scale=scale)
    x = torch.randn(5, 24, generator=gen).to(device)
    assert torch.equal(layer(x), base(x))


def test_from_linear_shares_and_freezes(device):
    base = nn.Linear(16, 4).to(device)
    layer = qk.GivensLinear.from_linear(base, block="quasi", scale=True)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.weight.data_ptr() == base.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"rotation", "scale"}
    assert layer.rotation.dtype == torch.float32 and layer.rotation.device == base.weight.device


@pytest.mark.parametrize("block, scale, count", [("givens", False, 767), ("givens", True, 767 + 768),
                                                 ("quasi", False, 4 * 767), ("quasi", True, 4 * 767 + 768)])
def test_parameter_counts(block, scale, count):
    layer = qk.GivensLinear(768, 10, block=block, scale=scale, device="meta")
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == count


def test_constructor_mirrors_linear():
    layer = qk.GivensLinear(12, 5, bias=False, dtype=torch.float64)
    assert layer.weight.shape == (5, 12) and layer.weight.dtype == torch.float64 and layer.bias is None
    assert layer.rotation.dtype == torch.float32
    assert "in_features=12, out_features=5, bias=False, block='quasi'" in repr(layer)
    with pytest.raises(ValueError, match="block must be one of"):
        qk.GivensLinear(4, 4, block="oft")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        qk.GivensLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("block", ["givens", "quasi"])
def test_forward_and_merge(block, scale, backend, device, gen):
    d, k = 33, 9
    layer = qk.GivensLinear(d, k, block=block, scale=scale, device=device)
    randomize(layer, gen)
    x = torch.randn(3, 4, d, generator=gen).to(device)
    R = qk.givens_matrix(d, layer.rotation.double(), block=block,
                         scale=None if layer.scale is None else layer.scale.double())
    expected = (x.double() @ R) @ layer.weight.double().T + layer.bias.double()
    assert_close(layer(x), expected)
    merged = layer.merged_linear()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == layer.weight.dtype
    assert_close(merged.weight, layer.weight.double() @ R.T)
    assert_close(merged(x), expected)
    assert torch.equal(merged.bias, layer.bias)


def test_merge_bf16_weight(backend, device, gen):
    layer = qk.GivensLinear(64, 16, block="quasi", dtype=torch.bfloat16, device=device)
    randomize(layer, gen)
    merged = layer.merged_linear()
    assert merged.weight.dtype == torch.bfloat16
    R = qk.givens_matrix(64, layer.rotation.double(), block="quasi")
    # computed in fp32, rounded to bf16 once: tighter than bf16's default
    assert_close(merged.weight, layer.weight.double() @ R.T, rtol=8e-3)


def test_gradients_reach_only_the_adapter(backend, device, gen):
    layer = qk.GivensLinear(20, 6, block="quasi", scale=True, device=device)
    randomize(layer, gen)
    x = torch.randn(8, 20, generator=gen).to(device).requires_grad_()
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.rotation.grad is not None and layer.scale.grad is not None and x.grad is not None


def test_penalty_value_and_gradient(gen):
    layer = qk.GivensLinear(9, 3, block="quasi")
    randomize(layer, gen)
    B = layer.rotation.detach().double()
    expected = sum(float(B[p, :, 0] @ B[p, :, 1]) ** 2 for p in range(B.shape[0]))
    pen = layer.orthogonality_penalty()
    assert_close(pen, torch.tensor(expected, dtype=torch.float64))
    pen.backward()
    inner = (B[:, :, 0] * B[:, :, 1]).sum(-1)
    # d/dalpha <a,b>^2 = 2 <a,b> b, d/dbeta = 2 <a,b> a
    expected_grad = torch.stack((2 * inner[:, None] * B[:, :, 1], 2 * inner[:, None] * B[:, :, 0]), -1)
    assert_close(layer.rotation.grad, expected_grad, atol=1e-5)


def test_penalty_zero_at_identity_and_for_givens():
    assert qk.GivensLinear(8, 2, block="quasi").orthogonality_penalty().item() == 0
    strict = qk.GivensLinear(8, 2, block="givens")
    with torch.no_grad():
        strict.rotation.normal_()
    assert strict.orthogonality_penalty().item() == 0


def test_model_penalty_sums_layers(gen):
    a, b = qk.GivensLinear(8, 8, block="quasi"), qk.GivensLinear(8, 4, block="quasi")
    randomize(a, gen)
    randomize(b, gen)
    model = nn.Sequential(a, nn.ReLU(), b, nn.Linear(4, 1))
    total = qk.orthogonality_penalty(model)
    assert_close(total, a.orthogonality_penalty() + b.orthogonality_penalty(), rtol=1e-6)
    assert qk.orthogonality_penalty(nn.Linear(3, 3)).item() == 0


def _graph_ops(t: torch.Tensor) -> int:
    """The autograd nodes behind ``t``, the parameters' AccumulateGrad left out."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [n for n, _ in node.next_functions]
    return sum(type(n).__name__ != "AccumulateGrad" for n in seen)


@pytest.mark.parametrize("layers", [3, 12])
def test_model_penalty_is_the_layers_sum_in_a_fixed_number_of_ops(gen, layers):
    """The model's penalty concatenates every quasi rotation: its value and gradients are the
    layers' own, strict rotations add nothing, and its graph does not grow with the layers."""
    quasi = [qk.GivensLinear(5 + 3 * i, 4, block="quasi", scale=i % 2 == 0) for i in range(layers)]
    strict = qk.GivensLinear(7, 7, block="givens")
    for layer in (*quasi, strict):
        randomize(layer, gen)
    model = nn.ModuleList([*quasi, strict, nn.Linear(3, 3)])
    total = qk.orthogonality_penalty(model)
    total.backward()
    grads = [layer.rotation.grad.clone() for layer in quasi]
    assert strict.rotation.grad is None
    model.zero_grad()
    expected = torch.stack([layer.orthogonality_penalty() for layer in quasi]).sum()
    expected.backward()
    assert_close(total, expected, rtol=1e-6)
    for layer, grad in zip(quasi, grads):
        assert_close(grad, layer.rotation.grad, rtol=1e-6)
    assert _graph_ops(total) == 7  # cat, two selects, mul, sum, and the square's mul and sum
    # a model of strict rotations only: a zero of the rotations' dtype
    assert qk.orthogonality_penalty(nn.ModuleList([strict])).item() == 0


def test_training_steps_fit_a_rotation(backend, device, gen):
    """A few Adam steps move a qGOFT layer towards a rotated copy of its frozen layer."""
    d = 16
    base = nn.Linear(d, d, bias=False).to(device)
    target = qk.GivensLinear.from_linear(nn.Linear(d, d, bias=False).to(device), block="givens")
    with torch.no_grad():
        target.weight.copy_(base.weight)
        target.rotation.copy_(0.5 * torch.randn(d - 1, generator=gen))
    layer = qk.GivensLinear.from_linear(base, block="quasi")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(64, d, generator=gen).to(device)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - y).square().mean() + 1e-3 * layer.orthogonality_penalty()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_state_dict_round_trip(gen):
    layer = qk.GivensLinear(10, 3, block="quasi", scale=True)
    randomize(layer, gen)
    other = qk.GivensLinear(10, 3, block="quasi", scale=True)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 10, generator=gen)
    assert torch.equal(other(x), layer(x))


def test_wrong_input_width_names_x():
    """x with the wrong number of features is blamed on x, not on the parameters."""
    with pytest.raises(ValueError, match=r"x has 6 features \(its last dimension\); this layer takes in_features=5"):
        qk.GivensLinear(5, 3)(torch.randn(2, 6))

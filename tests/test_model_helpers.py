"""Model-wide helpers and adapter files: inject, merge, trainable_parameters, save/load."""
import math

import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import rel_error


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.ffn(self.query(x) * torch.sigmoid(self.value(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def randomize(model, gen):
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def test_inject_by_names_freezes_the_rest(gen):
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 16, generator=gen)
    before = net(x)
    qk.inject(net, ["query", "value"], block="quasi")
    assert isinstance(net.layers[0].query, qk.GivensLinear) and isinstance(net.layers[1].value, qk.GivensLinear)
    assert type(net.layers[0].ffn[0]) is nn.Linear
    assert torch.equal(net(x), before)  # identity at init
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.rotation" for i in (0, 1) for m in ("query", "value")}
    assert len(qk.trainable_parameters(net)) == 4


def test_inject_by_regex_and_all_linear():
    net = qk.inject(Net(), r"layers\.\d+\.ffn\.[02]", block="givens", scale=True)
    assert sum(isinstance(m, qk.GivensLinear) for m in net.modules()) == 4
    everything = qk.inject(Net(), "all-linear")
    assert sum(isinstance(m, qk.GivensLinear) for m in everything.modules()) == 9


def test_inject_errors():
    with pytest.raises(ValueError, match="no module of the model matches"):
        qk.inject(Net(), ["key"])
    with pytest.raises(TypeError, match="'layers.0.norm' matches target_modules but is a LayerNorm"):
        qk.inject(Net(), ["norm"])
    net = qk.inject(Net(), ["query"])
    with pytest.raises(ValueError, match="already a GivensLinear"):
        qk.inject(net, ["query"])


def test_merge_replaces_with_equivalent_linears(gen):
    net = qk.inject(Net(), "all-linear", block="quasi", scale=True)
    randomize(net, gen)
    x = torch.randn(5, 16, generator=gen)
    adapted = net(x)
    qk.merge(net)
    assert not any(isinstance(m, qk.GivensLinear) for m in net.modules())
    assert rel_error(net(x), adapted) < 1e-5


def test_save_load_round_trip(tmp_path, gen):
    net = qk.inject(Net(), ["query", "ffn.2"], block="quasi", scale=True)
    randomize(net, gen)
    path = tmp_path / "adapter.safetensors"
    qk.save_adapter(net, path)
    x = torch.randn(3, 16, generator=gen)
    fresh = Net()
    fresh.load_state_dict(net.state_dict(), strict=False)  # same frozen weights (different names)
    for name, m in net.named_modules():
        if isinstance(m, qk.GivensLinear):
            fresh.get_submodule(name).load_state_dict({"weight": m.weight, "bias": m.bias})
    qk.load_adapter(fresh, path)  # injects the plain nn.Linear modules with the file's options
    assert torch.equal(fresh(x), net(x))
    # the file holds only the adapter: rotations and scales
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        assert all(k.endswith((".rotation", ".scale")) for k in fh.keys())


def test_load_mismatch_names_the_module_and_changes_nothing(tmp_path, gen):
    net = qk.inject(Net(), ["query"], block="quasi")
    randomize(net, gen)
    path = tmp_path / "a.safetensors"
    qk.save_adapter(net, path)
    other = qk.inject(Net(), ["query"], block="givens")
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="module 'layers.0.query' is a GivensLinear with options"):
        qk.load_adapter(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in snapshot.items())

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.layers[1].query = nn.Linear(16, 8)

    wider = Wider()
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match="module 'layers.1.query' is an nn.Linear"):
        qk.load_adapter(wider, path)
    # layers.0.query was fine, but nothing was injected or loaded
    assert type(wider.layers[0].query) is nn.Linear
    assert all(torch.equal(v, wider.state_dict()[k]) for k, v in before.items())


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a qgoft-adapter file"):
        qk.load_adapter(Net(), path)
    pickle_path = tmp_path / "evil.bin"
    pickle_path.write_bytes(b"\x80\x04cos\nsystem\n")
    with pytest.raises(Exception):  # not safetensors: refused, nothing executed
        qk.load_adapter(Net(), pickle_path)


def test_strict_requires_every_givens_module(tmp_path, gen):
    net = qk.inject(Net(), ["query"])
    qk.save_adapter(net, tmp_path / "q.safetensors")
    both = qk.inject(Net(), ["query", "value"])
    with pytest.raises(ValueError, match="no entry for the model's GivensLinear modules"):
        qk.load_adapter(both, tmp_path / "q.safetensors")
    qk.load_adapter(both, tmp_path / "q.safetensors", strict=False)


def test_convert_official_layout(gen):
    """Hand-made tensors in the paper code's layout: phi (theta = pi tanh phi), soft blocks, scaler."""
    net = Net()
    phi = torch.randn(15, generator=gen)
    soft = torch.randn(15, 2, 2, generator=gen)
    scaler = torch.rand(16, generator=gen) + 0.5
    state = {
        "base_model.model.layers.0.query.givens_hard.default": phi,
        "base_model.model.layers.0.query.givens_scaler.default": scaler,
        "base_model.model.layers.1.value.givens_soft.default": soft,
        "base_model.model.layers.1.value.base_layer.weight": torch.zeros(16, 16),  # ignored
    }
    qk.load_official(net, state)
    q, v = net.layers[0].query, net.layers[1].value
    assert q.block == "givens" and q.scale is not None and v.block == "quasi" and v.scale is None
    assert torch.allclose(q.rotation, math.pi * torch.tanh(phi))
    assert torch.equal(v.rotation, soft) and torch.equal(q.scale, scaler)
    # the same R the official code builds: R[i,i]=a00, R[i,j]=a01, R[j,i]=a10, R[j,j]=a11, stage-major
    x = torch.randn(2, 16, generator=gen)
    R = qk.givens_matrix(16, soft.double(), block="quasi")
    assert rel_error(v(x), (x.double() @ R) @ v.weight.double().T + v.bias.double()) < 1e-5
    with pytest.raises(ValueError, match="exactly one of givens_hard/givens_soft"):
        qk.convert_official({"a.givens_hard": phi, "a.givens_soft": soft})


# --- issue 11: adapter files, inject and merge under hostile use --------------------------------------------------


def test_merge_keeps_frozen_weights_frozen(gen):
    """qk.merge and merged_linear give back weights as frozen as they were (not requires_grad=True)."""
    net = qk.inject(Net(), "all-linear", block="quasi")
    randomize(net, gen)
    qk.merge(net)
    assert not any(p.requires_grad for p in net.parameters())
    layer = qk.GivensLinear(8, 3)
    merged = layer.merged_linear()
    assert not merged.weight.requires_grad and not merged.bias.requires_grad


def test_inject_all_linear_without_a_linear_refuses():
    model = nn.Sequential(nn.LayerNorm(4), nn.GELU())
    with pytest.raises(ValueError, match="no nn.Linear"):
        qk.inject(model, "all-linear")
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen


def test_a_second_inject_keeps_the_first_adapters_trainable():
    """inject freezes the rest of the model, not the rotations an earlier inject added."""
    net = qk.inject(qk.inject(Net(), ["query"]), ["value"], block="givens")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.rotation" for i in (0, 1) for m in ("query", "value")}

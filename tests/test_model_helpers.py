"""Model-wide helpers and adapter files: inject, merge, trainable_parameters, save/load."""
import math

import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close


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


def test_print_trainable_parameters_counts_as_peft_does(capsys):
    """The inject route had no print_trainable_parameters; its numbers are PEFT's for the same adapter."""
    peft = pytest.importorskip("peft")
    from qgoft_kernels.peft import QGOFTConfig

    torch.manual_seed(0)
    options = {"block": "quasi", "scale": True, "modules_to_save": ["head"]}
    model = qk.inject(Net(), ["query", "value"], **options)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(Net(), QGOFTConfig(target_modules=["query", "value"], **options))
    trainable, total = qk.count_parameters(model)
    # 4 layers of d = 16: 4 (d - 1) block entries + d scales each; the head (16 x 3 + 3) in full
    assert trainable == 4 * (4 * 15 + 16) + 51
    assert total == sum(p.numel() for p in Net().parameters()) + 4 * (4 * 15 + 16)
    # PEFT holds the head twice (the original and the trained copy)
    assert peft_model.get_nb_trainable_parameters() == (trainable, total + 51)
    qk.print_trainable_parameters(model)
    peft_model.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.splitlines()
    share = 100 * trainable / total
    assert ours == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
    assert theirs.split(" || ")[0] == ours.split(" || ")[0]


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
    assert_close(net(x), adapted)


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
    with pytest.raises(ValueError, match="no entry for the model's GivensLinear/GivensWrapper modules"):
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
    assert_close(q.rotation, math.pi * torch.tanh(phi), atol=1e-8)
    assert torch.equal(v.rotation, soft) and torch.equal(q.scale, scaler)
    # the same R the official code builds: R[i,i]=a00, R[i,j]=a01, R[j,i]=a10, R[j,j]=a11, stage-major
    x = torch.randn(2, 16, generator=gen)
    R = qk.givens_matrix(16, soft.double(), block="quasi")
    assert_close(v(x), (x.double() @ R) @ v.weight.double().T + v.bias.double())
    with pytest.raises(ValueError, match="exactly one of givens_hard/givens_soft"):
        qk.convert_official({"a.givens_hard": phi, "a.givens_soft": soft})


# --- issue 11: adapter files, inject and merge under hostile use --------------------------------------------------


def _write_adapter(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def _header(modules):
    import json

    return {"format": "qgoft-adapter", "version": "1", "modules": json.dumps(modules)}


@pytest.mark.parametrize("bad", [{"block": "Quasi"}, {"structure": "Tree"}, {"in_features": "5"},
                                 {"out_features": 3.0}, {"scale": "yes"}, {"in_features": True}],
                         ids=["block", "structure", "in_features", "out_features", "scale", "bool-features"])
def test_load_checks_every_option_before_changing_the_model(tmp_path, bad):
    """A header with an unknown block (or any malformed option) is refused in the check phase:
    the model is not left half-converted."""
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    opts = {"in_features": 5, "out_features": 3, "block": "quasi", "structure": "tree", "scale": False}
    good = {"in_features": 3, "out_features": 2, "block": "givens", "structure": "tree", "scale": False}
    path = tmp_path / "bad.safetensors"
    # the good module first: a lazy check would convert it before failing on the bad one
    _write_adapter(path, {"0.rotation": torch.eye(2).repeat(4, 1, 1), "2.rotation": torch.zeros(2)},
                   _header({"2": good, "0": {**opts, **bad}}))
    with pytest.raises(ValueError, match=str(path)):
        qk.load_adapter(model, path)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.requires_grad for p in model.parameters())


def test_load_root_adapter_into_a_bare_linear_refuses(tmp_path, gen):
    """An adapter of a bare GivensLinear (module name "") cannot be put into a bare nn.Linear in
    place: a clear error, not a Linear returned unchanged with a child named ""."""
    layer = qk.GivensLinear(6, 4, block="quasi")
    randomize(layer, gen)
    path = tmp_path / "root.safetensors"
    qk.save_adapter(layer, path)
    bare = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="GivensLinear.from_linear"):
        qk.load_adapter(bare, path)
    assert dict(bare.named_children()) == {}
    # into a bare GivensLinear it loads in place
    other = qk.GivensLinear(6, 4, block="quasi")
    assert qk.load_adapter(other, path) is other
    assert torch.equal(other.rotation, layer.rotation)


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


class Shared(nn.Module):
    """One nn.Linear used at two places (``first`` and ``second``)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.act = nn.Tanh()
        self.second = self.first

    def forward(self, x):
        return self.second(self.act(self.first(x)))


@pytest.mark.parametrize("targets", [["first"], ["second"], "all-linear"])
def test_a_shared_linear_is_adapted_at_every_use(targets, gen, tmp_path):
    torch.manual_seed(0)
    model = qk.inject(Shared(), targets, block="quasi")
    assert isinstance(model.first, qk.GivensLinear) and model.second is model.first
    randomize(model, gen)
    x = torch.randn(3, 8, generator=gen)
    R = qk.givens_matrix(8, model.first.rotation.double(), block="quasi")
    w, b = model.first.weight.double(), model.first.bias.double()
    expected = (torch.tanh((x.double() @ R) @ w.T + b) @ R) @ w.T + b
    assert_close(model(x), expected)
    # saved once, loaded at both places
    qk.save_adapter(model, tmp_path / "shared.safetensors")
    torch.manual_seed(0)
    fresh = Shared()
    qk.load_adapter(fresh, tmp_path / "shared.safetensors")
    assert isinstance(fresh.first, qk.GivensLinear) and fresh.second is fresh.first
    assert torch.equal(fresh(x), model(x))
    # merged at both places
    qk.merge(model)
    assert type(model.first) is nn.Linear and model.second is model.first
    assert_close(model(x), expected)


def _saved_net(tmp_path, gen):
    net = qk.inject(Net(), ["query"], block="quasi", scale=True)
    randomize(net, gen)
    path = tmp_path / "a.safetensors"
    qk.save_adapter(net, path)
    return net, path


@pytest.mark.parametrize("meta", [
    {"format": "qgoft-adapter", "version": "1"},
    {"format": "qgoft-adapter", "version": "1", "modules": "{not json"},
    {"format": "qgoft-adapter", "version": "1", "modules": "[1, 2]"},
    {"format": "qgoft-adapter", "version": "1", "modules": '{"layers.0.query": 7}'},
    {"format": "qgoft-adapter", "version": "1", "modules": '{"layers.0.query": {"block": "quasi"}}'},
], ids=["no-modules", "bad-json", "list", "options-not-a-dict", "missing-options"])
def test_malformed_headers_raise_value_error_naming_the_file(tmp_path, meta):
    path = tmp_path / "broken.safetensors"
    _write_adapter(path, {"layers.0.query.rotation": torch.eye(2).repeat(15, 1, 1)}, meta)
    net = Net()
    with pytest.raises(ValueError, match=str(path)):
        qk.load_adapter(net, path)
    assert type(net.layers[0].query) is nn.Linear


def test_load_corrupt_file_names_it(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    with pytest.raises(ValueError, match=str(path)):
        qk.load_adapter(Net(), path)


def test_load_directory_or_missing_file_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        qk.load_adapter(Net(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        qk.load_adapter(Net(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize("value, match", [
    (torch.tensor(0.5), "givens_hard must be a float tensor of shape"),
    (3.0, "must be a torch.Tensor"),
    ("phi", "must be a torch.Tensor"),
    (torch.zeros(15, 2), "givens_hard must be a float tensor of shape"),
    (torch.zeros(15, dtype=torch.long), "float tensor"),
])
def test_load_official_rejects_bad_values(value, match):
    net = Net()
    with pytest.raises(ValueError, match=match):
        qk.load_official(net, {"layers.0.query.givens_hard.default": value})
    assert type(net.layers[0].query) is nn.Linear


def test_load_official_checks_the_scaler_and_soft_shapes():
    with pytest.raises(ValueError, match="givens_soft must be a float tensor of shape"):
        qk.convert_official({"a.givens_soft": torch.zeros(7, 4)})
    with pytest.raises(ValueError, match="givens_scaler must be a float tensor of shape"):
        qk.convert_official({"a.givens_hard": torch.zeros(7), "a.givens_scaler": torch.ones(7)})


def test_load_adapter_freezes_the_rest_like_inject(tmp_path, gen):
    """Both routes to an adapted model leave the same parameters trainable."""
    _, path = _saved_net(tmp_path, gen)
    loaded = qk.load_adapter(Net(), path)
    injected = qk.inject(Net(), ["query"], block="quasi", scale=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in injected.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.query.{k}" for i in (0, 1) for k in ("rotation", "scale")}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapters_are_refused(tmp_path, gen, value):
    net, path = _saved_net(tmp_path, gen)
    with torch.no_grad():
        net.layers[1].query.rotation.fill_(value)
    with pytest.raises(ValueError, match="layers.1.query.*not finite"):
        qk.save_adapter(net, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    tensors = {f"layers.{i}.query.{k}": getattr(net.layers[i].query, k).detach()
               for i in (0, 1) for k in ("rotation", "scale")}
    import json

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    bad = tmp_path / "bad.safetensors"
    _write_adapter(bad, tensors, {**meta, "modules": json.dumps(json.loads(meta["modules"]))})
    fresh = Net()
    with pytest.raises(ValueError, match="layers.1.query.*not finite"):
        qk.load_adapter(fresh, bad)
    assert type(fresh.layers[0].query) is nn.Linear


def test_save_into_a_missing_folder_names_the_users_path(tmp_path, gen):
    """The error named the hidden temporary file the write goes through, not the path asked for."""
    net, _ = _saved_net(tmp_path, gen)
    target = tmp_path / "no" / "such" / "adapter.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        qk.save_adapter(net, target)
    message = str(info.value)
    assert str(target) in message and "does not exist" in message and ".tmp" not in message
    assert info.value.filename == str(target)


def test_save_adapter_is_atomic(tmp_path, gen, monkeypatch):
    """A write that fails half-way leaves the previous file whole and no temporary behind."""
    net, path = _saved_net(tmp_path, gen)
    before = path.read_bytes()
    randomize(net, gen)
    import os

    def broken(fd):
        raise OSError("disk full")

    # fails after the bytes went out, before they are known to be on disk
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        qk.save_adapter(net, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]

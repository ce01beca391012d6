"""Mixed batches on the inject route: adapters loaded by name, then ``qk.use_adapters``.

Every sample must equal that sample run alone by the model with its adapter loaded the
ordinary way; ``"__base__"`` samples must equal the base model's output exactly.
"""
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

pytestmark = pytest.mark.usefixtures("torch_path")

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 6)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _base(seed=0):
    torch.manual_seed(seed)
    return MLP().eval()


def _randomise(model, gen, size=0.2):
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(size * torch.randn(p.shape, generator=gen))


def _saved_adapters(tmp_path, gen, options: dict, make=_base):
    """One adapter file per entry of ``options`` (inject keyword arguments), each random."""
    paths = {}
    for name, opts in options.items():
        model = qk.inject(make(), **opts)
        _randomise(model, gen)
        paths[name] = tmp_path / f"{name}.safetensors"
        qk.save_adapter(model, paths[name])
    return paths


def _alone(make, paths, x, names):
    """Each sample run by a fresh base with its adapter loaded as usual (``__base__``: the base)."""
    out = []
    for i, name in enumerate(names):
        model = make()
        if name != "__base__":
            qk.load_adapter(model, paths[name])
        with torch.no_grad():
            out.append(model.eval()(x[i:i + 1]))
    return torch.cat(out)


OPTIONS = {
    "fr": dict(target_modules=["lin0", "lin1"], block="quasi"),
    "de": dict(target_modules=["lin0", "lin1"], block="givens", scale=True),
    "it": dict(target_modules=["lin1"], block="quasi", scale=True),
}


def test_each_sample_equals_it_alone_and_base_samples_are_exact(tmp_path, gen):
    paths = _saved_adapters(tmp_path, gen, OPTIONS)
    model = _base()
    for name, path in paths.items():
        qk.load_adapter(model, path, adapter_name=name)
    assert qk.adapter_names(model) == ["de", "default", "fr", "it"]
    x = torch.randn(7, 12, generator=gen)
    names = ["fr", "__base__", "de", "it", "fr", "__base__", "de"]
    with torch.no_grad():
        base = _base()(x)
        before = model(x)          # no mixed batch: the layers' own (identity) adapters
        with qk.use_adapters(model, names):
            mixed = model(x)
            again = model(x)
        after = model(x)
    assert torch.equal(before, base) and torch.equal(after, base)
    assert torch.equal(mixed, again)
    alone = _alone(_base, paths, x, names)
    for i, name in enumerate(names):
        if name == "__base__":
            assert torch.equal(mixed[i], base[i]), f"sample {i} (__base__) differs from the base model"
        else:
            assert_close(mixed[i], alone[i], name=f"sample {i} ({name})")
            assert not torch.allclose(mixed[i], base[i])
    # an index counts in qk.adapter_names(model)
    index = torch.tensor([2, -1, 0, 3, 2, -1, 0])
    with torch.no_grad(), qk.use_adapters(model, index):
        assert torch.equal(model(x), mixed)


def test_the_layers_own_adapter_is_default_and_named_adapters_stay_out_of_the_state(tmp_path, gen):
    paths = _saved_adapters(tmp_path, gen, {"fr": OPTIONS["fr"]})
    model = qk.inject(_base(), target_modules=["lin0", "lin1"], block="givens")
    _randomise(model, gen)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    qk.load_adapter(model, paths["fr"], adapter_name="fr")
    assert model.state_dict().keys() == state.keys()
    own = copy.deepcopy(model)
    x = torch.randn(4, 12, generator=gen)
    with torch.no_grad(), qk.use_adapters(model, ["default", "fr", "default", "__base__"]):
        mixed = model(x)
    with torch.no_grad():
        assert_close(mixed[[0, 2]], own(x[[0, 2]]))
        assert_close(mixed[1:2], _alone(_base, paths, x[1:2], ["fr"]))
        assert torch.equal(mixed[3], _base()(x)[3])
    # training the own adapter leaves the named one alone
    named = model.lin0.named_adapters.table()["fr"][0].clone()
    model.train()
    model(x).sum().backward()
    assert model.lin0.rotation.grad is not None
    assert torch.equal(model.lin0.named_adapters.table()["fr"][0], named)


def test_a_stack_is_made_again_when_an_adapter_changes(tmp_path, gen):
    model = qk.inject(_base(), target_modules=["lin0"], block="quasi")
    x = torch.randn(3, 12, generator=gen)
    with torch.no_grad(), qk.use_adapters(model, ["default", "default", "__base__"]):
        first = model(x)
        model.lin0.rotation.add_(0.5)      # an in-place change, as an optimizer step makes
        second = model(x)
        plain = copy.deepcopy(model)
    with torch.no_grad():
        plain.lin0._serving = None
        assert_close(second[:2], plain(x[:2]))
    assert not torch.allclose(first[:2], second[:2])


def test_gpt2_conv1d_base(tmp_path, gen):
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = gpt2()

        def forward(self, ids):
            return self.net(input_ids=ids).logits

    paths = _saved_adapters(tmp_path, gen, {"a": dict(target_modules=["c_attn", "c_fc"]),
                                            "b": dict(target_modules=["c_attn"], block="givens", scale=True)},
                            make=Logits)
    model = Logits().eval()
    for name, path in paths.items():
        qk.load_adapter(model, path, adapter_name=name)
    ids = torch.randint(0, 64, (4, 6), generator=gen)
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad(), qk.use_adapters(model, names):
        mixed = model(ids)
    assert_close(mixed, _alone(lambda: Logits().eval(), paths, ids, names))


class _Quantized(nn.Module):
    def __init__(self):
        import bitsandbytes as bnb

        super().__init__()
        torch.manual_seed(0)
        self.up = bnb.nn.Linear8bitLt(24, 64, has_fp16_weights=False, threshold=0.0)
        # bitsandbytes' CPU inference path takes 4-bit layers of 64 or more inputs and outputs
        self.down = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        reference = nn.Module()
        reference.up, reference.down = nn.Linear(24, 64), nn.Linear(64, 64)
        self.load_state_dict(reference.state_dict())
        self.to("cpu")  # quantizes
        self.eval()

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'qgoft-kernels[bnb]')")
def test_bitsandbytes_base(tmp_path, gen):
    paths = _saved_adapters(tmp_path, gen, {"a": dict(target_modules=["up", "down"]),
                                            "b": dict(target_modules=["up", "down"], block="givens")},
                            make=_Quantized)
    model = _Quantized()
    for name, path in paths.items():
        qk.load_adapter(model, path, adapter_name=name)
    x = torch.randn(4, 24, generator=gen)
    names = ["b", "a", "__base__", "a"]
    with torch.no_grad(), qk.use_adapters(model, names):
        mixed = model(x)
    assert_close(mixed, _alone(_Quantized, paths, x, names))


def test_refusals(tmp_path, gen):
    paths = _saved_adapters(tmp_path, gen, {"fr": OPTIONS["fr"]})
    with pytest.raises(ValueError, match="no qGOFT layers"):
        with qk.use_adapters(_base(), ["fr"]):
            pass
    model = _base()
    with pytest.raises(ValueError, match="adapter_name must be"):
        qk.load_adapter(model, paths["fr"], adapter_name="default")
    assert not any(isinstance(m, qk.GivensLinear) for m in model.modules())   # nothing changed
    qk.load_adapter(model, paths["fr"], adapter_name="fr")
    x = torch.randn(3, 12, generator=gen)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        with qk.use_adapters(model, ["fr", "nope", "fr"]):
            pass
    with pytest.raises(ValueError, match="index 4 is out of range"):
        with qk.use_adapters(model, torch.tensor([0, 4, 1])):
            pass
    with pytest.raises(TypeError, match="1-D integer tensor"):
        with qk.use_adapters(model, torch.tensor([0.0, 1.0, 1.0])):
            pass
    with pytest.raises(TypeError, match="list of adapter names"):
        with qk.use_adapters(model, "fr"):
            pass
    with pytest.raises(ValueError, match="one per sample"):
        with torch.no_grad(), qk.use_adapters(model, ["fr", "fr"]):
            model(x)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        with qk.use_adapters(model, ["fr", "fr", "fr"]):
            pass
    # a refused call leaves no mixed batch behind
    assert all(m._serving is None for m in model.modules() if isinstance(m, qk.GivensLinear))
    wrong = nn.Module()
    wrong.lin0 = nn.Linear(13, 20)
    with pytest.raises(ValueError, match="lin0"):
        qk.load_adapter(wrong, paths["fr"], adapter_name="fr")

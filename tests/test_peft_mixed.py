"""PEFT's mixed-adapter batches with qGOFT: ``model(**inputs, adapter_names=[...])`` and ``generate``.

Every sample of a mixed batch must equal that sample run alone with its adapter active;
``"__base__"`` samples must equal the base model's output exactly.
"""
import importlib.util

import pytest
import torch
import torch.nn as nn

from qgoft_kernels.verify import assert_close

peft = pytest.importorskip("peft", minversion="0.21")
transformers = pytest.importorskip("transformers")
from qgoft_kernels.peft import QGOFTConfig  # noqa: E402

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


def _mlp_with_adapters(gen, configs: dict):
    """A PeftModel over ``MLP`` with one adapter per entry of ``configs``, each random (not identity)."""
    torch.manual_seed(0)
    names = list(configs)
    model = peft.get_peft_model(MLP(), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    _randomise(model, gen)
    return model.eval()


def _randomise(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qgoft_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _alone(model, x, names):
    """Each sample run by itself with its adapter active (``__base__``: adapters disabled)."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                out.append(model(x[i:i + 1]))
        else:
            model.set_adapter(name)
            out.append(model(x[i:i + 1]))
    return torch.cat(out)


CONFIGS = {
    "same-kind": {"a": dict(block="quasi"), "b": dict(block="quasi"), "c": dict(block="quasi")},
    "mixed-kinds": {"a": dict(block="quasi", scale=True), "b": dict(block="givens"),
                    "c": dict(block="givens", scale=True)},
}


@pytest.mark.parametrize("kinds", CONFIGS)
def test_each_sample_equals_it_alone_and_base_rows_are_exact(kinds, gen):
    configs = {n: QGOFTConfig(target_modules=["lin0", "lin1"], init_weights=False, **o)
               for n, o in CONFIGS[kinds].items()}
    model = _mlp_with_adapters(gen, configs)
    x = torch.randn(7, 12, generator=gen)
    names = ["a", "__base__", "b", "a", "c", "__base__", "c"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        again = model(x, adapter_names=names)
        with model.disable_adapter():
            base = model(x)
        alone = _alone(model, x, names)
    assert torch.equal(mixed, again)
    for i, name in enumerate(names):
        if name == "__base__":
            assert torch.equal(mixed[i], base[i]), f"sample {i} (__base__) differs from the base model"
        else:
            assert_close(mixed[i], alone[i], name=f"sample {i} ({name})")
    # the adapters really change the output: a sample given no adapter would fail above
    assert not torch.allclose(mixed[0], base[0]) and not torch.allclose(mixed[2], base[2])
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    with torch.no_grad():
        shuffled = model(x[perm], adapter_names=[names[i] for i in perm])
    assert_close(shuffled, mixed[perm], name="reordered batch")


def test_an_adapter_missing_from_a_layer_leaves_that_layer_alone(gen):
    configs = {"a": QGOFTConfig(target_modules=["lin0", "lin1"], init_weights=False),
               "b": QGOFTConfig(target_modules=["lin1"], init_weights=False)}
    model = _mlp_with_adapters(gen, configs)
    x = torch.randn(4, 12, generator=gen)
    names = ["b", "a", "__base__", "b"]
    with torch.no_grad():
        assert_close(model(x, adapter_names=names), _alone(model, x, names))


def test_refusals_as_peft_does(gen):
    model = _mlp_with_adapters(gen, {"a": QGOFTConfig(target_modules=["lin0"]),
                                     "b": QGOFTConfig(target_modules=["lin0"])})
    x = torch.randn(3, 12, generator=gen)
    with pytest.raises(ValueError, match="non-existing adapter.*nope.*other"):
        model(x, adapter_names=["a", "nope", "other"])
    with pytest.raises(ValueError, match="should be the same as the number of inputs"):
        model(x, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model(x, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=["a", "b", "a"])
    model.eval()
    model.base_model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(x, adapter_names=["a", "b", "a"])
    model.base_model.unmerge_adapter()
    with torch.no_grad():
        assert_close(model(x, adapter_names=["a", "b", "a"]), _alone(model, x, ["a", "b", "a"]))


def test_adapters_loaded_from_saved_folders(tmp_path, gen):
    for i, name in enumerate(("fr", "de")):
        torch.manual_seed(0)
        one = peft.get_peft_model(MLP(), QGOFTConfig(target_modules=["lin0", "lin1"], block="quasi", scale=i == 1,
                                                     init_weights=False))
        _randomise(one, gen)
        one.save_pretrained(tmp_path / name)
    torch.manual_seed(0)
    model = peft.PeftModel.from_pretrained(MLP(), tmp_path / "fr", adapter_name="fr")
    model.load_adapter(tmp_path / "de", adapter_name="de")
    model.eval()
    x = torch.randn(5, 12, generator=gen)
    names = ["de", "fr", "__base__", "fr", "de"]
    with torch.no_grad():
        assert_close(model(x, adapter_names=names), _alone(model, x, names))


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_adapter_names(beams, gen):
    model = peft.get_peft_model(_tiny_llama(), QGOFTConfig(target_modules=["q_proj", "v_proj"], init_weights=False),
                                adapter_name="a")
    model.add_adapter("b", QGOFTConfig(target_modules=["q_proj", "v_proj"], block="givens", scale=True,
                                       init_weights=False))
    _randomise(model, gen)
    model.eval()
    ids = torch.randint(2, 64, (3, 5), generator=gen)
    names = ["b", "__base__", "a"]
    options = dict(max_new_tokens=6, do_sample=False, num_beams=beams, min_new_tokens=6)
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=names, **options)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[i:i + 1], **options)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[i:i + 1], **options)
            assert torch.equal(out[i], alone[0]), f"sample {i} ({name}) generated differently"
    # the adapters change what is generated: the test would see a sample given the wrong one
    logits = model(input_ids=ids, adapter_names=["a", "a", "a"]).logits
    assert not torch.allclose(logits, model(input_ids=ids, adapter_names=["b", "b", "b"]).logits)


def test_gpt2_conv1d_base(gen):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config).eval(),
                                QGOFTConfig(target_modules=["c_attn", "c_fc"], init_weights=False), adapter_name="a")
    model.add_adapter("b", QGOFTConfig(target_modules=["c_attn"], scale=True, init_weights=False))
    _randomise(model, gen)
    model.eval()
    ids = torch.randint(0, 64, (4, 6), generator=gen)
    names = ["a", "b", "__base__", "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model(input_ids=ids[i:i + 1]).logits)
            else:
                model.set_adapter(name)
                alone.append(model(input_ids=ids[i:i + 1]).logits)
    assert_close(mixed, torch.cat(alone))


class _Quantized(nn.Module):
    """An 8-bit and a 4-bit bitsandbytes linear (quantised on ``.to("cpu")``)."""

    def __init__(self):
        import bitsandbytes as bnb

        super().__init__()
        self.up = bnb.nn.Linear8bitLt(24, 64, has_fp16_weights=False, threshold=0.0)
        # bitsandbytes' CPU inference path takes 4-bit layers of 64 or more inputs and outputs
        self.down = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        reference = nn.Module()
        reference.up, reference.down = nn.Linear(24, 64), nn.Linear(64, 64)
        self.load_state_dict(reference.state_dict())
        self.to("cpu")  # quantizes

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'qgoft-kernels[bnb]')")
def test_bitsandbytes_base(gen):
    torch.manual_seed(0)
    model = peft.get_peft_model(_Quantized(), QGOFTConfig(target_modules=["up", "down"], init_weights=False),
                                adapter_name="a")
    model.add_adapter("b", QGOFTConfig(target_modules=["up", "down"], block="givens", init_weights=False))
    _randomise(model, gen)
    model.eval()
    x = torch.randn(4, 24, generator=gen)
    names = ["b", "a", "__base__", "a"]
    with torch.no_grad():
        assert_close(model(x, adapter_names=names), _alone(model, x, names))

"""Base layers besides nn.Linear, on both routes: transformers' Conv1D (GPT-2) and bitsandbytes'
8-bit and 4-bit linears (the QLoRA setting; bitsandbytes runs on the CPU since 0.45)."""
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_path")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'qgoft-kernels[bnb]')")


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def perturb(model, gen, size=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("rotation" in name or "scale" in name):
                p.add_(size * torch.randn(p.shape, generator=gen))


def test_gpt2_conv1d_inject_merge_save_load(tmp_path, gen):
    base = gpt2()
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    before = base(ids).logits
    model = qk.inject(copy.deepcopy(base), ["c_attn", "c_proj", "c_fc"], block="quasi", scale=True)
    assert sum(isinstance(m, qk.GivensWrapper) and m.kind == "conv1d" for m in model.modules()) == 8
    assert torch.equal(model(ids).logits, before)  # identity at init
    perturb(model, gen)
    out = model(ids).logits
    assert_close(qk.merge(copy.deepcopy(model))(ids).logits, out)
    qk.save_adapter(model, tmp_path / "gpt2.safetensors")
    fresh = qk.load_adapter(copy.deepcopy(base), tmp_path / "gpt2.safetensors")
    assert torch.equal(fresh(ids).logits, out)


def test_gpt2_default_peft_config(tmp_path, gen):
    """QGOFTConfig() on GPT-2 (LoRA's default targets, c_attn), the four calls and unmerge."""
    peft = pytest.importorskip("peft", minversion="0.21")
    from qgoft_kernels.peft import QGOFTConfig

    base = gpt2()
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    model = peft.get_peft_model(copy.deepcopy(base), QGOFTConfig(scale=True))
    assert model.peft_config["default"].target_modules == {"c_attn"}
    assert torch.equal(model(ids).logits, base(ids).logits)
    perturb(model, gen)
    out = model(ids).logits
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert_close(model(ids).logits, out)
    model.unmerge_adapter()
    assert_close(layer.base_layer.weight, w0)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(ids).logits, out)
    merged = loaded.merge_and_unload()
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert_close(merged(ids).logits, out)


# --- bitsandbytes -------------------------------------------------------------------------------------------


class Quantized(nn.Module):
    """Two quantized layers and a float head, made from the float model ``reference``."""

    def __init__(self, reference: nn.Module):
        import bitsandbytes as bnb

        super().__init__()
        self.up = bnb.nn.Linear8bitLt(24, 32, has_fp16_weights=False, threshold=0.0)
        self.down = bnb.nn.Linear4bit(32, 16, compute_dtype=torch.float32, quant_type="nf4")
        self.head = nn.Linear(16, 2)
        self.load_state_dict(reference.state_dict())
        self.to("cpu")  # quantizes

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def reference(seed=0):
    torch.manual_seed(seed)
    model = nn.Module()
    model.up, model.down, model.head = nn.Linear(24, 32), nn.Linear(32, 16), nn.Linear(16, 2)
    with torch.no_grad():  # weights like a trained layer's: roughly normal
        for layer in (model.up, model.down):
            layer.weight.normal_(0, 0.2)
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def quantization_error(model, x):
    """How far the quantized layers are from their float originals on ``x``: one quantisation step."""
    ref = reference()
    float_model = Quantized.forward.__get__(ref)
    return rel(model(x), float_model(x))


@needs_bnb
def test_bnb_inject_train_merge(tmp_path, gen):
    model = Quantized(reference())
    x = torch.randn(16, 24, generator=gen)
    before = model(x)
    qk.inject(model, ["up", "down"], block="quasi", scale=True, modules_to_save=["head"])
    assert {m.kind for m in model.modules() if isinstance(m, qk.GivensWrapper)} == {"bnb-8bit", "bnb-4bit"}
    assert torch.equal(model(x), before)
    opt = torch.optim.Adam(qk.trainable_parameters(model), lr=0.05)
    target = torch.randn(16, 2, generator=gen)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.up.base_layer.weight.dtype == torch.int8  # the base stays quantized and frozen
    out = model(x)
    # dequantised merge: exact up to fp32 rounding
    merged_float = qk.merge(copy.deepcopy(model), dequantize=True)
    assert_close(merged_float(x), out)
    # requantised merge: W R^T rounded to the 8-bit / 4-bit grid once more, exactly as bitsandbytes
    # quantizes those float weights itself. (Its error is one quantisation step of W R^T; after
    # training far from the identity that can exceed the base's own: up to ~3x here.)
    requantized = qk.merge(copy.deepcopy(model))
    assert type(requantized.up).__name__ == "Linear8bitLt" and type(requantized.down).__name__ == "Linear4bit"
    float_model = nn.Module()
    float_model.up, float_model.down, float_model.head = merged_float.up, merged_float.down, merged_float.head
    assert torch.equal(requantized(x), Quantized(float_model)(x))
    # the adapter file loads onto a freshly quantized model
    qk.save_adapter(model, tmp_path / "q.safetensors")
    again = qk.load_adapter(Quantized(reference()), tmp_path / "q.safetensors")
    assert torch.equal(again(x), out)


@needs_bnb
def test_bnb_through_peft(gen):
    peft = pytest.importorskip("peft", minversion="0.21")
    from qgoft_kernels.peft import QGOFTConfig

    model = peft.get_peft_model(Quantized(reference()), QGOFTConfig(target_modules=["up", "down"], scale=True))
    x = torch.randn(16, 24, generator=gen)
    assert torch.equal(model(x), Quantized(reference())(x))
    perturb(model, gen)
    out = model(x)
    model.merge_adapter()  # was: TypeError: x must have a floating-point dtype, got torch.int8
    assert model.base_model.model.up.base_layer.weight.dtype == torch.int8
    assert rel(model(x), out) <= 2 * quantization_error(Quantized(reference()), x) + 1e-3
    with pytest.raises(ValueError, match="cannot unmerge .* quantised again"):
        model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert type(merged.up).__name__ == "Linear8bitLt"


def test_bnb_is_what_the_makefile_installs():
    """CI must run the tests above: the Makefile's venv installs the bnb extra."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    assert "bnb" in (root / "Makefile").read_text().split("pip install -q -e '.[")[1].split("]")[0].split(",")

"""HF Trainer on both routes, with the orthogonality penalty added by qgoft_kernels.hf (no subclass),
and a checkpoint of the inject route loaded back (tiny Llama from a config, random weights)."""
import copy

import pytest
import torch

import qgoft_kernels as qk
from qgoft_kernels.hf import add_orthogonality_penalty, from_pretrained
from qgoft_kernels.verify import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("torch_path")


def llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (16, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(tmp_path, **kw):
    return transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=5e-2, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True, **kw)


def test_penalty_hook_adds_to_the_training_loss(gen):
    model = qk.inject(llama(), ["q_proj", "v_proj"], block="quasi")
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    batch = Data()[0]
    batch = {k: v[None] for k, v in batch.items()}
    model.eval()
    plain = model(**batch).loss
    handle = add_orthogonality_penalty(model, lam=0.5)
    assert torch.equal(model(**batch).loss, plain)  # eval: unchanged
    model.train()
    penalty = qk.orthogonality_penalty(model)
    assert penalty > 0
    assert_close(model(**batch).loss, plain + 0.5 * penalty)
    handle.remove()
    assert_close(model(**batch).loss, plain)


@pytest.mark.parametrize("route", ["inject", "peft"])
def test_trainer_with_penalty(route, tmp_path):
    model = llama()
    if route == "inject":
        qk.inject(model, ["q_proj", "v_proj"], block="quasi")
    else:
        peft = pytest.importorskip("peft", minversion="0.21")
        from qgoft_kernels.peft import QGOFTConfig

        model = peft.get_peft_model(model, QGOFTConfig(target_modules=["q_proj", "v_proj"], block="quasi"))
    add_orthogonality_penalty(model, lam=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=Data())
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("rotation" in n for n in changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_inject_checkpoint_survives_from_pretrained(tmp_path, gen):
    model = qk.inject(llama(), ["q_proj", "v_proj"], block="quasi", scale=True)
    trainer = transformers.Trainer(model=model, args=args(tmp_path), train_dataset=Data())
    trainer.train()
    trainer.save_model(str(tmp_path / "ckpt"))
    ids = torch.randint(0, 64, (2, 10), generator=gen)
    model.eval()
    with torch.no_grad():
        out = model(ids).logits
    loaded = from_pretrained(transformers.LlamaForCausalLM, str(tmp_path / "ckpt")).eval()
    assert sum(isinstance(m, qk.GivensLinear) for m in loaded.modules()) == 4
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    # the checkpoint describes itself: config.json says what it holds and what loads it
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "ckpt"))
    assert config.qgoft_adapter["load_with"].startswith("qgoft_kernels.hf.from_pretrained")
    # a plain checkpoint is refused by our loader with a clear message; merging removes the entry
    merged = qk.merge(copy.deepcopy(model))
    assert not hasattr(merged.config, "qgoft_adapter")
    merged.save_pretrained(str(tmp_path / "merged"))
    with pytest.raises(ValueError, match="not a checkpoint of a model adapted by qk.inject"):
        from_pretrained(transformers.LlamaForCausalLM, str(tmp_path / "merged"))
    with torch.no_grad():
        assert_close(transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()(ids).logits,
                     out)


@pytest.mark.parametrize("modules", [["model.layers.0.self_attn.q_proj"], {"model.layers.0.self_attn.q_proj": "quasi"}],
                         ids=["list", "string-options"])
def test_from_pretrained_names_malformed_modules(tmp_path, modules):
    """config.qgoft_adapter.modules given as a list gave "'list' object has no attribute 'items'"."""
    model = qk.inject(llama(), ["q_proj"], block="quasi")
    model.save_pretrained(str(tmp_path / "ckpt"))
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "ckpt"))
    config.qgoft_adapter = {**config.qgoft_adapter, "modules": modules}
    with pytest.raises(ValueError, match=r"config.json's qgoft_adapter\['modules'\] must map module names"):
        from_pretrained(transformers.LlamaForCausalLM, str(tmp_path / "ckpt"), config=config)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf"), -0.5, "0.1", True, None])
def test_penalty_weight_must_be_a_finite_number_not_below_zero(lam):
    with pytest.raises(ValueError, match=r"lam \(the penalty's weight\) must be a finite number >= 0"):
        add_orthogonality_penalty(torch.nn.Linear(2, 2), lam)


@pytest.mark.parametrize("model", [[torch.nn.Linear(2, 2)], {}, None], ids=["list", "dict", "None"])
def test_penalty_helpers_name_a_model_that_is_not_a_module(model):
    """orthogonality_penalty([layer]) and add_orthogonality_penalty({}) raised AttributeError."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        qk.orthogonality_penalty(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        add_orthogonality_penalty(model)


@pytest.mark.parametrize("pair", [(torch.zeros(7), "quasi"), (torch.zeros(7, 4), "quasi"),
                                  (torch.zeros(7, 2, 2), "quasi-ish")], ids=["angles", "flat", "block"])
def test_penalty_of_names_a_wrong_rotation(pair):
    """penalty_of([(angles, "quasi")]) raised an IndexError from inside."""
    from qgoft_kernels.nn import penalty_of

    with pytest.raises(ValueError, match="penalty_of: "):
        penalty_of([pair])


def test_penalty_hook_adds_to_the_loss_of_a_tuple(gen):
    """return_dict=False: the loss is the tuple's first element, and the penalty goes there;
    a tuple without a loss (no labels: the logits first) is left alone."""
    model = qk.inject(llama(), ["q_proj", "v_proj"], block="quasi")
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    batch = {k: v[None] for k, v in Data()[0].items()}
    model.train()
    plain = model(**batch, return_dict=False)
    unlabelled = model(input_ids=batch["input_ids"], return_dict=False)
    handle = add_orthogonality_penalty(model, lam=0.5)
    penalty = qk.orthogonality_penalty(model)
    assert penalty > 0
    out = model(**batch, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(plain)
    assert_close(out[0], plain[0] + 0.5 * penalty)
    assert torch.equal(out[1], plain[1])
    out[0].backward()  # the penalty's gradient reaches the rotations
    assert all(p.grad is not None for p in qk.trainable_parameters(model))
    again = model(input_ids=batch["input_ids"], return_dict=False)
    assert type(again) is tuple and torch.equal(again[0], unlabelled[0])
    handle.remove()

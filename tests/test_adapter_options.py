"""PEFT parity of the options (module_dropout, layers_to_transform, per-module patterns,
exclude_modules, modules_to_save) on both routes, self-describing adapters, the two formats
converted into each other, older format versions, and the command line."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import qgoft_kernels as qk
from qgoft_kernels.__main__ import main as cli
from qgoft_kernels.verify import assert_close

peft = pytest.importorskip("peft", minversion="0.21")
from qgoft_kernels.peft import OLD_SAVED_TYPE, REQUIRES, QGOFTConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_path")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.mlp = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 12)

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.q_proj(x) * torch.sigmoid(self.v_proj(x))))


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(3)])
        self.classifier = nn.Linear(12, 2)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return self.classifier(x)


def adapted_names(model):
    names = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
             if isinstance(m, (qk.GivensLinear, qk.GivensWrapper)) or type(m).__name__ == "Linear" and hasattr(
                 m, "qgoft_rotation")}
    return names


SELECTIONS = [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj", "mlp"], layers_to_transform=1),
    dict(target_modules="all-linear", exclude_modules=["mlp"], modules_to_save=["classifier"]),
    dict(target_modules=r".*\.(q_proj|mlp)", exclude_modules=r"model\.layers\.0\..*"),
]


@pytest.mark.parametrize("selection", SELECTIONS, ids=["layers-pattern", "layer-int", "exclude-save", "regex"])
def test_both_routes_select_the_same_modules(selection):
    ours = qk.inject(Net(), **selection)
    theirs = peft.get_peft_model(Net(), QGOFTConfig(**selection))
    assert adapted_names(ours) == adapted_names(theirs) and adapted_names(ours)
    ours_trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert ("classifier.weight" in ours_trainable) == ("modules_to_save" in selection)


def test_block_and_scale_patterns_on_both_routes(gen):
    options = dict(target_modules=["q_proj", "v_proj"], block="quasi", block_pattern={"v_proj": "givens"},
                   scale_pattern={r"layers\.1\.q_proj": True})
    ours = qk.inject(Net(), **options)
    theirs = peft.get_peft_model(Net(), QGOFTConfig(**options)).base_model.model
    for name in ("model.layers.0.q_proj", "model.layers.1.q_proj", "model.layers.2.v_proj"):
        o, t = ours.get_submodule(name), theirs.get_submodule(name)
        block = "givens" if name.endswith("v_proj") else "quasi"
        assert o.block == t.qgoft_block["default"] == block
        assert (o.scale is not None) == ("default" in t.qgoft_scale) == (name == "model.layers.1.q_proj")
    with pytest.raises(ValueError, match="block must be one of"):
        qk.inject(Net(), ["q_proj"], block_pattern={"q_proj": "lora"})
    with pytest.raises(ValueError, match=r"block_pattern\['q_proj'\]: block must be one of"):
        QGOFTConfig(target_modules=["q_proj"], block_pattern={"q_proj": "lora"})


def test_module_dropout_in_training_only(gen):
    model = peft.get_peft_model(Net(), QGOFTConfig(target_modules=["q_proj"], module_dropout=0.5,
                                                   init_weights=False))
    x = torch.randn(4, 12, generator=gen)
    model.eval()
    evaluated = model(x)
    assert torch.equal(model(x), evaluated)  # no dropout in eval
    model.train()
    torch.manual_seed(1)
    first = model(x)
    second = model(x)
    assert not torch.equal(first, second) and not torch.equal(first, evaluated)
    first.square().sum().backward()
    grad = model.base_model.model.model.layers[0].q_proj.qgoft_rotation["default"].grad
    assert (grad.flatten(1).abs().sum(1) == 0).any()  # dropped blocks get no gradient
    model.eval()
    merged = model.merge_and_unload()  # merges the whole adapter, no block dropped
    assert_close(merged(x), evaluated)
    with pytest.raises(ValueError, match="module_dropout"):
        QGOFTConfig(target_modules=["q_proj"], module_dropout=1.0)


def test_inject_modules_to_save_are_trained_and_saved(tmp_path, gen):
    model = qk.inject(Net(), ["q_proj"], modules_to_save=["classifier"])
    assert any(p is model.classifier.weight for p in qk.trainable_parameters(model))
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    qk.save_adapter(model, tmp_path / "a.safetensors")
    fresh = qk.load_adapter(Net(), tmp_path / "a.safetensors")
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert fresh.classifier.weight.requires_grad and not fresh.model.layers[0].mlp.weight.requires_grad
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] name no module"):
        qk.inject(Net(), ["q_proj"], modules_to_save=["head"])


# --- self-describing adapters and format versions ----------------------------------------------------------


def test_adapter_config_names_its_reader(tmp_path):
    model = peft.get_peft_model(Net(), QGOFTConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # peft_type is the plain name tools reading PEFT folders expect; the file says what loading needs
    assert saved["peft_type"] == "QGOFT"
    assert (saved["qgoft_package"], saved["qgoft_version"], saved["qgoft_format"]) == ("qgoft-kernels",
                                                                                       qk.__version__, 2)
    assert saved["qgoft_requires"] == REQUIRES and "import qgoft_kernels.peft" in REQUIRES
    # a user who forgot the import: PEFT's own lookup fails (its KeyError names the method)
    code = ("import peft, torch.nn as nn\n"
            "m = nn.Module(); m.q_proj = nn.Linear(12, 12)\n"
            f"peft.PeftModel.from_pretrained(m, {str(tmp_path)!r})\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "KeyError: 'QGOFT'" in result.stderr
    # what earlier builds saved (the instruction as peft_type) still loads, with or without the new field
    for requires in (True, False):
        old = dict(saved, peft_type=OLD_SAVED_TYPE)
        if not requires:
            del old["qgoft_requires"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(old))
        loaded = peft.PeftModel.from_pretrained(Net(), tmp_path)
        assert loaded.peft_config["default"].qgoft_requires == REQUIRES


def _peft_folder(tmp_path, gen, patterns=True):
    model = peft.get_peft_model(Net(), QGOFTConfig(target_modules=["q_proj", "v_proj"], scale=True,
                                                   block_pattern={"v_proj": "givens"} if patterns else {},
                                                   modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    folder = tmp_path / "peft"
    model.save_pretrained(folder)
    return model, folder


def test_format_one_adapter_config_still_loads(tmp_path, gen):
    model, folder = _peft_folder(tmp_path, gen, patterns=False)
    x = torch.randn(3, 12, generator=gen)
    out = model(x)
    config = json.loads((folder / "adapter_config.json").read_text())
    # what format 1 wrote: peft_type "QGOFT" and none of the newer fields
    for key in ("qgoft_package", "qgoft_version", "qgoft_format", "module_dropout", "layers_to_transform",
                "layers_pattern", "block_pattern", "scale_pattern"):
        config.pop(key)
    config["peft_type"] = "QGOFT"
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text(json.dumps(config))
    (old / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    assert torch.equal(peft.PeftModel.from_pretrained(Net(), old)(x), out)
    assert cli(["upgrade", str(old)]) == 0
    upgraded = json.loads((old / "adapter_config.json").read_text())
    assert upgraded["qgoft_format"] == 2 and upgraded["peft_type"] == "QGOFT"
    assert upgraded["qgoft_requires"] == REQUIRES
    # a newer format says what to do
    config = json.loads((folder / "adapter_config.json").read_text())
    config["qgoft_format"], config["qgoft_version"] = 3, "9.0.0"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"qgoft format 3, written by qgoft-kernels 9\.0\.0.*pip install -U"):
        peft.PeftModel.from_pretrained(Net(), folder)


def test_version_one_adapter_file_loads_and_newer_says_what_to_do(tmp_path, gen):
    model = qk.inject(Net(), ["q_proj"], scale=True)
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    tensors = {k: v.contiguous() for k, v in qk.checkpoint.adapter_state(model)[0].items()}
    modules = qk.checkpoint.adapter_state(model)[1]
    save_file(tensors, tmp_path / "v1.safetensors",
              metadata={"format": "qgoft-adapter", "version": "1", "modules": json.dumps(modules)})
    x = torch.randn(3, 12, generator=gen)
    assert torch.equal(qk.load_adapter(Net(), tmp_path / "v1.safetensors")(x), model(x))
    assert cli(["upgrade", str(tmp_path / "v1.safetensors"), "--out", str(tmp_path / "v2.safetensors")]) == 0
    assert torch.equal(qk.load_adapter(Net(), tmp_path / "v2.safetensors")(x), model(x))
    save_file(tensors, tmp_path / "v3.safetensors", metadata={"format": "qgoft-adapter", "version": "3",
                                                              "package_version": "9.0.0",
                                                              "modules": json.dumps(modules)})
    with pytest.raises(ValueError, match=r"format version 3, written by qgoft-kernels 9\.0\.0; .*reads versions "
                                         r"1, 2: upgrade it \(pip install -U qgoft-kernels"):
        qk.load_adapter(Net(), tmp_path / "v3.safetensors")


def test_formats_convert_both_ways(tmp_path, gen):
    model, folder = _peft_folder(tmp_path, gen)
    x = torch.randn(3, 12, generator=gen)
    out = model(x)
    # PEFT folder -> qk file -> loaded with qk.load_adapter
    assert cli(["convert", str(folder), str(tmp_path / "a.safetensors")]) == 0
    ours = qk.load_adapter(Net(), tmp_path / "a.safetensors")
    assert_close(ours(x), out)
    assert ours.model.layers[1].v_proj.block == "givens" and ours.classifier.weight.requires_grad
    # qk file -> PEFT folder -> loaded with PeftModel.from_pretrained
    assert cli(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "back")]) == 0
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "back")
    assert_close(theirs(x), out)
    assert theirs.base_model.model.model.layers[2].v_proj.qgoft_block["default"] == "givens"


def _rewritten(path, out, tensors=None, **meta):
    """The adapter file ``path`` written again at ``out`` with some tensors or header entries changed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = dict(fh.metadata())
        data = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file({**data, **(tensors or {})}, out, metadata={**header, **meta})
    return out


def test_convert_refuses_non_finite_rotations(tmp_path, gen):
    """A file -> folder conversion passed NaN rotations through (every load refuses them)."""
    from qgoft_kernels.formats import convert

    _, folder = _peft_folder(tmp_path, gen)
    convert(folder, tmp_path / "a.safetensors")
    key = "model.layers.0.q_proj.rotation"
    from qgoft_kernels.checkpoint import read_adapter

    bad = read_adapter(tmp_path / "a.safetensors")[0][key].clone()
    bad.view(-1)[0] = float("nan")
    _rewritten(tmp_path / "a.safetensors", tmp_path / "nan.safetensors", {key: bad})
    with pytest.raises(ValueError, match=rf"nan.safetensors: {re.escape(key)} holds values that are not finite"):
        convert(tmp_path / "nan.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("modules", [["model.layers.0.q_proj"], {"model.layers.0.q_proj": "quasi"},
                                     {"model.layers.0.q_proj": {"block": "quasi"}}],
                         ids=["list", "string-options", "missing-keys"])
def test_convert_and_upgrade_check_the_modules_header(tmp_path, gen, modules):
    """convert of a file whose 'modules' header is a list or has string options raised an
    AttributeError/TypeError; load_adapter's one validator now runs for every reader."""
    from qgoft_kernels.formats import convert, upgrade

    _, folder = _peft_folder(tmp_path, gen)
    convert(folder, tmp_path / "a.safetensors")
    bad = _rewritten(tmp_path / "a.safetensors", tmp_path / "bad.safetensors", modules=json.dumps(modules))
    for run in (lambda: convert(bad, tmp_path / "out"), lambda: upgrade(bad, tmp_path / "up.safetensors")):
        with pytest.raises(ValueError, match=r"bad.safetensors: .*(must map module names|malformed options)"):
            run()


def test_upgrade_names_a_file_that_is_not_safetensors(tmp_path):
    from qgoft_kernels.formats import upgrade

    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"junk.safetensors is not a readable safetensors file"):
        upgrade(path)


def test_upgrade_in_place_refuses_a_folder_without_weights(tmp_path, gen):
    """An in-place upgrade of a folder without adapter_model.safetensors reported success."""
    from qgoft_kernels.formats import upgrade

    _, folder = _peft_folder(tmp_path, gen)
    (folder / "adapter_model.safetensors").unlink()
    before = (folder / "adapter_config.json").read_text()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        upgrade(folder)
    assert (folder / "adapter_config.json").read_text() == before


@pytest.mark.parametrize("text, message", [("", "is not valid JSON"), ("{", "is not valid JSON"),
                                           ("[]", "must hold a JSON object"),
                                           ('{"peft_type": "LORA", "r": 8}', "peft_type is 'LORA', not QGOFT")],
                         ids=["empty", "broken", "list", "lora"])
def test_convert_names_a_bad_adapter_config(tmp_path, gen, text, message):
    """An empty or invalid adapter_config.json gave a bare JSONDecodeError/TypeError, and a LORA
    config over qGOFT weights "'LoraConfig' object has no attribute 'structure'"."""
    from qgoft_kernels.formats import convert, upgrade

    _, folder = _peft_folder(tmp_path, gen)
    (folder / "adapter_config.json").write_text(text)
    for run in (lambda: convert(folder, tmp_path / "a.safetensors"), lambda: upgrade(folder, tmp_path / "up")):
        with pytest.raises(ValueError, match=rf"adapter_config.json.*{re.escape(message)}"):
            run()


class _Nested(nn.Module):
    """``fc`` and ``inner.fc``: one module's name ends the other's; ``out`` makes the options of
    ``inner.fc`` the majority, so that ``fc``'s are the ones written as patterns."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.inner.fc(self.fc(x)))


@pytest.mark.parametrize("options", [(("quasi", True), ("givens", False)), (("givens", False), ("quasi", True))],
                         ids=["outer-quasi-scale", "inner-quasi-scale"])
def test_convert_keeps_options_of_nested_names_apart(tmp_path, gen, options):
    """A file adapting fc and inner.fc with other options gave the pattern key 'fc', which PEFT
    matches at the end of inner.fc too: the folder failed to load, or inner.fc gained a scale."""
    from qgoft_kernels.formats import convert

    (outer_block, outer_scale), (inner_block, inner_scale) = options
    model = _Nested()
    model.fc = qk.GivensLinear.from_linear(model.fc, block=outer_block, scale=outer_scale)
    model.inner.fc = qk.GivensLinear.from_linear(model.inner.fc, block=inner_block, scale=inner_scale)
    model.out = qk.GivensLinear.from_linear(model.out, block=inner_block, scale=inner_scale)
    with torch.no_grad():
        for p in qk.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    qk.save_adapter(model, tmp_path / "a.safetensors")
    convert(tmp_path / "a.safetensors", tmp_path / "folder")
    loaded = peft.PeftModel.from_pretrained(_Nested(), tmp_path / "folder")
    layers = dict(loaded.base_model.model.named_modules())
    for name, block, scale in (("fc", outer_block, outer_scale), ("inner.fc", inner_block, inner_scale)):
        assert layers[name].qgoft_block["default"] == block
        assert ("default" in layers[name].qgoft_scale) == scale, name
    x = torch.randn(5, 8, generator=gen)
    with torch.no_grad():
        assert_close(loaded(x), model(x))


# --- the command line ----------------------------------------------------------------------------------------


def test_cli_help_and_info(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(c in text for c in ("verify", "info", "convert", "upgrade"))
    with pytest.raises(SystemExit) as exit_:
        cli([])
    assert exit_.value.code == 2  # a command is required; the usage says so
    assert cli(["info"]) == 0
    assert f"qgoft-kernels {qk.__version__}" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "qgoft_kernels", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "convert" in result.stdout


def test_cli_prints_one_line_for_a_user_error(tmp_path, capsys):
    """A missing file or one in the wrong format printed a whole Python traceback: one line on stderr
    naming the file and the problem, exit 1; usage errors exit 2; --debug (before or after the
    command) keeps the traceback."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    for argv, names in ((["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "out")], "missing"),
                        (["upgrade", str(junk)], "junk.safetensors is not a readable safetensors file")):
        assert cli(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"python -m qgoft_kernels {argv[0]}: error: "), err
        assert names in err[0] and "Traceback" not in err[0]
        for debug in (["--debug", *argv], [*argv, "--debug"]):
            with pytest.raises((ValueError, FileNotFoundError)):
                cli(debug)
    with pytest.raises(SystemExit) as exit_:
        cli(["upgrade"])
    assert exit_.value.code == 2 and "required: source" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "qgoft_kernels", "upgrade", str(junk)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "junk.safetensors" in proc.stderr


def test_versions_agree():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == qk.__version__

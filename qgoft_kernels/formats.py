"""The two adapter formats, converted into each other, and older versions upgraded.

- A file of ``qk.save_adapter`` (safetensors; per module ``"<module>.rotation"``/``".scale"``
  and the options in the header) and
- a PEFT adapter folder (``adapter_config.json`` with a ``QGOFTConfig``, and
  ``adapter_model.safetensors`` with ``"base_model.model.<module>.qgoft_rotation"``/
  ``"qgoft_scale"``)

hold the same tensors under other names. A file's per-module options become the config's
``target_modules`` (the full names) with ``block_pattern``/``scale_pattern`` where modules
differ; a folder's ``out_features`` are not recorded by PEFT, so a converted file leaves them
``null`` and loading takes them from the model. ``modules_to_save`` travel both ways.
``python -m qgoft_kernels convert`` and ``upgrade`` call :func:`convert` and :func:`upgrade`.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil

from .checkpoint import check_finite, read_adapter, write_adapter

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _peft_config(source):
    """The ``QGOFTConfig`` of the PEFT adapter folder ``source`` and its ``adapter_config.json``
    as read, with errors that name that file: missing, not JSON, not an object, or the config of
    another method (PEFT would hand back, say, a ``LoraConfig``)."""
    from .peft import QGOFTConfig

    path = os.path.join(source, PEFT_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: no {PEFT_CONFIG}, so not a PEFT adapter folder")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object (PEFT's adapter config), got {type(raw).__name__}")
    if not str(raw.get("peft_type", "")).startswith("QGOFT"):
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}, not QGOFT: this folder holds another "
                         f"method's adapter, and only qGOFT adapters are converted or upgraded here")
    try:
        config = QGOFTConfig.from_pretrained(source)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid qGOFT adapter config ({type(e).__name__}: {e})") from None
    return config, raw


def _peft_weights(source) -> str:
    path = os.path.join(source, PEFT_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{source}: no {PEFT_WEIGHTS} (PEFT's safetensors weights)")
    return path


def _pattern(name: str, modules) -> str:
    """The ``block_pattern``/``scale_pattern`` key that picks module ``name`` alone. PEFT matches
    a key at the end of a module's name (``(.*\\.)?key$``), so ``fc`` would also pick
    ``inner.fc``: a name that ends another adapted module's name is anchored at the start of the
    name (``(?<![\\s\\S])``: nothing before it)."""
    key = re.escape(name)
    if any(other != name and other.endswith("." + name) for other in modules):
        key = r"(?<![\s\S])" + key
    return key


def file_to_peft(source, target, *, base_model: str | None = None) -> list[str]:
    """Write the ``qk.save_adapter`` file ``source`` as the PEFT adapter folder ``target``."""
    from safetensors.torch import save_file

    from .peft import QGOFTConfig

    tensors, modules, saved = read_adapter(source, with_saved=True)
    for key, t in tensors.items():
        # what no load accepts is not written either (as save_adapter refuses it)
        check_finite(key, t, str(source))
    if "" in modules:
        raise ValueError(f"{source} adapts a bare layer (module name ''), which PEFT cannot name; "
                         f"load it with qk.load_adapter")
    block = collections.Counter(o["block"] for o in modules.values()).most_common(1)[0][0]
    scale = collections.Counter(o["scale"] for o in modules.values()).most_common(1)[0][0]
    pattern = {n: _pattern(n, modules) for n in modules}
    config = QGOFTConfig(target_modules=sorted(modules), block=block, scale=scale,
                         block_pattern={pattern[n]: o["block"] for n, o in modules.items() if o["block"] != block},
                         scale_pattern={pattern[n]: o["scale"] for n, o in modules.items() if o["scale"] != scale},
                         modules_to_save=sorted(saved) or None, base_model_name_or_path=base_model)
    weights = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        name = f"qgoft_{part}" if module in modules and part in ("rotation", "scale") else part
        weights[f"{PEFT_PREFIX}{module}.{name}"] = t.contiguous()
    os.makedirs(target, exist_ok=True)
    config.save_pretrained(target)
    save_file(weights, os.path.join(target, PEFT_WEIGHTS), metadata={"format": "pt"})
    return [f"wrote {os.path.join(target, PEFT_CONFIG)} and {PEFT_WEIGHTS}: {len(modules)} adapted modules"
            f"{f', modules_to_save {sorted(saved)}' if saved else ''}"]


def peft_to_file(source, target) -> list[str]:
    """Write the PEFT adapter folder ``source`` as a ``qk.save_adapter`` file ``target``."""
    from safetensors import safe_open

    config, _ = _peft_config(source)
    path = _peft_weights(source)
    with safe_open(path, framework="pt") as fh:
        raw = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors, modules, saved = {}, {}, collections.defaultdict(list)
    for key, t in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        module, _, part = name.rpartition(".")
        if part in ("qgoft_rotation", "qgoft_scale"):
            tensors[f"{module}.{part.removeprefix('qgoft_')}"] = t
            modules.setdefault(module, {})
        else:
            owner = next((m for m in config.modules_to_save or () if module == m or module.endswith("." + m)
                          or name.startswith(m + ".")), None)
            if owner is None:
                raise ValueError(f"{source}: tensor {key!r} is neither a qGOFT adapter nor in modules_to_save")
            # PEFT saves the trained copy of a module to save under the module's own name
            name = name.replace(".modules_to_save.default.", ".")
            module, _, param = name.rpartition(".")
            tensors[name] = t
            saved[module].append(param)
    for module in modules:
        rotation = tensors[f"{module}.rotation"]
        modules[module] = {"in_features": rotation.shape[0] + 1, "out_features": None,
                           "block": "givens" if rotation.dim() == 1 else "quasi",
                           "structure": config.structure, "scale": f"{module}.scale" in tensors}
    write_adapter(target, tensors, modules, {k: sorted(v) for k, v in saved.items()})
    return [f"wrote {target}: {len(modules)} adapted modules (out_features taken from the model when loading)"
            f"{f', modules_to_save {sorted(saved)}' if saved else ''}"]


def convert(source, target, *, base_model: str | None = None) -> list[str]:
    """A PEFT folder ``source`` to a file ``target``, or a file to a folder."""
    if os.path.isdir(source):
        if base_model is not None:
            raise ValueError("--base-model applies to a file -> folder conversion only")
        return peft_to_file(source, target)
    return file_to_peft(source, target, base_model=base_model)


def upgrade(source, out=None) -> list[str]:
    """Rewrite the adapter ``source`` (a file or a PEFT folder, of any format version this package
    reads) in the current format, at ``out`` or over ``source``."""
    out = source if out is None else out
    if os.path.isdir(source):
        config, raw = _peft_config(source)
        weights = _peft_weights(source)  # a folder without them is no adapter: nothing to upgrade
        old = raw.get("qgoft_format", 1)
        config.qgoft_version = None
        config.__post_init__()
        if os.path.abspath(out) != os.path.abspath(source):
            os.makedirs(out, exist_ok=True)
            shutil.copyfile(weights, os.path.join(out, PEFT_WEIGHTS))
        config.save_pretrained(out)
        return [f"wrote {os.path.join(out, PEFT_CONFIG)}: qgoft format {old} -> {config.qgoft_format}"]
    from safetensors import safe_open

    # read_adapter first: its errors name the file (not safetensors, not an adapter, malformed)
    tensors, modules, saved = read_adapter(source, with_saved=True)
    with safe_open(str(source), framework="pt") as fh:
        old = (fh.metadata() or {}).get("version")
    write_adapter(out, tensors, modules, saved)
    from .checkpoint import VERSION

    return [f"wrote {out}: adapter format {old} -> {VERSION}"]

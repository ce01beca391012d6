"""Adapter files: only the rotations (and scales) plus their options, in safetensors.

safetensors holds raw tensors and a string header, so loading an untrusted adapter runs no
code (no pickle). The header records, per module, the options needed to rebuild it:
``{"format": "qgoft-adapter", "version": "1", "modules": "<json>"}``.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn as nn

from .checks import rotation_shape
from .nn import GivensLinear, _set_module

FORMAT, VERSION = "qgoft-adapter", "1"


def _options(m: GivensLinear) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "block": m.block,
            "structure": m.structure, "scale": m.scale is not None}


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``({"<module>.rotation": t, "<module>.scale": t, ...}, {"<module>": options})``."""
    tensors, modules = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, GivensLinear):
            modules[name] = _options(m)
            tensors[f"{name}.rotation"] = m.rotation.detach()
            if m.scale is not None:
                tensors[f"{name}.scale"] = m.scale.detach()
    return tensors, modules


def save_adapter(model: nn.Module, path) -> None:
    """Write every ``GivensLinear``'s rotation and scale (and their options) to ``path``."""
    from safetensors.torch import save_file

    tensors, modules = adapter_state(model)
    if not modules:
        raise ValueError("the model has no GivensLinear module: nothing to save")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, "version": VERSION, "modules": json.dumps(modules, sort_keys=True)})


def read_adapter(path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors and per-module options of an adapter file, checked for its format."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format {meta.get('format')!r})")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path} has adapter format version {meta.get('version')!r}; this reads {VERSION!r}")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return tensors, json.loads(meta["modules"])


def load_adapter(model: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load an adapter file into ``model``: all or nothing.

    Modules named in the file must be ``GivensLinear`` with the same options, or plain
    ``nn.Linear`` of the same shape, which are then injected with the file's options. Every
    module, shape, dtype and option is checked before anything changes; a mismatch raises
    ``ValueError`` naming the module. ``strict`` also requires every ``GivensLinear`` of
    the model to be in the file. Returns ``model``.
    """
    tensors, modules = read_adapter(path)
    return load_adapter_state(model, tensors, modules, strict=strict, source=str(path))


def load_adapter_state(model: nn.Module, tensors: dict, modules: dict, *, strict: bool = True,
                       source: str = "the adapter") -> nn.Module:
    """:func:`load_adapter` from tensors and options already in memory."""
    plan = []
    for name, opts in modules.items():
        target = _submodule(model, name, source)
        _check_entry(name, target, opts, tensors, source)
        plan.append((name, target, opts))
    expected = {f"{n}.{k}" for n, _, o in plan for k in (("rotation", "scale") if o["scale"] else ("rotation",))}
    extra = set(tensors) - expected
    if extra:
        raise ValueError(f"{source}: tensors {sorted(extra)} belong to no module in its header")
    if strict:
        missing = [n for n, m in model.named_modules() if isinstance(m, GivensLinear) and n not in modules]
        if missing:
            raise ValueError(f"{source}: no entry for the model's GivensLinear modules {missing} (strict=True)")
    # everything checked: now change the model
    for name, target, opts in plan:
        if not isinstance(target, GivensLinear):
            target = GivensLinear.from_linear(target, block=opts["block"], structure=opts["structure"],
                                              scale=opts["scale"])
            _set_module(model, name, target)
        with torch.no_grad():
            target.rotation.copy_(tensors[f"{name}.rotation"])
            if opts["scale"]:
                target.scale.copy_(tensors[f"{name}.scale"])
    return model


def _check_entry(name: str, target: nn.Module, opts: dict, tensors: dict, source: str) -> None:
    keys = ("in_features", "out_features", "block", "structure", "scale")
    if not isinstance(opts, dict) or set(opts) != set(keys):
        raise ValueError(f"{source}: module {name!r} has malformed options {opts!r}")
    if isinstance(target, GivensLinear):
        if _options(target) != opts:
            raise ValueError(f"{source}: module {name!r} is a GivensLinear with options {_options(target)}, "
                             f"the file has {opts}")
    elif type(target) is nn.Linear:
        have = {"in_features": target.in_features, "out_features": target.out_features}
        if have != {k: opts[k] for k in have}:
            raise ValueError(f"{source}: module {name!r} is an nn.Linear {have}, the file has {opts}")
    else:
        raise ValueError(f"{source}: module {name!r} is a {type(target).__name__}, not a GivensLinear or nn.Linear")
    shapes = {"rotation": rotation_shape(opts["in_features"], opts["block"], opts["structure"])}
    if opts["scale"]:
        shapes["scale"] = (opts["in_features"],)
    for part, shape in shapes.items():
        t = tensors.get(f"{name}.{part}")
        if t is None:
            raise ValueError(f"{source}: module {name!r} has no tensor {part!r}")
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(f"{source}: module {name!r}: {part} must be a float tensor of shape {shape}, "
                             f"got {tuple(t.shape)} {t.dtype}")


def convert_official(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Parameters of the paper's code (ArthurLeoM/peft-givens) in this package's layout.

    That code stores, per adapted ``nn.Linear``, ``givens_hard`` (raw ``phi`` ``[d-1]``,
    angle ``theta = pi * tanh(phi)``), or ``givens_soft`` (quasi blocks ``[d-1, 2, 2]``), and
    optionally ``givens_scaler`` (``[d]``). The pair order and the block layout are the same
    as here (stage-major; ``[[a00, a01], [a10, a11]]`` at ``[i,i], [i,j], [j,i], [j,j]``).
    Keys may carry PEFT's ``base_model.model.`` prefix and an adapter-name suffix
    (``.default``). Returns what :func:`load_adapter_state` takes; ``out_features`` is
    read from the model when loading, so it is left out here.
    """
    kinds = {"givens_hard": "givens", "givens_soft": "quasi"}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        parts = key.split(".")
        hit = [i for i, p in enumerate(parts) if p in (*kinds, "givens_scaler")]
        if not hit:
            continue
        i = hit[-1]
        module = ".".join(parts[:i])
        module = module.removeprefix("base_model.model.")
        grouped.setdefault(module, {})[parts[i]] = value
    tensors, modules = {}, {}
    for module, parts in grouped.items():
        rotation_kinds = [k for k in kinds if k in parts]
        if len(rotation_kinds) != 1:
            raise ValueError(f"official parameters for {module!r} need exactly one of givens_hard/givens_soft, "
                             f"got {sorted(parts)}")
        kind = rotation_kinds[0]
        raw = parts[kind].detach().float()
        d = raw.shape[0] + 1
        tensors[f"{module}.rotation"] = math.pi * torch.tanh(raw) if kind == "givens_hard" else raw.clone()
        if "givens_scaler" in parts:
            tensors[f"{module}.scale"] = parts["givens_scaler"].detach().float().reshape(-1).clone()
        modules[module] = {"in_features": d, "out_features": None, "block": kinds[kind], "structure": "tree",
                           "scale": "givens_scaler" in parts}
    return tensors, modules


def load_official(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> nn.Module:
    """Load the paper code's parameters (see :func:`convert_official`) into ``model``."""
    tensors, modules = convert_official(state)
    source = "official parameters"
    for name, opts in modules.items():
        opts["out_features"] = getattr(_submodule(model, name, source), "out_features", None)
    return load_adapter_state(model, tensors, modules, strict=strict, source=source)


def _submodule(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source}: module {name!r} is not in the model") from None

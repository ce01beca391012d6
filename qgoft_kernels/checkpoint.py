"""Adapter files: only the rotations (and scales) plus their options, in safetensors.

safetensors holds raw tensors and a string header, so loading an untrusted adapter runs no
code (no pickle). The header records, per module, the options needed to rebuild it, and
which package wrote the file:

- version 2 (written now): ``{"format": "qgoft-adapter", "version": "2", "package":
  "qgoft-kernels", "package_version": "<x.y.z>", "modules": "<json>", "modules_to_save":
  "<json>"}``; the tensors of ``modules_to_save`` are stored as ``"<module>.<parameter>"``
  beside ``"<module>.rotation"`` and ``"<module>.scale"``;
- version 1 (qgoft-kernels 0.1.0 before the PEFT work of issue 12): ``format``, ``version``
  and ``modules`` only. It still loads; ``python -m qgoft_kernels upgrade FILE`` rewrites it.

A file of a newer version raises an error naming the package version that wrote it. Files
are written to a temporary file beside the target and renamed over it, so a failed write
leaves the old file whole.
"""
from __future__ import annotations

import json
import math
import os
import secrets

import torch
import torch.nn as nn

from . import bases
from ._version import ADAPTER_FORMAT, PACKAGE, __version__
from .checks import check_options, rotation_shape
from .nn import ADAPTED, adapt, adapter_options, module_uses, record_on_config, replace_modules, saved_modules

FORMAT, VERSION = "qgoft-adapter", ADAPTER_FORMAT
#: Every format version this package reads, oldest first.
READS = ("1", "2")
OPTION_KEYS = ("in_features", "out_features", "block", "structure", "scale")
_options = adapter_options


def adapter_state(model: nn.Module, with_saved: bool = False):
    """``({"<module>.rotation": t, "<module>.scale": t, ...}, {"<module>": options})``.

    An adapted layer used at several places is listed once, under its first name. With
    ``with_saved``, a third item ``{"<module>": [parameter names]}`` lists the
    ``modules_to_save``, whose tensors are added as ``"<module>.<parameter>"``.
    """
    tensors, modules = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, ADAPTED):
            modules[name] = _options(m)
            tensors[f"{name}.rotation"] = m.rotation.detach()
            if m.scale is not None:
                tensors[f"{name}.scale"] = m.scale.detach()
    if not with_saved:
        return tensors, modules
    saved = {}
    for name, m in saved_modules(model).items():
        state = {k: v for k, v in m.state_dict().items() if v.is_floating_point()}
        saved[name] = sorted(state)
        tensors.update({f"{name}.{k}": v.detach() for k, v in state.items()})
    return tensors, modules, saved


def header(modules: dict, saved: dict) -> dict[str, str]:
    """The safetensors header of a version-2 adapter file."""
    return {"format": FORMAT, "version": VERSION, "package": PACKAGE, "package_version": __version__,
            "modules": json.dumps(modules, sort_keys=True), "modules_to_save": json.dumps(saved, sort_keys=True)}


def save_adapter(model: nn.Module, path) -> None:
    """Write every adapted layer's rotation and scale (and their options), and the parameters of
    the ``modules_to_save``, to ``path`` (format version 2, which names this package and its
    version in the header).

    Refuses (``ValueError``) an adapter holding NaN or Inf, which no load would accept. The
    write is atomic: a temporary file beside ``path``, renamed over it once complete.
    """
    tensors, modules, saved = adapter_state(model, with_saved=True)
    if not modules:
        raise ValueError("the model has no adapted layer (GivensLinear or GivensWrapper): nothing to save")
    write_adapter(path, tensors, modules, saved)


def write_adapter(path, tensors: dict, modules: dict, saved: dict | None = None) -> None:
    """Write an adapter file from tensors and options already in memory (see :func:`save_adapter`)."""
    from safetensors.torch import save

    for key, t in tensors.items():
        check_finite(key, t, "the model")
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=header(modules, saved or {}))
    _write_atomic(path, data)


def _write_atomic(path, data: bytes) -> None:
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    # os.open honours the umask, as a plain open() of the target would
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        # name the user's path, not the hidden temporary file beside it
        why = f"the folder {directory} does not exist" if not os.path.isdir(directory) else error.strerror
        raise type(error)(error.errno, f"cannot write {path}: {why}", path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_adapter(path, with_saved: bool = False):
    """The tensors and per-module options of an adapter file (of any version in :data:`READS`),
    checked for its format; with ``with_saved``, also its ``modules_to_save`` (``{}`` in version 1).

    Anything but a readable adapter file raises an error naming ``path``: a directory
    (``IsADirectoryError``), a missing file (``FileNotFoundError``), a file that is not
    safetensors or whose header is malformed, or a newer format version (``ValueError``).
    """
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not an adapter file (a PEFT adapter folder is "
                                f"loaded with PeftModel.from_pretrained)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a {FORMAT} file (format {meta.get('format')!r})")
            check_version(str(path), meta.get("version"), meta.get("package_version"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if "modules" not in meta:
        raise ValueError(f"{path}: the header has no 'modules' entry")
    try:
        modules = json.loads(meta["modules"])
        saved = json.loads(meta.get("modules_to_save", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the header's 'modules' or 'modules_to_save' entry is not valid JSON ({e})") from None
    check_modules(modules, str(path))
    if not isinstance(saved, dict) or not all(isinstance(v, list) for v in saved.values()):
        raise ValueError(f"{path}: the header's 'modules_to_save' must map module names to lists of parameter "
                         f"names, got {saved!r}")
    return (tensors, modules, saved) if with_saved else (tensors, modules)


def check_version(source: str, version, written_by=None) -> None:
    """Raise a ``ValueError`` that says what to do unless this package reads adapter format ``version``."""
    if version in READS:
        return
    newer = isinstance(version, str) and version.isdigit() and int(version) > int(VERSION)
    if newer:
        by = f"qgoft-kernels {written_by}" if written_by else "a newer qgoft-kernels"
        raise ValueError(f"{source} has adapter format version {version}, written by {by}; this is qgoft-kernels "
                         f"{__version__}, which reads versions {', '.join(READS)}: upgrade it "
                         f"(pip install -U qgoft-kernels, or pull the repository) to load this file")
    raise ValueError(f"{source} has adapter format version {version!r}, which no qgoft-kernels wrote; this one "
                     f"reads versions {', '.join(READS)}")


def load_adapter(model: nn.Module, path, *, strict: bool = True, adapter_name: str | None = None) -> nn.Module:
    """Load an adapter file into ``model``: all or nothing.

    With ``adapter_name``, the file is added beside what the model holds, under that name, for
    mixed batches (:func:`qgoft_kernels.use_adapters`): see :func:`load_named_adapter`.

    Modules named in the file must be adapted layers with the same options, or plain base
    layers (``nn.Linear``, ``Conv1D``, bitsandbytes linears) of the same shape, which are then
    injected with the file's options and
    the rest of the model frozen, as :func:`~qgoft_kernels.inject` does. Every module,
    option, shape, dtype and value (finite) is checked before anything changes; a mismatch
    raises ``ValueError`` naming the file and the module. ``strict`` also requires every
    adapted layer of the model to be in the file. The file's ``modules_to_save`` are loaded into
    the model's modules of those names and left trainable. Returns ``model``.
    """
    tensors, modules, saved = read_adapter(path, with_saved=True)
    if adapter_name is not None:
        return load_named_adapter(model, tensors, modules, adapter_name, source=str(path), saved=saved)
    return load_adapter_state(model, tensors, modules, strict=strict, source=str(path), saved=saved)


def load_named_adapter(model: nn.Module, tensors: dict, modules: dict, adapter_name: str, *,
                       source: str = "the adapter", saved: dict | None = None) -> nn.Module:
    """Add an adapter (tensors and options as in a file) to ``model`` under ``adapter_name``.

    Each module named must be an adapted layer or a supported base layer (injected first, with
    an identity adapter of its own, so the model's output does not change) of the same width;
    the named adapter may have other options (block, scale) than the layer's own. Nothing
    trains it: it is a frozen copy, kept out of ``state_dict`` and adapter files. A module not
    in the file has no such adapter: samples that name it pass that layer unchanged. Loading
    a name again replaces it. Everything is checked before anything changes.
    """
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name in ("default", "__base__"):
        raise ValueError(f"{source}: adapter_name must be a non-empty str other than 'default' (the layers' own "
                         f"adapter) and '__base__' (none), got {adapter_name!r}")
    if saved:
        raise ValueError(f"{source}: it has modules_to_save {sorted(saved)}, which a named adapter cannot carry "
                         f"(they would replace the model's own modules for every sample); load it without "
                         f"adapter_name")
    check_modules(modules, source)
    uses = {id(m): names for m, names in module_uses(model)}
    plan = []
    for name, opts in modules.items():
        target = _submodule(model, name, source)
        _check_entry(name, target, opts, tensors, source, same_options=False)
        if not isinstance(target, ADAPTED) and "" in uses[id(target)]:
            raise ValueError(f"{source}: the adapter is for the model itself (module name {name!r}); wrap it in "
                             f"qk.GivensLinear.from_linear (or qk.GivensWrapper) first")
        plan.append((name, target, opts))
    extra = set(tensors) - {f"{n}.{k}" for n, _, o in plan for k in (("rotation", "scale") if o["scale"]
                                                                      else ("rotation",))}
    if extra:
        raise ValueError(f"{source}: tensors {sorted(extra)} belong to no module in its header")
    # everything checked: now change the model
    injected, layers = [], []
    for name, target, opts in plan:
        if not isinstance(target, ADAPTED):
            new = adapt(target, block=opts["block"], structure=opts["structure"], scale=False).train(target.training)
            injected.append((uses[id(target)], new))
            target = new
        layers.append((name, target, opts))
    if injected:
        replace_modules(model, injected)
        record_on_config(model)
    for name, target, opts in layers:
        target.add_named_adapter(adapter_name, tensors[f"{name}.rotation"], tensors.get(f"{name}.scale"),
                                 block=opts["block"], structure=opts["structure"])
    return model


def check_modules(modules, source: str, what: str = "the header's 'modules'") -> None:
    """A ``ValueError`` naming ``source`` unless ``modules`` maps module names (str) to options
    this package writes: exactly the keys :data:`OPTION_KEYS`, ``in_features`` an int >= 1,
    ``out_features`` an int >= 0 or ``None`` (a file converted from PEFT, which does not record
    it), ``scale`` a bool, ``block`` and ``structure`` known. The one check of an adapter's
    options before anything reads them (loading, converting, upgrading, ``hf.from_pretrained``);
    :func:`_check_entry` then compares each entry with its layer."""
    if not isinstance(modules, dict):
        raise ValueError(f"{source}: {what} must map module names to options, got {type(modules).__name__}")
    for name, opts in modules.items():
        if not isinstance(name, str) or not isinstance(opts, dict):
            raise ValueError(f"{source}: {what} must map module names to option dicts, got {name!r}: "
                             f"{type(opts).__name__}")
        if set(opts) != set(OPTION_KEYS):
            raise ValueError(f"{source}: module {name!r} has malformed options {opts!r}; expected the keys "
                             f"{OPTION_KEYS}")
        for key, low in (("in_features", 1), ("out_features", 0)):
            if (type(opts[key]) is not int or opts[key] < low) and not (key == "out_features" and opts[key] is None):
                raise ValueError(f"{source}: module {name!r}: {key} must be an int >= {low}, got {opts[key]!r}")
        if type(opts["scale"]) is not bool:
            raise ValueError(f"{source}: module {name!r}: scale must be true or false, got {opts['scale']!r}")
        try:
            check_options(opts["block"], opts["structure"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: module {name!r}: {e}") from None


def load_adapter_state(model: nn.Module, tensors: dict, modules: dict, *, strict: bool = True,
                       source: str = "the adapter", saved: dict | None = None) -> nn.Module:
    """:func:`load_adapter` from tensors and options already in memory (``saved``: the
    ``modules_to_save``, ``{"<module>": [parameter names]}``)."""
    check_modules(modules, source)
    uses = {id(m): names for m, names in module_uses(model)}
    plan, seen = [], {}
    for name, opts in modules.items():
        target = _submodule(model, name, source)
        _check_entry(name, target, opts, tensors, source)
        if id(target) in seen:
            raise ValueError(f"{source}: modules {seen[id(target)]!r} and {name!r} are one module of the model")
        seen[id(target)] = name
        if not isinstance(target, ADAPTED) and "" in uses[id(target)]:
            raise ValueError(f"{source}: the adapter is for the model itself (module name {name!r}), here a "
                             f"{type(target).__name__}, which cannot be replaced in place: load it into "
                             f"qk.GivensLinear.from_linear(model) (or qk.GivensWrapper(model)) instead")
        plan.append((name, target, opts))
    expected = {f"{n}.{k}" for n, _, o in plan for k in (("rotation", "scale") if o["scale"] else ("rotation",))}
    to_save = _check_saved(model, saved or {}, tensors, source)
    expected |= {f"{n}.{k}" for n, _, keys in to_save for k in keys}
    extra = set(tensors) - expected
    if extra:
        raise ValueError(f"{source}: tensors {sorted(extra)} belong to no module in its header")
    if strict:
        missing = [n for n, m in model.named_modules() if isinstance(m, ADAPTED) and id(m) not in seen]
        if missing:
            raise ValueError(f"{source}: no entry for the model's GivensLinear/GivensWrapper modules {missing} "
                                 f"(strict=True)")
    # everything checked: now change the model
    layers, injected = [], []
    for name, target, opts in plan:
        if not isinstance(target, ADAPTED):
            new = adapt(target, block=opts["block"], structure=opts["structure"], scale=opts["scale"])
            injected.append((uses[id(target)], new))
            target = new
        layers.append((name, target, opts))
    for _, module, _ in to_save:
        module._qgoft_save = True
    if injected:
        replace_modules(model, injected)
    with torch.no_grad():
        for name, target, opts in layers:
            target.rotation.copy_(tensors[f"{name}.rotation"])
            if opts["scale"]:
                target.scale.copy_(tensors[f"{name}.scale"])
        for name, module, keys in to_save:
            state = module.state_dict(keep_vars=True)
            for k in keys:
                state[k].copy_(tensors[f"{name}.{k}"])
            module.requires_grad_(True)
    record_on_config(model)
    return model


def _check_saved(model: nn.Module, saved, tensors: dict, source: str) -> list:
    """The ``modules_to_save`` of a file as ``[(name, module, keys)]``, every tensor checked."""
    if not isinstance(saved, dict):
        raise ValueError(f"{source}: the header's 'modules_to_save' must map module names to parameter names")
    out = []
    for name, keys in saved.items():
        module = _submodule(model, name, source)
        state = module.state_dict()
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"{source}: modules_to_save entry {name!r} must list parameter names, got {keys!r}")
        for k in keys:
            t, have = tensors.get(f"{name}.{k}"), state.get(k)
            if have is None:
                raise ValueError(f"{source}: module {name!r} ({type(module).__name__}) has no parameter {k!r}")
            if t is None or tuple(t.shape) != tuple(have.shape) or not t.is_floating_point():
                got = "no tensor" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise ValueError(f"{source}: modules_to_save {name!r}.{k} must be a float tensor of shape "
                                 f"{tuple(have.shape)}, got {got}")
            check_finite(f"{name}.{k}", t, source)
        out.append((name, module, keys))
    return out


def _check_entry(name: str, target: nn.Module, opts, tensors: dict, source: str, same_options: bool = True) -> None:
    """Check one module's entry of a file against the model's module ``target`` (an adapted
    layer with the same options, unless not ``same_options``: then the same width only)."""
    if not isinstance(target, ADAPTED) and bases.kind(target) is None:
        raise ValueError(f"{source}: module {name!r} is a {type(target).__name__}, not an adapted layer or a "
                         f"supported base layer ({', '.join(bases.KINDS)})")
    if isinstance(target, ADAPTED):
        compared = tuple(OPTION_KEYS) if same_options else ("in_features", "out_features")
        have = {k: v for k, v in _options(target).items() if k in compared}
        if have != {k: target.out_features if k == "out_features" and opts[k] is None else opts[k]
                    for k in compared}:
            raise ValueError(f"{source}: module {name!r} is a {type(target).__name__} with options "
                             f"{_options(target)}, the file has {opts}")
    else:
        have = dict(zip(("in_features", "out_features"), bases.features(target)))
        if have != {k: have[k] if opts[k] is None else opts[k] for k in have}:
            what = "an nn.Linear" if bases.kind(target) == "linear" else f"a {type(target).__name__}"
            raise ValueError(f"{source}: module {name!r} is {what} {have}, the file has {opts}")
    shapes = {"rotation": rotation_shape(opts["in_features"], opts["block"], opts["structure"])}
    if opts["scale"]:
        shapes["scale"] = (opts["in_features"],)
    for part, shape in shapes.items():
        t = tensors.get(f"{name}.{part}")
        if t is None:
            raise ValueError(f"{source}: module {name!r} has no tensor {part!r}")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{source}: module {name!r}: {part} must be a float tensor of shape {shape}, got {got}")
        check_finite(f"{name}.{part}", t, source)


def check_finite(key: str, t: torch.Tensor, source: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{source}: {key} holds values that are not finite (NaN or Inf)")


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
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"official parameters: {key!r} must be a torch.Tensor, got {type(value).__name__}")
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
        raw = parts[kind]
        _check_official(module, kind, raw, "[d-1]" if kind == "givens_hard" else "[d-1, 2, 2]",
                        raw.dim() == 1 if kind == "givens_hard" else raw.dim() == 3 and raw.shape[1:] == (2, 2))
        raw = raw.detach().float()
        d = raw.shape[0] + 1
        tensors[f"{module}.rotation"] = math.pi * torch.tanh(raw) if kind == "givens_hard" else raw.clone()
        if "givens_scaler" in parts:
            # the official code keeps it as [d] (some exports add a leading 1)
            scaler = parts["givens_scaler"]
            _check_official(module, "givens_scaler", scaler, f"[{d}]", scaler.numel() == d and scaler.dim() >= 1)
            tensors[f"{module}.scale"] = scaler.detach().float().reshape(-1).clone()
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


def _check_official(module: str, kind: str, t: torch.Tensor, shape: str, ok: bool) -> None:
    if not ok or not t.is_floating_point():
        raise ValueError(f"official parameters for {module!r}: {kind} must be a float tensor of shape {shape}, "
                         f"got shape {tuple(t.shape)}, dtype {t.dtype}")


def _submodule(model: nn.Module, name: str, source: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source}: module {name!r} is not in the model") from None

"""Which modules an adapter goes on: PEFT's selection rules, for :func:`~qgoft_kernels.inject`.

The same rules as PEFT's ``check_target_module_exists`` and ``get_pattern_key`` (so one
``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` / pattern map means the same
module set on both routes), written here so that ``qk.inject`` does not need PEFT.
"""
from __future__ import annotations

import re


def matches(name: str, target_modules) -> bool:
    """A module's full ``name`` against ``target_modules``: ``"all-linear"``, a regular expression
    (matched against the whole name) or a list of names (equal, or a suffix after a ``"."``)."""
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def excluded(name: str, exclude_modules) -> bool:
    """Whether ``exclude_modules`` (a regular expression or a list of names, as above) names ``name``."""
    if not exclude_modules:
        return False
    if isinstance(exclude_modules, str):
        return re.fullmatch(exclude_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in exclude_modules)


def under(name: str, modules) -> bool:
    """Whether ``name`` is one of ``modules`` (names, PEFT's ``modules_to_save`` rule) or inside one."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules or ())


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The layer number in ``name``: the first ``<pattern>.<number>.`` for one of ``layers_pattern``
    (a name such as ``"layers"`` or ``"h"``, or a list of them), or without a pattern the first
    numbered segment that follows another segment (``model.layers.3.mlp`` gives 3)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name) or re.match(r"^[^.]+\.(?P<idx>\d+)\.", name)
        return int(match["idx"]) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            return int(match["idx"])
    return None


def layer_selected(name: str, target_modules, layers_to_transform, layers_pattern) -> bool:
    """PEFT's ``layers_to_transform`` rule: with a list of names (or ``"all-linear"``, which PEFT
    turns into one) as ``target_modules``, keep only the modules whose layer number
    (:func:`layer_index`) is ``layers_to_transform`` (an int) or in it (a list). A regular
    expression ignores it, as in PEFT."""
    if layers_to_transform is None or layers_to_transform == [] or (isinstance(target_modules, str)
                                                                    and target_modules != "all-linear"):
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def pattern_value(name: str, pattern_map, default):
    """The value of the first key of ``pattern_map`` that matches ``name`` (PEFT's ``get_pattern_key``:
    the key, a name or a regular expression, must match the whole name or its end after a ``"."``)."""
    for key, value in (pattern_map or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default

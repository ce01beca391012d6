"""Hugging Face transformers: the penalty in a ``Trainer``, and checkpoints of the inject route.

- :func:`add_orthogonality_penalty` adds ``lam * orthogonality_penalty(model)`` to the loss a
  model returns while it trains, so an unchanged ``Trainer`` (or any loop that reads
  ``outputs.loss``) trains with it, on both routes (``qk.inject`` and PEFT).
- :func:`from_pretrained` loads a checkpoint that ``save_pretrained`` (or ``Trainer``) wrote
  from a model adapted by ``qk.inject``: the base weights, and the adapters put back in place.
  ``qk.inject`` records them in ``model.config.qgoft_adapter``, so ``config.json`` says what
  the checkpoint holds and which function loads it.

transformers itself is imported only by :func:`from_pretrained`.
"""
from __future__ import annotations

import json
import math
import numbers
import os

import torch
import torch.nn as nn

from .checkpoint import check_modules, check_version, load_adapter_state
from .nn import CONFIG_KEY, check_model, orthogonality_penalty


def add_orthogonality_penalty(model: nn.Module, lam: float = 1e-3):
    """Make ``model``'s forward return ``loss + lam * orthogonality_penalty(model)`` while it trains.

    ``lam`` is the penalty's weight, a finite number ``>= 0`` (``0``: no penalty); anything
    else raises a ``ValueError`` (a NaN or infinite weight would make every loss NaN or
    infinite, a negative one would reward leaving orthogonality).

    A forward hook on ``model``: when ``model.training`` and the output has a loss, the penalty
    of every adapted layer (both routes) is added to it; in eval mode, and for outputs without
    a loss, nothing changes. The loss is the ``loss`` of a transformers ``ModelOutput`` or of a
    dict, or the first element of a tuple (``return_dict=False``) when that is a scalar tensor
    (transformers puts the loss first when it computes one, and the logits or hidden states
    that come first otherwise are never scalars). With
    gradient accumulation the penalty is added per micro-batch, and ``Trainer`` averages the
    micro-batch losses, so the step's loss is the task loss plus ``lam`` times the penalty.

    Returns the hook's handle; ``handle.remove()`` takes the penalty out again.

    Example::

        qk.inject(model, ["q_proj", "v_proj"])
        add_orthogonality_penalty(model, lam=1e-3)
        Trainer(model=model, args=args, train_dataset=data).train()
    """
    check_model(model)
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam (the penalty's weight) must be a finite number >= 0, got {lam!r}")

    def penalized(module, loss):
        return loss + lam * orthogonality_penalty(module).to(loss.device, loss.dtype)

    def hook(module, args, output):
        if not module.training or lam == 0:
            return output
        if isinstance(output, tuple) and not hasattr(output, "_fields"):
            first = output[0] if output else None
            if isinstance(first, torch.Tensor) and first.dim() == 0 and first.is_floating_point():
                return (penalized(module, first), *output[1:])
            return output
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None:
            return output
        output["loss"] = penalized(module, loss)
        return output

    return model.register_forward_hook(hook)


def from_pretrained(model_class, path, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` for a checkpoint of an injected model.

    Reads ``config.qgoft_adapter`` (written by ``qk.inject``), loads the base model without
    the adapter tensors, puts adapted layers back with the recorded options, loads their
    rotations and scales from the checkpoint's weight files, and marks the
    ``modules_to_save`` trainable. A checkpoint without that entry raises ``ValueError``.

    Example::

        model = qgoft_kernels.hf.from_pretrained(LlamaForCausalLM, "out/checkpoint-500")
    """
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    info = getattr(config, CONFIG_KEY, None)
    if not isinstance(info, dict) or "modules" not in info:
        raise ValueError(f"{path}: config.json has no {CONFIG_KEY!r} entry, so this is not a checkpoint of a model "
                         f"adapted by qk.inject; load it with {model_class.__name__}.from_pretrained")
    check_version(f"{path} (config.json's {CONFIG_KEY})", str(info.get("format")), info.get("version"))
    modules = info["modules"]
    check_modules(modules, str(path), f"config.json's {CONFIG_KEY}['modules']")
    keys = {f"{name}.{part}" for name, opts in modules.items()
            for part in (("rotation", "scale") if opts.get("scale") else ("rotation",))}
    ignored = list(getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or [])
    model_class._keys_to_ignore_on_load_unexpected = ignored + [r"\.rotation$", r"\.scale$"]
    try:
        model = model_class.from_pretrained(path, config=config, **kwargs)
    finally:
        model_class._keys_to_ignore_on_load_unexpected = ignored or None
    tensors = _read_tensors(path, keys)
    load_adapter_state(model, tensors, modules, source=str(path))
    for name in info.get("modules_to_save", []):
        module = model.get_submodule(name)
        module._qgoft_save = True
        module.requires_grad_(True)
    return model


def _read_tensors(path, keys: set[str]) -> dict:
    """The tensors ``keys`` from a checkpoint folder's weight files (safetensors, one or sharded)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = {os.path.join(path, weight_map[k]) for k in keys if k in weight_map}
    else:
        files = {os.path.join(path, "model.safetensors")}
    out = {}
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path}: no {os.path.basename(file)} (save with safe_serialization, the default)")
        with safe_open(file, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys() if k in keys})
    missing = sorted(keys - set(out))
    if missing:
        raise ValueError(f"{path}: the weight files lack the adapter tensors {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''} that config.json's {CONFIG_KEY} lists")
    return out


__all__ = ["CONFIG_KEY", "add_orthogonality_penalty", "from_pretrained"]

"""The base layers an adapter can sit on, and how ``R`` is folded into each one's weight.

``R`` acts on a layer's input, so the adapted layer is ``base(x @ R)`` whatever ``base`` is.
Only the merge (``W <- W R^T``, with ``W`` read as ``[out, in]``) needs to know how a kind of
layer stores its weight:

- ``"linear"``: ``torch.nn.Linear`` (exactly that type), ``W`` is ``weight``;
- ``"conv1d"``: transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``): ``y = x @ weight + b``,
  ``weight`` stored ``[in, out]``, so ``W`` is ``weight.T``;
- ``"bnb-8bit"``, ``"bnb-4bit"``: bitsandbytes' ``Linear8bitLt`` and ``Linear4bit``. ``W`` is the
  dequantised weight; writing it back quantises it again (docs/ecosystem.md says what that
  costs).

No optional package is imported here: a kind is recognised only when its package is already
loaded (a model holding such a layer has loaded it).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

KINDS = ("linear", "conv1d", "bnb-8bit", "bnb-4bit")
QUANTIZED = ("bnb-8bit", "bnb-4bit")


def _bnb():
    return sys.modules.get("bitsandbytes")


def kind(module: nn.Module) -> str | None:
    """The kind of base layer ``module`` is (one of :data:`KINDS`), or ``None`` when unsupported."""
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if t.__name__ == "Conv1D" and t.__module__.startswith("transformers"):
        return "conv1d"
    bnb = _bnb()
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "bnb-8bit"
        if isinstance(module, bnb.nn.Linear4bit):
            return "bnb-4bit"
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    k = kind(module)
    if k == "conv1d":
        return module.weight.shape[0], module.nf
    if k is None:
        raise TypeError(f"{type(module).__name__} is not a supported base layer ({', '.join(KINDS)})")
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """``W`` as ``[out, in]`` in a float dtype: a view for ``linear``/``conv1d``, dequantised for bitsandbytes."""
    k = kind(module)
    w = module.weight
    if k == "linear":
        return w
    if k == "conv1d":
        return w.t()
    bnb = _bnb()
    if k == "bnb-8bit":
        if w.dtype != torch.int8:  # has_fp16_weights=True keeps a float weight
            return w
        # the row scales move from the weight to the layer's state at its first forward
        scales = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scales)
    if k == "bnb-4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    raise TypeError(f"{type(module).__name__} is not a supported base layer ({', '.join(KINDS)})")


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the merge computes and rounds in: the weight's, or the dequantised one's."""
    k = kind(module)
    if k in QUANTIZED:
        return dense_weight(module).dtype
    return module.weight.dtype


def _weight_like(module: nn.Module, old: nn.Parameter, w: torch.Tensor) -> nn.Parameter:
    """A new weight parameter for ``module`` holding ``w`` (``[out, in]``) in the layout and
    precision of ``old``: transposed for ``conv1d``, quantised again for bitsandbytes."""
    k = kind(module)
    if k == "linear" or (k == "bnb-8bit" and old.dtype != torch.int8):
        return nn.Parameter(w.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    if k == "conv1d":
        return nn.Parameter(w.t().to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    bnb = _bnb()
    if k == "bnb-8bit":
        return bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights).to(old.device)
    if k == "bnb-4bit":
        options = {n: v for n, v in old.__dict__.items() if not n.startswith("_") and n not in ("data", "quant_state")}
        options.update(bnb_quantized=False, requires_grad=False, module=module)
        return bnb.nn.Params4bit(w.to("cpu").to(old.quant_state.dtype), **options).to(old.device)
    raise TypeError(f"{type(module).__name__} is not a supported base layer ({', '.join(KINDS)})")


@torch.no_grad()
def set_dense_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Store ``w`` (``[out, in]``) as the layer's weight, in place: the same ``Parameter`` for
    ``linear``/``conv1d`` (its ``.data`` changes), a new, quantised one for bitsandbytes."""
    k = kind(module)
    old = module.weight
    if k in QUANTIZED and not (k == "bnb-8bit" and old.dtype != torch.int8):
        module.weight = _weight_like(module, old, w)
        if k == "bnb-8bit":
            module.state.reset_grads()
    else:
        old.data = _weight_like(module, old, w).data


@torch.no_grad()
def merged_copy(module: nn.Module, w: torch.Tensor) -> nn.Module:
    """A new base layer of ``module``'s kind with weight ``w`` (``[out, in]``), the same bias and
    options. ``module`` is left alone (its weight may be shared with other modules)."""
    import copy

    old = module.weight
    # copy everything but the weight (and the 8-bit layer's cached state), then give the copy w
    new = copy.deepcopy(module, {id(old): None})
    new.weight = _weight_like(new, old, w)
    if kind(module) == "bnb-8bit":
        new.state.reset_grads()
    return new

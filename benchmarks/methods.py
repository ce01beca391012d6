"""The adapters compared, each built around the same frozen ``nn.Linear``.

Peers are the real implementations: LoRA, OFT (its current input-side Cayley-Neumann form)
and BOFT from PEFT. The paper's own method is :mod:`benchmarks.paper_dense`. Every factory
takes a frozen linear layer and returns ``(module, note)``; the module maps ``x`` to the
adapted layer's output, and only the adapter's parameters require grad.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from qgoft_kernels import GivensLinear

from .paper_dense import PaperDenseGivensLinear


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "floor", "qgoft", "paper", "peft"
    build: Callable[[nn.Linear], tuple[nn.Module, str]]


class _Wrap(nn.Module):
    """PEFT targets modules by name: give it one called ``layer``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.layer = linear

    def forward(self, x):
        return self.layer(x)


def peft_wrap(model: nn.Module, config) -> tuple[nn.Module, str]:
    """``peft.get_peft_model(model, config)`` and a note when PEFT fell back from its BOFT CUDA extension."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = peft.get_peft_model(model, config)
    fallback = any("CUDA extension" in str(w.message) for w in caught)
    return wrapped, "PEFT's CUDA extension did not load" if fallback else ""


def lora_config(r: int, targets):
    """PEFT LoRA at rank ``r`` (alpha = r, no dropout) on ``targets`` (names or a regular expression)."""
    import peft
    return peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets)


def oft_config(block: int, targets):
    """PEFT OFT (its input-side Cayley-Neumann form, PEFT's defaults) with blocks of ``block``."""
    import peft
    return peft.OFTConfig(r=0, oft_block_size=block, target_modules=targets)


def boft_config(block: int, factors: int, targets):
    """PEFT BOFT with blocks of ``block`` and ``factors`` butterfly factors."""
    import peft
    return peft.BOFTConfig(boft_block_size=block, boft_n_butterfly_factor=factors, target_modules=targets)


def boft_factors_used(model: nn.Module) -> int:
    """The butterfly factors PEFT's BOFT layers run with: 1 when its CUDA extension did not load."""
    return next(m.boft_R["default"].shape[0] for m in model.modules() if hasattr(m, "boft_R"))


def _peft(config_factory: Callable[[], object]):
    def build(linear: nn.Linear):
        return peft_wrap(_Wrap(copy.deepcopy(linear)), config_factory())
    return build


def _lora(r: int):
    return _peft(lambda: lora_config(r, ["layer"]))


def _oft(block: int):
    return _peft(lambda: oft_config(block, ["layer"]))


def _boft(block: int, factors: int):
    def build(linear):
        model, note = _peft(lambda: boft_config(block, factors, ["layer"]))(linear)
        # PEFT drops to one factor (block-diagonal OFT) when its CUDA extension does not load
        used = boft_factors_used(model)
        return model, "; ".join(filter(None, [note, f"ran with m={used}" if used != factors else ""]))
    return build


def _ours(cls, **options):
    def build(linear: nn.Linear):
        return cls.from_linear(copy.deepcopy(linear), **options), ""
    return build


class SweepsLinear(nn.Module):
    """A ``GivensLinear`` run as before the dense formulation: the stage sweeps, then the frozen
    layer (``F.linear(rotate_sweeps(x), W, b)``); the "before" of the CPU peers table."""

    def __init__(self, layer: GivensLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from qgoft_kernels.sweeps import rotate_sweeps

        m = self.layer
        return nn.functional.linear(rotate_sweeps(x, m.rotation, block=m.block, structure=m.structure,
                                                  scale=m.scale), m.weight, m.bias)


def _sweeps(**options):
    def build(linear: nn.Linear):
        return SweepsLinear(GivensLinear.from_linear(copy.deepcopy(linear), **options)), ""
    return build


def _frozen(linear: nn.Linear):
    layer = copy.deepcopy(linear)
    layer.requires_grad_(False)
    return layer, ""


#: The methods of the CPU peers table (benchmarks/run.py): every variant of ours, two of them
#: also on the stage sweeps alone (the PyTorch path before the dense formulation), and the
#: two peers issue 14 holds them to.
PEER_METHODS = ("frozen nn.Linear", "qGOFT quasi", "qGOFT quasi+scale", "GOFT givens", "GOFT givens+scale",
                "qGOFT quasi+scale (sweeps)", "GOFT givens (sweeps)", "PEFT OFT b=32", "PEFT LoRA r=8")
SWEEPS_METHODS = (
    Method("qGOFT quasi+scale (sweeps)", "sweeps", _sweeps(block="quasi", scale=True)),
    Method("GOFT givens (sweeps)", "sweeps", _sweeps(block="givens")),
)


def own_work(module: nn.Module, frozen_out: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The adapter's own work in ``module`` (built by one of :func:`methods`' factories) as a
    function of the layer's input, with the frozen layer's product left out; ``None`` for a
    method without one here (the frozen layer, the sweeps, the paper's, BOFT).

    Ours: ``x @ R`` (``GivensLinear.rotate``), which is all ``GivensLinear``
    adds to the frozen layer where it rotates ``x`` (``k`` at least the rows; otherwise it
    rotates the weight's rows instead, and this is not its work). PEFT's OFT: its rotation
    module on ``x``, which is what its layer runs before the frozen one. LoRA: ``frozen_out +
    B(A(x)) * scaling``, its two products and the sum into the layer's output.
    """
    if type(module) is GivensLinear:  # not the paper's subclass: its R is dense
        return module.rotate
    for sub in module.modules():
        if hasattr(sub, "oft_R") and "default" in sub.oft_R:
            return sub.oft_R["default"]
        if hasattr(sub, "lora_A") and "default" in sub.lora_A:
            a, b, s = sub.lora_A["default"], sub.lora_B["default"], sub.scaling["default"]
            return lambda x: frozen_out + b(a(x)) * s
    return None


def lora_rank_for_budget(d: int, k: int) -> int:
    """The LoRA rank whose ``r (d + k)`` parameters come nearest qGOFT's ``4 (d - 1)``."""
    return max(1, round(4 * (d - 1) / (d + k)))


def methods(d: int, k: int, peft_available: bool) -> list[Method]:
    """Every method for a ``d -> k`` layer (PEFT peers only when PEFT is installed)."""
    out = [
        Method("frozen nn.Linear", "floor", _frozen),
        Method("qGOFT quasi", "qgoft", _ours(GivensLinear, block="quasi")),
        Method("qGOFT quasi+scale", "qgoft", _ours(GivensLinear, block="quasi", scale=True)),
        Method("GOFT givens", "qgoft", _ours(GivensLinear, block="givens")),
        Method("GOFT givens+scale", "qgoft", _ours(GivensLinear, block="givens", scale=True)),
        Method("paper dense qGOFT", "paper", _ours(PaperDenseGivensLinear, block="quasi")),
    ]
    if peft_available:
        r = lora_rank_for_budget(d, k)
        out += [Method(f"PEFT LoRA r={r} (budget)", "peft", _lora(r))] if r not in (8, 16) else []
        out += [
            Method("PEFT LoRA r=8", "peft", _lora(8)),
            Method("PEFT LoRA r=16", "peft", _lora(16)),
            Method("PEFT OFT b=32", "peft", _oft(32)),
            Method("PEFT BOFT b=4 m=2", "peft", _boft(4, 2)),
        ]
    return out


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def peft_version() -> str | None:
    try:
        import peft
    except ImportError:
        return None
    return peft.__version__


def make_linear(d: int, k: int, device, dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(d, k, device=device, dtype=dtype)
    layer.requires_grad_(False)
    return layer

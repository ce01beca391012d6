"""PEFT integration: ``get_peft_model(model, QGOFTConfig(...))`` and the calls PEFT users know.

Importing this module makes qGOFT a PEFT method, so ``get_peft_model``,
``PeftModel.save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work
with a :class:`QGOFTConfig` (docs/ecosystem.md). The layer is PEFT's usual tuner-layer wrapper
around the frozen ``nn.Linear``; its forward is ``base_layer(givens_rotate(x, ...))`` on the
same kernels as :class:`~qgoft_kernels.GivensLinear`.

The route, and its limit: PEFT's ``register_peft_method`` only accepts names that are
already members of its ``PeftType`` enum, which an out-of-tree method cannot add. PEFT
looks methods up in plain dicts keyed by ``PeftType`` members, which are ``str`` enums, so
this module registers ``"QGOFT"`` in those dicts under a string key. Saved adapters record
``"peft_type": "QGOFT"``. Loading one needs ``import qgoft_kernels.peft`` first, the same
as for any PEFT method defined outside PEFT. Mixed-adapter batches and ``PeftMixedModel``
are not supported.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .checks import check_features, check_options, rotation_shape
from .function import givens_rotate
from .nn import block_penalty, reset_identity

PREFIX = "qgoft_"


class _MethodName(str):
    """The method's name where PEFT expects a ``PeftType`` member: a ``str`` with ``.value``."""

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


QGOFT = _MethodName("QGOFT")


@dataclass
class QGOFTConfig(PeftConfig):
    """Configuration of a qGOFT adapter: the options of :class:`~qgoft_kernels.GivensLinear`.

    Args:
        block: ``"quasi"`` (qGOFT, ``4(d-1)`` parameters per layer) or ``"givens"`` (GOFT, ``d-1``).
        structure: the pair schedule, ``"tree"``.
        scale: also train a diagonal scale (GOFT*), ``d`` parameters per layer.
        target_modules: as in PEFT (names, a regex or ``"all-linear"``); only ``nn.Linear``
            layers are adapted. Defaults to LoRA's per-architecture choice.
        exclude_modules: modules never to adapt, as in PEFT.
        modules_to_save: other modules to train and save (a classifier head, say).
        init_weights: start at the identity (``True``); ``False`` draws random blocks.
    """

    block: str = field(default="quasi", metadata={"help": "'quasi' (qGOFT) or 'givens' (GOFT)"})
    structure: str = field(default="tree", metadata={"help": "pair schedule: 'tree'"})
    scale: bool = field(default=False, metadata={"help": "also train a diagonal scale (GOFT*)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules to train"})
    init_weights: bool = field(default=True, metadata={"help": "identity initialization"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = QGOFT
        check_options(self.block, self.structure)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))


class QGOFTLayer(BaseTunerLayer):
    """PEFT tuner layer: per adapter a rotation (and scale) applied to the layer's input."""

    adapter_layer_names: tuple[str, ...] = ("qgoft_rotation", "qgoft_scale")
    other_param_names: tuple[str, ...] = ("qgoft_block", "qgoft_structure")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.qgoft_rotation = nn.ParameterDict({})
        self.qgoft_scale = nn.ParameterDict({})
        self.qgoft_block: dict[str, str] = {}
        self.qgoft_structure: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"qGOFT adapts nn.Linear layers, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.qgoft_rotation)

    def update_layer(self, adapter_name: str, config: QGOFTConfig, inference_mode: bool = False, **kwargs) -> None:
        self.qgoft_block[adapter_name] = config.block
        self.qgoft_structure[adapter_name] = config.structure
        shape = rotation_shape(self.in_features, config.block, config.structure)
        self.qgoft_rotation[adapter_name] = nn.Parameter(torch.empty(shape, dtype=torch.float32))
        if config.scale:
            self.qgoft_scale[adapter_name] = nn.Parameter(torch.empty(self.in_features, dtype=torch.float32))
        self.reset_qgoft_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def reset_qgoft_parameters(self, adapter_name: str, init_weights: bool) -> None:
        rotation = self.qgoft_rotation[adapter_name]
        reset_identity(rotation, self.qgoft_scale[adapter_name] if adapter_name in self.qgoft_scale else None,
                       self.qgoft_block[adapter_name])
        if not init_weights:
            rotation.add_(0.1 * torch.randn_like(rotation))

    def orthogonality_penalty(self) -> torch.Tensor:
        """The qGOFT penalty of the active adapters (see :func:`qgoft_kernels.orthogonality_penalty`)."""
        terms = [block_penalty(self.qgoft_rotation[a], self.qgoft_block[a])
                 for a in self.active_adapters if a in self.qgoft_rotation]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def _rotate(self, x: torch.Tensor, adapter: str, transpose: bool = False) -> torch.Tensor:
        check_features(x, self.in_features)
        scale = self.qgoft_scale[adapter] if adapter in self.qgoft_scale else None
        return givens_rotate(x, self.qgoft_rotation[adapter], block=self.qgoft_block[adapter],
                             structure=self.qgoft_structure[adapter], scale=scale, transpose=transpose)


class Linear(nn.Module, QGOFTLayer):
    """An ``nn.Linear`` adapted by qGOFT: ``base_layer(x @ R_1 @ R_2 ...)`` over the active adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QGOFTConfig, **kwargs) -> None:
        super().__init__()
        QGOFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
        elif not self.merged:
            for adapter in self.active_adapters:
                if adapter in self._available_adapters:
                    x = self._rotate(x, adapter)
        return self.base_layer(x, *args, **kwargs)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W <- W R^T`` per adapter; in reverse order, so that the merged layer equals the forward."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in reversed(adapter_names):
            if adapter not in self._available_adapters:
                continue
            merged = self._rotate(base.weight, adapter, transpose=True)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.weight.data = merged
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W <- W R^{-T}``, which needs every quasi block to be invertible."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            base.weight.data = self._inverse_rotate_rows(base.weight, adapter)

    def _inverse_rotate_rows(self, w: torch.Tensor, adapter: str) -> torch.Tensor:
        # W R^{-T} with R = P_L ... P_1 S: the plain product again, with every block B
        # replaced by B^{-T} and the scale by 1/s (docs/ecosystem.md)
        block = self.qgoft_block[adapter]
        params = self.qgoft_rotation[adapter].detach().double()
        if block == "quasi":
            det = params[:, 0, 0] * params[:, 1, 1] - params[:, 0, 1] * params[:, 1, 0]
            if (det.abs() < 1e-12).any():
                raise ValueError(f"adapter {adapter!r} has a singular quasi block: cannot unmerge")
            params = torch.linalg.inv(params).transpose(-1, -2)
        scale = self.qgoft_scale[adapter].detach().double().reciprocal() if adapter in self.qgoft_scale else None
        out = givens_rotate(w.double(), params, block=block, structure=self.qgoft_structure[adapter], scale=scale)
        return out.to(w.dtype)

    def __repr__(self) -> str:
        return "qgoft." + super().__repr__()


class QGOFTModel(BaseTuner):
    """PEFT tuner that replaces target ``nn.Linear`` layers by qGOFT layers."""

    prefix: str = PREFIX
    tuner_layer_cls = QGOFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config: QGOFTConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key=None, **kwargs) -> None:
        if isinstance(target, QGOFTLayer):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(f"Target module {target_name} ({type(target).__name__}) is not supported: qGOFT "
                             f"adapts torch.nn.Linear only.")
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def _register() -> None:
    if QGOFT in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    PEFT_TYPE_TO_CONFIG_MAPPING[QGOFT] = QGOFTConfig
    PEFT_TYPE_TO_TUNER_MAPPING[QGOFT] = QGOFTModel
    PEFT_TYPE_TO_PREFIX_MAPPING[QGOFT] = PREFIX


_register()

__all__ = ["QGOFTConfig", "QGOFTModel", "QGOFTLayer", "Linear", "QGOFT"]

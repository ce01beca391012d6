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

It needs PEFT >= 0.21 (:data:`MIN_PEFT`): 0.20 and older reject an out-of-tree method when
saving (``Unknown PEFT type passed: QGOFT``), so importing this module there raises an
``ImportError`` that says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import peft
import torch
import torch.nn as nn
from packaging.version import Version

#: The oldest PEFT this module works with (pyproject's ``peft`` extra).
MIN_PEFT = "0.21"
if Version(peft.__version__) < Version(MIN_PEFT):
    raise ImportError(f"qgoft_kernels.peft needs peft >= {MIN_PEFT}, found {peft.__version__} "
                      "(older PEFT rejects the method: 'Unknown PEFT type passed: QGOFT')")

from peft.config import PeftConfig  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge  # noqa: E402
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # noqa: E402

from .checks import check_features, check_options, rotation_shape  # noqa: E402
from .function import givens_rotate  # noqa: E402
from .nn import block_penalty, module_uses, reset_identity  # noqa: E402
from .schedule import num_stages  # noqa: E402

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
        """Undo :meth:`merge`: ``W <- W R^{-T}``, or refuse without touching anything.

        The rounding the merge left in ``W`` comes back amplified by up to ``cond(R)``. So
        this estimates ``cond(R)`` and refuses (``ValueError``; the layer stays merged) when
        the predicted error of the weight exceeds ``UNMERGE_RTOL`` for its dtype, or when a
        block is singular. The inverse runs in float64, and merging the result again must give
        back the stored ``W`` before it is written (docs/ecosystem.md).
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        w = base.weight
        limit = UNMERGE_RTOL.get(w.dtype, UNMERGE_RTOL[torch.float32])
        inverses = {a: self._inverse_params(a) for a in self.merged_adapters}
        bound = unmerge_error_bound(w.dtype, self.in_features,
                                    [self._condition(a, *inverses[a]) for a in self.merged_adapters])
        if not bound <= limit:
            raise ValueError(f"cannot unmerge the adapters {self.merged_adapters}: R is ill-conditioned, and W "
                             f"({w.dtype}) would come back with a relative error up to {bound:.1e}, more than "
                             f"the {limit:.0e} allowed; the layer stays merged (reload the base weights to undo "
                             f"the merge)")
        restored = w.detach().double()
        for adapter in reversed(self.merged_adapters):
            restored = self._rotate_by(restored, adapter, *inverses[adapter])
        restored = restored.to(w.dtype)
        again = restored.double()
        for adapter in self.merged_adapters:
            again = self._rotate(again, adapter, transpose=True)
        # relative error of the round trip; NaN or Inf fail it too
        err = ((again - w.double()).norm() / w.double().norm().clamp_min(1e-300)).item()
        if not err <= limit:
            raise ValueError(f"cannot unmerge the adapters {self.merged_adapters}: merging the result again "
                             f"differs from W by {err:.1e} (relative), more than {limit:.0e}; the layer stays "
                             f"merged")
        base.weight.data = restored
        self.merged_adapters.clear()

    def _inverse_params(self, adapter: str):
        """Parameters of ``R^{-T}`` in float64: ``R = P_L ... P_1 S`` gives the plain product again
        with every block ``B`` replaced by ``B^{-T}`` and the scale by ``1/s``."""
        block = self.qgoft_block[adapter]
        params = self.qgoft_rotation[adapter].detach().double()
        if block == "quasi":
            sigma = torch.linalg.svdvals(params)
            if not (torch.isfinite(sigma).all() and (sigma[:, 1] > 1e-15 * sigma[:, 0]).all()):
                raise ValueError(f"cannot unmerge the adapter {adapter!r}: it has a singular (or non-finite) "
                                 f"quasi block, so R is ill-conditioned; the layer stays merged")
            params = torch.linalg.inv(params).transpose(-1, -2)
        scale = self.qgoft_scale[adapter].detach().double() if adapter in self.qgoft_scale else None
        if scale is not None:
            if not (torch.isfinite(scale).all() and (scale != 0).all()):
                raise ValueError(f"cannot unmerge the adapter {adapter!r}: its scale has a zero (or non-finite) "
                                 f"entry, so R is singular (ill-conditioned); the layer stays merged")
            scale = scale.reciprocal()
        return params, scale

    def _rotate_by(self, x: torch.Tensor, adapter: str, params, scale, transpose: bool = False) -> torch.Tensor:
        return givens_rotate(x, params, block=self.qgoft_block[adapter], structure=self.qgoft_structure[adapter],
                             scale=scale, transpose=transpose)

    def _condition(self, adapter: str, inv_params, inv_scale) -> float:
        """``cond(R) = ||R|| ||R^{-1}||``, estimated by power iteration through the rotation itself."""
        def norm(apply):
            return spectral_norm(apply, self.in_features, self.qgoft_rotation[adapter].device)

        big = norm(lambda v, t: self._rotate(v, adapter, transpose=t))
        small = norm(lambda v, t: self._rotate_by(v, adapter, inv_params, inv_scale, transpose=t))
        return big * small

    def __repr__(self) -> str:
        return "qgoft." + super().__repr__()


#: The largest relative (Frobenius) error of the weight :meth:`Linear.unmerge` may give back,
#: per dtype of the weight: the package's bounds for "equal" in fp32/fp64; in bf16/fp16 about
#: five and eight units of the dtype's rounding (a round trip through an orthogonal R costs two).
UNMERGE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def spectral_norm(apply, d: int, device, iters: int = 40, probes: int = 4) -> float:
    """Largest singular value of a ``d x d`` matrix ``A`` known only through ``apply(v, transpose)``
    (``v @ A``, or ``v @ A^T``), by power iteration on ``A A^T`` from fixed random rows, in float64.

    Each step's value is a lower bound that rises to the norm; 40 steps from 4 starts get within
    a few percent unless the top singular values are very close, where the error matters little.
    """
    g = torch.Generator().manual_seed(0)
    v = torch.randn(probes, d, generator=g, dtype=torch.float64).to(device)
    v = v / v.norm(dim=1, keepdim=True)
    estimate = 0.0
    for _ in range(iters):
        u = apply(v, False)
        estimate = max(estimate, u.norm(dim=1).max().item())
        w = apply(u, True)
        v = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return estimate


def unmerge_error_bound(dtype: torch.dtype, d: int, conditions: list[float]) -> float:
    """A first-order bound on the relative error of ``W`` after undoing merges of ``R_1, R_2, ...``.

    Merge ``j`` rounds once per stage in its compute dtype (fp32, fp64 for fp64 weights) and
    once to ``dtype``; undoing merges ``j, j-1, ..., 1`` amplifies that by at most
    ``cond(R_1) ... cond(R_j)``; the result is rounded to ``dtype`` once more.
    """
    unit = torch.finfo(dtype).eps / 2
    compute = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    per_merge = unit + num_stages(d) * compute
    total, amplification = unit, 1.0
    for kappa in conditions:
        amplification *= kappa
        total += per_merge * amplification
    return total


class QGOFTModel(BaseTuner):
    """PEFT tuner that replaces target ``nn.Linear`` layers by qGOFT layers."""

    prefix: str = PREFIX
    tuner_layer_cls = QGOFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_model(self, peft_config: QGOFTConfig, model: nn.Module) -> None:
        # PEFT walks named_modules(), which lists a module used at several places once: it
        # would adapt one place of a shared nn.Linear and leave the others plain
        for module, names in module_uses(model):
            if type(module) is not nn.Linear or len(names) < 2:
                continue
            if peft_config.target_modules == "all-linear" or any(self._check_target_module_exists(peft_config, n)
                                                                 for n in names):
                raise ValueError(f"nn.Linear module used at several places {names}: qGOFT through PEFT adapts a "
                                 f"module at one place only; exclude it (exclude_modules) or use qk.inject, "
                                 f"which adapts every place")

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

__all__ = ["QGOFTConfig", "QGOFTModel", "QGOFTLayer", "Linear", "QGOFT", "UNMERGE_RTOL"]

"""PEFT integration: ``get_peft_model(model, QGOFTConfig(...))`` and the calls PEFT users know.

Importing this module makes qGOFT a PEFT method, so ``get_peft_model``,
``PeftModel.save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work
with a :class:`QGOFTConfig` (docs/ecosystem.md). The layer is PEFT's usual tuner-layer wrapper
around the frozen ``nn.Linear``; its forward is ``base_layer(givens_rotate(x, ...))`` on the
same kernels as :class:`~qgoft_kernels.GivensLinear`.

The route, and its limit: PEFT's ``register_peft_method`` only accepts names that are
already members of its ``PeftType`` enum, which an out-of-tree method cannot add. PEFT
looks methods up in plain dicts keyed by ``PeftType`` members, which are ``str`` enums, so
this module registers ``"QGOFT"`` in those dicts under a string key. Loading a saved adapter
needs ``import qgoft_kernels.peft`` first, as for any PEFT method defined outside PEFT: PEFT
looks ``peft_type`` up before any code of this package can run, so a forgotten import fails in
PEFT with ``KeyError: 'QGOFT'``. ``adapter_config.json`` (format 2, :data:`FORMAT`) keeps
``"peft_type": "QGOFT"``, the plain name every tool reading PEFT folders expects, and says what
to do in ``qgoft_requires`` (:data:`REQUIRES`) beside the package, its version and the format
(``qgoft_package``, ``qgoft_version``, ``qgoft_format``). Folders whose ``peft_type`` is the
sentence :data:`OLD_SAVED_TYPE` (written by earlier 0.1.0 builds) load too.

Mixed-adapter batches work as for LoRA and RoAd (``model(**inputs, adapter_names=[...])``, in
``generate`` too; one launch per layer, :mod:`qgoft_kernels.mixed`); ``PeftMixedModel`` is not
supported.

Base layers: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2) and bitsandbytes' 8-bit and
4-bit linears (``qgoft_kernels.bases``): the forward is the same for all, the merge writes
``W R^T`` in each one's layout, quantised again for bitsandbytes.

It needs PEFT >= 0.21 (:data:`MIN_PEFT`): 0.20 and older reject an out-of-tree method when
saving (``Unknown PEFT type passed: QGOFT``), so importing this module there raises an
``ImportError`` that says so.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
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
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, AuxiliaryTrainingWrapper  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

from . import bases  # noqa: E402
from ._version import __version__  # noqa: E402
from .checks import check_features, check_options, rotation_shape  # noqa: E402
from .function import givens_rotate, rotate_by_names  # noqa: E402
from .nn import module_uses, penalty_of, reset_identity  # noqa: E402
from .schedule import num_stages  # noqa: E402

PREFIX = "qgoft_"
#: The adapter_config.json format this module writes, and every one it reads.
FORMAT, READS = 2, (1, 2)
#: What adapter_config.json says a reader needs (``qgoft_requires``): PEFT fails with a bare
#: ``KeyError: 'QGOFT'`` when ``qgoft_kernels.peft`` was not imported, and the file says why.
REQUIRES = "qgoft-kernels (pip install 'qgoft-kernels[peft]'); import qgoft_kernels.peft before loading with PEFT"
#: The ``peft_type`` earlier 0.1.0 builds saved (the instruction in PEFT's ``KeyError``): still read.
OLD_SAVED_TYPE = "QGOFT (needs qgoft-kernels: pip install 'qgoft-kernels[peft]', then import qgoft_kernels.peft)"


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
        target_modules: as in PEFT (names, a regex or ``"all-linear"``). The layers adapted are
            ``nn.Linear``, transformers' ``Conv1D`` (GPT-2) and bitsandbytes' ``Linear8bitLt`` and
            ``Linear4bit``; naming another kind raises ``ValueError``. Defaults to LoRA's
            per-architecture choice.
        exclude_modules: modules never to adapt, as in PEFT.
        modules_to_save: other modules to train and save (a classifier head, say).
        init_weights: start at the identity (``True``); ``False`` draws random blocks.
        module_dropout: OFT's multiplicative dropout: in training, each 2x2 block is replaced by
            the identity with this probability (the scale is kept); 0 turns it off.
        layers_to_transform, layers_pattern: only these layer numbers, as in PEFT's LoRA.
        block_pattern, scale_pattern: per-module options, ``{pattern: value}`` like LoRA's
            ``rank_pattern``: the first key matching a module's name (fully or as its end)
            overrides ``block`` / ``scale`` there.
        qgoft_package, qgoft_version, qgoft_format, qgoft_requires: who wrote the saved config and
            what reading it needs (filled in).
    """

    block: str = field(default="quasi", metadata={"help": "'quasi' (qGOFT) or 'givens' (GOFT)"})
    structure: str = field(default="tree", metadata={"help": "pair schedule: 'tree'"})
    scale: bool = field(default=False, metadata={"help": "also train a diagonal scale (GOFT*)"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to adapt"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "modules to skip"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "extra modules to train"})
    init_weights: bool = field(default=True, metadata={"help": "identity initialization"})
    module_dropout: float = field(default=0.0, metadata={"help": "probability of an identity block in training"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "layer numbers"})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "layer list name"})
    block_pattern: dict = field(default_factory=dict, metadata={"help": "{pattern: block} per module"})
    scale_pattern: dict = field(default_factory=dict, metadata={"help": "{pattern: scale} per module"})
    qgoft_package: str = field(default="qgoft-kernels", metadata={"help": "the package that reads this config"})
    qgoft_version: Optional[str] = field(default=None, metadata={"help": "its version that wrote it (filled in)"})
    qgoft_format: int = field(default=FORMAT, metadata={"help": "format version of this config"})
    qgoft_requires: str = field(default=REQUIRES, metadata={"help": "what loading this config needs"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = QGOFT
        if self.qgoft_version is None:
            self.qgoft_version = __version__
        check_options(self.block, self.structure)
        if not (isinstance(self.module_dropout, (int, float)) and 0.0 <= self.module_dropout < 1.0):
            raise ValueError(f"module_dropout must be a probability in [0, 1), got {self.module_dropout!r}")
        for name, check in (("block_pattern", lambda v: check_options(v, self.structure)),
                            ("scale_pattern", _check_bool)):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict {{pattern: value}}, got {type(value).__name__}")
            for key, v in value.items():
                try:
                    check(v)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{name}[{key!r}]: {e}") from None
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern needs layers_to_transform (as in PEFT)")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, set(value))

    def to_dict(self) -> dict:
        """The config as saved: ``peft_type`` the plain name, and what loading it needs (:data:`REQUIRES`)."""
        out = super().to_dict()
        out["peft_type"] = QGOFT
        out["qgoft_format"] = FORMAT
        out["qgoft_requires"] = REQUIRES
        return out

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse, saying what to do, a config of a format this package does not read."""
        fmt = kwargs.get("qgoft_format", 1)
        if fmt not in READS:
            by = kwargs.get("qgoft_version") or "?"
            if isinstance(fmt, int) and fmt > FORMAT:
                raise ValueError(f"this adapter_config.json has qgoft format {fmt}, written by qgoft-kernels {by}; "
                                 f"this is qgoft-kernels {__version__}, which reads formats {list(READS)}: "
                                 f"upgrade it (pip install -U 'qgoft-kernels[peft]') to load the adapter")
            raise ValueError(f"this adapter_config.json has qgoft_format={fmt!r}, which no qgoft-kernels wrote "
                             f"(this one reads {list(READS)})")
        return super().check_kwargs(**kwargs)


def _check_bool(value) -> None:
    if type(value) is not bool:
        raise TypeError(f"must be True or False, got {value!r}")


class QGOFTLayer(BaseTunerLayer):
    """PEFT tuner layer: per adapter a rotation (and scale) applied to the layer's input."""

    adapter_layer_names: tuple[str, ...] = ("qgoft_rotation", "qgoft_scale")
    other_param_names: tuple[str, ...] = ("qgoft_block", "qgoft_structure", "qgoft_module_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.qgoft_rotation = nn.ParameterDict({})
        self.qgoft_scale = nn.ParameterDict({})
        self.qgoft_block: dict[str, str] = {}
        self.qgoft_structure: dict[str, str] = {}
        self.qgoft_module_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if bases.kind(base) is None:
            raise TypeError(f"qGOFT adapts {', '.join(bases.KINDS)} layers, got {type(base).__name__}")
        self.in_features, self.out_features = bases.features(base)

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.qgoft_rotation)

    def update_layer(self, adapter_name: str, config: QGOFTConfig, inference_mode: bool = False, *,
                     block: Optional[str] = None, scale: Optional[bool] = None, **kwargs) -> None:
        """Add adapter ``adapter_name``; ``block`` and ``scale`` (from the config's patterns)
        override the config's own."""
        block = config.block if block is None else block
        scale = config.scale if scale is None else scale
        self.qgoft_block[adapter_name] = block
        self.qgoft_structure[adapter_name] = config.structure
        self.qgoft_module_dropout[adapter_name] = config.module_dropout
        shape = rotation_shape(self.in_features, block, config.structure)
        self.qgoft_rotation[adapter_name] = nn.Parameter(torch.empty(shape, dtype=torch.float32))
        if scale:
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
        return penalty_of(self._penalized())

    def _penalized(self) -> list[tuple[torch.Tensor, str]]:
        """The active adapters' rotations, with their block kinds (:func:`qgoft_kernels.orthogonality_penalty`)."""
        return [(self.qgoft_rotation[a], self.qgoft_block[a]) for a in self.active_adapters if a in self.qgoft_rotation]

    def _rotate(self, x: torch.Tensor, adapter: str, transpose: bool = False, dropout: bool = False) -> torch.Tensor:
        check_features(x, self.in_features)
        scale = self.qgoft_scale[adapter] if adapter in self.qgoft_scale else None
        params = self.qgoft_rotation[adapter]
        p = self.qgoft_module_dropout.get(adapter, 0.0)
        if dropout and p > 0:
            params = _drop_blocks(params, self.qgoft_block[adapter], p)
        return givens_rotate(x, params, block=self.qgoft_block[adapter],
                             structure=self.qgoft_structure[adapter], scale=scale, transpose=transpose)


    def _check_forward_args(self, x: torch.Tensor, adapter_names) -> None:
        """PEFT's rule for ``adapter_names`` at a layer: one name per sample, no merged adapter."""
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(adapter_names)} and {len(x)} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")

    def _mixed_rotate(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
        """Each sample of ``x`` rotated by its named adapter (``"__base__"``, or an adapter this
        layer lacks: unchanged): one launch per block kind among the adapters named."""
        check_features(x, self.in_features)
        adapters = {n: (self.qgoft_rotation[n], self.qgoft_scale[n] if n in self.qgoft_scale else None,
                        self.qgoft_block[n], self.qgoft_structure[n]) for n in self.qgoft_rotation}
        return rotate_by_names(self, x, adapter_names, adapters)


def _drop_blocks(params: torch.Tensor, block: str, p: float) -> torch.Tensor:
    """``params`` with each block replaced by the identity with probability ``p`` (OFT's
    multiplicative dropout): a zero angle, or the 2x2 identity."""
    keep = torch.rand(params.shape[0], device=params.device) >= p
    if block == "givens":
        return params * keep.to(params.dtype)
    eye = torch.eye(2, device=params.device, dtype=params.dtype)
    return torch.where(keep[:, None, None], params, eye)


class Linear(nn.Module, QGOFTLayer):
    """A linear layer adapted by qGOFT: ``base_layer(x @ R_1 @ R_2 ...)`` over the active adapters.

    ``base_layer`` is an ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes
    ``Linear8bitLt``/``Linear4bit`` (``qgoft_kernels.bases``).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QGOFTConfig, **kwargs) -> None:
        super().__init__()
        QGOFTLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        self._check_forward_args(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
        elif adapter_names is not None:
            x = self._mixed_rotate(x, adapter_names)
        elif not self.merged:
            for adapter in self.active_adapters:
                if adapter in self._available_adapters:
                    x = self._rotate(x, adapter, dropout=self.training)
        return self.base_layer(x, *args, **kwargs)

    def _forward_order(self, adapters) -> list[str]:
        """``adapters`` in the order :meth:`forward` applies them: the active adapters' order,
        then the others in the order they were added."""
        active = [a for a in self.active_adapters if a in self._available_adapters]
        order = {a: i for i, a in enumerate(active + [a for a in self.qgoft_rotation if a not in active])}
        return sorted(adapters, key=lambda a: order.get(a, len(order)))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """``W <- W R_n^T ... R_1^T`` for the merged adapters ``1 .. n`` in the order the forward
        applies them (:meth:`_forward_order`), so that the merged layer equals the forward with
        them active, however the merges were split into calls.

        The forward applies ``R_1`` first, so ``W R_1^T`` is the outermost factor: adapters
        that the forward applies before every adapter merged already are rotated into the
        stored ``W``; one it applies later belongs next to the unmerged ``W``, so the merged
        adapters are undone first (:meth:`unmerge`, which refuses an ill-conditioned ``R``;
        then this refuses too, and nothing changes) and all are merged again in order.

        ``W`` is read as ``[out, in]`` whatever the base's layout (``Conv1D`` stores ``W^T``). A
        bitsandbytes base is dequantised, all adapters are merged in its dequantised dtype, and the
        result is quantised once: the merged layer then differs from the adapted one by about one
        quantisation step of ``W R^T`` (docs/ecosystem.md), and :meth:`unmerge` refuses.
        """
        new = [a for a in check_adapters_to_merge(self, adapter_names) if a in self._available_adapters]
        if not new:
            return
        merged = list(reversed(self.merged_adapters))  # the forward's order when they were merged
        order = self._forward_order(merged + new)
        if order[len(new):] != merged:
            try:
                self.unmerge()
            except ValueError as error:
                raise ValueError(f"cannot merge {new} into a layer with {merged} merged: the forward applies "
                                 f"them in the order {order}, so the merged adapters must be undone first, and "
                                 f"that was refused: {error}") from error
            new = order
        base = self.get_base_layer()
        weight = bases.dense_weight(base)
        applied = list(reversed(self._forward_order(new)))
        for adapter in applied:
            weight = self._rotate(weight, adapter, transpose=True)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        bases.set_dense_weight(base, weight)
        # in the order they were rotated into W: unmerge undoes them from the last
        self.merged_adapters.extend(applied)

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
        if bases.kind(base) in bases.QUANTIZED:
            raise ValueError(f"cannot unmerge the adapters {self.merged_adapters} from a {type(base).__name__}: its "
                             f"merged weight was quantised again, and undoing the merge would round it a third "
                             f"time; the layer stays merged (reload the quantised base model to undo the merge)")
        w = bases.dense_weight(base)
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
        bases.set_dense_weight(base, restored)
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
            if bases.kind(module) is None or len(names) < 2:
                continue
            if peft_config.target_modules == "all-linear" or any(self._check_target_module_exists(peft_config, n)
                                                                 for n in names):
                raise ValueError(f"{type(module).__name__} module used at several places {names}: qGOFT through "
                                 f"PEFT adapts a "
                                 f"module at one place only; exclude it (exclude_modules) or use qk.inject, "
                                 f"which adapts every place")

    def _create_and_replace(self, config: QGOFTConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key=None, **kwargs) -> None:
        key = current_key if current_key is not None else target_name
        options = {"block": config.block_pattern.get(get_pattern_key(config.block_pattern.keys(), key), config.block),
                   "scale": config.scale_pattern.get(get_pattern_key(config.scale_pattern.keys(), key), config.scale)}
        if isinstance(target, QGOFTLayer):
            target.update_layer(adapter_name, config, **options)
            return
        if bases.kind(target) is None:
            raise ValueError(f"Target module {target_name} ({type(target).__name__}) is not supported: qGOFT "
                             f"adapts torch.nn.Linear, transformers Conv1D and bitsandbytes Linear8bitLt/Linear4bit.")
        new_module = Linear(target, adapter_name, config, **options)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """``adapter_names=[...]`` (one name per sample, ``"__base__"`` for none) reaches every
        qGOFT layer of the forward or ``generate`` call, as PEFT does it for LoRA: refused in
        training mode, for unknown names and with merged adapters; repeated per beam for beam
        search, except in an encoder."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (str; '__base__' for none), one per "
                            f"sample, got {adapter_names!r}")
        layers = [m for m in self.modules() if isinstance(m, QGOFTLayer)]
        known = set().union(*(m.qgoft_rotation.keys() for m in layers))
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        if any(m.merged for m in layers):
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        original = list(adapter_names)
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:
            adapter_names = [n for n in original for _ in range(beams)]
        # the qGOFT layers, and PEFT's wrappers of modules_to_save, which mix their own copies
        takers = (QGOFTLayer, AuxiliaryTrainingWrapper)
        handles = [m.register_forward_pre_hook(partial(_pass_adapter_names, adapter_names=list(adapter_names)),
                                               with_kwargs=True) for m in self.modules() if isinstance(m, takers)]
        encoder = _encoder(self.model)
        if len(adapter_names) != len(original) and encoder is not None:
            # the encoder runs once per sample, not once per beam
            handles += [m.register_forward_pre_hook(partial(_pass_adapter_names, adapter_names=original),
                                                    with_kwargs=True)
                        for m in encoder.modules() if isinstance(m, takers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _pass_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _encoder(model: nn.Module):
    """The encoder of an encoder-decoder model, else ``None``."""
    get = getattr(model, "get_encoder", None)
    if get is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    return get()


def _register() -> None:
    # "QGOFT", and the sentence earlier builds saved: both are read as this method
    for name in (QGOFT, OLD_SAVED_TYPE):
        PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(name, QGOFTConfig)
        PEFT_TYPE_TO_TUNER_MAPPING.setdefault(name, QGOFTModel)
        PEFT_TYPE_TO_PREFIX_MAPPING.setdefault(name, PREFIX)


_register()

__all__ = ["QGOFTConfig", "QGOFTModel", "QGOFTLayer", "Linear", "QGOFT", "REQUIRES", "UNMERGE_RTOL"]

"""``GivensLinear``: a frozen ``nn.Linear`` adapted by a Givens rotation of its inputs."""
from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import bases
from ._version import ADAPTER_FORMAT, PACKAGE, __version__
from .checks import check_features, check_options, rotation_shape
from .function import givens_linear, givens_rotate, rotate_by_names
from .mixed import BASE
from .select import excluded, layer_selected, matches, pattern_value, under

#: The name of a layer's own adapter (its ``rotation`` and ``scale``) among named adapters
DEFAULT = "default"


class _NamedAdapters(nn.Module):
    """Frozen adapters loaded by name beside a layer's own, for mixed batches: buffers that move
    with the layer (``.to``) and stay out of its ``state_dict``."""

    def __init__(self):
        super().__init__()
        self.options: dict[str, tuple[str, str, int]] = {}   # name -> (block, structure, slot)

    def add(self, name: str, rotation: torch.Tensor, scale: torch.Tensor | None, block: str, structure: str):
        slot = self.options[name][2] if name in self.options else len(self.options)
        self.register_buffer(f"rotation_{slot}", rotation, persistent=False)
        self.register_buffer(f"scale_{slot}", scale, persistent=False)
        self.options[name] = (block, structure, slot)

    def table(self) -> dict:
        """``{name: (rotation, scale or None, block, structure)}``."""
        return {name: (getattr(self, f"rotation_{slot}"), getattr(self, f"scale_{slot}"), block, structure)
                for name, (block, structure, slot) in self.options.items()}

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.options)}"


class _RotationAdapter(nn.Module):
    """What every adapted layer of this package shares: ``rotation`` (and ``scale``) on the
    input's ``in_features``, the rotation itself, the identity reset and the penalty, and the
    adapters loaded by name for mixed batches (:func:`use_adapters`)."""

    #: the adapter of each sample while :func:`use_adapters` serves a mixed batch
    _serving = None

    def _add_adapter(self, device, scale: bool) -> None:
        shape = rotation_shape(self.in_features, self.block, self.structure)
        self.rotation = nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32))
        if scale:
            self.scale = nn.Parameter(torch.empty(self.in_features, device=device, dtype=torch.float32))
        else:
            self.register_parameter("scale", None)
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """Back to the identity: zero angles or identity blocks, unit scale."""
        reset_identity(self.rotation, self.scale, self.block)

    def rotate(self, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """``x @ R`` (or ``x @ R^T``) with this layer's rotation."""
        check_features(x, self.in_features)
        return givens_rotate(x, self.rotation, block=self.block, structure=self.structure,
                             scale=self.scale, transpose=transpose)

    def orthogonality_penalty(self) -> torch.Tensor:
        """``sum_p <alpha_p, beta_p>^2`` over the quasi blocks' columns; 0 for strict rotations."""
        return penalty_of(self._penalized())

    def add_named_adapter(self, name: str, rotation: torch.Tensor, scale: torch.Tensor | None = None, *,
                          block: str | None = None, structure: str | None = None) -> None:
        """Keep a frozen copy of another adapter of this layer under ``name``, for mixed batches
        (:func:`use_adapters`); its options default to the layer's own. ``"default"`` is the
        layer's own adapter and ``"__base__"`` means none: neither can be taken."""
        if not isinstance(name, str) or name in (DEFAULT, BASE) or not name:
            raise ValueError(f"an adapter name must be a non-empty str other than {DEFAULT!r} and {BASE!r}, "
                             f"got {name!r}")
        block = self.block if block is None else block
        structure = self.structure if structure is None else structure
        shape = rotation_shape(self.in_features, block, structure)
        if tuple(rotation.shape) != shape or (scale is not None and tuple(scale.shape) != (self.in_features,)):
            raise ValueError(f"adapter {name!r} for this layer (in_features={self.in_features}, block={block!r}) "
                             f"needs a rotation of shape {shape} and a scale of shape ({self.in_features},) or "
                             f"None, got {tuple(rotation.shape)} and {None if scale is None else tuple(scale.shape)}")
        if "named_adapters" not in self._modules:
            self.named_adapters = _NamedAdapters()
        device = self.rotation.device
        self.named_adapters.add(name, rotation.detach().to(device, torch.float32, copy=True),
                                None if scale is None else scale.detach().to(device, torch.float32, copy=True),
                                block, structure)

    def adapters(self) -> dict:
        """Every adapter of this layer by name, the own one as ``"default"``:
        ``{name: (rotation, scale or None, block, structure)}``."""
        own = {DEFAULT: (self.rotation, self.scale, self.block, self.structure)}
        named = self._modules.get("named_adapters")
        return own if named is None else {**own, **named.table()}

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The rotated input: by the own adapter, or per sample while serving a mixed batch."""
        check_features(x, self.in_features)
        names = self._serving
        if names is None:
            return self.rotate(x)
        if x.dim() < 2 or len(x) != len(names):
            raise ValueError(f"qk.use_adapters got {len(names)} adapter names, one per sample, but this layer's "
                             f"input has {len(x) if x.dim() >= 2 else 'no'} samples ({tuple(x.shape)})")
        return rotate_by_names(self, x, names, self.adapters())

    def _penalized(self) -> list[tuple[torch.Tensor, str]]:
        """The rotations that :func:`orthogonality_penalty` sums over, with their block kinds."""
        return [(self.rotation, self.block)]


class GivensLinear(_RotationAdapter):
    """``y = F.linear(x @ R, W, b)`` with ``W``, ``b`` frozen and only ``R`` trained.

    ``R`` is the product of ``ceil(log2 in_features)`` stages of disjoint 2x2 blocks
    (docs/method.md §1): strict rotations (``block="givens"``, ``in_features - 1`` angles) or free
    blocks (``block="quasi"``, ``4 (in_features - 1)`` entries), optionally followed by a
    trained diagonal ``scale``. It starts at the identity, so a fresh module computes exactly
    the frozen layer; :meth:`merged_linear` folds ``R`` into the weight for inference.

    Args mirror ``nn.Linear``; the rotation parameters are float32 whatever ``dtype`` is.

    Example::

        layer = GivensLinear.from_linear(model.fc, block="quasi")
        loss = task_loss + 1e-3 * layer.orthogonality_penalty()
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block: str = "quasi",
                 structure: str = "tree", scale: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._configure(in_features, out_features, block, structure)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        # the frozen base starts as nn.Linear would
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self._add_adapter(self.weight.device, scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block: str = "quasi", structure: str = "tree",
                    scale: bool = False) -> "GivensLinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(linear.in_features, linear.out_features, block, structure)
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._add_adapter(self.weight.device, scale)
        return self

    def _configure(self, in_features, out_features, block, structure) -> None:
        check_options(block, structure)
        if in_features < 1 or out_features < 0:
            raise ValueError(f"need in_features >= 1 and out_features >= 0, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.block, self.structure = block, structure

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._serving is not None:
            return F.linear(self._input(x), self.weight, self.bias)
        check_features(x, self.in_features)
        return givens_linear(x, self.weight, self.bias, self.rotation, block=self.block, structure=self.structure,
                             scale=self.scale)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``W R^T`` (same bias, dtype, device): zero overhead.

        The rotation is applied to the rows of ``W`` by the same kernel (``transpose=True``),
        computed in float32 and rounded once; no ``d x d`` matrix is formed.
        """
        # the rotation's output (a new tensor) becomes the weight as it is, with nothing
        # initialised first; as frozen as the weights it replaces
        weight = nn.Parameter(self.rotate(self.weight, transpose=True), self.weight.requires_grad)
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone(), self.bias.requires_grad)
        return _linear(weight, bias)

    def merged(self, dequantize: bool = False) -> nn.Linear:
        """:meth:`merged_linear` (the name every adapted layer shares with :class:`GivensWrapper`)."""
        return self.merged_linear()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block={self.block!r}, structure={self.structure!r}, "
                f"scale={self.scale is not None}")


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding these parameters, built without running its initialisation."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.out_features, linear.in_features = weight.shape
    linear.weight = weight
    linear.register_parameter("bias", bias)
    return linear


class GivensWrapper(_RotationAdapter):
    """``base_layer(x @ R)``: the adapter on a base layer other than ``nn.Linear``.

    ``R`` acts on the input, so it composes with any layer; this class holds the frozen
    ``base_layer`` unchanged (shared, not copied) and the same ``rotation``/``scale`` as
    :class:`GivensLinear`. :func:`inject` uses it for transformers' ``Conv1D`` (GPT-2) and
    bitsandbytes' ``Linear8bitLt``/``Linear4bit`` (``qgoft_kernels.bases``), and
    :class:`GivensLinear` for ``nn.Linear``.

    Example::

        layer = GivensWrapper(gpt2.transformer.h[0].attn.c_attn, block="quasi")
    """

    def __init__(self, base_layer: nn.Module, *, block: str = "quasi", structure: str = "tree", scale: bool = False):
        super().__init__()
        if bases.kind(base_layer) is None:
            raise TypeError(f"base_layer must be one of the supported kinds ({', '.join(bases.KINDS)}), "
                            f"got {type(base_layer).__name__}")
        check_options(block, structure)
        self.in_features, self.out_features = bases.features(base_layer)
        self.block, self.structure = block, structure
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self._add_adapter(next((t.device for t in base_layer.parameters()), None), scale)

    @property
    def kind(self) -> str:
        """The base layer's kind: ``"conv1d"``, ``"bnb-8bit"``, ``"bnb-4bit"`` (or ``"linear"``)."""
        return bases.kind(self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self._input(x))

    @torch.no_grad()
    def merged(self, dequantize: bool = False) -> nn.Module:
        """A base layer of the same kind whose weight is ``W R^T``: zero overhead.

        ``Conv1D`` gets ``R W`` in its ``[in, out]`` layout, exactly. A bitsandbytes base is
        dequantised, merged in float32 and quantised again, which rounds ``W R^T`` to the
        8-bit (per-row absmax) or 4-bit (per-block) grid once more: the merged layer differs
        from the adapted one by about one quantisation step (docs/ecosystem.md gives measured
        numbers). ``dequantize=True`` returns a plain ``nn.Linear`` in the dequantised dtype
        instead, with no second rounding. ``base_layer`` itself is left unchanged.
        """
        w = self.rotate(bases.dense_weight(self.base_layer), transpose=True)
        if dequantize and self.kind in bases.QUANTIZED:
            bias = self.base_layer.bias
            if bias is not None:
                bias = nn.Parameter(bias.detach().to(w.dtype, copy=True), requires_grad=False)
            return _linear(nn.Parameter(w, requires_grad=False), bias)
        return bases.merged_copy(self.base_layer, w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind!r}, "
                f"block={self.block!r}, structure={self.structure!r}, scale={self.scale is not None}")


#: Every module type that carries a qGOFT adapter of this package (PEFT's layers aside).
ADAPTED = (GivensLinear, GivensWrapper)


def adapt(module: nn.Module, *, block: str = "quasi", structure: str = "tree", scale: bool = False) -> nn.Module:
    """The adapted version of a supported base layer: :class:`GivensLinear` for ``nn.Linear``,
    :class:`GivensWrapper` for the other kinds of ``qgoft_kernels.bases``."""
    if bases.kind(module) == "linear":
        return GivensLinear.from_linear(module, block=block, structure=structure, scale=scale)
    return GivensWrapper(module, block=block, structure=structure, scale=scale)


@torch.no_grad()
def reset_identity(rotation: torch.Tensor, scale: torch.Tensor | None, block: str) -> None:
    """Set ``rotation`` (and ``scale``) in place to the identity: zero angles or identity blocks, unit scale."""
    if block == "givens":
        rotation.zero_()
    else:
        rotation.copy_(torch.eye(2).expand_as(rotation))
    if scale is not None:
        scale.fill_(1.0)


def _full(rotation: torch.Tensor) -> torch.Tensor:
    """A DTensor rotation (FSDP2 shards parameters outside the forward) whole, on every rank:
    the gradient reaches each rank's shard through the all-gather's backward."""
    return rotation.full_tensor() if hasattr(rotation, "full_tensor") else rotation


def _quasi_penalty(rotations: list[torch.Tensor]) -> torch.Tensor:
    """``sum_p <alpha_p, beta_p>^2`` over the blocks ``[n, 2, 2]`` of ``rotations`` (of one
    device and dtype), all in one set of ops: the columns' inner product of each block is
    ``sum_i B[i, 0] B[i, 1]``."""
    r = rotations[0] if len(rotations) == 1 else torch.cat(rotations)
    inner = (r[:, :, 0] * r[:, :, 1]).sum(-1)
    return (inner * inner).sum()


def penalty_of(pairs: list[tuple[torch.Tensor, str]]) -> torch.Tensor:
    """The soft-orthogonality penalty of ``(rotation, block)`` pairs: ``sum_p <alpha_p,
    beta_p>^2`` over the columns of every quasi block, the quasi rotations concatenated and
    penalized at once per device and dtype; strict rotations add nothing. Without quasi
    rotations, a zero of the first rotation's dtype and device (a plain zero also for a DTensor
    rotation, so that it adds to any loss), or a float32 zero without any."""
    if not pairs:
        return torch.zeros(())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for rotation, block in pairs:
        if block not in ("quasi", "givens"):
            raise ValueError(f"penalty_of: block must be 'quasi' or 'givens', got {block!r}")
        if block == "quasi":
            rotation = _full(rotation)
            if rotation.dim() != 3 or tuple(rotation.shape[1:]) != (2, 2):
                raise ValueError(f"penalty_of: a quasi rotation holds 2 x 2 blocks, shape [P, 2, 2]; got shape "
                                 f"{tuple(rotation.shape)}")
            groups.setdefault((rotation.device, rotation.dtype), []).append(rotation)
    if not groups:
        return torch.zeros((), dtype=pairs[0][0].dtype, device=pairs[0][0].device)
    terms = [_quasi_penalty(rotations) for rotations in groups.values()]
    return terms[0] if len(terms) == 1 else torch.stack([t.to(terms[0].device) for t in terms]).sum()


def check_model(model, name: str = "model") -> None:
    """A ``TypeError`` naming ``name`` unless ``model`` is an ``nn.Module`` (a list of layers or a
    dict fails later with an ``AttributeError`` that says nothing of the argument)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (the model or a layer), got {type(model).__name__}")


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """The qGOFT penalty summed over every adapted layer of ``model`` (``GivensLinear``,
    ``GivensWrapper``, and the active adapters of every qGOFT layer of a PEFT model).

    Add ``lam * orthogonality_penalty(model)`` to the loss; the paper uses ``lam`` in
    ``[1e-3, 5e-2]``. A model without such layers gives a float32 zero. The quasi blocks of
    all layers are concatenated and penalized at once (per device and dtype, :func:`penalty_of`):
    a handful of ops for the whole model, where a few ops per layer would cost a model of a
    hundred adapted layers milliseconds per step on a CPU, and as many kernel launches on a GPU.
    """
    check_model(model)
    # PEFT's layers exist only once qgoft_kernels.peft is imported; no need to import it here
    peft_layer = getattr(sys.modules.get("qgoft_kernels.peft"), "QGOFTLayer", ())
    return penalty_of([pair for m in model.modules() if isinstance(m, (*ADAPTED, peft_layer))
                       for pair in m._penalized()])


def inject(model: nn.Module, target_modules, *, block: str = "quasi", structure: str = "tree",
           scale: bool = False, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
           block_pattern: dict | None = None, scale_pattern: dict | None = None,
           modules_to_save: list[str] | None = None) -> nn.Module:
    """Adapt the matching layers of ``model`` and freeze the rest.

    ``nn.Linear`` layers become :class:`GivensLinear` (sharing their weights, no copy);
    transformers' ``Conv1D`` and bitsandbytes' 8-bit and 4-bit linears are wrapped in
    :class:`GivensWrapper`. The selection follows PEFT (``qgoft_kernels.select``):

    - ``target_modules``: a list of names (a module matches when its full name is one of them
      or ends with ``"." + name``), a regular expression matched against the full name, or
      ``"all-linear"`` (every layer of a supported kind).
    - ``exclude_modules``: names or a regular expression never to adapt.
    - ``layers_to_transform`` (an int or a list) and ``layers_pattern`` (``"layers"``, ``"h"``...):
      only those layer numbers, as in PEFT (ignored for a regular expression).
    - ``block_pattern`` / ``scale_pattern``: per-module options, ``{pattern: value}`` like
      LoRA's ``rank_pattern``; the first key matching a module's name (fully or as its end)
      overrides ``block`` / ``scale`` for it.
    - ``modules_to_save``: modules (a task head, say) left trainable in full; their parameters
      are in :func:`trainable_parameters` and in the adapter file.

    A module used at several places matches when any of its names does, and one adapted
    module replaces it at every place. Afterwards only the adapters' rotations (and scales) and
    the ``modules_to_save`` require grad. Returns ``model``, changed in place.

    Example::

        qk.inject(bert, ["query", "value"], block="quasi", modules_to_save=["classifier"])
        opt = torch.optim.AdamW(qk.trainable_parameters(bert), lr=1e-3)
    """
    if target_modules is None:
        raise ValueError("target_modules must be a list of names, a regular expression or 'all-linear'")
    check_options(block, structure)
    for name, pattern_map, check in (("block_pattern", block_pattern, lambda v: check_options(v, structure)),
                                     ("scale_pattern", scale_pattern, None)):
        if pattern_map is not None and not isinstance(pattern_map, dict):
            raise TypeError(f"{name} must be a dict {{pattern: value}}, got {type(pattern_map).__name__}")
        for key, value in (pattern_map or {}).items():
            if check is not None:
                check(value)
            elif type(value) is not bool:
                raise TypeError(f"scale_pattern[{key!r}] must be True or False, got {value!r}")
    saved = _modules_to_save(model, modules_to_save)

    def wanted(name: str) -> bool:
        return bool(name) and matches(name, target_modules) and not excluded(name, exclude_modules) \
            and not under(name, modules_to_save) \
            and layer_selected(name, target_modules, layers_to_transform, layers_pattern)

    found = [(m, names) for m, names in module_uses(model) if any(wanted(n) for n in names)]
    if not found:
        narrowed = exclude_modules or layers_to_transform is not None or modules_to_save
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}"
                         f"{' (after exclude_modules, layers_to_transform, modules_to_save)' if narrowed else ''}"
                         f"{_root_hint(model)}")
    for module, names in found:
        if isinstance(module, ADAPTED):
            raise ValueError(f"module {names[0]!r} is already a {type(module).__name__} (adapted)")
        if bases.kind(module) is None and target_modules != "all-linear":
            raise TypeError(f"module {names[0]!r} matches target_modules but is a {type(module).__name__}, "
                            f"not a supported base layer ({', '.join(bases.KINDS)})")
    targets = [(m, names) for m, names in found if bases.kind(m) is not None]
    if not targets:
        raise ValueError(f"no nn.Linear or other supported layer ({', '.join(bases.KINDS)}) of the model matches "
                         f"target_modules={target_modules!r}: nothing to adapt{_root_hint(model)}")
    replacements = []
    for m, names in targets:
        options = {"block": pattern_value(names[0], block_pattern, block),
                   "scale": pattern_value(names[0], scale_pattern, scale)}
        replacements.append((names, adapt(m, structure=structure, **options)))
    for module in saved:
        module._qgoft_save = True
    replace_modules(model, replacements)
    record_on_config(model)
    return model


def _modules_to_save(model: nn.Module, names) -> list[nn.Module]:
    if names is None:
        return []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"modules_to_save must be a list of module names, got {names!r}")
    uses = module_uses(model)
    found = [m for m, places in uses if any(p and matches(p, names) for p in places)]
    missing = [n for n in names if not any(p and matches(p, [n]) for _, places in uses for p in places)]
    if missing:
        raise ValueError(f"modules_to_save {missing} name no module of the model")
    return found


def merge(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Replace every adapted layer in ``model`` by its merged base layer (``W R^T``).

    Zero overhead at inference; the rotations are gone afterwards, and the merged weights
    are as frozen as the ones they replace. An adapted layer used at several places is
    replaced by one merged layer at every place. A bitsandbytes base is quantised again
    (``GivensWrapper.merged``), or becomes a plain ``nn.Linear`` with ``dequantize=True``.
    Returns ``model``, changed in place (a bare adapted layer is returned merged).
    """
    if isinstance(model, ADAPTED):
        return model.merged(dequantize=dequantize)
    for module, names in module_uses(model):
        if isinstance(module, ADAPTED):
            merged = module.merged(dequantize=dequantize)
            for name in names:
                _set_module(model, name, merged)
        if getattr(module, "_qgoft_save", False):
            del module._qgoft_save
    record_on_config(model)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters :func:`use_adapters` can name in ``model``, sorted: ``"default"`` (the layers'
    own) and every adapter loaded by name (``qk.load_adapter(..., adapter_name=...)``). An
    index given to :func:`use_adapters` counts in this list."""
    return sorted({name for m in model.modules() if isinstance(m, ADAPTED) for name in m.adapters()})


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapters):
    """Within the block, every forward of ``model`` runs each sample with its own adapter.

    ``adapters`` has one entry per sample (the first dimension of every adapted layer's
    input): adapter names (``"__base__"``: the base model; ``"default"``: the layers' own
    adapter; others loaded with ``qk.load_adapter(model, path, adapter_name=...)``), or an
    integer tensor of positions in :func:`adapter_names` (``-1``: the base model). A layer
    without a sample's adapter leaves that sample alone. Each adapted layer runs one launch
    per block kind its adapters use. For inference: the model must be in ``eval()`` mode.

    Example::

        qk.load_adapter(model, "fr.safetensors", adapter_name="fr")
        qk.load_adapter(model, "de.safetensors", adapter_name="de")
        with torch.no_grad(), qk.use_adapters(model, ["fr", "__base__", "de"]):
            logits = model(input_ids)          # input_ids: [3, seq]
    """
    layers = [m for m in model.modules() if isinstance(m, ADAPTED)]
    if not layers:
        raise ValueError("use_adapters: the model has no qGOFT layers (inject them or load an adapter first; a "
                         "merged model has none)")
    known = adapter_names(model)
    if isinstance(adapters, torch.Tensor):
        if adapters.is_floating_point() or adapters.is_complex() or adapters.dtype == torch.bool or adapters.dim() != 1:
            raise TypeError(f"use_adapters: an index must be a 1-D integer tensor (positions in "
                            f"qk.adapter_names(model), -1 for the base model), got {adapters.dtype} of shape "
                            f"{tuple(adapters.shape)}")
        positions = adapters.tolist()
        bad = [i for i in positions if not -1 <= i < len(known)]
        if bad:
            raise ValueError(f"use_adapters: index {bad[0]} is out of range: -1 (the base model) or a position in "
                             f"qk.adapter_names(model) = {known}")
        names = [known[i] if i >= 0 else BASE for i in positions]
    elif isinstance(adapters, (list, tuple)) and all(isinstance(n, str) for n in adapters):
        names = list(adapters)
        unknown = sorted({n for n in names if n != BASE} - set(known))
        if unknown:
            raise ValueError(f"use_adapters: no adapter named {', '.join(map(repr, unknown))} in the model; it has "
                             f"{known} ('__base__' for none)")
    else:
        raise TypeError(f"use_adapters: adapters must be a list of adapter names or an integer tensor, one per "
                        f"sample, got {type(adapters).__name__}")
    if model.training:
        raise ValueError("use_adapters: the model is in training mode; a mixed batch is for inference (call "
                         "model.eval() first)")
    saved = [m._serving for m in layers]
    for m in layers:
        m._serving = names
    try:
        yield model
    finally:
        for m, before in zip(layers, saved):
            m._serving = before


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What to optimize: the rotations and scales of every adapted layer in ``model``, then the
    parameters of its ``modules_to_save`` (see :func:`inject`)."""
    adapters = [p for m in model.modules() if isinstance(m, ADAPTED) for p in (m.rotation, m.scale) if p is not None]
    extra = [p for m in saved_modules(model).values() for p in m.parameters()]
    return adapters + [p for p in dict.fromkeys(extra) if all(p is not q for q in adapters)]


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes' 4-bit weights pack two values per byte of their storage dtype (as PEFT counts them)
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
    return p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, all)``: the numbers of parameters in :func:`trainable_parameters` and in the
    whole model (each tensor once; 4-bit weights as their unpacked count), as PEFT's
    ``get_nb_trainable_parameters`` gives them."""
    trainable = sum(_numel(p) for p in trainable_parameters(model))
    return trainable, sum(_numel(p) for p in model.parameters())


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the line PEFT's ``print_trainable_parameters`` prints, for a model adapted by :func:`inject`:
    ``trainable params: 36,864 || all params: 109,518,848 || trainable%: 0.0337``."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def saved_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The ``modules_to_save`` of ``model`` (see :func:`inject`) by their first name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "_qgoft_save", False)}


def adapter_options(m: nn.Module) -> dict:
    """The options an adapted layer is rebuilt from (what adapter files record per module)."""
    return {"in_features": m.in_features, "out_features": m.out_features, "block": m.block,
            "structure": m.structure, "scale": m.scale is not None}


#: The attribute of a transformers config where :func:`inject` describes the adapters.
CONFIG_KEY = "qgoft_adapter"


def record_on_config(model: nn.Module) -> None:
    """Describe ``model``'s adapters in ``model.config.qgoft_adapter`` (a transformers model; any
    other model is left alone), or remove the entry when there are none, so that the
    ``config.json`` of a checkpoint says what it holds and what loads it
    (``qgoft_kernels.hf.from_pretrained``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    modules = {name: adapter_options(m) for name, m in model.named_modules() if isinstance(m, ADAPTED)}
    if not modules:
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        return
    setattr(config, CONFIG_KEY, {"package": PACKAGE, "version": __version__, "format": ADAPTER_FORMAT,
                                 "load_with": "qgoft_kernels.hf.from_pretrained(ModelClass, path)",
                                 "modules": modules, "modules_to_save": sorted(saved_modules(model))})
def module_uses(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every module of ``model`` once, with all the names it is used under.

    ``named_modules()`` lists a module used at several places under its first name only, so
    a replacement made by name would miss the other places.
    """
    uses: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names = uses.setdefault(id(m), (m, []))[1]
        if name not in names:
            names.append(name)
    return list(uses.values())


def replace_modules(model: nn.Module, replacements) -> None:
    """Put each new module at all of its ``names`` and freeze the rest, as :func:`inject` does.

    ``replacements`` is a list of ``(names, new_module)``. Afterwards only the rotations and
    scales of the model's adapted layers, the earlier ones included, and its ``modules_to_save``
    require grad.
    """
    model.requires_grad_(False)
    for names, new in replacements:
        for name in names:
            _set_module(model, name, new)
    for p in trainable_parameters(model):
        p.requires_grad_(True)


def _root_hint(model: nn.Module) -> str:
    if type(model) is nn.Linear:
        return "; the model itself is an nn.Linear, which cannot be replaced in place: use GivensLinear.from_linear"
    return ""


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("the model itself cannot be replaced in place")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

"""``GivensLinear``: a frozen ``nn.Linear`` adapted by a Givens rotation of its inputs."""
from __future__ import annotations

import math
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_features, check_options, rotation_shape
from .function import givens_rotate


class GivensLinear(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.rotate(x), self.weight, self.bias)

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

    def orthogonality_penalty(self) -> torch.Tensor:
        """``sum_p <alpha_p, beta_p>^2`` over the quasi blocks' columns; 0 for strict rotations."""
        return block_penalty(self.rotation, self.block)

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


@torch.no_grad()
def reset_identity(rotation: torch.Tensor, scale: torch.Tensor | None, block: str) -> None:
    """Set ``rotation`` (and ``scale``) in place to the identity: zero angles or identity blocks, unit scale."""
    if block == "givens":
        rotation.zero_()
    else:
        rotation.copy_(torch.eye(2).expand_as(rotation))
    if scale is not None:
        scale.fill_(1.0)


def block_penalty(rotation: torch.Tensor, block: str) -> torch.Tensor:
    """The soft-orthogonality penalty of one rotation: ``sum_p <alpha_p, beta_p>^2`` over the
    columns of its quasi blocks; 0 for strict rotations."""
    if block == "givens":
        return rotation.new_zeros(())
    inner = rotation[:, 0, 0] * rotation[:, 0, 1] + rotation[:, 1, 0] * rotation[:, 1, 1]
    return (inner * inner).sum()


def orthogonality_penalty(model: nn.Module) -> torch.Tensor:
    """The qGOFT penalty summed over every ``GivensLinear`` of ``model`` (and every qGOFT layer
    of a PEFT model: the active adapters).

    Add ``lam * orthogonality_penalty(model)`` to the loss; the paper uses ``lam`` in
    ``[1e-3, 5e-2]``. A model without such layers gives a float32 zero.
    """
    # PEFT's layers exist only once qgoft_kernels.peft is imported; no need to import it here
    peft_layer = getattr(sys.modules.get("qgoft_kernels.peft"), "QGOFTLayer", ())
    terms = [m.orthogonality_penalty() for m in model.modules() if isinstance(m, (GivensLinear, peft_layer))]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def _matches(name: str, target_modules) -> bool:
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(model: nn.Module, target_modules, *, block: str = "quasi", structure: str = "tree",
           scale: bool = False) -> nn.Module:
    """Replace the matching ``nn.Linear`` modules of ``model`` by ``GivensLinear`` and freeze the rest.

    ``target_modules`` follows PEFT: a list of names (a module matches when its full name is
    one of them or ends with ``"." + name``), a regular expression matched against the full
    name, or ``"all-linear"``. The replaced layers share their weights (no copy). A module
    used at several places matches when any of its names does, and one ``GivensLinear``
    replaces it at every place. Afterwards only the rotations (and scales) of the model's
    ``GivensLinear`` modules require grad. Returns ``model``, changed in place.

    Example::

        qk.inject(bert, ["query", "value"], block="quasi")
        opt = torch.optim.AdamW(qk.trainable_parameters(bert), lr=1e-3)
    """
    if target_modules is None:
        raise ValueError("target_modules must be a list of names, a regular expression or 'all-linear'")
    check_options(block, structure)
    found = [(m, names) for m, names in module_uses(model)
             if any(name and _matches(name, target_modules) for name in names)]
    if not found:
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}{_root_hint(model)}")
    for module, names in found:
        if isinstance(module, GivensLinear):
            raise ValueError(f"module {names[0]!r} is already a GivensLinear")
        if type(module) is not nn.Linear and target_modules != "all-linear":
            raise TypeError(f"module {names[0]!r} matches target_modules but is a {type(module).__name__}, "
                            f"not an nn.Linear")
    targets = [(m, names) for m, names in found if type(m) is nn.Linear]
    if not targets:
        raise ValueError(f"no nn.Linear module of the model matches target_modules={target_modules!r}: "
                         f"nothing to adapt{_root_hint(model)}")
    replace_modules(model, [(names, GivensLinear.from_linear(m, block=block, structure=structure, scale=scale))
                            for m, names in targets])
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every ``GivensLinear`` in ``model`` by its merged ``nn.Linear`` (``W R^T``).

    Zero overhead at inference; the rotations are gone afterwards, and the merged weights
    are as frozen as the ones they replace. A ``GivensLinear`` used at several places is
    replaced by one merged ``nn.Linear`` at every place. Returns ``model``, changed in place
    (a bare ``GivensLinear`` is returned merged).
    """
    if isinstance(model, GivensLinear):
        return model.merged_linear()
    for module, names in module_uses(model):
        if isinstance(module, GivensLinear):
            merged = module.merged_linear()
            for name in names:
                _set_module(model, name, merged)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The rotations and scales of every ``GivensLinear`` in ``model``: what to optimize."""
    return [p for m in model.modules() if isinstance(m, GivensLinear)
            for p in (m.rotation, m.scale) if p is not None]


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
    scales of the model's ``GivensLinear`` modules require grad, the earlier ones included.
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

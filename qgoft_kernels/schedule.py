"""The pair schedule: the one place that knows which indices each stage pairs.

Stages are numbered ``r = 1 .. L`` with ``L = ceil(log2 d)`` and stride ``s = 2**(r-1)``.
``structure="tree"`` (the paper's GOFT/qGOFT) pairs ``(i, i + s)`` for ``i = 2*s*k`` and
``i + s < d``; over all stages that is exactly ``d - 1`` pairs. Pairs are numbered
stage-major (stride 1 first), ``i`` ascending inside a stage, and pair ``p`` owns
parameter ``p``.

Inside a stage the pairs are also addressed by *slots* ``k = 0 .. (2**L >> r) - 1``; the
valid slots are always a prefix ``k < count[r]``, so a kernel needs only the per-stage
parameter offsets (:func:`param_offsets`, which the kernels compute in closed form) to find the parameter of any slot.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

STRUCTURES = ("tree",)


def num_stages(d: int) -> int:
    """Number of stages ``L = ceil(log2 d)`` (0 for ``d = 1``)."""
    _check_d(d)
    return (d - 1).bit_length()


def stage_counts(d: int, structure: str = "tree") -> tuple[int, ...]:
    """Pairs per stage, from a closed form (cheap, and traceable by ``torch.compile``)."""
    _check(d, structure)
    return tuple(_STAGE_COUNT[structure](d, 1 << r) for r in range(num_stages(d)))


def param_offsets(d: int, structure: str = "tree") -> tuple[int, ...]:
    """Index of each stage's first parameter, and the total: ``L + 1`` numbers."""
    out = [0]
    for count in stage_counts(d, structure):
        out.append(out[-1] + count)
    return tuple(out)


def num_pairs(d: int, structure: str = "tree") -> int:
    """Number of 2x2 blocks (parameters of ``block="givens"``) for ``d`` features."""
    return sum(stage_counts(d, structure))


@dataclass(frozen=True)
class Schedule:
    """All pairs of one ``(d, structure)``, stage by stage.

    ``stages[r - 1]`` lists the pairs ``(i, j)`` of stage ``r`` in parameter order and
    ``offsets[r - 1]`` is the index of its first parameter; ``offsets[L] == num_pairs``.
    """

    d: int
    structure: str
    stages: tuple[tuple[tuple[int, int], ...], ...]
    offsets: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_pairs(self) -> int:
        return self.offsets[-1]

    @property
    def padded_dim(self) -> int:
        """``2**L``: the power of two the kernels pad a row to."""
        return 1 << self.num_stages


def _tree_stage(d: int, s: int) -> tuple[tuple[int, int], ...]:
    return tuple((i, i + s) for i in range(0, d - s, 2 * s))


def _tree_count(d: int, s: int) -> int:
    # i = 0, 2s, 4s, ... while i + s < d: ceil((d - s) / 2s) pairs
    return -(-(d - s) // (2 * s))


# a structure is its pairs per stage of stride s, and their count in closed form
_STAGE_PAIRS = {"tree": _tree_stage}
_STAGE_COUNT = {"tree": _tree_count}


def schedule(d: int, structure: str = "tree") -> Schedule:
    """The :class:`Schedule` for ``d`` features, with every pair listed (cached)."""
    _check(d, structure)
    return _schedule(d, structure)


# keyed on checked arguments only: lru_cache would take 2.0 or True for a cached 2 or 1
@functools.lru_cache(maxsize=None)
def _schedule(d: int, structure: str) -> Schedule:
    stages = tuple(_STAGE_PAIRS[structure](d, 1 << r) for r in range(num_stages(d)))
    return Schedule(d, structure, stages, param_offsets(d, structure))


def stage_indices(d: int, structure: str, device) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per stage, the ``(i, j)`` index tensors of its pairs on ``device`` (cached)."""
    return _index_tensors(d, structure, torch.device(device))


@functools.lru_cache(maxsize=None)
def _index_tensors(d: int, structure: str, device: torch.device):
    pairs = []
    for stage in schedule(d, structure).stages:
        ij = torch.tensor(stage, dtype=torch.long).reshape(-1, 2).T.contiguous()
        pairs.append((ij[0].to(device), ij[1].to(device)))
    return tuple(pairs)


def _check_d(d) -> None:
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"d must be an int, got {type(d).__name__}")
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")


def _check(d, structure) -> None:
    _check_d(d)
    if structure not in _STAGE_PAIRS:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")

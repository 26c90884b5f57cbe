"""What Captum's ``neuron_selector`` and ``target`` select, as :func:`select` indices.

Captum's neuron methods sum a block selected by slices to one value per example; its output
methods read ``target`` as one index for every example or one per example. This module turns
both into the indices a :class:`~fiber_plugins.FiberObjective` takes, and provides
:class:`PerExampleTargetObjective` for a target with one entry per reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ...errors import UserTypeError, UserValueError
from ...objectives.base import FiberObjective
from ...objectives.distances import get_distance
from ...objectives.selection import select

__all__ = ["NeuronSelector", "PerExampleTargetObjective", "is_per_example"]

NeuronSelector = int | tuple | slice | Callable[[torch.Tensor], torch.Tensor]


def _has_slice(selector) -> bool:
    return isinstance(selector, tuple) and any(isinstance(s, slice) for s in selector)


def _check_tuple(selector: tuple, what: str) -> None:
    for s in selector:
        if isinstance(s, bool) or not isinstance(s, (int, slice)):
            raise UserTypeError(f"{what} {selector!r} must contain only ints and slices, got {s!r}")


class _SummedNeurons:
    """Captum's neuron index with slices: the selected block is summed to one value per example."""

    def __init__(self, selector: tuple, where: str):
        self.selector = selector
        self.where = where

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        block = select(act, self.selector, self.where)
        return block.reshape(block.shape[0], -1).sum(1)

    def __repr__(self) -> str:
        return repr(self.selector)


def _neuron_index(selector: NeuronSelector, where: str):
    """Captum ``neuron_selector`` -> a :func:`select` index (slices summed, like Captum)."""
    if callable(selector):  # select() checks that it keeps the batch dimension
        return selector
    if isinstance(selector, bool):
        raise UserTypeError(
            f"neuron_selector must be an int, a tuple or a callable, got {selector!r}"
        )
    if isinstance(selector, int):
        return selector
    if isinstance(selector, slice):  # not in Captum's types; read as a one-entry tuple
        selector = (selector,)
    if isinstance(selector, tuple):
        if not selector:
            raise UserValueError("neuron_selector must not be an empty tuple")
        _check_tuple(selector, "neuron_selector")
        return _SummedNeurons(selector, where) if _has_slice(selector) else selector
    raise UserTypeError(
        f"neuron_selector must be an int, a tuple of ints/slices or a callable, "
        f"got {type(selector).__name__}"
    )


def _target_entries(target) -> tuple[Any, list | None]:
    """Captum ``TargetType`` -> (one index for every example, or None; per-example list or None)."""
    if target is None:
        return None, None
    if isinstance(target, bool):
        raise UserTypeError(f"target must be an int, tuple, tensor or list, got {target!r}")
    if isinstance(target, int):
        return target, None
    if isinstance(target, tuple):
        _check_tuple(target, "target")
        return target, None
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise UserTypeError(f"a target tensor must hold integers, got dtype {target.dtype}")
        if target.numel() == 1:
            return int(target.item()), None
        if target.dim() != 1:
            raise UserValueError(
                f"a target tensor must be a scalar or 1-D (one class per example), "
                f"got shape {tuple(target.shape)}"
            )
        entries: list = [int(t) for t in target.tolist()]
    elif isinstance(target, list):
        if not target:
            raise UserValueError("target list must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            entries = list(target)
        elif all(isinstance(t, tuple) for t in target):
            for t in target:
                _check_tuple(t, "target entry")
            entries = list(target)
        else:
            raise UserTypeError(
                f"a target list must hold only ints or only tuples (one per example), got {target!r}"
            )
    else:
        raise UserTypeError(
            f"target must be None, an int, a tuple, a tensor or a list, got {type(target).__name__}"
        )
    if all(e == entries[0] for e in entries):  # the same class for every example: one target
        return entries[0], None
    return None, entries


def is_per_example(target) -> bool:
    """Whether a Captum target has one entry per example (a list, or a tensor of several)."""
    return isinstance(target, list) or (isinstance(target, torch.Tensor) and target.numel() > 1)


class PerExampleTargetObjective(FiberObjective):
    """An output objective with one Captum target per reference (a tensor or list of length R).

    Fiber targets must be the same for a reference and its samples, so the target list is read
    per *reference*: reference r's samples are compared with reference r on ``target[r]`` only.
    phi(x) is the concatenation of all R selections ``output[:, target[r]]`` (shape (B, sum of the
    block sizes)); :meth:`target` keeps reference r's own block in row r and fills the other
    blocks with NaN, and the distance compares only the finite (own) block of each row. Every
    distance works, on the own block alone.

    The mask lives in the target, so this works with the static target y* = phi(x*) (the
    default). A re-approximated target (``target_mode='reapprox'``) recomputes y*_t without the mask and
    is refused with a ValueError; the Captum-style classes then sample each reference separately.
    """

    def __init__(self, subject, entries: list, distance="l2", preprocess=None, name=None):
        self.entries = list(entries)
        self._base_distance = get_distance(distance)
        self._sizes: list[int] | None = None
        super().__init__(
            subject,
            index=self._select_all,
            reduction="none",
            distance=self._masked_distance,
            preprocess=preprocess,
            name=name,
        )
        self.distance_name = (
            distance if isinstance(distance, str) else getattr(distance, "__name__", "custom")
        )

    def _select_all(self, act: torch.Tensor) -> torch.Tensor:
        if isinstance(self.entries[0], int) and act.dim() != 2:
            raise UserValueError(
                f"per-example int targets need a 2-D output (B, K), as in Captum; {self.where} "
                f"has shape {tuple(act.shape)}"
            )
        blocks = [
            select(act, e if isinstance(e, tuple) else (e,), self.where) for e in self.entries
        ]
        blocks = [b.reshape(b.shape[0], -1) for b in blocks]
        self._sizes = [b.shape[1] for b in blocks]
        return torch.cat(blocks, dim=1)

    def target(self, reference: torch.Tensor) -> torch.Tensor:
        """y* of references (B, C, H, W) in [-1, 1]: (B, K), each row keeping only its own
        example's selection (the rest NaN, see :meth:`target_of`); B must equal the number of
        per-example entries."""
        self._check_count(reference.shape[0])
        return super().target(reference)

    def _check_count(self, count: int) -> None:
        if count != len(self.entries):
            raise UserValueError(
                f"target has {len(self.entries)} entries (one per example) but got "
                f"{count} reference image(s)"
            )

    def target_of(self, features: torch.Tensor) -> torch.Tensor:
        """phi(x*) with every entry that is not the reference's own selection set to NaN (the
        mask that the distance reads)."""
        self._check_count(features.shape[0])
        y = features.detach()
        masked = torch.full_like(y, math.nan)
        start = 0
        for r, size in enumerate(self._sizes or []):
            masked[r, start : start + size] = y[r, start : start + size]
            start += size
        return masked

    def _masked_distance(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        own = torch.isfinite(target).expand_as(features)
        counts = own.sum(1)
        width = features.shape[1]
        if len(self.entries) > 1 and bool((counts == width).any()):
            raise UserValueError(
                "a per-example target needs the static target y* = phi(reference) (its mask "
                "says which target belongs to which reference); with target_mode='reapprox' or "
                "explicit targets sample each reference on its own, or use "
                "fiber_plugins.attribution.OutputFiber, which does that for you"
            )
        k = int(counts[0])
        if k == 0 or bool((counts != k).any()):
            raise UserValueError(
                "per-example targets select blocks of different sizes "
                f"({sorted(set(counts.tolist()))}); give targets that select the same shape"
            )
        f_own = features[own].view(features.shape[0], k)
        t_own = target.expand_as(features)[own].view(features.shape[0], k)
        return self._base_distance(f_own, t_own)

    def describe(self) -> dict:
        """JSON-safe description: the base objective's plus the per-example targets."""
        return {**super().describe(), "target": repr(self.entries)}

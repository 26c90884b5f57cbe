"""Reductions (spatial / token) and index selection applied to a captured activation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from ..errors import UserIndexError, UserTypeError, UserValueError

Index = Union[int, slice, Sequence[int], tuple, Callable[[torch.Tensor], torch.Tensor], None]

REDUCTIONS = ("none", "auto", "spatial_mean", "spatial_max", "cls", "token_mean", "token_max")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise UserValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    return reduction


def reduce(act: torch.Tensor, reduction: str, where: str = "activation") -> torch.Tensor:
    """Reduce a (B, ...) activation.

    - ``spatial_mean`` / ``spatial_max``: (B, C, *spatial) -> (B, C)
    - ``cls`` / ``token_mean`` / ``token_max``: (B, N, D) tokens -> (B, D)
    - ``none``: unchanged
    - ``auto``: ``spatial_mean`` for (B, C, H, W) maps, unchanged otherwise
    """
    if reduction == "none":
        return act
    if reduction == "auto":  # spatial mean for conv maps, unchanged otherwise
        return act.flatten(2).mean(2) if act.dim() >= 4 else act
    if reduction.startswith("spatial"):
        if act.dim() < 3:
            raise UserValueError(
                f"reduction {reduction!r} needs a (B, C, H, W) map but {where} has shape "
                f"{tuple(act.shape)}; use reduction='none'"
            )
        flat = act.flatten(2)
        return flat.mean(2) if reduction == "spatial_mean" else flat.amax(2)
    if act.dim() != 3:
        raise UserValueError(
            f"reduction {reduction!r} needs (B, tokens, dim) but {where} has shape "
            f"{tuple(act.shape)}; use 'spatial_mean' for conv maps or 'none'"
        )
    if reduction == "cls":
        return act[:, 0]
    return act.mean(1) if reduction == "token_mean" else act.amax(1)


def select(act: torch.Tensor, index: Index, where: str = "activation") -> torch.Tensor:
    """Select part of a (B, ...) activation; the batch dimension is never indexed.

    - ``int`` / list of ints: channels (dim 1), e.g. ``1656`` or ``[3, 7]``
    - ``slice``: a channel range
    - ``tuple``: one index per non-batch dimension, e.g. ``(5, 2, 2)`` = channel 5 at (2, 2)
    - callable: ``fn(act) -> (B, ...)``
    """
    if index is None:
        return act
    if callable(index):
        out = index(act)
        if not isinstance(out, torch.Tensor) or out.shape[:1] != act.shape[:1]:
            raise UserValueError(
                f"index callable must return a tensor with batch size {act.shape[0]}, "
                f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
            )
        return out
    if act.dim() < 2:
        raise UserValueError(f"cannot select index {index!r}: {where} has shape {tuple(act.shape)}")
    if isinstance(index, bool):
        raise UserTypeError(f"index must be int, slice, tuple, list or callable, got {index!r}")
    if isinstance(index, int):
        _check_channel(index, act.shape[1], where)
        return act[:, index]
    if isinstance(index, slice):
        return act[:, index]
    if isinstance(index, tuple):
        if len(index) > act.dim() - 1:
            raise UserIndexError(
                f"index {index!r} has {len(index)} entries but {where} has only "
                f"{act.dim() - 1} non-batch dimensions (shape {tuple(act.shape)})"
            )
        for d, i in enumerate(index):
            if isinstance(i, int):
                _check_channel(i, act.shape[d + 1], where, dim=d + 1)
        return act[(slice(None), *index)]
    if isinstance(index, Sequence) or isinstance(index, torch.Tensor):
        idx = [int(i) for i in index]
        for i in idx:
            _check_channel(i, act.shape[1], where)
        return act[:, idx]
    raise UserTypeError(
        f"index must be int, slice, tuple, list of channels or callable, got {type(index).__name__}"
    )


def _check_channel(i: int, size: int, where: str, dim: int = 1) -> None:
    if not -size <= i < size:
        what = "channel" if dim == 1 else f"index along dim {dim}"
        raise UserIndexError(
            f"{what} {i} is out of range for {where} with size {size} (valid: 0..{size - 1})"
        )

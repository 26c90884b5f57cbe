"""Reductions (spatial / token) and index selection applied to a captured activation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from ..errors import UserIndexError, UserTypeError, UserValueError

Index = Union[int, slice, Sequence[int], tuple, Callable[[torch.Tensor], torch.Tensor], None]

REDUCTIONS = ("none", "auto", "spatial_mean", "spatial_max", "cls", "token_mean", "token_max")


def check_reduction(reduction: str) -> str:
    """Refuse an unknown reduction name.

    Parameters
    ----------
    reduction:
        The name to check, one of :data:`REDUCTIONS`.

    Returns
    -------
    str
        ``reduction`` unchanged.

    Raises
    ------
    UserValueError
        ``reduction`` is not in :data:`REDUCTIONS`.
    """
    if reduction not in REDUCTIONS:
        raise UserValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    return reduction


def reduce(act: torch.Tensor, reduction: str, where: str = "activation") -> torch.Tensor:
    """Reduce a (B, ...) activation.

    - ``spatial_mean`` / ``spatial_max``: (B, C, *spatial) -> (B, C)
    - ``cls`` / ``token_mean`` / ``token_max``: (B, N, D) tokens -> (B, D)
    - ``none``: unchanged
    - ``auto``: ``spatial_mean`` for (B, C, H, W) maps, unchanged otherwise

    Parameters
    ----------
    act:
        (B, ...) activation: (B, C, *spatial) (at least 3 dimensions) for the spatial
        reductions, (B, N, D) tokens for the token reductions.
    reduction:
        One of :data:`REDUCTIONS`.
    where:
        What ``act`` is (``"layer 'layer4'"``), for the error message.

    Returns
    -------
    torch.Tensor
        (B, C) for the spatial reductions, (B, D) for the token ones, ``act`` itself for
        ``none`` (and for ``auto`` below 4 dimensions).

    Raises
    ------
    UserValueError
        ``act`` has too few dimensions for a spatial reduction, or not 3 for a token one.
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

    Parameters
    ----------
    act:
        (B, C, ...) activation, usually after :func:`reduce` (e.g. (B, C)).
    index:
        The selection above; ``None`` selects everything.
    where:
        What ``act`` is (``"layer 'layer4'"``), for the error messages.

    Returns
    -------
    torch.Tensor
        (B, ...) the selected part: (B, ...) without dim 1 for an int, (B, n, ...) for a list
        of n channels or a slice, (B, ...) without the indexed dimensions for a tuple of ints,
        the callable's output, or ``act`` itself for ``None``.

    Raises
    ------
    UserIndexError
        A channel or tuple entry is out of range, or the tuple has more entries than ``act``
        has non-batch dimensions.
    UserTypeError
        ``index`` is a bool or of an unsupported type.
    UserValueError
        ``act`` has no dimension to select from, or the callable does not return a tensor
        with ``act``'s batch size.
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
    if isinstance(index, (str, bytes)):  # a Sequence, but "12" is not channels [1, 2]
        raise UserTypeError(
            f"index must be int, slice, tuple, list of channels or callable, got the string "
            f"{index!r}"
        )
    if isinstance(index, Sequence) or isinstance(index, torch.Tensor):
        idx = [int(i) for i in index]
        for i in idx:
            _check_channel(i, act.shape[1], where)
        return act[:, idx]
    raise UserTypeError(
        f"index must be int, slice, tuple, list of channels or callable, got {type(index).__name__}"
    )


def _check_channel(i: int, size: int, where: str, dim: int = 1) -> None:
    # negative indices are refused, not wrapped: channel -1 and channel size - 1 would be one
    # unit under two names (labels, plans' unit lists, resume checks)
    if not 0 <= i < size:
        what = "channel" if dim == 1 else f"index along dim {dim}"
        raise UserIndexError(
            f"{what} {i} is out of range for {where} with size {size} (valid: 0..{size - 1})"
        )

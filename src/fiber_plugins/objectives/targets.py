"""`Targets`: the target values y* of many rows, whatever the objective's shape.

An objective's features (and so its target) are a (R, K) tensor, or, for a weighted sum of
objectives, one (R, K_i) tensor per term. Samplers, results and reports hold targets as a
:class:`Targets` and never ask which of the two it is; objectives receive :attr:`Targets.value`,
the tensor or tuple their ``features`` / ``distance_between`` work with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import UserTypeError


class Targets:
    """y* for R rows: ``parts`` holds one (R, K_i) tensor per summed term (one for a plain
    objective); ``summed`` says whether the objective is a sum (its value is then a tuple).

    Examples
    --------
    >>> t = Targets.of(torch.zeros(4, 6))
    >>> t.num_rows, t.widths, t.rows(torch.tensor([0, 2])).num_rows
    (4, (6,), 2)
    """

    __slots__ = ("parts", "summed")

    def __init__(self, parts: tuple[torch.Tensor, ...], summed: bool):
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise UserTypeError(f"targets must be tensors, got {[type(p).__name__ for p in parts]}")
        self.parts, self.summed = tuple(parts), bool(summed)

    @classmethod
    def of(cls, value) -> Targets:
        """Wrap what an objective returns: a tensor, a tuple of tensors, or Targets."""
        if isinstance(value, Targets):
            return value
        if isinstance(value, (tuple, list)):
            return cls(tuple(value), summed=True)
        if isinstance(value, torch.Tensor):
            return cls((value,), summed=False)
        raise UserTypeError(
            f"targets must be a tensor or a tuple of tensors, got {type(value).__name__}"
        )

    @property
    def value(self):
        """The tensor (plain objective) or tuple of tensors (sum) the objective works with."""
        return self.parts if self.summed else self.parts[0]

    @property
    def num_rows(self) -> int:
        return int(self.parts[0].shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        """K_i of each part."""
        return tuple(int(p.shape[-1]) for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Targets:
        """``fn`` applied to every part."""
        return Targets(tuple(fn(p) for p in self.parts), self.summed)

    def rows(self, index: torch.Tensor) -> Targets:
        """The rows ``index`` (a (B,) index tensor or a bool mask) of every part."""
        return self.map(lambda p: p[index.to(p.device)])

    def to(self, device=None, dtype=None) -> Targets:
        return self.map(lambda p: p.to(device=device, dtype=dtype))

    def float(self) -> Targets:
        return self.map(lambda p: p.float())

    def cpu(self) -> Targets:
        return self.map(lambda p: p.detach().cpu())

    def finite_rows(self) -> torch.Tensor:
        """(R,) bool: rows whose every entry of every part is finite."""
        ok = torch.ones(self.num_rows, dtype=torch.bool, device=self.device)
        for p in self.parts:
            ok &= torch.isfinite(p.reshape(p.shape[0], -1)).all(1)
        return ok

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(p.shape)) for p in self.parts)
        return f"Targets({'sum of ' if self.summed else ''}{shapes})"

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

    Parameters
    ----------
    parts:
        One (R, K_i) tensor per summed term; a single (R, K) tensor for a plain objective.
    summed:
        Whether the objective is a :class:`~fiber_plugins.objectives.WeightedSum`.

    Raises
    ------
    UserTypeError
        ``parts`` is empty or holds something other than tensors.

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
        """Wrap what an objective returns: a tensor, a tuple of tensors, or Targets.

        Parameters
        ----------
        value:
            An (R, K) tensor (a plain objective), a tuple or list of (R, K_i) tensors (a sum),
            or a :class:`Targets` (returned unchanged).

        Returns
        -------
        Targets
            ``summed`` is True for a tuple or list.

        Raises
        ------
        UserTypeError
            ``value`` is none of these.
        """
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
        """The tensor (plain objective) or tuple of tensors (sum) the objective works with.

        Returns
        -------
        torch.Tensor or tuple[torch.Tensor, ...]
            The (R, K) tensor, or the tuple of (R, K_i) tensors when :attr:`summed`.
        """
        return self.parts if self.summed else self.parts[0]

    @property
    def num_rows(self) -> int:
        """R, the number of rows (targets).

        Returns
        -------
        int
            The first dimension of the first part.
        """
        return int(self.parts[0].shape[0])

    @property
    def widths(self) -> tuple[int, ...]:
        """K_i of each part.

        Returns
        -------
        tuple[int, ...]
            The last dimension of each part: ``(K,)`` for a plain objective.
        """
        return tuple(int(p.shape[-1]) for p in self.parts)

    @property
    def device(self) -> torch.device:
        """The device of the first part.

        Returns
        -------
        torch.device
        """
        return self.parts[0].device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Targets:
        """``fn`` applied to every part.

        Parameters
        ----------
        fn:
            ``(R, K_i) tensor -> tensor``, applied to each part in turn.

        Returns
        -------
        Targets
            The results, with the same :attr:`summed`.
        """
        return Targets(tuple(fn(p) for p in self.parts), self.summed)

    @classmethod
    def cat(cls, items: list[Targets]) -> Targets:
        """Stack the rows of several Targets of the same kind (part by part).

        Parameters
        ----------
        items:
            Targets with the same number of parts and widths, (R_j, K_i) each.

        Returns
        -------
        Targets
            (sum_j R_j, K_i) parts, with the items' :attr:`summed`.
        """
        first = items[0]
        parts = tuple(torch.cat([t.parts[i] for t in items]) for i in range(len(first.parts)))
        return cls(parts, first.summed)

    def rows(self, index: torch.Tensor) -> Targets:
        """The rows ``index`` (a (B,) index tensor or a bool mask) of every part.

        Parameters
        ----------
        index:
            (B,) integer row indices, or an (R,) bool mask; moved to each part's device.

        Returns
        -------
        Targets
            (B, K_i) parts (B = the number of True entries for a mask).
        """
        return self.map(lambda p: p[index.to(p.device)])

    def to(self, device=None, dtype=None) -> Targets:
        """Every part moved with ``Tensor.to(device=device, dtype=dtype)``.

        Parameters
        ----------
        device, dtype:
            As for ``torch.Tensor.to``; ``None`` keeps the part's own.

        Returns
        -------
        Targets
            (R, K_i) parts on ``device`` in ``dtype``.
        """
        return self.map(lambda p: p.to(device=device, dtype=dtype))

    def float(self) -> Targets:
        """Every part as float32.

        Returns
        -------
        Targets
            (R, K_i) float32 parts.
        """
        return self.map(lambda p: p.float())

    def cpu(self) -> Targets:
        """Every part detached from the graph and on the CPU.

        Returns
        -------
        Targets
            (R, K_i) detached CPU parts.
        """
        return self.map(lambda p: p.detach().cpu())

    def finite_rows(self) -> torch.Tensor:
        """(R,) bool: rows whose every entry of every part is finite.

        Returns
        -------
        torch.Tensor
            (R,) bool mask on :attr:`device`.
        """
        ok = torch.ones(self.num_rows, dtype=torch.bool, device=self.device)
        for p in self.parts:
            ok &= torch.isfinite(p.reshape(p.shape[0], -1)).all(1)
        return ok

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(p.shape)) for p in self.parts)
        return f"Targets({'sum of ' if self.summed else ''}{shapes})"

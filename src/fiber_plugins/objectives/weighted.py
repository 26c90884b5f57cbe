"""`WeightedSum`: several fiber objectives as one, sum_i w_i d_i(phi_i(x), y*_i)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch

from ..errors import UserValueError
from .base import FiberObjective, Target


class WeightedSum(FiberObjective):
    """sum_i w_i d_i(phi_i(x), y*_i): built with ``2.0 * obj_a + obj_b``. Targets are tuples.

    Features, targets and widths are tuples with one entry per term, in the order of
    :meth:`terms`: term i gives (B, K_i) features and takes (B, K_i) or (1, K_i) targets.

    Parameters
    ----------
    terms:
        ``(weight, objective)`` pairs, at least one. The sum takes ``subject``, ``model`` and
        ``preprocess`` from the first term, so that code written for one objective reads them.

    Examples
    --------
    >>> s = 2.0 * obj_a + obj_b  # doctest: +SKIP
    >>> y_star = s.target(reference)  # (R, K_a), (R, K_b)  # doctest: +SKIP
    >>> with s.attached():  # doctest: +SKIP
    ...     loss = s.loss(images, y_star)  # (B,)
    """

    def __init__(self, terms: list[tuple[float, FiberObjective]]):
        if not terms:
            raise UserValueError("a weighted sum needs at least one objective")
        self._terms = list(terms)
        self.name = " + ".join(f"{w:g}*{o.name}" for w, o in self._terms)
        # the attributes every FiberObjective has, so that code written for one objective
        # (evaluation.features_of, device checks) takes a sum too
        first = self._terms[0][1]
        self.subject, self.model, self.preprocess = first.subject, first.model, first.preprocess
        self.layer = self.layer_name = self.index = None
        self.reduction, self.capture = "sum", "sum"
        self.distance_name = "+".join(o.distance_name for _, o in self._terms)

    def terms(self) -> list[tuple[float, FiberObjective]]:
        """The weighted terms of the sum.

        Returns
        -------
        list[tuple[float, FiberObjective]]
            A new list of the ``(weight, objective)`` pairs.
        """
        return list(self._terms)

    @contextlib.contextmanager
    def attached(self) -> Iterator[WeightedSum]:
        """:meth:`FiberObjective.attached` for every term at once (undone in reverse order).

        Returns
        -------
        Iterator[WeightedSum]
            A context manager that yields this sum.
        """
        with contextlib.ExitStack() as stack:
            for _, o in self._terms:
                stack.enter_context(o.attached())
            yield self

    # A sum's features and targets are tuples, one (B, K_i) tensor per term, where a single
    # objective has one tensor: they are typed as `Target`, as FiberObjective.loss takes them.
    def features(self, x: torch.Tensor) -> Target:
        """Each term's phi(x).

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1].

        Returns
        -------
        tuple[torch.Tensor, ...]
            One (B, K_i) float32 feature tensor per term.
        """
        return tuple(o.features(x) for _, o in self._terms)

    def target(self, reference: torch.Tensor) -> Target:
        """Each term's y* = phi_i(x*); no gradient.

        Parameters
        ----------
        reference:
            (R, C, H, W) reference images in the prior's space, [-1, 1].

        Returns
        -------
        tuple[torch.Tensor, ...]
            One (R, K_i) target tensor per term.
        """
        return tuple(o.target(reference) for _, o in self._terms)

    def target_of(self, features) -> Target:
        """Each term's target from the references' features.

        Parameters
        ----------
        features:
            One (R, K_i) feature tensor per term, as :meth:`features` gives them.

        Returns
        -------
        tuple[torch.Tensor, ...]
            One (R, K_i) target tensor per term (each term's :meth:`FiberObjective.target_of`).
        """
        return tuple(o.target_of(f) for (_, o), f in zip(self._terms, features))

    def check_target(self, target, width) -> Target:
        """Validate explicit targets, one per term, with each term's
        :meth:`FiberObjective.check_target`.

        Parameters
        ----------
        target:
            A tuple or list of one (K_i,) or (R, K_i) target per term.
        width:
            The feature widths (K_1, K_2, ...), one per term.

        Returns
        -------
        tuple[torch.Tensor, ...]
            One (R, K_i) float32 target per term ((1, K_i) for a (K_i,) vector).

        Raises
        ------
        UserValueError
            ``target`` is not a tuple or list with one entry per term, or a term's check fails.
        """
        if not isinstance(target, (tuple, list)) or len(target) != len(self._terms):
            raise UserValueError(
                f"a sum of {len(self._terms)} objectives needs a tuple of {len(self._terms)} targets"
            )
        return tuple(o.check_target(t, w) for (_, o), t, w in zip(self._terms, target, width))

    def loss(self, x: torch.Tensor, target) -> torch.Tensor:
        """The weighted fiber loss sum_i w_i d_i(phi_i(x), y*_i) per sample.

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1].
        target:
            One (B, K_i) or (1, K_i) target per term.

        Returns
        -------
        torch.Tensor
            (B,) weighted fiber loss of each image.
        """
        return self.distance_between(self.features(x), target)

    def distance_between(self, features, target) -> torch.Tensor:
        """sum_i w_i d_i(features_i, target_i), from given features (no forward pass).

        Parameters
        ----------
        features:
            One (B, K_i) feature tensor per term.
        target:
            One (B, K_i) or (1, K_i) target per term.

        Returns
        -------
        torch.Tensor
            (B,) weighted sum of the terms' distances.
        """
        # a sum has at least one term (checked in __init__), so the result is never the start 0
        return cast(
            torch.Tensor,
            sum(w * o.distance(f, t) for (w, o), f, t in zip(self._terms, features, target)),
        )

    def describe(self) -> dict:
        """The settings of every term, as stored with a run.

        Returns
        -------
        dict
            ``{"sum": [...]}``: each term's :meth:`FiberObjective.describe` with its ``weight``.
        """
        return {"sum": [{"weight": w, **o.describe()} for w, o in self._terms]}

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r})"

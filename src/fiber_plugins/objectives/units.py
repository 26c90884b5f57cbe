"""Many units in one objective: one subject pass serves rows that target different units.

A neuron audit samples the fiber of every channel of a layer, an SAE inspection the fibers of
thousands of features. :class:`UnitSet` puts all of them into one objective, so that one sampler
call batches rows of different units: the prior runs once per batch, each *site* (a layer, an SAE,
the logits) runs the subject once per batch, and each row's loss reads only its own unit.

A site is an ordinary :class:`~fiber_plugins.FiberObjective` whose features hold the units as
columns (``FiberObjective(model, layer="layer4", index=list(range(512)))``: column c is
channel c); a unit is a column, or a list of columns, of one site. Units of several sites (several
layers or hook points) can share a call: the rows share the prior passes, and each site's subject
pass runs on the whole batch.

The row layout of a call is bound by :meth:`UnitSet.bind`: row i targets unit ``row_units[i]``
at reference i. The unit lives in the target: row i's target keeps its unit's columns of
phi(x*) and is NaN elsewhere, and the distance reads only the finite entries (as Captum's
per-example targets do). Each row is seeded like row ``row_keys[i]`` of a one-unit call, so that a
unit's samples equal those of a call with that unit alone and the same seed.

Examples
--------
>>> layer = FiberObjective(model, layer="layer4", index=list(range(512)))   # doctest: +SKIP
>>> units = UnitSet.of(layer)                        # 512 units, one per column
>>> result = NDTMSampler(prior, units).sample(references=[a, b], n=4)   # 512 x 2 x 4 rows
>>> per_unit = result.by_unit()                      # {'layer4[0]': FiberResult (2, 4), ...}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from ..errors import UserIndexError, UserTypeError, UserValueError
from .base import FiberObjective
from .distances import Distance

__all__ = ["UnitSet", "own_entries"]

Columns = int | Sequence[int]


def own_entries(features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's finite target entries and the features at the same places.

    Parameters
    ----------
    features:
        (B, K) features.
    target:
        (B, K) or (1, K) targets in which the entries a row does not use are NaN; every row must
        use the same number k of entries.

    Returns
    -------
    (features (B, k), targets (B, k))

    Raises
    ------
    UserValueError
        Rows use different numbers of entries, or a row uses none.
    """
    own = torch.isfinite(target).expand_as(features)
    counts = own.sum(1)
    k = int(counts[0]) if counts.numel() else 0
    if k == 0 or bool((counts != k).any()):
        raise UserValueError(
            "the rows of one call select blocks of different sizes "
            f"({sorted(set(counts.tolist()))} entries); sample units of different widths in "
            "separate calls"
        )
    rows = features.shape[0]
    return features[own].view(rows, k), target.expand_as(features)[own].view(rows, k)


class UnitSet(FiberObjective):
    """Many units (columns of one or more site objectives) sampled in one call.

    Parameters
    ----------
    sites:
        ``(objective, units)`` pairs: each objective gives (B, K_s) features, and ``units`` lists
        its units, each a column index or a list of column indices (every unit of a call must have
        the same number of columns). ``None`` for units means one unit per column.
    labels:
        One name per unit, used by results and stores. Default: ``"<site name>[<column>]"``, or
        ``"<subject>:<layer>[<channel>]"`` where the site selects a list of channels reduced to
        one column each (``reduction="spatial_mean"``, ``"cls"``, ...).

    Raises
    ------
    UserValueError
        No site, no unit, a unit that is not a column index or list of them, or different label
        count.
    UserTypeError
        A site that is not a :class:`FiberObjective`, or a weighted sum.
    """

    def __init__(
        self,
        sites: Sequence[tuple[FiberObjective, Sequence[Columns] | None]],
        labels: Sequence[str] | None = None,
    ):
        if not sites:
            raise UserValueError("a UnitSet needs at least one (objective, units) site")
        self.sites: list[FiberObjective] = []
        self._units: list[tuple[int, list[int]]] = []  # (site, columns) per unit
        names: list[str] = []
        for s, (objective, units) in enumerate(sites):
            if not isinstance(objective, FiberObjective) or len(objective.terms()) != 1:
                raise UserTypeError(
                    f"site {s} must be a single FiberObjective, got {type(objective).__name__}"
                )
            self.sites.append(objective)
            if units is None:
                units = list(range(self._width(objective)))
            for unit in units:
                cols = _columns(unit, s)
                self._units.append((s, cols))
                names.append(_unit_label(objective, cols))
        if not self._units:
            raise UserValueError("a UnitSet needs at least one unit")
        if labels is not None and len(labels) != len(self._units):
            raise UserValueError(f"{len(labels)} labels for {len(self._units)} units")
        self.labels = [str(x) for x in labels] if labels is not None else names
        first = self.sites[0]
        # the attributes code written for one objective reads (devices, preprocessing checks)
        self.subject, self.model, self.preprocess = first.subject, first.model, first.preprocess
        self.layer = self.layer_name = self.index = None
        self.reduction, self.capture = "units", first.capture
        self.distance_name = first.distance_name
        self.name = f"{len(self._units)} units of " + ", ".join(o.name for o in self.sites)
        self._base_distance: Distance = first.distance
        self.distance = self._masked_distance
        self.row_units: list[int] | None = None
        self.row_keys: list[int] | None = None
        self._widths: list[int] | None = None

    @classmethod
    def of(cls, objective: FiberObjective, units: Sequence[Columns] | None = None,
           labels: Sequence[str] | None = None) -> UnitSet:  # fmt: skip
        """The units of one site (default: one per column of its features).

        Parameters
        ----------
        objective:
            The site: (B, K) features whose columns are the units.
        units:
            Column indices or lists of them; default every column.
        labels:
            One name per unit.

        Returns
        -------
        UnitSet
        """
        return cls([(objective, units)], labels)

    @staticmethod
    def _width(objective: FiberObjective) -> int:
        index = objective.index
        if isinstance(index, (list, tuple, range)) and all(isinstance(i, int) for i in index):
            return len(index)
        raise UserValueError(
            f"give the units of {objective.name} explicitly (its width is known only after a "
            "forward pass), or build it with index=[...] listing the units"
        )

    # ------------------------------------------------------------------ the units
    @property
    def num_units(self) -> int:
        """U, the number of units."""
        return len(self._units)

    def unit_columns(self, unit: int) -> tuple[int, list[int]]:
        """(site, its columns) of unit ``unit``."""
        return self._units[unit]

    # ------------------------------------------------------------------ binding rows
    def bind(self, row_units: Sequence[int], row_keys: Sequence[int] | None = None) -> UnitSet:
        """This unit set for a call whose reference row i targets unit ``row_units[i]``.

        Parameters
        ----------
        row_units:
            (R,) unit of each reference row.
        row_keys:
            (R,) the row each one is seeded as (default: its position among the rows of its
            unit, i.e. its row in a one-unit call with the same references).

        Returns
        -------
        UnitSet
            A bound copy sharing the sites.
        """
        units = [int(u) for u in row_units]
        if not units or min(units) < 0 or max(units) >= self.num_units:
            raise UserIndexError(
                f"row units must lie in 0..{self.num_units - 1}, got {sorted(set(units))[:5]}"
            )
        if row_keys is None:
            seen: dict[int, int] = {}
            row_keys = []
            for u in units:
                row_keys.append(seen.get(u, 0))
                seen[u] = seen.get(u, 0) + 1
        bound = object.__new__(UnitSet)
        bound.__dict__.update(self.__dict__)
        bound.row_units, bound.row_keys = units, [int(k) for k in row_keys]
        if getattr(self.distance, "__self__", None) is self:  # not replaced by the user
            bound.distance = bound._masked_distance
        return bound

    def seed_row(self, row: int) -> int:
        """The row of a one-unit call that reference row ``row`` is seeded as."""
        return self.row_keys[row] if self.row_keys is not None else row

    # ------------------------------------------------------------------ phi and targets
    @contextlib.contextmanager
    def attached(self) -> Iterator[UnitSet]:
        """Every site's :meth:`FiberObjective.attached` at once."""
        with contextlib.ExitStack() as stack:
            for site in self.sites:
                stack.enter_context(site.attached())
            yield self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Every unit's columns: (B, sum of unit widths), unit by unit.

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1].

        Returns
        -------
        torch.Tensor
            (B, K) features; unit u occupies its own block of columns.
        """
        with self.attached():
            feats = [site.features(x) for site in self.sites]
        blocks = []
        for s, f in enumerate(feats):
            cols = [c for site, unit in self._units if site == s for c in unit]
            if cols and max(cols) >= f.shape[1]:
                raise UserIndexError(
                    f"unit column {max(cols)} is outside the {f.shape[1]} features of "
                    f"{self.sites[s].name}"
                )
            blocks.append(f[:, cols])
        self._widths = [len(unit) for _, unit in self._units]
        return torch.cat(blocks, dim=1)

    def _blocks(self) -> list[tuple[int, int]]:
        """(start, stop) column range of each unit in :meth:`features`' order (sites in order)."""
        order = sorted(range(self.num_units), key=lambda u: self._units[u][0])
        spans: list[tuple[int, int]] = [(0, 0)] * self.num_units
        start = 0
        for u in order:
            width = len(self._units[u][1])
            spans[u] = (start, start + width)
            start += width
        return spans

    def _mask(self, y: torch.Tensor) -> torch.Tensor:
        if self.row_units is None:
            raise UserValueError(
                "this UnitSet is not bound to rows: sample it with a sampler (which binds it), "
                "or call bind(row_units) first"
            )
        if y.shape[0] != len(self.row_units):
            raise UserValueError(
                f"{y.shape[0]} reference rows for {len(self.row_units)} bound rows"
            )
        masked = torch.full_like(y, math.nan)
        spans = self._blocks()
        for r, u in enumerate(self.row_units):
            a, b = spans[u]
            masked[r, a:b] = y[r, a:b]
        return masked

    def target_of(self, features: torch.Tensor) -> torch.Tensor:
        """phi(x*) of each reference row, NaN outside the columns of the row's unit."""
        return self._mask(features.detach())

    def check_target(self, target, width) -> torch.Tensor:
        """Explicit targets: (R, K) full feature vectors, masked like :meth:`target_of`."""
        return self._mask(super().check_target(target, width))

    def _masked_distance(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        f_own, t_own = own_entries(features, target)
        return self._base_distance(f_own, t_own)

    def terms(self) -> list[tuple[float, FiberObjective]]:
        """``[(1.0, self)]``: a unit set is one objective (its sites share its rows)."""
        return [(1.0, self)]

    def describe(self) -> dict:
        """The sites, the units' labels and columns, and the bound row layout (JSON-safe)."""
        return {
            "units": {
                "labels": list(self.labels),
                "columns": [[s, cols] for s, cols in self._units],
                "row_units": self.row_units,
                "row_keys": self.row_keys,
                "spans": [list(span) for span in self._blocks()],
            },
            "sites": [site.describe() for site in self.sites],
            "name": self.name,
            "distance": self.distance_name,
        }

    def __repr__(self) -> str:
        return f"UnitSet({self.name!r})"


# reductions that leave one column per channel (per selected entry), so column c reads index[c]
_ONE_COLUMN_PER_CHANNEL = ("spatial_mean", "spatial_max", "cls", "token_mean", "token_max")


def _unit_label(objective: FiberObjective, cols: list[int]) -> str:
    """A unit's default label: the channels it reads where the objective selects a list of
    channels and reduces each to one column (``index=[5, 7], reduction="spatial_mean"``: column
    1 is ``DigitCNN:features.8[7]``), else its columns (``reduction="none"`` keeps a channel's
    H x W columns)."""
    index = objective.index
    if isinstance(index, torch.Tensor) and index.dim() == 1:
        index = index.tolist()
    if (
        objective.reduction in _ONE_COLUMN_PER_CHANNEL
        and isinstance(index, (list, range))
        and all(isinstance(i, int) for i in index)
    ):
        suffix = f"[{objective.index}]"
        base = objective.name[: -len(suffix)] if objective.name.endswith(suffix) else objective.name
        picked = [index[c] for c in cols if c < len(index)]
        if len(picked) == len(cols):
            return f"{base}[{picked[0] if len(picked) == 1 else picked}]"
    return f"{objective.name}[{cols[0] if len(cols) == 1 else cols}]"


def _columns(unit: object, site: int) -> list[int]:
    if isinstance(unit, bool):
        raise UserValueError(f"a unit of site {site} must be a column index, got {unit!r}")
    if isinstance(unit, int) and unit >= 0:
        return [unit]
    if (
        isinstance(unit, (list, tuple, range))
        and unit
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in unit)
    ):
        return [int(c) for c in unit]
    raise UserValueError(
        f"a unit of site {site} must be a column index (>= 0) or a non-empty list of them, got {unit!r}"
    )

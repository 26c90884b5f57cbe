"""Small pieces shared by the samplers: the settings validators every config uses, config
(de)serialisation, and a per-row optimiser.

Validators take the setting's name and value, refuse a bad value with one line that quotes it
and the valid range (:class:`~fiber_plugins.errors.UserTypeError` for a wrong type, e.g. a bool
or a string where a number is meant, :class:`~fiber_plugins.errors.UserValueError` for a value
out of range, NaN or infinity), and return the value as a plain Python ``int`` / ``float`` /
``bool``, so configs hold JSON-ready numbers whatever the caller passed (numpy scalars included).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, fields
from typing import Literal, NamedTuple, overload

import numpy as np
import torch

from ..errors import UserTypeError, UserValueError

OPTIMISERS = ("sgd", "adam")


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    """'> 0', '>= 0', '<= 1', 'in (0, 1]', ... (empty when unbounded)."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high]; a bool, a float (even a whole one such as 3.0) or a string is
    refused, numpy integers are accepted."""
    span = _interval(low, high, False, False)
    message = f"{name} must be an integer{' ' + span if span else ''}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserTypeError(message)
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise UserValueError(message)
    return number


@overload
def check_float(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: Literal[False] = False,
    what: str = "",
    unit: str = "",
) -> float: ...


@overload
def check_float(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool,
    what: str = "",
    unit: str = "",
) -> float | None: ...


def check_float(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
    what: str = "",
    unit: str = "",
) -> float | None:
    """A finite real number in the interval from ``low`` to ``high`` (``low_open`` / ``high_open``
    exclude the end), or ``None`` when ``optional``. Ints are fine; NaN, infinities, bools and
    strings are not. ``what`` ("a cutoff") and ``unit`` ("fraction of Nyquist") only shape the
    message: ``lowpass must be a cutoff in (0, 1] (fraction of Nyquist) or None, got 1.5``."""
    if value is None and optional:
        return None
    span = _interval(low, high, low_open, high_open)
    rest = " ".join(p for p in (span, f"({unit})" if unit else "") if p)
    rest += " or None" if optional else ""

    def message(noun: str) -> str:
        noun = what or noun
        return f"{name} must be {' '.join(p for p in (noun, rest) if p)}, got {value!r}"

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserTypeError(message("a number"))
    value_f = float(value)
    if not math.isfinite(value_f):
        raise UserValueError(message("a finite number"))
    if low is not None and (value_f <= low if low_open else value_f < low):
        raise UserValueError(message(""))
    if high is not None and (value_f >= high if high_open else value_f > high):
        raise UserValueError(message(""))
    return value_f


def check_bool(name: str, value) -> bool:
    """True or False (numpy bools too); 0, 1, 'yes' and None are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise UserTypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices):
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise UserValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows of ``t`` (B, ...) whose every element is finite."""
    return torch.isfinite(t).flatten(1).all(1) if t.dim() > 1 else torch.isfinite(t)


class SettingsMixin:
    """``to_dict`` / ``from_dict`` (JSON round trip) and validation for frozen config dataclasses.

    ``__post_init__`` calls :meth:`_check` once per field, so each setting is validated, and
    normalised to a plain Python value, where the config is built.
    """

    _label = "sampler"

    def to_dict(self) -> dict:
        """The settings as a plain dict (JSON-safe; read back by :meth:`from_dict`)."""
        return asdict(self)  # type: ignore[call-overload]  # mixed into dataclasses only

    @classmethod
    def from_dict(cls, d: dict):
        """Settings from a dict; unknown keys and invalid values raise one-line errors that name
        the setting and the valid choices.
        """
        if not isinstance(d, dict):
            raise UserTypeError(f"{cls._label} settings must be a dict, got {d!r}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # dataclasses only
        unknown = set(d) - known
        if unknown:
            raise UserValueError(
                f"unknown {cls._label} settings {sorted(unknown)}; valid: {sorted(known)}"
            )
        return cls(**d)

    def _check(self, field: str, check, *args, label: str | None = None, **kwargs) -> None:
        """Validate the field with ``check(label or field, value, *args, **kwargs)`` and store
        the value it returns (frozen dataclass: through ``object.__setattr__``)."""
        value = check(label or field, getattr(self, field), *args, **kwargs)
        object.__setattr__(self, field, value)


def row_mask(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> broadcastable (B, 1, ..., 1) against ``like``."""
    return rows.view(-1, *([1] * (like.dim() - 1)))


class RowStep(NamedTuple):
    """One :meth:`RowOptimiser.update`: the new parameter and, as (B,) bool masks over the rows
    that were asked to move, why a row could not: the first cause only, so the masks are
    disjoint and a caller can record one reason per row."""

    param: torch.Tensor
    bad_gradient: torch.Tensor  # the gradient is not finite
    bad_moment: torch.Tensor  # Adam's second moment overflows float32 (a finite gradient)
    bad_update: torch.Tensor  # the updated parameter is not finite

    @property
    def bad(self) -> torch.Tensor:
        """(B,) bool: every row that did not move, whatever the cause."""
        return self.bad_gradient | self.bad_moment | self.bad_update


class RowOptimiser:
    """SGD or Adam written out element-wise, with per-row freezing.

    ``torch.optim`` updates whole tensors; a sampler must leave rows that stopped (or failed)
    exactly where they are, momentum included, so the update is masked per row. Element-wise
    updates also keep every row independent of the rest of its batch. Adam's moments are
    updated as NDTM has always done (``m * b1`` then ``add_(grad, alpha=1 - b1)``, ``v * b2``
    then ``addcmul_(grad, grad, value=1 - b2)``), so its samples are bit-identical to those of
    its earlier hand-written loop.

    No operation reads a tensor back to the host: a sampler's inner loop stays sync-free.
    """

    def __init__(self, kind: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        check_choice("optimiser", kind, OPTIMISERS)
        self.kind, self.lr, self.betas, self.eps = kind, float(lr), betas, eps
        self._state: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def step(
        self, key: int, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the updated ``param``, (B,) bool: rows whose update is not finite).

        Rows where ``rows`` is False are returned unchanged, and so are the rows whose gradient,
        Adam moment or update is not finite (an overflow is never turned into a silent zero
        step): the caller fails those rows with a reason. :meth:`update` tells the causes apart.
        """
        out = self.update(key, param, grad, rows)
        return out.param, out.bad

    def update(
        self, key: int, param: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor
    ) -> RowStep:
        """One step of the parameter ``key`` (B, ...) with ``grad`` on the rows where ``rows``
        (B,) is True; see :class:`RowStep` for the failure masks."""
        ok = finite_rows(grad)
        bad_gradient = rows & ~ok
        if self.kind == "sgd":
            new = param - self.lr * grad
            bad_moment = torch.zeros_like(bad_gradient)
        else:
            b1, b2 = self.betas
            m0, v0, k = self._state.get(key, (torch.zeros_like(param), torch.zeros_like(param), 0))
            k += 1
            m = (m0 * b1).add_(grad, alpha=1 - b1)
            v = (v0 * b2).addcmul_(grad, grad, value=1 - b2)
            # an overflowing second moment (|grad| > ~6e20) would make the step 0, not an error
            finite_v = finite_rows(v)
            bad_moment = rows & ok & ~finite_v
            ok = ok & finite_v
            keep = row_mask(ok & rows, param)
            self._state[key] = (torch.where(keep, m, m0), torch.where(keep, v, v0), k)
            m_hat = m / (1 - b1**k)
            v_hat = v / (1 - b2**k)
            new = param - self.lr * m_hat / (v_hat.sqrt() + self.eps)
        finite_new = finite_rows(new)
        bad_update = rows & ok & ~finite_new
        ok = ok & finite_new
        return RowStep(
            torch.where(row_mask(rows & ok, param), new, param),
            bad_gradient,
            bad_moment,
            bad_update,
        )

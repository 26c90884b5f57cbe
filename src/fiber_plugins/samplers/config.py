"""Frozen sampler configurations that round-trip through JSON."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from .._utils import warn
from ..errors import UserTypeError, UserValueError
from ._common import (
    OPTIMISERS,
    SettingsMixin,
    check_bool,
    check_choice,
    check_float,
    check_int,
)

GUIDANCE_SCHEDULES = ("constant", "interval", "ramp")
TARGET_MODES = ("static", "reapprox")
# NDTM's default (lr_start, lr_end), chosen for Adam
ADAM_LRS = (0.05, 0.01)


# the settings each schedule kind ignores, which must stay at their defaults
_UNUSED_BY = {"constant": ("low", "high", "outside", "final"), "interval": ("final",), "ramp": ()}
_SCHEDULE_DEFAULTS = {"low": 0.0, "high": 1.0, "outside": 0.0, "final": None}


@dataclass(frozen=True)
class GuidanceSchedule(SettingsMixin):
    """gamma_t as a function of the noise level in [0, 1] (1 = pure noise).

    - ``constant``: ``strength`` everywhere;
    - ``interval``: ``strength`` for levels in [``low``, ``high``] (limited-interval guidance),
      ``outside`` elsewhere;
    - ``ramp``: linear from ``strength`` at level 1 to ``final`` at level 0 (guidance raised
      towards the end of sampling when ``final > strength``), zero outside [``low``, ``high``].

    Every strength is a finite number >= 0. A setting the kind does not use (``low`` for
    ``constant``, ``final`` for ``interval``, ...) is refused unless it is at its default.
    """

    _label = "guidance schedule"

    kind: str = "constant"
    strength: float = 1.0
    low: float = 0.0
    high: float = 1.0
    outside: float = 0.0
    final: float | None = None

    def __post_init__(self):
        self._check("kind", check_choice, GUIDANCE_SCHEDULES, label="guidance schedule")
        self._check("strength", check_float, 0.0, label="guidance strength")
        self._check("low", check_float, 0.0, 1.0, label="guidance interval low")
        self._check("high", check_float, 0.0, 1.0, label="guidance interval high")
        if self.low > self.high:
            raise UserValueError(
                f"guidance interval must satisfy 0 <= low <= high <= 1, got ({self.low}, {self.high})"
            )
        self._check("outside", check_float, 0.0, label="guidance outside the interval")
        self._check("final", check_float, 0.0, optional=True, label="final guidance")
        unused = [
            f"{name}={getattr(self, name)!r}"
            for name in _UNUSED_BY[self.kind]
            if getattr(self, name) != _SCHEDULE_DEFAULTS[name]
        ]
        if unused:
            raise UserValueError(
                f"guidance schedule {self.kind!r} does not use {', '.join(unused)}: low, high "
                "(--interval) and outside shape 'interval' and 'ramp', final (--final-guidance) "
                "only 'ramp'; choose that kind (--schedule) or leave them out"
            )

    def __call__(self, level: float) -> float:
        inside = self.low <= level <= self.high
        if self.kind == "constant":
            return self.strength
        if self.kind == "interval":
            return self.strength if inside else self.outside
        final = self.strength if self.final is None else self.final
        return (final + (self.strength - final) * level) if inside else self.outside


def check_guidance(name: str, value) -> GuidanceSchedule:
    """A guidance setting as a :class:`GuidanceSchedule`: a number >= 0 (a constant schedule), a
    schedule, or a schedule's ``to_dict()`` (the JSON round trip)."""
    if isinstance(value, GuidanceSchedule):
        return value
    if isinstance(value, dict):
        return GuidanceSchedule.from_dict(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return GuidanceSchedule("constant", check_float(name, value, 0.0))
    raise UserTypeError(f"{name} must be a float or a GuidanceSchedule, got {value!r}")


@dataclass(frozen=True)
class NDTMConfig(SettingsMixin):
    """NDTM settings (DESIGN 4.1). Defaults follow the paper where it gives values.

    Parameters
    ----------
    num_steps: T, steps of the sampling grid.
    inner_steps: N, optimiser steps on the control u per sampling step (paper 4-8).
    guidance: gamma_t schedule (a float means a constant schedule).
    lr_start, lr_end: learning rate of the control's optimiser, linearly decayed over the
        trajectory.
    optimiser: 'adam' (the paper's; a fresh Adam state at every sampling step) or 'sgd' (plain
        gradient steps: each pixel moves in proportion to its gradient, where Adam's first steps
        move every pixel by about lr; its learning rates are on another scale).
    kappa: weight of ||u||^2 (paper 1e-4).
    tau: weight of ||eps(x_t + gamma u) - eps(x_t)||^2 (paper 0).
    eta: DDIM eta of the update (0 deterministic, 1 DDPM-like).
    target_mode: 'static' (y* = phi(x*)) or 'reapprox' (y*_t = phi(D(x0_hat(x*_t))), paper Eq. 11-12).
    autocast: bf16 autocast of the networks (meant for CUDA; also honoured on CPU); the control
        u, the optimiser state and the losses stay fp32.
    trace: record the fiber loss of x0_hat at every step (costs one decode + phi forward on
        unguided steps).

    Every number must be finite; a guidance so large that the guided state overflows is not
    refused here (where that happens depends on the prior), but its rows fail with a reason.
    """

    _label = "NDTM"

    num_steps: int = 50
    inner_steps: int = 4
    guidance: GuidanceSchedule = GuidanceSchedule()
    lr_start: float = ADAM_LRS[0]
    lr_end: float = ADAM_LRS[1]
    optimiser: str = "adam"
    kappa: float = 1e-4
    tau: float = 0.0
    eta: float = 0.0
    target_mode: str = "static"
    autocast: bool = False
    trace: bool = True

    def __post_init__(self):
        self._check("num_steps", check_int, 1)
        self._check("inner_steps", check_int, 0)
        self._check("guidance", check_guidance)
        self._check("lr_start", check_float, 0.0)
        self._check("lr_end", check_float, 0.0)
        self._check("optimiser", check_choice, OPTIMISERS)
        self._check("kappa", check_float, 0.0)
        self._check("tau", check_float, 0.0)
        self._check("eta", check_float, 0.0, 1.0)
        self._check("target_mode", check_choice, TARGET_MODES)
        self._check("autocast", check_bool)
        self._check("trace", check_bool)
        if self.optimiser == "sgd" and (self.lr_start, self.lr_end) == ADAM_LRS:
            warn(
                f"NDTM optimiser 'sgd' with the default learning rates {ADAM_LRS}, which are "
                "Adam's: plain gradient steps move u by lr x its gradient, so their scale depends "
                "on the objective's; set lr_start and lr_end for it (on the Color-MNIST "
                "conditional model, 10 and 0.2 reached the fiber: docs/samplers.md, 'The "
                "control's optimiser')"
            )

    def lr(self, i: int) -> float:
        """Learning rate at step i of the grid (linear decay)."""
        if self.num_steps == 1:
            return self.lr_start
        f = i / (self.num_steps - 1)
        return self.lr_start + (self.lr_end - self.lr_start) * f

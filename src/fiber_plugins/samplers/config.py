"""Frozen sampler configurations that round-trip through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

GUIDANCE_SCHEDULES = ("constant", "interval", "ramp")
TARGET_MODES = ("static", "reapprox")


@dataclass(frozen=True)
class GuidanceSchedule:
    """gamma_t as a function of the noise level in [0, 1] (1 = pure noise).

    - ``constant``: ``strength`` everywhere;
    - ``interval``: ``strength`` for levels in [``low``, ``high``] (limited-interval guidance),
      ``outside`` elsewhere;
    - ``ramp``: linear from ``strength`` at level 1 to ``final`` at level 0 (guidance raised
      towards the end of sampling when ``final > strength``), zero outside [``low``, ``high``].
    """

    kind: str = "constant"
    strength: float = 1.0
    low: float = 0.0
    high: float = 1.0
    outside: float = 0.0
    final: float | None = None

    def __post_init__(self):
        if self.kind not in GUIDANCE_SCHEDULES:
            raise ValueError(
                f"unknown guidance schedule {self.kind!r}; choose one of {list(GUIDANCE_SCHEDULES)}"
            )
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(
                f"guidance interval must satisfy 0 <= low <= high <= 1, got ({self.low}, {self.high})"
            )
        if self.strength < 0 or self.outside < 0:
            raise ValueError("guidance strengths must be >= 0")

    def __call__(self, level: float) -> float:
        inside = self.low <= level <= self.high
        if self.kind == "constant":
            return self.strength
        if self.kind == "interval":
            return self.strength if inside else self.outside
        final = self.strength if self.final is None else self.final
        return (final + (self.strength - final) * level) if inside else self.outside


@dataclass(frozen=True)
class NDTMConfig:
    """NDTM settings (DESIGN 4.1). Defaults follow the paper where it gives values.

    Parameters
    ----------
    num_steps: T, steps of the sampling grid.
    inner_steps: N, Adam steps on the control u per sampling step (paper 4-8).
    guidance: gamma_t schedule (a float means a constant schedule).
    lr_start, lr_end: Adam learning rate, linearly decayed over the trajectory.
    kappa: weight of ||u||^2 (paper 1e-4).
    tau: weight of ||eps(x_t + gamma u) - eps(x_t)||^2 (paper 0).
    eta: DDIM eta of the update (0 deterministic, 1 DDPM-like).
    target_mode: 'static' (y* = phi(x*)) or 'reapprox' (y*_t = phi(D(x0_hat(x*_t))), paper Eq. 11-12).
    autocast: bf16 autocast of the networks (meant for CUDA; also honoured on CPU); the control
        u, the Adam state and the losses stay fp32.
    trace: record the fiber loss of x0_hat at every step (costs one decode + phi forward on
        unguided steps).
    """

    num_steps: int = 50
    inner_steps: int = 4
    guidance: GuidanceSchedule = GuidanceSchedule()
    lr_start: float = 0.05
    lr_end: float = 0.01
    kappa: float = 1e-4
    tau: float = 0.0
    eta: float = 0.0
    target_mode: str = "static"
    autocast: bool = False
    trace: bool = True

    def __post_init__(self):
        if isinstance(self.guidance, (int, float)):
            object.__setattr__(self, "guidance", GuidanceSchedule("constant", float(self.guidance)))
        elif isinstance(self.guidance, dict):
            object.__setattr__(self, "guidance", GuidanceSchedule(**self.guidance))
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.inner_steps < 0:
            raise ValueError(f"inner_steps must be >= 0, got {self.inner_steps}")
        if self.target_mode not in TARGET_MODES:
            raise ValueError(
                f"unknown target_mode {self.target_mode!r}; choose one of {list(TARGET_MODES)}"
            )
        if self.lr_start < 0 or self.lr_end < 0:
            raise ValueError("learning rates must be >= 0")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.kappa < 0 or self.tau < 0:
            raise ValueError("kappa and tau must be >= 0")

    def lr(self, i: int) -> float:
        """Learning rate at step i of the grid (linear decay)."""
        if self.num_steps == 1:
            return self.lr_start
        f = i / (self.num_steps - 1)
        return self.lr_start + (self.lr_end - self.lr_start) * f

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NDTMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NDTM settings {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)

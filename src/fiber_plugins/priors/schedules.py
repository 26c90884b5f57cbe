"""Noise schedules as pure functions of (a_t, s_t), where x_t = a_t * x0 + s_t * eps.

Both families the package supports fit this form:

- DDPM/DDIM (variance preserving): a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t);
- flow matching (rectified flow): a_t = 1 - sigma_t, s_t = sigma_t.

The grid comes from diffusers' own schedulers (``DDIMScheduler.set_timesteps`` and
``FlowMatchEulerDiscreteScheduler.set_timesteps``), so spacing, offsets and shifts follow the
prior's saved config; every transition is then computed here, functionally, so a guided sampler
can evaluate the same step many times (the stateful ``scheduler.step`` cannot).

Which saved schedulers are read this way is a closed list (:data:`DDPM_SCHEDULERS`,
:data:`FLOW_SCHEDULERS`): any other class (EDM, variance-exploding, consistency, ...) has another
noise process, and reading its config as DDPM would sample the wrong objective without a word, so
:func:`make_schedule` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserValueError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

# variance-preserving schedulers defined by the same betas (beta_start / beta_end / beta_schedule
# / trained_betas) as DDPM: the sampler differs, the noise process x_t = a_t x0 + s_t eps does not
DDPM_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DDPMParallelScheduler",
    "DDIMParallelScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "LCMScheduler",
    "TCDScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def schedule_family(class_name: str | None, source: str = "the scheduler config") -> str:
    """'ddpm' or 'flow' for a diffusers scheduler class name; refuses any other class.

    A config without ``_class_name`` (a dict written by hand) is read as DDPM-family.
    """
    name = str(class_name or "")
    if name in FLOW_SCHEDULERS:
        return "flow"
    if not name or name in DDPM_SCHEDULERS:
        return "ddpm"
    known = DDPM_SCHEDULERS + FLOW_SCHEDULERS
    raise UserValueError(
        f"{source} names scheduler {name!r}, which this package cannot sample with (its noise "
        f"process is not DDPM-family or flow matching); supported: {', '.join(known)}"
    )


def make_schedule(scheduler_config: dict, source: str = "the scheduler config"):
    """The :class:`DDPMSchedule` or :class:`FlowSchedule` a saved scheduler config describes."""
    family = schedule_family(scheduler_config.get("_class_name"), source)
    return FlowSchedule(scheduler_config) if family == "flow" else DDPMSchedule(scheduler_config)


@dataclass(frozen=True)
class Step:
    """One transition t -> s of the sampling grid.

    ``timestep`` is what the network is called with; ``level`` in [0, 1] is the noise level
    (1 = pure noise) used by guidance schedules; ``a_t, s_t, a_s, s_s`` the coefficients.
    """

    index: int
    timestep: float
    level: float
    a_t: float
    s_t: float
    a_s: float
    s_s: float


class DDPMSchedule:
    """Variance-preserving schedule read from a diffusers scheduler config (DDPM/DDIM family)."""

    family = "ddpm"

    def __init__(self, scheduler_config: dict):
        from diffusers import DDIMScheduler

        cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        if cfg.get("timestep_type", "discrete") != "discrete":
            # the network takes a function of sigma as its timestep (EDM-style preconditioning)
            raise UserValueError(
                f"timestep_type {cfg['timestep_type']!r} is not supported: the denoiser must take "
                "the discrete DDPM timestep ('discrete')"
            )
        try:
            self.ddim = DDIMScheduler.from_config(cfg)
        except NotImplementedError:  # an unknown beta_schedule
            raise UserValueError(
                f"beta_schedule {cfg.get('beta_schedule')!r} is not supported; one of 'linear', "
                "'scaled_linear', 'squaredcos_cap_v2' (or trained_betas)"
            ) from None
        self.config = dict(self.ddim.config)
        self.prediction_type = self.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserValueError(
                f"prediction_type {self.prediction_type!r} is not supported for a DDPM-family "
                "prior; expected 'epsilon', 'v_prediction' or 'sample'"
            )
        self.alphas_cumprod = self.ddim.alphas_cumprod  # float32, as diffusers computes
        self.final_alpha_cumprod = float(self.ddim.final_alpha_cumprod)
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.clip_sample = bool(self.config.get("clip_sample", False))
        self.clip_sample_range = float(self.config.get("clip_sample_range", 1.0))

    def grid(self, num_steps: int) -> list[Step]:
        if num_steps < 1 or num_steps > self.num_train_timesteps:
            raise UserValueError(
                f"num_steps={num_steps} must be in 1..{self.num_train_timesteps} for this prior"
            )
        self.ddim.set_timesteps(num_steps)
        ratio = self.num_train_timesteps // num_steps
        steps = []
        for i, t in enumerate(self.ddim.timesteps.tolist()):
            prev = t - ratio  # diffusers' DDIM rule for the previous timestep
            ab_t = float(self.alphas_cumprod[t])
            ab_s = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
            steps.append(
                Step(
                    index=i,
                    timestep=float(t),
                    level=float(t) / (self.num_train_timesteps - 1),
                    a_t=ab_t**0.5,
                    s_t=(1 - ab_t) ** 0.5,
                    a_s=ab_s**0.5,
                    s_s=(1 - ab_s) ** 0.5,
                )
            )
        return steps

    def coefficients(self, timestep: float) -> tuple[float, float]:
        ab = float(self.alphas_cumprod[int(timestep)])
        return ab**0.5, (1 - ab) ** 0.5


class FlowSchedule:
    """Flow-matching schedule: x_t = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0."""

    family = "flow"
    prediction_type = "flow"
    clip_sample = False
    clip_sample_range = 1.0

    def __init__(self, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        cfg = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        self.config = dict(self.scheduler.config)
        self.num_train_timesteps = int(self.config["num_train_timesteps"])

    def grid(self, num_steps: int) -> list[Step]:
        if num_steps < 1:
            raise UserValueError(f"num_steps={num_steps} must be >= 1")
        kwargs = {}
        if self.config.get("use_dynamic_shifting"):
            kwargs["mu"] = 0.0
        self.scheduler.set_timesteps(num_steps, **kwargs)
        sig = self.scheduler.sigmas.double().tolist()
        ts = self.scheduler.timesteps.double().tolist()
        return [
            Step(
                index=i,
                timestep=float(ts[i]),
                level=float(sig[i]),
                a_t=1 - sig[i],
                s_t=sig[i],
                a_s=1 - sig[i + 1],
                s_s=sig[i + 1],
            )
            for i in range(len(ts))
        ]

    def coefficients(self, timestep: float) -> tuple[float, float]:
        sigma = float(timestep) / self.num_train_timesteps
        return 1 - sigma, sigma


def split_prediction(
    out: torch.Tensor, x: torch.Tensor, a: float, s: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from the network output at x_t = a x0 + s eps (Tweedie's estimate)."""
    if prediction_type == "epsilon":
        return out, (x - s * out) / a
    if prediction_type == "v_prediction":
        return a * out + s * x, a * x - s * out
    if prediction_type == "sample":
        return (x - a * out) / s, out
    if prediction_type == "flow":
        return x + a * out, x - s * out
    raise UserValueError(f"unknown prediction_type {prediction_type!r}; one of {PREDICTION_TYPES}")


def ddim_update(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    step: Step,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_s = a_s x0 + sqrt(s_s^2 - sigma^2) eps + sigma z with the DDIM sigma (eta=0: deterministic).

    sigma^2 = eta^2 s_s^2 (1 - (a_t s_s / (a_s s_t))^2), which for a VP schedule is DDIM's
    eta^2 (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s); for flow matching with eta=0 this is one Euler step.
    """
    sigma = 0.0
    if eta > 0 and step.s_s > 0 and step.a_s > 0 and step.s_t > 0:
        ratio = (step.a_t * step.s_s) / (step.a_s * step.s_t)
        sigma = eta * step.s_s * max(0.0, 1.0 - ratio**2) ** 0.5
    x = step.a_s * x0_hat + max(step.s_s**2 - sigma**2, 0.0) ** 0.5 * eps_hat
    if sigma > 0:
        if noise is None:
            raise UserValueError("eta > 0 needs a noise tensor")
        x = x + sigma * noise
    return x

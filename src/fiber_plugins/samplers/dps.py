"""DPS-style guidance (DESIGN 4.3; Chung et al. 2023, "Diffusion Posterior Sampling"): the
cheapest guided sampler, one gradient of the fiber loss per sampling step.

At each step t -> s, with one network forward at x_t:

    eps, x0_hat = prior(x_t)                       (kept in the graph)
    g = grad_{x_t} d(phi(D(x0_hat)), y*)            (or of sqrt(d) with normalize=True)
    x_s = DDIM(x0_hat, eps; eta) - scale_t * g      (the update uses the detached eps, x0_hat)

as in Chung et al. (Alg. 1), where the gradient taken at x_t is applied to the updated state.
A row whose fiber loss, gradient or guided state stops being finite fails at once with that
reason; it is never carried on as if unguided. The prior may be a trained conditional fiber model:
each row's network calls are then conditioned on its own target y* (as for NDTM).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .._utils import median
from ._common import SettingsMixin, check_bool, check_float, check_int, finite_rows, row_mask
from .batch import Batch, mark_nonfinite
from .config import GuidanceSchedule, check_guidance
from .engine import FiberSampler


@dataclass(frozen=True)
class DPSConfig(SettingsMixin):
    """DPS settings.

    Parameters
    ----------
    num_steps: T, steps of the sampling grid.
    guidance: scale_t, the step size of the gradient, as a function of the noise level: a float
        (constant) or a :class:`GuidanceSchedule`.
    normalize: take the gradient of sqrt(d) instead of d, i.e. divide the gradient of the fiber
        loss by 2 sqrt(d) per sample: Chung et al. differentiate the residual *norm*
        ||y - A(x0_hat)||, so the step size does not shrink as the loss does.
    eta: DDIM eta of the update (0 deterministic, 1 DDPM-like).
    autocast: bf16 autocast of the networks; the state and losses stay fp32.
    """

    _label = "DPS"

    num_steps: int = 50
    guidance: GuidanceSchedule = GuidanceSchedule()
    normalize: bool = True
    eta: float = 0.0
    autocast: bool = False

    def __post_init__(self):
        self._check("num_steps", check_int, 1)
        self._check("guidance", check_guidance)
        self._check("normalize", check_bool)
        self._check("eta", check_float, 0.0, 1.0)
        self._check("autocast", check_bool)


class DPSSampler(FiberSampler):
    """Guided sampling with one fiber-loss gradient per step (DPS).

    Cost per step: one prior forward + backward, one decode forward + backward, one phi forward +
    backward; the loss trace is the fiber loss of x0_hat at each step (free: it is the guided loss).

    Examples
    --------
    >>> result = DPSSampler(prior, objective, num_steps=50, guidance=1.0).sample(  # doctest: +SKIP
    ...     references=[x_ref], n=8)
    """

    name = "dps"

    config_class = DPSConfig

    conditional = True  # a ConditionalFiberModel prior is conditioned on each row's y*

    def probe_config(self) -> DPSConfig:
        """One guided step (a schedule that is off at pure noise would measure too little)."""
        return replace(self.config, num_steps=1, guidance=1.0)

    def run_batch(self, batch: Batch, progress: tqdm | None):
        """DPS on one batch: each step's update is pushed down the gradient of the fiber loss of
        x0_hat(x_t).

        Returns
        -------
        (images (B, C, H, W) in [-1, 1], fiber-loss trace (B, T)).
        """
        cfg, prior = self.config, self.prior
        steps = prior.timesteps(cfg.num_steps)
        x = batch.x_T.float()
        alive = batch.alive
        trace = torch.full((x.shape[0], len(steps)), float("nan"), device=x.device)
        for step in steps:
            scale = float(cfg.guidance(step.level))
            at = f"at step {step.index} (guidance {scale:g})"
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(scale > 0)
                with self.autocast():
                    eps, x0 = self.predict(x_in, step, batch)
                    img = prior.decode(x0)
                fl = self.fiber_loss(img, batch.target)
                batch.fail(alive & ~torch.isfinite(fl), f"non-finite fiber loss of x0_hat {at}")
                grad = None
                if scale > 0:
                    J = fl.clamp_min(1e-12).sqrt() if cfg.normalize else fl
                    J = torch.where(alive, J, torch.zeros_like(J))
                    (grad,) = torch.autograd.grad(J.sum(), x_in)
            with torch.no_grad():
                fl = fl.detach()
                trace[:, step.index] = fl
                z = batch.step_noise(x) if cfg.eta > 0 else None
                x = prior.update(x0.detach().float(), eps.detach().float(), step, cfg.eta, z)
                if grad is not None:
                    batch.fail(
                        alive & ~finite_rows(grad), f"non-finite gradient of the guidance {at}"
                    )
                    grad = torch.where(row_mask(alive, grad), grad, torch.zeros_like(grad))
                    x = x - scale * grad.float()
                state = "guided state" if grad is not None else "sampling state"
                batch.fail(alive & ~finite_rows(x), f"non-finite {state} {at}")
                x = mark_nonfinite(x, alive, fl)
            if progress is not None:
                progress.update(len(batch.rows))
                if step.index % 5 == 0 or step.index == len(steps) - 1:
                    vals = fl[alive]
                    if vals.numel():
                        progress.set_postfix(fiber_loss=f"{median(vals):.4g}")
        with torch.no_grad(), self.autocast():
            img = prior.decode(x)
        return img.float(), trace

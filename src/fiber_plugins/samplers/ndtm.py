"""NDTM: per-step optimal control of the sampling trajectory (DESIGN 4.1; paper Sec. 3.2, App. C).

At every step t -> s of the DDIM grid a control u (initialised to zero) is optimised with N Adam
(or, with ``optimiser='sgd'``, plain gradient) steps on

    J(u) = d(phi(D(x0_hat(x_t + gamma_t u))), y*_t) + kappa ||u||^2
           + tau ||eps(x_t + gamma_t u, t) - eps(x_t, t)||^2,

each term summed per sample; then the usual DDIM update is taken from x'_t = x_t + gamma_t u.

A row whose fiber loss, guidance gradient, control or guided state stops being finite fails at
once with that reason (``result.reason(r, m)``); it is never carried on as if unguided.

The prior may be a trained :class:`~fiber_plugins.priors.ConditionalFiberModel` (the paper's
conclusion: NDTM combined with a conditional model): every network call is then conditioned on
the row's own static target y* (:meth:`FiberSampler.predict`), and the control corrects the
conditional flow's trajectory with the fiber loss as usual. With zero control (``guidance=0``)
the sampler is exactly :class:`~fiber_plugins.samplers.ConditionalFiberSampler`'s Euler sampling.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .._utils import median
from ..objectives.targets import Targets
from ._common import RowOptimiser, finite_rows
from .batch import Batch, mark_nonfinite
from .config import NDTMConfig
from .engine import FiberSampler


def _flat_sum(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).flatten(1).sum(1)


class NDTMSampler(FiberSampler):
    """Guided sampling with NDTM control optimisation.

    Examples
    --------
    >>> sampler = NDTMSampler(prior, objective, NDTMConfig(num_steps=50, inner_steps=4))  # doctest: +SKIP
    >>> result = sampler.sample(references=[x_ref], n=8, seed=0)
    >>> result.save("runs/fiber")
    """

    name = "ndtm"

    config_class = NDTMConfig

    conditional = True  # a ConditionalFiberModel prior is conditioned on each row's y*

    def probe_config(self) -> NDTMConfig:
        """One guided step with the same inner loop: the peak memory of a whole run."""
        with warnings.catch_warnings():  # the config's warnings were given when it was built
            warnings.simplefilter("ignore")
            return replace(
                self.config, num_steps=1, guidance=1.0, inner_steps=max(1, self.config.inner_steps)
            )

    def _step_target(self, batch: Batch, step, noise_ref: torch.Tensor | None):
        """The static y*, or the re-approximated y*_t = phi(D(x0_hat(x*_t)))."""
        if self.config.target_mode == "static" or batch.ref_latent is None or noise_ref is None:
            return batch.target
        with torch.no_grad(), self.autocast():
            x_ref_t = self.prior.add_noise(batch.ref_latent, noise_ref, step)
            _, x0 = self.predict(x_ref_t, step, batch)
            feats = self.objective.features(self.prior.decode(x0))
        return Targets.of(feats).float().value

    def run_batch(self, batch: Batch, progress: tqdm | None):
        """NDTM on one batch: at each step, N optimiser steps on the control u of x_t + gamma u,
        then the DDIM update from the guided state.

        Returns
        -------
        (images (B, C, H, W) in [-1, 1], fiber-loss trace (B, T) of the last inner step).
        """
        cfg, prior = self.config, self.prior
        steps = prior.timesteps(cfg.num_steps)
        x = batch.x_T.float()
        alive = batch.alive
        trace = torch.full((x.shape[0], len(steps)), float("nan"), device=x.device)
        noise_ref = batch.step_noise(x) if batch.ref_latent is not None else None
        for step in steps:
            gamma = float(cfg.guidance(step.level))
            guided = gamma > 0 and cfg.inner_steps > 0
            if guided:
                target_t = self._step_target(batch, step, noise_ref)
                x_in, fl = self._control(batch, x, step, gamma, cfg.lr(step.index), target_t)
                trace[:, step.index] = fl
            else:
                x_in = x
            with torch.no_grad():
                with self.autocast():
                    eps, x0 = self.predict(x_in, step, batch)
                eps, x0 = eps.float(), x0.float()
                if cfg.trace and not guided:
                    with self.autocast():
                        img = prior.decode(x0)
                    trace[:, step.index] = self.fiber_loss(img, batch.target)
                z = batch.step_noise(x) if cfg.eta > 0 else None
                x = prior.update(x0, eps, step, eta=cfg.eta, noise=z)
                batch.fail(
                    alive & ~finite_rows(x), f"non-finite sampling state after step {step.index}"
                )
                x = mark_nonfinite(x, alive, trace[:, step.index] if guided else x.new_ones(1))
            if progress is not None:
                progress.update(len(batch.rows))
                if step.index % 5 == 0 or step.index == len(steps) - 1:
                    vals = trace[:, step.index][alive]
                    if vals.numel():
                        progress.set_postfix(fiber_loss=f"{median(vals):.4g}")
        with torch.no_grad(), self.autocast():
            img = prior.decode(x)
        return img.float(), trace

    def _control(self, batch: Batch, x, step, gamma, lr, target):
        """N optimiser steps on u; returns the guided state x + gamma u and the last fiber loss.

        Rows whose loss, gradient, control or guided state is not finite fail here with that
        reason (``batch.fail``); the rest of the batch goes on.
        """
        cfg, prior = self.config, self.prior
        alive = batch.alive
        at = f"at step {step.index} (guidance {gamma:g})"
        # tau > 0 needs eps(x_t): the first inner evaluation is at u = 0, i.e. exactly x_t, so it
        # is taken from there instead of a separate forward (its tau term is 0 with zero gradient)
        eps_ref = None
        u = torch.zeros_like(x)
        # a fresh optimiser state per sampling step; element-wise, so each sample's update is
        # independent of the rest of the batch, and failed rows stay where they are
        opt = RowOptimiser(cfg.optimiser, lr)
        fl = torch.zeros(x.shape[0], device=x.device)
        for _ in range(cfg.inner_steps):
            u.requires_grad_(True)
            with torch.enable_grad():
                x_g = x + gamma * u
                with self.autocast():
                    eps, x0 = self.predict(x_g, step, batch)
                    img = prior.decode(x0)
                fl = self.fiber_loss(img, target)
                J = fl + cfg.kappa * _flat_sum(u)
                if cfg.tau > 0:
                    if eps_ref is None:
                        eps_ref = eps.detach().float()
                    else:
                        J = J + cfg.tau * _flat_sum(eps.float() - eps_ref)
                batch.fail(alive & ~torch.isfinite(fl), f"non-finite fiber loss of x0_hat {at}")
                batch.fail(alive & ~torch.isfinite(J), f"non-finite control objective J(u) {at}")
                J = torch.where(alive, J, torch.zeros_like(J))
                (grad,) = torch.autograd.grad(J.sum(), u)
            u = u.detach()
            fl = fl.detach()
            step_u = opt.update(0, u, grad, alive)
            batch.fail(step_u.bad_gradient, f"non-finite gradient of the guidance {at}")
            # an overflowing second moment would turn the Adam step into 0: unguided, silently
            batch.fail(step_u.bad_moment, f"the squared guidance gradient overflows float32 {at}")
            batch.fail(step_u.bad_update, f"non-finite control u {at}")
            u = step_u.param
        x_g = (x + gamma * u).detach()
        batch.fail(alive & ~finite_rows(x_g), f"non-finite guided state x_t + gamma u {at}")
        return x_g, fl


def sample_fiber(
    prior,
    objective,
    references=None,
    targets=None,
    n: int = 4,
    seed: int = 0,
    batch_size: int | str | None = None,
    progress: bool = True,
    out=None,
    resume: bool = False,
    overwrite: bool = False,
    **ndtm_settings,
):
    """One call: NDTM fiber samples of ``objective`` for each reference (or explicit target).

    Parameters
    ----------
    prior:
        A :class:`~fiber_plugins.DiffusionPrior`, or a folder / Hub id for
        :func:`~fiber_plugins.load_prior`.
    objective:
        The :class:`~fiber_plugins.FiberObjective`.
    references, targets, n, seed, batch_size, progress, out, resume, overwrite:
        As in :meth:`FiberSampler.sample <fiber_plugins.samplers.engine.FiberSampler.sample>`.
    ndtm_settings:
        :class:`NDTMConfig` fields (``num_steps``, ``inner_steps``, ``guidance``, ...).

    Returns
    -------
    FiberResult: images (R, n, C, H, W) in [0, 1], fiber_loss (R, n), loss_trace (R, n, T).

    Examples
    --------
    >>> result = sample_fiber("path/to/prior", objective, ["cat.png"], n=8)  # doctest: +SKIP
    """
    from ..priors import DiffusionPrior, load_prior

    if not isinstance(prior, DiffusionPrior):
        prior = load_prior(prior)
    sampler = NDTMSampler(prior, objective, NDTMConfig.from_dict(ndtm_settings))
    return sampler.sample(
        references=references,
        targets=targets,
        n=n,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        out=out,
        resume=resume,
        overwrite=overwrite,
    )

"""Initial-noise optimisation (DESIGN 4.2; thesis Alg. 1, DiG-IN, DOODL, DNO).

The starting noise z_T (optionally also every per-step noise of a stochastic chain) is optimised
through the *whole* sampling chain of ``num_steps`` steps:

    L(z) = lambda * ( d(phi(x), y*) + d(phi(LowPass_fc(x)), y*) ),   x = D(chain(z_T)),

with gradient checkpointing per network call, so the activation memory of one iteration does not
grow with ``num_steps`` (each step keeps only its input; the network is re-run in the backward
pass). z is kept on its Gaussian shell (renormalised per row to its initial norm, as DiG-IN does)
or pulled there by a norm prior. A row stops as soon as its fiber loss falls below ``threshold``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..evaluation.lowpass import lowpass as lowpass_filter
from ..objectives.base import target_rows
from ..priors.schedules import Step
from ._common import (
    OPTIMISERS,
    RowOptimiser,
    SettingsMixin,
    check_choice,
    check_int,
    check_positive,
    row_mask,
)
from .engine import Batch, FiberSampler, mark_nonfinite
from .result import FiberResult

OPTIMISE = ("z_T", "all")
NORMS = ("shell", "prior", "none")


@dataclass(frozen=True)
class NoiseOptConfig(SettingsMixin):
    """Initial-noise optimisation settings (DESIGN 4.2). Defaults follow the thesis.

    Parameters
    ----------
    num_steps: steps of the sampling chain that is differentiated end to end.
    max_iters: optimisation budget per row (thesis 512-1024); also the trace length.
    optimiser: 'sgd' (thesis, lr 10) or 'adam'.
    lr: learning rate.
    optimise: 'z_T' (the starting noise) or 'all' (z_T and every per-step noise; needs eta > 0).
    eta: DDIM eta of the chain; 0 is the deterministic DDIM / Euler chain. With eta > 0 the
        per-step noises are drawn once per row and then fixed (or optimised with 'all').
    loss_weight: lambda.
    lowpass: cutoff (fraction of Nyquist, in (0, 1]) of the ideal low-pass term; ``None`` drops
        the second term.
    norm: 'shell' (renormalise each optimised noise to its initial norm after every step),
        'prior' (add norm_weight * (||z||^2 / D - 1)^2 per noise) or 'none'.
    norm_weight: weight of the norm prior.
    threshold: a row stops (is frozen, its best image kept) once its fiber loss
        d(phi(x), y*) is below this; ``None`` runs every row for ``max_iters``.
    checkpointing: recompute each network call in the backward pass instead of storing its
        activations (memory independent of ``num_steps``, ~1 extra forward per step).
    autocast: bf16 autocast of the networks; the noises, optimiser state and losses stay fp32.
    """

    _label = "noise-optimisation"

    num_steps: int = 20
    max_iters: int = 512
    optimiser: str = "sgd"
    lr: float = 10.0
    optimise: str = "z_T"
    eta: float = 0.0
    loss_weight: float = 1.0
    lowpass: float | None = 0.5
    norm: str = "shell"
    norm_weight: float = 1.0
    threshold: float | None = 0.01
    checkpointing: bool = True
    autocast: bool = False

    def __post_init__(self):
        check_int("num_steps", self.num_steps, 1)
        check_int("max_iters", self.max_iters, 1)
        check_choice("optimiser", self.optimiser, OPTIMISERS)
        check_choice("optimise", self.optimise, OPTIMISE)
        check_choice("norm", self.norm, NORMS)
        check_positive("lr", self.lr)
        check_positive("loss_weight", self.loss_weight)
        check_positive("norm_weight", self.norm_weight, allow_zero=True)
        if not (isinstance(self.eta, (int, float)) and 0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.optimise == "all" and self.eta == 0:
            raise ValueError(
                f"optimise='all' optimises the per-step noises, which only enter the chain when "
                f"eta > 0; got eta={self.eta!r} (use optimise='z_T' or set eta > 0)"
            )
        if self.lowpass is not None and not (
            isinstance(self.lowpass, (int, float)) and 0.0 < self.lowpass <= 1.0
        ):
            raise ValueError(
                f"lowpass must be a cutoff in (0, 1] (fraction of Nyquist) or None, got {self.lowpass!r}"
            )
        if self.threshold is not None:
            check_positive("threshold", self.threshold, allow_zero=True)


class NoiseOptSampler(FiberSampler):
    """Fiber samples by optimising the initial noise through the whole sampler chain.

    The loss trace holds each iteration's fiber loss d(phi(x), y*) (length ``max_iters``); a row
    that reached ``threshold`` has NaN after its last iteration, and
    ``result.config["iterations"]`` lists the iterations each row used. Each row returns the
    image with the lowest fiber loss it reached.

    Examples
    --------
    >>> sampler = NoiseOptSampler(prior, objective, num_steps=20, max_iters=512)  # doctest: +SKIP
    >>> result = sampler.sample(references=[x_ref], n=4, seed=0)
    >>> result.config["iterations"]
    """

    name = "noise_opt"

    config_class = NoiseOptConfig

    def num_trace_steps(self) -> int:
        return self.config.max_iters

    def probe_config(self) -> NoiseOptConfig:
        """One iteration through the whole chain (memory does not grow with iterations)."""
        return replace(self.config, max_iters=1, threshold=None)

    def sample(
        self,
        references=None,
        targets=None,
        n: int = 4,
        seed: int = 0,
        batch_size: int | str | None = None,
        progress: bool = True,
    ) -> FiberResult:
        """As :meth:`FiberSampler.sample`; adds ``config["iterations"]`` (R, M): the
        iterations each row ran before reaching ``threshold`` (or ``max_iters``)."""
        result = super().sample(references, targets, n, seed, batch_size, progress)
        result.config["iterations"] = torch.isfinite(result.loss_trace).sum(-1).tolist()
        return result

    # ------------------------------------------------------------------ the chain
    def _transition(self, x: torch.Tensor, step: Step, noise: torch.Tensor | None) -> torch.Tensor:
        with self.autocast():
            eps, x0 = self.prior.predict(x, step)
        return self.prior.update(x0.float(), eps.float(), step, eta=self.config.eta, noise=noise)

    def generate(
        self, z: torch.Tensor, noises: list[torch.Tensor] | None, steps: list[Step]
    ) -> torch.Tensor:
        """Images in [-1, 1] from z_T through the chain; differentiable in z and the noises."""
        x = z
        for i, step in enumerate(steps):
            noise = noises[i] if noises is not None else None
            if self.config.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._transition, x, step, noise, use_reentrant=False)
            else:
                x = self._transition(x, step, noise)
        with self.autocast():
            img = self.prior.decode(x)
        return img.float()

    def _loss(self, img, target, opt_params) -> tuple[torch.Tensor, torch.Tensor]:
        """(fiber loss d(phi(x), y*), the optimised loss), both (B,)."""
        cfg = self.config
        fl = self.fiber_loss(img, target)
        total = fl
        if cfg.lowpass is not None:
            total = total + self.fiber_loss(lowpass_filter(img, cfg.lowpass), target)
        total = cfg.loss_weight * total
        if cfg.norm == "prior" and cfg.norm_weight > 0:
            for p in opt_params:
                dim = p[0].numel()
                total = total + cfg.norm_weight * (p.pow(2).flatten(1).sum(1) / dim - 1).pow(2)
        return fl, total

    # ------------------------------------------------------------------ the algorithm
    def run_batch(self, batch: Batch, progress: tqdm | None):
        cfg, prior = self.config, self.prior
        steps = prior.timesteps(cfg.num_steps)
        z = batch.x_T.float()
        b = z.shape[0]
        noises = [batch.step_noise(z) for _ in steps] if cfg.eta > 0 else None
        # the optimised tensors: z_T, then (optimise='all') the per-step noises
        params = [z] + (list(noises) if cfg.optimise == "all" else [])
        radii = [p.flatten(1).norm(dim=1) for p in params]
        opt = RowOptimiser(cfg.optimiser, cfg.lr)
        alive = batch.alive
        active = alive.clone()
        trace = torch.full((b, cfg.max_iters), math.nan, device=z.device)
        best_loss = torch.full((b,), math.inf, device=z.device)
        best_img = torch.zeros(b, prior.image_channels, *prior.image_size, device=z.device)
        for k in range(cfg.max_iters):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                if progress is not None:
                    progress.update(len(batch.rows) * (cfg.max_iters - k))
                break
            backward = k < cfg.max_iters - 1  # the last evaluation needs no gradient
            sub = [p[idx].detach().requires_grad_(backward) for p in params]
            sub_noises = None
            if noises is not None:
                sub_noises = sub[1:] if cfg.optimise == "all" else [n[idx] for n in noises]
            with torch.set_grad_enabled(backward):
                img = self.generate(sub[0], sub_noises, steps)
                fl, total = self._loss(img, target_rows(batch.target, idx), sub)
            fl_d = fl.detach()
            finite = torch.isfinite(fl_d) & torch.isfinite(img.detach()).flatten(1).all(1)
            trace[idx, k] = fl_d
            better = finite & (fl_d < best_loss[idx])
            best_loss[idx] = torch.where(better, fl_d, best_loss[idx])
            best_img[idx] = torch.where(row_mask(better, img), img.detach(), best_img[idx])
            alive[idx] &= finite
            done = torch.zeros_like(finite)
            if cfg.threshold is not None:
                done = finite & (fl_d < cfg.threshold)
            active[idx] &= finite & ~done
            go = finite & ~done
            if backward and bool(go.any()):
                objective = torch.where(go, total, torch.zeros_like(total)).sum()
                # the last step's noise never enters the chain (no noise is added at s = 0)
                grads = torch.autograd.grad(objective, sub, allow_unused=True)
                for j, (p, g) in enumerate(zip(params, grads)):
                    if g is None:
                        continue
                    full = torch.zeros_like(p)
                    full[idx] = g.float()
                    p = opt.step(j, p, full, active)
                    if cfg.norm == "shell":
                        scale = radii[j] / p.flatten(1).norm(dim=1).clamp_min(1e-12)
                        p = torch.where(row_mask(active, p), p * row_mask(scale, p), p)
                    params[j] = mark_nonfinite(p, alive)
                active &= alive
                if cfg.optimise == "all":
                    noises = params[1:]
            if progress is not None:
                progress.update(len(batch.rows))
                if k % 5 == 0 or k == cfg.max_iters - 1:
                    vals = fl_d[finite]
                    if vals.numel():
                        progress.set_postfix(fiber_loss=f"{vals.median().item():.4g}")
        return best_img, trace

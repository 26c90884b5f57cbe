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

from .._utils import median
from ..errors import UserValueError
from ..filters import lowpass as lowpass_filter
from ..objectives.targets import Targets
from ..priors.schedules import Step
from ._common import (
    OPTIMISERS,
    RowOptimiser,
    SettingsMixin,
    check_bool,
    check_choice,
    check_float,
    check_int,
    finite_rows,
    row_mask,
)
from .batch import Batch, mark_nonfinite
from .engine import FiberSampler
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
        self._check("num_steps", check_int, 1)
        self._check("max_iters", check_int, 1)
        self._check("optimiser", check_choice, OPTIMISERS)
        self._check("lr", check_float, 0.0, low_open=True)
        self._check("optimise", check_choice, OPTIMISE)
        self._check("eta", check_float, 0.0, 1.0)
        self._check("loss_weight", check_float, 0.0, low_open=True)
        self._check(
            "lowpass",
            check_float,
            0.0,
            1.0,
            low_open=True,
            optional=True,
            what="a cutoff",
            unit="fraction of Nyquist",
        )
        self._check("norm", check_choice, NORMS)
        self._check("norm_weight", check_float, 0.0)
        self._check("threshold", check_float, 0.0, optional=True)
        self._check("checkpointing", check_bool)
        self._check("autocast", check_bool)
        if self.optimise == "all" and self.eta == 0:
            raise UserValueError(
                f"optimise='all' optimises the per-step noises, which only enter the chain when "
                f"eta > 0; got eta={self.eta!r} (use optimise='z_T' or set eta > 0)"
            )


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
        """The trace holds one fiber loss per optimisation iteration."""
        return self.config.max_iters

    def probe_config(self) -> NoiseOptConfig:
        """One iteration through the whole chain (memory does not grow with iterations)."""
        return replace(self.config, max_iters=1, threshold=None)

    def annotate(self, result: FiberResult) -> None:
        """``config["iterations"]`` (R, M): the iterations each row ran before reaching
        ``threshold`` (or ``max_iters``)."""
        result.config["iterations"] = torch.isfinite(result.loss_trace).sum(-1).tolist()

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
        """Optimise the initial noise x_T of one batch through the (checkpointed) sampler.

        Returns
        -------
        (images (B, C, H, W) in [-1, 1], fiber-loss trace (B, iterations)).
        """
        cfg, prior = self.config, self.prior
        steps = prior.timesteps(cfg.num_steps)
        z = batch.x_T.float()
        b = z.shape[0]
        noises = [batch.step_noise(z) for _ in steps] if cfg.eta > 0 else None
        # the optimised tensors: z_T, then (optimise='all') the per-step noises
        params = [z] + (list(noises) if noises is not None and cfg.optimise == "all" else [])
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
                fl, total = self._loss(img, Targets.of(batch.target).rows(idx).value, sub)
            fl_d = fl.detach()
            finite = torch.isfinite(fl_d) & finite_rows(img.detach())
            trace[idx, k] = fl_d
            better = finite & (fl_d < best_loss[idx])
            best_loss[idx] = torch.where(better, fl_d, best_loss[idx])
            best_img[idx] = torch.where(row_mask(better, img), img.detach(), best_img[idx])
            batch.fail(
                _scatter(~finite, idx, b),
                f"non-finite image or fiber loss at iteration {k}",
            )
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
                    p, bad = opt.step(j, p, full, active)
                    batch.fail(bad, f"non-finite gradient step on the noise at iteration {k}")
                    if cfg.norm == "shell":
                        scale = radii[j] / p.flatten(1).norm(dim=1).clamp_min(1e-12)
                        p = torch.where(row_mask(active, p), p * row_mask(scale, p), p)
                    batch.fail(
                        alive & ~finite_rows(p), f"non-finite optimised noise at iteration {k}"
                    )
                    params[j] = mark_nonfinite(p, alive)
                active &= alive
                if cfg.optimise == "all":
                    noises = params[1:]
            if progress is not None:
                progress.update(len(batch.rows))
                if k % 5 == 0 or k == cfg.max_iters - 1:
                    vals = fl_d[finite]
                    if vals.numel():
                        progress.set_postfix(fiber_loss=f"{median(vals):.4g}")
        return best_img, trace


def _scatter(sub: torch.Tensor, idx: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) bool, ``sub`` at the rows ``idx`` and False elsewhere."""
    full = torch.zeros(size, dtype=torch.bool, device=sub.device)
    full[idx] = sub
    return full

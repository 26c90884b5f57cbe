"""Pixel-space inversion baseline (DESIGN 4.3; Mahendran & Vedaldi 2015).

Gradient descent (Adam) on the image x itself, without a diffusion prior:

    min_x  d(phi(x), y*) + tv_weight * TV_beta(x) + l2_weight * ||x||^2,   x in [-1, 1],

starting from the row's noise clamped to [-1, 1]. It reaches low fiber losses with adversarial,
non-semantic images: the comparison that shows what the diffusion prior buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._utils import median
from ..errors import UserValueError
from ._common import (
    OPTIMISERS,
    RowOptimiser,
    SettingsMixin,
    check_bool,
    check_choice,
    check_float,
    check_int,
)
from .batch import Batch, mark_nonfinite
from .engine import FiberSampler


def total_variation(x: torch.Tensor, beta: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """TV_beta per image: sum over pixels and channels of ((dx)^2 + (dy)^2)^(beta / 2); (B,).

    ``beta=2`` is the squared-gradient (smooth) penalty, ``beta=1`` the isotropic TV norm (with
    ``eps`` inside the square root so its gradient is defined on flat regions).
    """
    if x.dim() != 4:
        raise UserValueError(f"total_variation needs (B, C, H, W) images, got {tuple(x.shape)}")
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    sq = dx.pow(2) + dy.pow(2)
    tv = sq if beta == 2 else (sq + eps).pow(beta / 2)
    return tv.flatten(1).sum(1)


@dataclass(frozen=True)
class PixelInversionConfig(SettingsMixin):
    """Pixel inversion settings.

    Parameters
    ----------
    num_steps: optimisation steps on x (the trace length).
    lr: learning rate (Adam on images in [-1, 1]).
    optimiser: 'adam' (default) or 'sgd'.
    tv_weight: weight of the total-variation prior TV_beta (0 disables it).
    tv_beta: exponent beta of TV_beta (2: squared gradients; 1: isotropic TV).
    l2_weight: weight of ||x||^2 (0 disables it).
    init_scale: x starts at clamp(init_scale * noise, -1, 1).
    autocast: bf16 autocast of the subject; x, optimiser state and losses stay fp32.
    """

    _label = "pixel-inversion"

    num_steps: int = 200
    lr: float = 0.05
    optimiser: str = "adam"
    tv_weight: float = 0.0
    tv_beta: float = 2.0
    l2_weight: float = 0.0
    init_scale: float = 1.0
    autocast: bool = False

    def __post_init__(self):
        self._check("num_steps", check_int, 1)
        self._check("lr", check_float, 0.0, low_open=True)
        self._check("optimiser", check_choice, OPTIMISERS)
        self._check("tv_weight", check_float, 0.0)
        self._check("tv_beta", check_float, 0.0, low_open=True)
        self._check("l2_weight", check_float, 0.0)
        self._check("init_scale", check_float, 0.0)
        self._check("autocast", check_bool)


class PixelInversionSampler(FiberSampler):
    """Fiber "samples" by optimising pixels directly (no prior network; only its image shape).

    The loss trace holds the fiber loss d(phi(x), y*) at each step, before that step's update.

    Examples
    --------
    >>> inv = PixelInversionSampler(prior, objective, num_steps=200, tv_weight=1e-3)  # doctest: +SKIP
    >>> result = inv.sample(references=[x_ref], n=4)
    """

    name = "pixel_inversion"

    config_class = PixelInversionConfig

    def initial_images(self, batch: Batch) -> torch.Tensor:
        """Per-row noise in image space, scaled and clamped to [-1, 1]: x_T itself for pixel
        priors, otherwise an image-shaped draw from each row's generator."""
        prior = self.prior
        shape = (prior.image_channels, *prior.image_size)
        if tuple(batch.x_T.shape[1:]) == shape:
            noise = batch.x_T.float()
        else:
            noise = batch.step_noise(torch.empty(batch.x_T.shape[0], *shape, device=self.device))
        return (self.config.init_scale * noise).clamp(-1, 1)

    def run_batch(self, batch: Batch, progress: tqdm | None):
        """Optimise the pixels of one batch (no prior) towards y*.

        Returns
        -------
        (images (B, C, H, W) in [-1, 1], fiber-loss trace (B, T) over the iterations).
        """
        cfg = self.config
        x = self.initial_images(batch)
        alive = batch.alive
        opt = RowOptimiser(cfg.optimiser, cfg.lr)
        trace = torch.full((x.shape[0], cfg.num_steps), math.nan, device=x.device)
        for k in range(cfg.num_steps):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                fl = self.fiber_loss(x, batch.target)
                J = fl
                if cfg.tv_weight > 0:
                    J = J + cfg.tv_weight * total_variation(x, cfg.tv_beta)
                if cfg.l2_weight > 0:
                    J = J + cfg.l2_weight * x.pow(2).flatten(1).sum(1)
                batch.fail(alive & ~torch.isfinite(fl), f"non-finite fiber loss at step {k}")
                batch.fail(
                    alive & ~torch.isfinite(J), f"non-finite objective (loss + priors) at step {k}"
                )
                J = torch.where(alive, J, torch.zeros_like(J))
                (grad,) = torch.autograd.grad(J.sum(), x)
            with torch.no_grad():
                fl = fl.detach()
                trace[:, k] = fl
                x, bad = opt.step(0, x.detach(), grad, alive)
                batch.fail(bad, f"non-finite gradient step on the image at step {k}")
                x = mark_nonfinite(x.clamp(-1, 1), alive, fl)
            if progress is not None:
                progress.update(len(batch.rows))
                if k % 10 == 0 or k == cfg.num_steps - 1:
                    vals = fl[alive]
                    if vals.numel():
                        progress.set_postfix(fiber_loss=f"{median(vals):.4g}")
        return x.detach(), trace

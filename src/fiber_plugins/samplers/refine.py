"""Latent refinement of finished fiber samples (DESIGN 4.3; paper App. A).

Each given sample x is encoded to the prior's latent z = E(x) (identity for pixel priors) and a
few gradient steps are taken on z against the fiber loss d(phi(D(z)), y*); the image with the
lowest fiber loss seen (the round trip D(E(x)) included) is kept. Cheap polish for samples whose
fiber loss is close but not yet low enough.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import UserTypeError, UserValueError
from ..objectives.base import FiberObjective, target_rows, target_to, target_width
from ..priors.prior import DiffusionPrior
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
from .engine import FiberSampler
from .result import FiberResult


@dataclass(frozen=True)
class LatentRefineConfig(SettingsMixin):
    """Latent refinement settings.

    Parameters
    ----------
    steps: gradient steps on each latent (paper: a few).
    lr: learning rate.
    optimiser: 'adam' (default) or 'sgd'.
    autocast: bf16 autocast of the decoder and subject; latents and losses stay fp32.
    """

    _label = "latent-refinement"

    steps: int = 10
    lr: float = 0.05
    optimiser: str = "adam"
    autocast: bool = False

    def __post_init__(self):
        self._check("steps", check_int, 1)
        self._check("lr", check_float, 0.0, low_open=True)
        self._check("optimiser", check_choice, OPTIMISERS)
        self._check("autocast", check_bool)


class _Refiner(FiberSampler):
    """The engine's loss, autocast and device checks; the loop is :func:`refine_latent`."""

    name = "latent_refine"

    def run_batch(self, batch, progress):
        # refinement starts from given images, not from noise rows: refine_latent owns the loop
        raise UserTypeError("latent refinement starts from given images: call refine_latent(...)")


def refine_latent(
    prior: DiffusionPrior,
    objective: FiberObjective,
    images01,
    targets=None,
    *,
    config: LatentRefineConfig | None = None,
    batch_size: int = 16,
    progress: bool = False,
    **settings,
) -> FiberResult:
    """Refine samples by a few fiber-loss gradient steps on their VAE latents.

    Parameters
    ----------
    prior:
        Its ``encode`` / ``decode`` are used (identity for pixel priors: then the pixels are
        refined); the denoiser is not.
    objective:
        The fiber objective the samples were drawn for.
    images01:
        Samples in [0, 1]: (R, M, C, H, W), (N, C, H, W), or a :class:`FiberResult` (its
        images, targets and references are used; its failed samples stay failed).
    targets:
        y*: (R, K) / (K,) (a tuple for summed objectives). For (N, C, H, W) images, R must be N
        (one target per image, result (N, 1, ...)) or 1 (result (1, N, ...)). Optional when
        ``images01`` is a FiberResult.
    config, settings:
        A :class:`LatentRefineConfig` and/or its fields (``steps=10, lr=0.05, optimiser='adam'``).
    batch_size: samples refined together.
    progress: show a tqdm bar.

    Returns
    -------
    A :class:`FiberResult`: ``fiber_loss`` after refinement, ``loss_trace`` (R, M, steps + 1)
    with the loss of D(z) before (index 0) and after each step; ``config["fiber_loss_input"]``
    holds the loss of the given images as they were, ``config["fiber_loss_before"]`` that of
    the round trip D(E(x)), and ``config["kept_step"]`` the step whose latent was kept.

    Examples
    --------
    >>> result = NDTMSampler(prior, objective).sample(references=[x_ref], n=8)  # doctest: +SKIP
    >>> refined = refine_latent(prior, objective, result, steps=10, lr=0.05)
    """
    config = config or LatentRefineConfig()
    if settings:
        config = LatentRefineConfig.from_dict({**config.to_dict(), **settings})
    check_int("batch_size", batch_size, 1)
    start = time.perf_counter()
    engine = _Refiner(prior, objective, config)
    engine._check_devices()
    device = engine.device

    references, failed_in, source = None, None, images01
    if isinstance(images01, FiberResult):
        if targets is None:
            targets = images01.targets
        references, failed_in = images01.references, images01.failed
        images01 = images01.images
    if targets is None:
        raise UserValueError(
            "refine_latent needs targets= (y*), or a FiberResult that carries them"
        )
    if not isinstance(images01, torch.Tensor) or images01.dim() not in (4, 5):
        raise UserValueError(
            "images01 must be a (R, M, C, H, W) or (N, C, H, W) tensor in [0, 1] or a "
            f"FiberResult, got {type(images01).__name__} "
            f"{tuple(images01.shape) if isinstance(images01, torch.Tensor) else ''}"
        )
    images01 = images01.detach().float().cpu()
    if images01.min() < -1e-3 or images01.max() > 1 + 1e-3:
        raise UserValueError(
            f"images must be in [0, 1], got values in [{images01.min():.3g}, {images01.max():.3g}]"
        )
    with torch.no_grad():
        probe = torch.zeros(1, images01.shape[-3], *images01.shape[-2:], device=device)
        width = target_width(objective.features(probe))
    y = objective.check_target(targets, width)
    num_targets = (y[0] if isinstance(y, tuple) else y).shape[0]
    if images01.dim() == 4:
        n = images01.shape[0]
        if num_targets == n:
            images01 = images01[:, None]
        elif num_targets == 1:
            images01 = images01[None]
        else:
            raise UserValueError(
                f"{n} images but {num_targets} targets; give one target per image or a single one"
            )
    R, M = images01.shape[:2]
    if num_targets not in (1, R):
        raise UserValueError(f"images for {R} targets but {num_targets} targets were given")
    if num_targets == 1 and R > 1:
        y = tuple(t.expand(R, -1) for t in y) if isinstance(y, tuple) else y.expand(R, -1)
    y = target_to(y, device)

    T = config.steps + 1
    images = torch.zeros_like(images01)
    losses = torch.full((R, M), math.nan)
    traces = torch.full((R, M, T), math.nan)
    loss_in = torch.full((R, M), math.nan)
    kept = torch.zeros(R, M, dtype=torch.long)
    failed = torch.zeros(R, M, dtype=torch.bool)
    reasons: list[list[str | None]] = [[None] * M for _ in range(R)]
    rows = [(r, m) for r in range(R) for m in range(M)]
    bar = tqdm(
        total=len(rows) * config.steps,
        desc=engine.name,
        unit="step",
        disable=not progress,
        leave=False,
    )
    try:
        with objective.attached():
            for i in range(0, len(rows), batch_size):
                chunk = rows[i : i + batch_size]
                x = torch.stack([images01[r, m] for r, m in chunk]).to(device) * 2 - 1
                idx = torch.tensor([r for r, _ in chunk], device=device)
                out = _refine_rows(engine, x, target_rows(y, idx), bar)
                for k, (r, m) in enumerate(chunk):
                    images[r, m] = out["images"][k]
                    losses[r, m] = out["loss"][k]
                    traces[r, m] = out["trace"][k]
                    loss_in[r, m] = out["loss_in"][k]
                    kept[r, m] = out["kept"][k]
                    failed[r, m] = out["failed"][k]
                    reasons[r][m] = out["reasons"][k]
    finally:
        bar.close()
    if failed_in is not None:
        failed_in = failed_in.bool()
        for r, m in failed_in.nonzero().tolist():
            reasons[r][m] = f"failed before refinement: {source.reason(r, m)}"
        failed |= failed_in
    images[failed] = 0.0
    losses[failed] = math.nan
    cfg = {
        "sampler": engine.name,
        "settings": config.to_dict(),
        "objective": objective.describe(),
        "prior": repr(prior),
        "batch_size": batch_size,
        "device": str(device),
        "fiber_loss_input": loss_in.tolist(),
        "fiber_loss_before": traces[..., 0].tolist(),
        "kept_step": kept.tolist(),
    }
    return FiberResult(
        images=images,
        references=references,
        fiber_loss=losses,
        loss_trace=traces,
        failed=failed,
        config=cfg,
        wall_time=time.perf_counter() - start,
        targets=tuple(t.cpu() for t in y) if isinstance(y, tuple) else y.cpu(),
        reasons=[
            [why if bool(failed[r, m]) else None for m, why in enumerate(row)]
            for r, row in enumerate(reasons)
        ],
    )


def _refine_rows(engine: _Refiner, x: torch.Tensor, target, bar) -> dict:
    """Refine one batch of images x (B, C, H, W) in [-1, 1]."""
    prior, cfg = engine.prior, engine.config
    b = x.shape[0]
    with torch.no_grad(), engine.autocast():
        loss_in = engine.fiber_loss(x, target)
        z = prior.encode(x.to(prior.dtype)).float()
    alive = torch.ones(b, dtype=torch.bool, device=x.device)
    reasons: list[str | None] = [None] * b

    def fail(rows: torch.Tensor, reason: str) -> None:  # as Batch.fail, for a batch of images
        for i in torch.nonzero(rows & alive).flatten().tolist():
            reasons[i] = reasons[i] or reason
        alive.logical_and_(~rows)

    fail(~finite_rows(z), "the encoded latent E(x) is not finite")
    opt = RowOptimiser(cfg.optimiser, cfg.lr)
    trace = torch.full((b, cfg.steps + 1), math.nan, device=x.device)
    best_loss = torch.full((b,), math.inf, device=x.device)
    best_img = torch.zeros_like(x)
    kept = torch.zeros(b, dtype=torch.long, device=x.device)
    for k in range(cfg.steps + 1):
        backward = k < cfg.steps
        z = z.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            with engine.autocast():
                img = prior.decode(z)
            img = img.float()
            fl = engine.fiber_loss(img, target)
        fl_d = fl.detach()
        fail(~finite_rows(img.detach()), f"non-finite decoded image D(z) at step {k}")
        fail(~torch.isfinite(fl_d), f"non-finite fiber loss at step {k}")
        trace[:, k] = fl_d
        better = alive & (fl_d < best_loss)
        best_loss = torch.where(better, fl_d, best_loss)
        best_img = torch.where(row_mask(better, img), img.detach(), best_img)
        kept = torch.where(better, torch.full_like(kept, k), kept)
        if backward:
            J = torch.where(alive, fl, torch.zeros_like(fl)).sum()
            (grad,) = torch.autograd.grad(J, z)
            z, bad = opt.step(0, z.detach(), grad, alive)
            fail(bad, f"non-finite gradient step on the latent at step {k}")
            if bar is not None:
                bar.update(b)
                bar.set_postfix(
                    fiber_loss=f"{fl_d[alive].median().item():.4g}" if alive.any() else "nan"
                )
    with torch.no_grad():
        img = best_img.clamp(-1, 1)
        loss = engine.fiber_loss(img, target)
    fail(~torch.isfinite(loss), "the fiber loss of the refined sample is not finite")
    return {
        "images": ((img + 1) / 2).cpu(),
        "loss": loss.cpu(),
        "trace": trace.cpu(),
        "loss_in": loss_in.cpu(),
        "kept": kept.cpu(),
        "failed": (~alive).cpu(),
        "reasons": reasons,
    }

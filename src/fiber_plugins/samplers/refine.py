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

from .._utils import to_model_range
from ..errors import UserValueError
from ..objectives.base import FiberObjective
from ..objectives.targets import Targets
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


class LatentRefineSampler(FiberSampler):
    """Latent refinement on the shared engine: each row starts from a given image (not from
    noise) and takes ``config.steps`` gradient steps on its latent; the image of lowest fiber
    loss seen is the row's sample. Built by :func:`refine_latent`, which arranges the images
    and targets; ``images01`` is (R, M, C, H, W) in [0, 1] for R targets."""

    name = "latent_refine"
    config_class = LatentRefineConfig

    def __init__(self, prior, objective, config=None, *, images01: torch.Tensor, **overrides):
        super().__init__(prior, objective, config, **overrides)
        self.images01 = images01

    def num_trace_steps(self) -> int:
        """The trace holds one fiber loss per refinement iteration."""
        return self.config.steps + 1

    def probe_config(self):
        """The probe for ``batch_size='auto'``: one refinement iteration."""
        return self.config

    def initial_state(self, rows, generators) -> torch.Tensor:
        """The given images of ``rows``, (B, C, H, W) in [-1, 1]."""
        return to_model_range(torch.stack([self.images01[r, m] for r, m in rows]).to(self.device))

    def run_batch(self, batch, progress):
        """Refine the encoded latents of one batch of given images.

        Returns
        -------
        (images (B, C, H, W) in [-1, 1], fiber-loss trace (B, iterations)).
        """
        prior, cfg = self.prior, self.config
        x = batch.x_T
        b = x.shape[0]
        with torch.no_grad(), self.autocast():
            z = prior.encode(x.to(prior.dtype)).float()
        alive = batch.alive
        batch.fail(~finite_rows(z), "the encoded latent E(x) is not finite")
        opt = RowOptimiser(cfg.optimiser, cfg.lr)
        trace = torch.full((b, cfg.steps + 1), math.nan, device=x.device)
        best_loss = torch.full((b,), math.inf, device=x.device)
        best_img = torch.zeros_like(x)
        for k in range(cfg.steps + 1):
            backward = k < cfg.steps
            z = z.detach().requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                with self.autocast():
                    img = prior.decode(z)
                img = img.float()
                fl = self.fiber_loss(img, batch.target)
            fl_d = fl.detach()
            batch.fail(~finite_rows(img.detach()), f"non-finite decoded image D(z) at step {k}")
            batch.fail(~torch.isfinite(fl_d), f"non-finite fiber loss at step {k}")
            trace[:, k] = fl_d
            better = alive & (fl_d < best_loss)
            best_loss = torch.where(better, fl_d, best_loss)
            best_img = torch.where(row_mask(better, img), img.detach(), best_img)
            if backward:
                J = torch.where(alive, fl, torch.zeros_like(fl)).sum()
                (grad,) = torch.autograd.grad(J, z)
                z, bad = opt.step(0, z.detach(), grad, alive)
                batch.fail(bad, f"non-finite gradient step on the latent at step {k}")
                if progress is not None:
                    progress.update(b)
        return best_img, trace


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
    A :class:`FiberResult` from the shared engine (:class:`LatentRefineSampler`):
    ``fiber_loss`` after refinement, ``loss_trace`` (R, M, steps + 1) with the loss of D(z)
    before (index 0) and after each step; ``config["fiber_loss_input"]`` holds the loss of the
    given images as they were, ``config["fiber_loss_before"]`` that of the round trip
    D(E(x)), and ``config["kept_step"]`` the step whose latent was kept.

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
    y = Targets.of(targets)
    num_targets = y.num_rows if y.parts[0].dim() > 1 else 1
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
        y = y.map(lambda t: t.reshape(1, -1).expand(R, -1))
    sampler = LatentRefineSampler(prior, objective, config, images01=images01)
    result = sampler.sample(targets=y.value, n=M, batch_size=batch_size, progress=progress)
    loss_in = _given_loss(sampler, images01, Targets.of(result.targets), batch_size)

    failed = result.failed
    if failed_in is not None:
        if result.reasons is None:
            result.reasons = [[None] * result.num_samples for _ in range(result.num_references)]
        reasons = result.reasons
        failed_in = failed_in.bool()
        for r, m in failed_in.nonzero().tolist():
            reasons[r][m] = f"failed before refinement: {source.reason(r, m)}"
        failed = failed | failed_in
    trace = result.loss_trace
    kept = torch.nan_to_num(trace, nan=math.inf).argmin(-1)
    result.images[failed] = 0.0
    result.fiber_loss[failed] = math.nan
    result.failed = failed
    result.references = references
    result.config.update(
        fiber_loss_input=loss_in.tolist(),
        fiber_loss_before=trace[..., 0].tolist(),
        kept_step=kept.tolist(),
    )
    result.wall_time = time.perf_counter() - start
    return result


def _given_loss(sampler, images01, y: Targets, batch_size: int) -> torch.Tensor:
    """(R, M) fiber loss of the given images as they are."""
    R, M = images01.shape[:2]
    out = torch.full((R, M), math.nan)
    rows = [(r, m) for r in range(R) for m in range(M)]
    with torch.no_grad(), sampler.objective.attached():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            x = sampler.initial_state(chunk, None)
            idx = torch.tensor([r for r, _ in chunk])
            loss = sampler.fiber_loss(x, y.rows(idx).to(sampler.device)).cpu()
            for k, (r, m) in enumerate(chunk):
                out[r, m] = loss[k]
    return out

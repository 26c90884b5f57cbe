"""Evaluation: fiber-loss baselines, distribution distances, benchmarks."""

from ..filters import lowpass
from .metrics import (
    LOWPASS_CUTOFFS,
    NearestNeighbourBaseline,
    augment,
    augmentation_baseline,
    classifier_agreement,
    diversity,
    features_of,
    frechet_distance,
    histogram_kl,
    invariance_map,
    lowpass_curve,
    wasserstein1,
)

__all__ = [
    "LOWPASS_CUTOFFS",
    "classifier_agreement",
    "frechet_distance",
    "lowpass",
    "lowpass_curve",
    "NearestNeighbourBaseline",
    "augment",
    "augmentation_baseline",
    "diversity",
    "features_of",
    "histogram_kl",
    "invariance_map",
    "wasserstein1",
]

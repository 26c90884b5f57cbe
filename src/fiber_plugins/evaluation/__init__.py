"""Evaluation: fiber-loss baselines, distribution distances, benchmarks."""

from ..filters import lowpass
from .metrics import (
    LOWPASS_CUTOFFS,
    NearestNeighbourBaseline,
    augmentation_baseline,
    classifier_agreement,
    diversity,
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
    "augmentation_baseline",
    "diversity",
    "histogram_kl",
    "invariance_map",
    "wasserstein1",
]

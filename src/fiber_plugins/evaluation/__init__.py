"""Evaluation: fiber-loss baselines and distribution distances (the Color-MNIST benchmark that uses
them is :mod:`fiber_plugins.color_mnist_bench`)."""

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

"""Evaluation: fiber-loss baselines, distribution distances and the off-manifold realism score
(the Color-MNIST benchmark that uses them is :mod:`fiber_plugins.color_mnist_bench`)."""

from ..filters import lowpass
from .labels import (
    category_probabilities,
    classifier_agreement,
    label_preference,
    multilabel_agreement,
    topk_accuracy,
)
from .metrics import (
    LOWPASS_CUTOFFS,
    NearestNeighbourBaseline,
    augmentation_baseline,
    diversity,
    frechet_distance,
    histogram_kl,
    invariance_map,
    lowpass_curve,
    wasserstein1,
)
from .realism import (
    RealismCheck,
    calibrate_realism,
    known_calibration,
    prior_fingerprint,
    realism_score,
    roc_auc,
)

__all__ = [
    "LOWPASS_CUTOFFS",
    "category_probabilities",
    "classifier_agreement",
    "label_preference",
    "multilabel_agreement",
    "topk_accuracy",
    "frechet_distance",
    "lowpass",
    "lowpass_curve",
    "NearestNeighbourBaseline",
    "augmentation_baseline",
    "diversity",
    "histogram_kl",
    "invariance_map",
    "wasserstein1",
    "RealismCheck",
    "calibrate_realism",
    "known_calibration",
    "prior_fingerprint",
    "realism_score",
    "roc_auc",
]

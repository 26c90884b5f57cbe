"""Evaluation metrics against hand computations."""

from __future__ import annotations

import numpy as np
import torch

import fiber_plugins as fp
from fiber_plugins.evaluation import (
    NearestNeighbourBaseline,
    augmentation_baseline,
    diversity,
    histogram_kl,
    wasserstein1,
)


def _uniform_pdf(x):
    return np.ones_like(x)


def _uniform_cdf(x):
    return np.clip(x, 0, 1)


def test_histogram_kl_hand_computation():
    # all samples in the first of 2 bins vs a uniform reference: p = (1, 0), q = (1/2, 1/2)
    eps = 1e-3
    kl = histogram_kl(np.full(10, 0.1), _uniform_pdf, bins=2, eps=eps)
    p = np.array([1 + eps, eps]) / (1 + 2 * eps)
    q = np.array([0.5 + eps, 0.5 + eps]) / (1 + 2 * eps)
    assert abs(kl - float(np.sum(p * np.log(p / q)))) < 1e-9
    assert histogram_kl(np.linspace(0.01, 0.99, 1000), _uniform_pdf, bins=10) < 1e-3


def test_wasserstein1_hand_computation():
    # point mass at 0.25 vs uniform on [0, 1]: W1 = E|U - 0.25| = 0.25^2/2 + 0.75^2/2 = 0.3125
    assert abs(wasserstein1(np.array([0.25]), _uniform_cdf) - 0.3125) < 1e-3
    assert wasserstein1(np.linspace(0, 1, 5001), _uniform_cdf) < 1e-3


def test_diversity_hand_computation():
    x = torch.zeros(3, 1, 1, 2)
    x[1, 0, 0, 0] = 3.0
    x[2, 0, 0, 1] = 4.0
    # pairwise distances 3, 4, 5 -> mean 4
    assert abs(diversity(x) - 4.0) < 1e-6


def test_nearest_neighbour_baseline_finds_the_closest(subject):
    obj = fp.FiberObjective(subject)
    pool = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    nn_base = NearestNeighbourBaseline(obj, pool)
    target = obj.target(pool[7:8] * 2 - 1)
    loss, idx = nn_base(target)
    assert int(idx[0]) == 7 and float(loss[0]) < 1e-10
    loss2, idx2 = nn_base(target, exclude=torch.tensor([[7]]))
    d = ((nn_base.features - target) ** 2).sum(1)
    d[7] = float("inf")
    assert int(idx2[0]) == int(d.argmin()) and abs(float(loss2[0]) - float(d.min())) < 1e-6


def test_augmentation_baseline_shape_and_positive(subject):
    obj = fp.FiberObjective(subject)
    refs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    losses = augmentation_baseline(obj, refs, obj.target(refs * 2 - 1), n=3)
    assert losses.shape == (2, 3) and (losses >= 0).all() and losses.sum() > 0

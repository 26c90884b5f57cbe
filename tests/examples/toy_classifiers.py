"""Tiny multi-label classifiers for the classifier-agreement recipe test (``module:`` subjects)."""

from __future__ import annotations

import torch
from torch import nn

# large biases decide the labels [1, 0, 1, 0, 0]; the small weights keep the logits input-dependent
BIAS = torch.tensor([6.0, -6.0, 6.0, -6.0, -6.0])


def classifier() -> tuple[nn.Module, dict]:
    """A 5-class CNN and the preprocessing it expects (32 px, ImageNet mean/std)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    return model, {"size": 32}

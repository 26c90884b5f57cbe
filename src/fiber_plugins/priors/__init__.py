"""Priors: pretrained diffusers models wrapped for guided sampling, and the conditional fiber
model (trained by :func:`fiber_plugins.training.train_fiber_model`)."""

from .conditional import ConditionalFiberModel
from .loading import load_prior
from .prior import DiffusionPrior
from .schedules import DDPMSchedule, FlowSchedule, Step

__all__ = [
    "DiffusionPrior",
    "load_prior",
    "ConditionalFiberModel",
    "Step",
    "DDPMSchedule",
    "FlowSchedule",
]

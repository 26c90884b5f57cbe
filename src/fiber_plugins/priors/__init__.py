"""Priors: pretrained diffusers models wrapped for guided sampling."""

from .loading import load_prior
from .prior import DiffusionPrior
from .schedules import DDPMSchedule, FlowSchedule, Step, ddim_update, split_prediction

__all__ = [
    "DiffusionPrior",
    "load_prior",
    "Step",
    "DDPMSchedule",
    "FlowSchedule",
    "ddim_update",
    "split_prediction",
]

"""Priors: pretrained diffusers models wrapped for guided sampling."""

from .conditional import ConditionalFiberModel, ConditionEmbedding, train_fiber_model
from .loading import load_prior
from .prior import DiffusionPrior
from .schedules import DDPMSchedule, FlowSchedule, Step, ddim_update, split_prediction

__all__ = [
    "DiffusionPrior",
    "load_prior",
    "ConditionalFiberModel",
    "ConditionEmbedding",
    "train_fiber_model",
    "Step",
    "DDPMSchedule",
    "FlowSchedule",
    "ddim_update",
    "split_prediction",
]

"""Priors: pretrained diffusers models wrapped for guided sampling, and the conditional fiber
model (trained by :func:`fiber_plugins.training.train_fiber_model`), and :func:`convert_adm` for
openai/guided-diffusion (ADM) checkpoints."""

from .adm import convert_adm
from .conditional import ConditionalFiberModel
from .loading import load_prior
from .prior import DiffusionPrior
from .schedules import DDPMSchedule, FlowSchedule, Step

__all__ = [
    "DiffusionPrior",
    "load_prior",
    "convert_adm",
    "ConditionalFiberModel",
    "Step",
    "DDPMSchedule",
    "FlowSchedule",
]

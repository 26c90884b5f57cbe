"""fiber-plugins: sample what a model does not see.

For a representation phi of a subject model (neuron, channel, SAE feature, logits, embedding) and a
reference image x*, sample diverse natural images x with phi(x) = phi(x*) (the *fiber*) by guiding a
pretrained diffusers prior with the fiber loss d(phi(x), phi(x*)).

Quick start::

    import fiber_plugins as fp
    prior = fp.load_prior("path/to/diffusers-folder")
    objective = fp.FiberObjective(model, layer="layer4", index=7, reduction="spatial_mean")
    result = fp.NDTMSampler(prior, objective, num_steps=50, inner_steps=4).sample(
        references=["cat.png"], n=8)
    result.save("runs/cat")
"""

from __future__ import annotations

from .objectives import IDENTITY, FiberObjective, Preprocess, WeightedSum
from .priors import ConditionalFiberModel, DiffusionPrior, load_prior
from .samplers import (
    ConditionalConfig,
    ConditionalFiberSampler,
    DPSConfig,
    DPSSampler,
    FiberResult,
    GuidanceSchedule,
    LatentRefineConfig,
    NDTMConfig,
    NDTMSampler,
    NoiseOptConfig,
    NoiseOptSampler,
    PixelInversionConfig,
    PixelInversionSampler,
    refine_latent,
    sample_fiber,
)
from .training import train_fiber_model

__version__ = "0.1.0"

__all__ = [
    "FiberObjective",
    "WeightedSum",
    "Preprocess",
    "IDENTITY",
    "DiffusionPrior",
    "load_prior",
    "ConditionalFiberModel",
    "train_fiber_model",
    "ConditionalFiberSampler",
    "ConditionalConfig",
    "NDTMSampler",
    "NDTMConfig",
    "GuidanceSchedule",
    "NoiseOptSampler",
    "NoiseOptConfig",
    "DPSSampler",
    "DPSConfig",
    "PixelInversionSampler",
    "PixelInversionConfig",
    "LatentRefineConfig",
    "refine_latent",
    "FiberResult",
    "sample_fiber",
    "__version__",
]

"""Samplers on one shared engine."""

from ..images import load_image
from .conditional import ConditionalConfig, ConditionalFiberSampler
from .config import GUIDANCE_SCHEDULES, GuidanceSchedule, NDTMConfig
from .dps import DPSConfig, DPSSampler
from .engine import FiberSampler
from .inversion import PixelInversionConfig, PixelInversionSampler, total_variation
from .ndtm import NDTMSampler, sample_fiber
from .noise_opt import NoiseOptConfig, NoiseOptSampler
from .refine import LatentRefineConfig, refine_latent
from .result import FiberResult

__all__ = [
    "FiberSampler",
    "NDTMSampler",
    "NDTMConfig",
    "NoiseOptSampler",
    "NoiseOptConfig",
    "DPSSampler",
    "DPSConfig",
    "PixelInversionSampler",
    "ConditionalFiberSampler",
    "ConditionalConfig",
    "PixelInversionConfig",
    "total_variation",
    "refine_latent",
    "LatentRefineConfig",
    "GuidanceSchedule",
    "GUIDANCE_SCHEDULES",
    "FiberResult",
    "sample_fiber",
    "load_image",
]

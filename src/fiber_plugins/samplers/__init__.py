"""Samplers on one shared engine."""

from .conditional import ConditionalConfig, ConditionalFiberSampler
from .config import GUIDANCE_SCHEDULES, GuidanceSchedule, NDTMConfig
from .dps import DPSConfig, DPSSampler
from .engine import FiberSampler
from .inversion import PixelInversionConfig, PixelInversionSampler, total_variation  # noqa: F401 (tests)
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
    "refine_latent",
    "LatentRefineConfig",
    "GuidanceSchedule",
    "GUIDANCE_SCHEDULES",
    "FiberResult",
    "sample_fiber",
]

"""Samplers on one shared engine."""

from .config import GUIDANCE_SCHEDULES, GuidanceSchedule, NDTMConfig
from .engine import FiberSampler, load_image
from .ndtm import NDTMSampler
from .result import FiberResult

__all__ = [
    "FiberSampler",
    "NDTMSampler",
    "NDTMConfig",
    "GuidanceSchedule",
    "GUIDANCE_SCHEDULES",
    "FiberResult",
    "load_image",
]

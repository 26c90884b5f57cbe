"""Fiber objectives: phi, its target y* and the distance d."""

from .base import FiberObjective
from .distances import DISTANCES, cosine, get_distance, kl_logits, l1, squared_l2
from .preprocess import IDENTITY, Preprocess
from .selection import REDUCTIONS, reduce, select
from .weighted import WeightedSum

__all__ = [
    "FiberObjective",
    "WeightedSum",
    "Preprocess",
    "IDENTITY",
    "DISTANCES",
    "REDUCTIONS",
    "get_distance",
    "squared_l2",
    "l1",
    "cosine",
    "kl_logits",
    "reduce",
    "select",
]

"""The invariance map: how much the fiber samples vary per pixel, and showing it with Captum.

:class:`FiberAttribution` is what the Captum-style classes' ``attribute`` returns;
:func:`invariance_map` (defined once, in :mod:`fiber_plugins.evaluation.metrics`) computes its map
from a :class:`FiberResult` and :func:`visualize_invariance` draws it with Captum's
``visualize_image_attr`` (Captum is imported only there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._utils import require
from ..errors import UserIndexError
from ..evaluation.metrics import invariance_map
from ..samplers.result import FiberResult

__all__ = ["FiberAttribution", "invariance_map", "visualize_invariance"]


@dataclass
class FiberAttribution:
    """What the Captum-style ``attribute`` returns.

    Attributes
    ----------
    result: the :class:`FiberResult` (samples (R, M, C, H', W') at the prior's size).
    invariance_map: (R, C, H, W), shaped like the inputs: the per-pixel standard deviation of the
        fiber samples over the M samples of each reference (failed samples left out). High values
        mark pixels the model's representation does not constrain.
    """

    result: FiberResult
    invariance_map: torch.Tensor

    @property
    def samples(self) -> torch.Tensor:
        return self.result.images


def visualize_invariance(attr: FiberAttribution, index: int = 0, **kwargs):
    """Show one invariance map with ``captum.attr.visualization.visualize_image_attr``.

    Defaults: ``method="heat_map"``, ``sign="absolute_value"``; any other keyword goes to
    ``visualize_image_attr`` (``plt_fig_axis``, ``cmap``, ``title``, ``use_pyplot``, ...).
    The reference image (resized to the map) is passed as ``original_image``, so blended methods
    work too. Returns ``(fig, ax)``.
    """
    viz = require("captum.attr").visualization
    maps = attr.invariance_map
    if not -maps.shape[0] <= index < maps.shape[0]:
        raise UserIndexError(f"index {index} is out of range for {maps.shape[0]} invariance map(s)")
    m = torch.nan_to_num(maps[index].detach().float().cpu(), nan=0.0)
    kwargs.setdefault("method", "heat_map")
    kwargs.setdefault("sign", "absolute_value")
    original = None
    refs = attr.result.references
    if refs is not None:
        ref = refs[index : index + 1].float()
        ref = _match_display(ref, m.unsqueeze(0))[0]
        original = ref.permute(1, 2, 0).numpy()
    return viz.visualize_image_attr(m.permute(1, 2, 0).numpy(), original, **kwargs)


def _match_display(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize images (N, C, H, W) and match their channels to ``like``'s (for display)."""
    if tuple(images.shape[-2:]) != tuple(like.shape[-2:]):
        images = F.interpolate(
            images, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False
        )
    if images.shape[1] != like.shape[1]:
        images = images.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1)
    return images.clamp(0, 1)

"""The invariance map: how much the fiber samples vary per pixel, and showing it with Captum.

:class:`FiberAttribution` is what the Captum-style classes' ``attribute`` returns;
:func:`invariance_map` computes its map from a :class:`FiberResult` and
:func:`visualize_invariance` draws it with Captum's ``visualize_image_attr`` (Captum is imported
only there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._utils import require
from ...errors import UserIndexError
from ...samplers.result import FiberResult

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


def invariance_map(result: FiberResult, like: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel standard deviation over the M samples of each reference: (R, C, H, W).

    The population std (``correction=0``), so one sample gives zeros; failed samples are left
    out, and a reference without any successful sample gets NaN. With ``like`` (R, C, H, W) the
    map is resized (bilinear) and its channels matched to ``like``.
    """
    imgs = result.images.float()
    w = (~result.failed).float().view(*result.failed.shape, 1, 1, 1)
    count = w.sum(1)
    mean = (imgs * w).sum(1) / count.clamp_min(1)
    var = ((imgs - mean.unsqueeze(1)).pow(2) * w).sum(1) / count.clamp_min(1)
    std = torch.where(count > 0, var.sqrt(), torch.full_like(var, math.nan))
    if like is not None:
        if tuple(std.shape[-2:]) != tuple(like.shape[-2:]):
            shrink = std.shape[-2] > like.shape[-2] or std.shape[-1] > like.shape[-1]
            size = tuple(like.shape[-2:])
            std = F.interpolate(
                std, size=size, mode="bilinear", align_corners=False, antialias=shrink
            )
        if std.shape[1] != like.shape[1]:
            std = std.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1).contiguous()
    return std


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

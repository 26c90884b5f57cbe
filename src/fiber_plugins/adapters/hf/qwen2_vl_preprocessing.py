"""Qwen2-VL's image processor in torch: the smart resize, rescale, normalisation and patch
layout of ``Qwen2VLImageProcessor``, differentiable (used by :mod:`.qwen2_vl`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ...errors import UserValueError
from ...objectives.preprocess import Preprocess
from .preprocessing import _field, preprocess_from_processor

_MEAN, _STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP


@dataclasses.dataclass(frozen=True)
class Qwen2VLPreprocess:
    """``Qwen2VLImageProcessor`` in torch: smart resize, rescale, normalise, patchify.

    Parameters
    ----------
    base:
        Value range, mean/std, channels and interpolation (the processor's bicubic
        ``resample``: antialiased as PIL); :meth:`at_size` gives it a size.
    patch_size, temporal_patch_size, merge_size:
        P, T and m of the patch layout (14, 2, 2 in Qwen2-VL).
    min_pixels, max_pixels:
        The smart-resize bounds (the processor's ``size`` shortest / longest edge).
    resize:
        ``False`` for a processor that does not resize (sides must be multiples of P * m).
    """

    base: Preprocess = Preprocess(mean=_MEAN, std=_STD, channels=3, interpolation="bicubic")
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    resize: bool = True

    @classmethod
    def from_processor(cls, processor: Any) -> Qwen2VLPreprocess:
        """The preprocessing of a Qwen2-VL image processor (either backend, or a processor
        holding one as ``image_processor``); UserValueError for other processors."""
        proc = getattr(processor, "image_processor", None) or processor
        size = getattr(proc, "size", None)
        low = _field(size, "shortest_edge") or getattr(proc, "min_pixels", None)
        high = _field(size, "longest_edge") or getattr(proc, "max_pixels", None)
        if not (low and high and hasattr(proc, "merge_size")):
            raise UserValueError(
                f"{type(proc).__name__} is not a Qwen2-VL image processor (no min_pixels, "
                "max_pixels and merge_size); load the one saved with the model"
            )
        base = preprocess_from_processor(proc)  # its resize (min_pixels as a side) is dropped
        base = dataclasses.replace(base, resize=None, crop=None, channels=base.channels or 3)
        return cls(
            base=base,
            patch_size=int(proc.patch_size),
            temporal_patch_size=int(proc.temporal_patch_size),
            merge_size=int(proc.merge_size),
            min_pixels=int(low),
            max_pixels=int(high),
            resize=bool(getattr(proc, "do_resize", True)),
        )

    @property
    def factor(self) -> int:
        """P * m: both sides of the model input are multiples of it."""
        return self.patch_size * self.merge_size

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """(H', W'): the processor's ``smart_resize`` of an image of (height, width)."""
        h, w, f = int(height), int(width), self.factor
        if not self.resize:
            return (h, w)
        if max(h, w) / min(h, w) > 200:
            raise UserValueError(f"Qwen2-VL takes aspect ratios up to 200, got {h}x{w}")
        hb, wb = round(h / f) * f, round(w / f) * f
        if hb * wb > self.max_pixels:
            beta = math.sqrt(h * w / self.max_pixels)
            hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
        elif hb * wb < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (h * w))
            hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
        return (hb, wb)

    def at_size(self, size: tuple[int, int]) -> Preprocess:
        """The :class:`Preprocess` from prior space to normalised (B, C, *size) images."""
        return dataclasses.replace(self.base, size=(int(size[0]), int(size[1])))

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, C, H, W) images -> (patches (B*gh*gw, C*T*P*P), grid_thw (B, 3)),
        gh = H / P, gw = W / P: the processor's layout (per image, patches in merge windows
        (gh/m, gw/m, m, m), each repeated T times along time)."""
        b, c, h, w = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if h % self.factor or w % self.factor:
            raise UserValueError(
                f"Qwen2-VL needs sides that are multiples of {self.factor}, not {h}x{w}"
            )
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=x.device)
        return x.reshape(b * gh * gw, c * t * p * p), grid

    def __call__(
        self, x: torch.Tensor, image_size: int | tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's output for prior-space images, differentiably.

        Parameters
        ----------
        x:
            (B, C, H, W) images in [-1, 1].
        image_size:
            The model input (H', W') (or int); default :meth:`size_for` (H, W).

        Returns
        -------
        (pixel_values, image_grid_thw)
            (B*gh*gw, C*T*P*P) patches and (B, 3) rows (1, gh, gw), as
            ``processor(images)`` gives them.
        """
        size = _pair(image_size) if image_size is not None else self.size_for(*x.shape[-2:])
        return self.patchify(self.at_size(size)(x))

    def to_dict(self) -> dict:
        """The fields as a JSON-safe dict (``base`` as a dict of its own)."""
        return dataclasses.asdict(self)


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

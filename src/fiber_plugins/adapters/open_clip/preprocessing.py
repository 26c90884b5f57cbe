"""`preprocess_from_transform`: OpenCLIP's torchvision eval transform (resize, center crop,
to-tensor, normalise, RGB conversion) as the differentiable Preprocess the objective runs; the
transform OpenCLIP builds for a model is :mod:`.loading`'s."""

from __future__ import annotations

from typing import Any

from ...errors import UserValueError
from ...objectives.preprocess import Preprocess


def _mode(interpolation: Any) -> str:
    value = str(getattr(interpolation, "value", interpolation)).lower()
    if value in ("bilinear", "bicubic", "nearest"):
        return value
    if value == "nearest-exact":
        return "nearest"
    raise UserValueError(
        f"unsupported interpolation {interpolation!r} in the eval transform; use bilinear, "
        "bicubic or nearest, or pass preprocess=Preprocess(...)"
    )


def _square(size: Any) -> int | tuple[int, int]:
    if isinstance(size, int):
        return size
    size = tuple(int(v) for v in size)
    return size[0] if len(size) == 1 else (size[0], size[1])


def preprocess_from_transform(transform: Any) -> Preprocess:
    """A torchvision eval transform (OpenCLIP's ``preprocess``) as a differentiable Preprocess.

    ===================================  ===================================================
    transform step                       Preprocess
    ===================================  ===================================================
    ``Resize(S)`` / ``Resize((H, W))``   ``resize=S`` (shorter side, as torchvision) /
                                         exact ``resize=(H, W)``; its ``interpolation``
    ``ResizeKeepRatio(S)`` (OpenCLIP     exact resize to (S, S): the same for square images,
    'longest' mode)                      which is what priors produce
    ``CenterCrop`` / ``CenterCropOrPad``  ``crop`` (zero padding where the image is smaller)
    ``ToTensor`` / ``MaybeToTensor``     ``value_range=(0, 1)``
    ``Normalize(mean, std)``             ``mean`` / ``std``
    RGB conversion                       ``channels=3``
    ===================================  ===================================================

    torchvision resizes PIL images with PIL (antialiased, rounded to uint8); the Preprocess
    interpolates float tensors, antialiased when shrinking, so resized inputs differ slightly
    (measured in ``tests/adapters/test_open_clip.py``); without resampling they agree to float
    precision.

    Parameters
    ----------
    transform:
        A ``torchvision.transforms.Compose`` of the steps above (or one step).

    Returns
    -------
    Preprocess

    Raises
    ------
    UserValueError
        A step that is not in the table (a random augmentation, a train transform).
    """
    steps = list(getattr(transform, "transforms", [transform]))
    fields: dict[str, Any] = {}
    for step in steps:
        kind = type(step).__name__
        if kind == "Resize":
            if getattr(step, "max_size", None):
                raise UserValueError("Resize(max_size=...) is not supported; pass preprocess=")
            fields["resize"] = _square(step.size)
            fields["interpolation"] = _mode(step.interpolation)
        elif kind == "ResizeKeepRatio":
            size = tuple(int(v) for v in step.size)
            fields["resize"] = (size[0], size[1])
            fields["interpolation"] = _mode(step.interpolation)
        elif kind in ("CenterCrop", "CenterCropOrPad"):
            fields["crop"] = _square(step.size)
        elif kind == "Normalize":
            fields["mean"] = tuple(float(v) for v in step.mean)
            fields["std"] = tuple(float(v) for v in step.std)
        elif kind in ("ToTensor", "MaybeToTensor"):
            fields["value_range"] = (0.0, 1.0)
        elif kind == "MaybeConvertMode" or getattr(step, "__name__", "") == "_convert_to_rgb":
            fields["channels"] = 3
        else:
            name = getattr(step, "__name__", kind)
            raise UserValueError(
                f"cannot turn the transform step {name!r} into a Preprocess (supported: Resize, "
                "ResizeKeepRatio, CenterCrop, CenterCropOrPad, ToTensor, Normalize, RGB "
                "conversion); use the eval transform, or pass preprocess=Preprocess(...)"
            )
    return Preprocess(**fields)

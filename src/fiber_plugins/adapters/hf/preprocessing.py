"""`preprocess_from_processor`: a Hugging Face image processor (its resize, crop, rescale,
normalisation and RGB fields) as the differentiable Preprocess the objective runs; reading the
processor from a folder is :mod:`.loading`'s."""

from __future__ import annotations

from typing import Any

from ...errors import UserValueError
from ...objectives.preprocess import Preprocess

# PIL resampling codes (PIL.Image.Resampling / transformers' PILImageResampling) and
# torchvision InterpolationMode values -> Preprocess interpolation
_RESAMPLE = {
    0: "nearest",
    1: "bicubic",  # LANCZOS: approximated by bicubic
    2: "bilinear",
    3: "bicubic",
    4: "area",  # BOX
    5: "bilinear",  # HAMMING: approximated by bilinear
    "nearest": "nearest",
    "nearest-exact": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "bicubic",
    "box": "area",
    "hamming": "bilinear",
}


def _field(size: Any, key: str) -> Any:
    """A key of a processor's size dict (a plain dict or transformers' ``SizeDict``)."""
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _interpolation(resample: Any) -> str:
    if resample is None:
        return "bilinear"  # transformers' default when a processor names none
    value = getattr(resample, "value", resample)  # an enum: its code or name
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, (int, str)) and key in _RESAMPLE:
        return _RESAMPLE[key]
    raise UserValueError(
        f"unknown resample {resample!r} in the image processor; expected a PIL resampling code "
        f"(0 nearest, 2 bilinear, 3 bicubic, ...) or a torchvision InterpolationMode"
    )


def _pair(value: Any, what: str) -> tuple[int, int] | None:
    h, w = _field(value, "height"), _field(value, "width")
    if h and w:
        return (int(h), int(w))
    if value is not None and _field(value, "shortest_edge") is None:
        raise UserValueError(
            f"the image processor's {what} {value!r} has no height/width or shortest_edge; "
            "pass preprocess=Preprocess(...) yourself"
        )
    return None


def preprocess_from_processor(processor: Any) -> Preprocess:
    """A Hugging Face image processor as a differentiable :class:`Preprocess`.

    The processor's fields map as follows (a field the processor turns off with its ``do_*``
    flag is skipped):

    ========================================  ==============================================
    processor                                 Preprocess
    ========================================  ==============================================
    ``size={"shortest_edge": S}``             ``resize=S``: the shorter side to S, the longer
                                              one ``int(S * long / short)`` (as transformers
                                              and torchvision compute it); a
                                              ``longest_edge`` cap is not applied (it changes
                                              nothing for square images)
    ``size={"height": H, "width": W}``        exact resize to (H, W): ``size=(H, W)``, or
                                              ``resize=(H, W)`` before a crop
    ``do_center_crop`` + ``crop_size``        ``crop=(H, W)``, center crop after the resize
    ``resample``                              ``interpolation``: NEAREST -> 'nearest',
                                              BILINEAR -> 'bilinear', BICUBIC -> 'bicubic',
                                              BOX -> 'area', LANCZOS -> 'bicubic' and
                                              HAMMING -> 'bilinear' (approximations)
    ``do_rescale`` + ``rescale_factor`` (f)    ``value_range=(0, 255 * f)``, i.e. (0, 1) for
                                              the usual f = 1/255; without rescaling the
                                              model sees (0, 255)
    ``do_normalize`` + ``image_mean/std``     ``mean`` / ``std``
    ``do_convert_rgb``                        ``channels=3`` (a grey image is repeated)
    ========================================  ==============================================

    The processor works on uint8 images (PIL, or torchvision on uint8 tensors) and rounds the
    resized pixels to integers; the Preprocess interpolates float tensors (antialiased when
    shrinking) without rounding, so resized inputs differ slightly (measured in
    ``tests/adapters/test_hf.py``); at the processor's own size no resampling happens and the
    two agree to float precision. Center-crop offsets of an odd margin may differ by one pixel
    (transformers rounds down, the Preprocess rounds like torchvision); square images with an
    even margin, as priors produce, crop identically.

    Parameters
    ----------
    processor:
        An image processor (``AutoImageProcessor.from_pretrained(folder)``, either backend),
        or a multimodal processor with an ``image_processor`` attribute.

    Returns
    -------
    Preprocess
        The same resize, crop, value range and normalisation as the processor.

    Raises
    ------
    UserValueError
        A size without height/width or shortest_edge (e.g. ``max_height``), or an unknown
        ``resample``.
    """
    proc = getattr(processor, "image_processor", None) or processor

    def get(name: str, default: Any = None) -> Any:
        return getattr(proc, name, default)

    resize: int | tuple[int, int] | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    exact: tuple[int, int] | None = None
    if get("do_resize", True) and get("size") is not None:
        shortest = _field(get("size"), "shortest_edge")
        if shortest:
            resize = int(shortest)
        else:
            exact = _pair(get("size"), "size")
    if get("do_center_crop") and get("crop_size") is not None:
        crop = _pair(get("crop_size"), "crop_size")
    if exact is not None:
        if crop is None:
            size = exact
        else:
            resize = exact
    if get("do_rescale", True):
        high = 255.0 * float(get("rescale_factor", 1 / 255))
        value_range = (0.0, 1.0 if abs(high - 1.0) < 1e-6 else high)
    else:
        value_range = (0.0, 255.0)
    mean = std = None
    if get("do_normalize", False) and get("image_mean") is not None:
        m, s = get("image_mean"), get("image_std")
        mean = tuple(float(v) for v in (m if isinstance(m, (list, tuple)) else (m,)))
        std = tuple(float(v) for v in (s if isinstance(s, (list, tuple)) else (s,)))
    return Preprocess(
        size=size,
        resize=resize,
        crop=crop,
        value_range=value_range,
        mean=mean,
        std=std,
        channels=3 if get("do_convert_rgb") else None,
        interpolation=_interpolation(get("resample")),
    )

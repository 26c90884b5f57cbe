"""Reference images: one loader for the command line and for Python.

:func:`load_image` turns what users have (a file path, a PIL image of any mode, a numpy array, a
torch tensor) into one (C, H, W) float32 tensor in [0, 1]; :func:`as_reference_batch` stacks
several into (R, C, H, W). The scale of each source is its true range:

==========================================  ====================================================
source                                      value 1.0 is
==========================================  ====================================================
8-bit PIL modes (1, L, P, RGB, CMYK, ...)   255 (mode ``1``: a set bit)
16-bit PIL modes (I;16, I;16B, I;16L, ...)  65535
PIL mode ``I`` (32-bit int)                 2**bits - 1: the TIFF BitsPerSample when the file
                                            says, else 65535 if every value fits in 16 bits
                                            (a 16-bit file opened as ``I``), else 2**31 - 1
PIL mode ``F``, float arrays and tensors    1.0 (values must lie in [0, 1] within 1e-3)
uint8 / uint16 / bool arrays and tensors    255 / 65535 / True
==========================================  ====================================================

Transparency (PIL RGBA, LA, PA, P with a transparent colour; 4-channel arrays and tensors) is
composited over ``background``: ``rgb * alpha + background * (1 - alpha)``. EXIF orientation
is applied, as image viewers do. Grey images are repeated to the prior's channel count; colour
images become one channel by ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` (the weights of
PIL's ``convert("L")``). Resizing is antialiased bilinear, as ``torch.nn.functional.interpolate``
does it.

Files above PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 Mpx) are
refused; the limit itself is read, never changed.
"""

from __future__ import annotations

import numbers
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._utils import warn
from .errors import MissingFileError, UserError, UserTypeError, UserValueError

_TOLERANCE = 1e-3  # float sources may overshoot [0, 1] by this much (rounding); then clamped
_EXIF_ORIENTATION = 0x0112
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_LAYOUT_CHANNELS = (1, 3, 4)  # channel counts that tell a channel axis from a spatial one
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL's decoders raise
_ACCEPTED = "a path, a PIL image, a numpy array or a torch tensor"


def load_image(
    source,
    size: tuple[int, int] | int | None = None,
    channels: int = 3,
    background: float | tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Load one reference image as a (C, H, W) float32 tensor in [0, 1].

    Parameters
    ----------
    source : str, os.PathLike, PIL.Image.Image, numpy.ndarray or torch.Tensor
        A path to an image file (PNG, JPEG, BMP, TIFF, GIF, WebP, ...); a PIL image of any mode;
        an array of shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} and dtype uint8,
        uint16, bool or float in [0, 1]; or a tensor of shape (C, H, W) or (H, W), float in
        [0, 1], uint8 or uint16. Four channels are RGBA.
    size : (int, int) or int, optional
        (H, W) to resize to (antialiased bilinear); an int is a square. None keeps the size.
    channels : int
        C, the channel count of the prior: grey is repeated to it, RGB becomes luma for 1.
    background : float or tuple of float, optional
        What transparent pixels are composited over: a grey level or an (r, g, b) tuple in
        [0, 1]. None (default) means white, 1.0, and warns when an image has transparency.

    Returns
    -------
    torch.Tensor
        (C, H, W) float32 on the CPU, values in [0, 1].

    Raises
    ------
    MissingFileError
        The path does not exist.
    UserValueError
        An unreadable or oversized file; out-of-range or non-finite values; an unsupported
        shape or channel count.
    UserTypeError
        A source of another type, or an unsupported dtype.

    Examples
    --------
    >>> import numpy as np
    >>> load_image(np.zeros((8, 8, 3), np.uint8), size=(4, 4)).shape
    torch.Size([3, 4, 4])
    """
    image, transparent = _load(source, size, channels, background)
    if transparent and background is None:
        warn(_alpha_message("reference has"))
    return image


def as_reference_batch(
    references,
    size: tuple[int, int] | int | None = None,
    channels: int = 3,
    background: float | tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Load references as one (R, C, H, W) float32 batch in [0, 1].

    Parameters
    ----------
    references : source, list or tuple of sources, (R, C, H, W) tensor or 4-D array
        Anything :func:`load_image` takes, several of them, or a batch of them.
    size, channels, background
        As in :func:`load_image`. Without ``size`` all references must share one (H, W).

    Returns
    -------
    torch.Tensor
        (R, C, H, W) float32 on the CPU, values in [0, 1].

    Raises
    ------
    UserValueError
        No references, references of different sizes without ``size``, or any error of
        :func:`load_image`, prefixed with the reference's index (``references[2]: ...``).
    """
    is_batch = isinstance(references, (list, tuple)) or (
        isinstance(references, (torch.Tensor, np.ndarray)) and references.ndim == 4
    )
    if not is_batch:
        return load_image(references, size, channels, background)[None]
    if len(references) == 0:
        raise UserValueError(f"references is empty; give at least one image ({_ACCEPTED})")
    images, transparent = [], []
    for i, source in enumerate(references):
        try:
            image, alpha = _load(source, size, channels, background)
        except UserError as err:
            raise type(err)(f"references[{i}]: {err}") from None
        images.append(image)
        if alpha:
            transparent.append(i)
    shapes = {tuple(im.shape[-2:]) for im in images}
    if len(shapes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(shapes))
        raise UserValueError(
            f"references have different sizes ({listed}); pass size=(H, W) to resize them"
        )
    if transparent and background is None:
        subject = "reference has" if len(images) == 1 else f"references {transparent} have"
        warn(_alpha_message(subject))
    return torch.stack(images)


def native_references(references, channels: int = 3) -> list[torch.Tensor]:
    """Each reference at its own resolution, (C, H, W) in [0, 1] (no warning; the caller loads
    the resized batch with :func:`as_reference_batch` too, which warns about transparency)."""
    is_batch = isinstance(references, (list, tuple)) or (
        isinstance(references, (torch.Tensor, np.ndarray)) and references.ndim == 4
    )
    sources = references if is_batch else [references]
    return [_load(source, None, channels, None)[0] for source in sources]


# ---------------------------------------------------------------------------- the pipeline


def _load(source, size, channels, background) -> tuple[torch.Tensor, bool]:
    """One source -> ((C, H, W) in [0, 1], whether transparency was composited)."""
    size = _check_size(size)
    bg = _check_background(background)
    if not isinstance(channels, int) or channels < 1:
        raise UserValueError(f"channels must be a positive int, got {channels!r}")
    image, has_alpha = _decode(source, channels)
    transparent = False
    if has_alpha and image.shape[0] != channels:
        colour, alpha = image[:-1], image[-1:]
        if bg.shape[0] == 3 and colour.shape[0] == 1:
            colour = colour.expand(3, -1, -1)
        image = colour * alpha + bg * (1 - alpha)
        transparent = bool((alpha < 1).any())
    image = _match_channels(image, channels)
    if size is not None and tuple(image.shape[-2:]) != size:
        image = F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0]
    return image.clamp(0, 1), transparent


def _decode(source, channels: int) -> tuple[torch.Tensor, bool]:
    """Any source -> ((C, H, W) float32 on the CPU, whether its last channel is alpha)."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    if isinstance(source, Image.Image):
        return _from_pil(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, torch.Tensor):
        return _from_tensor(source, channels)
    raise UserTypeError(
        f"cannot use {type(source).__name__} as a reference image; give {_ACCEPTED}"
    )


def _read_file(path: Path) -> tuple[torch.Tensor, bool]:
    from PIL import Image

    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        raise MissingFileError(f"reference image {str(path)!r} does not exist{where}")
    if path.is_dir():
        raise UserValueError(f"reference image {str(path)!r} is a directory; give an image file")
    try:
        # PIL only warns between the limit and twice it; a reference never needs that many
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                return _from_pil(opened)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserValueError(_too_big(path, err)) from None
    except _READ_ERRORS as err:
        raise UserValueError(
            f"cannot read reference image {str(path)!r} ({type(err).__name__}); "
            "give a PNG, JPEG, BMP, TIFF, GIF or WebP file"
        ) from None


def _too_big(path: Path, err: Exception) -> str:
    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", str(err))  # PIL's message names the pixel count
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than that"
    return (
        f"reference image {str(path)!r} has {pixels}, over PIL's decompression-bomb limit of "
        f"{Image.MAX_IMAGE_PIXELS:,} pixels; resize it below the limit first (or set "
        "PIL.Image.MAX_IMAGE_PIXELS = None if you trust the file)"
    )


def _from_pil(image) -> tuple[torch.Tensor, bool]:
    from PIL import ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P":
        transparent = getattr(image, "has_transparency_data", "transparency" in image.info)
        image = image.convert("RGBA" if transparent else "RGB")
    elif mode in ("PA", "RGBa"):
        image = image.convert("RGBA")
    mode = image.mode
    if mode == "1":
        return _hwc_to_chw(np.asarray(image).astype(np.float32)), False
    if mode in ("L", "RGB", "LA", "RGBA"):
        pixels = np.asarray(image).astype(np.float32) / 255.0
        return _hwc_to_chw(pixels), mode.endswith("A")
    if mode == "La":  # premultiplied luminance: undo it, then composite like LA
        pixels = np.asarray(image).astype(np.float32) / 255.0
        grey, alpha = pixels[..., 0], pixels[..., 1]
        grey = np.divide(grey, alpha, out=np.zeros_like(grey), where=alpha > 0)
        return _hwc_to_chw(np.stack([grey, alpha], axis=-1)), True
    if mode.startswith("I;16"):
        return _hwc_to_chw(np.asarray(image).astype(np.float32) / 65535.0), False
    if mode == "I":
        return _hwc_to_chw(_scale_int32(image)), False
    if mode == "F":
        values = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        _check_float(values, "reference image of mode 'F'")
        return values[None], False
    try:
        image = image.convert("RGB")  # CMYK, YCbCr, HSV, LAB, RGBX
    except ValueError:
        raise UserValueError(
            f"cannot convert a reference image of mode {mode!r} to RGB; "
            "convert it first, e.g. image.convert('RGB')"
        ) from None
    return _hwc_to_chw(np.asarray(image).astype(np.float32) / 255.0), False


def _scale_int32(image) -> np.ndarray:
    """A PIL mode-``I`` image (int32 storage) -> [0, 1] by the bit depth of its data."""
    values = np.asarray(image).astype(np.int64)
    if values.size and values.min() < 0:
        raise UserValueError(
            f"reference image of mode 'I' has negative values (min {values.min()}); "
            "give non-negative intensities, e.g. image.point(lambda v: v - lowest)"
        )
    bits = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    bits = bits[0] if isinstance(bits, tuple) else bits
    if not isinstance(bits, int) or not 1 <= bits <= 32:
        bits = 16 if values.size == 0 or values.max() <= 65535 else 31  # int32 holds 31 bits
    return (values / float(2**bits - 1)).astype(np.float32)


def _from_array(array: np.ndarray) -> tuple[torch.Tensor, bool]:
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and shape[-1] in _LAYOUT_CHANNELS:  # numpy's own (H, W, C) first
        array = array.transpose(2, 0, 1)
    elif not (array.ndim == 3 and shape[0] in _LAYOUT_CHANNELS):
        raise UserValueError(
            f"reference array has shape {shape}; give (H, W), (H, W, C) or (C, H, W) "
            "with C in 1, 3, 4"
        )
    if 0 in shape:
        raise UserValueError(f"reference array has shape {shape}; give a non-empty image")
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint8:
        image = torch.from_numpy(array.astype(np.float32) / 255.0)
    elif array.dtype == np.uint16:
        image = torch.from_numpy(array.astype(np.float32) / 65535.0)
    elif array.dtype == np.bool_:
        image = torch.from_numpy(array.astype(np.float32))
    elif array.dtype.kind == "f":
        image = torch.from_numpy(array.astype(np.float32))
        _check_float(image, "reference array")
    else:
        raise UserTypeError(
            f"reference array has dtype {array.dtype}; give uint8 (0-255), uint16 (0-65535), "
            "bool, or float in [0, 1] (e.g. array.astype(np.uint8))"
        )
    return image, image.shape[0] == 4


def _from_tensor(tensor: torch.Tensor, channels: int) -> tuple[torch.Tensor, bool]:
    shape = tuple(tensor.shape)
    if tensor.dim() == 2:
        tensor = tensor[None]
    elif tensor.dim() == 3:
        if shape[-1] in _LAYOUT_CHANNELS and shape[0] not in (*_LAYOUT_CHANNELS, channels):
            raise UserValueError(
                f"reference tensor has shape {shape}: that looks like HWC; "
                "pass tensor.permute(2, 0, 1)"
            )
    else:
        hint = "; pass batches to as_reference_batch" if tensor.dim() == 4 else ""
        raise UserValueError(
            f"reference tensor has shape {shape}; give one (C, H, W) or (H, W) image{hint}"
        )
    if 0 in shape:
        raise UserValueError(f"reference tensor has shape {shape}; give a non-empty image")
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        image = tensor.float() / 255.0
    elif tensor.dtype == getattr(torch, "uint16", None):
        image = tensor.float() / 65535.0
    elif tensor.dtype == torch.bool:
        image = tensor.float()
    elif tensor.is_floating_point():
        image = tensor.float()
        _check_float(image, "reference tensor")
    else:
        raise UserTypeError(
            f"reference tensor has dtype {tensor.dtype}; give a float tensor in [0, 1] "
            "or a uint8 tensor (0-255)"
        )
    return image, image.shape[0] == 4


# ---------------------------------------------------------------------------- small checks


def _hwc_to_chw(pixels: np.ndarray) -> torch.Tensor:
    image = torch.from_numpy(np.ascontiguousarray(pixels))
    return image[None] if image.dim() == 2 else image.permute(2, 0, 1)


def _check_float(image: torch.Tensor, what: str) -> None:
    if not torch.isfinite(image).all():
        raise UserValueError(f"{what} holds NaN/inf values; give finite values in [0, 1]")
    low, high = image.min().item(), image.max().item()
    if low >= -_TOLERANCE and high <= 1 + _TOLERANCE:
        return
    if low >= -1 - _TOLERANCE and high <= 1 + _TOLERANCE:
        fix = "for data in [-1, 1] use (x + 1) / 2"
    elif low >= -_TOLERANCE and high <= 255 + _TOLERANCE:
        fix = "for 0-255 data use x / 255"
    else:
        fix = "e.g. (x - x.min()) / (x.max() - x.min())"
    raise UserValueError(
        f"{what} has values in [{low:.4g}, {high:.4g}], outside [0, 1]; rescale it first: {fix}"
    )


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)
        or min(size) < 1
    ):
        raise UserValueError(f"size must be (height, width) in positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _check_background(background) -> torch.Tensor:
    """-> (1, 1, 1) or (3, 1, 1) tensor; None is white."""
    values = 1.0 if background is None else background
    values = values if isinstance(values, (tuple, list)) else (values,)
    if len(values) not in (1, 3) or not all(
        # typeshed's numbers.Real declares no __ge__, so `0 <= v` looks unsupported to mypy
        isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1  # type: ignore[operator]
        for v in values
    ):
        raise UserValueError(
            f"background must be a grey level in [0, 1] or an (r, g, b) tuple of them, "
            f"got {background!r}"
        )
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(-1, 1, 1)


def _match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1:
        return image.expand(channels, -1, -1)
    if have == 3 and channels == 1:
        return torch.tensordot(torch.tensor(_LUMA), image, dims=1)[None]
    accepted = "a grey, RGB or RGBA image" if channels in (1, 3) else f"1 or {channels} channels"
    raise UserValueError(
        f"reference has {have} channels and the prior makes {channels}; give {accepted}"
    )


def _alpha_message(subject: str) -> str:
    return (
        f"{subject} an alpha channel: composited on a white background; pass background=... "
        "(a grey level or an (r, g, b) tuple in [0, 1]) to choose another"
    )


__all__ = ["as_reference_batch", "load_image"]

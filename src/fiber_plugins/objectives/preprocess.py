"""Map images from the prior's space ([-1, 1], its size) into a subject model's input space."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .._utils import to_unit_range
from ..errors import UserTypeError, UserValueError

_MODES = ("bilinear", "bicubic", "nearest", "area")


@dataclass(frozen=True)
class Preprocess:
    """Differentiable preprocessing: [-1, 1] -> (resize -> center crop) -> resize -> value range
    -> (x - mean) / std, the tensor version of an eval transform such as timm's or a Hugging Face
    image processor's.

    Parameters
    ----------
    size:
        Subject input size (int or (H, W)), resized to exactly; ``None`` keeps the size the
        crop (or the image) has.
    resize:
        Before the crop, as torchvision's ``Resize``: an int resizes the shorter side to it
        (aspect ratio kept), (H, W) resizes exactly; ``None`` skips it.
    crop:
        Center crop (int or (H, W)) after ``resize``, as torchvision's ``CenterCrop`` (an
        image smaller than the crop is padded with zeros, i.e. black); ``None`` skips it.
    value_range:
        Range the subject expects before normalisation, e.g. (0, 1) for torchvision/timm models,
        (-1, 1) for models trained on [-1, 1] inputs, (0, 255) for raw pixels.
    mean, std:
        Per-channel normalisation applied after the value range (timm's ``resolve_data_config``).
    channels:
        Number of channels the subject expects; 1 averages RGB to grey, 3 repeats a grey image.
    interpolation:
        One of 'bilinear', 'bicubic', 'nearest', 'area'; antialiased when shrinking.

    Raises
    ------
    UserValueError
        An unknown interpolation, only one of mean/std, or a std that is not positive.

    Examples
    --------
    >>> pre = Preprocess(size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    >>> pre(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3, 224, 224])
    """

    size: int | tuple[int, int] | None = None
    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in _MODES:
            raise UserValueError(
                f"unknown interpolation {self.interpolation!r}; choose one of {list(_MODES)}"
            )
        if (self.mean is None) != (self.std is None):
            raise UserValueError("give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise UserValueError(f"std must be positive, got {self.std}")
        for label in ("size", "resize", "crop"):
            value = getattr(self, label)
            sizes = value if isinstance(value, (tuple, list)) else (value,)
            if value is not None and (
                len(sizes) not in (1, 2)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)
            ):
                raise UserValueError(
                    f"{label} must be a positive int or (H, W) of positive ints, got {value!r}"
                )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Map prior-space images to the subject's input; differentiable.

        Parameters
        ----------
        x:
            (B, C, H, W) images in the prior's space, [-1, 1].

        Returns
        -------
        torch.Tensor
            (B, C', H', W') subject input: C' = :attr:`channels` (C when ``None``), (H', W') =
            :attr:`size` ((H, W) when ``None``), values in :attr:`value_range`, then normalised
            by :attr:`mean` / :attr:`std` when given.

        Raises
        ------
        UserValueError
            ``x`` is not 4-dimensional, or its channels cannot be mapped to :attr:`channels`.
        """
        if x.dim() != 4:
            raise UserValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        x = to_unit_range(x)
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 1:
                x = x.mean(1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                raise UserValueError(f"cannot map {x.shape[1]} channels to {self.channels}")
        if self.resize is not None:
            x = self._resize(x, _shorter_side(self.resize, x.shape[-2:]))
        if self.crop is not None:
            x = center_crop(x, _pair(self.crop))
        if self.size is not None:
            x = self._resize(x, _pair(self.size))
        lo, hi = self.value_range
        if (lo, hi) != (0.0, 1.0):
            x = lo + (hi - lo) * x
        if self.mean is not None:
            mean, std = _stats(self.mean, self.std, x.device, x.dtype)
            x = (x - mean) / std
        return x

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize (B, C, H, W) images in [0, 1] as PIL and torchvision do: bilinear and bicubic
        with antialiasing (PIL's kernels: bicubic a = -0.5), bicubic clamped to [0, 1]."""
        if tuple(x.shape[-2:]) == size:
            return x
        if self.interpolation not in ("bilinear", "bicubic"):
            return F.interpolate(x, size=size, mode=self.interpolation)
        x = F.interpolate(
            x, size=size, mode=self.interpolation, align_corners=False, antialias=True
        )
        return x.clamp(0.0, 1.0) if self.interpolation == "bicubic" else x

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the subject input for an image of ``size`` (H, W)."""
        if self.resize is not None:
            size = _shorter_side(self.resize, size)
        if self.crop is not None:
            size = _pair(self.crop)
        if self.size is not None:
            size = _pair(self.size)
        return (int(size[0]), int(size[1]))

    @property
    def fixes_size(self) -> bool:
        """Whether the subject input's size is fixed by this preprocessing (a size or a crop),
        whatever the image's size: then a reference can be read at its own resolution."""
        return self.size is not None or self.crop is not None

    def to_dict(self) -> dict:
        """The fields as a dict (``Preprocess(**p.to_dict())`` rebuilds ``p``).

        Returns
        -------
        dict
            ``size``, ``resize``, ``crop``, ``value_range``, ``mean``, ``std``, ``channels`` and
            ``interpolation``.
        """
        return asdict(self)

    @classmethod
    def from_timm(cls, model) -> Preprocess:
        """timm's eval transform (``timm.data.create_transform`` of ``resolve_data_config``) as
        a differentiable Preprocess.

        Parameters
        ----------
        model:
            A timm model. A ViT whose patch embedding has a fixed ``img_size`` gets that size
            (it may differ from the pretrained config's).

        Returns
        -------
        Preprocess
            For an input size (H, W) and ``crop_pct``: resize to (floor(H / crop_pct),
            floor(W / crop_pct)) (the shorter side for a square size in crop mode 'center',
            exactly in 'squash' mode), center crop (H, W), value range (0, 1), the model's
            mean/std and interpolation (one other than the four supported becomes
            'bilinear'). Crop mode 'border' (pad instead of crop) is treated as 'center': the
            two agree on square images, which is what priors produce.
        """
        import math

        from .._utils import require

        timm_data = require("timm.data")
        cfg = timm_data.resolve_data_config({}, model=model)
        interp = cfg.get("interpolation", "bilinear")
        size = tuple(int(v) for v in cfg["input_size"][-2:])
        # a ViT built with img_size=... keeps the pretrained config's size; its patch embedding
        # knows the size it actually accepts
        embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if embed_size is not None and not getattr(
            getattr(model, "patch_embed", None), "dynamic_img_size", False
        ):
            size = tuple(embed_size) if isinstance(embed_size, (tuple, list)) else (embed_size,) * 2
        crop_pct = float(cfg.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
        scale = (math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct))
        squash = cfg.get("crop_mode") == "squash" or scale[0] != scale[1]
        return cls(
            size=None,
            resize=scale if squash else scale[0],
            crop=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=interp if interp in _MODES else "bilinear",
        )


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) == 1:
        return (int(size[0]), int(size[0]))
    return (int(size[0]), int(size[1]))


def _shorter_side(resize, size) -> tuple[int, int]:
    """torchvision ``Resize`` sizes: an int sets the shorter side (the longer one scaled and
    truncated, as torchvision does), a pair is exact."""
    if not isinstance(resize, int) and len(resize) == 2:
        return (int(resize[0]), int(resize[1]))
    short_target = resize if isinstance(resize, int) else int(resize[0])
    h, w = int(size[0]), int(size[1])
    if h <= w:
        return (short_target, int(short_target * w / h))
    return (int(short_target * h / w), short_target)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's ``CenterCrop`` on (B, C, H, W): pads with zeros where the image is smaller,
    then takes the centre (offsets rounded as torchvision does)."""
    th, tw = size
    h, w = x.shape[-2:]
    if th > h or tw > w:
        pad = [(tw - w) // 2 if tw > w else 0, (tw - w + 1) // 2 if tw > w else 0]
        pad += [(th - h) // 2 if th > h else 0, (th - h + 1) // 2 if th > h else 0]
        x = F.pad(x, pad)
        h, w = x.shape[-2:]
        if (h, w) == (th, tw):
            return x
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


@functools.lru_cache(maxsize=64)
def _stats(mean, std, device, dtype):
    # cached per device: building them from tuples each call is a blocking host-to-device copy
    m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(device)
    return m, s


IDENTITY = Preprocess(value_range=(-1.0, 1.0))


def as_preprocess(p: Preprocess | dict | None) -> Preprocess:
    """The :class:`Preprocess` an objective's ``preprocess=`` argument stands for.

    Parameters
    ----------
    p:
        ``None`` (the default ``Preprocess()``: [-1, 1] -> [0, 1], same size), a
        :class:`Preprocess`, or a dict of its fields.

    Returns
    -------
    Preprocess
        The preprocessing (``p`` itself when it is one).

    Raises
    ------
    UserTypeError
        ``p`` is anything else (a sequence too).
    """
    if p is None:
        return Preprocess()
    if isinstance(p, Preprocess):
        return p
    if isinstance(p, dict):
        return Preprocess(**p)
    raise UserTypeError(f"preprocess must be a Preprocess or dict, got {type(p).__name__}")

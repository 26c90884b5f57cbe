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
    """Differentiable preprocessing: [-1, 1] -> resize -> value range -> (x - mean) / std.

    Parameters
    ----------
    size:
        Subject input size (int or (H, W)); ``None`` keeps the prior's size.
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
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            if tuple(x.shape[-2:]) != size:
                shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
                kw = {}
                if self.interpolation in ("bilinear", "bicubic"):
                    kw = {"align_corners": False, "antialias": shrink}
                x = F.interpolate(x, size=size, mode=self.interpolation, **kw)
        lo, hi = self.value_range
        if (lo, hi) != (0.0, 1.0):
            x = lo + (hi - lo) * x
        if self.mean is not None:
            mean, std = _stats(self.mean, self.std, x.device, x.dtype)
            x = (x - mean) / std
        return x

    def to_dict(self) -> dict:
        """The fields as a dict (``Preprocess(**p.to_dict())`` rebuilds ``p``).

        Returns
        -------
        dict
            ``size``, ``value_range``, ``mean``, ``std``, ``channels`` and ``interpolation``.
        """
        return asdict(self)

    @classmethod
    def from_timm(cls, model) -> Preprocess:
        """Input size, interpolation and mean/std from ``timm.data.resolve_data_config``.

        Parameters
        ----------
        model:
            A timm model. A ViT whose patch embedding has a fixed ``img_size`` gets that size
            (it may differ from the pretrained config's).

        Returns
        -------
        Preprocess
            Resizes to the model's (H, W) input size and normalises with its mean/std (value
            range (0, 1)); an interpolation other than the four supported ones becomes
            'bilinear'.
        """
        from .._utils import require

        timm_data = require("timm.data")
        cfg = timm_data.resolve_data_config({}, model=model)
        interp = cfg.get("interpolation", "bilinear")
        size = tuple(cfg["input_size"][-2:])
        # a ViT built with img_size=... keeps the pretrained config's size; its patch embedding
        # knows the size it actually accepts
        embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if embed_size is not None and not getattr(
            getattr(model, "patch_embed", None), "dynamic_img_size", False
        ):
            size = tuple(embed_size) if isinstance(embed_size, (tuple, list)) else (embed_size,) * 2
        return cls(
            size=size,
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=interp if interp in _MODES else "bilinear",
        )


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

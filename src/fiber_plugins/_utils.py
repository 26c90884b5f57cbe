"""Small helpers shared across the package: lazy toolkit imports, name suggestions, seeding."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import warnings
from collections.abc import Iterable
from types import ModuleType

import torch

from .errors import MissingExtraError

# toolkit module -> pip extra that installs it
_EXTRAS = {
    "captum": "captum",
    "zennit": "zennit",
    "crp": "zennit",
    "vit_prisma": "prisma",
    "transformer_lens": "lens",
    "timm": "timm",
    "torchmetrics": "metrics",
    "scipy": "metrics",
    "matplotlib": "metrics",
    "mlxtend": "data",
}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (the user's line),
    however deep inside the package the warning is raised."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 = the caller of warn()
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        or frame.f_code.co_filename == contextlib.__file__  # our `with` blocks' generator frames
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def require(module: str) -> ModuleType:
    """Import an optional toolkit, or raise an ImportError that names the pip extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = _EXTRAS.get(top)
        hint = f"pip install 'fiber-plugins[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{module!r} is not installed; install it with: {hint}") from err


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A short 'did you mean' fragment for an unknown name (empty string if nothing is close)."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not close:
        # fall back to names that share the prefix up to the first dot
        head = name.split(".")[0]
        close = [c for c in choices if c.startswith(head)][:n]
    return f"; closest: {', '.join(repr(c) for c in close)}" if close else ""


def resolve_device(name: str | None) -> torch.device:
    """The one place a device name is read: ``"auto"`` / None -> CUDA when available, else the
    CPU; anything else must name a device this machine has (one-line error otherwise)."""
    from .errors import UserValueError

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserValueError(
            f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserValueError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{'no GPU found' if torch.backends.cuda.is_built() else 'built without CUDA'}); "
                "use cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserValueError(f"device {name!r}: MPS is not available here; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserValueError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def row_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one (reference, sample) row: results do not depend on batch size."""
    g = torch.Generator(device="cpu")
    h = int(seed) & 0xFFFFFFFF
    for k in keys:
        h = (h * 1_000_003 + int(k) + 0x9E3779B9) & 0x7FFFFFFFFFFFFFFF
    g.manual_seed(h)
    return g


def randn_rows(
    generators: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32
) -> torch.Tensor:
    """Stack one standard-normal draw of `shape` per generator: (len(generators), *shape)."""
    out = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return out.to(device=device, dtype=dtype)

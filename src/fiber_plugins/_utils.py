"""Small helpers shared across the package: lazy toolkit imports, name suggestions, seeding,
devices, the image value ranges, and freezing a model for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import TypeVar

import torch

from .errors import MissingExtraError, UserValueError

# toolkit module -> pip extra that installs it
_EXTRAS = {
    "captum": "captum",
    "zennit": "zennit",
    "crp": "zennit",
    "vit_prisma": "prisma",
    "transformer_lens": "lens",
    "timm": "timm",
    "transformers": "hf",
    "open_clip": "openclip",
    "torchmetrics": "metrics",
    "scipy": "metrics",
    "matplotlib": "metrics",
    "mlxtend": "data",
}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _generated_init(frame: FrameType) -> bool:
    """A dataclass's generated ``__init__`` (compiled from a string), on the way from a config's
    ``__post_init__`` to the user's line."""
    code = frame.f_code
    return code.co_filename == "<string>" and code.co_name == "__init__"


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (the user's line),
    however deep inside the package the warning is raised."""
    frame: FrameType | None
    level, frame = 2, sys._getframe(1)  # stacklevel 2 = the caller of warn()
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        or frame.f_code.co_filename == contextlib.__file__  # our `with` blocks' generator frames
        or _generated_init(frame)  # a dataclass's __init__ calling our __post_init__
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
        raise UserValueError(
            f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps"
        )
    return device


def module_device(module, default: str | torch.device = "cpu") -> torch.device:
    """The device of ``module``'s first parameter; ``default`` for a parameter-free module or
    anything that is not an ``nn.Module`` (a plain function)."""
    params = module.parameters() if isinstance(module, torch.nn.Module) else iter(())
    p = next(params, None)
    return p.device if p is not None else torch.device(default)


# ---------------------------------------------------------------- statistics
def median(values: torch.Tensor) -> float:
    """The median of all values: the mean of the two middle ones for an even count (numpy's;
    ``torch.median`` returns the lower one); NaN for none."""
    flat = values.detach().flatten().cpu().double()  # on the CPU: MPS has no float64
    return float(flat.quantile(0.5)) if flat.numel() else float("nan")


# ---------------------------------------------------------------- image value ranges
# Images cross the package's boundary in [0, 1] (files, references, results) and live in the
# prior's space [-1, 1] inside it (samplers, objectives). These two maps are the only place the
# conversion is written; the formulas are the ones every sampler has always used, so results
# stay bit-identical.
def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: ``x * 2 - 1`` (a new tensor; dtype and device kept)."""
    return x01 * 2 - 1


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: ``(x + 1) / 2`` (a new tensor; no clamping)."""
    return (x + 1) / 2


# ---------------------------------------------------------------- model state
_M = TypeVar("_M")


@contextlib.contextmanager
def frozen(module: _M, eval: bool = True, requires_grad: bool | None = False) -> Iterator[_M]:
    """Run a block with ``module`` in eval mode and its parameters' gradients off, and restore
    every submodule's train/eval flag and every parameter's ``requires_grad`` exactly as they
    were, in ``finally`` (also when the block raises).

    ``eval=False`` leaves the train/eval flags alone; ``requires_grad=None`` leaves the gradient
    flags alone (``True`` turns them on). Anything that is not an ``nn.Module`` (a plain
    function) passes through untouched. The flags are read on entry, so nested blocks restore
    in order; the module is held only for the length of the block.

    >>> with frozen(model):  # doctest: +SKIP
    ...     features = model(x)
    """
    if not isinstance(module, torch.nn.Module):
        yield module
        return
    modes = [(m, m.training) for m in module.modules()] if eval else []
    flags = [(p, p.requires_grad) for p in module.parameters()] if requires_grad is not None else []
    try:
        if eval:
            module.eval()
        if requires_grad is not None:  # else `flags` is empty
            for p, _ in flags:
                p.requires_grad_(requires_grad)
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


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


def _probe_create(path: Path) -> None:
    """Create the missing folders of ``path`` and remove them again: what cannot be created
    (a read-only or virtual file system, a name too long) fails here, before models load."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True)
    finally:
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()


def check_writable_folder(path, what: str = "output folder") -> None:
    """Refuse, in one line, a ``path`` that is a file, lies under a file, is not writable, or
    cannot be created (a name too long, a file system that creates nothing); a folder that does
    not exist is created and removed again to find out. What is in an existing folder is the
    caller's to check."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise UserValueError(f"{what} {str(path)!r} is a file; give a folder path")
        existing = (
            path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
        )
        if not existing.is_dir():
            raise UserValueError(f"cannot create {what} {str(path)!r}: {str(existing)!r} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserValueError(
                f"{what} {str(path)!r} is not writable (no write permission on "
                f"{str(existing)!r}); give another folder"
            )
        if not path.is_dir():
            _probe_create(path)
    except OSError as err:  # a name too long, a path the system will not create, ...
        raise UserValueError(
            f"cannot use {what} {str(path)!r}: {err.strerror or err}; give another folder"
        ) from None

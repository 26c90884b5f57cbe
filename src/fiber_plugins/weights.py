"""Reading user-given weight files: one safe policy for the whole package.

A weights file is read in one of two ways, and nothing is ever unpickled:

- ``.safetensors``: with safetensors (the header is checked first, so a truncated or corrupt file
  is reported as such);
- ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``: with ``torch.load(weights_only=True)``, which reads
  tensors and plain containers and refuses any other pickled object.

Any other suffix is refused. Every failure is one line (a :class:`~fiber_plugins.errors.UserError`)
that names the file and says the fix; none advises ``weights_only=False``.

Examples
--------
>>> state = read_state_dict("resnet50.safetensors")                    # doctest: +SKIP
>>> load_weights(model, "resnet50.safetensors")                          # doctest: +SKIP
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import MissingFileError, UserTypeError, UserValueError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# keys under which training scripts nest the state dict of a checkpoint
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_RESAVE = (
    "re-save the state dict with safetensors in a session you trust: "
    "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
)


def _quote(path: Path) -> str:
    return repr(str(path))


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserValueError(f"{what} {_quote(path)} is a folder; pass the weights file itself")
    if not path.is_file():
        raise MissingFileError(f"{what} {_quote(path)} does not exist")
    return path


def check_safetensors(path: str | Path, what: str = "weights file") -> None:
    """Raise a one-line UserValueError when ``path`` is not a complete safetensors file.

    safetensors checks on opening that the header parses and that its tensors cover the file
    exactly, which catches truncated downloads and files of another format.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError / OSError; the kind does not change the fix
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserValueError(
            f"{what} {_quote(Path(path))} is truncated or corrupt ({reason}); "
            "re-download/re-save it"
        ) from None


def read_safetensors(
    path: str | Path, device: str | torch.device = "cpu", what: str = "weights file"
) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, with one-line errors for missing or broken files."""
    from safetensors.torch import load_file

    path = _existing_file(path, what)
    check_safetensors(path, what)
    try:
        state = load_file(str(path))
    except Exception as err:  # a header that parses over broken tensor data
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserValueError(
            f"{what} {_quote(path)} is truncated or corrupt ({reason}); re-download/re-save it"
        ) from None
    # moved after reading, so that a bad device is not reported as a bad file
    return state if str(device) == "cpu" else {k: v.to(device) for k, v in state.items()}


def read_torch(path: str | Path, what: str = "weights file"):
    """``torch.load(path, weights_only=True)`` with one-line errors (never advising to unpickle)."""
    path = _existing_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False (arbitrary code execution): not passed on
        raise UserValueError(
            f"{what} {_quote(path)} holds pickled Python objects that a safe torch.load refuses; "
            f"they are not loaded (unpickling can run code); {_RESAVE}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        text = str(err).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__
        raise UserValueError(
            f"{what} {_quote(path)} is not a readable torch file, it is truncated or corrupt "
            f"({reason}); re-download/re-save it"
        ) from None


def _as_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise UserTypeError(
            f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to "
            f"tensors); {_RESAVE}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserValueError(
            f"{source} is not a state dict of tensors: entries {bad[:3]} are not tensors; {_RESAVE}"
        )
    return {str(k): v for k, v in obj.items()}


def read_state_dict(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The state dict in a weights file (see the module docstring for the policy).

    A torch checkpoint that nests the state dict under ``state_dict``, ``model_state_dict`` or
    ``model`` is unwrapped.
    """
    path = _existing_file(path, what)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path, what=what)
    if suffix in TORCH_SUFFIXES:
        return _as_state_dict(read_torch(path, what), f"{what} {_quote(path)}")
    raise UserValueError(
        f"{what} {_quote(path)} has suffix {suffix or '(none)'!r}; expected a .safetensors file "
        f"(or a torch state dict {'/'.join(TORCH_SUFFIXES)}, read with weights_only=True)"
    )


def load_state(model: nn.Module, state: Mapping, source: str = "weights") -> nn.Module:
    """``model.load_state_dict(state)`` with every key and shape checked first (one-line errors).

    ``source`` names where the state came from in the messages.
    """
    state = _as_state_dict(state, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = "; the file's keys start with 'module.' (a DataParallel model): strip it"
        raise UserValueError(
            f"{source} and {type(model).__name__} do not match: {len(missing)} missing key(s) "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}){hint}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise UserValueError(
            f"{source} and {type(model).__name__} do not match: {len(wrong)} tensor(s) of another shape "
            f"(file vs model, e.g. {'; '.join(wrong[:2])}); were they saved from another "
            "configuration of the model?"
        )
    model.load_state_dict(state)
    return model


def load_weights(model: nn.Module, weights: str | Path | Mapping) -> nn.Module:
    """Load a weights file (or an in-memory state dict) into ``model``, strictly; returns it."""
    if isinstance(weights, Mapping):
        return load_state(model, weights, "the given state dict")
    if not isinstance(weights, (str, Path)):
        raise UserTypeError(
            f"weights must be a file path or a state dict, got {type(weights).__name__}"
        )
    state = read_state_dict(weights)
    return load_state(model, state, f"weights {_quote(Path(weights))}")


__all__ = [
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "check_safetensors",
    "load_state",
    "load_weights",
    "read_safetensors",
    "read_state_dict",
    "read_torch",
]

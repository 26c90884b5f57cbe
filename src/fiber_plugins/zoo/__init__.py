"""Models shipped inside the package (trained by ``fiber-plugins train``) and loaded by name.

Every shipped model is registered once, with :func:`register_model` on its loader in
:mod:`fiber_plugins.zoo.models`; :func:`list_models` gives the names, :func:`load` loads one.

{table}
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import MissingFileError, UserValueError
from ._registry import (
    ZooEntry,
    list_models,
    model_entry,
    models_table,
    prior_names,
    register_model,
)
from .models import AutoEncoder, ColorMNISTSubject, DigitCNN

if __doc__:  # None under python -OO
    __doc__ = __doc__.format(table=models_table())

# the names registered when the package was imported (list_models() is the live table)
NAMES = tuple(list_models())


def asset_dir(name: str) -> Path:
    """Folder of a shipped model; raises with the training command when it is missing."""
    entry = model_entry(name)
    path = Path(str(resources.files("fiber_plugins"))) / "assets" / entry.folder
    if not path.is_dir() or not any(path.rglob("*.safetensors")):
        raise MissingFileError(
            f"shipped weights for {name!r} are missing at {path}; train them with "
            f"'fiber-plugins train {entry.train}'"
        )
    return path


def training_info(name: str) -> dict:
    """The ``training.json`` stored next to a shipped model (config, data hash, metrics)."""
    return json.loads((asset_dir(name) / "training.json").read_text())


def load(name: str, device: str | torch.device | None = None):
    """Load a shipped model by name (see the table above), in eval mode; ``device`` is a
    device name (``auto``, ``cpu``, ``cuda``, ...) or None (the CPU)."""
    return model_entry(name).loader(asset_dir(name), device)


def load_prior(name: str, device: str | torch.device | None = None):
    """Load a shipped prior by name (what ``--prior zoo:NAME`` and a plan's ``prior.path =
    "zoo:NAME"`` name); a shipped model that is not a prior is refused in one line."""
    if not model_entry(name).prior:
        raise UserValueError(
            f"shipped model {name!r} is not a prior (not registered with prior=True); shipped "
            f"priors: {', '.join(prior_names())}"
        )
    return load(name, device=device)


__all__ = [
    "NAMES",
    "ZooEntry",
    "list_models",
    "load",
    "load_prior",
    "model_entry",
    "prior_names",
    "register_model",
    "asset_dir",
    "training_info",
    "AutoEncoder",
    "DigitCNN",
    "ColorMNISTSubject",
]

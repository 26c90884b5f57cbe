"""The shipped Color-MNIST models: the small subject networks (plain torch, no toolkit needed)
and one registered loader per shipped model (:func:`~fiber_plugins.zoo.register_model`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..data import color_mnist as cm
from ..data.color_mnist import Decolorize
from ._registry import register_model


class Encoder(nn.Module):
    """Grey 32x32 digit -> latent vector (B, latent_dim)."""

    def __init__(self, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1),  # 16x16
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # 8x8
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),  # 4x4
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
        )
        self.fc = nn.Linear(2 * width * 16, latent_dim)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(g).flatten(1))


class Decoder(nn.Module):
    """Latent vector -> grey 32x32 digit (unbounded; clamp to [0, 1] for display)."""

    def __init__(self, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(latent_dim, 2 * width * 16)
        self.deconv = nn.Sequential(
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1),  # 8x8
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),  # 16x16
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1),  # 32x32
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, 2 * self.width, 4, 4))


class AutoEncoder(nn.Module):
    def __init__(self, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.encoder = Encoder(latent_dim, width)
        self.decoder = Decoder(latent_dim, width)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(g))


class ColorMNISTSubject(nn.Module):
    """phi(x) = E(decolorize(x)): the paper's lossless subject. Input: colour images in [0, 1]."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.decolorize = Decolorize()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.decolorize(x))


class DigitCNN(nn.Module):
    """A small CNN digit classifier on coloured 32x32 images in [0, 1] (10 logits)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        z = self.pool(feats).flatten(1)
        return z if pre_logits else self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- the shipped models
# One decorated loader per shipped model: its name, its weights' folder under assets/ and the
# `fiber-plugins train` model that writes them. The summaries make the table in zoo's docstring.
_M = TypeVar("_M", bound=nn.Module)


def _on(model: _M, device) -> _M:
    """``model`` in eval mode, moved to ``device`` (None: left on the CPU)."""
    model = model.eval()
    if device is None:
        return model
    from .._utils import resolve_device

    return model.to(resolve_device(str(device)))


def _load_state(module: _M, folder: Path, device) -> _M:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return _on(module, device)


def _training_record(folder: Path) -> dict:
    return json.loads((folder / "training.json").read_text())


def _prior(folder: Path, device):
    from ..priors import load_prior

    return load_prior(folder, device=device)


@register_model("color-mnist-prior", folder="color_mnist/prior", train="prior", prior=True)
def color_mnist_prior(folder: Path, device):
    """pixel flow-matching prior (UNet2DModel, 32x32) on Color-MNIST"""
    return _prior(folder, device)


@register_model(
    "color-mnist-prior-ood", folder="color_mnist/prior_ood", train="prior-ood", prior=True
)
def color_mnist_prior_ood(folder: Path, device):
    """the same on the OOD colouring (independent fg/bg colours)"""
    return _prior(folder, device)


@register_model(
    "color-mnist-conditional", folder="color_mnist/conditional", train="conditional", prior=True
)
def color_mnist_conditional(folder: Path, device):
    """conditional flow-matching fiber model p(x | phi(x)), fiber loss 0.01"""
    return _prior(folder, device)


@register_model(
    "color-mnist-conditional-nofiber",
    folder="color_mnist/conditional_nofiber",
    train="conditional-nofiber",
    prior=True,
)
def color_mnist_conditional_nofiber(folder: Path, device):
    """the same trained without the fiber loss (lambda = 0)"""
    return _prior(folder, device)


# the input of the shipped subjects: Color-MNIST images, or the grey digits (autoencoder)
RGB = (3, cm.SIZE, cm.SIZE)
GREY = (1, cm.SIZE, cm.SIZE)


def _autoencoder(folder: Path, device) -> AutoEncoder:
    latent_dim = int(_training_record(folder).get("latent_dim", 32))
    return _load_state(AutoEncoder(latent_dim=latent_dim), folder, device)


@register_model(
    "color-mnist-subject", folder="color_mnist/autoencoder", train="autoencoder", input_size=RGB
)
def color_mnist_subject(folder: Path, device):
    """phi = E(decolorize(x)), E the grey-digit autoencoder encoder"""
    return _on(ColorMNISTSubject(_autoencoder(folder, None).encoder), device)


@register_model(
    "color-mnist-autoencoder",
    folder="color_mnist/autoencoder",
    train="autoencoder",
    input_size=GREY,
)
def color_mnist_autoencoder(folder: Path, device):
    """the whole grey-digit autoencoder"""
    return _autoencoder(folder, device)


@register_model(
    "color-mnist-classifier", folder="color_mnist/classifier", train="classifier", input_size=RGB
)
def color_mnist_classifier(folder: Path, device):
    """small CNN digit classifier on coloured images"""
    return _load_state(DigitCNN(), folder, device)


@register_model("color-mnist-vit", folder="color_mnist/vit", train="vit", input_size=RGB)
def color_mnist_vit(folder: Path, device):
    """tiny vit-prisma HookedViT digit classifier (needs the prisma extra)"""
    from .training import build_vit

    return _load_state(build_vit(_training_record(folder).get("config")), folder, device)


@register_model("color-mnist-vit-sae", folder="color_mnist/vit_sae", train="sae")
def color_mnist_vit_sae(folder: Path, device):
    """ReLU SAE on that ViT's ``blocks.1.hook_resid_post`` (all tokens)"""
    from ..adapters.sae import SparseAutoencoder

    return _on(SparseAutoencoder.load(folder), device)

"""Small subject models for the shipped Color-MNIST example (plain torch, no toolkit needed)."""

from __future__ import annotations

import torch
from torch import nn

from ..data.color_mnist import Decolorize


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

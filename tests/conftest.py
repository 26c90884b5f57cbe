"""Shared fixtures: tiny diffusers priors saved with save_pretrained and loaded back offline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fiber_plugins as fp


def tiny_unet(sample_size=16, channels=3, seed=0, **kw):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kw,
    )


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


class TinySubject(nn.Module):
    """A small conv net: conv -> relu -> conv -> pool -> linear (6 outputs)."""

    def __init__(self, channels=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 6)

    def forward(self, x):
        return self.fc(self.pool(self.conv2(self.act(self.conv1(x)))).flatten(1))


def make_subject():
    """Factory used by the CLI tests (module:tests.conftest:make_subject)."""
    return TinySubject().eval()


@pytest.fixture
def subject():
    return TinySubject().eval()


@pytest.fixture(scope="session")
def pixel_prior_dir(tmp_path_factory):
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("pixel_prior")
    tiny_unet().save_pretrained(root / "unet")
    DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False
    ).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def latent_prior():
    """A random latent prior: 4x8x8 latent UNet + a 2-level VAE (16 px images)."""
    from diffusers import DDIMScheduler

    unet = tiny_unet(sample_size=8, channels=4)
    return fp.DiffusionPrior(
        unet, DDIMScheduler(num_train_timesteps=1000, clip_sample=False), tiny_vae()
    )


@pytest.fixture(scope="session")
def pixel_prior(pixel_prior_dir):
    return fp.load_prior(pixel_prior_dir)


def block_images(n, generator):
    """16x16 images in [-1, 1]: a uniform background with one 8x8 square of another colour."""
    bg = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    fg = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    x = bg.expand(n, 3, 16, 16).clone()
    pos = torch.randint(0, 9, (n, 2), generator=generator)
    for i in range(n):
        r, c = pos[i].tolist()
        x[i, :, r : r + 8, c : c + 8] = fg[i]
    return x


@pytest.fixture(scope="session")
def trained_prior(tmp_path_factory):
    """A tiny DDPM prior trained for 300 steps (~15 s) on block images, saved and loaded back."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet = tiny_unet()
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True
    )
    opt = torch.optim.Adam(unet.parameters(), 3e-3)
    acp = sched.alphas_cumprod
    for _ in range(300):
        x0 = block_images(32, g)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample - eps).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("trained_prior")
    unet.save_pretrained(root / "unet")
    sched.save_pretrained(root / "scheduler")
    return fp.load_prior(root)


@pytest.fixture
def block_references():
    return (block_images(2, torch.Generator().manual_seed(5)) + 1) / 2


@pytest.fixture
def references():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 16, 16, generator=g)

"""Pixel-space inversion: lowers the fiber loss from its start, the TV prior smooths, no prior
network is run, settings validation."""

from __future__ import annotations

import json

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.priors.prior import DiffusionPrior
from fiber_plugins.samplers import PixelInversionConfig, PixelInversionSampler, total_variation

from ..conftest import tiny_unet, tiny_vae


def _run(prior, subject, refs, **kw):
    cfg = dict(num_steps=40, lr=0.05)
    cfg.update(kw)
    return PixelInversionSampler(prior, fp.FiberObjective(subject), **cfg).sample(
        references=refs, n=2, seed=0, progress=False
    )


def test_inversion_lowers_the_loss_and_tv_smooths(pixel_prior, subject, block_references):
    plain = _run(pixel_prior, subject, block_references)
    smooth = _run(pixel_prior, subject, block_references, tv_weight=1e-5)
    start = plain.loss_trace[..., 0]
    # measured: median 7.0e-4 at the start -> 1.5e-6
    assert (plain.fiber_loss < 0.1 * start).all(), (start, plain.fiber_loss)
    assert (smooth.fiber_loss < start).all()
    tv_plain = total_variation(plain.images.flatten(0, 1) * 2 - 1)
    tv_smooth = total_variation(smooth.images.flatten(0, 1) * 2 - 1)
    assert (tv_smooth < 0.5 * tv_plain).all(), (tv_plain, tv_smooth)
    assert plain.images.min() >= 0 and plain.images.max() <= 1
    assert plain.config["sampler"] == "pixel_inversion"


def test_starts_from_the_rows_noise_and_runs_no_prior_network(subject, references):
    from diffusers import DDIMScheduler

    latent = DiffusionPrior(
        tiny_unet(sample_size=8, channels=4), DDIMScheduler(clip_sample=False), tiny_vae()
    )
    calls = []
    hooks = [
        m.register_forward_hook(lambda *_: calls.append(1)) for m in (latent.denoiser, latent.vae)
    ]
    try:
        res = _run(latent, subject, references[:1], num_steps=3, l2_weight=1e-3)
        again = _run(latent, subject, references[:1], num_steps=3, l2_weight=1e-3)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    assert res.images.shape == (1, 2, 3, 16, 16)  # image space, not the (4, 8, 8) latent
    torch.testing.assert_close(res.images, again.images)  # seeded per row
    assert not torch.allclose(res.images[0, 0], res.images[0, 1])


def test_total_variation_by_hand():
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    # the differences over the top-left 2x2 block: pixel (0,1): dy=1; (1,0): dx=1;
    # (1,1): dx=-1, dy=-1 -> squared sums 1, 1, 2 -> TV_2 = 4; TV_1 = 1 + 1 + sqrt(2)
    assert total_variation(x).item() == pytest.approx(4.0)
    assert total_variation(x, beta=1.0).item() == pytest.approx(2 + 2**0.5, rel=1e-4)
    assert total_variation(torch.ones(2, 3, 5, 5)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="needs \\(B, C, H, W\\) images"):
        total_variation(torch.ones(3, 5, 5))


def test_config_roundtrip_and_validation():
    cfg = PixelInversionConfig(num_steps=5, tv_weight=0.1, tv_beta=1.0, optimiser="sgd")
    assert PixelInversionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(
        ValueError, match=r"unknown optimiser 'lbfgs'; choose one of \['sgd', 'adam'\]"
    ):
        PixelInversionConfig(optimiser="lbfgs")
    with pytest.raises(ValueError, match="tv_weight must be >= 0, got -0.5"):
        PixelInversionConfig(tv_weight=-0.5)
    with pytest.raises(ValueError, match=r"unknown pixel-inversion settings \['tv'\]"):
        PixelInversionConfig.from_dict({"tv": 1.0})

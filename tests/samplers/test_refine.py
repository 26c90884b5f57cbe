"""Latent refinement: lowers the fiber loss of given samples on a tiny latent prior, accepts a
FiberResult, pixel priors refine pixels, input and settings validation."""

from __future__ import annotations

import json

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.samplers import LatentRefineConfig, NoiseOptSampler, refine_latent


@pytest.fixture(scope="module")
def samples01(latent_prior):
    """Three unguided samples of the latent prior, (3, 3, 16, 16) in [0, 1]."""
    noise = torch.randn(3, *latent_prior.latent_shape, generator=torch.Generator().manual_seed(0))
    return ((latent_prior.sample_unguided(noise, num_steps=4) + 1) / 2).clamp(0, 1)


def test_refinement_lowers_the_fiber_loss(latent_prior, subject, samples01, block_references):
    objective = fp.FiberObjective(subject)
    y = objective.target(block_references[:1] * 2 - 1)  # (1, 6): one target for all samples
    res = refine_latent(latent_prior, objective, samples01, y, steps=10, lr=0.05)
    assert res.images.shape == (1, 3, 3, 16, 16) and res.loss_trace.shape == (1, 3, 11)
    before = torch.tensor(res.config["fiber_loss_before"])  # D(E(x)), the start of the steps
    given = torch.tensor(res.config["fiber_loss_input"])  # x as it was given
    # measured: given 6.3e-3 / 5.2e-3 / 6.8e-3, round trip ~5.7e-3, refined 3.5e-3 / 4.2e-3 / 3.7e-3
    assert (res.fiber_loss < 0.85 * before).all(), (before, res.fiber_loss)
    assert res.fiber_loss.median() < given.median()
    torch.testing.assert_close(res.loss_trace[..., 0], before)
    assert res.config["kept_step"] == [[10, 10, 10]]
    assert res.config["sampler"] == "latent_refine" and not res.failed.any()


def test_refines_a_fiber_result_and_pixel_priors(pixel_prior, subject, references):
    objective = fp.FiberObjective(subject)
    first = NoiseOptSampler(
        pixel_prior, objective, num_steps=2, max_iters=1, threshold=None
    ).sample(references=references, n=2, progress=False)
    res = refine_latent(pixel_prior, objective, first, steps=4, lr=0.02)
    assert res.images.shape == first.images.shape and res.references is first.references
    # a pixel prior: encode/decode are the identity, so step 0 is the given sample itself
    torch.testing.assert_close(res.loss_trace[..., 0], first.fiber_loss, rtol=1e-4, atol=1e-7)
    assert (res.fiber_loss < first.fiber_loss).all()
    # N images with one target each -> (N, 1, ...)
    flat = refine_latent(pixel_prior, objective, first.images[:, 0], first.targets, steps=2)
    assert flat.images.shape == (2, 1, 3, 16, 16)


def test_bad_inputs_and_settings(pixel_prior, subject):
    objective = fp.FiberObjective(subject)
    imgs = torch.rand(3, 3, 16, 16)
    with pytest.raises(ValueError, match="3 images but 2 targets"):
        refine_latent(pixel_prior, objective, imgs, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="gives 6 features"):
        refine_latent(pixel_prior, objective, imgs, torch.zeros(5))
    with pytest.raises(ValueError, match="needs targets="):
        refine_latent(pixel_prior, objective, imgs)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        refine_latent(pixel_prior, objective, imgs * 2 - 1, torch.zeros(6))
    with pytest.raises(ValueError, match=r"unknown latent-refinement settings \['iters'\]"):
        refine_latent(pixel_prior, objective, imgs, torch.zeros(6), iters=3)
    with pytest.raises(
        ValueError, match=r"unknown optimiser 'lion'; choose one of \['sgd', 'adam'\]"
    ):
        LatentRefineConfig(optimiser="lion")
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        LatentRefineConfig(steps=0)
    cfg = LatentRefineConfig(steps=3, lr=0.1, optimiser="sgd")
    assert LatentRefineConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

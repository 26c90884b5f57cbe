"""DPS guidance: lowers the fiber loss vs unguided sampling, one network forward per step,
plain DDIM without guidance, settings validation."""

from __future__ import annotations

import json

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.samplers import DPSConfig, DPSSampler, GuidanceSchedule, NDTMSampler


def test_dps_lowers_the_fiber_loss_vs_unguided(trained_prior, subject, block_references):
    objective = fp.FiberObjective(subject)
    kw = dict(references=block_references, n=2, seed=0, progress=False)
    guided = DPSSampler(trained_prior, objective, num_steps=8, guidance=100.0).sample(**kw)
    unguided = DPSSampler(trained_prior, objective, num_steps=8, guidance=0.0).sample(**kw)
    # measured: 1.2e-4 vs 9.8e-4
    assert guided.median_loss() <= 0.5 * unguided.median_loss(), (
        guided.median_loss(),
        unguided.median_loss(),
    )
    assert guided.loss_trace.shape == (2, 2, 8) and torch.isfinite(guided.loss_trace).all()
    assert guided.config["sampler"] == "dps" and not guided.failed.any()


def test_without_guidance_dps_is_plain_ddim(pixel_prior, subject, references):
    objective = fp.FiberObjective(subject)
    kw = dict(references=references[:1], n=2, seed=4, progress=False)
    for eta in (0.0, 1.0):
        dps = DPSSampler(pixel_prior, objective, num_steps=4, guidance=0.0, eta=eta).sample(**kw)
        ddim = NDTMSampler(pixel_prior, objective, num_steps=4, guidance=0.0, eta=eta).sample(**kw)
        torch.testing.assert_close(dps.images, ddim.images)


def test_one_network_forward_per_step(pixel_prior, subject, references):
    calls = []
    handle = pixel_prior.denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        DPSSampler(pixel_prior, fp.FiberObjective(subject), num_steps=5, guidance=10.0).sample(
            references=references[:1], n=3, batch_size=3, progress=False
        )
    finally:
        handle.remove()
    assert len(calls) == 5


def test_normalize_schedules_and_eta(pixel_prior, subject, references):
    objective = fp.FiberObjective(subject)
    kw = dict(references=references[:1], n=2, seed=0, progress=False)
    plain = DPSSampler(pixel_prior, objective, num_steps=4, guidance=0.0).sample(**kw)
    for settings in (
        dict(normalize=False, guidance=1000.0),
        dict(guidance=GuidanceSchedule("interval", 50.0, low=0.3, high=0.9), eta=0.5),
        dict(guidance=GuidanceSchedule("ramp", 10.0, final=100.0)),
    ):
        res = DPSSampler(pixel_prior, objective, num_steps=4, **settings).sample(**kw)
        assert torch.isfinite(res.fiber_loss).all() and not res.failed.any()
        assert not torch.allclose(res.images, plain.images)


def test_config_roundtrip_and_validation():
    cfg = DPSConfig(num_steps=9, guidance=GuidanceSchedule("interval", 3.0, 0.1, 0.7))
    assert DPSConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert DPSConfig(guidance=2).guidance == GuidanceSchedule("constant", 2.0)
    with pytest.raises(ValueError, match="eta must be in \\[0, 1\\], got 2"):
        DPSConfig(eta=2)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1, got 0"):
        DPSConfig(num_steps=0)
    with pytest.raises(TypeError, match="guidance must be a float or a GuidanceSchedule, got 'x'"):
        DPSConfig(guidance="x")
    with pytest.raises(ValueError, match="unknown guidance schedule 'cosine'"):
        DPSConfig(guidance={"kind": "cosine"})
    with pytest.raises(ValueError, match=r"unknown DPS settings \['scale'\]; valid: "):
        DPSConfig.from_dict({"scale": 1.0})

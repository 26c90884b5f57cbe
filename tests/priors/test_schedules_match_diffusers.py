"""gamma = 0 must reproduce the prior's plain sampler, checked against diffusers' own schedulers."""

from __future__ import annotations

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.priors import DiffusionPrior

from ..conftest import tiny_unet


def _ddim_reference(unet, sched_cfg, x, num_steps, eta=0.0, noises=None):
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(sched_cfg)
    s.set_timesteps(num_steps)
    with torch.no_grad():
        for i, t in enumerate(s.timesteps):
            out = unet(x, t).sample
            kw = {"variance_noise": noises[i]} if eta > 0 else {}
            x = s.step(out, t, x, eta=eta, **kw).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_unguided_ndtm_matches_diffusers_ddim(prediction_type, clip_sample, subject):
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    cfg = DDPMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=clip_sample
    ).config
    prior = DiffusionPrior(unet, cfg)
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = _ddim_reference(unet, cfg, x_T.clone(), 10)
    ours = prior.sample_unguided(x_T.clone(), num_steps=10)
    # one step agrees to float32 rounding; a random network amplifies rounding along the chain
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=5e-4)
    one_ref = _ddim_reference(unet, cfg, x_T.clone(), 1)
    torch.testing.assert_close(
        prior.sample_unguided(x_T.clone(), num_steps=1), one_ref, rtol=1e-5, atol=1e-6
    )

    # the full NDTM sampler with gamma = 0 gives the same images (its x_T comes from the row seeds)
    objective = fp.FiberObjective(subject)
    sampler = fp.NDTMSampler(prior, objective, num_steps=10, guidance=0.0)
    res = sampler.sample(targets=torch.zeros(6), n=2, seed=3, progress=False)
    from fiber_plugins._utils import randn_rows, row_generator

    x_T2 = randn_rows([row_generator(3, 0, m) for m in range(2)], (3, 16, 16), "cpu")
    ref2 = _ddim_reference(unet, cfg, x_T2, 10).clamp(-1, 1)
    torch.testing.assert_close(res.images[0] * 2 - 1, ref2, rtol=1e-3, atol=5e-4)


def test_stochastic_ddim_matches_with_same_noise():
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    cfg = DDPMScheduler(num_train_timesteps=1000, clip_sample=False).config
    prior = DiffusionPrior(unet, cfg)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    noises = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(8)]
    ref = _ddim_reference(unet, cfg, x_T.clone(), 8, eta=0.7, noises=noises)
    ours = prior.sample_unguided(x_T.clone(), num_steps=8, eta=0.7, step_noises=noises)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_flow_matching_matches_euler_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    unet = tiny_unet()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    prior = DiffusionPrior(unet, sched)
    assert prior.kind == "flow"
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    x = x_T.clone()
    sched.set_timesteps(12)
    with torch.no_grad():
        for t in sched.timesteps:
            v = unet(x, t.expand(x.shape[0])).sample
            x = sched.step(v, t, x).prev_sample
    ours = prior.sample_unguided(x_T.clone(), num_steps=12)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_tweedie_and_noising_are_consistent(pixel_prior):
    """x0_hat of q(x_t | x0) built with the model's own eps is x0 exactly (algebra check)."""
    step = pixel_prior.timesteps(10)[3]
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    eps = torch.randn_like(x0)
    x_t = pixel_prior.add_noise(x0, eps, step)
    eps_hat, x0_hat = pixel_prior.predict(x_t, step, out=eps)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps)


def test_add_noise_matches_diffusers(pixel_prior_dir, pixel_prior):
    from diffusers import DDPMScheduler

    s = DDPMScheduler.from_pretrained(pixel_prior_dir / "scheduler")
    x0, eps = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([321, 321])
    torch.testing.assert_close(pixel_prior.add_noise(x0, eps, 321.0), s.add_noise(x0, eps, t))

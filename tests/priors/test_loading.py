"""Loading priors from diffusers folders (offline) and clear errors for broken folders."""

from __future__ import annotations

import shutil

import pytest
import torch

import fiber_plugins as fp

from ..conftest import tiny_unet, tiny_vae


def test_pixel_prior_roundtrip(pixel_prior):
    assert pixel_prior.kind == "pixel"
    assert pixel_prior.image_size == (16, 16) and pixel_prior.latent_shape == (3, 16, 16)
    steps = pixel_prior.timesteps(10)
    assert len(steps) == 10 and steps[0].level > steps[-1].level
    assert steps[-1].a_s == pytest.approx(1.0)


def _dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def dit_prior_dir(tmp_path_factory):
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp("dit")
    _dit().save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    DDIMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "scheduler")
    return root


def test_latent_dit_prior(dit_prior_dir, subject):
    prior = fp.load_prior(dit_prior_dir)
    assert prior.kind == "latent" and prior.class_label == 10  # the null class
    assert prior.latent_shape == (4, 4, 4) and prior.image_size == (8, 8)
    z = torch.randn(2, 4, 4, 4)
    out = prior.model_output(z, prior.timesteps(5)[0])
    assert out.shape == z.shape  # learned-variance half dropped
    img = prior.decode(z)
    assert img.shape == (2, 3, 8, 8)
    assert prior.encode(img).shape == z.shape
    obj = fp.FiberObjective(subject)
    res = fp.NDTMSampler(prior, obj, num_steps=4, inner_steps=2).sample(
        references=torch.rand(1, 3, 8, 8), n=2, progress=False
    )
    assert res.images.shape == (1, 2, 3, 8, 8) and torch.isfinite(res.fiber_loss).all()


def test_latent_unet_conditional_prior_uses_fixed_empty_conditioning(tmp_path, subject):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    unet.save_pretrained(tmp_path / "unet")
    tiny_vae().save_pretrained(tmp_path / "vae")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    cond = torch.randn(1, 3, 12)
    prior = fp.load_prior(tmp_path, conditioning=cond)
    assert prior.kind == "latent" and prior.denoiser_type == "UNet2DConditionModel"
    z = torch.randn(2, 4, 4, 4)
    step = prior.timesteps(5)[1]
    out = prior.model_output(z, step)
    with torch.no_grad():
        ref = unet(
            z, torch.tensor([int(step.timestep)] * 2), encoder_hidden_states=cond.expand(2, -1, -1)
        ).sample
    torch.testing.assert_close(out, ref)
    res = fp.NDTMSampler(prior, fp.FiberObjective(subject), num_steps=3, inner_steps=1).sample(
        references=torch.rand(1, 3, 8, 8), n=1, progress=False
    )
    assert torch.isfinite(res.fiber_loss).all()


def test_flow_prior_from_folder(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    tiny_unet().save_pretrained(tmp_path / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    prior = fp.load_prior(tmp_path)
    assert prior.kind == "flow"
    steps = prior.timesteps(8)
    assert steps[0].level == pytest.approx(1.0) and steps[-1].s_s == 0.0


def test_missing_folder_errors(tmp_path, pixel_prior_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fp.load_prior(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(pixel_prior_dir, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        fp.load_prior(broken)
    broken2 = tmp_path / "broken2"
    shutil.copytree(pixel_prior_dir, broken2)
    for f in (broken2 / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        fp.load_prior(broken2)
    empty = tmp_path / "empty"
    (empty / "scheduler").mkdir(parents=True)
    shutil.copy(pixel_prior_dir / "scheduler" / "scheduler_config.json", empty / "scheduler")
    with pytest.raises(FileNotFoundError, match="'unet/' or 'transformer/'"):
        fp.load_prior(empty)


def test_prior_weights_frozen_and_eval(pixel_prior):
    assert not any(p.requires_grad for p in pixel_prior.denoiser.parameters())
    assert not pixel_prior.denoiser.training


def test_tiny_unet_helper_is_small():
    assert sum(p.numel() for p in tiny_unet().parameters()) < 100_000

"""Stable Diffusion family priors: the fixed text conditioning equals the diffusers pipelines'
``encode_prompt`` (SD 1.x/2.x and SDXL), class-conditional UNets, and one-line errors.

Every component is tiny, built at random init, saved with save_pretrained and loaded back offline;
the tokenizer is a CLIPTokenizer built from a small vocab.json + merges.txt written here.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.errors import UserTypeError, UserValueError

from ..conftest import tiny_unet, tiny_vae

MAX_TOKENS = 12
PROMPT = "a photo of a cat"


def _one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def _vocab() -> dict[str, int]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), "ph", "ot", "phot", "photo</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\np h\no t\nph ot\nphot o</w>\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def _text_encoder(hidden=16, projection=False, use_attention_mask=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _vocab()
    extra = {"use_attention_mask": True} if use_attention_mask else {}
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=8,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **extra,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _cond_unet(sdxl=False, seed=0):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:  # pooled projection_dim 8 + 6 time ids x 4
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 8,
        )
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
        **extra,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)


def _sd_pipeline(tmp, use_attention_mask=False):
    from diffusers import StableDiffusionPipeline

    encoder = _text_encoder(use_attention_mask=use_attention_mask)
    if not hasattr(encoder, "text_model"):
        # transformers 5 flattened CLIPTextModel (final_layer_norm is its own attribute), while
        # the pipeline's clip_skip branch still reads text_encoder.text_model.final_layer_norm:
        # an alias (not a registered submodule) lets the pipeline's own code run unchanged
        object.__setattr__(
            encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
        )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=encoder,
        tokenizer=_tokenizer(tmp / "vocab"),
        unet=_cond_unet(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(tmp):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=_text_encoder(hidden=8, seed=1),
        text_encoder_2=_text_encoder(hidden=8, projection=True, seed=2),
        tokenizer=_tokenizer(tmp / "vocab"),
        tokenizer_2=_tokenizer(tmp / "vocab_2"),
        unet=_cond_unet(sdxl=True),
        scheduler=_scheduler(),
        add_watermarker=False,
    )


@pytest.fixture(scope="module", params=[False, True], ids=["no-mask", "attention-mask"])
def sd(request, tmp_path_factory):
    """(pipeline, its save_pretrained folder): SD 1.x layout, with/without use_attention_mask."""
    tmp = tmp_path_factory.mktemp("sd")
    pipe = _sd_pipeline(tmp, use_attention_mask=request.param)
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    pipe = _sdxl_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe"


def _max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------- SD 1.x / 2.x
@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("prompt", ["", PROMPT])
def test_sd_conditioning_matches_pipeline_encode_prompt(sd, prompt, clip_skip):
    pipe, folder = sd
    prior = fp.load_prior(folder, prompt=prompt, clip_skip=clip_skip)
    with torch.no_grad():
        ref = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False, clip_skip=clip_skip)[0]
    assert prior.conditioning is not None and prior.added_cond is None
    assert _max_diff(prior.conditioning, ref) <= 1e-5
    if prompt == "" and clip_skip is None:  # the default: the empty prompt
        assert _max_diff(fp.load_prior(folder).conditioning, ref) <= 1e-5


def test_sd_attention_mask_and_prompt_change_the_conditioning(sd):
    pipe, folder = sd
    empty = fp.load_prior(folder).conditioning
    photo = fp.load_prior(folder, prompt=PROMPT).conditioning
    skipped = fp.load_prior(folder, clip_skip=1).conditioning
    assert empty is not None and photo is not None and skipped is not None
    assert empty.shape == (1, MAX_TOKENS, 16)
    assert _max_diff(empty, photo) > 1e-3 and _max_diff(empty, skipped) > 1e-3
    if getattr(
        pipe.text_encoder.config, "use_attention_mask", False
    ):  # the mask changes padded positions' states
        with torch.no_grad():
            ids = pipe.tokenizer(
                "", padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
            )
            unmasked = pipe.text_encoder(ids.input_ids)[0]
        assert _max_diff(empty, unmasked) > 1e-4


def test_sd_denoiser_call_matches_unet(sd):
    pipe, folder = sd
    prior = fp.load_prior(folder, prompt=PROMPT)
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    step = prior.timesteps(5)[1]
    out = prior.model_output(x, step)
    with torch.no_grad():
        t = torch.full((2,), int(round(step.timestep)), dtype=torch.long)
        ref = pipe.unet(x, t, encoder_hidden_states=embeds.expand(2, -1, -1)).sample
    assert _max_diff(out, ref) <= 1e-5


def test_sd_prior_samples(sd, subject):
    prior = fp.load_prior(sd[1])
    assert prior.kind == "latent" and prior.image_size == (16, 16)
    res = fp.NDTMSampler(prior, fp.FiberObjective(subject), num_steps=2, inner_steps=1).sample(
        references=torch.rand(1, 3, 16, 16), n=1, progress=False
    )
    assert res.images.shape == (1, 1, 3, 16, 16) and torch.isfinite(res.fiber_loss).all()


def test_long_prompt_is_truncated_with_a_warning(sd):
    pipe, folder = sd
    prompt = " ".join(["photo"] * 20)
    with pytest.warns(UserWarning, match="reads the first 12"):
        prior = fp.load_prior(folder, prompt=prompt)
    with torch.no_grad():
        ref = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]
    assert _max_diff(prior.conditioning, ref) <= 1e-5


# ------------------------------------------------------------------------------------ SDXL
@pytest.mark.parametrize("clip_skip", [None, 1])
@pytest.mark.parametrize("prompt", ["", PROMPT])
def test_sdxl_conditioning_and_denoiser_call_match_pipeline(sdxl, prompt, clip_skip):
    pipe, folder = sdxl
    prior = fp.load_prior(folder, prompt=prompt, clip_skip=clip_skip)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device=torch.device("cpu"), num_images_per_prompt=1,
            do_classifier_free_guidance=False, clip_skip=clip_skip,
        )  # fmt: skip
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=embeds.dtype,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    assert prior.added_cond is not None and prior.conditioning is not None
    assert prior.conditioning.shape == (1, MAX_TOKENS, 16) and pooled.shape == (1, 8)
    assert _max_diff(prior.conditioning, embeds) <= 1e-5
    assert _max_diff(prior.added_cond["text_embeds"], pooled) <= 1e-5
    assert torch.equal(prior.added_cond["time_ids"], time_ids)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    step = prior.timesteps(4)[0]
    out = prior.model_output(x, step)
    with torch.no_grad():
        t = torch.full((2,), int(round(step.timestep)), dtype=torch.long)
        added = {"text_embeds": pooled.expand(2, -1), "time_ids": time_ids.expand(2, -1)}
        ref = pipe.unet(
            x, t, encoder_hidden_states=embeds.expand(2, -1, -1), added_cond_kwargs=added
        ).sample
    assert _max_diff(out, ref) <= 1e-5


def test_sdxl_prior_samples(sdxl, subject):
    prior = fp.load_prior(sdxl[1], prompt=PROMPT)
    res = fp.NDTMSampler(prior, fp.FiberObjective(subject), num_steps=2, inner_steps=1).sample(
        references=torch.rand(1, 3, 16, 16), n=1, progress=False
    )
    assert torch.isfinite(res.fiber_loss).all()


def test_sdxl_without_text_encoders_needs_conditioning_and_pooled(sdxl, tmp_path):
    pipe, folder = sdxl
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.rmtree(bare / part)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(bare)
    message = _one_line(err)
    assert "text_encoder_2/ + tokenizer_2/" in message and "conditioning=" in message
    assert "pooled=" in message and str(bare) in message
    embeds = torch.randn(1, 5, 16)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(bare, conditioning=embeds)
    assert "pooled=" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(bare, conditioning=embeds, pooled=torch.randn(1, 7))
    assert "(1, 8)" in _one_line(err)
    prior = fp.load_prior(bare, conditioning=embeds, pooled=torch.randn(1, 8))
    assert prior.model_output(torch.randn(1, 4, 8, 8), prior.timesteps(3)[0]).shape == (1, 4, 8, 8)
    zeros = fp.load_prior(bare, conditioning="zeros")  # SDXL's unconditional input
    assert zeros.added_cond is not None and not zeros.added_cond["text_embeds"].any()


# ------------------------------------------------------------------------------- one-line errors
def test_conditional_unet_without_text_encoder_needs_conditioning(sd, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(sd[1], bare)
    shutil.rmtree(bare / "text_encoder")
    with pytest.raises(UserValueError) as err:
        fp.load_prior(bare)
    message = _one_line(err)
    assert str(bare) in message and "text_encoder/ + tokenizer/" in message
    assert "conditioning=" in message and "(1, L, 16)" in message
    with pytest.raises(UserValueError) as err:
        fp.load_prior(bare, prompt=PROMPT)
    assert f"prompt={PROMPT!r}" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(bare, conditioning=torch.randn(1, 4, 12))
    assert "(1, 4, 12)" in _one_line(err) and "(1, L, 16)" in str(err.value)
    assert fp.load_prior(bare, conditioning=torch.randn(1, 4, 16)).conditioning.shape == (1, 4, 16)


def test_diffusion_prior_refuses_missing_conditioning_unless_zeros():
    unet = _cond_unet()
    with pytest.raises(UserValueError) as err:
        fp.DiffusionPrior(unet, _scheduler())
    message = _one_line(err)
    assert "conditioning=" in message and "'zeros'" in message
    prior = fp.DiffusionPrior(unet, _scheduler(), conditioning="zeros")
    x = torch.randn(1, 4, 8, 8)
    out = prior.model_output(x, 500)
    with torch.no_grad():
        ref = unet(x, torch.tensor([500]), encoder_hidden_states=torch.zeros(1, 1, 16)).sample
    assert _max_diff(out, ref) == 0
    with pytest.raises(UserValueError, match="'none'"):
        fp.DiffusionPrior(unet, _scheduler(), conditioning="none")
    with pytest.raises(UserTypeError, match="torch.Tensor"):
        fp.DiffusionPrior(unet, _scheduler(), conditioning=[[0.0] * 16])
    with pytest.raises(UserValueError, match="pooled= is for SDXL"):
        fp.DiffusionPrior(unet, _scheduler(), conditioning="zeros", pooled=torch.zeros(1, 8))


def test_prompt_arguments_errors(sd, pixel_prior_dir):
    folder = sd[1]
    with pytest.raises(UserValueError) as err:
        fp.load_prior(folder, prompt=PROMPT, conditioning=torch.randn(1, 4, 16))
    assert "exclude each other" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(folder, clip_skip=-1)
    assert "clip_skip" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(folder, clip_skip=9)
    assert "clip_skip=9" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(pixel_prior_dir, prompt=PROMPT)
    assert "UNet2DModel" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        fp.load_prior(pixel_prior_dir, conditioning=torch.randn(1, 4, 16))
    assert "drop conditioning=" in _one_line(err)


# ------------------------------------------------------------------------ class-conditional UNet
def test_class_conditional_unet(tmp_path):
    unet = tiny_unet(sample_size=8, num_class_embeds=5)
    with pytest.raises(UserValueError) as err:
        fp.DiffusionPrior(unet, _scheduler())
    message = _one_line(err)
    assert "num_class_embeds=5" in message and "class_label=" in message and "null" in message
    for bad in (5, -1):
        with pytest.raises(UserValueError) as err:
            fp.DiffusionPrior(unet, _scheduler(), class_label=bad)
        assert f"class_label={bad}" in _one_line(err) and "0..4" in str(err.value)
    with pytest.raises(UserTypeError):
        fp.DiffusionPrior(unet, _scheduler(), class_label=True)
    with pytest.raises(UserValueError) as err:
        fp.DiffusionPrior(tiny_unet(sample_size=8), _scheduler(), class_label=3)
    assert "not class-conditional" in _one_line(err)

    unet.save_pretrained(tmp_path / "unet")
    _scheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(UserValueError) as err:
        fp.load_prior(tmp_path)
    assert "no null class" in _one_line(err)
    prior = fp.load_prior(tmp_path, class_label=3)
    assert prior.class_label == 3
    x = torch.randn(2, 3, 8, 8)
    out = prior.model_output(x, 300)
    with torch.no_grad():
        ref = unet(x, torch.tensor([300, 300]), class_labels=torch.tensor([3, 3])).sample
        other = unet(x, torch.tensor([300, 300]), class_labels=torch.tensor([1, 1])).sample
    assert _max_diff(out, ref) <= 1e-5 and _max_diff(out, other) > 1e-4


def test_pickled_text_encoder_refused(sd, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(sd[1], folder)
    weights = folder / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UserValueError) as err:
        fp.load_prior(folder)
    assert "model.bin" in _one_line(err) and "pickles are not loaded" in str(err.value)

"""ADM (openai/guided-diffusion) checkpoints converted with ``convert_adm`` compute what ADM computes.

The reference is deepinv's ``DiffUNet`` (deepinv 0.5.0), an independent implementation of
guided-diffusion's ``UNetModel`` whose state-dict keys are guided-diffusion's. Its constructor has
two fixed configurations only (``large_model=True``: 256x256_diffusion_uncond.pt's flags;
``large_model=False``: DPS's ffhq_10m.pt flags), 256 px and no class conditioning, so the small
references below are ``SmallADM``: deepinv's own blocks (``ResBlock``, ``AttentionBlock`` with
``QKVAttentionLegacy`` / ``QKVAttention``, ``Downsample``, ``Upsample``, ...) and its own
``forward_diffusion`` (including ``label_emb``), wired by guided-diffusion's ``UNetModel.__init__``
with the flags as arguments. That wiring is checked against the two unmodified ``DiffUNet``
configurations (same modules, heads and parameter shapes), on the ``meta`` device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from fiber_plugins.cli.main import main
from fiber_plugins.cli.parser import _ADM_FLAG_HELP
from fiber_plugins.errors import UserValueError
from fiber_plugins.priors import adm, convert_adm, load_prior

dn = pytest.importorskip("deepinv.models.diffunet")


# ------------------------------------------------------------------------------ the reference


class SmallADM(dn.DiffUNet):
    """guided-diffusion's UNetModel (its __init__ wiring, flags as arguments) built from deepinv's
    blocks; ``forward_diffusion`` is deepinv's."""

    def __init__(
        self,
        *,
        image_size,
        model_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult,
        in_channels=3,
        learn_sigma=True,
        num_classes=None,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        dropout=0.0,
    ):
        nn.Module.__init__(self)  # not DiffUNet.__init__: fixed flags and a weight download
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_ds = tuple(image_size // r for r in attention_resolutions)
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.dtype = torch.float32
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res(cin, cout=None, **kw):
            return dn.ResBlock(
                cin,
                emb_dim,
                dropout,
                out_channels=cout,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attn(ch, heads):
            return dn.AttentionBlock(
                ch,
                num_heads=heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [dn.TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(dn.TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else dn.Downsample(ch, True, 2)
                self.input_blocks.append(dn.TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = dn.TimestepEmbedSequential(res(ch), attn(ch, num_heads), res(ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if resblock_updown else dn.Upsample(ch, True, 2)
                    )
                    ds //= 2
                self.output_blocks.append(dn.TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            dn.normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1)
        )


def reference_from_flags(arch: adm.ADMArchitecture) -> SmallADM:
    return SmallADM(
        image_size=arch.image_size,
        model_channels=arch.num_channels,
        num_res_blocks=arch.num_res_blocks,
        attention_resolutions=arch.attention_resolutions,
        channel_mult=arch.channel_mult,
        in_channels=arch.in_channels,
        learn_sigma=arch.learn_sigma,
        num_classes=arch.num_classes if arch.class_cond else None,
        num_heads=arch.num_heads,
        num_head_channels=arch.num_head_channels,
        num_heads_upsample=arch.num_heads_upsample,
        use_scale_shift_norm=arch.use_scale_shift_norm,
        resblock_updown=arch.resblock_updown,
        use_new_attention_order=arch.use_new_attention_order,
        dropout=arch.dropout,
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (ADM zero-initialises its output convolutions, which would make
    every comparison 0 == 0): fan-in scaled weights, GroupNorm scales near 1, small biases, unit
    class embeddings (so that classes differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("label_emb"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def adm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A guided-diffusion checkpoint's content: the state dict without DiffUNet's two schedule
    buffers (registered after loading, not in guided-diffusion's files)."""
    return {k: v for k, v in model.state_dict().items() if k not in adm.convert._EXTRA_BUFFERS}


def signature(model: nn.Module) -> list[tuple]:
    """What makes two ADM networks compute the same: module types, heads, attention order,
    up/down and FiLM switches, parameter shapes (names included)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (dn.QKVAttention, dn.QKVAttentionLegacy)):
            out.append((name, type(m).__name__, m.n_heads))
        elif isinstance(m, dn.ResBlock):
            out.append((name, "ResBlock", m.updown, m.use_scale_shift_norm, m.out_channels))
        elif isinstance(m, (dn.Downsample, dn.Upsample)):
            out.append((name, type(m).__name__, m.use_conv))
    shapes = [(k, tuple(v.shape)) for k, v in adm_state(model).items()]
    return out + shapes


# ------------------------------------------------------------------------------ small configs

SMALL = {
    # learned sigma, resblock_updown, FiLM, legacy head order, 32 channels per head
    "uncond": dict(
        image_size=32,
        num_channels=32,
        channel_mult="1,2,2",
        num_res_blocks=1,
        attention_resolutions="16,8",
        num_head_channels=32,
        learn_sigma=True,
        resblock_updown=True,
        use_scale_shift_norm=True,
    ),
    # class-conditional, new attention order (q/k/v before heads), 2 and 3 heads, cosine betas
    "cond": dict(
        image_size=32,
        num_channels=32,
        channel_mult="1,2,3",
        num_res_blocks=2,
        attention_resolutions="16,8",
        num_head_channels=32,
        learn_sigma=True,
        class_cond=True,
        num_classes=10,
        resblock_updown=True,
        use_new_attention_order=True,
        noise_schedule="cosine",
    ),
    # strided-conv / nearest+conv resampling, no FiLM, eps only, a fixed number of heads
    "plain": dict(
        image_size=32,
        num_channels=32,
        channel_mult="1,2,2",
        num_res_blocks=2,
        attention_resolutions="8",
        num_heads=2,
        learn_sigma=False,
        resblock_updown=False,
        use_scale_shift_norm=False,
    ),
}


def small_checkpoint(tmp_path, name: str, seed: int = 0):
    arch, _ = adm.resolve_architecture(**SMALL[name])
    ref = randomize(reference_from_flags(arch), seed)
    path = tmp_path / f"{name}.pt"
    torch.save(adm_state(ref), path)
    return path, ref, arch


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max abs difference, that over the output's max magnitude)."""
    diff = (a - b).abs().max().item()
    return diff, diff / max(b.abs().max().item(), 1e-12)


MEASURED: dict[str, float] = {}  # printed with -s: the differences the report quotes


def _record(key: str, a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    diff, rel = rel_diff(a, b)
    MEASURED[key] = diff
    print(f"{key}: max abs diff {diff:.3e} (relative {rel:.3e}, output scale {b.abs().max():.3g})")
    assert rel < tol, f"{key}: max abs diff {diff} (relative {rel}) over {tol}"


def _flags(name: str) -> list[str]:
    return [item for k, v in SMALL[name].items() for item in (f"--{k}", str(v))]


# ------------------------------------------------------------------------------ the reference is ADM


@pytest.mark.parametrize(
    "large, preset", [(True, "imagenet256-uncond"), (False, "ffhq256-dps")], ids=["large", "small"]
)
def test_small_adm_wiring_is_deepinv_diffunet(large, preset):
    """SmallADM with DiffUNet's fixed flags has DiffUNet's modules, heads and shapes."""
    arch, _ = adm.resolve_architecture(preset)
    with torch.device("meta"):
        theirs = dn.DiffUNet(large_model=large, pretrained=None)
        ours = reference_from_flags(arch)
    assert signature(ours) == signature(theirs)


# ------------------------------------------------------------------------------ presets on meta


@pytest.mark.parametrize(
    "large, preset", [(True, "imagenet256-uncond"), (False, "ffhq256-dps")], ids=["large", "small"]
)
def test_preset_keys_and_shapes_match_diffunet_on_meta(large, preset):
    """The full-size preset's ADM keys/shapes are DiffUNet's, in its order, and the converted
    state dict is exactly UNet2DModel's (both built on ``meta``: no memory)."""
    with torch.device("meta"):
        ref = dn.DiffUNet(large_model=large, pretrained=None)
    state = adm_state(ref)
    arch, _ = adm.resolve_architecture(preset)
    shapes = adm.adm_shapes(arch)
    assert list(shapes) == list(state)  # guided-diffusion's order too
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}
    converted = adm.convert_state_dict(state, arch)
    unet = adm.convert._meta_unet(adm.unet_config(arch))
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    assert preset in adm.matching_presets(state)


@pytest.mark.parametrize("preset", adm.SUPPORTED_PRESETS)
def test_every_supported_preset_fits_unet2dmodel_on_meta(preset):
    arch, _ = adm.resolve_architecture(preset)
    assert adm.expressibility_problem(arch) == ""
    with torch.device("meta"):
        ref = reference_from_flags(arch)
    state = adm_state(ref)
    assert adm.adm_shapes(arch) == {k: tuple(v.shape) for k, v in state.items()}
    converted = adm.convert_state_dict(state, arch)
    unet = adm.convert._meta_unet(adm.unet_config(arch))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }


def test_published_flags_of_the_presets():
    """The presets are the published MODEL_FLAGS (guided-diffusion README, DPS model_config)."""
    a = adm.resolve_architecture("imagenet256-uncond")[0]
    assert (a.num_channels, a.channel_mult, a.num_res_blocks, a.attention_ds) == (
        256,
        (1, 1, 2, 2, 4, 4),
        2,
        (8, 16, 32),
    )
    assert (a.num_head_channels, a.resblock_updown, a.use_scale_shift_norm) == (64, True, True)
    assert (a.learn_sigma, a.class_cond, a.noise_schedule, a.diffusion_steps) == (
        True,
        False,
        "linear",
        1000,
    )
    assert adm.resolve_architecture("imagenet256-cond")[0] == dataclasses.replace(
        a, class_cond=True
    )
    a64 = adm.resolve_architecture("imagenet64-cond")[0]
    assert (a64.num_channels, a64.channel_mult, a64.num_res_blocks, a64.noise_schedule) == (
        192,
        (1, 2, 3, 4),
        3,
        "cosine",
    )
    assert a64.use_new_attention_order and a64.class_cond and a64.num_head_channels == 64
    # DPS's configs/imagenet_model_config.yaml, as it is: the same network
    dps_imagenet = dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult="",
        learn_sigma=True,
        class_cond=False,
        use_checkpoint=False,
        attention_resolutions="32,16,8",
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        dropout=0.0,
        resblock_updown=True,
        use_fp16=False,
        use_new_attention_order=False,
    )
    assert adm.resolve_architecture(**dps_imagenet)[0] == a
    ffhq = adm.resolve_architecture("ffhq256-dps")[0]
    assert (ffhq.num_channels, ffhq.num_res_blocks, ffhq.attention_ds) == (128, 1, (16,))


@pytest.mark.parametrize(
    "preset, words",
    [("imagenet128-cond", "attention_head_dim"), ("imagenet512-cond", "sinusoids")],
)
def test_inexpressible_presets_are_refused_with_the_reason(tmp_path, preset, words):
    with pytest.raises(UserValueError) as err:
        convert_adm(tmp_path / "missing.pt", tmp_path / "out", preset=preset)
    text = str(err.value)
    assert "\n" not in text and words in text and preset in text
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ numerical equality


def _inputs(arch, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, arch.in_channels, arch.image_size, arch.image_size, generator=g)


def _compare_unet(folder, ref, arch, key, y=None):
    """The converted UNet2DModel (every output channel; class_labels=y) against ADM."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).eval()
    x = _inputs(arch)
    for t in (3, 500, arch.diffusion_steps - 1):
        tt = torch.full((2,), t, dtype=torch.long)
        with torch.no_grad():
            want = ref.forward_diffusion(x, tt, y=y)
            got = unet(x, tt, class_labels=y).sample
        assert got.shape == want.shape
        _record(f"{key} raw t={t}", got, want)
    return unet


def _compare_prior(folder, ref, arch, key, y=None, **load):
    """load_prior(folder) against ADM (with class y when given): the model output the samplers
    get, epsilon = the first in_channels output channels."""
    prior = load_prior(folder, **load)
    x = _inputs(arch)
    for t in (3, 500, arch.diffusion_steps - 1):
        tt = torch.full((2,), t, dtype=torch.long)
        with torch.no_grad():
            want = ref.forward_diffusion(x, tt, y=y)
            eps = prior.model_output(x, float(t))
        assert eps.shape[1] == arch.in_channels
        _record(f"{key} eps t={t}", eps, want[:, : arch.in_channels])
    return prior


@pytest.mark.parametrize("name", ["uncond", "plain"])
def test_unconditional_conversion_matches_adm(tmp_path, name):
    path, ref, arch = small_checkpoint(tmp_path, name)
    out = convert_adm(path, tmp_path / "prior", **SMALL[name])
    _compare_unet(out, ref, arch, name)
    prior = _compare_prior(out, ref, arch, name)
    assert prior.kind == "pixel" and prior.latent_shape == (3, 32, 32)
    # the sampler's split: predict() returns eps = the first 3 output channels, and Tweedie's x0
    step = prior.timesteps(10)[4]
    x = _inputs(arch, seed=2)
    with torch.no_grad():
        eps, x0 = prior.predict(x, step)
        want = ref.forward_diffusion(x, torch.full((2,), int(step.timestep)))[:, :3]
    _record(f"{name} predict eps", eps, want)
    torch.testing.assert_close(x0, (x - step.s_t * eps) / step.a_t)
    record = json.loads((out / "adm_conversion.json").read_text())
    assert record["flags"]["num_channels"] == 32 and record["class_label"] is None


def test_class_conditional_conversion_matches_adm(tmp_path):
    """Kept class embedding: the UNet called with class_labels=y is ADM with y; and
    load_prior(folder, class_label=N) is ADM with N where DiffusionPrior passes class labels to a
    UNet2DModel (skipped where it does not)."""
    path, ref, arch = small_checkpoint(tmp_path, "cond")
    out = convert_adm(path, tmp_path / "prior", **SMALL["cond"])
    unet = _compare_unet(out, ref, arch, "cond", y=torch.tensor([3, 7]))
    assert unet.config.num_class_embeds == 10
    with pytest.raises(ValueError, match="class_labels"):  # ADM has no null class
        unet(torch.zeros(1, 3, 32, 32), torch.tensor([1]))
    if load_prior(out, class_label=3).class_label is None:
        pytest.skip("this DiffusionPrior does not pass class_label to a UNet2DModel")
    _compare_prior(out, ref, arch, "cond class_label=3", y=torch.tensor([3, 3]), class_label=3)


def test_class_label_baked_into_an_unconditional_prior(tmp_path):
    """class_label=N: an unconditional folder that is ADM with y = N."""
    path, ref, arch = small_checkpoint(tmp_path, "cond")
    out = convert_adm(path, tmp_path / "prior3", class_label=3, **SMALL["cond"])
    y = torch.tensor([3, 3])
    from diffusers import UNet2DModel

    baked = UNet2DModel.from_pretrained(out / "unet", use_safetensors=True).eval()
    assert baked.config.num_class_embeds is None and baked.class_embedding is None
    x = _inputs(arch)
    for t in (3, 500, 999):
        tt = torch.full((2,), t)
        with torch.no_grad():
            _record(
                f"cond baked 3 raw t={t}", baked(x, tt).sample, ref.forward_diffusion(x, tt, y=y)
            )
    prior = _compare_prior(out, ref, arch, "cond baked 3", y=y)
    # and the class matters: another class's output is far from it
    with torch.no_grad():
        other = ref.forward_diffusion(x, torch.full((2,), 500), y=torch.tensor([4, 4]))[:, :3]
        mine = prior.model_output(x, 500.0)
    assert rel_diff(mine, other)[1] > 1e-2
    assert json.loads((out / "adm_conversion.json").read_text())["class_label"] == 3


def test_unmodified_diffunet_ffhq_layout_at_32px(tmp_path):
    """deepinv's own DiffUNet(large_model=False) (DPS's ffhq_10m.pt layout, 93M parameters),
    random weights, at 32 px, through preset ffhq256-dps."""
    ref = randomize(dn.DiffUNet(large_model=False, pretrained=None), seed=5)
    path = tmp_path / "ffhq_10m.pt"
    torch.save(ref.state_dict(), path)  # with DiffUNet's two schedule buffers: ignored
    out = convert_adm(path, tmp_path / "prior", preset="ffhq256-dps")
    path.unlink()
    arch = adm.resolve_architecture("ffhq256-dps")[0]
    prior = load_prior(out)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    for t in (10, 900):
        with torch.no_grad():
            want = ref.forward_diffusion(x, torch.tensor([t]))
            raw = prior.denoiser(x, torch.tensor([t])).sample
            eps = prior.model_output(x, float(t))
        _record(f"ffhq256-dps raw t={t}", raw, want)
        _record(f"ffhq256-dps eps t={t}", eps, want[:, : arch.in_channels])
        assert MEASURED[f"ffhq256-dps eps t={t}"] < 1e-4 * max(want.abs().max().item(), 1.0)


# ------------------------------------------------------------------------------ schedule


def adm_betas(schedule: str, steps: int) -> np.ndarray:
    """guided_diffusion.gaussian_diffusion.get_named_beta_schedule, float64."""
    if schedule == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    )


@pytest.mark.parametrize("schedule, steps", [("linear", 1000), ("cosine", 1000), ("linear", 4000)])
def test_scheduler_has_the_checkpoint_betas(schedule, steps):
    from diffusers import DDPMScheduler

    from fiber_plugins.priors.schedules import make_schedule

    arch = adm.resolve_architecture(
        "imagenet256-uncond", noise_schedule=schedule, diffusion_steps=steps
    )[0]
    cfg = adm.scheduler_config(arch)
    sched = DDPMScheduler(**cfg)
    want = adm_betas(schedule, steps)
    np.testing.assert_allclose(sched.betas.double().numpy(), want, rtol=1e-6, atol=1e-9)
    ours = make_schedule({**cfg, "_class_name": "DDPMScheduler"})
    np.testing.assert_allclose(
        ours.alphas_cumprod.double().numpy(), np.cumprod(1 - want), rtol=2e-5, atol=1e-7
    )
    assert cfg["prediction_type"] == "epsilon" and cfg["variance_type"] == "learned_range"


# ------------------------------------------------------------------------------ refusals


def test_wrong_architecture_is_one_line_naming_key_shapes_and_presets(tmp_path):
    path, _, _ = small_checkpoint(tmp_path, "uncond")
    with pytest.raises(UserValueError) as err:
        convert_adm(path, tmp_path / "prior", preset="imagenet256-uncond")
    text = str(err.value)
    assert "\n" not in text
    assert "time_embed.0.weight has shape (128, 32) in the file, (1024, 256)" in text
    assert "preset 'imagenet256-uncond'" in text and "no preset matches" in text
    assert "num_channels=32" in text
    assert not (tmp_path / "prior").exists()  # nothing written


def test_mismatch_names_the_presets_that_fit():
    """A full-size 256x256 uncond layout checked as the class-conditional or FFHQ preset."""
    with torch.device("meta"):
        state = adm_state(dn.DiffUNet(large_model=True, pretrained=None))
    cond = adm.resolve_architecture("imagenet256-cond")[0]
    with pytest.raises(UserValueError) as err:
        adm.check_state(state, cond, "'x.pt'", "imagenet256-cond")
    text = str(err.value)
    assert "label_emb.weight (shape (1000, 1024) for preset 'imagenet256-cond') is not in" in text
    assert "try preset imagenet256-uncond, lsun256" in text and "\n" not in text
    ffhq = adm.resolve_architecture("ffhq256-dps")[0]
    with pytest.raises(UserValueError, match=r"time_embed\.0\.weight has shape \(1024, 256\)"):
        adm.check_state(state, ffhq, "'x.pt'", "ffhq256-dps")
    # an extra key is named too
    uncond = adm.resolve_architecture("imagenet256-uncond")[0]
    extra = {**state, "label_emb.weight": torch.empty(1000, 1024, device="meta")}
    with pytest.raises(
        UserValueError, match="the file has label_emb.weight .* try preset imagenet256-cond"
    ):
        adm.check_state(extra, uncond, "'x.pt'", "imagenet256-uncond")


class NotATensor:
    def __init__(self):
        self.value = 1


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"time_embed.0.weight": torch.zeros(2), "extra": NotATensor()}, path)
    with pytest.raises(UserValueError) as err:
        convert_adm(path, tmp_path / "prior", **SMALL["uncond"])
    assert "pickled Python objects" in str(err.value) and "weights_only=False" not in str(err.value)
    assert not (tmp_path / "prior").exists()


def test_flag_and_class_label_errors(tmp_path):
    with pytest.raises(UserValueError, match="unknown ADM flag 'num_chanels'.*num_channels"):
        convert_adm(tmp_path / "x.pt", tmp_path / "o", num_chanels=3)
    with pytest.raises(UserValueError, match="unknown ADM preset 'imagenet'; choose one of"):
        convert_adm(tmp_path / "x.pt", tmp_path / "o", preset="imagenet")
    with pytest.raises(UserValueError, match="needs a class-conditional"):
        convert_adm(tmp_path / "x.pt", tmp_path / "o", preset="imagenet256-uncond", class_label=1)
    with pytest.raises(UserValueError, match="out of range"):
        convert_adm(tmp_path / "x.pt", tmp_path / "o", preset="imagenet256-cond", class_label=1000)
    with pytest.raises(UserValueError, match="different widths"):
        convert_adm(tmp_path / "x.pt", tmp_path / "o", **{**SMALL["cond"], "num_head_channels": -1})
    with pytest.raises(UserValueError, match="rescale_timesteps"):
        convert_adm(
            tmp_path / "x.pt",
            tmp_path / "o",
            preset="lsun256",
            rescale_timesteps=True,
            diffusion_steps=4000,
        )
    x0 = adm.resolve_architecture("lsun256", predict_xstart=True, learn_sigma=False)[0]
    assert adm.scheduler_config(x0)["prediction_type"] == "sample"
    assert adm.scheduler_config(x0)["variance_type"] == "fixed_large"
    with pytest.raises(UserValueError, match="noise_schedule"):
        convert_adm(tmp_path / "x.pt", tmp_path / "o", noise_schedule="sigmoid")


# ------------------------------------------------------------------------------ command line


def test_every_cli_flag_has_help():
    # the flags come from adm.ARCHITECTURE_FLAGS; the CLI only adds their help text
    assert set(_ADM_FLAG_HELP) == set(adm.ARCHITECTURE_FLAGS)


def test_cli_convert_end_to_end(tmp_path, capsys):
    path, ref, arch = small_checkpoint(tmp_path, "uncond")
    out = tmp_path / "prior"
    # guided-diffusion's own spelling, as in its MODEL_FLAGS
    assert (
        main(["convert", "adm", str(path), str(out), *_flags("uncond"), "--use_fp16", "True"]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    _compare_prior(out, ref, arch, "cli uncond")
    record = json.loads((out / "adm_conversion.json").read_text())
    assert record["ignored_flags"] == {"use_fp16": True}
    # the dashed spelling and a baked class label
    cpath, cref, carch = small_checkpoint(tmp_path, "cond")
    dashed = [f.replace("_", "-") if f.startswith("--") else f for f in _flags("cond")]
    cout = tmp_path / "prior_cond"
    assert main(["convert", "adm", str(cpath), str(cout), *dashed, "--class-label", "7"]) == 0
    _compare_prior(cout, cref, carch, "cli cond baked 7", y=torch.tensor([7, 7]))


def test_cli_bad_preset_and_bad_checkpoint(tmp_path, capsys):
    path, _, _ = small_checkpoint(tmp_path, "uncond")
    assert main(["convert", "adm", str(path), str(tmp_path / "o"), "--preset", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown ADM preset 'nope'" in err
    assert all(p in err for p in adm.SUPPORTED_PRESETS)
    assert (
        main(["convert", "adm", str(path), str(tmp_path / "o"), "--preset", "imagenet256-uncond"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "time_embed.0.weight" in err
    assert (
        main(["convert", "adm", str(tmp_path / "none.pt"), str(tmp_path / "o"), *_flags("uncond")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", "adm", str(path), str(tmp_path / "o"), "--learn-sigma", "maybe"]) == 2
    assert "True or False" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_out_dir_not_empty_and_overwrite(tmp_path, capsys):
    path, ref, arch = small_checkpoint(tmp_path, "plain")
    out = tmp_path / "prior"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "stale.bin").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    cmd = ["convert", "adm", str(path), str(out), *_flags("plain")]
    assert main(cmd) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "unet" / "stale.bin").exists()
    assert main([*cmd, "--overwrite"]) == 0
    assert not (out / "unet" / "stale.bin").exists()  # our parts replaced
    assert (out / "notes.txt").read_text() == "mine"  # nothing else touched
    _compare_prior(out, ref, arch, "cli plain overwrite")
    (out / "vae").mkdir()  # a part load_prior would read: refused even with --overwrite
    assert main([*cmd, "--overwrite"]) == 2
    assert "vae" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["convert", "adm", str(path), str(tmp_path / "file"), *_flags("plain")]) == 2
    assert "is a file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ full size (slow)


@pytest.mark.slow
def test_full_imagenet256_uncond_matches_diffunet_at_256px(tmp_path):
    """deepinv's DiffUNet(large_model=True) = 256x256_diffusion_uncond.pt's flags (552M
    parameters, random weights) against its conversion with preset imagenet256-uncond, at 256 px.
    About 7 GB of memory."""
    start = time.perf_counter()
    ref = randomize(dn.DiffUNet(large_model=True, pretrained=None), seed=7)
    path = tmp_path / "256x256_diffusion_uncond.pt"
    torch.save(adm_state(ref), path)
    out = convert_adm(path, tmp_path / "prior", preset="imagenet256-uncond")
    path.unlink()
    prior = load_prior(out)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = ref.forward_diffusion(x, torch.tensor([600]))
        del ref
        raw = prior.denoiser(x, torch.tensor([600])).sample
        eps = prior.model_output(x, 600.0)
    _record("imagenet256-uncond 256px raw t=600", raw, want)
    _record("imagenet256-uncond 256px eps t=600", eps, want[:, :3])
    assert MEASURED["imagenet256-uncond 256px eps t=600"] < 1e-4 * max(want.abs().max().item(), 1.0)
    print(f"full-size test: {time.perf_counter() - start:.0f} s")

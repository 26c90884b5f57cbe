"""How an ADM state dict maps onto ``UNet2DModel``: the key plan with shapes, the UNet config
and the scheduler config of an architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .architecture import ADMArchitecture, _head_width, _heads

# ---------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Leaf:
    """One ADM module with parameters and where it goes in UNet2DModel."""

    op: str  # copy | conv1x1_to_linear | qkv
    adm: str
    hf: str
    shapes: dict[str, tuple[int, ...]]  # parameter name -> ADM shape
    heads: int = 1


def _conv(adm, hf, cin, cout, k) -> _Leaf:
    return _Leaf("copy", adm, hf, {"weight": (cout, cin, k, k), "bias": (cout,)})


def _linear(adm, hf, cin, cout) -> _Leaf:
    return _Leaf("copy", adm, hf, {"weight": (cout, cin), "bias": (cout,)})


def _norm(adm, hf, c) -> _Leaf:
    return _Leaf("copy", adm, hf, {"weight": (c,), "bias": (c,)})


def _res(arch: ADMArchitecture, adm: str, hf: str, cin: int, cout: int) -> list[_Leaf]:
    emb = 4 * arch.num_channels
    leaves = [
        _norm(f"{adm}.in_layers.0", f"{hf}.norm1", cin),
        _conv(f"{adm}.in_layers.2", f"{hf}.conv1", cin, cout, 3),
        _linear(
            f"{adm}.emb_layers.1",
            f"{hf}.time_emb_proj",
            emb,
            2 * cout if arch.use_scale_shift_norm else cout,
        ),
        _norm(f"{adm}.out_layers.0", f"{hf}.norm2", cout),
        _conv(f"{adm}.out_layers.3", f"{hf}.conv2", cout, cout, 3),
    ]
    if cin != cout:
        leaves.append(_conv(f"{adm}.skip_connection", f"{hf}.conv_shortcut", cin, cout, 1))
    return leaves


def _attn(adm: str, hf: str, c: int, heads: int) -> list[_Leaf]:
    return [
        _norm(f"{adm}.norm", f"{hf}.group_norm", c),
        _Leaf("qkv", f"{adm}.qkv", hf, {"weight": (3 * c, c, 1), "bias": (3 * c,)}, heads),
        _Leaf("conv1x1_to_linear", f"{adm}.proj_out", f"{hf}.to_out.0", {"weight": (c, c, 1), "bias": (c,)}),
    ]  # fmt: skip


def plan(arch: ADMArchitecture, with_labels: bool | None = None) -> list[_Leaf]:
    """Every ADM module with parameters, in guided-diffusion's order (its state-dict order), with
    its place in UNet2DModel. The walk is guided-diffusion's ``UNetModel.__init__``."""
    with_labels = arch.class_cond if with_labels is None else with_labels
    mc, nrb = arch.num_channels, arch.num_res_blocks
    chans = arch.level_channels()
    emb = 4 * mc
    leaves = [
        _linear("time_embed.0", "time_embedding.linear_1", mc, emb),
        _linear("time_embed.2", "time_embedding.linear_2", emb, emb),
    ]
    if with_labels:
        leaves.append(
            _Leaf("copy", "label_emb", "class_embedding", {"weight": (arch.num_classes, emb)})
        )
    ch = chans[0]
    leaves.append(_conv("input_blocks.0.0", "conv_in", arch.in_channels, ch, 3))
    skips, ds, k = [ch], 1, 1
    for level, out in enumerate(chans):
        for j in range(nrb):
            leaves += _res(arch, f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", ch, out)
            ch = out
            if ds in arch.attention_ds:
                leaves += _attn(
                    f"input_blocks.{k}.1",
                    f"down_blocks.{level}.attentions.{j}",
                    ch,
                    _heads(arch, ch),
                )
            skips.append(ch)
            k += 1
        if level != len(chans) - 1:
            hf = f"down_blocks.{level}.downsamplers.0"
            if arch.resblock_updown:
                leaves += _res(arch, f"input_blocks.{k}.0", hf, ch, ch)
            else:
                leaves.append(_conv(f"input_blocks.{k}.0.op", f"{hf}.conv", ch, ch, 3))
            skips.append(ch)
            k += 1
            ds *= 2
    leaves += _res(arch, "middle_block.0", "mid_block.resnets.0", ch, ch)
    leaves += _attn("middle_block.1", "mid_block.attentions.0", ch, _heads(arch, ch))
    leaves += _res(arch, "middle_block.2", "mid_block.resnets.1", ch, ch)
    k = 0
    for r, level in enumerate(reversed(range(len(chans)))):
        out = chans[level]
        for i in range(nrb + 1):
            leaves += _res(
                arch, f"output_blocks.{k}.0", f"up_blocks.{r}.resnets.{i}", ch + skips.pop(), out
            )
            ch = out
            idx = 1
            if ds in arch.attention_ds:
                leaves += _attn(
                    f"output_blocks.{k}.1",
                    f"up_blocks.{r}.attentions.{i}",
                    ch,
                    _heads(arch, ch, upsample=True),
                )
                idx = 2
            if level and i == nrb:
                hf = f"up_blocks.{r}.upsamplers.0"
                if arch.resblock_updown:
                    leaves += _res(arch, f"output_blocks.{k}.{idx}", hf, ch, ch)
                else:
                    leaves.append(_conv(f"output_blocks.{k}.{idx}.conv", f"{hf}.conv", ch, ch, 3))
                ds //= 2
            k += 1
    leaves.append(_norm("out.0", "conv_norm_out", ch))
    leaves.append(_conv("out.2", "conv_out", chans[0], arch.out_channels, 3))
    return leaves


def adm_shapes(arch: ADMArchitecture, with_labels: bool | None = None) -> dict[str, tuple]:
    """The guided-diffusion state-dict keys and shapes of ``arch``, in its order (no memory)."""
    return {
        f"{leaf.adm}.{name}": shape
        for leaf in plan(arch, with_labels)
        for name, shape in leaf.shapes.items()
    }


def unet_config(arch: ADMArchitecture, class_label: int | None = None) -> dict[str, Any]:
    """The ``UNet2DModel`` config that computes ``arch`` (``class_label``: baked in, see
    :func:`convert_adm`)."""
    chans = arch.level_channels()
    attn = []
    ds = 1
    for level in range(len(chans)):
        attn.append(ds in arch.attention_ds)
        if level != len(chans) - 1:
            ds *= 2
    plain_down = "ResnetDownsampleBlock2D" if arch.resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if arch.resblock_updown else "UpBlock2D"
    return dict(
        sample_size=arch.image_size,
        in_channels=arch.in_channels,
        out_channels=arch.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,  # ADM's embedding is [cos, sin]
        freq_shift=0,
        down_block_types=["AttnDownBlock2D" if a else plain_down for a in attn],
        mid_block_type="UNetMidBlock2D",
        up_block_types=["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        block_out_channels=chans,
        layers_per_block=arch.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type="resnet" if arch.resblock_updown else "conv",
        upsample_type="resnet" if arch.resblock_updown else "conv",
        dropout=arch.dropout,
        act_fn="silu",
        attention_head_dim=_head_width(arch),
        norm_num_groups=32,
        # ADM's middle attention has its GroupNorm also with use_scale_shift_norm (diffusers
        # drops it for resnet_time_scale_shift='scale_shift' unless this is set)
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if arch.use_scale_shift_norm else "default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=arch.num_classes if arch.class_cond and class_label is None else None,
    )


def scheduler_config(arch: ADMArchitecture) -> dict[str, Any]:
    """The ``DDPMScheduler`` config of ADM's noise process (``get_named_beta_schedule``)."""
    cfg: dict[str, Any] = dict(
        num_train_timesteps=arch.diffusion_steps,
        prediction_type="sample" if arch.predict_xstart else "epsilon",
        variance_type="learned_range" if arch.learn_sigma else "fixed_large",
        clip_sample=True,  # ADM samples with clip_denoised=True
        clip_sample_range=1.0,
    )
    if arch.noise_schedule == "linear":
        scale = 1000 / arch.diffusion_steps  # ADM scales the betas to keep the end point
        cfg.update(beta_schedule="linear", beta_start=scale * 0.0001, beta_end=scale * 0.02)
    else:  # cosine: the same alpha_bar and max_beta=0.999 as ADM's betas_for_alpha_bar
        cfg.update(beta_schedule="squaredcos_cap_v2")
    return cfg

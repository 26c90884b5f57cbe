"""Checking a checkpoint against an architecture and writing the diffusers folder
(:func:`convert_adm`)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...errors import UserTypeError, UserValueError
from ...weights import read_state_dict
from .architecture import (
    ARCHITECTURE_FLAGS,
    PRESETS,
    SUPPORTED_PRESETS,
    ADMArchitecture,
    expressibility_problem,
    resolve_architecture,
)
from .layout import adm_shapes, plan, scheduler_config, unet_config

# ---------------------------------------------------------------------------------------- convert

# buffers deepinv's DiffUNet registers after loading (its noise schedule), not network weights
_EXTRA_BUFFERS = ("sqrt_1m_alphas_cumprod", "sqrt_alphas_cumprod")


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    """A few flags read off a checkpoint, for messages."""
    said = []
    w = state.get("time_embed.0.weight")
    if w is not None and w.dim() == 2:
        said.append(f"num_channels={w.shape[1]}")
    cin = state.get("input_blocks.0.0.weight")
    cout = state.get("out.2.weight")
    if cin is not None and cout is not None and cin.dim() == 4 and cout.dim() == 4:
        said.append(f"in_channels={cin.shape[1]}, out_channels={cout.shape[0]}")
    label = state.get("label_emb.weight")
    said.append(
        f"class_cond=True ({label.shape[0]} classes)" if label is not None else "class_cond=False"
    )
    return ", ".join(said)  # fmt: skip


def matching_presets(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The presets (supported or not) whose keys and shapes are exactly those of ``state``."""
    have = {k: tuple(v.shape) for k, v in state.items() if k not in _EXTRA_BUFFERS}
    return [name for name in PRESETS if adm_shapes(resolve_architecture(name)[0]) == have]


def _presets_hint(state: Mapping[str, torch.Tensor], tried: str | None) -> str:
    found = [p for p in matching_presets(state) if p != tried]
    if not found:
        return (
            f"no preset matches this checkpoint ({_describe(state)}); give its guided-diffusion "
            "flags (num_channels, num_res_blocks, channel_mult, attention_resolutions, "
            "num_head_channels, ...) as in its training/sampling command"
        )
    names = ", ".join(
        f"{p} (published but not expressible)" if PRESETS[p].unsupported else p for p in found
    )
    return f"try preset {names}"


def check_state(
    state: Mapping[str, torch.Tensor],
    arch: ADMArchitecture,
    source: str,
    preset: str | None = None,
) -> None:
    """One-line ``UserValueError`` at the first key or shape of ``state`` that ``arch`` does not
    have (in guided-diffusion's order), naming the presets that fit the file."""
    want = adm_shapes(arch)
    what = f"preset {preset!r}" if preset else "the given flags"
    problem = ""
    for key, shape in want.items():
        if key not in state:
            problem = f"{key} (shape {shape} for {what}) is not in the file"
            break
        have = tuple(state[key].shape)
        if have != shape:
            problem = f"{key} has shape {have} in the file, {shape} for {what}"
            break
    else:
        extra = [k for k in state if k not in want and k not in _EXTRA_BUFFERS]
        if extra:
            problem = (
                f"the file has {extra[0]} (shape {tuple(state[extra[0]].shape)}), which "
                f"{what} does not have"
            )
    if problem:
        raise UserValueError(
            f"ADM checkpoint {source} does not match {what}: {problem}; "
            f"{_presets_hint(state, preset)}"
        )


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    arch: ADMArchitecture,
    class_label: int | None = None,
) -> dict[str, torch.Tensor]:
    """The ``UNet2DModel`` state dict of a checked ADM state dict (float32; works on ``meta``
    tensors too). ``class_label`` bakes that class into the time embedding (see
    :func:`convert_adm`)."""
    out: dict[str, torch.Tensor] = {}

    def get(key: str) -> torch.Tensor:
        t = state[key]
        return t.detach().to(torch.float32) if t.is_floating_point() else t.detach()

    for leaf in plan(arch):
        if leaf.op == "copy":
            if leaf.adm == "label_emb":
                if class_label is None:
                    out["class_embedding.weight"] = get("label_emb.weight")
                continue
            for name in leaf.shapes:
                out[f"{leaf.hf}.{name}"] = get(f"{leaf.adm}.{name}")
        elif leaf.op == "conv1x1_to_linear":
            out[f"{leaf.hf}.weight"] = get(f"{leaf.adm}.weight")[:, :, 0]
            out[f"{leaf.hf}.bias"] = get(f"{leaf.adm}.bias")
        else:  # qkv: one 1x1 conv (3C, C, 1) -> to_q, to_k, to_v (C, C)
            w = get(f"{leaf.adm}.weight")[:, :, 0]
            b = get(f"{leaf.adm}.bias")
            c, heads = w.shape[1], leaf.heads
            d = c // heads
            if arch.use_new_attention_order:  # QKVAttention: q, k, v, then heads within each
                ws = w.reshape(3, heads, d, c)
                bs = b.reshape(3, heads, d)
                parts = [(ws[i], bs[i]) for i in range(3)]
            else:  # QKVAttentionLegacy: heads, then q, k, v within each head
                ws = w.reshape(heads, 3, d, c)
                bs = b.reshape(heads, 3, d)
                parts = [(ws[:, i], bs[:, i]) for i in range(3)]
            for name, (pw, pb) in zip(("to_q", "to_k", "to_v"), parts):
                # head-major rows (head h: rows h*d .. h*d+d-1), as diffusers splits heads
                out[f"{leaf.hf}.{name}.weight"] = pw.reshape(c, c).clone()
                out[f"{leaf.hf}.{name}.bias"] = pb.reshape(c).clone()
    if class_label is not None:
        # ADM: emb = time_embed(t) + label_emb(y); the bias of time_embed's last layer is added
        # once per sample as well, so for one fixed class it takes the class row
        row = get("label_emb.weight")[class_label]
        out["time_embedding.linear_2.bias"] = get("time_embed.2.bias") + row
    return out


def _meta_unet(config: Mapping[str, Any]):
    from diffusers import UNet2DModel

    with torch.device("meta"):
        return UNet2DModel(**config)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder without ``overwrite`` (as ``train --out`` does)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserValueError(f"OUT_DIR {str(out_dir)!r} is a file; give a folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UserValueError(
            f"OUT_DIR {str(out_dir)!r} is not empty; pass --overwrite (overwrite=True) to replace "
            "what is there, or give a new folder"
        )
    # parts load_prior would read besides ours: left in place they would change the prior
    foreign = [
        n
        for n in ("transformer", "vae", "condition", "text_encoder", "tokenizer", "config.json")
        if (out_dir / n).exists()
    ]
    if foreign:
        raise UserValueError(
            f"OUT_DIR {str(out_dir)!r} holds {', '.join(foreign)}, which load_prior would read "
            "as part of the converted prior; give a new or empty folder"
        )


_WRITTEN = ("unet", "scheduler", "adm_conversion.json")


def convert_adm(
    checkpoint: str | Path,
    out_dir: str | Path,
    preset: str | None = None,
    *,
    class_label: int | None = None,
    overwrite: bool = False,
    **architecture: Any,
) -> Path:
    """Convert a guided-diffusion (ADM) UNet checkpoint into a diffusers prior folder.

    Parameters
    ----------
    checkpoint:
        The ADM state dict: ``.pt``/``.pth``/``.bin``/``.ckpt`` (read with
        ``torch.load(weights_only=True)``; pickled objects are refused) or ``.safetensors``.
    out_dir:
        The folder to write: ``unet/`` (UNet2DModel), ``scheduler/`` (DDPMScheduler) and
        ``adm_conversion.json``. It must be new or empty unless ``overwrite``.
    preset:
        A published checkpoint's flags, one of :data:`SUPPORTED_PRESETS`:
        ``imagenet256-uncond`` (256x256_diffusion_uncond.pt), ``imagenet256-cond``
        (256x256_diffusion.pt), ``imagenet64-cond`` (64x64_diffusion.pt), ``lsun256``
        (lsun_bedroom/cat/horse[_nodropout].pt), ``ffhq256-dps`` (DPS's ffhq_10m.pt). ``None``:
        guided-diffusion's defaults, changed by ``architecture``.
    class_label:
        For a class-conditional checkpoint: write an unconditional prior of this class (the
        class embedding is folded into the time embedding; exact). ``None`` keeps the class
        embedding (``num_class_embeds``; the UNet then needs ``class_labels=``).
    overwrite:
        Replace the ``unet/``, ``scheduler/`` and ``adm_conversion.json`` of a non-empty
        ``out_dir``.
    **architecture:
        guided-diffusion flags, over the preset: ``image_size``, ``num_channels``,
        ``num_res_blocks``, ``channel_mult`` ("1,1,2,2,4,4"), ``attention_resolutions``
        ("32,16,8"), ``num_heads``, ``num_head_channels``, ``num_heads_upsample``,
        ``learn_sigma``, ``class_cond``, ``num_classes``, ``use_scale_shift_norm``,
        ``resblock_updown``, ``use_new_attention_order``, ``dropout``, ``diffusion_steps``,
        ``noise_schedule`` ("linear" | "cosine"), ``predict_xstart``, ``rescale_timesteps``,
        ``in_channels``; ``use_fp16`` and ``use_checkpoint`` are accepted and change nothing.

    Returns
    -------
    Path
        ``out_dir``, which :func:`fiber_plugins.load_prior` reads.

    Raises
    ------
    ValueError
        (:class:`~fiber_plugins.errors.UserValueError`, one line) an unknown preset or flag, an
        architecture ``UNet2DModel`` cannot express (with the reason), a checkpoint whose keys or
        shapes do not match (the first mismatching key with both shapes, and the presets that
        fit), a pickled or corrupt checkpoint, a non-empty ``out_dir`` without ``overwrite``.

    See the module docstring (:mod:`fiber_plugins.priors.adm`) for what maps exactly and what is
    refused.

    Examples
    --------
    >>> convert_adm("256x256_diffusion_uncond.pt", "adm256", preset="imagenet256-uncond")  # doctest: +SKIP
    >>> prior = load_prior("adm256")                                                     # doctest: +SKIP
    """
    arch, ignored = resolve_architecture(preset, **architecture)
    why = expressibility_problem(arch)
    if why:
        what = (
            f"preset {preset!r} ({', '.join(PRESETS[preset].files)})"
            if preset is not None
            else "this ADM architecture"
        )
        raise UserValueError(f"{what} cannot be converted exactly to a UNet2DModel: {why}")
    if class_label is not None:
        if isinstance(class_label, bool) or not isinstance(class_label, int):
            raise UserTypeError(f"class_label must be an int, got {type(class_label).__name__}")
        if not arch.class_cond:
            raise UserValueError(
                f"class_label={class_label} needs a class-conditional checkpoint (class_cond=True)"
            )
        if not 0 <= class_label < arch.num_classes:
            raise UserValueError(
                f"class_label={class_label} is out of range: 0..{arch.num_classes - 1}"
            )
    out = Path(out_dir).expanduser()
    _prepare_out_dir(out, overwrite)

    source = repr(str(checkpoint))
    state = read_state_dict(checkpoint, what="ADM checkpoint")
    check_state(state, arch, source, preset)
    config = unet_config(arch, class_label)
    converted = convert_state_dict(state, arch, class_label)
    del state
    model = _meta_unet(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    if expected != got:  # the plan and diffusers disagree: a bug here, not a user mistake
        diff = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise RuntimeError(f"ADM conversion does not fit UNet2DModel: {diff}")

    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    for name in _WRITTEN:
        part = out / name
        if part.is_dir():
            shutil.rmtree(part)
        elif part.exists():
            part.unlink()
    (out / "unet").mkdir(parents=True)
    model.save_config(out / "unet")
    seen: set[int] = set()
    tensors = {}
    for key, t in converted.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    save_file(tensors, str(out / "unet" / "diffusion_pytorch_model.safetensors"), {"format": "pt"})
    DDPMScheduler.from_config(scheduler_config(arch)).save_pretrained(out / "scheduler")
    record = {
        "source": "ADM (openai/guided-diffusion UNetModel)",
        "checkpoint": Path(checkpoint).name,
        "preset": preset,
        "flags": arch.flags(),
        "ignored_flags": ignored,
        "class_label": class_label,
        "parameters": int(sum(math.prod(s) for s in got.values())),
    }
    (out / "adm_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


__all__ = [
    "ADMArchitecture",
    "ARCHITECTURE_FLAGS",
    "PRESETS",
    "SUPPORTED_PRESETS",
    "adm_shapes",
    "check_state",
    "convert_adm",
    "convert_state_dict",
    "expressibility_problem",
    "matching_presets",
    "plan",
    "resolve_architecture",
    "scheduler_config",
    "unet_config",
]

"""What a prior's denoiser is conditioned on, fixed for the whole run: its class label (DiT,
class-conditional UNets) and its text conditioning (UNet2DConditionModel: the prompt embedding,
plus SDXL's pooled embedding and time ids). Checked once, when the prior is built."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

from ..errors import UserTypeError, UserValueError

# UNet2DConditionModel options that need inputs a fixed text conditioning cannot supply
_UNSUPPORTED_ADDITION = ("text_image", "image", "image_hint")
_UNSUPPORTED_ENCODER_HID = ("text_image_proj", "image_proj", "ip_image_proj")


def _int_label(value: Any) -> int:
    if isinstance(value, bool):
        raise UserTypeError(f"class_label must be an int, got {value!r}")
    try:
        return operator.index(value)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise UserTypeError(
            f"class_label must be an int, got {type(value).__name__} {value!r}"
        ) from None


def resolve_class_label(name: str, cfg: Any, class_label: Any, custom_labels: bool) -> int | None:
    """The fixed class of the denoiser (``None``: it takes no class labels).

    DiT: ``class_label`` or its null class. A UNet with a class-embedding table
    (``num_class_embeds``, ``class_embed_type=None``): ``class_label`` is required (no null
    class). Other ``class_embed_type`` values take tensors a fixed label cannot give; refused
    unless a subclass supplies them (``custom_labels``: the conditional fiber model).
    """
    label = None if class_label is None else _int_label(class_label)
    if name == "DiTTransformer2DModel":
        n = int(cfg.num_embeds_ada_norm)
        if label is None:
            return n
        if not 0 <= label <= n:
            raise UserValueError(
                f"class_label={label} is out of range for this DiT: 0..{n - 1}, or {n} (its "
                "null class, unconditional)"
            )
        return label
    ctype = getattr(cfg, "class_embed_type", None)
    n_classes = getattr(cfg, "num_class_embeds", None)
    if ctype is not None:
        if custom_labels:
            return None
        raise UserValueError(
            f"this {name} has class_embed_type={ctype!r}: it needs a class_labels tensor in "
            "every call, which a prior with a fixed label cannot give; use a UNet without it, or "
            "one with num_class_embeds (then pass class_label=)"
        )
    if n_classes is not None:
        n = int(n_classes)
        if label is None:
            raise UserValueError(
                f"this {name} is class-conditional (num_class_embeds={n}) and has no null class; "
                f"pass class_label= (0..{n - 1}), e.g. load_prior(folder, class_label=0)"
            )
        if not 0 <= label < n:
            raise UserValueError(
                f"class_label={label} is out of range: this {name} has num_class_embeds={n} "
                f"(0..{n - 1})"
            )
        return label
    if label is not None:
        raise UserValueError(
            f"class_label={label} given, but this {name} is not class-conditional (its config "
            "has no num_class_embeds); drop class_label"
        )
    return None


def _text_dim(cfg: Any) -> int | None:
    """The width D of the encoder hidden states the UNet takes (None: not one number)."""
    if getattr(cfg, "encoder_hid_dim", None) is not None:
        return int(cfg.encoder_hid_dim)  # 'text_proj': projected to cross_attention_dim inside
    dim = cfg.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        return int(dim[0]) if len(set(dim)) == 1 else None
    return int(dim)


def _fixed_tensor(value: Any, what: str, shape: str, ndim: int, width: int | None) -> torch.Tensor:
    """A user's conditioning tensor as (1, ..., width) float, or one line saying what is wrong."""
    if not isinstance(value, torch.Tensor):
        raise UserTypeError(
            f"{what} must be a torch.Tensor of shape {shape}, got {type(value).__name__}"
        )
    t = value.detach()
    if t.dim() == ndim - 1:
        t = t.unsqueeze(0)
    if t.dim() != ndim or t.shape[0] != 1 or (width is not None and t.shape[-1] != width):
        raise UserValueError(
            f"{what} has shape {tuple(value.shape)}; this UNet needs {shape} (one embedding, "
            "shared by every sample)"
        )
    if not t.is_floating_point():
        raise UserTypeError(f"{what} must be a float tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise UserValueError(f"{what} holds NaN or infinite values; recompute it")
    return t


def text_conditioning(
    denoiser: nn.Module, conditioning: Any, pooled: Any, image_size: tuple[int, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """(encoder hidden states, added_cond_kwargs or None) of a UNet2DConditionModel."""
    cfg: Any = denoiser.config
    addition = getattr(cfg, "addition_embed_type", None)
    hid_type = getattr(cfg, "encoder_hid_dim_type", None)
    if addition in _UNSUPPORTED_ADDITION or hid_type in _UNSUPPORTED_ENCODER_HID:
        what = (
            f"addition_embed_type={addition!r}"
            if addition in _UNSUPPORTED_ADDITION
            else f"encoder_hid_dim_type={hid_type!r}"
        )
        raise UserValueError(
            f"this UNet2DConditionModel has {what}: it needs image embeddings in every call, "
            "which a prior does not supply; supported are text-conditioned UNets (SD 1.x/2.x) "
            "and SDXL-style ones (addition_embed_type='text_time')"
        )
    dim = _text_dim(cfg)
    sdxl = addition == "text_time"
    shape = f"(1, L, {dim if dim is not None else 'D'})"
    if conditioning is None:
        extra = " and pooled= (a (1, P) pooled text embedding)" if sdxl else ""
        raise UserValueError(
            "a UNet2DConditionModel needs its text conditioning: pass conditioning= (a "
            f"{shape} text embedding tensor, e.g. the embedding of the empty prompt){extra}, "
            "conditioning='zeros', or load a full pipeline folder with load_prior"
        )
    zeros = isinstance(conditioning, str)
    if zeros and conditioning != "zeros":
        raise UserValueError(
            f"conditioning={conditioning!r} is not understood; pass a {shape} tensor or 'zeros'"
        )
    if zeros:
        if dim is None:
            raise UserValueError(
                "conditioning='zeros' needs one cross_attention_dim, but this UNet has "
                f"{cfg.cross_attention_dim}; pass a (1, L, D) tensor"
            )
        context = torch.zeros(1, 1, dim)
    else:
        context = _fixed_tensor(conditioning, "conditioning", shape, 3, dim)
    if not sdxl:
        if pooled is not None:
            raise UserValueError(
                "pooled= is for SDXL-style UNets (addition_embed_type='text_time'); this "
                f"UNet2DConditionModel has addition_embed_type={addition!r}: drop pooled="
            )
        return context, None
    # SDXL: add_embedding takes [time_proj(time ids) (6 x addition_time_embed_dim), pooled (P)]
    time_dim = int(cfg.addition_time_embed_dim)
    n_ids = 6  # original size (h, w), crop top-left (0, 0), target size (h, w)
    linear = getattr(getattr(denoiser, "add_embedding", None), "linear_1", None)
    total = (
        int(linear.in_features)
        if linear is not None
        else int(cfg.projection_class_embeddings_input_dim)
    )
    width = total - n_ids * time_dim
    if width <= 0:
        raise UserValueError(
            f"this SDXL-style UNet's add_embedding takes {total} values, too few for 6 time "
            f"ids of {time_dim} and a pooled embedding (an SDXL refiner, with an aesthetic "
            "score, is not supported)"
        )
    if pooled is None:
        if not zeros:
            raise UserValueError(
                "an SDXL-style UNet (addition_embed_type='text_time') needs pooled= too: the "
                f"(1, {width}) pooled text embedding (text_encoder_2's projection) that goes "
                "with conditioning="
            )
        pooled_t = torch.zeros(1, width)
    else:
        pooled_t = _fixed_tensor(pooled, "pooled", f"(1, {width})", 2, width)
    h, w = int(image_size[0]), int(image_size[1])
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
    return context, {"text_embeds": pooled_t, "time_ids": time_ids}

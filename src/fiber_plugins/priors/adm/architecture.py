"""ADM architectures: guided-diffusion's flags, the published presets, and what diffusers'
``UNet2DModel`` can express."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...errors import UserValueError

# ---------------------------------------------------------------------------------------- flags

# guided_diffusion.script_util.model_and_diffusion_defaults() (the model and diffusion flags that
# define the network and its noise process), plus in_channels / num_classes which the scripts fix
_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_new_attention_order=False,
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    predict_xstart=False,
    rescale_timesteps=False,
    in_channels=3,
    num_classes=1000,
)
# flags of guided-diffusion's MODEL_FLAGS that do not change the network's function: accepted (so
# the published flag lines can be passed as they are) and recorded, nothing else
IGNORED_FLAGS = ("use_fp16", "use_checkpoint")
ARCHITECTURE_FLAGS = (*_DEFAULTS, *IGNORED_FLAGS)

_INT_FLAGS = {
    "image_size": 1,
    "num_channels": 1,
    "num_res_blocks": 1,
    "num_heads": 1,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "diffusion_steps": 1,
    "in_channels": 1,
    "num_classes": 1,
}
_BOOL_FLAGS = (
    "class_cond",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "learn_sigma",
    "predict_xstart",
    "rescale_timesteps",
    *IGNORED_FLAGS,
)
NOISE_SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Preset:
    """A published checkpoint's flags (guided-diffusion names; the rest are the defaults)."""

    files: tuple[str, ...]
    source: str
    flags: dict[str, Any] = field(default_factory=dict)
    unsupported: str = ""  # non-empty: UNet2DModel cannot express it (see expressibility_problem)


_ADM_256 = dict(
    attention_resolutions="32,16,8",
    diffusion_steps=1000,
    image_size=256,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)
_GD = "openai/guided-diffusion README"
PRESETS: dict[str, Preset] = {
    "imagenet256-uncond": Preset(
        ("256x256_diffusion_uncond.pt",), _GD, {**_ADM_256, "class_cond": False}
    ),
    "imagenet256-cond": Preset(("256x256_diffusion.pt",), _GD, {**_ADM_256, "class_cond": True}),
    "imagenet64-cond": Preset(
        ("64x64_diffusion.pt",),
        _GD,
        dict(
            attention_resolutions="32,16,8",
            class_cond=True,
            diffusion_steps=1000,
            dropout=0.1,
            image_size=64,
            learn_sigma=True,
            noise_schedule="cosine",
            num_channels=192,
            num_head_channels=64,
            num_res_blocks=3,
            resblock_updown=True,
            use_new_attention_order=True,
            use_fp16=True,
            use_scale_shift_norm=True,
        ),
    ),
    "lsun256": Preset(
        ("lsun_bedroom.pt", "lsun_cat.pt", "lsun_horse.pt", "lsun_horse_nodropout.pt"),
        _GD,
        {**_ADM_256, "class_cond": False, "dropout": 0.1},
    ),
    "ffhq256-dps": Preset(
        ("ffhq_10m.pt",),
        "DPS (DPS2022/diffusion-posterior-sampling) configs/model_config.yaml",
        dict(
            image_size=256,
            num_channels=128,
            num_res_blocks=1,
            learn_sigma=True,
            class_cond=False,
            attention_resolutions="16",
            num_heads=4,
            num_head_channels=64,
            num_heads_upsample=-1,
            use_scale_shift_norm=True,
            dropout=0.0,
            resblock_updown=True,
            use_new_attention_order=False,
            diffusion_steps=1000,
            noise_schedule="linear",
        ),
    ),
    # published, but not expressible as a UNet2DModel (kept so that the refusal says why)
    "imagenet128-cond": Preset(
        ("128x128_diffusion.pt",),
        _GD,
        dict(
            attention_resolutions="32,16,8",
            class_cond=True,
            diffusion_steps=1000,
            image_size=128,
            learn_sigma=True,
            noise_schedule="linear",
            num_channels=256,
            num_heads=4,
            num_res_blocks=2,
            resblock_updown=True,
            use_fp16=True,
            use_scale_shift_norm=True,
        ),
        unsupported="heads",
    ),
    "imagenet512-cond": Preset(
        ("512x512_diffusion.pt",),
        _GD,
        {**_ADM_256, "image_size": 512, "class_cond": True, "use_fp16": False},
        unsupported="time embedding",
    ),
}
SUPPORTED_PRESETS = tuple(k for k, v in PRESETS.items() if not v.unsupported)


@dataclass(frozen=True)
class ADMArchitecture:
    """A guided-diffusion ``UNetModel`` and its noise process, resolved from preset and flags.

    Field names are guided-diffusion's flags; ``channel_mult`` and ``attention_resolutions`` are
    resolved (``channel_mult=""`` is guided-diffusion's default for ``image_size``; resolutions are
    kept as given, in pixels).
    """

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: tuple[float, ...]
    attention_resolutions: tuple[int, ...]
    num_heads: int
    num_head_channels: int
    num_heads_upsample: int
    dropout: float
    class_cond: bool
    num_classes: int
    use_scale_shift_norm: bool
    resblock_updown: bool
    use_new_attention_order: bool
    learn_sigma: bool
    diffusion_steps: int
    noise_schedule: str
    predict_xstart: bool
    rescale_timesteps: bool
    in_channels: int

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """The downsampling factors with attention (guided-diffusion's ``attention_ds``)."""
        return tuple(self.image_size // r for r in self.attention_resolutions)

    def level_channels(self) -> list[int]:
        return [int(m * self.num_channels) for m in self.channel_mult]

    def flags(self) -> dict[str, Any]:
        """The guided-diffusion flags (strings as its scripts take them)."""
        d = asdict(self)
        d["channel_mult"] = ",".join(f"{m:g}" for m in self.channel_mult)
        d["attention_resolutions"] = ",".join(str(r) for r in self.attention_resolutions)
        return d


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "true", "t", "y", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("no", "false", "f", "n", "0"):
        return False
    raise UserValueError(f"ADM flag {name}={value!r} must be True or False")


def _to_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserValueError(f"ADM flag {name}={value!r} must be an integer")
    try:
        out = int(value)
    except ValueError:
        raise UserValueError(f"ADM flag {name}={value!r} must be an integer") from None
    if out < minimum or (minimum == -1 and out == 0):
        what = "-1 or a positive integer" if minimum == -1 else f"an integer >= {minimum}"
        raise UserValueError(f"ADM flag {name}={value!r} must be {what}")
    return out


def _to_numbers(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise UserValueError(
            f"ADM flag {name}={value!r} must be comma-separated numbers, e.g. '32,16,8'"
        ) from None
    if any(v <= 0 for v in out):
        raise UserValueError(f"ADM flag {name}={value!r} must hold positive numbers")
    return out


def _default_channel_mult(image_size: int) -> tuple[float, ...]:
    # guided_diffusion.script_util.create_model
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise UserValueError(
            f"ADM flag channel_mult is not given and image_size={image_size} has no "
            f"guided-diffusion default (64, 128, 256, 512); give channel_mult, e.g. '1,2,2'"
        )
    return table[image_size]


def resolve_architecture(
    preset: str | None = None, **flags: Any
) -> tuple[ADMArchitecture, dict[str, Any]]:
    """The architecture for a preset name and/or guided-diffusion flags (flags win).

    Returns the architecture and the ignored flags that were given (``use_fp16``, ...). Unknown
    presets and flags, and values of the wrong kind, are one-line ``UserValueError``s.
    """
    merged: dict[str, Any] = dict(_DEFAULTS)
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise UserValueError(
                f"unknown ADM preset {preset!r}; choose one of {', '.join(SUPPORTED_PRESETS)}, or "
                "give the architecture flags"
            )
        merged.update(PRESETS[preset].flags)
    unknown = [k for k in flags if k not in ARCHITECTURE_FLAGS]
    if unknown:
        from ..._utils import suggest

        raise UserValueError(
            f"unknown ADM flag {unknown[0]!r}{suggest(unknown[0], ARCHITECTURE_FLAGS)}; the flags "
            f"are guided-diffusion's: {', '.join(ARCHITECTURE_FLAGS)}"
        )
    merged.update(flags)
    ignored = {k: _to_bool(k, merged.pop(k)) for k in IGNORED_FLAGS if k in merged}
    for name, minimum in _INT_FLAGS.items():
        merged[name] = _to_int(name, merged[name], minimum)
    for name in _BOOL_FLAGS:
        if name in merged:
            merged[name] = _to_bool(name, merged[name])
    if merged["noise_schedule"] not in NOISE_SCHEDULES:
        raise UserValueError(
            f"ADM flag noise_schedule={merged['noise_schedule']!r} must be one of "
            f"{', '.join(NOISE_SCHEDULES)}"
        )
    try:
        dropout = float(merged["dropout"])
    except (TypeError, ValueError):
        dropout = -1.0
    if not 0.0 <= dropout < 1.0:
        raise UserValueError(f"ADM flag dropout={merged['dropout']!r} must be in [0, 1)")
    merged["dropout"] = dropout
    mult = merged["channel_mult"]
    merged["channel_mult"] = (
        _default_channel_mult(merged["image_size"])
        if mult in ("", None)
        else _to_numbers("channel_mult", mult, float)
    )
    merged["attention_resolutions"] = _to_numbers(
        "attention_resolutions", merged["attention_resolutions"], int
    )
    return ADMArchitecture(**merged), ignored


def _heads(arch: ADMArchitecture, channels: int, upsample: bool = False) -> int:
    """The number of heads guided-diffusion's AttentionBlock gets for ``channels``."""
    if arch.num_head_channels != -1:
        return channels // arch.num_head_channels
    if upsample and arch.num_heads_upsample != -1:
        return arch.num_heads_upsample
    return arch.num_heads


def expressibility_problem(arch: ADMArchitecture) -> str:
    """Why ``UNet2DModel`` cannot express ``arch`` exactly (empty string: it can)."""
    chans = arch.level_channels()
    if chans[0] != arch.num_channels:
        return (
            f"channel_mult starts with {arch.channel_mult[0]:g}: ADM embeds the timestep with "
            f"num_channels={arch.num_channels} sinusoids, UNet2DModel with as many as its first "
            f"block has channels ({chans[0]})"
        )
    if any(c % 32 for c in chans):
        return f"the level widths {chans} must be multiples of 32 (GroupNorm with 32 groups)"
    if arch.rescale_timesteps and arch.diffusion_steps != 1000:
        return (
            "rescale_timesteps=True with diffusion_steps != 1000: the network takes t*1000/steps, "
            "the prior feeds the timestep itself"
        )
    if arch.num_head_channels != -1:
        odd = [c for c in chans if c % arch.num_head_channels]
        if odd:
            return f"{odd[0]} channels do not split into heads of num_head_channels={arch.num_head_channels}"
    widths: dict[int, list[str]] = {}  # head width -> where
    ds = 1
    for level, ch in enumerate(chans):
        if ds in arch.attention_ds:
            for up in (False, True):
                heads = _heads(arch, ch, up)
                if heads < 1 or ch % heads:
                    return (
                        f"{ch} channels at level {level} do not split into {heads} attention heads"
                    )
                where = f"level {level} ({ch}/{heads})"
                if where not in widths.setdefault(ch // heads, []):
                    widths[ch // heads].append(where)
        if level != len(chans) - 1:
            ds *= 2
    heads = _heads(arch, chans[-1])
    if heads < 1 or chans[-1] % heads:
        return f"{chans[-1]} channels of the middle block do not split into {heads} heads"
    widths.setdefault(chans[-1] // heads, []).append(f"middle ({chans[-1]}/{heads})")
    if len(widths) > 1:
        said = "; ".join(f"{w} at {', '.join(v)}" for w, v in sorted(widths.items()))
        return (
            f"its attention heads have different widths (channels/heads: {said}), and UNet2DModel "
            "has one attention_head_dim for every block"
        )
    return ""


def _head_width(arch: ADMArchitecture) -> int:
    chans = arch.level_channels()
    return chans[-1] // _heads(arch, chans[-1])

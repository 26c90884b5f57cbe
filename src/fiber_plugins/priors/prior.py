"""`DiffusionPrior`: what a guided sampler needs from a pretrained diffusers model.

A prior is three parts: a *denoiser* (UNet2DModel, unconditional or with a fixed class;
UNet2DConditionModel with a fixed text conditioning, plus the pooled embedding and time ids of
SDXL-style UNets; or DiTTransformer2DModel with the null class or a fixed class), a *schedule*
(DDPM-family or flow matching, see :mod:`fiber_plugins.priors.schedules`) and an optional *VAE*
for latent priors.
No diffusers pipeline is used: pipelines run under ``no_grad`` and schedulers step statefully,
while guidance differentiates through the network and revisits the same step.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from .._utils import warn
from ..errors import UserTypeError, UserValueError
from .acceleration import Acceleration
from .schedules import Step, ddim_update, make_schedule, split_prediction

DENOISERS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


class DiffusionPrior:
    """A pretrained diffusion or flow-matching prior, used functionally.

    Parameters
    ----------
    denoiser:
        ``UNet2DModel``, ``UNet2DConditionModel`` or ``DiTTransformer2DModel``.
    scheduler:
        A diffusers scheduler or its config dict (as in ``scheduler_config.json``); a
        ``FlowMatch*`` scheduler selects the flow-matching schedule, a DDPM-family one (DDPM,
        DDIM, PNDM, Euler, DPM-Solver, ... see ``schedules.DDPM_SCHEDULERS``) the DDPM/DDIM one;
        any other class is refused. Only its config is used (spacing, offsets, shifts); stepping
        is done functionally.
    vae:
        ``AutoencoderKL`` for latent priors, ``None`` for pixel priors.
    conditioning:
        For ``UNet2DConditionModel`` (required): the fixed (1, L, D) encoder hidden states, e.g.
        the text encoder's embedding of the empty prompt (what :func:`~fiber_plugins.load_prior`
        computes from a pipeline folder), or ``"zeros"`` for an all-zero conditioning (for SDXL,
        with a zero ``pooled`` too: its pipeline's unconditional input). Refused for other
        denoisers.
    class_label:
        For DiT: the class fed to the transformer; default its null class (unconditional). For a
        class-conditional UNet (``num_class_embeds`` in its config, no null class): required,
        0..num_class_embeds-1. Refused for denoisers without a class embedding.
    pooled:
        For SDXL-style ``UNet2DConditionModel`` (``addition_embed_type="text_time"``): the (1, P)
        pooled text embedding (``text_encoder_2``'s projection), required unless
        ``conditioning="zeros"``. It and the time ids (original size = target size = the image
        size, crop (0, 0)) go to every denoiser call as ``added_cond_kwargs``.
    """

    # capability flags that samplers ask for instead of checking the class
    conditional_on_features: bool = False  # True: the denoiser needs y = phi(x*) (fiber models)

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler,
        vae: nn.Module | None = None,
        conditioning: torch.Tensor | str | None = None,
        class_label: int | None = None,
        pooled: torch.Tensor | None = None,
    ):
        name = type(denoiser).__name__
        if name not in DENOISERS:
            raise UserTypeError(f"unsupported denoiser {name}; supported: {list(DENOISERS)}")
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        if hasattr(scheduler, "config"):
            scheduler_config = {**dict(scheduler.config), "_class_name": type(scheduler).__name__}
        else:
            scheduler_config = dict(scheduler)
        self.schedule = make_schedule(scheduler_config)
        self.denoiser_type = name
        self.acceleration = Acceleration()
        cfg: Any = denoiser.config  # diffusers' config (a FrozenDict read by attribute)
        self.latent_channels = int(cfg.in_channels)
        size = cfg.sample_size
        self.latent_size = tuple(size) if isinstance(size, (list, tuple)) else (int(size),) * 2
        self._out_channels = int(getattr(cfg, "out_channels", None) or cfg.in_channels)
        self.class_label = _class_label(name, cfg, class_label, self.conditional_on_features)
        if self.vae is not None and self.schedule.clip_sample:
            warn(
                "the scheduler config has clip_sample=True, which clamps the predicted *latent* "
                f"to [-{self.schedule.clip_sample_range}, {self.schedule.clip_sample_range}] in "
                "every update (diffusers would do the same); set clip_sample=False in "
                "scheduler_config.json if that is not intended"
            )
        if self.vae is not None:
            vcfg: Any = self.vae.config
            self.scaling_factor = float(getattr(vcfg, "scaling_factor", 1.0) or 1.0)
            self.shift_factor = float(getattr(vcfg, "shift_factor", 0.0) or 0.0)
            factor = 2 ** (len(vcfg.block_out_channels) - 1)
            self.image_size = tuple(s * factor for s in self.latent_size)
            self.image_channels = int(vcfg.out_channels)
        else:
            self.image_size = self.latent_size
            self.image_channels = self.latent_channels
        # UNet2DConditionModel: the fixed encoder hidden states and, for SDXL-style UNets, the
        # added_cond_kwargs (pooled text embedding and time ids), all with batch 1
        self.conditioning: torch.Tensor | None = None
        self.added_cond: dict[str, torch.Tensor] | None = None
        if name == "UNet2DConditionModel":
            self.conditioning, self.added_cond = _text_conditioning(
                denoiser, conditioning, pooled, self.image_size
            )
        else:
            for what, value in (("conditioning", conditioning), ("pooled", pooled)):
                if value is not None:
                    raise UserValueError(
                        f"{what}= is for a UNet2DConditionModel (text-conditioned); this prior's "
                        f"denoiser is a {name}: drop {what}="
                    )

    # ------------------------------------------------------------------ description
    @property
    def kind(self) -> str:
        """'pixel', 'latent', 'flow' (pixel flow matching) or 'latent-flow'."""
        flow = self.schedule.family == "flow"
        if self.vae is None:
            return "flow" if flow else "pixel"
        return "latent-flow" if flow else "latent"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, *self.latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device=None, dtype=None) -> DiffusionPrior:
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:
            self.denoiser.to(**kw)
            if self.vae is not None:
                self.vae.to(**kw)
        if device is not None:  # the fixed conditioning follows (its dtype is cast per call)
            if self.conditioning is not None:
                self.conditioning = self.conditioning.to(device)
            if self.added_cond is not None:
                self.added_cond = {k: v.to(device) for k, v in self.added_cond.items()}
        if dtype is not None:
            names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
            self.acceleration = self.acceleration.replace(weights=names.get(dtype, str(dtype)))
        return self

    def accelerate(
        self,
        weights: str | None = None,
        channels_last: bool | None = None,
        compile: str | None = "keep",
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        dynamic: bool = False,
        checkpointing: bool | None = None,
    ) -> DiffusionPrior:
        """Speed settings of the networks, in place; returns the prior.

        Parameters
        ----------
        weights: 'fp32', 'bf16' or 'fp16' (cast once); ``None`` keeps the dtype.
        channels_last: ``True`` / ``False`` switches the UNet/VAE memory format; ``None`` keeps it.
        compile: 'blocks' (each UNet/DiT/VAE-decoder block), 'full' (denoiser and VAE decoder),
            ``None`` (undo) or 'keep' (default: unchanged).
        compile_mode: torch.compile mode ('reduce-overhead' adds CUDA graphs, 'max-autotune').
        compile_backend: 'inductor'; 'aot_eager' traces without generating code.
        dynamic: shape-generic compiled code (default off: the engine's shapes are static).
        checkpointing: ``True`` / ``False`` switches diffusers' gradient checkpointing of the
            denoiser and VAE blocks (less activation memory, ~1 extra forward per guided step);
            ``None`` keeps it. The engine turns it on for a run by itself when batch 1 does not
            fit without it.

        See :mod:`fiber_plugins.priors.acceleration`; the settings are in ``prior.acceleration``.

        >>> prior.to("cuda").accelerate(weights="bf16", compile="blocks")  # doctest: +SKIP
        """
        from . import acceleration as acc

        # check every argument before changing anything, so a bad one leaves the prior as it was
        if weights is not None and weights not in acc.WEIGHTS:
            raise UserValueError(
                f"unknown weights precision {weights!r}; choose one of {list(acc.WEIGHTS)}"
            )
        if compile not in ("keep", None) and compile not in acc.COMPILE:
            raise UserValueError(
                f"unknown compile setting {compile!r}; choose one of {list(acc.COMPILE)} or None"
            )
        if checkpointing and not acc.supports_checkpointing(self):
            acc.set_checkpointing(self, True)  # raises with the reason
        state = self.acceleration
        if weights is not None:
            acc.set_weights(self, weights)
            state = state.replace(weights=weights)
        if channels_last is not None:
            acc.set_channels_last(self, channels_last)
            state = state.replace(channels_last=bool(channels_last))
        if checkpointing is not None:
            acc.set_checkpointing(self, bool(checkpointing))
            state = state.replace(checkpointing=bool(checkpointing))
        if compile != "keep":
            acc.set_compile(self, compile, compile_mode, compile_backend, dynamic)
            state = state.replace(
                compile=compile,
                compile_mode=compile_mode if compile else None,
                compile_backend=compile_backend if compile else None,
            )
        self.acceleration = state
        return self

    @contextlib.contextmanager
    def checkpointing(self, on: bool = True, *, auto: bool = False) -> Iterator[DiffusionPrior]:
        """Gradient checkpointing of the denoiser/VAE blocks on (or off) inside the block, the
        previous setting after it, whatever happens inside.

        ``auto=True`` records the setting as ``'auto'`` (the engine's "only when memory needs
        it"). The other speed settings are not touched.

        >>> with prior.checkpointing():                                  # doctest: +SKIP
        ...     result = sampler.sample(references=refs, n=64)
        """
        from . import acceleration as acc

        before = self.acceleration.checkpointing
        acc.set_checkpointing(self, bool(on))
        self.acceleration = self.acceleration.replace(
            checkpointing="auto" if (auto and on) else bool(on)
        )
        try:
            yield self
        finally:
            acc.set_checkpointing(self, bool(before))
            self.acceleration = self.acceleration.replace(checkpointing=before)

    def supports_checkpointing(self) -> bool:
        """Whether the denoiser has diffusers' gradient checkpointing."""
        from . import acceleration as acc

        return acc.supports_checkpointing(self)

    def _net_input(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """x in the networks' weight dtype and memory format (no copy when they already match)."""
        dtype = self.dtype if module is self.denoiser else next(module.parameters()).dtype
        x = x.to(dtype)
        if self.acceleration.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __repr__(self) -> str:
        return (
            f"DiffusionPrior(kind={self.kind!r}, denoiser={self.denoiser_type}, "
            f"prediction={self.schedule.prediction_type!r}, image={self.image_channels}x"
            f"{self.image_size[0]}x{self.image_size[1]}, latent={self.latent_shape})"
        )

    # ------------------------------------------------------------------ the sampler's interface
    def timesteps(self, num_steps: int) -> list[Step]:
        """The sampling grid: ``num_steps`` transitions from pure noise to data (computed once
        per ``num_steps`` from the schedule's host-side tables)."""
        grids = self.__dict__.setdefault("_grids", {})
        if num_steps not in grids:
            grids[num_steps] = self.schedule.grid(num_steps)
        return list(grids[num_steps])

    def model_output(self, x: torch.Tensor, step: Step | float) -> torch.Tensor:
        """The raw network output at (x_t, t): epsilon, v, x0 or velocity, per the config."""
        t = step.timestep if isinstance(step, Step) else float(step)
        b = x.shape[0]
        x_dtype = x.dtype
        x = self._net_input(x, self.denoiser)
        if self.schedule.family == "flow":
            tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        else:
            tt = torch.full((b,), int(round(t)), device=x.device, dtype=torch.long)
        kw: dict[str, Any] = {}
        if self.class_label is not None and self.denoiser_type != "DiTTransformer2DModel":
            kw["class_labels"] = torch.full(
                (b,), self.class_label, device=x.device, dtype=torch.long
            )
        if self.denoiser_type == "UNet2DModel":
            out = self.denoiser(x, tt, **kw).sample
        elif self.denoiser_type == "UNet2DConditionModel":
            # __init__ sets the conditioning tensor for this denoiser
            conditioning = cast(torch.Tensor, self.conditioning)
            ctx = conditioning.to(device=x.device, dtype=x.dtype).expand(b, -1, -1)
            if self.added_cond is not None:  # SDXL: pooled text embedding and time ids
                kw["added_cond_kwargs"] = {
                    k: v.to(device=x.device, dtype=x.dtype).expand(b, -1)
                    for k, v in self.added_cond.items()
                }
            out = self.denoiser(x, tt, encoder_hidden_states=ctx, **kw).sample
        else:
            class_label = cast(int, self.class_label)  # __init__ sets it for DiT
            labels = torch.full((b,), class_label, device=x.device, dtype=torch.long)
            out = self.denoiser(x, timestep=tt, class_labels=labels).sample
        if out.shape[1] == 2 * self.latent_channels:  # learned-variance models (DiT, ADM)
            out = out[:, : self.latent_channels]
        return out.to(x_dtype)  # the caller's dtype (fp32 state with half weights / autocast)

    def predict(
        self, x: torch.Tensor, step: Step, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat): the noise estimate and Tweedie's estimate of the clean latent."""
        if out is None:
            out = self.model_output(x, step)
        return split_prediction(out, x, step.a_t, step.s_t, self.schedule.prediction_type)

    def update(
        self,
        x0_hat: torch.Tensor,
        eps_hat: torch.Tensor,
        step: Step,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM (eta=0) / DDPM-like (eta=1) / Euler (flow) update x_t -> x_s, functionally."""
        if self.schedule.clip_sample:
            r = self.schedule.clip_sample_range
            x0_hat = x0_hat.clamp(-r, r)
        return ddim_update(x0_hat, eps_hat, step, eta=eta, noise=noise)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, step: Step | float) -> torch.Tensor:
        """Sample q(x_t | x0) = a_t x0 + s_t eps with the given eps."""
        if isinstance(step, Step):
            a, s = step.a_t, step.s_t
        else:
            a, s = self.schedule.coefficients(step)
        return a * x0 + s * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image in [-1, 1] (identity for pixel priors). Differentiable."""
        if self.vae is None:
            return z
        z = z / self.scaling_factor + self.shift_factor
        # an AutoencoderKL: nn.Module's typed attribute lookup does not know its decode/encode
        return cast(Any, self.vae).decode(self._net_input(z, self.vae)).sample.to(z.dtype)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent (the posterior mean; identity for pixel priors)."""
        if self.vae is None:
            return image
        vae = cast(Any, self.vae)  # an AutoencoderKL, as in decode
        z = vae.encode(self._net_input(image, self.vae)).latent_dist.mean.to(image.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    def sample_unguided(
        self,
        noise: torch.Tensor,
        num_steps: int = 50,
        eta: float = 0.0,
        step_noises: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Plain sampling from x_T = noise; returns images in [-1, 1]."""
        x = noise
        with torch.no_grad():
            for i, step in enumerate(self.timesteps(num_steps)):
                eps, x0 = self.predict(x, step)
                z = step_noises[i] if step_noises is not None else None
                if eta > 0 and z is None:
                    z = torch.randn_like(x)
                x = self.update(x0, eps, step, eta=eta, noise=z)
            return self.decode(x)


# ---------------------------------------------------------------------- conditioning and classes
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


def _class_label(name: str, cfg: Any, class_label: Any, custom_labels: bool) -> int | None:
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


def _text_conditioning(
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

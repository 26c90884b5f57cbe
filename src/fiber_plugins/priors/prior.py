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
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from .._utils import warn
from ..errors import UserTypeError, UserValueError
from .acceleration import Acceleration
from .conditioning import resolve_class_label, text_conditioning
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
        self.class_label = resolve_class_label(name, cfg, class_label, self.conditional_on_features)
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
            self.conditioning, self.added_cond = text_conditioning(
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

"""Conditional fiber models (DESIGN 4.3; paper Sec. 3.1): p(x | phi(x)) trained with the fiber loss.

The training-based alternative to guidance: a conditional flow-matching model learns the
distribution of images given their features y = phi(x), so sampling the fiber of x* is plain
conditional sampling with y = phi(x*) -- fast, but a model must be trained for every subject.
Following the paper, the usual flow-matching loss is regularised with the fiber loss,

    L = E_{x0, t, eps} ||v(x_t, t, y) - (eps - x0)||^2
        + lambda_fiber * E[ 1{t <= t_max} d(phi(x0_hat(x_t, t, y)), y) ],

    x_t = (1 - t) x0 + t eps,   x0_hat = x_t - t v(x_t, t, y),   y = phi(x0),

where the fiber term is taken on the network's one-step estimate of the clean image (the paper's
models sample in one pass; for an ODE model, simulating the whole sampling chain inside every
training step would cost its length in forward passes). ``t_max`` (default 1: every noise level)
can restrict it to low noise; on Color-MNIST that does not help, because at low noise x_t still
shows the digit, while at high noise the condition alone must carry its shape
(docs/color_mnist.md).

A :class:`ConditionalFiberModel` is a :class:`~fiber_plugins.priors.DiffusionPrior` (flow-matching
schedule, pixel space) whose denoiser also takes y: a diffusers ``UNet2DModel`` with
``class_embed_type="identity"`` and a small MLP (:class:`ConditionEmbedding`) that maps y to the
UNet's time-embedding width. Train it with :func:`~fiber_plugins.training.train_fiber_model`
(:mod:`fiber_plugins.training.conditional`) and sample it with
:class:`~fiber_plugins.samplers.ConditionalFiberSampler`, which runs on the shared engine; the
guided samplers NDTM and DPS also take it as their prior, conditioned on each row's target y*
(NDTM on a conditional model, docs/samplers.md). This module holds the model only (its forward
pass, saving and loading).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import MissingFileError, UserTypeError, UserValueError
from .prior import DiffusionPrior
from .schedules import Step

FLOW_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}


class ConditionEmbedding(nn.Module):
    """y (B, K) -> (B, width): standardised with the training targets' mean/std, then an MLP."""

    mean: torch.Tensor  # (K,) buffer
    std: torch.Tensor  # (K,) buffer

    def __init__(self, in_features: int, out_features: int, hidden: int = 256):
        super().__init__()
        self.in_features, self.out_features, self.hidden = in_features, out_features, hidden
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, out_features),
        )

    def config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden": self.hidden,
        }

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net((y - self.mean) / self.std)


class ConditionalFiberModel(DiffusionPrior):
    """A flow-matching prior conditioned on the subject's features y = phi(x).

    Parameters
    ----------
    denoiser: ``UNet2DModel`` built with ``class_embed_type="identity"``.
    condition: :class:`ConditionEmbedding` from y (K features) to the UNet's time-embedding width.
    scheduler: a ``FlowMatchEulerDiscreteScheduler`` or its config (default: 1000 steps, shift 1).
    info: free-form description kept with the weights (the objective, the training settings).

    Examples
    --------
    >>> model, meta = train_fiber_model(objective, images, "runs/fiber-model")  # doctest: +SKIP
    >>> model = ConditionalFiberModel.from_pretrained("runs/fiber-model")       # doctest: +SKIP
    >>> ConditionalFiberSampler(model, objective).sample(references=[x_ref], n=16)  # doctest: +SKIP
    """

    # its denoiser needs y = phi(x*): sampled with ConditionalFiberSampler, or guided with a
    # sampler that conditions each row on its target (NDTMSampler, DPSSampler)
    conditional_on_features = True

    def __init__(
        self,
        denoiser: nn.Module,
        condition: ConditionEmbedding,
        scheduler=None,
        info: dict | None = None,
    ):
        name = type(denoiser).__name__
        if name != "UNet2DModel" or cast(Any, denoiser.config).class_embed_type != "identity":
            raise UserTypeError(
                "a conditional fiber model needs a UNet2DModel with class_embed_type='identity' "
                f"(y enters through the time embedding); got {name} with class_embed_type="
                f"{getattr(denoiser.config, 'class_embed_type', None)!r}"
            )
        width = time_embedding_width(denoiser)
        if condition.out_features != width:
            raise UserValueError(
                f"the condition embedding gives {condition.out_features} values but the UNet's "
                f"time embedding has {width}"
            )
        super().__init__(denoiser, scheduler if scheduler is not None else FLOW_SCHEDULER)
        if self.schedule.family != "flow":
            raise UserValueError("a conditional fiber model uses a FlowMatch* scheduler")
        self.condition = condition.to(self.device).eval().requires_grad_(False)
        self.info = dict(info or {})

    @property
    def num_features(self) -> int:
        """K: the width of the features y the model is conditioned on."""
        return self.condition.in_features

    def __repr__(self) -> str:
        return (
            f"ConditionalFiberModel(image={self.image_channels}x{self.image_size[0]}x"
            f"{self.image_size[1]}, features={self.num_features}, "
            f"objective={self.info.get('objective', '?')!r})"
        )

    def record(self) -> dict:
        """What a result's ``config["fiber_model"]`` says about this prior: that it is a
        conditional fiber model, conditioned on each row's target y*, and what it was trained
        with."""
        info = self.info
        keys = ("objective", "fiber_weight", "fiber_t_max", "steps", "subject_fingerprint")
        return {"conditioned_on": "target", **{k: info.get(k) for k in keys}}

    def to(self, device=None, dtype=None) -> ConditionalFiberModel:
        super().to(device=device, dtype=dtype)
        if device is not None:
            self.condition.to(device)
        return self

    def check_condition(self, y) -> torch.Tensor:
        if isinstance(y, tuple) or not isinstance(y, torch.Tensor):
            raise UserTypeError(
                "a conditional fiber model is conditioned on one (B, K) feature tensor; a summed "
                "objective (a tuple of targets) cannot condition it"
            )
        if y.dim() != 2 or y.shape[1] != self.num_features:
            raise UserValueError(
                f"the model was trained on {self.num_features} features per image, got a target "
                f"of shape {tuple(y.shape)}; use the objective it was trained with "
                f"({self.info.get('objective', 'see training.json')})"
            )
        return y

    def model_output(
        self, x: torch.Tensor, step: Step | float, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The velocity v(x_t, t, y); ``cond`` is y (B, K), required."""
        if cond is None:
            raise UserValueError(
                "a conditional fiber model needs the condition y = phi(x*): sample it with "
                "ConditionalFiberSampler, or guide it with NDTMSampler / DPSSampler (which "
                "condition each row on its target)"
            )
        t = step.timestep if isinstance(step, Step) else float(step)
        x_dtype = x.dtype
        x = self._net_input(x, self.denoiser)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        emb = self.condition(self.check_condition(cond).float()).to(x.dtype)
        return self.denoiser(x, tt, class_labels=emb).sample.to(x_dtype)

    def predict(
        self,
        x: torch.Tensor,
        step: Step,
        out: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if out is None:
            out = self.model_output(x, step, cond)
        return super().predict(x, step, out)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, folder: str | Path) -> Path:
        """``unet/`` (diffusers), ``scheduler/``, ``condition/`` (safetensors + config) and
        ``fiber_model.json`` (``info``) into ``folder``."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        cast(Any, self.denoiser).save_pretrained(out / "unet")  # a diffusers UNet2DModel
        cfg = {k: v for k, v in self.schedule.config.items() if not k.startswith("_")}
        FlowMatchEulerDiscreteScheduler.from_config(cfg).save_pretrained(out / "scheduler")
        (out / "condition").mkdir(exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.condition.state_dict().items()}
        save_file(state, str(out / "condition" / "model.safetensors"))
        (out / "condition" / "config.json").write_text(json.dumps(self.condition.config()))
        (out / "fiber_model.json").write_text(json.dumps(self.info, indent=2, default=str))
        return out

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device | None = None
    ) -> ConditionalFiberModel:
        """Load a folder written by :meth:`save_pretrained` (or ``fiber-plugins train``)."""
        from ..weights import load_state, read_safetensors
        from ._files import read_json
        from .loading import _load_model

        root = Path(folder)
        missing = [
            p
            for p in (
                "unet/config.json",
                "scheduler/scheduler_config.json",
                "condition/config.json",
                "condition/model.safetensors",
            )
            if not (root / p).is_file()
        ]
        if missing:
            raise MissingFileError(
                f"{str(root)!r} is not a conditional fiber model folder: missing {missing} "
                "(write one with ConditionalFiberModel.save_pretrained or train_fiber_model)"
            )
        sched = read_json(root / "scheduler" / "scheduler_config.json")
        cond_cfg_file = root / "condition" / "config.json"
        try:
            cond = ConditionEmbedding(**read_json(cond_cfg_file))
        except TypeError as err:  # keys the embedding does not take
            raise UserValueError(
                f"{cond_cfg_file} does not describe a ConditionEmbedding ({err})"
            ) from None
        weights = root / "condition" / "model.safetensors"
        state = read_safetensors(weights, what="condition weights file")
        load_state(cond, state, f"condition weights {str(weights)!r}")
        unet = _load_model(root / "unet", "UNet2DModel")
        info_file = root / "fiber_model.json"
        info = read_json(info_file) if info_file.is_file() else {}
        model = cls(unet, cond, sched, info=info)
        return model.to(device) if device is not None else model


def time_embedding_width(unet: nn.Module) -> int:
    """The width of a UNet2DModel's time embedding, which the condition is added to."""
    return int(cast(Any, unet).time_embedding.linear_2.out_features)


def subject_fingerprint(objective) -> str | None:
    """A short hash of the subject models' weights (None for plain callables)."""
    import hashlib

    h = hashlib.sha256()
    found = False
    for _, term in objective.terms():
        if term.model is None:
            continue
        for name, t in sorted(term.model.state_dict().items()):
            found = True
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16] if found else None


def is_fiber_model_folder(folder: str | Path) -> bool:
    return (Path(folder) / "condition" / "config.json").is_file()


def as_fiber_model(prior: DiffusionPrior) -> ConditionalFiberModel | None:
    """The prior as a trained conditional fiber model, or None: samplers ask the prior
    (``conditional_on_features``) instead of checking its class."""
    return cast(ConditionalFiberModel, prior) if prior.conditional_on_features else None

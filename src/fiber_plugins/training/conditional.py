"""Training a conditional fiber model p(x | phi(x)) (DESIGN 4.3; paper Sec. 3.1).

The model itself (:class:`~fiber_plugins.priors.ConditionalFiberModel`, saving and loading) lives
in :mod:`fiber_plugins.priors.conditional`; this module trains it with the loss written there,

    L = E_{x0, t, eps} ||v(x_t, t, y) - (eps - x0)||^2
        + lambda_fiber * E[ 1{t <= t_max} d(phi(x0_hat(x_t, t, y)), y) ],

on the package's one training loop (:func:`~fiber_plugins.training.train_loop`).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from .._utils import resolve_device, to_model_range
from ..errors import UserTypeError, UserValueError
from ..objectives.base import FiberObjective
from ..priors.conditional import (
    FLOW_SCHEDULER,
    ConditionalFiberModel,
    ConditionEmbedding,
    subject_fingerprint,
    time_embedding_width,
)
from .loop import train_loop

__all__ = ["DEFAULT_UNET", "train_fiber_model"]

# a small pixel-space UNet (1.1 M parameters at 32x32, 3 channels); sample_size/channels are
# filled in from the data
DEFAULT_UNET = {
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 16,
}


def train_fiber_model(
    objective,
    data,
    out_dir: str | Path | None = None,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    fiber_weight: float = 0.01,
    fiber_t_max: float = 1.0,
    ema_decay: float = 0.999,
    unet_config: dict | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[ConditionalFiberModel, dict]:
    """Train a conditional flow-matching fiber model p(x | phi(x)) for ``objective``.

    Parameters
    ----------
    objective: the :class:`~fiber_plugins.objectives.FiberObjective` whose fibers to model (one
        objective with a (B, K) target; its subject is never changed).
    data: (N, C, H, W) images in [0, 1], or a callable ``(batch_size, generator)`` returning a
        fresh batch (e.g. new random colourings every step).
    out_dir: where to save the model (EMA weights) and ``training.json``; ``None`` saves nothing.
    steps, batch_size, lr: AdamW steps (warm-up + cosine schedule), rows per step, peak rate.
    fiber_weight: lambda_fiber, the weight of the fiber loss (0: plain conditional flow matching).
    fiber_t_max: the fiber term is taken on rows with t <= fiber_t_max (in (0, 1]; default 1,
        every row).
    ema_decay: decay of the exponential moving average of the weights that is returned/saved.
    unet_config: ``UNet2DModel`` settings (default :data:`DEFAULT_UNET`; size and channels are
        taken from the data).
    seed, device, progress: seeding; device (None / 'auto': the subject's device, or CUDA when
        present for a parameter-free phi; another device than the subject's is refused); tqdm.

    Returns the model (EMA weights, eval mode) and the training record.
    """
    from diffusers import UNet2DModel

    if not isinstance(objective, FiberObjective):
        raise UserTypeError(f"objective must be a FiberObjective, got {type(objective).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise UserValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if not (
        isinstance(fiber_weight, (int, float)) and math.isfinite(fiber_weight) and fiber_weight >= 0
    ):
        raise UserValueError(f"fiber_weight must be >= 0, got {fiber_weight!r}")
    if not (isinstance(fiber_t_max, (int, float)) and 0 < fiber_t_max <= 1):
        raise UserValueError(f"fiber_t_max must be in (0, 1], got {fiber_t_max!r}")
    dev = _training_device(objective, device)
    gen = torch.Generator().manual_seed(seed)
    draw = _batches(data, gen)

    with objective.attached():
        # feature statistics for the condition's standardisation, from a few batches
        with torch.no_grad():
            chunks = [draw(batch_size) for _ in range(max(1, 512 // batch_size))]
            for x in chunks:
                _check_images(x)
            feats = [objective.features(to_model_range(x.to(dev))) for x in chunks]
        if isinstance(feats[0], tuple):
            raise UserTypeError(
                "train_fiber_model needs one objective (a summed objective gives a "
                "tuple of features)"
            )
        y = torch.cat(feats)
        if fiber_weight > 0:
            _check_differentiable(objective, to_model_range(chunks[0][:2].to(dev)))
        channels, size = x.shape[1], x.shape[-1]
        ucfg = {**DEFAULT_UNET, **(unet_config or {})}
        ucfg.update(
            sample_size=size,
            in_channels=channels,
            out_channels=channels,
            class_embed_type="identity",
        )
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
            torch.manual_seed(seed)
            # diffusers' type hints export a torch-less placeholder UNet2DModel (no .to)
            unet = UNet2DModel(**ucfg).to(dev).train()  # type: ignore[attr-defined]
            cond = ConditionEmbedding(y.shape[1], time_embedding_width(unet)).to(dev)
        cond.mean.copy_(y.mean(0))
        cond.std.copy_(y.std(0).clamp_min(1e-6))
        params = [*unet.parameters(), *cond.parameters()]

        def step(_: int) -> dict[str, torch.Tensor]:
            x0 = to_model_range(draw(batch_size).to(dev))
            with torch.no_grad():
                y = objective.features(x0).float()
            t = torch.rand(batch_size, generator=gen).to(dev)
            eps = torch.randn(x0.shape, generator=gen).to(dev)
            tb = t.view(-1, 1, 1, 1)
            xt = (1 - tb) * x0 + tb * eps
            v = unet(xt, t * FLOW_SCHEDULER["num_train_timesteps"], class_labels=cond(y)).sample
            fm = (v - (eps - x0)).pow(2).mean()
            out = {"loss": fm, "fm": fm}
            near = t <= fiber_t_max
            if fiber_weight > 0 and bool(near.any()):
                x0_hat = (xt - tb * v)[near]
                fl = objective.distance_between(objective.features(x0_hat), y[near]).mean()
                out.update(loss=fm + fiber_weight * fl, fiber=fl)
            return out

        record = train_loop(
            params,
            step,
            steps=steps,
            lr=lr,
            clip_grad_norm=1.0,
            ema_decay=ema_decay,
            desc="fiber model",
            progress=progress,
            nonfinite_hint=f"fiber_weight (now {fiber_weight})",
        )
    meta = {
        "model": "conditional flow-matching fiber model",
        "objective": objective.name,
        "objective_settings": objective.describe(),
        "subject_fingerprint": subject_fingerprint(objective),
        "num_features": int(y.shape[1]),
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in ucfg.items()},
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "fiber_weight": fiber_weight,
        "fiber_t_max": fiber_t_max if fiber_weight > 0 else None,
        "ema_decay": ema_decay,
        # diffusers' EMAModel warms its decay up as (1 + s) / (10 + s), capped at ema_decay
        "ema_decay_reached": float(min(ema_decay, steps / (steps + 9))),
        "seed": seed,
        "final_fm_loss_mean_last100": record.mean_last("fm"),
        "final_fiber_loss_mean_last100": record.mean_last("fiber"),
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    model = ConditionalFiberModel(unet.eval(), cond.eval(), FLOW_SCHEDULER, info=meta)
    if out_dir is not None:
        model.to("cpu").save_pretrained(out_dir)
        (Path(out_dir) / "training.json").write_text(json.dumps(meta, indent=2))
        model.to(dev)
    return model, meta


def _batches(data, generator: torch.Generator) -> Callable[[int], torch.Tensor]:
    if callable(data):
        return lambda b: data(b, generator)
    if not isinstance(data, torch.Tensor) or data.dim() != 4:
        raise UserTypeError(
            "data must be an (N, C, H, W) image tensor in [0, 1] or a callable "
            "(batch_size, generator) -> (B, C, H, W) images in [0, 1]; got "
            f"{type(data).__name__}{tuple(data.shape) if isinstance(data, torch.Tensor) else ''}"
        )
    if data.shape[0] < 2:
        raise UserValueError(f"need at least 2 training images, got {data.shape[0]}")
    return lambda b: data[torch.randint(0, data.shape[0], (b,), generator=generator)]


def _training_device(objective, device) -> torch.device:
    """``device``, or (None / 'auto') the subject's device; a mismatch is refused clearly."""
    params = [
        p
        for _, term in objective.terms()
        if term.model is not None
        for p in term.model.parameters()
    ]
    where = params[0].device if params else None
    if device in (None, "auto") and where is not None:
        return where
    try:  # a device of another kind than the subject's: the mismatch is the message
        asked = torch.device(device)
    except (RuntimeError, TypeError):
        asked = None
    if where is not None and asked is not None and asked.type != where.type:
        raise UserValueError(
            f"the subject is on {where} but training was asked for on {asked}; move the "
            f"subject (model.to('{asked}')) or pass device='{where}'"
        )
    dev = resolve_device(device)
    if where is not None and where.type != dev.type:
        raise UserValueError(
            f"the subject is on {where} but training was asked for on {dev}; move the subject "
            f"(model.to('{dev}')) or pass device='{where}'"
        )
    return dev


def _check_differentiable(objective, x: torch.Tensor) -> None:
    """With a fiber term, phi must pass a gradient to the image (or the term does nothing)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        feats = objective.features(x)
        grad = None
        if feats.requires_grad:
            (grad,) = torch.autograd.grad(feats.float().pow(2).sum(), x, allow_unused=True)
    if grad is None or not bool(grad.abs().sum() > 0):
        raise UserValueError(
            f"phi of {objective.name} passes no gradient to the image, so the fiber loss term "
            "(fiber_weight > 0) cannot train anything; use fiber_weight=0 or a differentiable phi"
        )


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise UserTypeError(
            f"a training batch must be (B, C, H, W), got {getattr(x, 'shape', x)!r}"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserValueError(
            f"training images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
        )

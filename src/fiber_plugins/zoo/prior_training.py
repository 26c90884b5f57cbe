"""Reproducible training of the Color-MNIST priors (``fiber-plugins train prior`` / ``prior-ood``):
a diffusers ``UNet2DModel`` on colourings drawn fresh for every batch, with the recipes the
measurements in docs/color_mnist.md compare (rectified flow or DDPM, time laws, loss weightings,
the colour-posterior target, off-law states). The optimiser, schedule, EMA, checkpoints and loss
record are :func:`fiber_plugins.training.train_loop`'s; ``training.json`` is written by
:mod:`._record`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._utils import resolve_device, to_model_range
from ..data import color_mnist as cm
from ..errors import UserValueError
from ..training import train_loop
from ..training.checkpoint import check_checkpoint
from ._record import recipe, resume_recipe, write_meta

PRIOR_ARCH = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 16,
}
PRIOR_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


PRIOR_OBJECTIVES = ("epsilon", "v", "flow")
PRIOR_LOSS_WEIGHTINGS = ("none", "min-snr")
PRIOR_TIME_SAMPLINGS = ("uniform", "logit-normal")
PRIOR_TARGETS = ("sampled", "colour-posterior")
# the flow-matching prior's scheduler: rectified flow x_t = (1 - t) x0 + t eps, the network
# predicts v = eps - x0 at timestep 1000 t (as the conditional fiber models)
PRIOR_FLOW_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0}
# the recipes of the shipped priors, keyed by ``ood`` (train_prior's defaults for the settings left
# None). In-distribution: logit-normal t, the colour-posterior target and off-law states at the wrap
# of h, 10,000 steps (unguided colour KL 0.04-0.05; wrong-branch share in [0.4, 0.5) 0.07-0.17
# over three noise seeds, docs/color_mnist.md). OOD: the colour-posterior target and off-law states
# are defined by h, which the OOD colouring does not follow; uniform t, 2,000 steps (KL 0.11).
SHIPPED_PRIOR_RECIPES: dict[bool, dict[str, Any]] = {
    False: {"steps": 10000, "time_sampling": "logit-normal", "target": "colour-posterior",
            "off_law": 0.25},
    True: {"steps": 2000, "time_sampling": "uniform", "target": "sampled", "off_law": 0.0},
}  # fmt: skip
# train_prior's arguments that do not shape the trained weights; every other argument is part of
# the recipe that a resumed run must share with its checkpoint
NOT_RECIPE = (
    "out_dir",
    "device",
    "progress",
    "checkpoint",
    "checkpoint_every",
    "resume",
    "on_checkpoint",
)


def _time_law(objective: str, time_sampling: str, flow_shift: float) -> str:
    """training.json's description of how the training times were drawn."""
    if objective != "flow":
        return "uniform t in 0..999"
    if time_sampling == "uniform" and flow_shift == 1.0:
        return "uniform t in [0, 1)"
    u_law = "U(0, 1)" if time_sampling == "uniform" else "sigmoid(N(0, 1)) (logit-normal)"
    if flow_shift == 1.0:
        return f"t = u, u ~ {u_law}"
    return f"t = s u / (1 + (s - 1) u), u ~ {u_law}, s = {flow_shift:g}"


def _check_recipe(
    *,
    ood: bool,
    batch_size: int,
    objective: str,
    loss_weighting: str,
    flow_shift: float,
    time_sampling: str,
    mean_weight: float,
    target: str,
    off_law: float,
    off_law_t_max: float,
) -> None:
    """Refuse a recipe that names an unknown choice or combines settings that do not go together,
    in one line quoting the values, before anything is built."""
    if objective not in PRIOR_OBJECTIVES:
        raise UserValueError(f"objective must be one of {PRIOR_OBJECTIVES}, got {objective!r}")
    if loss_weighting not in PRIOR_LOSS_WEIGHTINGS:
        raise UserValueError(
            f"loss_weighting must be one of {PRIOR_LOSS_WEIGHTINGS}, got {loss_weighting!r}"
        )
    if flow_shift <= 0 or (objective != "flow" and flow_shift != 1.0):
        raise UserValueError(
            f"flow_shift must be > 0 and is for objective='flow', got {flow_shift}"
        )
    if time_sampling not in PRIOR_TIME_SAMPLINGS:
        raise UserValueError(
            f"time_sampling must be one of {PRIOR_TIME_SAMPLINGS}, got {time_sampling!r}"
        )
    if mean_weight < 0 or (objective != "flow" and mean_weight != 0):
        raise UserValueError(
            f"mean_weight must be >= 0 and is for objective='flow', got {mean_weight}"
        )
    if target not in PRIOR_TARGETS:
        raise UserValueError(f"target must be one of {PRIOR_TARGETS}, got {target!r}")
    if target != "sampled" and (objective != "flow" or ood):
        raise UserValueError(
            f"target={target!r} is for objective='flow' with in-distribution colours (ood=False); "
            f"got objective={objective!r}, ood={ood}"
        )
    if not 0 <= off_law < 1 or (off_law and target != "colour-posterior"):
        raise UserValueError(
            f"off_law must be in [0, 1) and needs target='colour-posterior' (an off-law state's "
            f"target is the colour law's posterior); got off_law={off_law}, target={target!r}"
        )
    if not 0.02 < off_law_t_max <= 1:
        raise UserValueError(f"off_law_t_max must be in (0.02, 1], got {off_law_t_max}")
    if off_law and round(batch_size * off_law) == 0:
        raise UserValueError(
            f"off_law={off_law} of a batch of {batch_size} rounds to no off-law state; use "
            f"off_law > {0.5 / batch_size:g} or a batch of at least {int(0.5 / off_law) + 1}"
        )
    if objective != "flow" and time_sampling != "uniform":
        raise UserValueError("time_sampling='logit-normal' is for objective='flow'")
    if objective == "flow" and loss_weighting != "none":
        raise UserValueError("loss_weighting='min-snr' is for the DDPM objectives ('epsilon', 'v')")


def train_prior(
    out_dir: str | Path,
    ood: bool = False,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    *,
    objective: str = "flow",
    loss_weighting: str = "none",
    snr_gamma: float = 5.0,
    flow_shift: float = 1.0,
    time_sampling: str | None = None,
    mean_weight: float = 0.0,
    target: str | None = None,
    off_law: float | None = None,
    off_law_t_max: float = 0.6,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 250,
    resume: bool = True,
    on_checkpoint: Callable[[int, Any], None] | None = None,
) -> dict:
    """Train a pixel-space prior (diffusers UNet2DModel, 32x32) on Color-MNIST.

    Colours are drawn fresh for every batch (the digits come from the training split); with
    ``ood=True`` foreground and background colours are independent. The EMA weights are saved
    as a diffusers folder (``unet/``, ``scheduler/``) loadable with :func:`load_prior`, with
    ``training.json`` holding the whole recipe.

    The defaults are the recipe of the shipped priors (:data:`SHIPPED_PRIOR_RECIPES`), chosen by
    measuring the unguided colour law (``benchmarks/color_mnist_prior_quality.py``;
    docs/color_mnist.md): rectified flow, batch 32, and for ``ood=False`` 10,000 steps of
    logit-normal t with the colour-posterior target and ``off_law=0.25``; for ``ood=True``
    2,000 steps of uniform t on the sampled target. ``steps``, ``time_sampling``, ``target``
    and ``off_law`` left ``None`` take the shipped recipe's value for ``ood``.

    ``objective``: ``"epsilon"`` (DDPM, cosine schedule, epsilon prediction: the recipe of the
    priors shipped before 0.2), ``"v"`` (the same DDPM schedule, v prediction) or ``"flow"``
    (rectified flow, t ~ U(0, 1), velocity prediction, a ``FlowMatchEulerDiscreteScheduler``).
    ``loss_weighting``: ``"none"`` or ``"min-snr"`` (min-SNR-gamma weighting of the DDPM loss,
    gamma ``snr_gamma``; DDPM objectives only). ``flow_shift`` (flow only): the time shift s
    of both the training times, t = s u / (1 + (s - 1) u) with u ~ U(0, 1) (s > 1: more
    training at high noise, where the colours are decided), and the saved scheduler's
    sampling grid (its ``shift``). ``time_sampling`` (flow only): ``"uniform"`` (u ~ U(0, 1))
    or ``"logit-normal"`` (u = sigmoid(z), z ~ N(0, 1): more training at middle noise levels, as
    in Esser et al. 2024); the shift applies to u either way. ``mean_weight`` (flow only): w >= 0
    adds w times the squared per-channel image mean of the velocity error to the loss, so the
    error's mean component (the background colour, for these images) weighs 1 + w times as much;
    a fixed positive weighting of a squared error keeps its minimiser, the conditional mean, so
    the model learns the same flow. ``target`` (flow, in-distribution only): ``"sampled"``
    (v = eps - x0 of the drawn image) or ``"colour-posterior"`` (v = (x_t - E[x0 | x_t, g]) / t,
    with the background colours integrated out exactly under the colour law by
    :func:`~fiber_plugins.data.color_mnist.posterior_clean`; the same conditional mean, so the
    same flow, without the noise of the drawn colours in the target). ``off_law`` (with
    ``target="colour-posterior"``): the fraction of each batch replaced by states the data never
    makes, digits whose channels sit near h's wrap with half of their digit colours on the
    other branch (:func:`~fiber_plugins.data.color_mnist.off_law_colours`), noised to
    t ~ U(0.02, ``off_law_t_max``); their target is the colour law's posterior there, which moves
    the background to the side of 0.5 that the digit's contrast names (what the exact denoiser
    does). On-law states ask for that rule only within the observation noise of the wrap, too
    little of the loss for the network to learn it (docs/color_mnist.md); these states ask for it
    plainly. The target is the law's posterior for every state, but where off-law and on-law
    states can give the same x_t (high noise) the mix of states changes the learnt flow on the
    data too: measured as a fine-tune, the colour KL rose from 0.113 to 0.147 with
    ``off_law_t_max=0.6`` and to 0.227 with 0.95 (docs/color_mnist.md). ``checkpoint`` /
    ``checkpoint_every`` /
    ``resume``: :func:`~fiber_plugins.training.train_loop`'s checkpointing (the batch generator's
    state included, so a resumed run ends with the same weights). ``resume=True`` continues from
    the checkpoint in ``checkpoint`` when there is one and starts afresh in a new or empty folder;
    ``False`` starts afresh and overwrites it. The checkpoint records the whole recipe, every
    argument but ``out_dir``, ``device``, ``progress`` and the checkpoint's own settings
    (:data:`NOT_RECIPE`), with the architecture and the data's hash: a resume with any other
    value (objective, seed, batch size, ...) is refused in one line naming each differing setting
    with both values. A ``checkpoint`` that is a file, or a folder holding anything but a
    training checkpoint, is refused before anything is built or written
    (:func:`~fiber_plugins.training.loop.check_checkpoint`). ``on_checkpoint(step, prior)``
    gets, after each checkpoint, a :class:`~fiber_plugins.priors.DiffusionPrior` on a copy of
    the EMA weights so far (for evaluating the run while it trains).
    """
    arguments = dict(locals())  # first: the call's arguments, for the checkpoint's recipe
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    shipped = SHIPPED_PRIOR_RECIPES[bool(ood)]
    if objective != "flow":  # the shipped choices below are the flow prior's
        shipped = {**shipped, "time_sampling": "uniform", "target": "sampled", "off_law": 0.0}
    steps = shipped["steps"] if steps is None else steps
    time_sampling = shipped["time_sampling"] if time_sampling is None else time_sampling
    target = shipped["target"] if target is None else target
    if off_law is None:
        off_law = shipped["off_law"] if target == "colour-posterior" else 0.0
    # the recipe as run, so that an explicit default and a None agree on resume
    arguments.update(steps=steps, time_sampling=time_sampling, target=target, off_law=off_law)
    _check_recipe(
        ood=ood,
        batch_size=batch_size,
        objective=objective,
        loss_weighting=loss_weighting,
        flow_shift=flow_shift,
        time_sampling=time_sampling,
        mean_weight=mean_weight,
        target=target,
        off_law=off_law,
        off_law_t_max=off_law_t_max,
    )
    if checkpoint is not None:
        check_checkpoint(checkpoint)  # a file or a foreign folder: refused before anything runs
    dev = resolve_device(device)
    torch.manual_seed(seed)
    g, _ = cm.load_digits("train")
    gen = torch.Generator().manual_seed(seed)
    # diffusers' type hints export torch-less placeholder classes (no .to, .config, ...)
    unet = UNet2DModel(**PRIOR_ARCH).to(dev)  # type: ignore[attr-defined]
    sched: Any
    if objective == "flow":
        schedule: dict = {**PRIOR_FLOW_SCHEDULE, "shift": float(flow_shift)}
        sched = FlowMatchEulerDiscreteScheduler(**schedule)
        acp = None
    else:
        schedule = {
            **PRIOR_SCHEDULE,
            "prediction_type": "v_prediction" if objective == "v" else "epsilon",
        }
        sched = DDPMScheduler(**schedule)
        acp = sched.alphas_cumprod.to(dev)
    num_t = int(sched.config.num_train_timesteps)

    def step(_step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, g.shape[0], (batch_size,), generator=gen)
        digits = g[idx]
        x, _ = cm.make_colored(digits, gen, ood=ood)
        x0 = to_model_range(x).to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        if acp is None:  # rectified flow
            if time_sampling == "uniform":
                t = torch.rand(batch_size, generator=gen).to(dev)
            else:
                t = torch.sigmoid(torch.randn(batch_size, generator=gen)).to(dev)
            if flow_shift != 1.0:
                t = flow_shift * t / (1 + (flow_shift - 1) * t)
            tb = t.view(-1, 1, 1, 1)
            xt = (1 - tb) * x0 + tb * noise
            v = noise - x0
            k = round(batch_size * off_law)
            if k:  # the first k states: off the law near the wrap, at t <= off_law_t_max
                b_off, f_off = cm.off_law_colours(k, gen)
                x0_off = to_model_range(cm.colorize(digits[:k], b_off, f_off)).to(dev)
                t_off = (0.02 + (off_law_t_max - 0.02) * torch.rand(k, generator=gen)).to(dev)
                t = torch.cat([t_off, t[k:]])
                tb = t.view(-1, 1, 1, 1)
                xt = torch.cat([(1 - tb[:k]) * x0_off + tb[:k] * noise[:k], xt[k:]])
            if target == "colour-posterior":
                x0_post = cm.posterior_clean(xt.double(), t, digits.to(dev))
                v_post = ((xt.double() - x0_post) / tb.double()).float()
                v = torch.where(tb < 1e-3, v, v_post)  # at t ~ 0 the posterior is x0 itself
            err = unet(xt, t * num_t).sample - v
            mse = err.pow(2).mean()
            if not mean_weight:
                return {"loss": mse}
            return {"loss": mse + mean_weight * err.mean((2, 3)).pow(2).mean(), "mse": mse}
        t = torch.randint(0, num_t, (batch_size,), generator=gen).to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        goal = noise if objective == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        err = (unet(xt, t).sample - goal).pow(2).mean((1, 2, 3))
        if loss_weighting == "min-snr":
            snr = acp[t] / (1 - acp[t])
            w = snr.clamp(max=snr_gamma) / (snr if objective == "epsilon" else snr + 1)
            return {"loss": (w * err).mean(), "mse": err.mean()}
        return {"loss": err.mean()}

    sched_cfg = {**dict(sched.config), "_class_name": type(sched).__name__}
    hook = None
    if on_checkpoint is not None:
        from ..priors import DiffusionPrior

        def hook(done: int, weights: list[torch.Tensor]) -> None:
            copy: Any = UNet2DModel(**PRIOR_ARCH)  # diffusers' torch-less type hints
            for p, w in zip(copy.parameters(), weights):
                p.data.copy_(w.detach().cpu())
            on_checkpoint(done, DiffusionPrior(copy.eval(), sched_cfg))

    record = train_loop(
        unet.parameters(),
        step,
        steps=steps,
        lr=lr,
        clip_grad_norm=1.0,
        ema_decay=ema_decay,
        desc="prior" + (" (ood)" if ood else ""),
        progress=progress,
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        generators=[gen],
        on_checkpoint=hook,
        recipe=resume_recipe(
            "fiber_plugins.zoo.train_prior",
            arguments,
            NOT_RECIPE,
            architecture=PRIOR_ARCH,
            schedule=schedule,
            data_hash=cm.data_hash(g),
        ),
    )
    out = Path(out_dir)
    unet.to("cpu").save_pretrained(out / "unet")
    sched.save_pretrained(out / "scheduler")
    meta = {
        "model": "color-mnist prior" + (" (OOD colours)" if ood else ""),
        "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in PRIOR_ARCH.items()},
        "objective": objective,
        "loss_weighting": loss_weighting if objective != "flow" else "none",
        **({"snr_gamma": snr_gamma} if loss_weighting == "min-snr" else {}),
        "time_sampling": _time_law(objective, time_sampling, flow_shift),
        **({"mean_weight": mean_weight} if mean_weight else {}),
        **(
            {"target": "v = (x_t - E[x0 | x_t, digit]) / t, colours integrated out"}
            if target == "colour-posterior"
            else {}
        ),
        **(
            {
                "off_law": {
                    "fraction": off_law,
                    "t": f"U(0.02, {off_law_t_max:g})",
                    "colours": "off_law_colours: b ~ U(0.4, 0.6) per channel, digit colour on "
                    "the other branch of h with probability 0.5",
                    "target": "the colour law's posterior (colour-posterior)",
                }
            }
            if off_law
            else {}
        ),
        "scheduler": type(sched).__name__,
        "schedule": schedule,
        **recipe(steps, batch_size, lr, seed, g),
        "optimizer": "AdamW (weight decay 0), gradient-norm clip 1.0",
        "lr_schedule": "cosine_lr (100 warm-up steps, cosine decay to 0)",
        "ema_decay": ema_decay,
        "ood": ood,
        "final_loss_mean_last100": record.mean_last("loss"),
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }
    write_meta(out, meta)
    return meta

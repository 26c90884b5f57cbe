"""The one training loop: optimiser, learning-rate schedule, gradient clipping, EMA, progress bar
and a record of every step's losses.

Every model the package trains (the conditional fiber model and the shipped Color-MNIST prior,
autoencoder, classifiers and SAE) runs through :func:`train_loop`; a trainer only writes its
``step`` function (draw a batch, return the loss) and what it saves afterwards. The loop draws no
random numbers itself, so a trainer that draws its batches from a seeded ``torch.Generator`` is
reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch

__all__ = ["cosine_lr", "TrainingRecord", "train_loop"]

LrSchedule = Callable[[int, int, float], float]


def cosine_lr(step: int, total: int, lr: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    f = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * f))


@dataclass
class TrainingRecord:
    """What :func:`train_loop` logged.

    Attributes
    ----------
    logs: for each name the ``step`` function returned, its value at every step where it was
        returned (``"loss"``, the minimised quantity, at every step).
    wall_time_s: seconds the loop took (EMA copy included).
    """

    logs: dict[str, list[float]] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def mean_last(self, name: str, n: int = 100) -> float | None:
        """The mean of the last ``n`` logged values of ``name``; None when it was never logged."""
        values = self.logs.get(name, [])[-n:]
        return sum(values) / len(values) if values else None


def train_loop(
    params: Iterable[torch.nn.Parameter],
    step: Callable[[int], Mapping[str, torch.Tensor | float]],
    *,
    steps: int,
    lr: float,
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    weight_decay: float = 0.0,
    lr_schedule: LrSchedule | None = cosine_lr,
    clip_grad_norm: float | None = None,
    ema_decay: float | None = None,
    desc: str = "training",
    progress: bool = True,
    log_every: int = 20,
    nonfinite_hint: str | None = None,
) -> TrainingRecord:
    """Minimise ``step(i)["loss"]`` over ``params`` for ``steps`` steps.

    Each step: set the learning rate (``lr_schedule(i, steps, lr)``; ``None`` keeps ``lr``),
    call ``step(i)`` with gradients enabled, take the gradient of its ``"loss"`` with respect to
    ``params`` only (``torch.autograd.grad``: a frozen model inside the loss, such as the subject
    of a fiber term, never gets a ``.grad``), refuse a non-finite loss, clip the gradient norm,
    take an optimiser step and update the EMA.

    Parameters
    ----------
    params: the trained parameters (a list is made of them).
    step: ``i -> {"loss": scalar tensor, **other}``; every entry (``"loss"`` too) is logged as a
        float in the record, so it may hold more quantities (a fiber term, a sparsity) that are
        returned only on the steps where they exist.
    steps, lr: number of steps and the peak learning rate.
    optimizer, weight_decay: the optimiser class (``torch.optim.AdamW`` by default) and its
        weight decay.
    lr_schedule: ``(step, total, lr) -> lr``; default :func:`cosine_lr` (warm-up + cosine).
    clip_grad_norm: the gradient-norm clip (None: no clipping).
    ema_decay: with a value, diffusers' ``EMAModel`` averages the weights and its average is
        copied into ``params`` at the end.
    desc, progress, log_every: the tqdm bar's label, whether it is shown, and how often its
        postfix (the mean of each logged quantity over the last 50 values) is refreshed.
    nonfinite_hint: what else to lower when the loss becomes non-finite (named in the error,
        after the learning rate).

    Returns
    -------
    TrainingRecord
        Every step's logged values and the wall time.

    Raises
    ------
    FloatingPointError
        The loss became NaN or infinite (the weights are left at the step before).
    """
    from tqdm.auto import trange

    params = list(params)
    opt = optimizer(params, lr=lr, weight_decay=weight_decay)
    ema = None
    if ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=ema_decay)
    record = TrainingRecord()
    start = time.perf_counter()
    bar = trange(steps, desc=desc, disable=not progress)
    for i in bar:
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(i, steps, lr)
        with torch.enable_grad():
            out = step(i)
            loss = cast(torch.Tensor, out["loss"])  # the minimised entry is a scalar tensor
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            hint = f" or {nonfinite_hint}" if nonfinite_hint else ""
            raise FloatingPointError(
                f"training loss became {value} at step {i}; lower lr (now {lr}){hint}"
            )
        for p, g in zip(params, grads):
            p.grad = g
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)
        for name, v in out.items():
            record.logs.setdefault(name, []).append(
                value if name == "loss" else float(v.detach() if torch.is_tensor(v) else v)
            )
        if i % log_every == 0:
            bar.set_postfix(
                {name: f"{sum(v[-50:]) / len(v[-50:]):.4g}" for name, v in record.logs.items()}
            )
    if ema is not None:
        ema.copy_to(params)
    record.wall_time_s = time.perf_counter() - start
    return record

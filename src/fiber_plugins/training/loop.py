"""The one training loop: optimiser, learning-rate schedule, gradient clipping, EMA, progress bar
and a record of every step's losses.

Every model the package trains (the conditional fiber model and the shipped Color-MNIST prior,
autoencoder, classifiers and SAE) runs through :func:`train_loop`; a trainer only writes its
``step`` function (draw a batch, return the loss) and what it saves afterwards. The loop draws no
random numbers itself, so a trainer that draws its batches from a seeded ``torch.Generator`` is
reproducible.

With ``checkpoint=FOLDER`` the loop saves its whole state every ``checkpoint_every`` steps (and
at the end) and, with ``resume=True``, continues from it: the trained parameters, the optimiser
state, the EMA average, the step, the loss record, torch's global RNG and the generators named in
``generators`` (the ones ``step`` draws from). The folder holds ``state-<step>.safetensors`` (every
tensor, RNG states as uint8 tensors) and ``state.json`` (the step, the record, the optimiser's
non-tensor settings, which tensor file is current, and the run's settings); nothing is pickled.
``state.json`` is replaced last, atomically, so an interruption while saving leaves the previous
checkpoint usable. The settings are the loop's own (steps, learning rate, optimiser, weight decay,
schedule, clipping, EMA decay, parameter shapes, number of generators) and the trainer's
``recipe`` (everything else that shapes the run: batch size, seed, objective, ...); a resume with
any other value is refused, naming each differing setting with both values. A folder that holds
anything but such a checkpoint is never written into (:func:`check_checkpoint`). On the
CPU a resumed run ends bit-identical to an uninterrupted one (same kernels on the same shapes;
tests/training/test_loop.py checks it); on CUDA only torch's CPU RNG and the given generators
are restored, so a ``step`` that draws on the GPU's default generator, or nondeterministic GPU
kernels, can make it differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ..errors import UserValueError
from .checkpoint import CHECKPOINT_FORMAT, _load_state, _run_settings, _save_state, check_checkpoint

__all__ = ["cosine_lr", "TrainingRecord", "train_loop", "check_checkpoint", "CHECKPOINT_FORMAT"]


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
    wall_time_s: seconds the loop took (EMA copy and checkpoint saving included, ``on_checkpoint``
        callbacks not), summed over the sessions of a resumed run.
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
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    generators: Sequence[torch.Generator] = (),
    on_checkpoint: Callable[[int, list[torch.Tensor]], None] | None = None,
    recipe: Mapping[str, Any] | None = None,
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
    checkpoint: a folder for the loop's state (created when missing); None: no checkpoints. A
        file, or a folder that holds anything but a checkpoint of this loop, is refused before
        the first step (:func:`check_checkpoint`).
    checkpoint_every: save every this many steps (and always after the last step).
    resume: with a checkpoint in ``checkpoint``, continue from it (a checkpoint of the final
        step runs no more steps); with none there (a new or empty folder) the run starts afresh;
        False starts afresh and overwrites a checkpoint that is there. The checkpoint must come
        from a run with the same settings: ``steps``, ``lr``, the optimiser class,
        ``weight_decay``, ``lr_schedule`` (by name), ``clip_grad_norm``, ``ema_decay``, the
        parameter shapes, the number of generators and the whole ``recipe``; a difference is
        refused in one line naming each differing setting with both values.
    generators: the torch generators ``step`` draws from; their states are saved and
        restored with the checkpoint (torch's global CPU RNG always is).
    on_checkpoint: ``(step, weights)`` called after each save, ``step`` the number of steps done
        and ``weights`` the EMA average (the parameters without EMA), e.g. to evaluate the model
        so far; it must not modify them. It runs without gradients, under ``fork_rng`` (torch's
        CPU RNG is restored after it); its time is not counted in ``wall_time_s``.
    recipe: the trainer's own settings that shape the run and that the loop does not see (batch
        size, seed, objective, data, architecture, ...; JSON values, tuples as lists), saved with
        the checkpoint and compared, key by key, on resume. A trainer passes every setting it
        was called with, but those that do not change the trained weights (where it writes, the
        device, the progress bar), so that a resume under another recipe is refused.

    Returns
    -------
    TrainingRecord
        Every step's logged values and the wall time.

    Raises
    ------
    FloatingPointError
        The loss became NaN or infinite (the weights are left at the step before).
    ValueError
        (:class:`~fiber_plugins.errors.UserValueError`) a checkpoint that is corrupt, truncated or
        from a run with other settings; a ``checkpoint`` that is a file or a folder of other
        files; one line.
    TypeError
        (:class:`~fiber_plugins.errors.UserTypeError`) a ``recipe`` that is not JSON.
    """
    from tqdm.auto import trange

    params = list(params)
    opt = optimizer(params, lr=lr, weight_decay=weight_decay)
    ema = None
    if ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=ema_decay)
    record = TrainingRecord()
    generators = list(generators)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and checkpoint_every < 1:
        raise UserValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    found = check_checkpoint(ckpt) if ckpt is not None else False
    settings = _run_settings(
        params,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        clip_grad_norm=clip_grad_norm,
        ema_decay=ema_decay,
        generators=len(generators),
        recipe=recipe,
    )
    first, done_before = 0, 0.0
    if ckpt is not None and resume and found:
        first, done_before = _load_state(ckpt, settings, params, opt, ema, generators, record)
    start = time.perf_counter()
    callback_s = 0.0  # time spent in on_checkpoint, not counted as training time

    def save(done: int) -> None:
        nonlocal callback_s
        assert ckpt is not None
        elapsed = done_before + time.perf_counter() - start - callback_s
        _save_state(ckpt, done, settings, params, opt, ema, generators, record, elapsed)
        if on_checkpoint is not None:
            t0 = time.perf_counter()
            weights: list[torch.Tensor] = list(ema.shadow_params if ema is not None else params)
            # the callback may draw random numbers: the run's own RNG stream stays untouched
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                on_checkpoint(done, weights)
            callback_s += time.perf_counter() - t0

    bar = trange(first, steps, initial=first, total=steps, desc=desc, disable=not progress)
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
        if ckpt is not None and (i + 1) % checkpoint_every == 0 and i + 1 < steps:
            save(i + 1)
    if ckpt is not None and first < steps:
        save(steps)
    if ema is not None:
        ema.copy_to(params)
    record.wall_time_s = done_before + time.perf_counter() - start - callback_s
    return record

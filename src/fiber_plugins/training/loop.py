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

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from .._utils import check_writable_folder
from ..errors import UserTypeError, UserValueError

__all__ = ["cosine_lr", "TrainingRecord", "train_loop", "check_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "fiber_plugins.train_loop/2"  # /2: the settings hold the whole recipe
_EARLIER_FORMATS = ("fiber_plugins.train_loop/1",)

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


# ---------------------------------------------------------------------- checkpoints
_STATE_JSON = "state.json"
# what a checkpoint folder may hold: state.json, the current tensor file, and the .tmp files of
# a save that was interrupted
_CHECKPOINT_FILE = re.compile(r"(state\.json|state-\d+\.safetensors)(\.tmp)?")


def check_checkpoint(folder: str | Path, *, required: bool = False) -> bool:
    """Check a ``checkpoint`` folder before anything is trained or written; returns whether it
    holds a checkpoint (its ``state.json``) to continue from.

    Refused in one line (:class:`~fiber_plugins.errors.UserValueError`): a path that is a file
    (or under one); a folder that cannot be written; a non-empty folder that holds anything but
    a :func:`train_loop` checkpoint (``state.json``, ``state-<step>.safetensors`` and the ``.tmp``
    files of an interrupted save; hidden files are ignored), so that a run folder or any other
    folder is never written into; with ``required`` (for a caller whose resume must continue a
    run, as the command line's ``--resume``), a folder with no checkpoint: nothing to resume. Whether the checkpoint
    fits the run is checked when :func:`train_loop` loads it.
    """
    path = Path(folder)
    check_writable_folder(path, "checkpoint folder")
    entries = (
        sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        if path.is_dir()
        else []
    )
    foreign = [e for e in entries if not _CHECKPOINT_FILE.fullmatch(e)]
    if foreign:
        raise UserValueError(
            f"checkpoint folder {str(path)!r} holds files that are not a training checkpoint "
            f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); give a folder of "
            "its own (new, empty, or holding only state.json and state-N.safetensors)"
        )
    found = _STATE_JSON in entries
    if required and not found:
        where = "holds no checkpoint" if path.is_dir() else "does not exist"
        raise UserValueError(
            f"checkpoint folder {str(path)!r} {where}, so there is nothing to resume; start the "
            "run without resume (--resume) to train afresh and save checkpoints there"
        )
    return found


def _name(obj: Any) -> str | None:
    """A callable's name for the recorded settings (a class, a function, a partial's class)."""
    if obj is None:
        return None
    return str(getattr(obj, "__qualname__", type(obj).__qualname__))


def _run_settings(
    params: list[torch.nn.Parameter],
    *,
    steps: int,
    lr: float,
    optimizer: Callable[..., torch.optim.Optimizer],
    weight_decay: float,
    lr_schedule: LrSchedule | None,
    clip_grad_norm: float | None,
    ema_decay: float | None,
    generators: int,
    recipe: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it, as JSON gives it back."""
    settings = {
        "steps": steps,
        "lr": lr,
        "optimizer": _name(optimizer),
        "weight_decay": weight_decay,
        "lr_schedule": _name(lr_schedule),
        "clip_grad_norm": clip_grad_norm,
        "ema_decay": ema_decay,
        "generators": generators,
        "param_shapes": [list(p.shape) for p in params],
        "recipe": dict(recipe or {}),
    }
    try:
        return cast(dict[str, Any], json.loads(json.dumps(settings, default=_json_scalar)))
    except (TypeError, ValueError) as err:
        raise UserTypeError(
            f"recipe must hold JSON values (str, int, float, bool, None, lists, dicts): {err}"
        ) from None


def _json_scalar(value: Any) -> Any:
    """numpy and torch scalars as the Python numbers they hold; anything else is refused."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise TypeError(f"a tensor of shape {tuple(value.shape)} is not a JSON value")
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not a JSON value")


_ABSENT = object()


def _show(value: Any, absent: str) -> str:
    if value is _ABSENT:
        return absent
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _setting_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``name: checkpoint A, now B`` for every setting (the loop's and the recipe's) that differs;
    a setting recorded by both with the same change is named once."""
    changes: list[str] = []
    saved_recipe, now_recipe = saved.get("recipe"), now.get("recipe")
    parts = [
        (
            {k: v for k, v in saved.items() if k != "recipe"},
            {k: v for k, v in now.items() if k != "recipe"},
        ),
        (saved_recipe if isinstance(saved_recipe, dict) else {}, now_recipe or {}),
    ]
    if not isinstance(saved_recipe, dict) and saved_recipe is not None:
        changes.append(f"recipe: checkpoint {_show(saved_recipe, '')}, now a dict")
    for old, new in parts:
        for key in [*new, *(k for k in old if k not in new)]:
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if a != b:
                line = (
                    f"{key}: checkpoint {_show(a, '(not recorded)')}, now {_show(b, '(not given)')}"
                )
                if line not in changes:
                    changes.append(line)
    return changes


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_state(
    folder: Path,
    done: int,
    settings: dict[str, Any],
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    ema: Any,
    generators: list[torch.Generator],
    record: TrainingRecord,
    elapsed: float,
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, p in enumerate(params):
        tensors[f"param.{k}"] = p.detach()
    opt_state = opt.state_dict()
    opt_values: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value
            else:
                opt_values.setdefault(str(idx), {})[key] = value
    if ema is not None:
        for k, t in enumerate(ema.shadow_params):
            tensors[f"ema.{k}"] = t
    tensors["rng.torch"] = torch.get_rng_state()
    for k, g in enumerate(generators):
        tensors[f"rng.generator.{k}"] = g.get_state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    name = f"state-{done}.safetensors"
    _write_atomic(folder / name, lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": done,
        "tensors": name,
        "settings": settings,
        "optimizer": {
            "class": type(opt).__name__,
            "param_groups": opt_state["param_groups"],
            "state_values": opt_values,
            "state_indices": sorted(int(i) for i in opt_state["state"]),
        },
        "ema_optimization_step": int(ema.optimization_step) if ema is not None else None,
        "record": record.logs,
        "wall_time_s": elapsed,
    }
    _write_atomic(folder / _STATE_JSON, lambda tmp: tmp.write_text(json.dumps(meta)))
    for old in folder.glob("state-*.safetensors"):  # only after state.json names the new one
        if old.name != name:
            old.unlink(missing_ok=True)


def _bad(
    folder: Path, why: str, fix: str = "delete the folder (or pass resume=False) to start afresh"
) -> UserValueError:
    return UserValueError(f"training checkpoint {str(folder)!r} cannot be resumed: {why}; {fix}")


def _tuples_like(value: Any, like: Any) -> Any:
    """JSON gives lists where the optimiser had tuples (betas): give them back as tuples."""
    if isinstance(like, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _load_state(
    folder: Path,
    settings: dict[str, Any],
    params: list[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    ema: Any,
    generators: list[torch.Generator],
    record: TrainingRecord,
) -> tuple[int, float]:
    """Restore everything :func:`_save_state` wrote; returns (steps done, seconds spent)."""
    from ..weights import read_safetensors

    try:
        meta = json.loads((folder / _STATE_JSON).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(folder, f"{_STATE_JSON} is not valid JSON ({err})") from None
    if isinstance(meta, dict) and meta.get("format") in _EARLIER_FORMATS:
        raise _bad(
            folder,
            f"it was written by an earlier fiber-plugins ({meta['format']}) that did not record "
            "the run's recipe, so a resume cannot be checked against it",
            "give another checkpoint folder (or delete this one) to start afresh",
        )
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise _bad(folder, f"{_STATE_JSON} is not a train_loop checkpoint ({CHECKPOINT_FORMAT})")
    try:
        done, saved, name = int(meta["step"]), meta["settings"], str(meta["tensors"])
        opt_meta, logs = meta["optimizer"], meta["record"]
        ema_step, elapsed = meta["ema_optimization_step"], float(meta["wall_time_s"])
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(folder, f"{_STATE_JSON} lacks or garbles {err}") from None
    if not isinstance(saved, dict):
        raise _bad(folder, f"{_STATE_JSON} is garbled (settings {_show(saved, '')})")
    if saved != settings:
        raise _bad(
            folder,
            f"it is from a run with other settings ({'; '.join(_setting_changes(saved, settings))})",
            "resume with the checkpoint's settings, or give another checkpoint folder (or delete "
            "this one) to start afresh",
        )
    if not 0 <= done <= settings["steps"] or "/" in name or "\\" in name:
        raise _bad(folder, f"{_STATE_JSON} is garbled (step {done}, tensors {name!r})")
    if not (folder / name).is_file():
        raise _bad(folder, f"its tensor file {name!r} is missing")
    tensors = read_safetensors(folder / name, what="training checkpoint")
    try:
        with torch.no_grad():
            for k, p in enumerate(params):
                p.copy_(_tensor(tensors, f"param.{k}", p.shape))
            if ema is not None:
                for k, t in enumerate(ema.shadow_params):
                    t.copy_(_tensor(tensors, f"ema.{k}", t.shape))
                ema.optimization_step = int(ema_step)
        fresh = opt.state_dict()
        if opt_meta.get("class") != type(opt).__name__:
            raise ValueError(f"optimizer {opt_meta.get('class')}, not {type(opt).__name__}")
        groups = [
            {k: _tuples_like(v, like.get(k)) for k, v in group.items()}
            for group, like in zip(opt_meta["param_groups"], fresh["param_groups"])
        ]
        state: dict[int, dict[str, Any]] = {}
        for idx in opt_meta["state_indices"]:
            entry = dict(opt_meta["state_values"].get(str(idx), {}))
            prefix = f"opt.{idx}."
            entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            state[int(idx)] = entry
        opt.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(_tensor(tensors, "rng.torch", None))
        for k, g in enumerate(generators):
            g.set_state(_tensor(tensors, f"rng.generator.{k}", None))
        record.logs = {str(k): [float(x) for x in v] for k, v in dict(logs).items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _bad(folder, f"its state does not fit this run ({why[:200]})") from None
    return done, elapsed


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape) -> torch.Tensor:
    if key not in tensors:
        raise KeyError(f"tensor {key!r} is missing")
    t = tensors[key]
    if shape is not None and t.shape != shape:
        raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t

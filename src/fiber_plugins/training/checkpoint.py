"""The training loop's checkpoint (:func:`~fiber_plugins.training.train_loop`, ``checkpoint=``):
the folder check, the run's settings that a resume must share, and saving and restoring the whole
state (parameters, optimiser, EMA, step, record, RNGs) as ``state-<step>.safetensors`` +
``state.json``, nothing pickled."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .._utils import check_writable_folder
from ..errors import UserTypeError, UserValueError

if TYPE_CHECKING:
    from .loop import TrainingRecord

CHECKPOINT_FORMAT = "fiber_plugins.train_loop/2"  # /2: the settings hold the whole recipe
_EARLIER_FORMATS = ("fiber_plugins.train_loop/1",)


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
    lr_schedule: Callable[[int, int, float], float] | None,
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

"""`open_clip_subject`: an OpenCLIP model built offline from a built-in architecture name or a
downloaded folder, with local weights read by the package's safe loader (open_clip's own
tensor fixes applied), and the eval transform OpenCLIP builds for it as a Preprocess."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._utils import require, suggest, warn
from ...errors import MissingFileError, UserTypeError, UserValueError
from ...objectives.preprocess import Preprocess
from ...weights import load_state, read_state_dict
from .._common import _first_line, hub_offline
from .preprocessing import preprocess_from_transform

CONFIG_FILE = "open_clip_config.json"
# the weights files a downloaded OpenCLIP folder holds, in open_clip's order of preference
WEIGHTS_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


def _open_clip() -> Any:
    return require("open_clip")


def _eval_preprocess(model: nn.Module) -> Preprocess:
    """The eval transform OpenCLIP builds for ``model`` (its ``preprocess_cfg``) as a
    Preprocess."""
    oc = _open_clip()
    cfg = oc.get_model_preprocess_cfg(model)
    transform = oc.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
        fill_color=cfg.get("fill_color", 0),
    )
    return preprocess_from_transform(transform)


def _check_text_tower(cfg: Mapping, arch: str) -> None:
    """A Hugging Face text tower (BiomedCLIP's BERT) needs its config.json, which open_clip reads
    through the Hub: refuse in one line when it is neither a folder nor in the local cache."""
    name = (cfg.get("text_cfg") or {}).get("hf_model_name")
    if not name or Path(name).expanduser().is_dir():
        return
    from .._common import _transformers

    tf = _transformers()
    try:
        with hub_offline():
            tf.AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        raise UserValueError(
            f"OpenCLIP model {arch!r} has a Hugging Face text tower {name!r} whose config.json "
            f"is not in the local Hugging Face cache (fiber-plugins never downloads); fetch it "
            f"once with `huggingface-cli download {name} config.json`"
        ) from None


def _folder_weights(folder: Path) -> Path | None:
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def _resolve_arch(oc: Any, arch: str) -> tuple[str, dict, Path | None]:
    """(model name for open_clip, model config, folder or None) of a built-in name or a folder
    holding ``open_clip_config.json``."""
    if arch.startswith("hf-hub:"):
        repo = arch[len("hf-hub:") :]
        tail = repo.rstrip("/").split("/")[-1]
        raise UserValueError(
            f"OpenCLIP model {arch!r} would be downloaded from the Hub (fiber-plugins never "
            f"downloads); fetch it once with `huggingface-cli download {repo} --local-dir "
            f"./{tail}` and use the folder ./{tail}"
        )
    if arch.startswith("local-dir:"):
        arch = arch[len("local-dir:") :]
    path = Path(arch).expanduser()
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise UserValueError(
                f"OpenCLIP folder {arch!r} has no {CONFIG_FILE}; give a folder downloaded from "
                "the Hub (open_clip_config.json + weights) or a built-in architecture name"
            )
        try:
            cfg = json.loads(config_file.read_text())["model_cfg"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserValueError(
                f"{str(config_file)!r} is not an OpenCLIP config with a 'model_cfg' "
                f"({_first_line(err)[:80]})"
            ) from None
        return f"local-dir:{path}", cfg, path
    if path.is_file():
        raise UserValueError(
            f"OpenCLIP model {arch!r} is a file; give an architecture name with the weights "
            "file as weights= (CLI: --weights), or a folder with open_clip_config.json"
        )
    names = oc.list_models()
    if arch not in names:
        if arch.startswith((".", "/", "~")) or "/" in arch:
            raise MissingFileError(f"OpenCLIP folder {arch!r} does not exist")
        raise UserValueError(
            f"unknown OpenCLIP architecture {arch!r}{suggest(arch, names)}; or give a folder "
            f"with {CONFIG_FILE}"
        )
    return arch, oc.get_model_config(arch), None


def _load_open_clip_weights(model: nn.Module, weights: str | Path | Mapping) -> None:
    """Strict load of a state dict read by the package's safe loader, after open_clip's own
    tensor-only fixes: a DataParallel ``module.`` prefix, a scalar vs 1-d ``logit_scale`` /
    ``logit_bias``, and the ``position_ids`` buffer newer transformers text towers no longer
    keep."""
    if isinstance(weights, Mapping):
        state, source = dict(weights), "the given state dict"
    elif isinstance(weights, (str, Path)):
        state, source = read_state_dict(weights), f"weights {str(weights)!r}"
    else:
        raise UserTypeError(
            f"weights must be a file path or a state dict, got {type(weights).__name__}"
        )
    if state and all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and key in own and value.dim() != own[key].dim():
            state[key] = value.reshape(own[key].shape)
    key = "text.transformer.embeddings.position_ids"
    if key in state and key not in own:
        del state[key]
    load_state(model, state, source)


def open_clip_subject(
    arch: str | Path, weights: str | Path | Mapping | None = None
) -> tuple[nn.Module, Preprocess]:
    """An OpenCLIP model built offline, with local weights, and its eval preprocessing.

    Parameters
    ----------
    arch:
        A built-in architecture name (``open_clip.list_models()``: ``"ViT-B-32"``,
        ``"ViT-L-14"``, ...) or a folder holding ``open_clip_config.json`` and the weights, as
        ``huggingface-cli download ORG/NAME --local-dir FOLDER`` writes it (BiomedCLIP,
        LAION models on the Hub).
    weights:
        A local weights file (``.safetensors``, or a torch state dict ``.pt`` / ``.pth`` /
        ``.bin`` read with ``weights_only=True``) or a state dict, loaded strictly; default:
        the folder's ``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``. A
        built-in name without weights gives a randomly initialised model (with a warning).

    Returns
    -------
    (model, preprocess)
        The model (``CLIP`` / ``CustomTextCLIP``) in eval mode and its eval transform as a
        :class:`Preprocess` (:func:`preprocess_from_transform`).

    Raises
    ------
    UserValueError
        An unknown architecture (with the closest names), a Hub id (``hf-hub:``), a folder
        without ``open_clip_config.json`` or weights, weights of another model or format.
    MissingFileError
        A folder or weights file that does not exist.
    """
    oc = _open_clip()
    if not isinstance(arch, (str, Path)):
        raise UserTypeError(f"arch must be a name or a folder, got {type(arch).__name__}")
    name, cfg, folder = _resolve_arch(oc, str(arch))
    if weights is None and folder is not None:
        weights = _folder_weights(folder)
        if weights is None:
            raise UserValueError(
                f"OpenCLIP folder {str(arch)!r} holds no weights file (one of "
                f"{', '.join(WEIGHTS_FILES[:3])}); pass the weights file as weights= "
                "(CLI: --weights)"
            )
    _check_text_tower(cfg, str(arch))
    try:
        with hub_offline():
            model, _, transform = oc.create_model_and_transforms(
                name,
                pretrained=None,
                load_weights=False,
                pretrained_image=False,
                pretrained_text=False,
            )
    except (OSError, ValueError, RuntimeError) as err:
        raise UserValueError(
            f"open_clip cannot build {str(arch)!r} offline ({_first_line(err)[:160]})"
        ) from None
    model.eval()
    if weights is not None:
        _load_open_clip_weights(model, weights)
    else:
        warn(
            f"OpenCLIP model {str(arch)!r} has no weights: it is randomly initialised; pass a "
            "local weights file (weights=, CLI: --weights)"
        )
    return model, preprocess_from_transform(transform)

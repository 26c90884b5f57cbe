"""Subject-model strings for the CLI: ``timm:NAME``, ``module:pkg.mod:factory``, ``zoo:NAME``."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..objectives.preprocess import Preprocess

SUBJECT_FORMS = ("timm:NAME", "module:pkg.mod:factory", "zoo:NAME")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state dict (safetensors, or a torch file read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights {str(path)!r} do not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return model


def load_subject(spec: str, weights: str | None = None) -> tuple[nn.Module, Preprocess | None]:
    """Return (model in eval mode, its preprocessing or None for the default)."""
    kind, _, rest = spec.partition(":")
    if kind == "timm" and rest:
        from .._utils import require

        timm = require("timm")
        if rest not in timm.list_models() and rest not in timm.list_models(pretrained=True):
            from .._utils import suggest

            raise ValueError(f"unknown timm model {rest!r}{suggest(rest, timm.list_models())}")
        # pretrained=False: weights come from --weights, never from the network at run time
        model = timm.create_model(rest, pretrained=False)
        if weights:
            load_weights(model, weights)
        return model.eval(), Preprocess.from_timm(model)
    if kind == "module" and rest:
        mod_name, _, attr = rest.rpartition(":")
        if not mod_name or not attr:
            raise ValueError(f"subject {spec!r} must look like 'module:pkg.mod:factory'")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as err:
            raise ValueError(f"cannot import {mod_name!r} for subject {spec!r} ({err})") from None
        factory = getattr(mod, attr, None)
        if factory is None:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        pre = None
        if isinstance(obj, tuple):
            obj, pre = obj
        if not isinstance(obj, nn.Module):
            raise TypeError(f"{spec!r} returned {type(obj).__name__}, expected an nn.Module")
        if isinstance(pre, dict):
            pre = Preprocess(**pre)
        if weights:
            load_weights(obj, weights)
        return obj.eval(), pre
    if kind == "zoo" and rest:
        from .. import zoo

        return zoo.load(rest), None
    raise ValueError(f"unknown subject {spec!r}; valid forms: {', '.join(SUBJECT_FORMS)}")

"""Subject-model strings for the CLI: ``timm:NAME``, ``module:pkg.mod:factory``, ``zoo:NAME``,
``hf:FOLDER`` (a Hugging Face transformers vision model) and ``open_clip:ARCH`` (an OpenCLIP
architecture name or a folder with ``open_clip_config.json``); see docs/subjects.md."""

from __future__ import annotations

import importlib

from torch import nn

from ..errors import UserTypeError, UserValueError
from ..objectives.preprocess import Preprocess
from ..weights import load_weights

SUBJECT_FORMS = (
    "timm:NAME",
    "module:pkg.mod:factory",
    "zoo:NAME",
    "hf:FOLDER",
    "open_clip:ARCH|FOLDER",
)

__all__ = ["SUBJECT_FORMS", "load_subject", "load_weights"]


def load_subject(spec: str, weights: str | None = None) -> tuple[nn.Module, Preprocess | None]:
    """Return (model in eval mode, its preprocessing or None for the default).

    ``weights`` is a local weights file read by :func:`fiber_plugins.weights.load_weights`
    (safetensors, or a torch state dict read with ``weights_only=True``); ``zoo:`` models and
    ``hf:`` folders carry their own weights and refuse it. ``hf:FOLDER`` loads a transformers
    vision model with :func:`fiber_plugins.adapters.hf.hf_subject` (its image processor gives the
    preprocessing); ``open_clip:ARCH`` builds an OpenCLIP model with
    :func:`fiber_plugins.adapters.open_clip.open_clip_subject` (its eval transform gives the
    preprocessing). Nothing is downloaded.
    """
    kind, _, rest = spec.partition(":")
    if kind == "timm" and rest:
        from .._utils import require

        timm = require("timm")
        if rest not in timm.list_models() and rest not in timm.list_models(pretrained=True):
            from .._utils import suggest

            raise UserValueError(f"unknown timm model {rest!r}{suggest(rest, timm.list_models())}")
        # pretrained=False: weights come from --weights, never from the network at run time
        model = timm.create_model(rest, pretrained=False)
        if weights:
            load_weights(model, weights)
        else:
            from .._utils import warn

            warn(
                f"timm model {rest!r} has no weights: it is randomly initialised; pass a local "
                "weights file (--weights)"
            )
        return model.eval(), Preprocess.from_timm(model)
    if kind == "module" and rest:
        mod_name, _, attr = rest.rpartition(":")
        if not mod_name or not attr:
            raise UserValueError(f"subject {spec!r} must look like 'module:pkg.mod:factory'")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as err:
            raise UserValueError(
                f"cannot import {mod_name!r} for subject {spec!r} ({err})"
            ) from None
        factory = getattr(mod, attr, None)
        if factory is None:
            raise UserValueError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        pre = None
        if isinstance(obj, tuple):
            obj, pre = obj
        if not isinstance(obj, nn.Module):
            raise UserTypeError(f"{spec!r} returned {type(obj).__name__}, expected an nn.Module")
        if isinstance(pre, dict):
            pre = Preprocess(**pre)
        if weights:
            load_weights(obj, weights)
        return obj.eval(), pre
    if kind == "zoo" and rest:
        from .. import zoo

        if weights:
            raise UserValueError(
                f"subject {spec!r} with --weights {weights!r}: zoo models carry their own "
                "weights; drop --weights (or use module:pkg.mod:factory for other weights)"
            )
        return zoo.load(rest), None
    if kind == "hf" and rest:
        from ..adapters.hf import hf_subject

        if weights:
            raise UserValueError(
                f"subject {spec!r} with --weights {weights!r}: a Hugging Face folder carries its "
                "own weights (model.safetensors); drop --weights"
            )
        hf_model, hf_pre = hf_subject(rest)
        return hf_model, hf_pre
    if kind == "open_clip" and rest:
        from ..adapters.open_clip import open_clip_subject

        oc_model, oc_pre = open_clip_subject(rest, weights)
        return oc_model, oc_pre
    raise UserValueError(f"unknown subject {spec!r}; valid forms: {', '.join(SUBJECT_FORMS)}")

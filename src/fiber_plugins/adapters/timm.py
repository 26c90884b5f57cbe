"""timm adapter: subjects from ``timm.create_model`` and objectives from timm's model interface.

Every timm model offers the same calls; each is one ``kind`` of objective:

- ``"logits"``: ``model(x)``;
- ``"embedding"``: ``model.forward_head(model.forward_features(x), pre_logits=True)``;
- ``"features"``: ``model.forward_features(x)``, reduced over tokens (ViTs) or space (CNNs);
- ``"intermediate"``: ``model.forward_intermediates(x, indices=[layer_index],
  intermediates_only=True)[0]``.

Preprocessing (input size, interpolation, mean/std) comes from timm's ``resolve_data_config``.
timm is imported lazily (``pip install 'fiber-plugins[timm]'``); weights are never downloaded:
models are built with ``pretrained=False`` and local weights are loaded with the package's one
policy (:func:`fiber_plugins.weights.load_weights`: safetensors, or a torch state dict read with
``weights_only=True``).

Examples
--------
>>> model, preprocess = timm_subject("resnet50", weights="resnet50.safetensors")  # doctest: +SKIP
>>> obj = timm_objective(model, "embedding")
>>> obj = timm_objective(model, "intermediate", layer_index=3, index=42, reduction="spatial_mean")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._utils import require, suggest
from ..errors import UserIndexError, UserTypeError, UserValueError
from ..objectives.base import FiberObjective
from ..objectives.preprocess import Preprocess
from ..objectives.selection import Index
from ..weights import load_weights

__all__ = ["KINDS", "timm_subject", "timm_preprocess", "timm_objective"]

KINDS = ("logits", "embedding", "features", "intermediate")

_NEEDS = {
    "embedding": ("forward_features", "forward_head"),
    "features": ("forward_features",),
    "intermediate": ("forward_intermediates",),
}


# ---------------------------------------------------------------------------- subjects
def timm_subject(
    name_or_model: str | nn.Module, weights: str | Path | Mapping | None = None, **create_kwargs
) -> tuple[nn.Module, Preprocess]:
    """A timm model and the :class:`Preprocess` it expects.

    Parameters
    ----------
    name_or_model:
        A timm model name (built with ``timm.create_model(name, pretrained=False,
        **create_kwargs)`` and put in eval mode) or an existing model (left as it is).
    weights:
        Optional local weights, loaded strictly: a ``.safetensors`` file, a torch state dict file
        (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``, read with ``weights_only=True``) or a state
        dict; see :func:`fiber_plugins.weights.load_weights`.
    create_kwargs:
        Passed to ``create_model`` (``num_classes``, ``img_size``, ...); only with a name.

    Returns
    -------
    (model, preprocess)
    """
    timm = require("timm")
    if isinstance(name_or_model, str):
        if not timm.is_model(name_or_model):
            raise UserValueError(
                f"unknown timm model {name_or_model!r}{suggest(name_or_model, timm.list_models())}"
            )
        model = timm.create_model(name_or_model, pretrained=False, **create_kwargs)
        model.eval()
    elif isinstance(name_or_model, nn.Module):
        if create_kwargs:
            raise UserTypeError(
                f"create_model arguments {sorted(create_kwargs)} need a model name, not a model"
            )
        model = name_or_model
    else:
        raise UserTypeError(
            f"name_or_model must be a timm model name or an nn.Module, "
            f"got {type(name_or_model).__name__}"
        )
    if weights is not None:
        load_weights(model, weights)
    return model, timm_preprocess(model)


def timm_preprocess(model: nn.Module) -> Preprocess:
    """``Preprocess.from_timm(model)``: size, interpolation and mean/std the model expects (a ViT
    built with another ``img_size`` gets the size it was built for)."""
    return Preprocess.from_timm(model)


# ---------------------------------------------------------------------------- phi wrappers
# Each wrapper holds the model as a submodule, so FiberObjective.attached() saves and restores
# the model's train/eval and requires_grad flags.
class _Wrapper(nn.Module):
    _fiber_wrapper = True  # its train flag is not the user's (see FiberObjective.attached)
    model: Any  # a timm model: forward_features / forward_head / forward_intermediates

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # only the wrapper's own flag; the model is untouched


class _Embedding(_Wrapper):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class _Features(_Wrapper):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        if f.dim() == 4 and str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC":
            f = f.permute(0, 3, 1, 2)  # Swin-style maps: channels first, like the CNNs
        return f


class _Intermediate(_Wrapper):
    def __init__(self, model: nn.Module, layer_index: int):
        super().__init__(model)
        self.layer_index = layer_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.model.forward_intermediates(
                x, indices=[self.layer_index], intermediates_only=True, stop_early=True
            )
        except AssertionError as err:  # timm's own range check, when feature_info was missing
            if "out of range" in str(err):
                raise UserIndexError(f"layer_index {self.layer_index}: {err}") from None
            raise
        return out[0]


def _num_blocks(model: nn.Module) -> int | None:
    info = getattr(model, "feature_info", None)
    try:
        return len(info) if info is not None else None
    except TypeError:
        return None


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _feature_reduction(model: nn.Module) -> str:
    """'cls' / 'token_mean' for token models (timm ViTs have ``num_prefix_tokens``), else 'auto'."""
    if getattr(model, "num_prefix_tokens", None) is not None:
        has_cls = getattr(model, "cls_token", None) is not None
        return (
            "cls" if has_cls and getattr(model, "global_pool", "token") == "token" else "token_mean"
        )
    return "auto"  # spatial mean of (B, C, H, W) maps, other shapes unchanged


# ---------------------------------------------------------------------------- the objective
def timm_objective(
    model: nn.Module | str,
    kind: str = "logits",
    index: Index = None,
    reduction: str | None = None,
    layer_index: int | None = None,
    preprocess: Preprocess | dict | None = None,
    distance: str | Callable = "l2",
    name: str | None = None,
) -> FiberObjective:
    """A fiber objective from timm's uniform model interface.

    Parameters
    ----------
    model:
        A timm model, or a timm model name (built by :func:`timm_subject`).
    kind:
        'logits', 'embedding', 'features' or 'intermediate' (see the module docstring).
    index:
        Selection after the reduction (channels / classes / embedding dimensions), as in
        :class:`FiberObjective`.
    reduction:
        Default ``None``: 'none' for logits, embeddings and intermediates (the tensor timm
        returns: (B, C, H, W) maps for intermediates, ViT tokens reshaped to maps by timm);
        for features 'cls' (ViTs with a class token and token pooling) or 'token_mean' (other
        ViTs; all tokens, prefix tokens included) and 'spatial_mean' for CNN maps.
    layer_index:
        Which ``forward_intermediates`` output (block / stage) for kind='intermediate';
        negative values count from the end, as in timm.
    preprocess:
        Default: timm's data config (:func:`timm_preprocess`).
    distance:
        'l2' (default), 'l1', 'cosine', 'kl' or a callable.
    name:
        Label for logs and reports (default ``"<architecture>:<kind>"``).

    Raises
    ------
    ValueError
        Unknown ``kind`` (the choices are listed), or ``layer_index`` missing / misplaced.
    IndexError
        ``layer_index`` outside the model's blocks (the message gives their number).
    TypeError
        A model without the timm method the kind needs.
    """
    if isinstance(model, str):
        model = timm_subject(model)[0]
    if not isinstance(model, nn.Module):
        raise UserTypeError(f"model must be a timm model or name, got {type(model).__name__}")
    if kind not in KINDS:
        raise UserValueError(f"unknown kind {kind!r}; choose one of {list(KINDS)}")
    for method in _NEEDS.get(kind, ()):
        if not callable(getattr(model, method, None)):
            raise UserTypeError(
                f"kind={kind!r} needs {method}(), a method of every timm model; "
                f"{type(model).__name__} has none (use kind='logits' or a FiberObjective)"
            )
    if kind == "intermediate":
        if layer_index is None:
            raise UserValueError("kind='intermediate' needs layer_index= (a block index)")
        if isinstance(layer_index, bool) or not isinstance(layer_index, int):
            raise UserTypeError(f"layer_index must be an int, got {layer_index!r}")
    elif layer_index is not None:
        raise UserValueError(f"layer_index is only used with kind='intermediate', not {kind!r}")

    label = f"{_model_name(model)}:{kind}"
    if kind == "logits":
        subject: nn.Module = model
        default = "none"
    elif kind == "embedding":
        subject, default = _Embedding(model), "none"
    elif kind == "features":
        subject, default = _Features(model), _feature_reduction(model)
    else:
        assert layer_index is not None  # checked above for kind='intermediate'
        num = _num_blocks(model)
        if num is not None and not -num <= layer_index < num:
            raise UserIndexError(
                f"layer_index {layer_index} is out of range for {_model_name(model)}, which has "
                f"{num} blocks in forward_intermediates (valid: 0..{num - 1} or {-num}..-1)"
            )
        subject, default = _Intermediate(model, layer_index), "none"
        label += f"[{layer_index}]"
    if index is not None and not callable(index):
        label += f"[{index}]"
    return FiberObjective(
        subject,
        index=index,
        reduction=default if reduction is None else reduction,
        distance=distance,
        preprocess=timm_preprocess(model) if preprocess is None else preprocess,
        name=name or label,
    )

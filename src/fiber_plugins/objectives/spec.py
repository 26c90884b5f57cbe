"""Target strings shared by the CLI and Python: ``logits``, ``logits:281``, ``layer:layer4.1``,
``layer:layer4:1656``, ``embedding``."""

from __future__ import annotations

from torch import nn

from .base import FiberObjective
from .preprocess import Preprocess

TARGET_FORMS = ("logits", "logits:INDEX", "layer:NAME", "layer:NAME:CHANNEL", "embedding")


def _int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} in target {spec!r} must be an integer, got {text!r}") from None


def objective_from_spec(
    model: nn.Module,
    spec: str,
    preprocess: Preprocess | None = None,
    distance: str = "l2",
) -> FiberObjective:
    """Build a :class:`FiberObjective` from a target string.

    ``logits`` (the model output), ``logits:281`` (one output), ``layer:NAME`` (a layer's whole
    output), ``layer:NAME:CHANNEL`` (one channel, spatially averaged for conv maps),
    ``embedding`` (timm-style ``forward_head(..., pre_logits=True)``).
    """
    kind, _, rest = spec.partition(":")
    if kind == "logits":
        index = _int(rest, "the logit index", spec) if rest else None
        return FiberObjective(
            model, index=index, preprocess=preprocess, distance=distance, name=spec
        )
    if kind == "layer":
        if not rest:
            raise ValueError(f"target {spec!r} needs a layer name, e.g. 'layer:layer4.1'")
        name, _, ch = rest.partition(":")
        index = _int(ch, "the channel", spec) if ch else None
        return FiberObjective(
            model,
            layer=name,
            index=index,
            reduction="auto" if index is not None else "none",
            preprocess=preprocess,
            distance=distance,
            name=spec,
        )
    if kind == "embedding" and not rest:
        if not (hasattr(model, "forward_head") and hasattr(model, "forward_features")):
            raise ValueError(
                f"target 'embedding' needs a timm-style model with forward_features/forward_head; "
                f"{type(model).__name__} has none: use 'layer:NAME' instead"
            )
        from ..adapters.timm import _Embedding  # a wrapper only; timm itself is not imported

        return FiberObjective(
            _Embedding(model), preprocess=preprocess, distance=distance, name=spec
        )
    raise ValueError(f"unknown target {spec!r}; valid forms: {', '.join(TARGET_FORMS)}")

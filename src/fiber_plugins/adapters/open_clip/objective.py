"""`open_clip_objective` and `open_clip_outputs`: an OpenCLIP model's image embedding
(``encode_image``, normalised or not) or a vision-tower layer's output as phi, with the token
reductions and index selection of the hf adapter's `OutputObjective`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..._utils import frozen, module_device, suggest
from ...errors import UserKeyError, UserTypeError, UserValueError
from ...objectives.distances import Distance
from ...objectives.preprocess import Preprocess, as_preprocess
from ...objectives.selection import Index
from .._common import _label, _Wrapper
from ..hf.objective import OutputObjective, check_output_token
from ..lens import Token, list_hook_points
from .loading import _eval_preprocess

OUTPUTS = ("image_embedding",)


def is_open_clip_model(model: object) -> bool:
    """Whether ``model`` is an OpenCLIP model (a class defined in open_clip with
    ``encode_image``); open_clip itself is not imported."""
    return (
        isinstance(model, nn.Module)
        and callable(getattr(model, "encode_image", None))
        and any(c.__module__.startswith("open_clip.") for c in type(model).__mro__)
    )


class _EncodeImage(_Wrapper):
    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__(model)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x, normalize=self.normalize)


def _visual(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, nn.Module):
        raise UserTypeError(f"{type(model).__name__} has no vision tower (model.visual)")
    return visual


def _visual_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {f"visual.{n}": m for n, m in _visual(model).named_modules() if n}


def open_clip_outputs(
    model: nn.Module, input_shape: Sequence[int] | None = None
) -> list[tuple[str, tuple[int, ...]]]:
    """``image_embedding`` and every vision-tower layer that runs, with their shapes.

    Runs ``encode_image`` once on zeros (eval mode, no gradients; flags restored after).

    Parameters
    ----------
    model:
        An OpenCLIP model.
    input_shape:
        (1, C, H, W) of the probe input; default (1, 3, S, S) with S the model's image size.

    Returns
    -------
    list of (name, shape)
        ``("image_embedding", (1, E))`` first, then ``visual.*`` layer names in the order they
        run (shapes of the layer outputs, the first element of a tuple output).
    """
    if not is_open_clip_model(model):
        raise UserTypeError(f"{type(model).__name__} is not an OpenCLIP model")
    if input_shape is None:
        size = getattr(_visual(model), "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        input_shape = (1, 3, h, w)
    shape = tuple(int(v) for v in input_shape)
    device = module_device(model)
    encode: Any = model.encode_image
    with frozen(model, requires_grad=None), torch.no_grad():
        embedding = encode(torch.zeros(shape, device=device))
    layers = list_hook_points(_visual(model), shape, device=device)
    return [("image_embedding", tuple(embedding.shape))] + [(f"visual.{n}", s) for n, s in layers]


def open_clip_objective(
    model: nn.Module,
    output: str = "image_embedding",
    normalize: bool = False,
    layer: str | None = None,
    token: Token | None = None,
    index: Index = None,
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> OutputObjective:
    """Fiber objective on an OpenCLIP model's image embedding or a vision-tower layer.

    Parameters
    ----------
    model:
        An OpenCLIP model (``CLIP`` / ``CustomTextCLIP``), e.g. from :func:`open_clip_subject`.
    output:
        ``"image_embedding"``: ``model.encode_image(x, normalize=normalize)`` (B, E). A layer
        name given here (anything other than ``image_embedding``) is read as ``layer=``.
    normalize:
        L2-normalise the embedding, as CLIP does before its similarity (only for the
        embedding).
    layer:
        A module name of the vision tower, e.g. ``"visual.transformer.resblocks.3"``
        (:func:`open_clip_outputs` lists them); its output is recorded with a hook and the
        rest of the model is skipped.
    token:
        For (B, tokens, D) layer outputs: ``'cls'`` (position 0), ``'mean'``, ``'max'``, an
        int position or ``'all'``; default ``'cls'`` when the tower has a class token, else
        ``'mean'``. Refused for the embedding.
    index:
        Selection after the token reduction (embedding dimensions, channels).
    preprocess:
        Default: the model's eval transform (its ``preprocess_cfg``) as a Preprocess.
    distance:
        'l2' (default), 'l1', 'cosine', 'kl' or a callable.
    name:
        Label for logs and reports.

    Returns
    -------
    OutputObjective
        Features (B, K) equal to ``model.encode_image(preprocess(images))`` (or the layer's
        output, reduced and selected).

    Raises
    ------
    UserKeyError
        An unknown output or layer name (with the closest names).
    UserValueError
        ``normalize`` with a layer, a token for the embedding.
    """
    if not is_open_clip_model(model):
        raise UserTypeError(
            f"model must be an OpenCLIP model, got {type(model).__name__}; use "
            "FiberObjective(model, ...) for other modules"
        )
    if not isinstance(output, str) or (layer is not None and not isinstance(layer, str)):
        raise UserTypeError("output and layer must be names (strings)")
    if layer is None and output not in OUTPUTS:
        layer = output
    pre = _eval_preprocess(model) if preprocess is None else as_preprocess(preprocess)
    subject = _EncodeImage(model, normalize=bool(normalize))
    if layer is None:
        if token is not None and token != "all":
            raise UserValueError(
                f"token={token!r} applies to layer outputs (B, tokens, D); {output!r} is (B, E): "
                "leave token unset"
            )
        return OutputObjective(
            subject,
            output,
            token=token,
            index=index,
            preprocess=pre,
            distance=distance,
            name=name or _label(model, output + (":normalized" if normalize else ""), token, index),
            adapter="open_clip",
        )
    if normalize:
        raise UserValueError("normalize=True applies to the image embedding, not to a layer")
    layers = _visual_layers(model)
    if layer not in layers:
        raise UserKeyError(
            f"unknown output {layer!r} of {type(model).__name__}; valid: 'image_embedding' or a "
            f"layer of the vision tower{suggest(layer, list(layers))}"
        )
    default = check_output_token(_visual(model), layer, None, token)
    return OutputObjective(
        subject,
        layer,
        token=token,
        index=index,
        preprocess=pre,
        distance=distance,
        name=name or _label(model, layer, token, index),
        default_token=default,
        layer=layers[layer],
        adapter="open_clip",
    )

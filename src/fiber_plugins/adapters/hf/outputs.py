"""The named outputs of a transformers vision model: running it on ``pixel_values`` with named
results, the encoder layers whose hooks give ``hidden_states.N``, and `hf_outputs`, which lists
every output with its shape."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..._utils import frozen, module_device
from ...errors import UserTypeError, UserValueError
from .loading import is_hf_model

_HIDDEN = re.compile(r"^hidden_states\.(-?\d+)$")


def _probe_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(v) for v in input_shape)
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", config)
    size = getattr(config, "image_size", None) or 224
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return (1, int(getattr(config, "num_channels", 3) or 3), h, w)


def _run(model: nn.Module, x: torch.Tensor) -> Any:
    out = model(pixel_values=x)
    if isinstance(out, tuple):
        raise UserValueError(
            f"{type(model).__name__} returned a tuple; load it with return_dict=True (the "
            "default) so that outputs have names"
        )
    return out


def hidden_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers whose inputs and outputs are the model's ``hidden_states``.

    ``hidden_states[0]`` is the first positional input of layer 0 and ``hidden_states[i]`` the
    output of layer i - 1 (its first element when it is a tuple), as transformers records
    them. The layers are the one ``nn.ModuleList`` named ``layer`` / ``layers`` with
    ``config.num_hidden_layers`` entries; an empty list when the model has no such list (then
    ``hidden_states.N`` is not offered).

    The objective reads them with its own hooks (removed after each use) rather than with
    ``output_hidden_states=True``, which makes transformers 5 install hooks on the model that
    stay there.
    """
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(
        getattr(config, "vision_config", None), "num_hidden_layers", None
    )
    found = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and name.rsplit(".", 1)[-1] in ("layer", "layers")
        and len(m) == count
    ]
    return list(found[0]) if len(found) == 1 else []


def hf_outputs(
    model: nn.Module, input_shape: Sequence[int] | None = None
) -> list[tuple[str, tuple[int, ...]]]:
    """The named outputs of a transformers vision model with their shapes.

    Runs the model once on zeros, without gradients and in eval mode (the train/eval flags are
    restored after); the hidden states are recorded with hooks on :func:`hidden_layers`,
    removed in ``finally``.

    Parameters
    ----------
    model:
        A transformers vision model (it takes ``pixel_values``).
    input_shape:
        (1, C, H, W) of the probe input; default: the config's ``image_size`` and
        ``num_channels``.

    Returns
    -------
    list of (name, shape)
        Every tensor the model returns (``last_hidden_state``, ``pooler_output``,
        ``image_embeds``, ``logits``, ...) in the model's order, then ``hidden_states.0`` ..
        ``hidden_states.L`` (the input of the first encoder layer, then each layer's output);
        shapes include the batch.
    """
    if not is_hf_model(model):
        raise UserTypeError(f"{type(model).__name__} is not a transformers model")
    shape = _probe_shape(model, input_shape)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(shape, dtype=dtype, device=module_device(model))
    layers = hidden_layers(model)
    hidden: list[tuple[int, ...]] = []

    def record(module, args, output):
        if not hidden and args:
            hidden.append(tuple(args[0].shape))
        value = output[0] if isinstance(output, (tuple, list)) else output
        hidden.append(tuple(value.shape))

    handles = []
    try:
        with frozen(model, requires_grad=None), torch.no_grad():
            handles = [layer.register_forward_hook(record) for layer in layers]
            out = _run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    names = [
        (key, tuple(value.shape))
        for key, value in out.items()
        if key != "loss" and isinstance(value, torch.Tensor)
    ]
    if len(hidden) == len(layers) + 1:  # every layer ran once
        names += [(f"hidden_states.{i}", s) for i, s in enumerate(hidden)]
    return names


def _choices(names: Sequence[str]) -> str:
    """Output names for a message, with the hidden states as one range."""
    hidden = [n for n in names if _HIDDEN.match(n)]
    shown = [n for n in names if not _HIDDEN.match(n)]
    if hidden:
        shown.append(f"hidden_states.0..{len(hidden) - 1}")
    return ", ".join(shown)

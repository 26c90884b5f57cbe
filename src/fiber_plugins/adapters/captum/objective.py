"""Captum's arguments -> a :class:`~fiber_plugins.FiberObjective`: :func:`captum_objective`.

``forward_func`` and ``additional_forward_args`` become the subject, ``layer`` and
``attribute_to_layer_input`` the hooked tensor, and ``neuron_selector`` / ``target`` the
selection (see :mod:`.selection`). Needs torch alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import UserTypeError, UserValueError
from ...objectives.base import FiberObjective, find_module
from ...objectives.preprocess import Preprocess
from .selection import NeuronSelector, PerExampleTargetObjective, _neuron_index, _target_entries

__all__ = ["captum_objective"]


class _CaptumForward(nn.Module):
    """``forward_func(x, *additional_forward_args)`` as a module.

    The user's model (``forward_func`` itself, or the module a bound method belongs to) is a
    submodule, so :meth:`FiberObjective.attached` saves and restores its train/eval and
    ``requires_grad`` flags. For a plain function only the hooked layer is known; it is registered
    so the hook can be placed on it.
    """

    fn: Callable  # set with object.__setattr__ (not a registered child)

    def __init__(self, fn: Callable, root: nn.Module | None, layer: nn.Module | None, extra: tuple):
        super().__init__()
        # a plain attribute, not a registered child: the model is registered once, as `model`
        object.__setattr__(self, "fn", fn)
        self.extra = extra
        if root is not None:
            self.model = root
        elif layer is not None:
            self.layer = layer
        known = root if root is not None else layer
        # only the wrapper's own flag, so attached() warns about train mode as for the model itself
        self.training = known.training if known is not None else False

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(x, *self.extra)


def _root_module(forward_func: Callable) -> nn.Module | None:
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)  # a bound method such as model.forward
    return owner if isinstance(owner, nn.Module) else None


def _func_name(forward_func: Callable, root: nn.Module | None) -> str:
    if root is not None:
        return type(root).__name__
    return getattr(forward_func, "__name__", type(forward_func).__name__)


def _format_args(additional_forward_args) -> tuple:
    # Captum's convention: a single non-tuple argument is wrapped in a tuple
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def _resolve_layer(
    layer: nn.Module | str | None, root: nn.Module | None
) -> tuple[nn.Module | None, str | None]:
    """Captum's ``layer`` -> (the module to hook, its label: the dotted name where known)."""
    if layer is None:
        return None, None
    if isinstance(layer, str):
        if root is None:
            raise UserTypeError(
                f"layer name {layer!r} needs forward_func to be an nn.Module (or a bound method of "
                "one); for a plain function pass the layer module itself"
            )
        return find_module(root, layer), layer
    if not isinstance(layer, nn.Module):
        raise UserTypeError(
            f"layer must be an nn.Module or a dotted name, got {type(layer).__name__}"
        )
    if root is None:
        return layer, type(layer).__name__
    names = {id(m): n for n, m in root.named_modules()}
    if id(layer) not in names:
        raise UserValueError(
            f"layer {type(layer).__name__} is not a submodule of {type(root).__name__}"
        )
    return layer, names[id(layer)] or type(layer).__name__


def captum_objective(
    forward_func: Callable,
    layer: nn.Module | str | None = None,
    neuron_selector: NeuronSelector | None = None,
    target=None,
    attribute_to_layer_input: bool = False,
    additional_forward_args=None,
    preprocess: Preprocess | dict | None = None,
    distance: str | Callable = "l2",
    name: str | None = None,
) -> FiberObjective:
    """A fiber objective named the way Captum names what it explains.

    Parameters
    ----------
    forward_func:
        The model (an ``nn.Module``) or any function ``forward_func(x, *additional_forward_args)``,
        exactly what is passed to a Captum attribution class.
    layer:
        ``None`` for the output, else the layer whose output (or input, with
        ``attribute_to_layer_input=True``) is phi, as in ``LayerActivation(forward_func, layer)``:
        a submodule or its dotted name (a name needs ``forward_func`` to be an ``nn.Module`` or a
        bound method of one). For a plain function the hook goes on the given module.
    neuron_selector:
        As in Captum's neuron methods: an int (index along dim 1), a tuple of ints and slices (one
        per non-batch dimension; the block selected by slices is *summed* to one value per
        example, exactly like Captum), or a callable ``f(activation) -> (B,)`` (it gets the first
        tensor when the layer returns several). Applies to the layer, or to the output when
        ``layer`` is None.
    target:
        Captum's ``TargetType`` for the output: None (the whole output), an int (a column), a
        tuple (an index per non-batch dimension, not summed), a scalar tensor, or a per-example
        tensor / list of length R. A per-example target applies to reference r and its samples:
        the objective compares reference r's rows on ``target[r]`` only (see
        :class:`PerExampleTargetObjective`). Only with ``layer=None``.
    attribute_to_layer_input:
        Use the layer's input instead of its output (Captum's switch).
    additional_forward_args:
        Extra arguments passed after the image on every call (a non-tuple is wrapped in a tuple,
        like Captum). They are passed unchanged: sample batches mix references, so per-example
        tensors are not split.
    preprocess:
        From the prior's space ([-1, 1]) into the model's input (default: [-1, 1] -> [0, 1]).
    distance:
        'l2' (default), 'l1', 'cosine', 'kl' or a callable ``d(features, target) -> (B,)``.
    name:
        Label for logs and reports (default: model, layer and selection).

    Returns
    -------
    FiberObjective
        phi(x) with shape (B, K): the selected activation flattened per example.

    Raises
    ------
    KeyError
        An unknown layer name (the message lists the closest names).
    IndexError
        A neuron or target index outside the activation (the message gives the size).
    ValueError / TypeError
        A bad combination or type of arguments, quoted in the message.
    """
    if not callable(forward_func):
        raise UserTypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
    if target is not None and layer is not None:
        raise UserValueError(
            "target selects the model's output; with layer= use neuron_selector= to pick neurons"
        )
    if target is not None and neuron_selector is not None:
        raise UserValueError("give target= (an output) or neuron_selector=, not both")
    if attribute_to_layer_input and layer is None:
        raise UserValueError("attribute_to_layer_input=True needs a layer")
    root = _root_module(forward_func)
    extra = _format_args(additional_forward_args)
    layer_module, layer_label = _resolve_layer(layer, root)

    if isinstance(forward_func, nn.Module) and not extra:
        subject: Callable = forward_func
    else:
        subject = _CaptumForward(forward_func, root, layer_module, extra)

    capture = "input" if attribute_to_layer_input else "output"
    where = f"layer {layer_label!r}" if layer_label is not None else "the output"
    label = _func_name(forward_func, root)
    if layer_label is not None:
        label += f":{layer_label}" + (":input" if attribute_to_layer_input else "")

    entries: list | None = None
    if neuron_selector is not None:
        index = _neuron_index(neuron_selector, where)
        sel = getattr(neuron_selector, "__name__", None) if callable(neuron_selector) else None
        label += f"[{sel or repr(neuron_selector)}]"
    else:
        index, entries = _target_entries(target)
        if target is not None:
            label += f"[target={target.tolist() if isinstance(target, torch.Tensor) else target!r}]"

    obj: FiberObjective
    if entries is not None:
        obj = PerExampleTargetObjective(
            subject, entries, distance=distance, preprocess=preprocess, name=name or label
        )
    else:
        obj = FiberObjective(
            subject,
            layer=layer_module,
            index=index,
            distance=distance,
            preprocess=preprocess,
            capture=capture,
            name=name or label,
        )
    if layer_label is not None:
        obj.layer_name = layer_label  # report the user's name, not the wrapper's path
    return obj

"""transformer-lens adapter: any hook-point name of a ``HookedRootModule`` as a fiber objective.

A TransformerLens user names activations by hook point (``blocks.3.hook_resid_post``,
``blocks.3.attn.hook_z``, ``blocks.3.mlp.hook_post``) and reads them with ``run_with_cache``.
:func:`lens_objective` takes the same name and returns a :class:`~fiber_plugins.FiberObjective`
whose features equal ``cache[hook_name]`` after a token reduction and an index selection.

Works with every model that has a ``hook_dict`` of hook points: transformer-lens
``HookedRootModule`` subclasses, a ``TransformerBridge`` (aliases such as
``blocks.0.hook_resid_pre`` included; hook conversions such as the head split of
``attn.hook_z`` are applied as in ``run_with_cache``), and vit-prisma's ``HookedViT`` (see
:mod:`fiber_plugins.adapters.prisma`). transformer-lens itself is never imported here.

A hook point is an ``nn.Module`` whose forward is the identity, so the objective records it with
one forward hook of its own, installed in :meth:`FiberObjective.attached` and removed in
``finally``; the model's own hook lists (``hook.fwd_hooks``) are never touched.

Examples
--------
>>> _, cache = model.run_with_cache(images)                         # doctest: +SKIP
>>> cache["blocks.1.hook_resid_post"][:, 0, 5]                      # what the user has
>>> obj = lens_objective(model, "blocks.1.hook_resid_post", token="cls", index=5)
>>> list_hook_points(model, (1, 3, 224, 224))[:2]
[('hook_embed', (1, 196, 768)), ('hook_pos_embed', (1, 197, 768))]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import frozen, module_device, suggest
from ..errors import UserIndexError, UserKeyError, UserTypeError, UserValueError
from ..objectives.base import FiberObjective
from ..objectives.distances import Distance
from ..objectives.preprocess import Preprocess
from ..objectives.selection import Index, select

__all__ = [
    "TOKENS",
    "HookObjective",
    "lens_objective",
    "list_hook_points",
    "hook_dict",
    "reduce_tokens",
]

TOKENS = ("cls", "mean", "max", "all")
Token = str | int

# hook points whose position axis is the query axis of a (B, heads, q, k) map
_QUERY_AXIS_HOOKS = ("hook_pattern", "hook_attn_scores")


def hook_dict(model: nn.Module) -> Mapping[str, nn.Module]:
    """``model.hook_dict`` (hook name -> hook point), or a TypeError naming what is needed."""
    hooks = getattr(model, "hook_dict", None)
    if not isinstance(hooks, Mapping):
        raise UserTypeError(
            f"{type(model).__name__} has no hook_dict of hook points; hook names need a "
            "transformer-lens HookedRootModule / TransformerBridge or a vit-prisma HookedViT. "
            "For a plain nn.Module use FiberObjective(model, layer='module.name')"
        )
    return hooks


def _resolve(model: nn.Module, name: str, allow_modules: bool = False) -> nn.Module:
    """The hook point (or, with ``allow_modules``, the submodule) called ``name``."""
    if not isinstance(name, str):
        raise UserTypeError(f"hook name must be a string, got {type(name).__name__}")
    hooks = getattr(model, "hook_dict", None)
    hooks = hooks if isinstance(hooks, Mapping) else None
    if hooks is None and not allow_modules:
        hook_dict(model)  # raises the TypeError
    if hooks is not None and name in hooks:
        return hooks[name]
    choices = list(hooks or ())
    if allow_modules:
        modules = dict(model.named_modules())
        if name and name in modules:
            return modules[name]
        choices += [n for n in modules if n and n not in choices]
    what = "hook" if hooks is not None else "layer"
    raise UserKeyError(f"unknown {what} {name!r} in {type(model).__name__}{suggest(name, choices)}")


def _token_axis(name: str, hook_point: nn.Module) -> int:
    # transformer-lens 4 records the position axis on the hook point (``pos_dim``); its default is
    # dim 1, or the query axis (-2) for attention patterns and scores
    pos = getattr(hook_point, "pos_dim", None)
    if isinstance(pos, int):
        return pos
    return -2 if name.endswith(_QUERY_AXIS_HOOKS) else 1


def check_token(token: Token) -> Token:
    """``token`` if it is one of :data:`TOKENS` or an int position, else a one-line error."""
    if isinstance(token, bool) or not (isinstance(token, int) or token in TOKENS):
        raise UserValueError(
            f"unknown token {token!r}; choose one of {list(TOKENS)} or an int position "
            "(0 is the CLS token in a ViT, 1.. the patches)"
        )
    return token


def reduce_tokens(act: torch.Tensor, token: Token, axis: int = 1, where: str = "the hook"):
    """Reduce the token axis of a (B, ..., tokens, ...) activation: ``'cls'`` takes position 0,
    an int that position, ``'mean'`` / ``'max'`` pool over all positions, ``'all'`` keeps all."""
    if token == "all":
        return act
    if act.dim() < 3:
        raise UserValueError(
            f"token={token!r} needs a token axis but {where} has shape {tuple(act.shape)}; "
            "use token='all'"
        )
    axis = axis % act.dim()
    if axis == 0:
        raise UserValueError(f"the token axis of {where} cannot be the batch axis")
    if token in ("mean", "max"):
        return act.mean(axis) if token == "mean" else act.amax(axis)
    pos = 0 if token == "cls" else int(token)
    n = act.shape[axis]
    if not 0 <= pos < n:  # no negatives: one token, one name
        raise UserIndexError(
            f"token {pos} is out of range for {where} with {n} tokens (valid: 0..{n - 1})"
        )
    return act.select(axis, pos)


class HookObjective(FiberObjective):
    """A :class:`FiberObjective` on a named hook point: conversion, token reduction, selection.

    phi(x) = select(reduce_tokens(convert(act)), index), flattened to (B, K), where ``act`` is
    the tensor that runs through the hook point and ``convert`` is the hook point's own
    ``hook_conversion`` where it has one (TransformerBridge), so values equal ``run_with_cache``.
    """

    def __init__(
        self,
        model: nn.Module,
        hook_name: str,
        token: Token = "cls",
        index: Index = None,
        preprocess: Preprocess | dict | None = None,
        distance: str | Distance = "l2",
        name: str | None = None,
        adapter: str = "lens",
        allow_modules: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise UserTypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.hook_point = _resolve(model, hook_name, allow_modules=allow_modules)
        self.hook_name = hook_name
        self.token = check_token(token)
        self.hook_index = index
        self.adapter = adapter
        self.token_axis = _token_axis(hook_name, self.hook_point)
        label = f"{type(model).__name__}:{hook_name}:{token}"
        if index is not None and not callable(index):
            label += f"[{index}]"
        super().__init__(
            model,
            layer=self.hook_point,
            index=self._select,
            reduction="none",
            distance=distance,
            preprocess=preprocess,
            name=name or label,
        )
        self.layer_name = hook_name  # messages quote the user's name, not an internal path

    def convert(self, act: torch.Tensor) -> torch.Tensor:
        """The hook point's ``hook_conversion`` of the activation (TransformerBridge), else it."""
        conversion = getattr(self.hook_point, "hook_conversion", None)
        return act if conversion is None else conversion.convert(act)

    def _select(self, act: torch.Tensor) -> torch.Tensor:
        act = reduce_tokens(self.convert(act), self.token, self.token_axis, self.where)
        return select(act, self.hook_index, self.where)

    def describe(self) -> dict:
        """JSON-safe description: the base objective's plus adapter, hook, token and index."""
        out = super().describe()
        out.update(
            adapter=self.adapter,
            hook=self.hook_name,
            token=self.token,
            index=None
            if self.hook_index is None or callable(self.hook_index)
            else repr(self.hook_index),
        )
        return out


def lens_objective(
    model: nn.Module,
    hook_name: str,
    token: Token = "cls",
    index: Index = None,
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> HookObjective:
    """Fiber objective on the activation at a hook point of a ``HookedRootModule``.

    Parameters
    ----------
    model:
        A transformer-lens ``HookedRootModule`` (or ``TransformerBridge``) taking image batches.
    hook_name:
        A key of ``model.hook_dict``, e.g. ``"blocks.1.hook_resid_post"``; unknown names raise a
        KeyError with the closest names.
    token:
        ``'cls'`` (position 0), ``'mean'``, ``'max'``, an int position, or ``'all'`` (keep every
        position). Positions are axis 1 of the activation, or the query axis of
        ``hook_pattern`` / ``hook_attn_scores`` maps (B, heads, q, k).
    index:
        Selection after the token reduction (see :func:`fiber_plugins.objectives.select`):
        an int / list selects along the first non-batch axis (the model dimension of
        ``hook_resid_post``, the head of ``attn.hook_z``), a tuple indexes several axes, e.g.
        ``(head, d)``.
    preprocess:
        Prior space ([-1, 1]) -> model input; pass the model's size and mean / std.
    distance:
        'l2' (default), 'l1', 'cosine', 'kl' or a callable.

    Returns
    -------
    HookObjective
        Features (B, K) equal to ``cache[hook_name]`` reduced and selected the same way.
    """
    hook_dict(model)
    return HookObjective(model, hook_name, token, index, preprocess, distance, name, "lens")


def list_hook_points(
    model: nn.Module | Callable[..., Any],
    input_shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> list[tuple[str, tuple[int, ...]]]:
    """Names and activation shapes of every hook point that fires in one forward pass.

    Runs ``model(torch.zeros(input_shape))`` once, in eval mode and without gradients, with one
    recording hook per hook point (all removed in ``finally``; train/eval flags restored).
    Models without a ``hook_dict`` report every named submodule whose output is a tensor.

    Parameters
    ----------
    input_shape:
        The full input shape including the batch, e.g. ``(1, 3, 224, 224)``.

    Returns
    -------
    list of (name, shape)
        In the order the hook points fire; shapes include the batch dimension (as in
        ``run_with_cache``). Aliases of one hook point are listed next to each other.
    """
    if not isinstance(model, nn.Module):
        raise UserTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    hooks = getattr(model, "hook_dict", None)
    if isinstance(hooks, Mapping):
        points = list(hooks.items())
    else:
        points = [(n, m) for n, m in model.named_modules() if n]
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in points:
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    fired: dict[int, tuple[int, ...]] = {}

    def record(key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(out, torch.Tensor) and key not in fired:
                conversion = getattr(module, "hook_conversion", None)
                if conversion is not None:
                    out = conversion.convert(out)
                fired[key] = tuple(out.shape)

        return hook

    if device is None:
        device = module_device(model)
    handles = []
    try:
        # eval mode for the probe forward only (dropout, batch-norm), restored afterwards
        with frozen(model, requires_grad=None), torch.no_grad():
            for key, module in modules.items():
                handles.append(module.register_forward_hook(record(key)))
            model(torch.zeros(tuple(input_shape), dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
    return [(name, fired[key]) for key in fired for name in names[key]]

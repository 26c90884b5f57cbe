"""zennit-crp / SemanticLens adapter: CRP condition dicts as fiber objectives.

A CRP user names a concept with a condition dict, ``{"features.40": [12]}`` = channel 12 of the
layer ``features.40`` (names as ``crp.helper.get_layer_names(model, [nn.Conv2d, nn.Linear])``
lists them, i.e. ``model.named_modules()``), with the reserved key ``"y"`` for output logits
(``CondAttribution.MODEL_OUTPUT_NAME``). :func:`crp_objectives` turns each condition dict into a
:class:`~fiber_plugins.FiberObjective` on the *activations* of those channels (their spatial mean
or max for conv maps, the value itself for ``nn.Linear`` outputs and logits); several keys in one
dict are summed. Fiber samples then show which images drive the neuron to the same level, which
tests whether its concept label holds.

Activation targets need plain gradients, so they must not run inside a zennit composite (its
rules replace gradients by relevance; its canonizers may change the model's parameters while
registered). The objectives check this each time they attach and raise a RuntimeError.

zennit and zennit-crp are imported lazily (``pip install 'fiber-plugins[zennit]'``).

Examples
--------
>>> attribution = CondAttribution(model)                               # doctest: +SKIP
>>> attr = attribution(x, [{"features.40": [12], "y": [1]}], composite)  # what the user has
>>> obj = crp_objective(model, {"features.40": [12]})
>>> objs = crp_objectives(attribution, [{"features.40": [12]}, {"features.40": [57]}])
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import require, suggest
from ..errors import UserKeyError, UserStateError, UserTypeError, UserValueError
from ..objectives.base import FiberObjective
from ..objectives.distances import Distance
from ..objectives.preprocess import Preprocess

__all__ = ["crp_objective", "crp_objectives", "CRPObjective", "check_no_composite"]

REDUCTIONS = ("spatial_mean", "spatial_max", "none")
Condition = Mapping[str, int | Sequence[int]]


def _zennit_hooks(model: nn.Module) -> list[str]:
    """Names of modules that carry forward hooks of a zennit rule (``zennit.core.Hook``)."""
    core = sys.modules.get("zennit.core")
    if core is None:  # zennit never imported: no composite can be registered
        return []
    found = []
    for name, module in model.named_modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            if any(isinstance(getattr(fn, "__self__", None), core.Hook) for fn in hooks.values()):
                found.append(name or "<root>")
                break
    return found


def check_no_composite(model: nn.Module, composite: Any = None) -> None:
    """Raise a RuntimeError if a zennit composite is registered on ``model`` (or ``composite`` is
    registered anywhere)."""
    names = _zennit_hooks(model)
    registered = composite is not None and len(getattr(composite, "handles", ())) > 0
    if not names and not registered:
        return
    where = (
        f"rule hooks on {', '.join(repr(n) for n in names[:3])}"
        + (" ..." if len(names) > 3 else "")
        if names
        else f"{type(composite).__name__} is registered"
    )
    raise UserStateError(
        f"a zennit composite is registered on {type(model).__name__} ({where}). Activation "
        "targets must not run inside a zennit composite: its rules rewrite the gradients "
        "(relevance instead of d phi / d x) and its canonizers may change the parameters. "
        "Leave the `with composite.context(model):` block (or call composite.remove()) "
        "before building the target and sampling; attribute afterwards."
    )


class CRPObjective(FiberObjective):
    """A :class:`FiberObjective` that refuses to run while a zennit composite is registered."""

    def __init__(self, *args, composite: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.composite = composite

    @contextlib.contextmanager
    def attached(self) -> Iterator[CRPObjective]:
        """Attach like :meth:`FiberObjective.attached`, after checking that no zennit composite
        is registered on the model (its modified gradients would change the fiber loss)."""
        if self.model is not None and self._depth == 0:
            check_no_composite(self.model, self.composite)
        with super().attached():
            yield self


def _unwrap(model: Any) -> tuple[nn.Module, str]:
    """An nn.Module, or a CRP ``CondAttribution`` (its ``model`` and ``MODEL_OUTPUT_NAME``)."""
    if isinstance(model, nn.Module):
        return model, "y"
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner, str(getattr(model, "MODEL_OUTPUT_NAME", "y"))
    raise UserTypeError(
        f"model must be an nn.Module or a crp CondAttribution, got {type(model).__name__}"
    )


def _ids(key: str, value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
    if isinstance(value, bool):
        raise UserTypeError(f"condition {key!r}: expected channel ids, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            return [int(i) for i in value]
    raise UserTypeError(
        f"condition {key!r}: expected an int or a non-empty list of ints (channel ids), "
        f"got {value!r}"
    )


def crp_objective(
    model: nn.Module | Any,
    condition: Condition,
    reduction: str = "spatial_mean",
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    include_y: bool = True,
    composite: Any = None,
) -> FiberObjective:
    """One fiber objective for one CRP condition dict; several keys are summed (``a + b``).

    Parameters
    ----------
    model:
        The subject model, or the ``CondAttribution`` wrapping it (its ``MODEL_OUTPUT_NAME``
        is then the logits key).
    condition:
        ``{layer_name: channel ids}``; ``"y"`` selects output logits. Layer names are
        ``model.named_modules()`` names, as ``crp.helper.get_layer_names`` lists them.
    reduction:
        'spatial_mean' (default), 'spatial_max' or 'none' for conv maps; ``nn.Linear`` outputs
        and logits are used as they are.
    include_y:
        With layer keys, CRP's ``"y"`` only says where relevance starts. Here it adds a logit
        term to the sum; pass False to keep only the layer channels.
    composite:
        The zennit composite used for attribution, if any: sampling refuses to run while it is
        registered (so does any composite found hooked on the model).

    Returns
    -------
    FiberObjective
        A :class:`CRPObjective`, or a :class:`~fiber_plugins.WeightedSum` of them.
    """
    require("zennit.core")
    crp_helper = require("crp.helper")
    module, y_name = _unwrap(model)
    if not isinstance(condition, Mapping):
        raise UserTypeError(f"a condition is a dict {{layer: ids}}, got {type(condition).__name__}")
    if reduction not in REDUCTIONS:
        raise UserValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    keys = [k for k in condition if include_y or k != y_name or len(condition) == 1]
    if not keys:
        raise UserValueError(f"condition {dict(condition)!r} selects nothing")
    check_no_composite(module, composite)
    modules = dict(module.named_modules())
    terms = []
    for key in keys:
        ids = _ids(key, condition[key])
        kw = {"preprocess": preprocess, "distance": distance, "composite": composite}
        if key == y_name:
            obj = CRPObjective(module, None, ids, "none", name=f"crp:{key}{ids}", **kw)
        else:
            if not isinstance(key, str) or key not in modules or not key:
                names = crp_helper.get_layer_names(module, [nn.Conv2d, nn.Linear])
                raise UserKeyError(
                    f"unknown layer {key!r} in condition {dict(condition)!r}; CRP names layers as "
                    f"model.named_modules() does, with {y_name!r} for the logits"
                    f"{suggest(str(key), names or [n for n in modules if n])}"
                )
            r = "none" if isinstance(modules[key], nn.Linear) else reduction
            obj = CRPObjective(module, key, ids, r, name=f"crp:{key}{ids}", **kw)
        terms.append(obj)
    return functools.reduce(operator.add, terms) if len(terms) > 1 else terms[0]


def crp_objectives(
    model: nn.Module | Any,
    conditions: Condition | Sequence[Condition],
    reduction: str = "spatial_mean",
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    include_y: bool = True,
    composite: Any = None,
) -> list[FiberObjective]:
    """One fiber objective per CRP condition dict (a single dict gives a list of one).

    See :func:`crp_objective` for the arguments. ``conditions`` is what ``CondAttribution``
    takes, e.g. ``[{"features.40": [12]}, {"features.40": [57]}]``.
    """
    if isinstance(conditions, Mapping):
        conditions = [conditions]
    if isinstance(conditions, (str, bytes)) or not isinstance(conditions, Sequence):
        raise UserTypeError(
            f"conditions must be a dict or a list of dicts, got {type(conditions).__name__}"
        )
    if not conditions:
        raise UserValueError("conditions is empty")
    return [
        crp_objective(model, c, reduction, preprocess, distance, include_y, composite)
        for c in conditions
    ]

"""Captum adapter: fiber objectives from ``forward_func`` / ``layer`` / ``neuron_selector`` / ``target``.

A Captum user already names what to explain; this module turns the same names into a
:class:`~fiber_plugins.FiberObjective` and offers Captum-style classes whose ``attribute`` returns
fiber samples plus a per-pixel *invariance map* (how much the fiber samples vary per pixel), which
Captum's own ``visualize_image_attr`` can show next to an attribution map.

Captum is imported lazily: building an objective needs torch alone; the Captum-style classes and
:func:`visualize_invariance` import it (``pip install 'fiber-plugins[captum]'``).

Examples
--------
>>> from captum.attr import LayerActivation                        # doctest: +SKIP
>>> LayerActivation(model, model.layer4).attribute(x)              # what the user has
>>> obj = captum_objective(model, layer=model.layer4, neuron_selector=(7, 3, 3))
>>> attr = NeuronFiber(model, model.layer4).attribute(images, (7, 3, 3), prior=prior, n=8)
>>> fig, ax = visualize_invariance(attr, index=0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import require
from ..objectives.base import FiberObjective, find_module
from ..objectives.distances import get_distance
from ..objectives.preprocess import Preprocess
from ..objectives.selection import select
from ..samplers.result import FiberResult

__all__ = [
    "captum_objective",
    "OutputFiber",
    "LayerFiber",
    "NeuronFiber",
    "FiberAttribution",
    "invariance_map",
    "visualize_invariance",
]

NeuronSelector = int | tuple | slice | Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- forward_func
class _CaptumForward(nn.Module):
    """``forward_func(x, *additional_forward_args)`` as a module.

    The user's model (``forward_func`` itself, or the module a bound method belongs to) is a
    submodule, so :meth:`FiberObjective.attached` saves and restores its train/eval and
    ``requires_grad`` flags. For a plain function only the hooked layer is known; it is registered
    so the hook can be placed on it.
    """

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


# ---------------------------------------------------------------------------- selections
def _has_slice(selector) -> bool:
    return isinstance(selector, tuple) and any(isinstance(s, slice) for s in selector)


def _check_tuple(selector: tuple, what: str) -> None:
    for s in selector:
        if isinstance(s, bool) or not isinstance(s, (int, slice)):
            raise TypeError(f"{what} {selector!r} must contain only ints and slices, got {s!r}")


class _SummedNeurons:
    """Captum's neuron index with slices: the selected block is summed to one value per example."""

    def __init__(self, selector: tuple, where: str):
        self.selector = selector
        self.where = where

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        block = select(act, self.selector, self.where)
        return block.reshape(block.shape[0], -1).sum(1)

    def __repr__(self) -> str:
        return repr(self.selector)


def _neuron_index(selector: NeuronSelector, where: str):
    """Captum ``neuron_selector`` -> a :func:`select` index (slices summed, like Captum)."""
    if callable(selector):  # select() checks that it keeps the batch dimension
        return selector
    if isinstance(selector, bool):
        raise TypeError(f"neuron_selector must be an int, a tuple or a callable, got {selector!r}")
    if isinstance(selector, int):
        return selector
    if isinstance(selector, slice):  # not in Captum's types; read as a one-entry tuple
        selector = (selector,)
    if isinstance(selector, tuple):
        if not selector:
            raise ValueError("neuron_selector must not be an empty tuple")
        _check_tuple(selector, "neuron_selector")
        return _SummedNeurons(selector, where) if _has_slice(selector) else selector
    raise TypeError(
        f"neuron_selector must be an int, a tuple of ints/slices or a callable, "
        f"got {type(selector).__name__}"
    )


def _target_entries(target) -> tuple[Any, list | None]:
    """Captum ``TargetType`` -> (one index for every example, or None; per-example list or None)."""
    if target is None:
        return None, None
    if isinstance(target, bool):
        raise TypeError(f"target must be an int, tuple, tensor or list, got {target!r}")
    if isinstance(target, int):
        return target, None
    if isinstance(target, tuple):
        _check_tuple(target, "target")
        return target, None
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(f"a target tensor must hold integers, got dtype {target.dtype}")
        if target.numel() == 1:
            return int(target.item()), None
        if target.dim() != 1:
            raise ValueError(
                f"a target tensor must be a scalar or 1-D (one class per example), "
                f"got shape {tuple(target.shape)}"
            )
        entries: list = [int(t) for t in target.tolist()]
    elif isinstance(target, list):
        if not target:
            raise ValueError("target list must not be empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            entries = list(target)
        elif all(isinstance(t, tuple) for t in target):
            for t in target:
                _check_tuple(t, "target entry")
            entries = list(target)
        else:
            raise TypeError(
                f"a target list must hold only ints or only tuples (one per example), got {target!r}"
            )
    else:
        raise TypeError(
            f"target must be None, an int, a tuple, a tensor or a list, got {type(target).__name__}"
        )
    if all(e == entries[0] for e in entries):  # the same class for every example: one target
        return entries[0], None
    return None, entries


# ---------------------------------------------------------------------------- per-example targets
class PerExampleTargetObjective(FiberObjective):
    """An output objective with one Captum target per reference (a tensor or list of length R).

    Fiber targets must be the same for a reference and its samples, so the target list is read
    per *reference*: reference r's samples are compared with reference r on ``target[r]`` only.
    phi(x) is the concatenation of all R selections ``output[:, target[r]]`` (shape (B, sum of the
    block sizes)); :meth:`target` keeps reference r's own block in row r and fills the other
    blocks with NaN, and the distance compares only the finite (own) block of each row. Every
    distance works, on the own block alone.

    The mask lives in the target, so this works with the static target y* = phi(x*) (the
    default). A re-approximated target (``target_mode='reapprox'``) recomputes y*_t without the mask and
    is refused with a ValueError; the Captum-style classes then sample each reference separately.
    """

    def __init__(self, subject, entries: list, distance="l2", preprocess=None, name=None):
        self.entries = list(entries)
        self._base_distance = get_distance(distance)
        self._sizes: list[int] | None = None
        super().__init__(
            subject,
            index=self._select_all,
            reduction="none",
            distance=self._masked_distance,
            preprocess=preprocess,
            name=name,
        )
        self.distance_name = (
            distance if isinstance(distance, str) else getattr(distance, "__name__", "custom")
        )

    def _select_all(self, act: torch.Tensor) -> torch.Tensor:
        if isinstance(self.entries[0], int) and act.dim() != 2:
            raise ValueError(
                f"per-example int targets need a 2-D output (B, K), as in Captum; {self.where} "
                f"has shape {tuple(act.shape)}"
            )
        blocks = [
            select(act, e if isinstance(e, tuple) else (e,), self.where) for e in self.entries
        ]
        blocks = [b.reshape(b.shape[0], -1) for b in blocks]
        self._sizes = [b.shape[1] for b in blocks]
        return torch.cat(blocks, dim=1)

    def target(self, reference: torch.Tensor) -> torch.Tensor:
        if reference.shape[0] != len(self.entries):
            raise ValueError(
                f"target has {len(self.entries)} entries (one per example) but got "
                f"{reference.shape[0]} reference image(s)"
            )
        y = super().target(reference)
        masked = torch.full_like(y, math.nan)
        start = 0
        for r, size in enumerate(self._sizes or []):
            masked[r, start : start + size] = y[r, start : start + size]
            start += size
        return masked

    def _masked_distance(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        own = torch.isfinite(target).expand_as(features)
        counts = own.sum(1)
        width = features.shape[1]
        if len(self.entries) > 1 and bool((counts == width).any()):
            raise ValueError(
                "a per-example target needs the static target y* = phi(reference) (its mask "
                "says which target belongs to which reference); with target_mode='reapprox' or "
                "explicit targets sample each reference on its own, or use OutputFiber, which "
                "does that for you"
            )
        k = int(counts[0])
        if k == 0 or bool((counts != k).any()):
            raise ValueError(
                "per-example targets select blocks of different sizes "
                f"({sorted(set(counts.tolist()))}); give targets that select the same shape"
            )
        f_own = features[own].view(features.shape[0], k)
        t_own = target.expand_as(features)[own].view(features.shape[0], k)
        return self._base_distance(f_own, t_own)

    def describe(self) -> dict:
        return {**super().describe(), "target": repr(self.entries)}


# ---------------------------------------------------------------------------- the objective
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
        raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
    if target is not None and layer is not None:
        raise ValueError(
            "target selects the model's output; with layer= use neuron_selector= to pick neurons"
        )
    if target is not None and neuron_selector is not None:
        raise ValueError("give target= (an output) or neuron_selector=, not both")
    if attribute_to_layer_input and layer is None:
        raise ValueError("attribute_to_layer_input=True needs a layer")
    root = _root_module(forward_func)
    extra = _format_args(additional_forward_args)

    layer_module: nn.Module | None = None
    layer_label: str | None = None
    if isinstance(layer, str):
        if root is None:
            raise TypeError(
                f"layer name {layer!r} needs forward_func to be an nn.Module (or a bound method of "
                "one); for a plain function pass the layer module itself"
            )
        layer_module, layer_label = find_module(root, layer), layer
    elif isinstance(layer, nn.Module):
        layer_module = layer
        if root is not None:
            names = {id(m): n for n, m in root.named_modules()}
            if id(layer) not in names:
                raise ValueError(
                    f"layer {type(layer).__name__} is not a submodule of {type(root).__name__}"
                )
            layer_label = names[id(layer)] or type(layer).__name__
        else:
            layer_label = type(layer).__name__
    elif layer is not None:
        raise TypeError(f"layer must be an nn.Module or a dotted name, got {type(layer).__name__}")

    if isinstance(forward_func, nn.Module) and not extra:
        subject: Callable = forward_func
    else:
        subject = _CaptumForward(forward_func, root, layer_module, extra)

    capture = "input" if attribute_to_layer_input else "output"
    where = f"layer {layer_label!r}" if layer_label is not None else "the output"
    label = _func_name(forward_func, root)
    if layer_label is not None:
        label += f":{layer_label}" + (":input" if attribute_to_layer_input else "")

    if neuron_selector is not None:
        index = _neuron_index(neuron_selector, where)
        sel = getattr(neuron_selector, "__name__", None) if callable(neuron_selector) else None
        label += f"[{sel or repr(neuron_selector)}]"
        obj = FiberObjective(
            subject,
            layer=layer_module,
            index=index,
            distance=distance,
            preprocess=preprocess,
            capture=capture,
            name=name or label,
        )
    else:
        single, entries = _target_entries(target)
        if target is not None:
            label += f"[target={target.tolist() if isinstance(target, torch.Tensor) else target!r}]"
        if entries is not None:
            obj = PerExampleTargetObjective(
                subject, entries, distance=distance, preprocess=preprocess, name=name or label
            )
        else:
            obj = FiberObjective(
                subject,
                layer=layer_module,
                index=single,
                distance=distance,
                preprocess=preprocess,
                capture=capture,
                name=name or label,
            )
    if layer_label is not None:
        obj.layer_name = layer_label  # report the user's name, not the wrapper's path
    return obj


# ---------------------------------------------------------------------------- Captum-style classes
@dataclass
class FiberAttribution:
    """What the Captum-style ``attribute`` returns.

    Attributes
    ----------
    result: the :class:`FiberResult` (samples (R, M, C, H', W') at the prior's size).
    invariance_map: (R, C, H, W), shaped like the inputs: the per-pixel standard deviation of the
        fiber samples over the M samples of each reference (failed samples left out). High values
        mark pixels the model's representation does not constrain.
    """

    result: FiberResult
    invariance_map: torch.Tensor

    @property
    def samples(self) -> torch.Tensor:
        return self.result.images


def invariance_map(result: FiberResult, like: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel standard deviation over the M samples of each reference: (R, C, H, W).

    The population std (``correction=0``), so one sample gives zeros; failed samples are left
    out, and a reference without any successful sample gets NaN. With ``like`` (R, C, H, W) the
    map is resized (bilinear) and its channels matched to ``like``.
    """
    imgs = result.images.float()
    w = (~result.failed).float().view(*result.failed.shape, 1, 1, 1)
    count = w.sum(1)
    mean = (imgs * w).sum(1) / count.clamp_min(1)
    var = ((imgs - mean.unsqueeze(1)).pow(2) * w).sum(1) / count.clamp_min(1)
    std = torch.where(count > 0, var.sqrt(), torch.full_like(var, math.nan))
    if like is not None:
        if tuple(std.shape[-2:]) != tuple(like.shape[-2:]):
            shrink = std.shape[-2] > like.shape[-2] or std.shape[-1] > like.shape[-1]
            size = tuple(like.shape[-2:])
            std = F.interpolate(
                std, size=size, mode="bilinear", align_corners=False, antialias=shrink
            )
        if std.shape[1] != like.shape[1]:
            std = std.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1).contiguous()
    return std


def _check_inputs(inputs) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (R, C, H, W) tensor of images in [0, 1], got {shape}")
    return inputs


def _concat(results: list[FiberResult]) -> FiberResult:
    targets = [r.targets for r in results]
    tensors = all(isinstance(t, torch.Tensor) for t in targets)
    same = tensors and len({t.shape[1:] for t in targets}) == 1
    return FiberResult(
        images=torch.cat([r.images for r in results]),
        references=torch.cat([r.references for r in results]),
        fiber_loss=torch.cat([r.fiber_loss for r in results]),
        loss_trace=torch.cat([r.loss_trace for r in results]),
        failed=torch.cat([r.failed for r in results]),
        config={**results[0].config, "per_reference_runs": len(results)},
        wall_time=sum(r.wall_time for r in results),
        targets=torch.cat(targets) if same else None,
    )


class _FiberAttributionBase:
    """Stores ``forward_func`` like Captum's ``Attribution``; subclasses build the objective."""

    def __init__(self, forward_func: Callable):
        require("captum")  # these classes are Captum companions: fail early with the extra's name
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    def _attribute(
        self,
        inputs: torch.Tensor,
        objective_kwargs: dict,
        prior,
        n: int,
        seed: int,
        batch_size: int | None,
        progress: bool,
        config,
        ndtm_settings: dict,
    ) -> FiberAttribution:
        from ..priors import DiffusionPrior, load_prior
        from ..samplers import NDTMConfig, NDTMSampler

        start = time.perf_counter()
        inputs = _check_inputs(inputs)
        objective = captum_objective(self.forward_func, **objective_kwargs)
        if not isinstance(prior, DiffusionPrior):
            prior = load_prior(prior)
        calls = {"n": n, "batch_size": batch_size, "progress": progress}
        config = config or NDTMConfig()
        reapprox = ndtm_settings.get("target_mode", config.target_mode) == "reapprox"
        target = objective_kwargs.get("target")
        per_example = isinstance(target, list) or (
            isinstance(target, torch.Tensor) and target.numel() > 1
        )
        if per_example and len(target) != inputs.shape[0]:  # Captum asserts the same
            raise ValueError(
                f"target has {len(target)} entries (one per example) but inputs has "
                f"{inputs.shape[0]} image(s)"
            )
        if isinstance(objective, PerExampleTargetObjective):
            if reapprox:  # the mask cannot follow a re-approximated target: one run per reference
                results = []
                for r, entry in enumerate(objective.entries):
                    single = captum_objective(
                        self.forward_func, **{**objective_kwargs, "target": entry}
                    )
                    sampler = NDTMSampler(prior, single, config, **ndtm_settings)
                    results.append(
                        sampler.sample(references=inputs[r : r + 1], seed=seed + r, **calls)
                    )
                result = _concat(results)
                result.wall_time = time.perf_counter() - start
                return FiberAttribution(result, invariance_map(result, like=inputs))
        sampler = NDTMSampler(prior, objective, config, **ndtm_settings)
        result = sampler.sample(references=inputs, seed=seed, **calls)
        return FiberAttribution(result, invariance_map(result, like=inputs))


class OutputFiber(_FiberAttributionBase):
    """Fiber of the model output (optionally one ``target`` column), Captum style.

    Examples
    --------
    >>> attr = OutputFiber(model).attribute(images, labels, prior=prior, n=8)  # doctest: +SKIP
    >>> attr.invariance_map.shape == images.shape  # doctest: +SKIP
    True
    """

    def attribute(
        self,
        inputs: torch.Tensor,
        target=None,
        additional_forward_args=None,
        *,
        prior,
        n: int = 8,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        preprocess: Preprocess | dict | None = None,
        distance: str | Callable = "l2",
        config=None,
        **ndtm_settings,
    ) -> FiberAttribution:
        """Sample ``n`` fiber samples per input image and their invariance map.

        Parameters
        ----------
        inputs:
            (R, C, H, W) images in [0, 1] (resized to the prior's size for sampling).
        target:
            Captum's TargetType for the output; a per-example target of length R applies to
            each input's own samples (see :func:`captum_objective`).
        additional_forward_args:
            Passed after the image on every call, as in Captum.
        prior:
            A :class:`~fiber_plugins.DiffusionPrior` or anything ``load_prior`` accepts.
        n, seed, batch_size, progress:
            As in :meth:`~fiber_plugins.NDTMSampler.sample` (progress bar off by default).
        preprocess, distance:
            As in :func:`captum_objective`.
        config, ndtm_settings:
            An :class:`~fiber_plugins.NDTMConfig` and/or its fields as keywords (``num_steps``,
            ``inner_steps``, ...). NDTM's ``target_mode`` ('static' / 'reapprox') can also be
            set through ``config=NDTMConfig(target_mode=...)``.

        Returns
        -------
        FiberAttribution
            The :class:`FiberResult` and the (R, C, H, W) invariance map.
        """
        kw = {
            "target": target,
            "additional_forward_args": additional_forward_args,
            "preprocess": preprocess,
            "distance": distance,
        }
        return self._attribute(
            inputs, kw, prior, n, seed, batch_size, progress, config, ndtm_settings
        )


class LayerFiber(_FiberAttributionBase):
    """Fiber of a layer's whole activation (``LayerActivation``'s quantity), Captum style."""

    def __init__(self, forward_func: Callable, layer: nn.Module | str):
        super().__init__(forward_func)
        self.layer = layer

    def attribute(
        self,
        inputs: torch.Tensor,
        additional_forward_args=None,
        *,
        prior,
        n: int = 8,
        seed: int = 0,
        attribute_to_layer_input: bool = False,
        batch_size: int | None = None,
        progress: bool = False,
        preprocess: Preprocess | dict | None = None,
        distance: str | Callable = "l2",
        config=None,
        **ndtm_settings,
    ) -> FiberAttribution:
        """Sample ``n`` images per input whose ``layer`` activation matches the input's.

        Arguments as in :meth:`OutputFiber.attribute`; ``attribute_to_layer_input=True`` uses the
        layer's input, as in Captum's ``LayerActivation``.
        """
        kw = {
            "layer": self.layer,
            "attribute_to_layer_input": attribute_to_layer_input,
            "additional_forward_args": additional_forward_args,
            "preprocess": preprocess,
            "distance": distance,
        }
        return self._attribute(
            inputs, kw, prior, n, seed, batch_size, progress, config, ndtm_settings
        )


class NeuronFiber(_FiberAttributionBase):
    """Fiber of one neuron (or a summed block) of a layer, Captum style."""

    def __init__(self, forward_func: Callable, layer: nn.Module | str):
        super().__init__(forward_func)
        self.layer = layer

    def attribute(
        self,
        inputs: torch.Tensor,
        neuron_selector: NeuronSelector,
        additional_forward_args=None,
        *,
        prior,
        n: int = 8,
        seed: int = 0,
        attribute_to_layer_input: bool = False,
        batch_size: int | None = None,
        progress: bool = False,
        preprocess: Preprocess | dict | None = None,
        distance: str | Callable = "l2",
        config=None,
        **ndtm_settings,
    ) -> FiberAttribution:
        """Sample ``n`` images per input on which the selected neuron has the input's value.

        ``neuron_selector`` as in Captum's neuron methods (int, tuple of ints/slices with slices
        summed, or a callable); other arguments as in :meth:`OutputFiber.attribute`.
        """
        kw = {
            "layer": self.layer,
            "neuron_selector": neuron_selector,
            "attribute_to_layer_input": attribute_to_layer_input,
            "additional_forward_args": additional_forward_args,
            "preprocess": preprocess,
            "distance": distance,
        }
        return self._attribute(
            inputs, kw, prior, n, seed, batch_size, progress, config, ndtm_settings
        )


def visualize_invariance(attr: FiberAttribution, index: int = 0, **kwargs):
    """Show one invariance map with ``captum.attr.visualization.visualize_image_attr``.

    Defaults: ``method="heat_map"``, ``sign="absolute_value"``; any other keyword goes to
    ``visualize_image_attr`` (``plt_fig_axis``, ``cmap``, ``title``, ``use_pyplot``, ...).
    The reference image (resized to the map) is passed as ``original_image``, so blended methods
    work too. Returns ``(fig, ax)``.
    """
    viz = require("captum.attr").visualization
    maps = attr.invariance_map
    if not -maps.shape[0] <= index < maps.shape[0]:
        raise IndexError(f"index {index} is out of range for {maps.shape[0]} invariance map(s)")
    m = torch.nan_to_num(maps[index].detach().float().cpu(), nan=0.0)
    kwargs.setdefault("method", "heat_map")
    kwargs.setdefault("sign", "absolute_value")
    original = None
    refs = attr.result.references
    if refs is not None:
        ref = refs[index : index + 1].float()
        ref = _match_display(ref, m.unsqueeze(0))[0]
        original = ref.permute(1, 2, 0).numpy()
    return viz.visualize_image_attr(m.permute(1, 2, 0).numpy(), original, **kwargs)


def _match_display(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize images (N, C, H, W) and match their channels to ``like``'s (for display)."""
    if tuple(images.shape[-2:]) != tuple(like.shape[-2:]):
        images = F.interpolate(
            images, size=tuple(like.shape[-2:]), mode="bilinear", align_corners=False
        )
    if images.shape[1] != like.shape[1]:
        images = images.mean(1, keepdim=True).expand(-1, like.shape[1], -1, -1)
    return images.clamp(0, 1)

"""Captum-style classes: ``attribute`` returns fiber samples and their invariance map.

:class:`OutputFiber`, :class:`LayerFiber` and :class:`NeuronFiber` take Captum's arguments in
Captum's order; each passes what it selects on to one shared implementation,
:meth:`_FiberAttributionBase._attribute`, which builds the objective with the Captum adapter's
:func:`~fiber_plugins.adapters.captum.captum_objective`, runs the NDTM sampler and computes the
invariance map. Building an instance needs Captum (``pip install 'fiber-plugins[captum]'``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .._utils import require
from ..adapters.captum.objective import captum_objective
from ..adapters.captum.selection import NeuronSelector, PerExampleTargetObjective, is_per_example
from ..errors import UserTypeError, UserValueError
from ..evaluation.metrics import invariance_map
from ..objectives.base import FiberObjective
from ..objectives.preprocess import Preprocess
from ..priors import DiffusionPrior, load_prior
from ..samplers import NDTMConfig, NDTMSampler
from ..samplers.result import FiberResult
from .invariance import FiberAttribution

__all__ = ["OutputFiber", "LayerFiber", "NeuronFiber"]


def _check_inputs(inputs) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise UserValueError(
            f"inputs must be a (R, C, H, W) tensor of images in [0, 1], got {shape}"
        )
    return inputs


def _check_target_length(target, inputs: torch.Tensor) -> None:
    if is_per_example(target) and len(target) != inputs.shape[0]:  # Captum asserts the same
        raise UserValueError(
            f"target has {len(target)} entries (one per example) but inputs has "
            f"{inputs.shape[0]} image(s)"
        )


def _concat(results: list[FiberResult]) -> FiberResult:
    targets = [r.targets for r in results]
    tensors = all(isinstance(t, torch.Tensor) for t in targets)
    as_tensors = cast(list[torch.Tensor], targets)  # read only where `tensors` holds
    same = tensors and len({t.shape[1:] for t in as_tensors}) == 1
    # each run was sampled from its reference, so none has references=None
    references = cast(list[torch.Tensor], [r.references for r in results])
    return FiberResult(
        images=torch.cat([r.images for r in results]),
        references=torch.cat(references),
        fiber_loss=torch.cat([r.fiber_loss for r in results]),
        loss_trace=torch.cat([r.loss_trace for r in results]),
        failed=torch.cat([r.failed for r in results]),
        config={**results[0].config, "per_reference_runs": len(results)},
        wall_time=sum(r.wall_time for r in results),
        targets=torch.cat(as_tensors) if same else None,
    )


@dataclass(frozen=True)
class _Sampling:
    """How ``attribute`` samples, as the caller gave it: the prior and the NDTM settings."""

    prior: Any
    n: int
    seed: int
    batch_size: int | None
    progress: bool
    config: Any
    ndtm_settings: dict


class _FiberAttributionBase:
    """Stores ``forward_func`` like Captum's ``Attribution``; holds the one ``attribute`` logic.

    Subclasses keep Captum's signature in their public ``attribute`` and pass what they select
    (``target``, ``layer``, ``neuron_selector``, ...) on to :meth:`_attribute` as
    :func:`captum_objective` keywords.
    """

    def __init__(self, forward_func: Callable):
        require("captum")  # these classes are Captum companions: fail early with the extra's name
        if not callable(forward_func):
            raise UserTypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    def _attribute(
        self, inputs: torch.Tensor, sampling: _Sampling, /, **objective_kwargs
    ) -> FiberAttribution:
        """Sample ``sampling.n`` fiber samples per input image and compute their invariance map.

        Parameters
        ----------
        inputs:
            (R, C, H, W) images in [0, 1].
        sampling:
            The prior, ``n``, ``seed``, ``batch_size``, ``progress`` and the NDTM config/settings.
        objective_kwargs:
            Keywords for :func:`captum_objective` (everything but ``forward_func``).

        Returns
        -------
        FiberAttribution
            The :class:`FiberResult` and the (R, C, H, W) invariance map.

        Notes
        -----
        A per-example target with ``target_mode='reapprox'`` cannot carry its mask (see
        :class:`PerExampleTargetObjective`): each reference is then sampled on its own target
        with seed ``seed + r`` and the results are concatenated.
        """
        start = time.perf_counter()
        inputs = _check_inputs(inputs)
        if objective_kwargs.get("preprocess") is None:
            # the model takes `inputs` as they are: samples are resized to their size, and y* is
            # computed from `inputs` themselves, so the fiber is of the value Captum explains
            objective_kwargs["preprocess"] = Preprocess(
                size=(int(inputs.shape[-2]), int(inputs.shape[-1])), channels=int(inputs.shape[1])
            )
        objective = captum_objective(self.forward_func, **objective_kwargs)
        prior = sampling.prior
        if not isinstance(prior, DiffusionPrior):
            prior = load_prior(prior)
        config = sampling.config or NDTMConfig()
        reapprox = sampling.ndtm_settings.get("target_mode", config.target_mode) == "reapprox"
        _check_target_length(objective_kwargs.get("target"), inputs)

        def sample(obj: FiberObjective, references: torch.Tensor, seed: int) -> FiberResult:
            sampler = NDTMSampler(prior, obj, config, **sampling.ndtm_settings)
            return sampler.sample(
                references=references,
                seed=seed,
                n=sampling.n,
                batch_size=sampling.batch_size,
                progress=sampling.progress,
            )

        if reapprox and isinstance(objective, PerExampleTargetObjective):
            # the mask cannot follow a re-approximated target: one run per reference
            results = []
            for r, entry in enumerate(objective.entries):
                single = captum_objective(
                    self.forward_func, **{**objective_kwargs, "target": entry}
                )
                results.append(sample(single, inputs[r : r + 1], sampling.seed + r))
            result = _concat(results)
            result.wall_time = time.perf_counter() - start
        else:
            result = sample(objective, inputs, sampling.seed)
        return FiberAttribution(result, invariance_map(result, like=inputs))


class _LayerFiberBase(_FiberAttributionBase):
    """A Captum-style class bound to one layer, like Captum's ``LayerAttribution``."""

    def __init__(self, forward_func: Callable, layer: nn.Module | str):
        super().__init__(forward_func)
        self.layer = layer


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
            As in :func:`captum_objective`. The default preprocess resizes samples from the
            prior's size to the inputs' size (values in [0, 1]), and y* is computed from the
            inputs themselves: the fiber is of the exact value Captum explains.
        config, ndtm_settings:
            An :class:`~fiber_plugins.NDTMConfig` and/or its fields as keywords (``num_steps``,
            ``inner_steps``, ...). NDTM's ``target_mode`` ('static' / 'reapprox') can also be
            set through ``config=NDTMConfig(target_mode=...)``.

        Returns
        -------
        FiberAttribution
            The :class:`FiberResult` and the (R, C, H, W) invariance map.
        """
        sampling = _Sampling(prior, n, seed, batch_size, progress, config, ndtm_settings)
        return self._attribute(
            inputs,
            sampling,
            target=target,
            additional_forward_args=additional_forward_args,
            preprocess=preprocess,
            distance=distance,
        )


class LayerFiber(_LayerFiberBase):
    """Fiber of a layer's whole activation (``LayerActivation``'s quantity), Captum style."""

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
        sampling = _Sampling(prior, n, seed, batch_size, progress, config, ndtm_settings)
        return self._attribute(
            inputs,
            sampling,
            layer=self.layer,
            attribute_to_layer_input=attribute_to_layer_input,
            additional_forward_args=additional_forward_args,
            preprocess=preprocess,
            distance=distance,
        )


class NeuronFiber(_LayerFiberBase):
    """Fiber of one neuron (or a summed block) of a layer, Captum style."""

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
        sampling = _Sampling(prior, n, seed, batch_size, progress, config, ndtm_settings)
        return self._attribute(
            inputs,
            sampling,
            layer=self.layer,
            neuron_selector=neuron_selector,
            attribute_to_layer_input=attribute_to_layer_input,
            additional_forward_args=additional_forward_args,
            preprocess=preprocess,
            distance=distance,
        )

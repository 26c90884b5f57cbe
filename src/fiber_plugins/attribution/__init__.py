"""Captum-style attribution with fiber samples: ``attribute`` returns samples and an invariance map.

A Captum user already names what to explain; :class:`OutputFiber`, :class:`LayerFiber` and
:class:`NeuronFiber` take the same arguments as Captum's classes, build the objective with the
Captum adapter (:func:`~fiber_plugins.adapters.captum.captum_objective`), run the NDTM sampler and
return a :class:`FiberAttribution`: the fiber samples plus a per-pixel *invariance map* (how much
the samples vary per pixel, :func:`invariance_map`), which Captum's own ``visualize_image_attr``
shows through :func:`visualize_invariance`.

The classes and :func:`visualize_invariance` need Captum (``pip install 'fiber-plugins[captum]'``);
importing this package does not import it.

- :mod:`.classes`: :class:`OutputFiber`, :class:`LayerFiber`, :class:`NeuronFiber`;
- :mod:`.invariance`: :class:`FiberAttribution` and :func:`visualize_invariance`
  (:func:`invariance_map` is :func:`fiber_plugins.evaluation.invariance_map`).

Examples
--------
>>> attr = NeuronFiber(model, model.layer4).attribute(images, (7, 3, 3), prior=prior, n=8)  # doctest: +SKIP
>>> fig, ax = visualize_invariance(attr, index=0)                                         # doctest: +SKIP
"""

from __future__ import annotations

from .classes import LayerFiber, NeuronFiber, OutputFiber
from .invariance import FiberAttribution, invariance_map, visualize_invariance

__all__ = [
    "OutputFiber",
    "LayerFiber",
    "NeuronFiber",
    "FiberAttribution",
    "invariance_map",
    "visualize_invariance",
]

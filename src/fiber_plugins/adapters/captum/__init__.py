"""Captum adapter: fiber objectives from ``forward_func`` / ``layer`` / ``neuron_selector`` / ``target``.

A Captum user already names what to explain; this module turns the same names into a
:class:`~fiber_plugins.FiberObjective` and offers Captum-style classes whose ``attribute`` returns
fiber samples plus a per-pixel *invariance map* (how much the fiber samples vary per pixel), which
Captum's own ``visualize_image_attr`` can show next to an attribution map.

Captum is imported lazily: building an objective needs torch alone; the Captum-style classes and
:func:`visualize_invariance` import it (``pip install 'fiber-plugins[captum]'``).

Every name is imported from here; the submodules split the work:

- :mod:`.selection`: what ``neuron_selector`` and ``target`` select
  (:class:`PerExampleTargetObjective` for one target per example);
- :mod:`.objective`: :func:`captum_objective`, Captum's arguments -> a fiber objective;
- :mod:`.attribution`: the Captum-style classes :class:`OutputFiber`, :class:`LayerFiber` and
  :class:`NeuronFiber`;
- :mod:`.invariance`: :class:`FiberAttribution`, :func:`invariance_map` and
  :func:`visualize_invariance`.

Examples
--------
>>> from captum.attr import LayerActivation                        # doctest: +SKIP
>>> LayerActivation(model, model.layer4).attribute(x)              # what the user has
>>> obj = captum_objective(model, layer=model.layer4, neuron_selector=(7, 3, 3))
>>> attr = NeuronFiber(model, model.layer4).attribute(images, (7, 3, 3), prior=prior, n=8)
>>> fig, ax = visualize_invariance(attr, index=0)
"""

from __future__ import annotations

from .attribution import LayerFiber, NeuronFiber, OutputFiber
from .invariance import FiberAttribution, invariance_map, visualize_invariance
from .objective import captum_objective

# not in __all__ (as before the split), but importable from here
from .selection import NeuronSelector as NeuronSelector
from .selection import PerExampleTargetObjective as PerExampleTargetObjective

__all__ = [
    "captum_objective",
    "OutputFiber",
    "LayerFiber",
    "NeuronFiber",
    "FiberAttribution",
    "invariance_map",
    "visualize_invariance",
]

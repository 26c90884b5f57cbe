"""Captum adapter: fiber objectives from ``forward_func`` / ``layer`` / ``neuron_selector`` / ``target``.

A Captum user already names what to explain; this module turns the same names into a
:class:`~fiber_plugins.FiberObjective`. Like every adapter it only builds objectives: the
Captum-style classes whose ``attribute`` runs a sampler (:class:`OutputFiber`,
:class:`LayerFiber`, :class:`NeuronFiber`, :func:`visualize_invariance`) live in
:mod:`fiber_plugins.attribution`.

Building an objective needs torch alone; Captum is never imported here.

Every name is imported from here; the submodules split the work:

- :mod:`.selection`: what ``neuron_selector`` and ``target`` select
  (:class:`PerExampleTargetObjective` for one target per example);
- :mod:`.objective`: :func:`captum_objective`, Captum's arguments -> a fiber objective.

Examples
--------
>>> from captum.attr import LayerActivation                        # doctest: +SKIP
>>> LayerActivation(model, model.layer4).attribute(x)              # what the user has
>>> obj = captum_objective(model, layer=model.layer4, neuron_selector=(7, 3, 3))
"""

from __future__ import annotations

from .objective import captum_objective

# not in __all__ (as before the split), but importable from here
from .selection import NeuronSelector as NeuronSelector
from .selection import PerExampleTargetObjective as PerExampleTargetObjective

__all__ = ["captum_objective"]

"""Adapters: build :class:`~fiber_plugins.FiberObjective` objects from a toolkit's own names.

One module per toolkit (``fiber_plugins.adapters.captum``, ``.timm``, ...). Nothing is imported
here: each adapter imports its toolkit lazily, so ``import fiber_plugins`` needs torch alone.
"""

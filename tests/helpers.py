"""Helpers shared by the test files: hooks left on a model and a model's train/grad state.

One definition for every adapter, objective and sampler test (and the contract suites in
``tests/adapters/test_contract.py`` and ``tests/samplers/test_contract.py``), so that "no hook
left" and "state restored" mean the same thing everywhere.
"""

from __future__ import annotations

from torch import nn


def hook_count(*modules: nn.Module) -> int:
    """Hooks registered on ``modules`` and all their submodules: forward, forward-pre, backward
    and backward-pre hooks, plus the hooks a transformer-lens / vit-prisma ``HookPoint`` keeps in
    its own ``fwd_hooks`` / ``bwd_hooks`` lists (models with a ``hook_dict``)."""
    n = 0
    for model in modules:
        for m in model.modules():
            n += len(m._forward_hooks) + len(m._forward_pre_hooks)
            n += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", ()))
        points = getattr(model, "hook_dict", None) or {}
        for point in points.values():
            n += len(getattr(point, "fwd_hooks", ())) + len(getattr(point, "bwd_hooks", ()))
    return n


def has_no_hooks(*modules: nn.Module) -> bool:
    """True when no hook at all is left on ``modules`` (see :func:`hook_count`)."""
    return hook_count(*modules) == 0


def model_state(*modules: nn.Module) -> tuple[list[bool], list[bool]]:
    """(train/eval flag of every submodule, ``requires_grad`` of every parameter) of ``modules``
    in order: equal before and after use when an objective or sampler gave the state back."""
    training = [m.training for model in modules for m in model.modules()]
    grads = [p.requires_grad for model in modules for p in model.parameters()]
    return training, grads

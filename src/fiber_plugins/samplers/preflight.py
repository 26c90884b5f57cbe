"""Before sampling: the targets y* of a call, and the checks that turn silent no-ops and deep
tracebacks into one-line errors: the subject is on the prior's device, phi passes a gradient to
the image (or is merely inactive at the reference), and the subject can take the prior's image
size."""

from __future__ import annotations

import re

import torch

from .._utils import to_model_range
from ..errors import UserTypeError, UserValueError
from ..images import as_reference_batch, native_references
from ..objectives.targets import Targets


def check_gradient_path(objective, x: torch.Tensor, feats: Targets, at_reference: bool) -> None:
    """Refuse an objective whose features do not depend on the image (guidance would be a
    no-op): the gradient of a random projection of the first row's features with respect
    to its image x (B, C, H, W) (requires grad; ``feats`` computed from it)."""
    w = torch.Generator().manual_seed(1)
    first = [f[:1] for f in feats.parts]
    if not all(bool(torch.isfinite(f).all()) for f in first):
        return  # phi is not finite there: the reference's rows fail with that reason
    with torch.enable_grad():
        probe = torch.stack(
            [(f * torch.randn(f.shape, generator=w).to(f)).sum() for f in first]
        ).sum()
        if not probe.requires_grad:
            grad = None
        else:
            (grad,) = torch.autograd.grad(probe, x, allow_unused=True)
            grad = grad[:1] if grad is not None else None
    x.requires_grad_(False)
    if grad is not None and not bool(grad.abs().sum() > 0) and at_reference:
        if all(bool((f == 0).all()) for f in first):
            raise UserValueError(
                f"phi of {objective.name} is zero at the reference and has no gradient "
                "there: the unit is inactive for this image (a ReLU channel or SAE feature "
                "that does not fire); pick a reference that activates it, or target the "
                "pre-activation (e.g. the layer before the ReLU, pre_activation=True for SAEs)"
            )
    if grad is None or not bool(grad.abs().sum() > 0):
        raise UserValueError(
            f"phi of {objective.name} does not depend on the image: no gradient reaches "
            "the input, so guidance cannot change anything; pick a layer on the path from the "
            "input (and check the model for detach()/no_grad)"
        )


def check_devices(objective, device: torch.device) -> None:
    """Refuse a subject on another device than the prior, naming both."""
    for _, obj in objective.terms():
        model = obj.model
        p = next(model.parameters(), None) if model is not None else None
        if p is not None and p.device != device:
            raise UserValueError(
                f"the subject {type(model).__name__} is on {p.device} but the prior on "
                f"{device}; move one of them (model.to('{device}') or "
                f"prior.to('{p.device}'))"
            )


_SHAPE_WORDS = re.compile(
    r"shape|size|dimension|channels|mat1|expected input|must match", re.IGNORECASE
)


def raise_if_shape_mismatch(err: RuntimeError, prior) -> None:
    """The subject's first forward on prior-sized images failed for its input shape: say so in
    one line with the fix (a user mistake, not a bug)."""
    first = (str(err).strip().splitlines() or [""])[0]
    if _SHAPE_WORDS.search(first):
        c, (h, w) = prior.image_channels, prior.image_size
        raise UserValueError(
            f"the subject cannot take the prior's {c}x{h}x{w} images ({first[:200]}); give the "
            "objective a Preprocess that resizes to the subject's input size "
            "(preprocess=Preprocess(size=...)) or use a prior of that size"
        ) from err


def reference_targets(sampler, references, targets) -> tuple[torch.Tensor | None, Targets]:
    """The targets of a call, with the checks above.

    Parameters
    ----------
    sampler: the :class:`~fiber_plugins.samplers.engine.FiberSampler` (its prior, objective,
        device and autocast); call inside ``objective.attached()``.
    references: anything :func:`~fiber_plugins.images.as_reference_batch` reads, or None.
    targets: explicit targets when ``references`` is None: (K,) or (R, K) (a tuple for sums).

    Returns
    -------
    (references (R, C, H, W) in [0, 1] at the prior's size, or None; y* as
    :class:`~fiber_plugins.objectives.targets.Targets` of R rows, fp32 on the device).

    The subject runs once on the references (or, for explicit targets, once on a grey probe),
    with a graph, so that the same forward gives y* and the gradient check.
    """
    prior, objective, device = sampler.prior, sampler.objective, sampler.device
    if references is None:
        x = torch.zeros(1, prior.image_channels, *prior.image_size, device=device)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        x = (x + 0.01 * noise.to(x)).requires_grad_(True)
        feats = _features(sampler, x)
        check_gradient_path(objective, x, feats, at_reference=False)
        width = feats.widths
        y = Targets.of(objective.check_target(targets, width if len(width) > 1 else width[0]))
        _check_condition(prior, y)
        return None, y.float().to(device)
    refs = as_reference_batch(references, prior.image_size, prior.image_channels)
    # y* = phi(x*) as the subject sees the reference natively: when every term's preprocessing
    # fixes the subject's input size, from the reference at its own resolution (not from the
    # copy resized to the prior's size and back); else from that copy
    views = [r[None] for r in refs]
    if all(term.preprocess.fixes_size for _, term in objective.terms()):
        views = [r[None] for r in native_references(references, prior.image_channels)]
    if len({tuple(v.shape) for v in views}) == 1:
        batches = [torch.cat(views)]
    else:  # references of different sizes: one forward each
        batches = views
    parts = []
    for i, batch in enumerate(batches):
        x = to_model_range(batch.to(device)).requires_grad_(i == 0)
        feats = _features(sampler, x)
        if i == 0:
            check_gradient_path(objective, x, feats, at_reference=True)
        parts.append(feats.map(torch.Tensor.detach))
    feats = Targets.cat(parts)
    y = Targets.of(objective.target_of(feats.value))
    _check_condition(prior, y)
    return refs, y.float().to(device)


def _check_condition(prior, y: Targets) -> None:
    """A conditional fiber model is conditioned on y*: its width is checked before any work."""
    from ..priors.conditional import as_fiber_model

    model = as_fiber_model(prior)
    if model is not None:
        model.check_condition(y.value)


def check_prior(sampler, prior, objective) -> None:
    """What a sampler is given, checked at construction: a ``DiffusionPrior`` (a trained
    conditional fiber model only for samplers that condition on it, with the objective it was
    trained for, or a warning) and a ``FiberObjective``."""
    from ..objectives.base import FiberObjective
    from ..priors.conditional import as_fiber_model
    from ..priors.prior import DiffusionPrior

    if not isinstance(prior, DiffusionPrior):
        raise UserTypeError(f"prior must be a DiffusionPrior, got {type(prior).__name__}")
    if prior.conditional_on_features and not sampler.conditional:
        raise UserTypeError(
            f"{type(sampler).__name__} needs an unconditional prior; a trained "
            "ConditionalFiberModel is sampled with ConditionalFiberSampler, or guided with "
            "NDTMSampler / DPSSampler"
        )
    if not isinstance(objective, FiberObjective):
        raise UserTypeError(f"objective must be a FiberObjective, got {type(objective).__name__}")
    model = as_fiber_model(prior)
    if model is not None:
        from .conditional import check_fiber_model_objective

        check_fiber_model_objective(model, objective)


def _features(sampler, x: torch.Tensor) -> Targets:
    """phi(x) in fp32 under the call's autocast; a subject that cannot take x's size gets one
    line naming Preprocess."""
    try:
        with torch.enable_grad(), sampler.autocast():
            return Targets.of(sampler.objective.features(x)).float()
    except RuntimeError as err:
        raise_if_shape_mismatch(err, sampler.prior)
        raise


def unit_rows(units, references, targets, target_mode: str = "static"):
    """The rows of a call on a :class:`~fiber_plugins.objectives.units.UnitSet`: every unit at
    every reference (unit-major: row u * R + r), or, with ``references`` a dict mapping a unit
    (its position or label) to its own references, each unit at its own. Explicit ``targets``
    (R, K) are shared by every unit alike.

    Returns
    -------
    (the unit set bound to the rows, the row references or None, the row targets or None)
    """
    if target_mode == "reapprox":
        raise UserValueError(
            "a UnitSet needs the static target (target_mode='static'): each row's unit lives in "
            "its target, which a re-approximated target would lose"
        )
    if isinstance(references, dict):
        position = {label: u for u, label in enumerate(units.labels)}
        row_units, rows = [], []
        for key, refs in references.items():
            u = position.get(key, key)
            if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < units.num_units:
                raise UserValueError(
                    f"references key {key!r} is not a unit of {units.name} (a position "
                    f"0..{units.num_units - 1} or a label such as {units.labels[0]!r})"
                )
            listed = (
                list(refs) if isinstance(refs, (list, tuple)) else list(as_reference_batch(refs))
            )
            row_units += [u] * len(listed)
            rows += listed
        return units.bind(row_units), rows, None
    if references is not None:
        listed = (
            list(references)
            if isinstance(references, (list, tuple))
            else list(as_reference_batch(references))
        )
        rows = [ref for _ in range(units.num_units) for ref in listed]
        order = [u for u in range(units.num_units) for _ in listed]
        return units.bind(order), rows, None
    t = torch.as_tensor(targets, dtype=torch.float32)
    t = t[None] if t.dim() == 1 else t
    order = [u for u in range(units.num_units) for _ in range(t.shape[0])]
    return units.bind(order), None, t.repeat(units.num_units, 1)

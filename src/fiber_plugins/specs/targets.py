"""One target grammar for Python and the CLI (``--target``): a string -> a fiber objective.

The grammar names an adapter and its arguments; each form is built by that adapter's public
builder (:mod:`fiber_plugins.adapters`), so objectives never need to know the grammar.

=========================================  ===================================================
form                                       phi
=========================================  ===================================================
``logits`` / ``logits:281``                the model output / one output
``layer:layer4.1`` / ``layer:layer4:1656``  a layer's whole output / one channel (spatial mean)
``embedding``                              ``forward_head(forward_features(x), pre_logits=True)``
``hook:blocks.2.hook_resid_post``          a transformer-lens / vit-prisma hook point
                                           (options ``:token=cls|mean|max|all|INT``)
``crp:layer4:1656`` / ``crp:layer4:3+7``   zennit-crp condition ``{"layer4": [1656]}``;
``crp:y:281``                              ``y`` = output logits (spatial mean of channels)
``sae:blocks.3.hook_resid_post:feature=123``  SAE features at a hook (``feature=all``,
                                           ``feature=1+5``; options ``:pre``, ``:token=...``)
``captum:layer4.1:neuron=(5,2,2)``         Captum ``layer`` + ``neuron_selector``
``output:pooler_output``                   a named output of an ``hf:`` or ``open_clip:``
``output:hidden_states.6:token=mean:42``   subject (options ``:INDEX``, ``:token=...``; for
``output:image_embedding:normalize``       OpenCLIP ``:normalize`` and layer names such as
                                           ``output:visual.transformer.resblocks.3``)
=========================================  ===================================================

For ``hf:`` and ``open_clip:`` subjects, ``logits`` / ``logits:INDEX`` is the named output
``logits`` (``output:logits``), so a model without one is told which outputs it has.

Many units: where a form takes an index (``logits:``, ``layer:NAME:``, ``crp:LAYER:``,
``sae:...:feature=``, ``output:NAME:``), a range ``0-511`` or a list ``3,7,9`` (items may be
ranges: ``0-3,10``) names *units*: one fiber per id, all sampled in one call
(:class:`~fiber_plugins.objectives.units.UnitSet`, labelled ``<form>:<id>``, e.g.
``layer:layer4:7``). Ids joined with ``+`` (``crp:layer4:3+7``, ``feature=1+5``) are one joint
target: the fiber of all of them at once.
"""

from __future__ import annotations

import ast
from typing import TypedDict

from torch import nn

from ..errors import UserValueError
from ..objectives.base import FiberObjective
from ..objectives.preprocess import Preprocess

TARGET_FORMS = (
    "logits",
    "logits:INDEX",
    "layer:NAME",
    "layer:NAME:CHANNEL",
    "layer:NAME:0-511 (units)",
    "embedding",
    "hook:HOOK[:token=T]",
    "crp:LAYER:IDS",
    "sae:HOOK:feature=ID|all[:pre][:token=T]",
    "captum:LAYER[:neuron=TUPLE]",
    "output:NAME[:INDEX][:token=T][:normalize]",
)


class _Common(TypedDict):
    """The keyword arguments every target form passes to its builder."""

    preprocess: Preprocess | None
    distance: str


def _int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserValueError(
            f"{what} in target {spec!r} must be an integer, got {text!r}"
        ) from None


def _options(parts: list[str], spec: str, allowed: tuple[str, ...]) -> dict:
    """``key=value`` and bare flags after the name."""
    opts: dict = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if key not in allowed:
            raise UserValueError(
                f"unknown option {key!r} in target {spec!r}; allowed: {list(allowed)}"
            )
        opts[key] = value if eq else True
    return opts


def _token(value, spec: str):
    if value in (None, True):
        return "cls"
    return int(value) if value.lstrip("-").isdigit() else value


def _ids(text: str, spec: str) -> list[int]:
    """Ids of a joint target: ``3``, ``3+7+9`` (or the old ``3,7`` where units are not allowed)."""
    return [_int(t, "an id", spec) for t in text.replace("+", ",").split(",") if t]


MAX_UNITS = 1_000_000


def unit_ids(text: str, spec: str) -> tuple[list[int], bool]:
    """(ids, whether they are units): ``7`` -> ([7], False); ``3+7`` -> ([3, 7], False), one
    joint target; ``0-3`` or ``3,7,9`` or ``0-3,10`` -> the ids, True, one unit each."""
    if "+" in text:
        return _ids(text, spec), False
    if "," not in text and "-" not in text.lstrip("-"):
        return [_int(text, "an id", spec)], False
    ids: list[int] = []
    for item in text.split(","):
        first, dash, last = item.partition("-")
        if not dash:
            ids.append(_int(item, "an id", spec))
            continue
        a, b = _int(first, "a range start", spec), _int(last, "a range end", spec)
        if a > b or a < 0:
            raise UserValueError(
                f"range {item!r} in target {spec!r} must be START-END with 0 <= START <= END"
            )
        if len(ids) + b - a + 1 > MAX_UNITS:
            raise UserValueError(f"target {spec!r} names more than {MAX_UNITS} units")
        ids.extend(range(a, b + 1))
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise UserValueError(f"target {spec!r} names unit(s) {twice[:5]} more than once")
    return ids, True


def _as_units(site: FiberObjective, ids: list[int], prefix: str) -> FiberObjective:
    """The site's columns as units labelled ``prefix:id`` (its features are the ids in order)."""
    from ..objectives.units import UnitSet

    return UnitSet.of(site, units=list(range(len(ids))), labels=[f"{prefix}:{i}" for i in ids])


def _named_output(model: nn.Module, spec: str, name: str, parts: list[str], common: _Common):
    """``output:NAME[:INDEX][:token=T][:normalize]`` for a Hugging Face or OpenCLIP subject."""
    from ..adapters.hf import hf_objective, is_hf_model
    from ..adapters.open_clip import is_open_clip_model, open_clip_objective

    positional = [
        p
        for p in parts
        if "=" not in p and p.replace(",", "").replace("+", "").replace("-", "").isdigit()
    ]
    if len(positional) > 1:
        raise UserValueError(f"target {spec!r} gives more than one index: {positional}")
    opts = _options([p for p in parts if p not in positional], spec, ("token", "normalize"))
    index: int | list[int] | None = None
    ids: list[int] = []
    units = False
    if positional:
        ids, units = unit_ids(positional[0], spec)
        index = ids if units or len(ids) > 1 else ids[0]
    token = None if opts.get("token") is None else _token(opts["token"], spec)
    if units:
        if token == "all":
            raise UserValueError(f"target {spec!r}: units need token=cls|mean|max|INT, not 'all'")
        joint = ["+".join(map(str, ids)) if p in positional else p for p in parts]
        site = _named_output(model, spec, name, joint, common)
        return _as_units(site, ids, f"output:{name}")
    if is_hf_model(model):
        if "normalize" in opts:
            raise UserValueError(
                f"option 'normalize' in target {spec!r} is for open_clip: subjects"
            )
        return hf_objective(model, name, token=token, index=index, name=spec, **common)
    if is_open_clip_model(model):
        return open_clip_objective(
            model,
            name,
            normalize=bool(opts.get("normalize", False)),
            token=token,
            index=index,
            name=spec,
            **common,
        )
    raise UserValueError(
        f"target {spec!r} names an output of a Hugging Face or OpenCLIP subject (hf:FOLDER, "
        f"open_clip:ARCH); {type(model).__name__} is neither: use 'layer:NAME' or 'logits'"
    )


def _named_outputs(model: nn.Module) -> bool:
    from ..adapters.hf import is_hf_model
    from ..adapters.open_clip import is_open_clip_model

    return is_hf_model(model) or is_open_clip_model(model)


def objective_from_spec(
    model: nn.Module,
    spec: str,
    preprocess: Preprocess | None = None,
    distance: str = "l2",
    sae=None,
) -> FiberObjective:
    """Build a :class:`FiberObjective` from a target string (see the module docstring).

    ``sae`` is needed for ``sae:`` targets (a :class:`~fiber_plugins.adapters.sae.SparseAutoencoder`,
    a vit-prisma SAE or a SAELens SAE).
    """
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    common: _Common = {"preprocess": preprocess, "distance": distance}
    if kind == "logits":
        if len(parts) > 1:
            raise UserValueError(f"target {spec!r}: use 'logits' or 'logits:INDEX'")
        if _named_outputs(model):
            return _named_output(model, spec, "logits", parts, common)
        if not parts:
            return FiberObjective(model, name=spec, **common)
        ids, units = unit_ids(parts[0], spec)
        index = ids if units or len(ids) > 1 else ids[0]
        site = FiberObjective(model, index=index, name=spec, **common)
        return _as_units(site, ids, "logits") if units else site
    if kind == "layer":
        if not parts or len(parts) > 2:
            raise UserValueError(f"target {spec!r} must be 'layer:NAME' or 'layer:NAME:CHANNEL'")
        if len(parts) == 1:
            return FiberObjective(model, layer=parts[0], reduction="none", name=spec, **common)
        ids, units = unit_ids(parts[1], spec)
        index = ids if units or len(ids) > 1 else ids[0]
        site = FiberObjective(
            model, layer=parts[0], index=index, reduction="auto", name=spec, **common
        )
        return _as_units(site, ids, f"layer:{parts[0]}") if units else site
    if kind == "embedding" and not parts:
        if not (hasattr(model, "forward_head") and hasattr(model, "forward_features")):
            raise UserValueError(
                f"target 'embedding' needs a timm-style model with forward_features/forward_head; "
                f"{type(model).__name__} has none: use 'layer:NAME' instead"
            )
        from ..adapters.timm import timm_objective  # timm itself is not imported

        return timm_objective(
            model,
            "embedding",
            preprocess=Preprocess() if preprocess is None else preprocess,
            distance=distance,
            name=spec,
        )
    if kind == "hook" and parts:
        from ..adapters.lens import lens_objective

        opts = _options(parts[1:], spec, ("token",))
        return lens_objective(
            model, parts[0], token=_token(opts.get("token"), spec), name=spec, **common
        )
    if kind == "crp" and len(parts) == 2:
        from ..adapters.crp import crp_objective

        ids, units = unit_ids(parts[1], spec)
        obj = crp_objective(model, {parts[0]: ids}, **common)
        obj.name = spec
        return _as_units(obj, ids, f"crp:{parts[0]}") if units else obj
    if kind == "sae" and parts:
        from ..adapters.sae import sae_objective

        if sae is None:
            raise UserValueError(f"target {spec!r} needs an SAE: pass sae=... (CLI: --sae FOLDER)")
        opts = _options(parts[1:], spec, ("feature", "pre", "token"))
        feat = opts.get("feature", "all")
        features: int | list[int] | None
        feature_units = False
        feature_ids: list[int] = []
        if feat not in ("all", True):
            feature_ids, feature_units = unit_ids(str(feat), spec)
        features = None
        if feature_ids:
            one = len(feature_ids) == 1 and not feature_units
            features = feature_ids[0] if one else feature_ids
        if feature_units and opts.get("token") == "all":
            raise UserValueError(
                f"target {spec!r}: units need one value per feature; use token=cls|mean|max|INT"
            )
        site = sae_objective(
            model,
            parts[0],
            sae,
            features=features,
            pre_activation=bool(opts.get("pre", False)),
            token_reduction=_token(opts.get("token"), spec),
            name=spec,
            **common,
        )
        return _as_units(site, feature_ids, f"sae:{parts[0]}") if feature_units else site
    if kind == "captum" and parts:
        from ..adapters.captum import captum_objective

        opts = _options(parts[1:], spec, ("neuron",))
        neuron = None
        if "neuron" in opts:
            try:
                neuron = ast.literal_eval(str(opts["neuron"]))
            except (ValueError, SyntaxError):
                raise UserValueError(
                    f"neuron in target {spec!r} must be an int or a tuple like (5,2,2), "
                    f"got {opts['neuron']!r}"
                ) from None
        return captum_objective(model, layer=parts[0], neuron_selector=neuron, name=spec, **common)
    if kind == "output" and parts and parts[0]:
        return _named_output(model, spec, parts[0], parts[1:], common)
    raise UserValueError(f"unknown target {spec!r}; valid forms: {', '.join(TARGET_FORMS)}")

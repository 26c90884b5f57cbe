"""The duck-typed SAE contract (see :mod:`fiber_plugins.adapters.sae`): widths, features and
pre-activations of SAELens, vit-prisma and this package's SAEs, and the feature selection."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...errors import UserIndexError, UserTypeError, UserValueError


# ---------------------------------------------------------------------------- duck-typed SAE
def _as_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def sae_widths(sae: Any) -> tuple[int | None, int | None]:
    """(d_in, d_sae) of any SAE following the contract; None where it cannot be told."""
    cfg = getattr(sae, "cfg", None)
    d_in = _as_int(getattr(cfg, "d_in", None)) or _as_int(getattr(sae, "d_in", None))
    d_sae = _as_int(getattr(cfg, "d_sae", None)) or _as_int(getattr(sae, "d_sae", None))
    w = getattr(sae, "W_enc", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        d_in = d_in or int(w.shape[0])
        d_sae = d_sae or int(w.shape[1])
    return d_in, d_sae


def _sae_hook_name(sae: Any) -> str | None:
    cfg = getattr(sae, "cfg", None)
    for holder, attr in ((cfg, "hook_point"), (cfg, "hook_name"), (sae, "hook_name")):
        value = getattr(holder, attr, None)
        if isinstance(value, str):
            return value
    meta = getattr(cfg, "metadata", None)  # SAELens >= 6 keeps it in cfg.metadata
    value = getattr(meta, "hook_name", None)
    return value if isinstance(value, str) else None


def _sae_dtype(sae: Any) -> torch.dtype | None:
    w = getattr(sae, "W_enc", None)
    return w.dtype if isinstance(w, torch.Tensor) else None


def sae_features(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Feature activations of ``x`` (..., d_in) -> (..., d_sae) under the SAE contract."""
    out = sae.encode(x)
    if isinstance(out, (tuple, list)):  # vit-prisma: (sae_in, feature_acts[, hidden_pre])
        if len(out) < 2 or not isinstance(out[1], torch.Tensor):
            raise UserTypeError(
                f"{type(sae).__name__}.encode returned a {len(out)}-tuple; the contract is a "
                "tensor of features or (sae_in, feature_acts[, hidden_pre])"
            )
        return out[1]
    if not isinstance(out, torch.Tensor):
        raise UserTypeError(
            f"{type(sae).__name__}.encode returned {type(out).__name__}, not a tensor"
        )
    return out


def _capture(module: nn.Module, run) -> torch.Tensor | None:
    seen: list[torch.Tensor] = []

    def hook(mod, args, output):
        if not seen and isinstance(output, torch.Tensor):
            seen.append(output)

    handle = module.register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen[0] if seen else None


def sae_pre_activation(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """Encoder pre-activations of ``x`` (..., d_in) -> (..., d_sae); see the module docstring."""
    method = getattr(sae, "pre_activation", None)
    if callable(method):
        return method(x)
    try:
        params = inspect.signature(sae.encode).parameters
    except (TypeError, ValueError):
        params = inspect.Signature().parameters  # no signature: no parameters
    if "return_hidden_pre" in params:  # vit-prisma's standard SAE
        out = sae.encode(x, return_hidden_pre=True)
        if isinstance(out, (tuple, list)) and len(out) >= 3:
            return out[2]
    for attr in ("hook_sae_acts_pre", "hook_hidden_pre"):  # SAELens, vit-prisma
        point = getattr(sae, attr, None)
        if isinstance(point, nn.Module):
            pre = _capture(point, lambda: sae.encode(x))
            if pre is not None:
                return pre
    w = getattr(sae, "W_enc", None)
    # a gated SAE's features are on where the gate pre-activation is positive
    bias = getattr(sae, "b_gate", None)
    bias = bias if isinstance(bias, torch.Tensor) else getattr(sae, "b_enc", None)
    if isinstance(w, torch.Tensor) and isinstance(bias, torch.Tensor):
        process = getattr(sae, "process_sae_in", None)
        if callable(process):  # SAELens: dtype, input normalisation, minus b_dec
            sae_in = process(x)
        else:
            norm = getattr(sae, "run_time_activation_norm_fn_in", None)  # vit-prisma
            sae_in = norm(x) if callable(norm) else x
            b_dec = getattr(sae, "b_dec", None)
            sae_in = sae_in - b_dec if isinstance(b_dec, torch.Tensor) else sae_in
        return sae_in @ w + bias
    raise UserTypeError(
        f"cannot compute pre-activations of {type(sae).__name__}: give it a pre_activation(x) "
        "method, a hook_sae_acts_pre / hook_hidden_pre hook point, or W_enc and b_enc"
    )


def _check_features(features: Any, d_sae: int | None) -> list[int] | slice | None:
    if features is None or isinstance(features, slice):
        return features
    if isinstance(features, bool):
        raise UserTypeError(f"features must be None, an int or a list of ints, got {features!r}")
    if isinstance(features, int):
        ids = [features]
    elif isinstance(features, torch.Tensor) and features.dim() <= 1:
        ids = [int(i) for i in features.reshape(-1).tolist()]
    elif isinstance(features, Sequence) and not isinstance(features, str):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in features):
            raise UserTypeError(f"features must be ints, got {list(features)!r}")
        ids = [int(i) for i in features]
    else:
        raise UserTypeError(
            f"features must be None, an int, a list of ints or a slice, got {type(features).__name__}"
        )
    if not ids:
        raise UserValueError("features is empty; pass None for all features")
    for i in ids:
        if i < 0 or (d_sae is not None and i >= d_sae):  # no negatives: one feature, one name
            valid = f"valid: 0..{d_sae - 1}" if d_sae is not None else "valid: ids >= 0"
            size = f"an SAE with {d_sae} features" if d_sae is not None else "an SAE"
            raise UserIndexError(f"feature {i} is out of range for {size} ({valid})")
    return ids

"""`SAEObjective` and `sae_objective`: SAE features at a hook of the subject as phi."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..._utils import frozen
from ...errors import UserTypeError, UserValueError
from ...objectives.distances import Distance
from ...objectives.preprocess import Preprocess
from ..lens import HookObjective, Token, reduce_tokens
from .contract import (
    _check_features,
    _sae_dtype,
    _sae_hook_name,
    sae_features,
    sae_pre_activation,
    sae_widths,
)


class SAEObjective(HookObjective):
    """SAE features at a hook: encode(tokens) -> token reduction -> feature selection.

    The activation is flattened to (B, tokens, width) (heads and d_head of ``attn.hook_z`` are
    joined; the 4-d output of a plain submodule, a (B, C, H, W) map, is refused), checked
    against the SAE's ``d_in``, encoded per token, reduced over tokens and
    restricted to ``features``. For 'cls' or one position only that token is encoded; 'mean' and
    'max' pool the features of all tokens (not the features of the pooled activation).
    While attached the SAE, like the model, is in eval mode without parameter gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        hook: str,
        sae: Any,
        features: int | Sequence[int] | slice | None = None,
        pre_activation: bool = False,
        token: Token = "cls",
        preprocess: Preprocess | dict | None = None,
        distance: str | Distance = "l2",
        name: str | None = None,
    ):
        if not callable(getattr(sae, "encode", None)):
            raise UserTypeError(
                f"sae must have an encode(x) method (SparseAutoencoder, a SAELens SAE or a "
                f"vit-prisma SparseAutoencoder), got {type(sae).__name__}"
            )
        self.sae = sae
        self.use_pre_activation = bool(pre_activation)
        self.d_in, self.d_sae = sae_widths(sae)
        self.features_index = _check_features(features, self.d_sae)
        label = f"{type(model).__name__}:{hook}:{token}:sae"
        if self.features_index is not None:
            label += f"[{features}]"
        label += ":pre" if self.use_pre_activation else ""
        super().__init__(
            model,
            hook,
            token=token,
            index=None,
            preprocess=preprocess,
            distance=distance,
            name=name or label,
            adapter="sae",
            allow_modules=True,
        )
        self.hook_index = features
        hooks = getattr(model, "hook_dict", None)
        # a named hook point of a hooked transformer has a token axis at dim 1 (attn.hook_z's
        # (B, pos, heads, d_head) joins heads x d_head); a plain submodule's 4-d output is a map
        self.on_hook_point = isinstance(hooks, Mapping) and hook in hooks

    @contextlib.contextmanager
    def attached(self) -> Iterator[SAEObjective]:
        """Attach the hook and hold the SAE, like the model, in eval mode without parameter
        gradients for the block.
        """
        with super().attached(), frozen(self.sae):
            yield self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # the SAE runs in the selection step, after the model's forward: keep it frozen there too
        """phi(x): images (B, C, H, W) in [-1, 1] -> selected SAE features (B, K)."""
        with self.attached():
            return super().features(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """SAE features (or pre-activations) of activations (..., d_in) -> (..., d_sae)."""
        dtype = _sae_dtype(self.sae)
        if dtype is not None and x.dtype != dtype:
            x = x.to(dtype)
        if self.use_pre_activation:
            return sae_pre_activation(self.sae, x)
        return sae_features(self.sae, x)

    def _select(self, act: torch.Tensor) -> torch.Tensor:
        act = self.convert(act)
        if act.dim() > 3 and not self.on_hook_point:
            # (B, C, H, W) read as (B, C, H*W) would encode channels as tokens, silently wrong
            shape = ", ".join(["B", *(str(n) for n in act.shape[1:])])
            raise UserValueError(
                f"{self.where} has output ({shape}): no token axis; an SAE reads (B, tokens, d) "
                "or (B, d) activations (a transformer block's output): pick such a layer, or "
                "wrap the model so that the layer gives (B, H*W, C) tokens"
            )
        if act.dim() > 3:
            act = act.flatten(2)
        width = act.shape[-1]
        if self.d_in is not None and width != self.d_in:
            own = _sae_hook_name(self.sae)
            hint = f" (the SAE was trained on {own!r})" if own else ""
            raise UserValueError(
                f"SAE input width {self.d_in} does not match {self.where}, whose activations have "
                f"width {width} (shape {tuple(act.shape)}); pick the hook the SAE was "
                f"trained on{hint}"
            )
        if self.token in ("mean", "max"):
            feats = reduce_tokens(self.encode(act), self.token, 1, self.where)
        else:
            feats = self.encode(reduce_tokens(act, self.token, 1, self.where))
        if self.d_sae is not None and feats.shape[-1] != self.d_sae:
            raise UserValueError(
                f"{type(self.sae).__name__}.encode returned width {feats.shape[-1]}, "
                f"expected d_sae={self.d_sae}"
            )
        if self.features_index is not None:
            feats = feats[..., self.features_index]
        return feats

    def describe(self) -> dict:
        """JSON-safe description: the hook objective's plus the SAE's class, its widths and
        whether pre-activations are matched."""
        out = super().describe()
        out.update(
            sae=type(self.sae).__name__,
            d_in=self.d_in,
            d_sae=self.d_sae,
            pre_activation=self.use_pre_activation,
        )
        return out


def sae_objective(
    model: nn.Module,
    hook: str,
    sae: Any,
    features: int | Sequence[int] | slice | None = None,
    pre_activation: bool = False,
    token_reduction: Token = "cls",
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> SAEObjective:
    """Fiber objective on SAE features of the activation at ``hook``.

    Parameters
    ----------
    model:
        The subject: a ``HookedViT`` / ``HookedRootModule`` (``hook`` is a key of
        ``model.hook_dict``) or any ``nn.Module`` (``hook`` is a submodule name whose output is
        recorded, e.g. ``"blocks.5"`` of a timm ViT).
    hook:
        Where the SAE reads its input, e.g. ``"blocks.5.hook_resid_post"``.
    sae:
        :class:`SparseAutoencoder`, a SAELens ``SAE`` or a vit-prisma ``SparseAutoencoder``
        (see the contract in the module docstring).
    features:
        ``None`` (the whole code, d_sae values), one feature id or a list of ids.
    pre_activation:
        Match encoder pre-activations instead of feature activations (nonzero gradient where a
        ReLU / TopK feature is inactive).
    token_reduction:
        ``'cls'`` (position 0), ``'mean'`` / ``'max'`` of the per-token features, an int patch
        position, or ``'all'`` (every token's features).
    preprocess, distance:
        As for :class:`~fiber_plugins.FiberObjective`.

    Returns
    -------
    SAEObjective
        Features (B, K): K = number of selected features (times tokens for 'all').

    Raises
    ------
    KeyError
        Unknown hook name (closest names quoted).
    IndexError
        A feature id outside 0..d_sae-1.
    ValueError
        (on the first forward) the hook's width differs from the SAE's ``d_in``, or a plain
        submodule gives a (B, C, H, W) map, which has no token axis.
    """
    return SAEObjective(
        model, hook, sae, features, pre_activation, token_reduction, preprocess, distance, name
    )

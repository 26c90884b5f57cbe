"""vit-prisma adapter: ``HookedViT`` hook names as fiber objectives.

A vit-prisma user reads activations with ``model.run_with_cache(images)`` under the names of
``model.hook_dict``: ``hook_embed`` (patches only, no CLS), ``hook_pos_embed``,
``blocks.{L}.hook_resid_pre`` / ``hook_resid_mid`` / ``hook_resid_post`` (B, 1 + patches,
d_model), ``blocks.{L}.attn.hook_q`` / ``hook_k`` / ``hook_v`` / ``hook_z`` (B, tokens, heads,
d_head), ``blocks.{L}.attn.hook_pattern`` / ``hook_attn_scores`` (B, heads, q, k),
``blocks.{L}.mlp.hook_pre`` / ``hook_post`` (B, tokens, d_mlp), ``blocks.{L}.hook_mlp_out``,
``ln_final.hook_normalized``. :func:`prisma_objective` takes the same name; for SAE features on
such a hook see :func:`fiber_plugins.adapters.sae.sae_objective`.

vit-prisma keeps its own copy of the hook machinery (``vit_prisma.prisma_tools``), so this module
relies only on ``model.hook_dict`` and never imports vit-prisma.

Examples
--------
>>> _, cache = model.run_with_cache(images)                           # doctest: +SKIP
>>> cache["blocks.5.hook_resid_post"][:, 0]                           # what the user has
>>> obj = prisma_objective(model, "blocks.5.hook_resid_post", token="cls",
...                        preprocess=Preprocess(size=224, mean=CLIP_MEAN, std=CLIP_STD))
"""

from __future__ import annotations

from torch import nn

from ..errors import UserValueError
from ..objectives.distances import Distance
from ..objectives.preprocess import Preprocess
from ..objectives.selection import Index
from .lens import HookObjective, Token, check_token, hook_dict

__all__ = ["prisma_objective"]


def prisma_objective(
    model: nn.Module,
    hook_name: str,
    token: Token = "cls",
    index: Index = None,
    preprocess: Preprocess | dict | None = None,
    distance: str | Distance = "l2",
    name: str | None = None,
) -> HookObjective:
    """Fiber objective on a ``HookedViT`` hook point.

    Parameters
    ----------
    model:
        A vit-prisma ``HookedViT`` (any module with a ``hook_dict`` works).
    hook_name:
        A key of ``model.hook_dict``, e.g. ``"blocks.5.hook_resid_post"`` or
        ``"blocks.5.attn.hook_z"``; unknown names raise a KeyError with the closest names.
    token:
        ``'cls'`` (position 0, the CLS token), ``'mean'`` / ``'max'`` over all positions, an int
        position (1.. are the patches, row-major), or ``'all'``.
    index:
        Selection after the token reduction: an int / list picks model dimensions of a residual
        hook or heads of ``attn.hook_z`` (B, heads, d_head); a tuple ``(head, d)`` one unit.
    preprocess:
        Prior space ([-1, 1]) -> model input: the model's image size and normalisation, e.g.
        ``Preprocess(size=224, mean=..., std=...)``.

    Returns
    -------
    HookObjective
        Features (B, K) equal to ``run_with_cache(images)[1][hook_name]`` reduced the same way.

    Raises
    ------
    KeyError
        Unknown hook name.
    ValueError
        ``token='cls'`` on ``hook_embed`` (patch embeddings carry no CLS token) or on a model
        without a CLS token (``cfg.classification_type != 'cls'``).
    """
    hook_dict(model)
    check_token(token)
    if token == "cls":
        kind = getattr(getattr(model, "cfg", None), "classification_type", "cls")
        if hook_name == "hook_embed":
            raise UserValueError(
                "hook_embed holds the patch embeddings only (the CLS token is prepended after "
                "it); use token=0.. for a patch, 'mean' or 'max', or a later hook for the CLS token"
            )
        if kind != "cls":
            raise UserValueError(
                f"{type(model).__name__} has classification_type={kind!r} and no CLS token; "
                "use token='mean', 'max' or an int position"
            )
    return HookObjective(model, hook_name, token, index, preprocess, distance, name, "prisma")

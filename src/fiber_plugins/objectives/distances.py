"""Distances d(phi(x), y*) between feature batches, one value per sample.

Every distance takes ``features`` (B, K) and ``target`` (B, K) or (1, K) and returns (B,).
They are summed over features, never averaged over the batch, so one sample's loss does not
depend on which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UserValueError

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def squared_l2(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_k (f_k - y_k)^2: the paper's fiber loss (Eq. 3).

    Parameters
    ----------
    features:
        (B, K) features phi(x).
    target:
        (B, K) targets y*, one per row, or (1, K) shared by all rows.

    Returns
    -------
    torch.Tensor
        (B,) squared L2 distance of each row.
    """
    return (features - target).pow(2).sum(dim=1)


def l1(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_k |f_k - y_k|.

    Parameters
    ----------
    features:
        (B, K) features phi(x).
    target:
        (B, K) targets y*, one per row, or (1, K) shared by all rows.

    Returns
    -------
    torch.Tensor
        (B,) L1 distance of each row.
    """
    return (features - target).abs().sum(dim=1)


def cosine(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cos(f, y): ignores the norm of the representation.

    Parameters
    ----------
    features:
        (B, K) features phi(x).
    target:
        (B, K) targets y*, one per row, or (1, K) shared by all rows.

    Returns
    -------
    torch.Tensor
        (B,) cosine distance, in [0, 2], of each row.
    """
    return 1.0 - F.cosine_similarity(features, target.expand_as(features), dim=1, eps=1e-8)


def kl_logits(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(softmax(y) || softmax(f)) for logit vectors: the class distribution of the reference.

    Parameters
    ----------
    features:
        (B, K) logits phi(x).
    target:
        (B, K) target logits y*, one per row, or (1, K) shared by all rows.

    Returns
    -------
    torch.Tensor
        (B,) KL divergence of each row (the softmax is taken over the K entries).
    """
    log_p = F.log_softmax(target.expand_as(features), dim=1)
    log_q = F.log_softmax(features, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


DISTANCES: dict[str, Distance] = {
    "l2": squared_l2,
    "l1": l1,
    "cosine": cosine,
    "kl": kl_logits,
}


def get_distance(distance: str | Distance) -> Distance:
    """Resolve a distance by name ('l2', 'l1', 'cosine', 'kl') or pass a callable through.

    Parameters
    ----------
    distance:
        A name in :data:`DISTANCES` or a callable ``d(features (B, K), target (B, K) or
        (1, K)) -> (B,)``.

    Returns
    -------
    Distance
        The distance function (a callable is returned unchanged).

    Raises
    ------
    UserValueError
        ``distance`` is an unknown name.
    """
    if callable(distance):
        return distance
    try:
        return DISTANCES[distance]
    except KeyError:
        raise UserValueError(
            f"unknown distance {distance!r}; choose one of {sorted(DISTANCES)} or pass a callable"
        ) from None

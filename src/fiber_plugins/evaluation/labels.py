"""Label-based measures on fibers: do other classifiers see a fiber as its reference?

A fiber sample is indistinguishable from its reference for the subject; a classifier that labels
it differently sees what the subject does not. These functions turn classifier outputs into the
paper's numbers: agreement of a second classifier on a first one's fiber (paper Sec. 4.4, single-
and multi-label), top-k accuracy of fiber samples (paper Table 2) and the shape/texture label
preference on cue-conflict images (Geirhos et al. 2019, paper Fig. 8).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import UserValueError

__all__ = [
    "classifier_agreement",
    "multilabel_agreement",
    "topk_accuracy",
    "category_probabilities",
    "label_preference",
]


def classifier_agreement(
    model_a: Callable[[torch.Tensor], torch.Tensor],
    model_b: Callable[[torch.Tensor], torch.Tensor],
    references01: torch.Tensor,
    samples01: torch.Tensor,
) -> dict:
    """How often model B keeps model A's label on A's fiber samples (paper Sec. 4.4).

    Parameters
    ----------
    model_a, model_b:
        Callables mapping (B, C, H, W) images to (B, classes) scores.
    references01:
        (R, C, H, W) references, in the models' input space.
    samples01:
        (R, M, C, H, W) fiber samples of A, M per reference.

    Returns
    -------
    ``{"a": ..., "b": ...}``: the fraction of samples whose argmax under A (resp. B) equals A's
    label of their reference. A stays near 1 on its own fiber; a low B value means the fiber of A
    contains images B sees differently.
    """
    with torch.no_grad():
        label = model_a(references01).argmax(1)
        flat = samples01.reshape(-1, *samples01.shape[2:])
        expect = label.repeat_interleave(samples01.shape[1])
        agree_a = (model_a(flat).argmax(1) == expect).float().mean()
        agree_b = (model_b(flat).argmax(1) == expect).float().mean()
    return {"a": float(agree_a), "b": float(agree_b)}


def _thresholds(value: float | Sequence[float] | torch.Tensor, k: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(k)
    if t.numel() != k:
        raise UserValueError(f"{what} has {t.numel()} values for {k} classes; give 1 or {k}")
    return t


def multilabel_agreement(
    probabilities_b: torch.Tensor,
    labels: torch.Tensor,
    thresholds_b: float | Sequence[float] | torch.Tensor = 0.5,
) -> torch.Tensor:
    """Per class, the share of fiber samples whose label under classifier B stays the original
    label (paper Sec. 4.4, CheXpert: "both classifiers stay with the original label").

    Parameters
    ----------
    probabilities_b:
        (R, M, K) probabilities of classifier B on the M fiber samples of each of R references
        (sigmoid outputs of a multi-label classifier).
    labels:
        (R, K) the original labels (0/1) of the references, on which both classifiers were right.
    thresholds_b:
        B's decision threshold: one for all classes or one per class (K).

    Returns
    -------
    (K,) agreement rate per class in [0, 1].
    """
    if probabilities_b.dim() != 3 or labels.shape != (
        probabilities_b.shape[0],
        probabilities_b.shape[2],
    ):
        raise UserValueError(
            f"probabilities_b must be (R, M, K) and labels (R, K); got "
            f"{tuple(probabilities_b.shape)} and {tuple(labels.shape)}"
        )
    t = _thresholds(thresholds_b, probabilities_b.shape[2], "thresholds_b")
    decided = probabilities_b >= t
    return (decided == labels.bool()[:, None, :]).float().mean(dim=(0, 1))


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Share of rows whose label is among the k highest scores (paper Table 2: top-5 accuracy of
    a classifier on fiber samples instead of the originals).

    Parameters
    ----------
    scores:
        (N, classes) logits or probabilities.
    labels:
        (N,) integer class labels.
    k:
        How many top classes count (at most the number of classes).
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise UserValueError(
            f"scores must be (N, classes) and labels (N,); got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not 1 <= k <= scores.shape[1]:
        raise UserValueError(f"k={k} must be between 1 and the number of classes {scores.shape[1]}")
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def category_probabilities(
    probabilities: torch.Tensor, categories: Mapping[str, Sequence[int]]
) -> tuple[list[str], torch.Tensor]:
    """Aggregate fine-class probabilities into categories by their mean over each category's
    classes (the 16-class ImageNet decision of Geirhos et al. 2019).

    Parameters
    ----------
    probabilities:
        (N, classes) softmax probabilities.
    categories:
        Category name -> the class indices it covers (non-empty, within range).

    Returns
    -------
    (names, (N, len(names)) category probabilities), names sorted.
    """
    names = sorted(categories)
    if not names:
        raise UserValueError("categories is empty: give at least one name -> class indices")
    cols = []
    for name in names:
        idx = [int(i) for i in categories[name]]
        if not idx or min(idx) < 0 or max(idx) >= probabilities.shape[1]:
            raise UserValueError(
                f"category {name!r} has class indices {idx[:5]}...: they must be non-empty and "
                f"within 0..{probabilities.shape[1] - 1}"
            )
        cols.append(probabilities[:, idx].mean(1))
    return names, torch.stack(cols, 1)


def label_preference(
    decisions: Sequence[str], shapes: Sequence[str], textures: Sequence[str]
) -> dict:
    """Shape versus texture label preference on cue-conflict images (Geirhos et al. 2019).

    Images whose shape and texture labels are equal are left out. Among the rest, a decision
    that equals exactly one of the two labels counts for that cue.

    Parameters
    ----------
    decisions, shapes, textures:
        One category name per image: the classifier's decision, the shape label, the texture
        label.

    Returns
    -------
    ``{"shape": share, "texture": share, "decided": n, "images": n, "shape_accuracy": ...,
    "texture_accuracy": ...}``: the shares of shape / texture decisions among the ``decided``
    images (NaN when none), and each label's accuracy over all conflicting ``images``.
    """
    if not len(decisions) == len(shapes) == len(textures):
        raise UserValueError(
            f"decisions, shapes and textures must be equally long; got {len(decisions)}, "
            f"{len(shapes)}, {len(textures)}"
        )
    rows = [(d, s, t) for d, s, t in zip(decisions, shapes, textures, strict=True) if s != t]
    shape_hits = sum(d == s for d, s, _ in rows)
    texture_hits = sum(d == t for d, _, t in rows)
    decided = shape_hits + texture_hits
    nan = float("nan")
    return {
        "shape": shape_hits / decided if decided else nan,
        "texture": texture_hits / decided if decided else nan,
        "decided": decided,
        "images": len(rows),
        "shape_accuracy": shape_hits / len(rows) if rows else nan,
        "texture_accuracy": texture_hits / len(rows) if rows else nan,
    }

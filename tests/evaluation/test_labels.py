"""Label-based fiber measures against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from fiber_plugins.errors import UserValueError
from fiber_plugins.evaluation import (
    category_probabilities,
    label_preference,
    multilabel_agreement,
    topk_accuracy,
)


def test_multilabel_agreement_by_hand():
    # 2 references x 2 samples x 3 classes
    probs = torch.tensor(
        [
            [[0.9, 0.2, 0.6], [0.4, 0.1, 0.7]],
            [[0.1, 0.8, 0.2], [0.2, 0.9, 0.9]],
        ]
    )
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    out = multilabel_agreement(probs, labels, 0.5)
    # class 0: ref0 samples 1,0 vs label 1 -> 1/2; ref1 0,0 vs 0 -> 2/2: 3/4
    # class 1: ref0 0,0 vs 0 -> 2; ref1 1,1 vs 1 -> 2: 4/4
    # class 2: ref0 1,1 vs 1 -> 2; ref1 0,1 vs 0 -> 1: 3/4
    assert out.tolist() == [0.75, 1.0, 0.75]
    per_class = multilabel_agreement(probs, labels, [0.3, 0.5, 0.95])
    # class 0 at 0.3: ref0 1,1 -> 2; ref1 0,0 -> 2 = 1; class 2 at 0.95: ref0 0,0 -> 0; ref1 0,0 -> 2
    assert per_class.tolist() == [1.0, 1.0, 0.5]


def test_multilabel_agreement_bad_shapes():
    with pytest.raises(UserValueError, match=r"\(R, M, K\)"):
        multilabel_agreement(torch.rand(2, 3), torch.zeros(2, 3))
    with pytest.raises(UserValueError, match="2 values for 3 classes"):
        multilabel_agreement(torch.rand(2, 1, 3), torch.zeros(2, 3), [0.5, 0.5])


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    assert topk_accuracy(scores, labels, k=1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, k=2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, k=3) == 1.0
    with pytest.raises(UserValueError, match="k=4"):
        topk_accuracy(scores, labels, k=4)


def test_category_probabilities_mean_over_members():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    names, cat = category_probabilities(probs, {"dog": [0, 1], "cat": [3]})
    assert names == ["cat", "dog"]
    assert torch.allclose(cat, torch.tensor([[0.4, 0.15]]))
    with pytest.raises(UserValueError, match="'cat'"):
        category_probabilities(probs, {"cat": [4]})


def test_label_preference_by_hand():
    decisions = ["cat", "dog", "cat", "car", "bear"]
    shapes = ["cat", "cat", "dog", "car", "bear"]
    textures = ["dog", "dog", "cat", "bird", "bear"]  # last one: no conflict, left out
    out = label_preference(decisions, shapes, textures)
    # conflicting images: 4; shape hits: 0 (cat) and 3 (car) = 2; texture hits: 1, 2 = 2
    assert out == {
        "shape": 0.5,
        "texture": 0.5,
        "decided": 4,
        "images": 4,
        "shape_accuracy": 0.5,
        "texture_accuracy": 0.5,
    }
    none = label_preference(["x"], ["a"], ["b"])
    assert none["decided"] == 0 and math.isnan(none["shape"])
    with pytest.raises(UserValueError, match="equally long"):
        label_preference(["a"], ["a", "b"], ["b"])

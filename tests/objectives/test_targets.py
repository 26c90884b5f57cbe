"""The Targets type and the parts of the objective contract the engine relies on."""

from __future__ import annotations

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.errors import UserTypeError
from fiber_plugins.evaluation.metrics import features_of
from fiber_plugins.objectives.targets import Targets


def test_targets_own_rows_device_widths_and_the_tuple_question():
    plain = Targets.of(torch.arange(12.0).reshape(4, 3))
    assert (plain.num_rows, plain.widths, plain.summed) == (4, (3,), False)
    assert torch.equal(
        plain.rows(torch.tensor([2, 0])).value, torch.tensor([[6.0, 7, 8], [0, 1, 2]])
    )
    summed = Targets.of((torch.zeros(4, 3), torch.ones(4, 5)))
    assert summed.summed and summed.widths == (3, 5) and isinstance(summed.value, tuple)
    assert [p.shape for p in summed.rows(torch.tensor([1])).parts] == [(1, 3), (1, 5)]
    assert summed.float().to("cpu").cpu().summed
    bad = torch.zeros(3, 2)
    bad[1, 0] = float("nan")
    assert Targets.of(bad).finite_rows().tolist() == [True, False, True]
    assert Targets.of(plain) is plain
    with pytest.raises(UserTypeError, match="tensor or a tuple"):
        Targets.of("y")


def test_a_sum_is_a_full_objective(subject):
    a = fp.FiberObjective(subject)
    b = fp.FiberObjective(subject, layer="conv1", reduction="spatial_mean")
    s = a + 2.0 * b
    x = torch.rand(2, 3, 16, 16)
    f = features_of(s, x)  # failed with AttributeError before: a sum had no .model
    assert [t.shape for t in f] == [(2, 6), (2, 8)]
    with s.attached():
        feats = s.features(x * 2 - 1)
        y = s.target_of(feats)
    assert all(not t.requires_grad for t in y)
    assert torch.allclose(s.distance_between(feats, y), torch.zeros(2))
    assert s.model is subject and s.describe()["sum"][1]["weight"] == 2.0

"""Unit ranges and lists in the target grammar: ``layer:NAME:0-3`` is four fibers in one call."""

from __future__ import annotations

import json

import pytest

from fiber_plugins.cli.main import main
from fiber_plugins.errors import UserError
from fiber_plugins.objectives.units import UnitSet
from fiber_plugins.samplers.run_folder import RunFolder
from fiber_plugins.specs.targets import objective_from_spec, unit_ids
from tests.cli.test_cli import _args, ref_png  # noqa: F401  (fixture)


@pytest.mark.parametrize(
    "text, ids, units",
    [
        ("7", [7], False),
        ("3+7", [3, 7], False),
        ("0-3", [0, 1, 2, 3], True),
        ("3,7,9", [3, 7, 9], True),
        ("0-2,10", [0, 1, 2, 10], True),
    ],
)
def test_unit_ids(text, ids, units):
    assert unit_ids(text, "t") == (ids, units)


@pytest.mark.parametrize(
    "text, message",
    [("3-1", "START <= END"), ("1,1", "more than once"), ("a-3", "must be an integer")],
)
def test_unit_ids_mistakes(text, message):
    with pytest.raises(UserError, match=message):
        unit_ids(text, "t")


def test_forms_with_units(subject):
    layer = objective_from_spec(subject, "layer:conv2:0-3")
    assert isinstance(layer, UnitSet) and layer.labels == [f"layer:conv2:{i}" for i in range(4)]
    logits = objective_from_spec(subject, "logits:1,4")
    assert isinstance(logits, UnitSet) and logits.labels == ["logits:1", "logits:4"]
    joint = objective_from_spec(subject, "layer:conv2:1+2")
    assert not isinstance(joint, UnitSet) and joint.index == [1, 2]
    single = objective_from_spec(subject, "layer:conv2:5")
    assert not isinstance(single, UnitSet) and single.index == 5


def test_sample_many_units_from_the_command_line(pixel_prior_dir, ref_png, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert main(_args(pixel_prior_dir, ref_png, out, "--target", "layer:conv2:0-2")) == 0
    folder = RunFolder.open(out)
    assert [u["name"] for u in folder.manifest["units"]] == [f"layer:conv2:{i}" for i in range(3)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_references"] == 3 and metrics["num_failed"] == 0
    assert (out / "report.html").exists()

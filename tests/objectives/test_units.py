"""Many units in one call (UnitSet): the same samples as one call per unit, per-unit results, the
run folder's unit column, and mistakes in one line."""

from __future__ import annotations

import pytest
import torch

from fiber_plugins import FiberObjective, NDTMSampler
from fiber_plugins.errors import UserError
from fiber_plugins.objectives.units import UnitSet, own_entries
from fiber_plugins.samplers.run_folder import RunFolder

FAST = dict(num_steps=3, inner_steps=2)


def _layer(subject, index):
    return FiberObjective(subject, layer="conv2", index=index, reduction="spatial_mean")


def test_own_entries_reads_each_rows_block():
    f = torch.arange(12.0).view(2, 6)
    t = torch.full((2, 6), float("nan"))
    t[0, 1:3] = 1.0
    t[1, 4:6] = 2.0
    fo, to = own_entries(f, t)
    assert fo.tolist() == [[1.0, 2.0], [10.0, 11.0]] and to.tolist() == [[1.0, 1.0], [2.0, 2.0]]
    t[1, 3] = 0.0  # row 1 now uses 3 entries
    with pytest.raises(UserError, match="different sizes"):
        own_entries(f, t)


def test_a_unit_set_call_equals_one_call_per_unit(pixel_prior, subject, references):
    """4 channels x 2 references x 2 samples in one call give, per unit, the samples of a call
    with that channel alone (same seed): the prior and subject passes are shared, not the
    randomness."""
    channels = [0, 3, 5, 7]
    units = UnitSet.of(_layer(subject, channels))
    assert units.num_units == 4
    multi = NDTMSampler(pixel_prior, units, **FAST).sample(references=references, n=2, seed=3)
    assert multi.images.shape[:2] == (8, 2)
    per_unit = multi.by_unit()
    # labels name the channels, not the columns (and not the whole index list)
    layer = units.sites[0].layer_name
    assert list(per_unit) == [f"{type(subject).__name__}:{layer}[{c}]" for c in channels]
    for u, c in enumerate(channels):
        alone = NDTMSampler(pixel_prior, _layer(subject, [c]), **FAST).sample(
            references=references, n=2, seed=3
        )
        got = per_unit[units.labels[u]]
        assert got.images.shape == alone.images.shape
        # float rounding only: the batches differ in size, so do the BLAS reduction orders, and
        # Adam's normalised steps carry that on (measured with 1 thread: 8e-7 to 5e-5)
        assert torch.allclose(got.images, alone.images, atol=2e-4)
        assert torch.allclose(got.fiber_loss, alone.fiber_loss, rtol=1e-4, atol=1e-7)
        assert torch.allclose(got.targets, alone.targets, atol=1e-6)
    # the units' guidance differs (same noise, different channels): not one unit's samples four
    # times over
    first = per_unit[units.labels[0]].images
    assert all((p.images - first).abs().max() > 1e-3 for p in list(per_unit.values())[1:])


def test_units_of_two_sites_and_their_own_references(pixel_prior, subject, references):
    """A channel of conv1 and a logit share one call; each unit has its own references."""
    conv1 = FiberObjective(subject, layer="conv1", index=[2], reduction="spatial_mean")
    logits = FiberObjective(subject, index=[4])
    units = UnitSet([(conv1, None), (logits, None)], labels=["conv1:2", "logit:4"])
    result = NDTMSampler(pixel_prior, units, **FAST).sample(
        references={"conv1:2": references[:1], 1: references}, n=1, seed=0
    )
    parts = result.by_unit()
    assert {k: v.images.shape[0] for k, v in parts.items()} == {"conv1:2": 1, "logit:4": 2}
    alone = NDTMSampler(pixel_prior, logits, **FAST).sample(references=references, n=1, seed=0)
    assert torch.allclose(parts["logit:4"].images, alone.images, atol=1e-5)


def test_the_run_folder_names_each_rows_unit(pixel_prior, subject, references, tmp_path):
    units = UnitSet.of(_layer(subject, [1, 2]), labels=["c1", "c2"])
    NDTMSampler(pixel_prior, units, **FAST).sample(references=references, n=2, out=tmp_path / "run")
    folder = RunFolder.open(tmp_path / "run")
    assert [u["name"] for u in folder.manifest["units"]] == ["c1", "c2"]
    assert {(e["unit"], e["reference"]) for e in folder.index} == {
        ("c1", 0), ("c1", 1), ("c2", 2), ("c2", 3)
    }  # fmt: skip


def test_unit_set_mistakes(pixel_prior, subject, references):
    layer = _layer(subject, [0, 1])
    with pytest.raises(UserError, match="column index"):
        UnitSet.of(layer, units=["a"])
    with pytest.raises(UserError, match="give the units"):
        UnitSet.of(FiberObjective(subject, layer="conv2"))
    with pytest.raises(UserError, match="not a unit"):
        NDTMSampler(pixel_prior, UnitSet.of(layer), **FAST).sample(references={"x": references})
    with pytest.raises(UserError, match="outside the 2 features"):
        NDTMSampler(pixel_prior, UnitSet.of(layer, units=[5]), **FAST).sample(references=references)
    with pytest.raises(UserError, match="static target"):
        NDTMSampler(pixel_prior, UnitSet.of(layer), target_mode="reapprox", **FAST).sample(
            references=references
        )
    with pytest.raises(UserError, match="different sizes"):
        NDTMSampler(pixel_prior, UnitSet.of(layer, units=[0, [0, 1]]), **FAST).sample(
            references=references
        )


def test_default_labels_name_channels_only_where_a_column_is_a_channel(subject):
    """index=[5, 7] with a spatial reduction: one column per channel, labelled by channel; with
    reduction="none" a channel has H x W columns, so the labels stay columns."""
    reduced = FiberObjective(subject, layer="conv2", index=[5, 7], reduction="spatial_mean")
    assert UnitSet.of(reduced).labels == [f"{type(subject).__name__}:conv2[{c}]" for c in (5, 7)]
    full = FiberObjective(subject, layer="conv2", index=[5, 7])
    assert UnitSet.of(full, units=[0, 1, [2, 3]]).labels == [
        f"{full.name}[0]", f"{full.name}[1]", f"{full.name}[[2, 3]]"
    ]  # fmt: skip

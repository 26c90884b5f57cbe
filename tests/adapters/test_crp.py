"""zennit-crp adapter: values equal CRP's recorded activations; composite guard; hooks restored."""

from __future__ import annotations

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.objectives import IDENTITY, WeightedSum
from tests.helpers import hook_count, model_state

pytest.importorskip("zennit", reason="zennit not installed (extra 'zennit')")
pytest.importorskip("crp", reason="zennit-crp not installed (extra 'zennit')")
from crp.attribution import CondAttribution  # noqa: E402
from crp.helper import get_layer_names  # noqa: E402
from zennit.composites import EpsilonPlusFlat  # noqa: E402

from fiber_plugins.adapters.crp import crp_objective, crp_objectives  # noqa: E402


def crp_record(model, x, layers):
    """CRP's own activations and prediction (plain gradients: no composite)."""
    attribution = CondAttribution(model, no_param_grad=False)
    data = x.clone().requires_grad_(True)
    attr = attribution(data, [{"y": [0]}], record_layer=list(layers))
    return attr.activations, attr.prediction.detach()


def test_layer_names_are_crp_names(subject):
    assert get_layer_names(subject, [torch.nn.Conv2d, torch.nn.Linear]) == ["conv1", "conv2", "fc"]


@pytest.mark.parametrize("reduction", ["spatial_mean", "spatial_max", "none"])
def test_values_match_crp_activations(subject, reduction):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    acts, pred = crp_record(subject, x, ["conv1", "conv2"])
    obj = crp_objective(subject, {"conv2": [1, 6]}, reduction=reduction, preprocess=IDENTITY)
    want = acts["conv2"][:, [1, 6]]
    if reduction != "none":
        want = want.flatten(2)
        want = want.mean(2) if reduction == "spatial_mean" else want.amax(2)
    torch.testing.assert_close(obj.features(x), want.reshape(3, -1), rtol=1e-5, atol=1e-6)
    logits = crp_objective(subject, {"y": [2, 4]}, preprocess=IDENTITY)
    torch.testing.assert_close(logits.features(x), pred[:, [2, 4]], rtol=1e-5, atol=1e-6)
    linear = crp_objective(subject, {"fc": 5}, reduction=reduction, preprocess=IDENTITY)
    torch.testing.assert_close(linear.features(x), pred[:, [5]], rtol=1e-5, atol=1e-6)


def test_several_layers_in_one_dict_are_summed(subject):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    acts, pred = crp_record(subject, x, ["conv1"])
    obj = crp_objective(subject, {"conv1": [0], "y": [3]}, preprocess=IDENTITY)
    assert isinstance(obj, WeightedSum) and len(obj.terms()) == 2
    f_conv, f_y = obj.features(x)
    torch.testing.assert_close(f_conv, acts["conv1"][:, [0]].mean((2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_y, pred[:, [3]], rtol=1e-5, atol=1e-6)
    y = obj.target(x[:1])
    loss = obj.loss(x, y)
    parts = [o.distance(f, t) for (_, o), f, t in zip(obj.terms(), obj.features(x), y)]
    torch.testing.assert_close(loss, parts[0] + parts[1])
    only = crp_objective(subject, {"conv1": [0], "y": [3]}, include_y=False)
    assert not isinstance(only, WeightedSum) and only.layer_name == "conv1"


def test_objectives_one_per_condition_and_attribution_object(subject):
    objs = crp_objectives(subject, {"conv1": [1]})
    assert len(objs) == 1
    attribution = CondAttribution(subject, no_param_grad=False)
    objs = crp_objectives(attribution, [{"conv1": [1]}, {"conv2": [2, 3]}, {"y": 0}])
    assert [o.layer_name for o in objs] == ["conv1", "conv2", None]
    x = torch.rand(2, 3, 16, 16)
    assert [o.features(x).shape[1] for o in objs] == [1, 2, 1]


def test_gradient_reaches_image(subject):
    obj = crp_objective(subject, {"conv2": [1]}, preprocess=IDENTITY)
    y = obj.target(torch.rand(1, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    obj.loss(x, y).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in subject.parameters())


def test_errors(subject):
    with pytest.raises(KeyError, match="'conv1'"):
        crp_objective(subject, {"conv_1": [0]})
    with pytest.raises(TypeError, match="channel ids"):
        crp_objective(subject, {"conv1": "a"})
    with pytest.raises(ValueError, match="unknown reduction"):
        crp_objective(subject, {"conv1": [0]}, reduction="mean")
    with pytest.raises(TypeError, match="list of dicts"):
        crp_objectives(subject, "conv1")
    obj = crp_objective(subject, {"conv1": [9]})
    with pytest.raises(IndexError, match="size 8"):
        obj.features(torch.rand(1, 3, 16, 16))


def test_composite_guard(subject):
    obj = crp_objective(subject, {"conv2": [1]})
    x = torch.rand(1, 3, 16, 16)
    composite = EpsilonPlusFlat()
    with composite.context(subject):
        with pytest.raises(RuntimeError, match="zennit composite"):
            obj.target(x)
        with pytest.raises(RuntimeError, match="composite.context"):
            crp_objective(subject, {"conv2": [1]})
    assert hook_count(subject) == 0
    y = obj.target(x)  # outside the context it works
    assert y.shape == (1, 1)
    with_arg = crp_objective(subject, {"conv2": [1]}, composite=composite)
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with composite.context(other):  # registered elsewhere: the passed composite still counts
        with pytest.raises(RuntimeError, match="EpsilonPlusFlat is registered"):
            with_arg.target(x)
    assert with_arg.target(x).shape == (1, 1)


def test_no_hooks_left_after_sampling_and_errors(subject, pixel_prior):
    subject.conv1.train()
    subject.fc.weight.requires_grad_(False)
    before = model_state(subject)
    refs = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    obj = crp_objective(subject, {"conv2": [1, 2], "y": [0]})
    fp.NDTMSampler(pixel_prior, obj, num_steps=3, inner_steps=1).sample(
        references=refs, n=1, progress=False
    )
    assert hook_count(subject) == 0 and model_state(subject) == before
    bad = crp_objective(subject, {"conv2": [1], "fc": [50]})
    with pytest.raises(IndexError, match="size 6"):
        fp.NDTMSampler(pixel_prior, bad, num_steps=3, inner_steps=1).sample(
            references=refs, n=1, progress=False
        )
    assert hook_count(subject) == 0 and model_state(subject) == before

"""Captum adapter: values equal Captum's own computations; Captum-style classes; hooks and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

captum = pytest.importorskip("captum", reason="the captum extra is not installed")

from captum._utils.common import _select_targets, _verify_select_neuron  # noqa: E402
from captum.attr import LayerActivation  # noqa: E402

import fiber_plugins as fp  # noqa: E402
from fiber_plugins.adapters.captum import (  # noqa: E402
    PerExampleTargetObjective,
    captum_objective,
)
from fiber_plugins.attribution import (  # noqa: E402
    FiberAttribution,
    LayerFiber,
    NeuronFiber,
    OutputFiber,
    invariance_map,
    visualize_invariance,
)
from fiber_plugins.objectives import IDENTITY  # noqa: E402
from tests.conftest import TinySubject  # noqa: E402
from tests.helpers import has_no_hooks, model_state  # noqa: E402

FAST = {"num_steps": 3, "inner_steps": 1}


@pytest.fixture
def x():
    # prior-space images in [-1, 1]; IDENTITY feeds them unchanged, so Captum sees the same input
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _first_channel_peak(act):
    return act[:, 1].amax(dim=(1, 2))


# ---------------------------------------------------------------- layer / neuron values
MAP_SELECTORS = {
    "none": None,
    "int": 3,
    "tuple": (3, 1, 1),
    "slice": (slice(0, 4),),
    "mixed": (2, slice(1, 3), slice(None)),
    "callable": _first_channel_peak,
}
CASES = [(layer, sel) for layer in ("conv1", "act", "conv2") for sel in MAP_SELECTORS] + [
    ("fc", "none"),
    ("fc", "int"),
    ("fc", "fc-slice"),
]


@pytest.mark.parametrize(("layer", "selector"), CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_layer_activation_with_neuron_selector_matches_captum(subject, x, layer, selector):
    selector = (slice(1, 4),) if selector == "fc-slice" else MAP_SELECTORS[selector]
    module = getattr(subject, layer)
    obj = captum_objective(subject, layer=module, neuron_selector=selector, preprocess=IDENTITY)
    act = LayerActivation(subject, module).attribute(x)
    expected = act if selector is None else _verify_select_neuron((act,), selector)
    torch.testing.assert_close(obj.features(x), _flat(expected).float())


def test_layer_by_name_module_and_bound_method_agree(subject, x):
    by_name = captum_objective(subject, layer="conv2", neuron_selector=(1, slice(None)))
    by_module = captum_objective(subject, layer=subject.conv2, neuron_selector=(1, slice(None)))
    by_method = captum_objective(subject.forward, layer="conv2", neuron_selector=(1, slice(None)))
    ref = by_name.features(x)
    torch.testing.assert_close(by_module.features(x), ref)
    torch.testing.assert_close(by_method.features(x), ref)
    assert by_name.layer_name == by_module.layer_name == by_method.layer_name == "conv2"


def test_plain_function_with_layer_module_matches_captum(subject, x):
    def forward_func(inp):
        return subject(inp).softmax(-1)

    obj = captum_objective(forward_func, layer=subject.conv1, neuron_selector=(0, 3, 3))
    obj_id = captum_objective(
        forward_func, layer=subject.conv1, neuron_selector=(0, 3, 3), preprocess=IDENTITY
    )
    act = LayerActivation(forward_func, subject.conv1).attribute(x)
    torch.testing.assert_close(obj_id.features(x), _flat(act[:, 0, 3, 3]))
    assert obj.features(x).shape == (3, 1)


@pytest.mark.parametrize("layer", ["conv2", "fc"])
def test_attribute_to_layer_input_matches_captum(subject, x, layer):
    module = getattr(subject, layer)
    obj = captum_objective(
        subject, layer=module, attribute_to_layer_input=True, preprocess=IDENTITY
    )
    act = LayerActivation(subject, module).attribute(x, attribute_to_layer_input=True)
    torch.testing.assert_close(obj.features(x), _flat(act))
    assert obj.capture == "input"


def test_additional_forward_args_are_passed_like_captum(subject, x):
    def forward_func(inp, scale, shift=0.0):
        return subject(inp) * scale + shift

    obj = captum_objective(
        forward_func, target=2, additional_forward_args=(3.0, 1.0), preprocess=IDENTITY
    )
    single = captum_objective(forward_func, target=2, additional_forward_args=3.0)
    act = LayerActivation(forward_func, subject.fc).attribute(x, additional_forward_args=(3.0, 1.0))
    torch.testing.assert_close(obj.features(x), _flat(act[:, 2] * 3.0 + 1.0))
    assert single.features(x).shape == (3, 1)


# ---------------------------------------------------------------- output targets
@pytest.mark.parametrize(
    "target", [None, 2, (4,), torch.tensor(5), torch.tensor([1, 1, 1])], ids=str
)
def test_output_target_matches_select_targets(subject, x, target):
    obj = captum_objective(subject, target=target, preprocess=IDENTITY)
    with torch.no_grad():
        expected = _select_targets(subject(x), target)
    assert not isinstance(obj, PerExampleTargetObjective)
    torch.testing.assert_close(obj.features(x), _flat(expected))


@pytest.mark.parametrize(
    "target",
    [torch.tensor([1, 5, 0]), [1, 5, 0], [(1,), (5,), (0,)]],
    ids=["tensor", "list", "tuples"],
)
def test_per_example_target_matches_select_targets_per_reference(subject, x, target):
    obj = captum_objective(subject, target=target, preprocess=IDENTITY)
    assert isinstance(obj, PerExampleTargetObjective)
    with torch.no_grad():
        expected = _select_targets(subject(x), target)  # (R,): reference r on target[r]
    y = obj.target(x)  # (R, R): reference r's own entry, NaN elsewhere
    torch.testing.assert_close(y.diagonal(), expected.reshape(-1))
    assert torch.isnan(y).sum() == 3 * 2
    # samples of reference r are compared on target[r] only
    samples = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        out = subject(samples)
    classes = [1, 5, 0]
    hand = torch.stack([(out[r, classes[r]] - expected.reshape(-1)[r]) ** 2 for r in range(3)])
    torch.testing.assert_close(obj.loss(samples, y), hand)
    assert obj.describe()["target"] == repr(target if isinstance(target, list) else classes)


def test_per_example_target_refuses_an_unmasked_target(subject, x):
    obj = captum_objective(subject, target=[1, 5, 0], preprocess=IDENTITY)
    with pytest.raises(ValueError, match="static target"):
        obj.loss(x, obj.features(x))
    with pytest.raises(ValueError, match="3 entries .* 2 reference"):
        obj.target(x[:2])


def test_per_example_target_needs_2d_output_like_captum(subject, x):
    obj = captum_objective(subject.conv1, target=[1, 2, 3], preprocess=IDENTITY)
    with pytest.raises(ValueError, match="2-D output"):
        obj.target(x)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer": "conv1"},
        {"layer": "conv2", "neuron_selector": (1, slice(0, 2), slice(None))},
        {"layer": "fc", "attribute_to_layer_input": True},
        {"target": 3},
        {"target": [0, 4]},
    ],
    ids=["layer", "summed-neurons", "layer-input", "target", "per-example"],
)
def test_gradients_reach_the_image(subject, kwargs):
    obj = captum_objective(subject, **kwargs)
    img = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = obj.target(torch.rand(2, 3, 16, 16) * 2 - 1)
    with obj.attached():
        obj.loss(img, y).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


# ---------------------------------------------------------------- Captum-style classes
def test_output_fiber_end_to_end(pixel_prior, subject, references):
    attr = OutputFiber(subject).attribute(references, 2, prior=pixel_prior, n=2, **FAST)
    assert isinstance(attr, FiberAttribution)
    assert attr.samples.shape == (2, 2, 3, 16, 16)
    assert attr.invariance_map.shape == references.shape
    torch.testing.assert_close(attr.invariance_map, attr.result.images.std(dim=1, correction=0))
    assert torch.isfinite(attr.result.fiber_loss).all()


def test_layer_fiber_end_to_end_with_other_input_size(pixel_prior, subject):
    inputs = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    attr = LayerFiber(subject, subject.conv2).attribute(
        inputs, prior=pixel_prior, n=2, attribute_to_layer_input=True, **FAST
    )
    assert attr.result.images.shape == (2, 2, 3, 16, 16)  # the prior's size
    assert attr.invariance_map.shape == inputs.shape  # shaped like the inputs
    assert attr.result.config["objective"]["capture"] == "input"


def test_neuron_fiber_end_to_end_matches_std(pixel_prior, subject, references):
    attr = NeuronFiber(subject, "conv2").attribute(
        references, (1, slice(None), slice(None)), prior=pixel_prior, n=2, seed=4, **FAST
    )
    torch.testing.assert_close(attr.invariance_map, attr.result.images.std(dim=1, correction=0))
    assert attr.result.targets.shape == (2, 1)  # one summed value per reference
    assert attr.result.config["objective"]["layer"] == "conv2"


@pytest.mark.parametrize("mode", ["static", "reapprox"])
def test_output_fiber_per_example_target(pixel_prior, subject, references, mode):
    # NDTM's own `target` setting clashes with Captum's target argument: it goes through config
    attr = OutputFiber(subject).attribute(
        references,
        torch.tensor([1, 4]),
        prior=pixel_prior,
        n=2,
        config=fp.NDTMConfig(target_mode=mode),
        **FAST,
    )
    assert attr.invariance_map.shape == references.shape
    assert attr.result.images.shape == (2, 2, 3, 16, 16)
    assert torch.isfinite(attr.result.fiber_loss).all()
    if mode == "reapprox":  # the mask cannot follow y*_t: one run per reference
        assert attr.result.config["per_reference_runs"] == 2
        assert attr.result.targets.shape == (2, 1)
    else:  # one batched run; row r of the target keeps only target[r]
        assert attr.result.targets.shape == (2, 2)
        assert torch.isnan(attr.result.targets).sum() == 2


def test_per_example_objective_refuses_reapprox_in_the_sampler(pixel_prior, subject, references):
    obj = captum_objective(subject, target=[1, 4])
    sampler = fp.NDTMSampler(pixel_prior, obj, target_mode="reapprox", **FAST)
    with pytest.raises(ValueError, match="static target"):
        sampler.sample(references=references, n=1, progress=False)


def test_invariance_map_leaves_out_failed_samples():
    images = torch.rand(2, 3, 1, 4, 4)
    failed = torch.tensor([[False, False, True], [True, True, True]])
    result = fp.FiberResult(
        images=images,
        references=torch.rand(2, 1, 4, 4),
        fiber_loss=torch.zeros(2, 3),
        loss_trace=torch.zeros(2, 3, 1),
        failed=failed,
    )
    m = invariance_map(result)
    torch.testing.assert_close(m[0], images[0, :2].std(dim=0, correction=0))
    assert torch.isnan(m[1]).all()
    assert invariance_map(result, like=torch.zeros(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_visualize_invariance_uses_captum(pixel_prior, subject, references):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attr = OutputFiber(subject).attribute(references, prior=pixel_prior, n=2, **FAST)
    fig, ax = visualize_invariance(attr, index=1, title="invariance")
    assert ax.get_title() == "invariance"
    fig2, _ = visualize_invariance(attr, method="blended_heat_map", use_pyplot=False)
    plt.close(fig)
    plt.close(fig2)
    with pytest.raises(IndexError, match="2 invariance map"):
        visualize_invariance(attr, index=2)


# ---------------------------------------------------------------- hooks and model state
@pytest.fixture
def mixed_model():
    model = TinySubject().train()
    model.conv1.eval()  # a mixed state the objective must give back unchanged
    model.conv1.weight.requires_grad_(False)
    return model


def _forward_function(model):
    def forward_func(inp):
        return model(inp)

    return forward_func


@pytest.mark.filterwarnings("ignore:.*train mode:UserWarning")
@pytest.mark.parametrize(
    "make",
    [
        lambda m: captum_objective(m, layer="conv2", neuron_selector=(0, slice(None))),
        lambda m: captum_objective(m, layer=m.fc, attribute_to_layer_input=True),
        lambda m: captum_objective(m, target=[1, 2]),
        lambda m: captum_objective(_forward_function(m), layer=m.conv2, neuron_selector=1),
        lambda m: captum_objective(m.forward, target=1, additional_forward_args=()),
    ],
    ids=["neuron", "layer-input", "per-example", "function", "bound-method"],
)
def test_no_hooks_left_and_state_restored(pixel_prior, mixed_model, references, make, monkeypatch):
    before = model_state(mixed_model)
    obj = make(mixed_model)
    fp.NDTMSampler(pixel_prior, obj, **FAST).sample(references=references, n=1, progress=False)
    assert has_no_hooks(mixed_model) and model_state(mixed_model) == before

    def boom(inp):
        raise RuntimeError("conv1 failed")

    monkeypatch.setattr(mixed_model.conv1, "forward", boom)  # raises inside the attached block
    with pytest.raises(RuntimeError, match="conv1 failed"):
        obj.features(torch.zeros(2, 3, 16, 16))
    assert has_no_hooks(mixed_model) and model_state(mixed_model) == before


@pytest.mark.filterwarnings("ignore:.*train mode:UserWarning")
def test_no_hooks_left_when_the_model_raises(mixed_model, x):
    class Boom(RuntimeError):
        pass

    def broken(inp):
        mixed_model(inp)
        raise Boom("forward failed")

    before = model_state(mixed_model)
    obj = captum_objective(broken, target=1)
    with pytest.raises(Boom):
        obj.features(x)

    def bad_selector(act):
        raise Boom("selector failed")

    obj = captum_objective(mixed_model, layer="conv1", neuron_selector=bad_selector)
    with pytest.raises(Boom):
        obj.features(x)
    assert has_no_hooks(mixed_model) and model_state(mixed_model) == before


# ---------------------------------------------------------------- bad input
def test_train_mode_is_announced_and_restored(subject, x):
    subject.train()
    obj = captum_objective(subject.forward, layer="conv1")
    with pytest.warns(UserWarning, match="train mode"):
        obj.features(x)
    assert all(m.training for m in subject.modules())


def test_unknown_layer_name_suggests_closest(subject):
    with pytest.raises(KeyError, match="unknown layer 'conv'.*closest: .*'conv1'"):
        captum_objective(subject, layer="conv")
    with pytest.raises(KeyError, match="closest: .*'conv2'"):
        captum_objective(subject.forward, layer="conv3", neuron_selector=0)
    with pytest.raises(KeyError, match="closest: .*'conv2'"):
        NeuronFiber(subject, "conv3").attribute(torch.rand(1, 3, 16, 16), 0, prior=None, n=1)


@pytest.mark.parametrize(
    "selector", [99, (99,), (0, 20, 0), (99, slice(None))], ids=["int", "tuple", "spatial", "slice"]
)
def test_neuron_selector_out_of_range_gives_the_size(subject, x, selector):
    obj = captum_objective(subject, layer="conv1", neuron_selector=selector)
    with pytest.raises(IndexError, match=r"out of range for layer 'conv1' with size (8|16)"):
        obj.features(x)


def test_target_out_of_range_gives_the_size(subject, x):
    with pytest.raises(IndexError, match="size 6"):
        captum_objective(subject, target=10).features(x)
    with pytest.raises(IndexError, match="size 6"):
        captum_objective(subject, target=[0, 10, 1]).target(x)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layer": "fc", "target": 1}, ValueError, "neuron_selector"),
        ({"target": 1, "neuron_selector": 1}, ValueError, "not both"),
        ({"attribute_to_layer_input": True}, ValueError, "needs a layer"),
        ({"layer": 3}, TypeError, "layer must be"),
        ({"layer": nn.Linear(2, 2)}, ValueError, "not a submodule"),
        ({"layer": "fc", "neuron_selector": "a"}, TypeError, "neuron_selector"),
        ({"layer": "fc", "neuron_selector": (1.5,)}, TypeError, "ints and slices"),
        ({"target": 1.5}, TypeError, "target must be"),
        ({"target": torch.tensor([0.5, 1.0])}, TypeError, "integers"),
        ({"target": torch.zeros(2, 2, dtype=torch.long)}, ValueError, "1-D"),
        ({"target": [1, (2,)]}, TypeError, "only ints or only tuples"),
        ({"target": []}, ValueError, "empty"),
    ],
)
def test_bad_arguments_are_quoted(subject, kwargs, error, match):
    with pytest.raises(error, match=match):
        captum_objective(subject, **kwargs)


def test_layer_name_needs_a_module(subject):
    with pytest.raises(TypeError, match="layer name 'conv1' needs forward_func"):
        captum_objective(_forward_function(subject), layer="conv1")
    with pytest.raises(TypeError, match="callable"):
        captum_objective(3)


def test_bad_inputs_and_target_length(pixel_prior, subject):
    with pytest.raises(ValueError, match=r"\(R, C, H, W\)"):
        OutputFiber(subject).attribute(torch.rand(3, 16, 16), prior=pixel_prior, n=1)
    for target in ([0, 1, 2], [1, 1, 1], torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match=r"3 entries \(one per example\) but inputs has 2"):
            OutputFiber(subject).attribute(
                torch.rand(2, 3, 16, 16), target, prior=pixel_prior, n=1, **FAST
            )


def test_missing_captum_names_the_extra(monkeypatch, subject):
    monkeypatch.setitem(sys.modules, "captum", None)
    with pytest.raises(ImportError, match=r"fiber-plugins\[captum\]"):
        OutputFiber(subject)
    captum_objective(subject, target=1)  # building an objective does not need Captum


def test_public_names_and_signatures_of_the_adapter_and_the_attribution_package():
    import inspect

    import fiber_plugins.adapters.captum as mod
    import fiber_plugins.attribution as attribution

    # the adapter builds objectives only; the classes that run a sampler live one layer up
    assert mod.__all__ == ["captum_objective"]
    names = "OutputFiber LayerFiber NeuronFiber FiberAttribution invariance_map"
    assert attribution.__all__ == [*names.split(), "visualize_invariance"]
    assert mod.PerExampleTargetObjective is PerExampleTargetObjective and mod.NeuronSelector
    sampling = ["prior", "n", "seed", "batch_size", "progress", "preprocess", "distance", "config"]
    layer_kw = ["attribute_to_layer_input"]
    expected = {
        OutputFiber: (["inputs", "target", "additional_forward_args"], sampling),
        LayerFiber: (["inputs", "additional_forward_args"], sampling + layer_kw),
        NeuronFiber: (
            ["inputs", "neuron_selector", "additional_forward_args"],
            sampling + layer_kw,
        ),
    }
    for cls, (positional, keywords) in expected.items():
        params = list(inspect.signature(cls.attribute).parameters.values())[1:]
        kinds = inspect.Parameter
        assert [p.name for p in params if p.kind is kinds.POSITIONAL_OR_KEYWORD] == positional
        assert {p.name for p in params if p.kind is kinds.KEYWORD_ONLY} == set(keywords)
        assert params[-1].kind is kinds.VAR_KEYWORD and params[-1].name == "ndtm_settings"
        defaults = {p.name: p.default for p in params}
        assert defaults["n"] == 8 and defaults["seed"] == 0 and defaults["distance"] == "l2"
        assert defaults["prior"] is inspect.Parameter.empty


def test_importing_the_adapters_does_not_import_the_toolkits():
    code = (
        "import sys, fiber_plugins, fiber_plugins.adapters, fiber_plugins.adapters.captum, "
        "fiber_plugins.adapters.timm, fiber_plugins.attribution; "
        "print([m for m in sys.modules if m.split('.')[0] in ('captum', 'timm')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

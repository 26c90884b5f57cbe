"""FiberObjective: distances, reductions, selections, preprocessing, hooks and model state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fiber_plugins as fp
from fiber_plugins.errors import UserError, UserValueError
from fiber_plugins.objectives import IDENTITY, Preprocess, reduce, select
from fiber_plugins.objectives.distances import cosine, get_distance, kl_logits, l1, squared_l2
from tests.helpers import hook_count, model_state


# ---------------------------------------------------------------- distances (hand computations)
def test_distances_match_hand_computation():
    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(squared_l2(f, y), torch.tensor([0 + 4 + 4, 1 + 0 + 0.0]))
    torch.testing.assert_close(l1(f, y), torch.tensor([0 + 2 + 2, 1 + 0 + 0.0]))
    cos0 = (1 * 1 + 3 * 1) / (math.sqrt(14) * math.sqrt(2))
    cos1 = 1 / math.sqrt(2)
    torch.testing.assert_close(cosine(f, y), torch.tensor([1 - cos0, 1 - cos1]))
    p = torch.softmax(y[0], 0)
    q0, q1 = torch.softmax(f[0], 0), torch.softmax(f[1], 0)
    kl = torch.stack([(p * (p / q0).log()).sum(), (p * (p / q1).log()).sum()])
    torch.testing.assert_close(kl_logits(f, y), kl)
    assert kl_logits(y, y).abs().max() < 1e-6


def test_distance_is_summed_not_averaged_over_batch():
    f = torch.randn(5, 4)
    y = torch.randn(1, 4)
    alone = squared_l2(f[:1], y)
    torch.testing.assert_close(squared_l2(f, y)[:1], alone)


def test_unknown_distance_lists_choices():
    with pytest.raises(ValueError, match=r"unknown distance 'l3'.*'cosine'"):
        get_distance("l3")


# ---------------------------------------------------------------- reductions and selection
def test_reductions_match_hand_computation():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    torch.testing.assert_close(reduce(a, "spatial_mean"), a.view(2, 3, 4).mean(-1))
    torch.testing.assert_close(reduce(a, "spatial_max"), a[:, :, 1, 1])
    tok = torch.randn(2, 5, 4)
    torch.testing.assert_close(reduce(tok, "cls"), tok[:, 0])
    torch.testing.assert_close(reduce(tok, "token_mean"), tok.mean(1))
    torch.testing.assert_close(reduce(tok, "token_max"), tok.max(1).values)
    torch.testing.assert_close(reduce(a, "auto"), reduce(a, "spatial_mean"))
    assert reduce(tok, "none") is tok
    with pytest.raises(ValueError, match="needs \\(B, tokens, dim\\)"):
        reduce(a, "cls")
    with pytest.raises(ValueError, match="unknown reduction"):
        fp.FiberObjective(lambda x: x, reduction="median")


def test_selections_match_hand_computation():
    a = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(select(a, 4), a[:, 4])
    torch.testing.assert_close(select(a, [1, 5]), a[:, [1, 5]])
    torch.testing.assert_close(select(a, slice(2, 4)), a[:, 2:4])
    torch.testing.assert_close(select(a, (5, 2, 1)), a[:, 5, 2, 1])
    torch.testing.assert_close(select(a, (3, slice(0, 2))), a[:, 3, 0:2])
    torch.testing.assert_close(select(a, lambda t: t[:, :2].sum(1)), a[:, :2].sum(1))
    with pytest.raises(IndexError, match=r"channel 6 is out of range .* size 6 \(valid: 0..5\)"):
        select(a, 6)
    with pytest.raises(IndexError, match="out of range"):
        select(a, [0, 9])
    with pytest.raises(IndexError, match="index along dim 2"):
        select(a, (0, 3, 0))
    # negatives are refused, not wrapped: channel -1 would be channel 5 under a second name
    for bad in (-1, [0, -6], (-1, 0)):
        with pytest.raises(IndexError, match=r"-[16] is out of range .*\(valid: 0\.\.[52]\)"):
            select(a, bad)


# ---------------------------------------------------------------- preprocessing
def test_preprocess_matches_hand_computation():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    p = Preprocess(size=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), interpolation="area")
    y = p(x)
    ref = torch.nn.functional.adaptive_avg_pool2d((x + 1) / 2, 4)
    ref = (ref - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.5]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(IDENTITY(x), x)
    torch.testing.assert_close(Preprocess(value_range=(0, 255))(x), (x + 1) / 2 * 255)
    torch.testing.assert_close(Preprocess(channels=1)(x), ((x + 1) / 2).mean(1, keepdim=True))
    assert Preprocess(size=(12, 10))(x).shape == (2, 3, 12, 10)
    with pytest.raises(ValueError, match="unknown interpolation"):
        Preprocess(interpolation="lanczos")


# ---------------------------------------------------------------- phi sources
def test_callable_module_output_and_layer_phi(subject):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    x01 = (x + 1) / 2
    with torch.no_grad():
        out = subject(x01)
        conv1 = subject.conv1(x01)
    obj_out = fp.FiberObjective(subject)
    torch.testing.assert_close(obj_out.target(x), out)
    obj_layer = fp.FiberObjective(subject, layer="conv1", index=2, reduction="spatial_mean")
    torch.testing.assert_close(obj_layer.target(x), conv1[:, 2].mean((1, 2)).view(3, 1))
    obj_in = fp.FiberObjective(subject, layer="fc", capture="input")
    with torch.no_grad():
        fc_in = subject.pool(subject.conv2(subject.act(subject.conv1(x01)))).flatten(1)
    torch.testing.assert_close(obj_in.target(x), fc_in)
    obj_fn = fp.FiberObjective(lambda t: t.mean((2, 3)), preprocess=IDENTITY)
    torch.testing.assert_close(obj_fn.target(x), x.mean((2, 3)))
    obj_mod = fp.FiberObjective(subject, layer=subject.conv2)
    assert obj_mod.layer_name == "conv2"


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer": "conv1", "index": 3, "reduction": "spatial_mean"},
        {"layer": "conv2", "index": (1, 2, 2)},
        {"layer": "fc", "capture": "input", "distance": "cosine"},
        {"distance": "kl"},
        {"distance": "l1", "index": [0, 2]},
    ],
)
def test_gradients_reach_the_image(subject, kwargs):
    obj = fp.FiberObjective(subject, **kwargs)
    ref = torch.rand(1, 3, 16, 16) * 2 - 1
    y = obj.target(ref)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    with obj.attached():
        loss = obj.loss(x, y)
    assert loss.shape == (2,)
    loss.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in subject.parameters())


def test_weighted_sum(subject):
    a = fp.FiberObjective(subject)
    b = fp.FiberObjective(subject, layer="conv1", reduction="spatial_mean", distance="l1")
    s = 2.0 * a + b
    ref, x = torch.rand(1, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    ys = s.target(ref)
    assert isinstance(ys, tuple) and len(ys) == 2
    with s.attached():
        got = s.loss(x, ys)
    want = 2.0 * a.loss(x, ys[0]) + b.loss(x, ys[1])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- errors
def test_unknown_layer_suggests_close_names(subject):
    with pytest.raises(
        KeyError, match=r"unknown layer 'conv3' in TinySubject; closest: 'conv\d', 'conv\d'"
    ):
        fp.FiberObjective(subject, layer="conv3")


def test_channel_out_of_range_gives_layer_size(subject):
    obj = fp.FiberObjective(subject, layer="conv1", index=8, reduction="spatial_mean")
    with pytest.raises(
        IndexError, match=r"channel 8 is out of range for layer 'conv1' with size 8"
    ):
        obj.target(torch.zeros(1, 3, 16, 16))


def test_target_width_mismatch(subject):
    obj = fp.FiberObjective(subject)
    with pytest.raises(ValueError, match=r"target has shape \(1, 5\) but .* gives 6 features"):
        obj.check_target(torch.zeros(5), 6)


@pytest.mark.parametrize(
    ("target", "where"),
    [
        (torch.tensor([0.0, 1.0, float("nan"), 2.0, float("inf"), 3.0]), "nan at index 2"),
        (
            torch.tensor([[0.0] * 6, [0.0, 0.0, 0.0, -float("inf"), 0.0, 0.0]]),
            "-inf at index (1, 3)",
        ),
    ],
)
def test_target_with_nan_or_inf_quotes_the_first_bad_index(subject, target, where):
    obj = fp.FiberObjective(subject)
    with pytest.raises(UserValueError) as err:
        obj.check_target(target, 6)
    message = str(err.value)
    assert "\n" not in message and "non-finite" in message and where in message


def test_target_width_mismatch_one_line(subject):
    obj = fp.FiberObjective(subject)
    with pytest.raises(UserValueError) as err:
        obj.check_target(torch.zeros(2, 5), 6)
    assert "\n" not in str(err.value) and "gives 6 features" in str(err.value)
    with pytest.raises(UserValueError, match="a sum of 2 objectives needs a tuple of 2 targets"):
        (obj + obj).check_target(torch.zeros(6), (6, 6))
    with pytest.raises(UserValueError, match="nan at index 0"):
        (obj + obj).check_target((torch.zeros(6), torch.full((6,), float("nan"))), (6, 6))


def test_layer_not_on_path(subject):
    subject.extra = nn.Linear(2, 2)
    obj = fp.FiberObjective(subject, layer="extra")
    with pytest.raises(RuntimeError, match="was not called") as err:
        obj.target(torch.zeros(1, 3, 16, 16))
    assert isinstance(err.value, UserError)  # the CLI prints it as one line and exits 2
    message = str(err.value)
    assert "\n" not in message
    assert "layer 'extra' was not called during the forward pass of TinySubject" in message
    assert "pick a layer on the path to the output" in message


# ---------------------------------------------------------------- hooks and model state
def _state(model):
    return (*model_state(model), hook_count(model), next(model.parameters()).device)


def test_model_unchanged_after_use_and_after_error(subject):
    subject.train()
    subject.conv2.eval()
    subject.fc.weight.requires_grad_(False)
    before = _state(subject)
    obj = fp.FiberObjective(subject, layer="conv2", index=1, reduction="spatial_mean")
    with pytest.warns(UserWarning, match="train mode") as caught:
        obj.target(torch.zeros(1, 3, 16, 16))
    # raised inside a `with` block of the package: still attributed to this file's line
    assert {w.filename for w in caught} == {__file__}
    assert _state(subject) == before
    with pytest.raises(RuntimeError, match="boom"):
        with obj.attached():
            assert not subject.training
            assert not any(p.requires_grad for p in subject.parameters())
            raise RuntimeError("boom")
    assert _state(subject) == before

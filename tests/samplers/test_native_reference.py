"""y* = phi(x*) is computed from the reference as the subject sees it natively (issue 14, item 6):
at the reference's own resolution when the objective's preprocessing fixes the subject's input
size, never from a copy resized to the prior's size and back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fiber_plugins as fp
from fiber_plugins.objectives.preprocess import Preprocess


class PooledConv(nn.Module):
    """Takes any input size: conv -> global average pool -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def _detailed(size: int, seed: int) -> torch.Tensor:
    """A (3, size, size) image in [0, 1] with fine detail a 16-px copy loses."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g)


def _sampler(prior, objective):
    return fp.NDTMSampler(prior, objective, num_steps=1, inner_steps=1)


def test_target_is_phi_of_the_reference_at_its_own_resolution(pixel_prior):
    model = PooledConv().eval()
    pre = Preprocess(size=48)
    objective = fp.FiberObjective(model, preprocess=pre)
    refs = torch.stack([_detailed(48, 0), _detailed(48, 1)])
    result = _sampler(pixel_prior, objective).sample(references=refs, n=1, progress=False)
    with torch.no_grad():
        native = model(pre(refs * 2 - 1))
        via_prior_size = model(pre(result.references * 2 - 1))  # the old, resized-and-back y*
    torch.testing.assert_close(result.targets, native, rtol=1e-5, atol=1e-5)
    assert (via_prior_size - native).abs().max() > 1e-3  # the two are really different
    assert result.references.shape[-2:] == pixel_prior.image_size  # kept at the prior's size


def test_references_of_different_sizes_each_get_their_own_target(pixel_prior):
    model = PooledConv().eval()
    pre = Preprocess(resize=40, crop=32)
    objective = fp.FiberObjective(model, preprocess=pre)
    refs = [_detailed(64, 2), _detailed(40, 3)]
    result = _sampler(pixel_prior, objective).sample(references=refs, n=1, progress=False)
    with torch.no_grad():
        expected = torch.cat([model(pre(r[None] * 2 - 1)) for r in refs])
    torch.testing.assert_close(result.targets, expected, rtol=1e-5, atol=1e-5)


def test_without_a_fixed_input_size_the_prior_sized_copy_is_used(pixel_prior):
    model = PooledConv().eval()
    objective = fp.FiberObjective(model)  # Preprocess() keeps the prior's size
    refs = _detailed(48, 4)[None]
    result = _sampler(pixel_prior, objective).sample(references=refs, n=1, progress=False)
    with torch.no_grad():
        expected = model(result.references)  # [0, 1] at the prior's size
    torch.testing.assert_close(result.targets, expected, rtol=1e-5, atol=1e-5)


def test_captum_companion_targets_exactly_the_value_captum_explains(pixel_prior):
    pytest.importorskip("captum")
    from captum.attr import Saliency

    from fiber_plugins.attribution import OutputFiber

    model = PooledConv().eval()
    inputs = torch.stack([_detailed(224, 5), _detailed(224, 6)])  # a 224-px input, 16-px prior
    target = [1, 3]
    attr = OutputFiber(model).attribute(
        inputs, target, prior=pixel_prior, n=1, num_steps=1, inner_steps=1
    )
    with torch.no_grad():
        explained = model(inputs)[torch.arange(2), torch.tensor(target)]
    # the value Captum's own forward gives for these inputs and targets
    saliency_forward = Saliency(model).forward_func(inputs)[torch.arange(2), torch.tensor(target)]
    torch.testing.assert_close(saliency_forward.detach(), explained)
    # per-example targets keep each row's own column (the others are NaN-masked)
    got = torch.stack(
        [attr.result.targets[r][~torch.isnan(attr.result.targets[r])][0] for r in range(2)]
    )
    torch.testing.assert_close(got, explained, rtol=1e-5, atol=1e-5)

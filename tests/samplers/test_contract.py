"""The sampler contract, run over every sampler (in the style of diffusers' shared scheduler tests).

For each sampler the package exports (NDTM guided and unguided, DPS, initial-noise optimisation,
pixel inversion, latent refinement, the conditional fiber model's sampler), with tiny settings on
the tiny priors of ``tests/conftest.py`` and a subject left in a mixed train/eval state:

* the result has the documented shapes, finite fiber losses and images in [0, 1];
* no hook is left on the subject and its state is given back, also after a run that raises;
* the same seed gives the same images (and another seed other images, where a seed is used);
* the result reads back from ``save()`` and from a run written with ``out=``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.samplers import (
    ConditionalFiberSampler,
    DPSSampler,
    FiberResult,
    NDTMSampler,
    NoiseOptSampler,
    PixelInversionSampler,
    refine_latent,
    sample_fiber,
)
from tests.conftest import TinySubject
from tests.helpers import hook_count, model_state

pytestmark = pytest.mark.filterwarnings("ignore:.*train mode:UserWarning")

N = 2  # samples per reference

# the conditional model's UNet (as in test_conditional.py) and its training images
TINY_UNET = {
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


def colour_batches(b: int, gen: torch.Generator) -> torch.Tensor:
    colour = torch.rand(b, 3, 1, 1, generator=gen)
    return (colour + 0.1 * torch.randn(b, 3, 8, 8, generator=gen)).clamp(0, 1)


def make_objective(subject):
    return fp.FiberObjective(subject, layer="conv2", index=1, reduction="spatial_mean")


@pytest.fixture(scope="module")
def fiber_model():
    """A conditional fiber model of make_objective(TinySubject()), trained for 2 steps."""
    model, _ = fp.train_fiber_model(
        make_objective(TinySubject().eval()),
        colour_batches,
        None,
        steps=2,
        batch_size=4,
        unet_config=TINY_UNET,
        progress=False,
    )
    return model


@dataclass
class SamplerCase:
    """How one sampler is run: ``run(objective, references, seed, out)`` -> FiberResult."""

    run: Callable
    image_size: int  # the prior's
    trace_steps: int  # T of loss_trace (R, n, T)
    seeded: bool = True  # the seed decides the samples
    takes_out: bool = True  # sample(..., out=run folder)
    keeps_references: bool = True  # result.references (refinement of bare images has none)


def _sampler_case(cls, prior, size=16, trace_steps=2, **settings) -> SamplerCase:
    def run(objective, references, seed=0, out=None):
        kw = {} if out is None else {"out": out}
        return cls(prior, objective, **settings).sample(
            references=references, n=N, seed=seed, progress=False, **kw
        )

    return SamplerCase(run, size, trace_steps)


def _refine_case(prior) -> SamplerCase:
    # refinement polishes given samples: two fixed images per reference, no seed
    given = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def run(objective, references, seed=0, out=None):
        assert out is None
        y = objective.target(references * 2 - 1)
        return refine_latent(
            prior, objective, given.expand(len(references), -1, -1, -1, -1), y, steps=2
        )

    return SamplerCase(run, 16, 3, seeded=False, takes_out=False, keeps_references=False)


def _sample_fiber_case(prior) -> SamplerCase:
    def run(objective, references, seed=0, out=None):
        return sample_fiber(
            prior,
            objective,
            references=references,
            n=N,
            seed=seed,
            progress=False,
            out=out,
            num_steps=2,
            inner_steps=1,
        )

    return SamplerCase(run, 16, 2)


SAMPLERS = {
    "ndtm": lambda r: _sampler_case(NDTMSampler, r("pixel_prior"), num_steps=2, inner_steps=1),
    "ndtm-unguided": lambda r: _sampler_case(
        NDTMSampler, r("pixel_prior"), num_steps=2, inner_steps=1, guidance=0.0
    ),
    "ndtm-latent": lambda r: _sampler_case(
        NDTMSampler, r("latent_prior"), num_steps=2, inner_steps=1
    ),
    "dps": lambda r: _sampler_case(DPSSampler, r("pixel_prior"), num_steps=2, guidance=10.0),
    "noise-opt": lambda r: _sampler_case(
        NoiseOptSampler, r("pixel_prior"), num_steps=2, max_iters=2, threshold=None
    ),
    "pixel-inversion": lambda r: _sampler_case(
        PixelInversionSampler, r("pixel_prior"), num_steps=2, lr=0.05
    ),
    "latent-refine": lambda r: _refine_case(r("pixel_prior")),
    "sample-fiber": lambda r: _sample_fiber_case(r("pixel_prior")),
    "conditional": lambda r: _sampler_case(
        ConditionalFiberSampler, r("fiber_model"), size=8, num_steps=2
    ),
}


@pytest.fixture(params=list(SAMPLERS))
def case(request) -> SamplerCase:
    return SAMPLERS[request.param](request.getfixturevalue)


@pytest.fixture
def mixed_subject():
    """The subject in train mode with conv1 in eval mode and fc's weight frozen."""
    subject = TinySubject().train()
    subject.conv1.eval()
    subject.fc.weight.requires_grad_(False)
    return subject


def _snapshot(subject):
    return hook_count(subject), model_state(subject)


def _same(a: FiberResult, b: FiberResult) -> None:
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(a.fiber_loss, b.fiber_loss, equal_nan=True)
    torch.testing.assert_close(a.loss_trace, b.loss_trace, equal_nan=True)
    assert torch.equal(a.failed, b.failed)
    if a.references is None:
        assert b.references is None
    else:
        torch.testing.assert_close(a.references, b.references)
    for ta, tb in zip(a.target_tuple(), b.target_tuple(), strict=True):
        torch.testing.assert_close(ta, tb)
    assert b.config == json.loads(json.dumps(a.config, default=str))


# ---------------------------------------------------------------------------- the contract
def test_every_exported_sampler_has_a_case():
    import fiber_plugins.samplers as samplers

    covered = {
        NDTMSampler: "ndtm",
        DPSSampler: "dps",
        NoiseOptSampler: "noise-opt",
        PixelInversionSampler: "pixel-inversion",
        ConditionalFiberSampler: "conditional",
    }
    exported = {
        obj
        for name in samplers.__all__
        if isinstance(obj := getattr(samplers, name), type)
        and issubclass(obj, samplers.FiberSampler)
        and obj is not samplers.FiberSampler
    }
    assert exported == set(covered), "add a case to SAMPLERS for each new sampler"
    assert set(covered.values()) <= set(SAMPLERS)


def test_shapes_finite_loss_and_state_given_back(case, mixed_subject, references):
    before = _snapshot(mixed_subject)
    res = case.run(make_objective(mixed_subject), references)
    R, s = len(references), case.image_size
    assert res.images.shape == (R, N, 3, s, s)
    assert res.fiber_loss.shape == res.failed.shape == (R, N)
    assert res.loss_trace.shape == (R, N, case.trace_steps)
    if case.keeps_references:
        assert res.references.shape == (R, 3, s, s)
    else:
        assert res.references is None
    assert res.target_tuple()[0].shape == (R, 1)
    assert res.failed.dtype == torch.bool and not res.failed.any()
    assert torch.isfinite(res.fiber_loss).all() and (res.fiber_loss >= 0).all()
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert res.config["objective"] == make_objective(mixed_subject).describe()
    assert not math.isnan(res.median_loss())
    assert _snapshot(mixed_subject) == before


def test_no_hook_left_and_state_given_back_after_a_run_that_raises(case, mixed_subject, references):
    before = _snapshot(mixed_subject)
    objective = make_objective(mixed_subject)
    calls = []

    def fails_later(f, y):  # the first call checks the targets; later ones are in the run
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("raised inside sampling")
        return (f - y).pow(2).sum(1)

    objective.distance = fails_later
    with pytest.raises(RuntimeError, match="raised inside sampling"):
        case.run(objective, references)
    assert _snapshot(mixed_subject) == before


def test_the_same_seed_gives_the_same_images(case, subject, references):
    objective = make_objective(subject)
    a = case.run(objective, references[:1], seed=3)
    b = case.run(objective, references[:1], seed=3)
    assert torch.equal(a.images, b.images)
    torch.testing.assert_close(a.fiber_loss, b.fiber_loss, rtol=0, atol=0)
    if case.seeded:
        c = case.run(objective, references[:1], seed=4)
        assert not torch.allclose(a.images, c.images)


def test_result_save_load_round_trip(case, subject, references, tmp_path):
    res = case.run(make_objective(subject), references)
    folder = res.save(tmp_path / "saved")
    _same(res, FiberResult.load(folder))
    if case.takes_out:
        out = case.run(make_objective(subject), references, out=tmp_path / "run")
        _same(out, FiberResult.load(tmp_path / "run"))
        torch.testing.assert_close(out.images, res.images)

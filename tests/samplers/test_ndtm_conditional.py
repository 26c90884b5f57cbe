"""NDTM (and DPS) on a conditional fiber model: the guided samplers take a trained
ConditionalFiberModel as their prior, each row conditioned on its own target y*.

A tiny conditional model of the mean-colour fibers (as in test_conditional.py, fewer training
steps) is enough: the tests check the plumbing (which condition reaches the network for which
row, through batching, out-of-memory back-off and resume), the zero-control limit (the plain
conditional sampler, bit for bit) and batch-size independence, not sample quality.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fiber_plugins as fp
from fiber_plugins.cli.main import main
from fiber_plugins.errors import RunInterrupted
from fiber_plugins.priors.conditional import ConditionalFiberModel
from fiber_plugins.samplers import ConditionalFiberSampler, DPSSampler, NDTMSampler
from fiber_plugins.samplers import run_folder as rf
from fiber_plugins.training import train_fiber_model

TINY_UNET = {
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}

# two references with very different targets (channel means 0.1 and 0.9)
DARK, LIGHT = (0.1, 0.2, 0.1), (0.9, 0.8, 0.9)


class MeanColour(nn.Module):
    """phi(x) = the mean of each colour channel (3 features)."""

    def forward(self, x):
        return x.mean((2, 3))


def colour_batches(b: int, gen: torch.Generator) -> torch.Tensor:
    colour = torch.rand(b, 3, 1, 1, generator=gen)
    return (colour + 0.1 * torch.randn(b, 3, 8, 8, generator=gen)).clamp(0, 1)


def flat_references() -> torch.Tensor:
    """Two 8x8 references in [0, 1] whose targets (channel means) are DARK and LIGHT."""
    return torch.tensor([DARK, LIGHT]).view(2, 3, 1, 1).expand(2, 3, 8, 8).clone()


@pytest.fixture(scope="module")
def trained():
    objective = fp.FiberObjective(MeanColour().eval(), name="mean colour")
    model, _ = train_fiber_model(
        objective,
        colour_batches,
        None,
        steps=60,
        batch_size=32,
        lr=3e-3,
        fiber_weight=1.0,
        unet_config=TINY_UNET,
        progress=False,
    )
    return objective, model


class ConditionSpy:
    """Records, per denoiser call, the rows of the batch in flight and the condition the
    network was given (installed on the model instance and on the sampler's run_batch)."""

    def __init__(self, monkeypatch, model, sampler_cls):
        self.calls: list[tuple[list[tuple[int, int]], torch.Tensor]] = []
        self.batches: list[list[tuple[int, int]]] = []
        self._rows: list[tuple[int, int]] = []
        real_output = model.model_output
        real_run = sampler_cls.run_batch

        def model_output(x, step, cond=None):
            assert cond is not None and cond.shape[0] == x.shape[0] == len(self._rows)
            self.calls.append((list(self._rows), cond.detach().clone()))
            return real_output(x, step, cond)

        def run_batch(sampler, batch, progress):
            self._rows = list(batch.rows)
            self.batches.append(list(batch.rows))
            return real_run(sampler, batch, progress)

        monkeypatch.setattr(model, "model_output", model_output)
        monkeypatch.setattr(sampler_cls, "run_batch", run_batch)

    def check(self, targets: torch.Tensor) -> None:
        """Every call conditioned every row on its own reference's target."""
        assert self.calls
        for rows, cond in self.calls:
            want = targets[[r for r, _ in rows]]
            torch.testing.assert_close(cond.cpu(), want, rtol=0, atol=1e-6)


def _ndtm(model, objective, **kw):
    settings = dict(num_steps=4, inner_steps=2, guidance=1.0, lr_start=0.1, lr_end=0.05)
    return NDTMSampler(model, objective, **{**settings, **kw})


# ---------------------------------------------------------------------------- runs, records
def test_ndtm_on_a_conditional_model_runs_and_records_the_conditional_prior(trained):
    objective, model = trained
    res = _ndtm(model, objective).sample(references=flat_references(), n=2, progress=False)
    assert res.images.shape == (2, 2, 3, 8, 8) and res.loss_trace.shape == (2, 2, 4)
    assert not res.failed.any() and torch.isfinite(res.fiber_loss).all()
    assert res.images.min() >= 0 and res.images.max() <= 1
    assert res.config["sampler"] == "ndtm"
    assert res.config["prior"].startswith("ConditionalFiberModel(")
    record = res.config["fiber_model"]
    assert record["conditioned_on"] == "target" and record["objective"] == "mean colour"
    # the same goes for DPS, and for the plain conditional sampler's record
    dps = DPSSampler(model, objective, num_steps=3, guidance=1.0).sample(
        references=flat_references(), n=1, progress=False
    )
    assert not dps.failed.any() and dps.config["fiber_model"]["conditioned_on"] == "target"
    plain = ConditionalFiberSampler(model, objective, num_steps=3).sample(
        references=flat_references(), n=1, progress=False
    )
    assert plain.config["fiber_model"] == record


def test_guidance_lowers_the_fiber_loss_of_the_conditional_model(trained):
    objective, model = trained
    kw = dict(references=flat_references(), n=4, seed=2, progress=False)
    plain = ConditionalFiberSampler(model, objective, num_steps=6).sample(**kw)
    guided = _ndtm(model, objective, num_steps=6, inner_steps=3, lr_start=0.3, lr_end=0.1).sample(
        **kw
    )
    assert guided.fiber_loss.median() < 0.5 * plain.fiber_loss.median(), (
        guided.fiber_loss,
        plain.fiber_loss,
    )


# ---------------------------------------------------------------------------- per-row conditioning
@pytest.mark.parametrize(
    "sampler_cls, settings",
    [
        (NDTMSampler, {}),
        (NDTMSampler, {"target_mode": "reapprox"}),
        (NDTMSampler, {"guidance": 0.0}),
        (DPSSampler, {"guidance": 1.0}),
    ],
    ids=["ndtm", "ndtm-reapprox", "ndtm-unguided", "dps"],
)
def test_each_row_is_conditioned_on_its_own_target(trained, monkeypatch, sampler_cls, settings):
    objective, model = trained
    if sampler_cls is NDTMSampler:
        sampler = _ndtm(model, objective, num_steps=3, **settings)
    else:
        sampler = DPSSampler(model, objective, num_steps=3, **settings)
    spy = ConditionSpy(monkeypatch, model, sampler_cls)
    res = sampler.sample(references=flat_references(), n=3, batch_size=4, progress=False)
    targets = torch.tensor([DARK, LIGHT])
    torch.testing.assert_close(res.targets, targets, rtol=0, atol=1e-6)
    # batches mix the two references: (0,0) (0,1) (0,2) (1,0) | (1,1) (1,2)
    assert spy.batches == [[(0, 0), (0, 1), (0, 2), (1, 0)], [(1, 1), (1, 2)]]
    spy.check(targets)
    assert {len(rows) for rows, _ in spy.calls} == {4, 2}


def test_conditioning_follows_rows_through_out_of_memory_back_off(trained, monkeypatch):
    objective, model = trained
    sampler = _ndtm(model, objective, num_steps=3)
    kw = dict(references=flat_references(), n=3, seed=1, progress=False)
    reference = sampler.sample(batch_size=2, **kw)
    spy = ConditionSpy(monkeypatch, model, NDTMSampler)
    spied_run = NDTMSampler.run_batch

    def flaky(self, batch, progress):
        if len(batch.rows) > 2:
            spy.batches.append(list(batch.rows))
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return spied_run(self, batch, progress)

    monkeypatch.setattr(NDTMSampler, "run_batch", flaky)
    res = sampler.sample(batch_size=4, **kw)
    assert spy.batches == [
        [(0, 0), (0, 1), (0, 2), (1, 0)],  # out of memory: halved; batches mix the references
        [(0, 0), (0, 1)],
        [(0, 2), (1, 0)],
        [(1, 1), (1, 2)],
    ]
    spy.check(torch.tensor([DARK, LIGHT]))
    assert res.config["batch_size"] == 2 and not res.failed.any()
    torch.testing.assert_close(res.images, reference.images)


def test_conditioning_follows_rows_through_interrupt_and_resume(trained, monkeypatch, tmp_path):
    objective, model = trained
    sampler = _ndtm(model, objective, num_steps=3)
    kw = dict(references=flat_references(), n=3, seed=4, batch_size=2, progress=False)
    full = sampler.sample(**kw)
    orig, commits = rf.RunFolder.commit, []

    def interrupt_after_one(self, *a, **k):
        orig(self, *a, **k)
        commits.append(1)
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(rf.RunFolder, "commit", interrupt_after_one)
        with pytest.raises(RunInterrupted, match="2 of 6 rows"):
            sampler.sample(out=run, **kw)
    spy = ConditionSpy(monkeypatch, model, NDTMSampler)
    resumed = sampler.sample(out=run, resume=True, **kw)
    # only the missing rows ran (the first batch mixes the references), each with its target
    assert spy.batches == [[(0, 2), (1, 0)], [(1, 1), (1, 2)]]
    spy.check(torch.tensor([DARK, LIGHT]))
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.fiber_loss, full.fiber_loss)
    back = fp.FiberResult.load(run)
    assert back.config["fiber_model"]["conditioned_on"] == "target"


# ---------------------------------------------------------------------------- zero control
@pytest.mark.parametrize(
    "make",
    [
        lambda m, o: _ndtm(m, o, num_steps=5, guidance=0.0),
        # guided steps whose control stays 0 (Adam with learning rate 0): x_t + gamma * 0 = x_t
        lambda m, o: _ndtm(m, o, num_steps=5, guidance=1.0, lr_start=0.0, lr_end=0.0),
        lambda m, o: _ndtm(m, o, num_steps=5, inner_steps=0),
        lambda m, o: DPSSampler(m, o, num_steps=5, guidance=0.0),
    ],
    ids=["ndtm-guidance-0", "ndtm-lr-0", "ndtm-inner-0", "dps-guidance-0"],
)
def test_zero_control_reproduces_the_conditional_sampler_exactly(trained, make):
    """With zero control the NDTM update is the flow model's Euler step x_s = x_t + (s - t) v
    from the same grid (prior.timesteps, prior.update), so the samples are bit-identical to
    ConditionalFiberSampler's. The loss traces are not compared: the conditional sampler traces
    the fiber loss of x0_hat clamped to [-1, 1], NDTM of x0_hat itself."""
    objective, model = trained
    kw = dict(references=flat_references(), n=3, seed=7, progress=False)
    plain = ConditionalFiberSampler(model, objective, num_steps=5).sample(**kw)
    res = make(model, objective).sample(**kw)
    assert torch.equal(res.images, plain.images)
    assert torch.equal(res.fiber_loss, plain.fiber_loss)


# ---------------------------------------------------------------------------- batch size
def test_results_do_not_depend_on_the_batch_size(trained):
    """As for unconditional priors: the same rows up to float32 round-off (a batch's matrix
    products round differently; Adam's normalised steps carry that on, measured up to 1.4e-5
    here), and another seed gives other samples."""
    objective, model = trained
    sampler = _ndtm(model, objective, num_steps=4)
    kw = dict(references=flat_references(), n=3, progress=False)
    a = sampler.sample(batch_size=6, seed=3, **kw)
    b = sampler.sample(batch_size=2, seed=3, **kw)
    c = sampler.sample(batch_size=1, seed=3, **kw)
    for other in (b, c):
        torch.testing.assert_close(other.images, a.images, rtol=0, atol=1e-4)
        torch.testing.assert_close(other.fiber_loss, a.fiber_loss, rtol=1e-3, atol=1e-6)
    d = sampler.sample(batch_size=6, seed=4, **kw)
    assert (d.images - a.images).abs().max() > 0.01


# ---------------------------------------------------------------------------- refusals, warnings
def test_a_target_of_the_wrong_width_is_refused_before_any_work(trained, monkeypatch):
    from tests.conftest import TinySubject

    _, model = trained
    other = fp.FiberObjective(TinySubject(channels=3).eval())  # 6 features, the model knows 3
    ran = []
    monkeypatch.setattr(NDTMSampler, "run_batch", lambda *a: ran.append(1))
    sampler = _ndtm(model, other)
    with pytest.raises(ValueError, match="trained on 3 features"):
        sampler.sample(references=torch.rand(1, 3, 8, 8), n=1, progress=False)
    assert not ran


def test_an_objective_change_is_warned_about_by_ndtm_too(trained):
    objective, model = trained
    other = fp.FiberObjective(MeanColour().eval(), distance="l1")
    with pytest.warns(UserWarning, match=r"differs .* in \['distance'\]") as caught:
        sampler = NDTMSampler(model, other)
    assert sampler.prior is model and sampler.objective is other
    assert sum("differs" in str(w.message) for w in caught) == 1


def test_samplers_that_cannot_condition_still_refuse_it(trained):
    objective, model = trained
    assert isinstance(model, ConditionalFiberModel)
    for cls in (fp.NoiseOptSampler, fp.PixelInversionSampler):
        with pytest.raises(TypeError, match="NDTMSampler / DPSSampler"):
            cls(model, objective)


# ---------------------------------------------------------------------------- CLI
def test_cli_samples_conditionally_by_default_and_guides_with_the_flag(tmp_path, capsys):
    from tests.conftest import make_subject

    folder = tmp_path / "fiber-model"
    fp.train_fiber_model(
        fp.FiberObjective(make_subject()),
        lambda b, g: torch.rand(b, 3, 16, 16, generator=g),
        folder,
        steps=2,
        batch_size=4,
        unet_config={**TINY_UNET, "block_out_channels": (8, 16), "norm_num_groups": 4},
        progress=False,
    )
    ref = tmp_path / "ref.png"
    arr = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype("uint8")
    Image.fromarray(arr).save(ref)

    from tests.cli.test_cli import _args

    def args(out, *extra):
        return _args(folder, ref, out, *extra)

    assert main(args(tmp_path / "plain")) == 0
    printed = capsys.readouterr().out
    assert "conditional sampling with 3 steps" in printed
    config = json.loads((tmp_path / "plain" / "metrics.json").read_text())["config"]
    assert config["sampler"] == "conditional"

    assert main(args(tmp_path / "guided", "--guide")) == 0
    printed = capsys.readouterr().out
    assert "NDTM guidance on the conditional model" in printed
    assert "conditional sampling with" not in printed
    config = json.loads((tmp_path / "guided" / "metrics.json").read_text())["config"]
    assert config["sampler"] == "ndtm" and config["settings"]["inner_steps"] == 1
    assert config["fiber_model"]["conditioned_on"] == "target"
    assert config["prior"].startswith("ConditionalFiberModel(")

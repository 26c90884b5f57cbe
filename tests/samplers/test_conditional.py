"""Conditional fiber models (DESIGN 4.3): training with the fiber loss, saving, loading, sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fiber_plugins as fp
from fiber_plugins.priors.conditional import ConditionalFiberModel
from fiber_plugins.samplers import ConditionalFiberSampler, NDTMSampler
from fiber_plugins.training import train_fiber_model

from ..conftest import TinySubject

TINY_UNET = {
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


class MeanColour(nn.Module):
    """phi(x) = the mean of each colour channel (3 features): its fiber is every image with
    those channel means."""

    def forward(self, x):
        return x.mean((2, 3))


def colour_batches(b: int, gen: torch.Generator) -> torch.Tensor:
    """Flat-colour 8x8 images (one random colour each) with a little texture, in [0, 1]."""
    colour = torch.rand(b, 3, 1, 1, generator=gen)
    texture = 0.1 * torch.randn(b, 3, 8, 8, generator=gen)
    return (colour + texture).clamp(0, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny conditional model of the mean-colour fibers, trained for 150 steps (~10 s)."""
    objective = fp.FiberObjective(MeanColour().eval(), name="mean colour")
    out = tmp_path_factory.mktemp("fiber-model")
    model, meta = train_fiber_model(
        objective,
        colour_batches,
        out,
        steps=150,
        batch_size=32,
        lr=3e-3,
        fiber_weight=1.0,
        unet_config=TINY_UNET,
        progress=False,
    )
    return objective, model, meta, out


def test_training_record_and_files(trained):
    _, model, meta, out = trained
    assert isinstance(model, ConditionalFiberModel)
    assert model.num_features == 3 and model.image_size == (8, 8) and model.kind == "flow"
    for f in (
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "condition/config.json",
        "condition/model.safetensors",
        "fiber_model.json",
        "training.json",
    ):
        assert (out / f).is_file(), f
    assert meta["fiber_weight"] == 1.0 and meta["num_features"] == 3
    assert meta["final_fiber_loss_mean_last100"] is not None


def test_samples_land_on_the_conditioned_fiber(trained):
    """Samples conditioned on y* have y* 's channel means; conditioned on other colours, not."""
    objective, model, _, _ = trained
    refs = torch.tensor([[0.2, 0.5, 0.8], [0.9, 0.1, 0.4], [0.5, 0.5, 0.1]])
    targets = refs  # phi's default preprocessing maps the prior's [-1, 1] to [0, 1]
    res = ConditionalFiberSampler(model, objective, num_steps=10).sample(
        targets=targets, n=4, progress=False
    )
    assert res.fiber_loss.shape == (3, 4) and not res.failed.any()
    means = res.images.mean((3, 4))  # (R, M, 3) in [0, 1]
    wrong = (means - refs.roll(1, 0)[:, None]).pow(2).sum(-1)
    right = (means - refs[:, None]).pow(2).sum(-1)
    assert torch.allclose(right, res.fiber_loss, atol=1e-4)
    assert right.median() < 0.1 * wrong.median(), (right, wrong)
    assert right.median() < 0.01


def test_save_load_round_trip_gives_the_same_samples(trained):
    objective, model, _, out = trained
    loaded = fp.load_prior(out)  # load_prior recognises the folder
    assert isinstance(loaded, ConditionalFiberModel)
    assert "mean colour" in repr(loaded)
    kw = dict(targets=torch.tensor([[0.3, 0.6, 0.2]]), n=3, seed=5, progress=False)
    a = ConditionalFiberSampler(model, objective, num_steps=6).sample(**kw)
    b = ConditionalFiberSampler(loaded, objective, num_steps=6).sample(**kw)
    assert torch.allclose(a.images, b.images, atol=1e-5)


def test_results_do_not_depend_on_the_batch_size(trained):
    objective, model, _, _ = trained
    sampler = ConditionalFiberSampler(model, objective, num_steps=5)
    kw = dict(targets=torch.tensor([[0.3, 0.6, 0.2], [0.7, 0.2, 0.2]]), n=3, progress=False)
    a = sampler.sample(batch_size=6, **kw)
    b = sampler.sample(batch_size=2, **kw)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert a.config["sampler"] == "conditional" and a.loss_trace.shape == (2, 3, 5)
    # the trace (fiber loss of x0_hat per step) ends at the final loss
    assert torch.allclose(a.loss_trace[..., -1], a.fiber_loss, rtol=1e-3, atol=1e-4)


def test_the_fiber_loss_term_trains_without_touching_the_subject():
    subject = TinySubject(channels=3)
    subject.train()
    flags = [p.requires_grad for p in subject.parameters()]
    before = [p.detach().clone() for p in subject.parameters()]
    objective = fp.FiberObjective(subject)
    with pytest.warns(UserWarning, match="train mode"):
        model, meta = train_fiber_model(
            objective,
            colour_batches,
            None,
            steps=3,
            batch_size=8,
            unet_config=TINY_UNET,
            fiber_weight=0.5,
            fiber_t_max=1.0,
            progress=False,
        )
    assert all(p.grad is None for p in subject.parameters())
    assert [p.requires_grad for p in subject.parameters()] == flags and subject.training
    assert all(torch.equal(a, b) for a, b in zip(before, subject.parameters()))
    assert meta["final_fiber_loss_mean_last100"] > 0 and model.num_features == 6


def test_training_data_is_checked():
    objective = fp.FiberObjective(MeanColour().eval())
    with pytest.raises(TypeError, match=r"\(N, C, H, W\)"):
        train_fiber_model(objective, torch.rand(8, 8), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        train_fiber_model(objective, torch.rand(8, 3, 8, 8) * 2 - 1, steps=1, progress=False)
    with pytest.raises(ValueError, match="fiber_t_max"):
        train_fiber_model(objective, torch.rand(8, 3, 8, 8), fiber_t_max=0.0, progress=False)
    with pytest.raises(ValueError, match="fiber_weight"):
        train_fiber_model(objective, torch.rand(8, 3, 8, 8), fiber_weight=-1, progress=False)
    with pytest.raises(TypeError, match="one objective"):
        train_fiber_model(
            objective + objective,
            torch.rand(8, 3, 8, 8),
            steps=1,
            unet_config=TINY_UNET,
            progress=False,
        )


def test_wrong_pairings_are_refused(trained, pixel_prior):
    objective, model, _, _ = trained
    with pytest.raises(TypeError, match="ConditionalFiberModel"):
        ConditionalFiberSampler(pixel_prior, objective)
    with pytest.raises(ValueError, match="needs the condition"):
        model.predict(torch.zeros(1, 3, 8, 8), model.timesteps(2)[0])
    other = fp.FiberObjective(TinySubject(channels=3).eval())  # 6 features, the model knows 3
    with pytest.raises(ValueError, match="trained on 3 features"):
        ConditionalFiberSampler(model, other, num_steps=2).sample(
            references=torch.rand(1, 3, 8, 8), n=1, progress=False
        )
    with pytest.raises(FileNotFoundError, match="not a conditional fiber model folder"):
        ConditionalFiberModel.from_pretrained(".")
    with pytest.raises(ValueError, match="num_steps"):
        ConditionalFiberSampler(model, objective, num_steps=0)


def _tiny_train(objective, **kw):
    settings = dict(steps=2, batch_size=8, unet_config=TINY_UNET, progress=False, seed=3)
    return train_fiber_model(objective, colour_batches, None, **{**settings, **kw})


def test_the_fiber_term_changes_training_and_t_max_selects_rows():
    objective = fp.FiberObjective(MeanColour().eval())
    plain, meta0 = _tiny_train(objective, fiber_weight=0.0)
    full, _ = _tiny_train(objective, fiber_weight=0.5)
    low, meta_low = _tiny_train(objective, fiber_weight=0.5, fiber_t_max=0.3)
    again, _ = _tiny_train(objective, fiber_weight=0.5)
    w = [m.denoiser.conv_out.weight for m in (plain, full, low, again)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    assert torch.equal(w[1], w[3])  # seeded: the same settings give the same weights
    assert meta0["fiber_t_max"] is None and meta_low["fiber_t_max"] == 0.3
    assert meta0["ema_decay_reached"] == pytest.approx(2 / 11)


def test_a_non_differentiable_phi_is_refused_with_a_fiber_term():
    class Rounded(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)).detach().round()

    objective = fp.FiberObjective(Rounded().eval())
    with pytest.raises(ValueError, match="passes no gradient"):
        _tiny_train(objective, fiber_weight=0.1)
    model, _ = _tiny_train(objective, fiber_weight=0.0)  # plain conditional FM is fine
    assert model.num_features == 3


def test_time_embedding_width_follows_the_unet():
    objective = fp.FiberObjective(MeanColour().eval())
    model, _ = _tiny_train(objective, unet_config={**TINY_UNET, "time_embedding_dim": 40})
    assert model.condition.out_features == 40
    res = ConditionalFiberSampler(model, objective, num_steps=2).sample(
        targets=torch.rand(1, 3), n=1, progress=False
    )
    assert res.images.shape == (1, 1, 3, 8, 8)


def test_training_device_mismatch_is_refused():
    objective = fp.FiberObjective(MeanColour().eval())
    with pytest.raises(ValueError, match="unknown device 'not-a-device'"):
        _tiny_train(objective, device="not-a-device")
    subject = TinySubject(channels=3).eval()
    with pytest.raises(ValueError, match="the subject is on cpu"):
        _tiny_train(fp.FiberObjective(subject), device="meta")


def test_objective_or_subject_changes_are_warned_about(trained):
    objective, model, _, _ = trained
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same objective (another label): no warning
        same = ConditionalFiberSampler(
            model, fp.FiberObjective(MeanColour().eval(), name="other name")
        )
    assert same.prior is model
    other = fp.FiberObjective(MeanColour().eval(), distance="l1")
    with pytest.warns(UserWarning, match=r"differs .* in \['distance'\]") as caught:
        ConditionalFiberSampler(model, other)
    assert "trained: ['l2'], now: ['l1']" in str(caught[0].message)
    assert {w.filename for w in caught} == {__file__}  # points at the user's line
    subject = TinySubject(channels=3).eval()
    obj = fp.FiberObjective(subject)
    m2, meta = _tiny_train(obj)
    assert meta["subject_fingerprint"] == m2.info["subject_fingerprint"] is not None
    with torch.no_grad():
        subject.fc.bias.add_(1.0)  # "retrained" subject
    with pytest.warns(UserWarning, match="subject's weights differ") as caught:
        ConditionalFiberSampler(m2, obj)
    assert meta["subject_fingerprint"] in str(caught[0].message)


def test_samplers_without_conditioning_refuse_a_conditional_model_at_construction(trained):
    objective, model, _, _ = trained
    for cls in (fp.NoiseOptSampler, fp.PixelInversionSampler):
        with pytest.raises(TypeError, match="ConditionalFiberSampler"):
            cls(model, objective)
    # NDTM and DPS condition each row on its target (tests/samplers/test_ndtm_conditional.py)
    for cls in (NDTMSampler, fp.DPSSampler):
        assert cls(model, objective).prior is model


def test_result_records_the_fiber_model(trained):
    objective, model, _, _ = trained
    res = ConditionalFiberSampler(model, objective, num_steps=2).sample(
        targets=torch.rand(1, 3), n=1, progress=False
    )
    assert res.config["fiber_model"]["fiber_weight"] == 1.0
    assert res.config["fiber_model"]["objective"] == "mean colour"

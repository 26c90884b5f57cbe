"""train_prior: a run interrupted and resumed from its checkpoint saves the same prior as an
uninterrupted one; the recipe (objective, loss weighting, schedule) is recorded in training.json
and the saved folder loads with load_prior as the right kind of prior."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

import fiber_plugins as fp  # noqa: E402
from fiber_plugins.data import color_mnist as cm  # noqa: E402
from fiber_plugins.zoo import prior_training  # noqa: E402


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("objective", ["flow", "v"])
def test_train_prior_resumes_bit_identical(tmp_path, monkeypatch, objective):
    kw = dict(steps=4, batch_size=4, progress=False, objective=objective, checkpoint_every=2)
    if objective == "v":
        kw["loss_weighting"] = "min-snr"
    else:
        kw["flow_shift"] = 3.0
    whole = prior_training.train_prior(tmp_path / "whole", checkpoint=tmp_path / "ck_whole", **kw)

    real_loop = prior_training.train_loop

    def interrupted(*args, **kwargs):  # the process dies during step 3 (after checkpoint 2)
        step = kwargs.pop("step", None) or args[1]

        def dying(i):
            if i == 3:
                raise KeyboardInterrupt
            return step(i)

        return real_loop(args[0], dying, **kwargs)

    monkeypatch.setattr(prior_training, "train_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prior_training.train_prior(tmp_path / "resumed", checkpoint=tmp_path / "ck", **kw)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(prior_training, "train_loop", real_loop)
    resumed = prior_training.train_prior(tmp_path / "resumed", checkpoint=tmp_path / "ck", **kw)

    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_loss_mean_last100"] == whole["final_loss_mean_last100"]
    info = json.loads((tmp_path / "resumed" / "training.json").read_text())
    assert info["objective"] == objective and info["steps"] == 4 and info["batch_size"] == 4
    assert info["loss_weighting"] == kw.get("loss_weighting", "none")
    prior = fp.load_prior(tmp_path / "resumed")
    assert prior.kind == ("flow" if objective == "flow" else "pixel")
    assert prior.schedule.prediction_type == ("flow" if objective == "flow" else "v_prediction")
    if objective == "flow":  # the training time shift is the sampling grid's shift
        assert info["schedule"]["shift"] == 3.0 and prior.schedule.config["shift"] == 3.0
    x = prior.sample_unguided(torch.randn(1, 3, 32, 32), num_steps=2)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_train_prior_default_recipe_is_recorded_and_evaluated_at_checkpoints(tmp_path):
    seen = []
    meta = prior_training.train_prior(
        tmp_path / "p",
        steps=2,
        batch_size=4,
        progress=False,
        checkpoint=tmp_path / "ck",
        checkpoint_every=1,
        on_checkpoint=lambda step, prior: seen.append((step, prior.kind)),
    )
    assert seen == [(1, "flow"), (2, "flow")]
    assert meta["objective"] == "flow" and meta["loss_weighting"] == "none"
    assert meta["scheduler"] == "FlowMatchEulerDiscreteScheduler" and meta["batch_size"] == 4
    # the shipped in-distribution recipe (SHIPPED_PRIOR_RECIPES[False])
    assert meta["time_sampling"] == "t = u, u ~ sigmoid(N(0, 1)) (logit-normal)"
    assert "colours integrated out" in meta["target"] and meta["off_law"]["fraction"] == 0.25
    recipe = json.loads((tmp_path / "ck" / "state.json").read_text())["settings"]["recipe"]
    assert {k: recipe[k] for k in ("time_sampling", "target", "off_law")} == {
        "time_sampling": "logit-normal", "target": "colour-posterior", "off_law": 0.25
    }  # fmt: skip


def test_train_prior_defaults_are_the_shipped_recipes(tmp_path):
    """ood=False defaults to the in-distribution prior's recipe, ood=True to the OOD prior's
    (no colour-posterior target or off-law states: they are built on h), a DDPM objective to
    uniform times and the sampled target; an explicit value wins over the default."""
    kw = dict(steps=1, batch_size=4, progress=False)
    ood = prior_training.train_prior(tmp_path / "ood", ood=True, **kw)
    assert ood["time_sampling"] == "uniform t in [0, 1)" and "target" not in ood
    assert "off_law" not in ood
    assert prior_training.SHIPPED_PRIOR_RECIPES[True]["steps"] == 2000
    assert prior_training.SHIPPED_PRIOR_RECIPES[False]["steps"] == 10000
    ddpm = prior_training.train_prior(tmp_path / "v", objective="v", **kw)
    assert ddpm["time_sampling"] == "uniform t in 0..999" and "off_law" not in ddpm
    sampled = prior_training.train_prior(tmp_path / "s", target="sampled", **kw)
    assert "target" not in sampled and "off_law" not in sampled
    assert sampled["time_sampling"] == "t = u, u ~ sigmoid(N(0, 1)) (logit-normal)"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"objective": "x0"}, "objective must be one of"),
        ({"loss_weighting": "p2"}, "loss_weighting must be one of"),
        ({"objective": "flow", "loss_weighting": "min-snr"}, "for the DDPM objectives"),
        ({"objective": "v", "flow_shift": 3.0}, "flow_shift must be > 0 and is for"),
        ({"time_sampling": "beta"}, "time_sampling must be one of"),
        ({"mean_weight": -1.0}, "mean_weight must be >= 0"),
        ({"objective": "epsilon", "mean_weight": 10.0}, "mean_weight must be >= 0 and is for"),
        ({"objective": "v", "time_sampling": "logit-normal"}, "is for objective='flow'"),
        ({"target": "x0"}, "target must be one of"),
        ({"target": "colour-posterior", "ood": True}, "with in-distribution colours"),
        ({"target": "colour-posterior", "objective": "v"}, "is for objective='flow'"),
        ({"off_law": 0.25, "target": "sampled"}, "needs target='colour-posterior'"),
        ({"off_law": 1.0, "target": "colour-posterior"}, "off_law must be in"),
        ({"off_law": -0.1, "target": "colour-posterior"}, "off_law must be in"),
        ({"off_law": 0.25, "target": "colour-posterior", "off_law_t_max": 0.0}, "off_law_t_max"),
        ({"off_law": 0.1, "target": "colour-posterior"}, "rounds to no off-law state"),
        ({}, "off_law=0.25 of a batch of 1 rounds to no off-law state; .* at least 3$"),
    ],
)
def test_train_prior_refuses_unknown_recipes(tmp_path, kw, match):
    batch = 1 if not kw else 4  # {}: the default recipe's off-law states need a batch >= 3
    with pytest.raises(ValueError, match=match):
        prior_training.train_prior(tmp_path, steps=1, batch_size=batch, progress=False, **kw)


def test_logit_normal_time_sampling_trains_more_at_middle_noise(tmp_path, monkeypatch):
    """time_sampling='logit-normal' draws t = sigmoid(z): more of the network calls fall at
    middle noise levels than with uniform t, and training.json says which law was used."""
    from diffusers import UNet2DModel

    seen: list[torch.Tensor] = []
    forward = UNet2DModel.forward

    def spy(self, sample, timestep, *args, **kwargs):
        if self.training:
            seen.append(torch.as_tensor(timestep).detach().flatten() / 1000)
        return forward(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", spy)
    middle = {}
    for law in ("uniform", "logit-normal"):
        seen.clear()
        meta = prior_training.train_prior(
            tmp_path / law, steps=2, batch_size=64, progress=False, time_sampling=law
        )
        t = torch.cat(seen)
        assert t.numel() == 128 and ((t > 0) & (t < 1)).all()
        middle[law] = float(((t > 0.25) & (t < 0.75)).float().mean())
    assert middle["logit-normal"] > middle["uniform"] + 0.1
    assert meta["time_sampling"] == "t = u, u ~ sigmoid(N(0, 1)) (logit-normal)"


def test_mean_weight_adds_the_error_mean_to_the_loss(tmp_path):
    """mean_weight w adds w x (per-channel image mean of the velocity error)^2: on the same first
    batch and weights the loss grows by that term, and training.json records w."""
    kw = dict(steps=1, batch_size=4, progress=False)
    plain = prior_training.train_prior(tmp_path / "plain", **kw)
    weighted = prior_training.train_prior(tmp_path / "weighted", mean_weight=100.0, **kw)
    assert weighted["final_loss_mean_last100"] > plain["final_loss_mean_last100"]
    assert weighted["mean_weight"] == 100.0 and "mean_weight" not in plain


def _zero_network(monkeypatch, seen: dict[str, list[torch.Tensor]]) -> None:
    """Zero the UNet's output in training and record its inputs x_t and t in ``seen``: the
    recorded loss is then the mean square of the training target."""
    from diffusers import UNet2DModel

    forward = UNet2DModel.forward

    def zero(self, sample, timestep, *args, **kwargs):
        out = forward(self, sample, timestep, *args, **kwargs)
        if self.training:
            seen["xt"].append(sample.detach().clone())
            seen["t"].append(torch.as_tensor(timestep).detach().flatten() / 1000)
            out.sample = out.sample * 0.0
        return out

    monkeypatch.setattr(UNet2DModel, "forward", zero)


def test_colour_posterior_target_is_the_posterior_velocity(tmp_path, monkeypatch):
    """target='colour-posterior' regresses on v = (x_t - E[x0 | x_t, digit]) / t: with the
    network's output zeroed, the recorded loss is the mean square of that target, recomputed here
    from the batch the trainer drew; the sampled target (eps - x0) gives a different loss."""

    from fiber_plugins.data import color_mnist as cm

    seen: dict[str, list[torch.Tensor]] = {"xt": [], "t": [], "g": [], "x0": []}
    colour = cm.make_colored

    def spy(g, *args, **kwargs):
        x, b = colour(g, *args, **kwargs)
        seen["g"].append(g.clone())
        seen["x0"].append(2 * x - 1)
        return x, b

    _zero_network(monkeypatch, seen)
    monkeypatch.setattr(cm, "make_colored", spy)
    kw = dict(steps=1, batch_size=8, progress=False, time_sampling="uniform")
    meta = prior_training.train_prior(
        tmp_path / "post", target="colour-posterior", off_law=0.0, **kw
    )
    xt, t, g, x0 = (seen[k][0] for k in ("xt", "t", "g", "x0"))
    tb = t.view(-1, 1, 1, 1)
    v = (xt.double() - cm.posterior_clean(xt.double(), t, g)) / tb
    assert meta["final_loss_mean_last100"] == pytest.approx(float(v.pow(2).mean()), rel=1e-4)
    sampled = ((xt - (1 - tb) * x0) / tb - x0).pow(2).mean()  # eps - x0 of the drawn image
    assert abs(float(sampled) - meta["final_loss_mean_last100"]) > 1e-3
    assert "colours integrated out" in meta["target"]
    plain = prior_training.train_prior(tmp_path / "plain", target="sampled", **kw)
    assert plain["final_loss_mean_last100"] == pytest.approx(float(sampled), rel=1e-4)
    assert "target" not in plain


def test_off_law_states_regress_on_the_colour_posterior(tmp_path, monkeypatch):
    """off_law=0.25 replaces the first quarter of each batch by digits coloured off the law near
    h's wrap, at t <= off_law_t_max: with the network's output zeroed the loss is the mean square
    of (x_t - E[x0 | x_t, digit]) / t over the whole batch, those states included, and the
    posterior moves their backgrounds to the side of 0.5 that their digits' contrast names."""

    from fiber_plugins.data import color_mnist as cm

    seen: dict[str, list[torch.Tensor]] = {"xt": [], "t": [], "g": [], "b": [], "f": []}
    colour, off = cm.make_colored, cm.off_law_colours

    def spy(g, *args, **kwargs):
        seen["g"].append(g.clone())
        return colour(g, *args, **kwargs)

    def spy_off(*args, **kwargs):
        b, f = off(*args, **kwargs)
        seen["b"].append(b)
        seen["f"].append(f)
        return b, f

    _zero_network(monkeypatch, seen)
    monkeypatch.setattr(cm, "make_colored", spy)
    monkeypatch.setattr(cm, "off_law_colours", spy_off)
    meta = prior_training.train_prior(
        tmp_path / "off",
        steps=1,
        batch_size=16,
        progress=False,
        target="colour-posterior",
        off_law=0.25,
        off_law_t_max=0.5,
    )
    xt, t, g, b, f = (seen[k][0] for k in ("xt", "t", "g", "b", "f"))
    assert b.shape == f.shape == (4, 3) and ((b - 0.5).abs() <= 0.1).all()
    assert (t[:4] >= 0.02).all() and (t[:4] <= 0.5).all()
    tb = t.view(-1, 1, 1, 1)
    post = cm.posterior_clean(xt.double(), t, g)
    v = (xt.double() - post) / tb
    assert meta["final_loss_mean_last100"] == pytest.approx(float(v.pow(2).mean()), rel=1e-4)
    # the first four states are the off-law digits, noised: their mean colour matches
    x0_off = cm.colorize(g[:4], b, f) * 2 - 1
    eps = (xt[:4] - (1 - tb[:4]) * x0_off) / tb[:4]
    assert eps.abs().max() < 6 and abs(float(eps.std()) - 1) < 0.1
    # the posterior's background is on the side the digit's contrast names: dark digit, b >= 0.5
    b_post = cm.border_mean((post[:4].float() + 1) / 2)
    darker = f < b
    assert ((b_post >= 0.5) == darker).all()
    assert meta["off_law"]["fraction"] == 0.25 and meta["off_law"]["t"] == "U(0.02, 0.5)"


def test_off_law_colours_break_the_law_half_the_time():
    from fiber_plugins.data import color_mnist as cm

    b, f = cm.off_law_colours(4000, torch.Generator().manual_seed(0))
    assert ((b - 0.5).abs() <= 0.1).all() and ((f >= 0) & (f <= 1)).all()
    off = cm.off_branch(b, f)
    assert 0.47 < float(off.float().mean()) < 0.53
    torch.testing.assert_close(f[~off], cm.foreground(b)[~off])
    torch.testing.assert_close(f[off], cm.other_branch(b)[off])


# ---------------------------------------------------------------------- what a resume must share
_BASES = {
    "plain": {},  # the shipped in-distribution recipe: logit-normal, colour-posterior, off-law
    "posterior": {"target": "colour-posterior", "off_law": 0.25},
    "ddpm": {"objective": "v", "loss_weighting": "min-snr"},
}
_CHANGES = [
    ("plain", "ood", True),
    ("plain", "steps", 2),
    ("plain", "batch_size", 8),
    ("plain", "lr", 2e-3),
    ("plain", "ema_decay", 0.99),
    ("plain", "seed", 5),
    ("plain", "objective", "epsilon"),
    ("plain", "flow_shift", 2.0),
    ("plain", "time_sampling", "uniform"),
    ("plain", "mean_weight", 1.0),
    ("plain", "target", "sampled"),
    ("posterior", "off_law", 0.5),
    ("posterior", "off_law_t_max", 0.9),
    ("ddpm", "loss_weighting", "none"),
    ("ddpm", "snr_gamma", 1.0),
]


@pytest.fixture(scope="module")
def base_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    kw = dict(steps=1, batch_size=4, progress=False)
    runs: dict = {"digits": cm.load_digits("train")}  # loaded once for every case
    for name, recipe in _BASES.items():
        prior_training.train_prior(root / f"{name}-out", checkpoint=root / name, **kw, **recipe)
        runs[name] = (root / name, {**kw, **recipe})
    return runs


def test_every_recipe_argument_of_train_prior_is_tested_for_a_changed_resume():
    """The recipe a checkpoint records is every argument but NOT_RECIPE (by construction); the
    table of changes below covers each of them, so a new argument needs a case here."""
    import inspect

    arguments = set(inspect.signature(prior_training.train_prior).parameters)
    assert set(prior_training.NOT_RECIPE) <= arguments
    assert {name for _, name, _ in _CHANGES} == arguments - set(prior_training.NOT_RECIPE)


@pytest.mark.parametrize("base, name, value", _CHANGES, ids=[c[1] for c in _CHANGES])
def test_a_resume_with_a_changed_recipe_is_refused_naming_it(
    tmp_path, monkeypatch, base_checkpoints, base, name, value
):
    """Any change of the recipe on resume is refused in one line that names the setting with the
    checkpoint's value and the new one; nothing is written, the checkpoint is left as it was."""
    import inspect

    monkeypatch.setattr(cm, "load_digits", lambda split: base_checkpoints["digits"])
    folder, kw = base_checkpoints[base]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    old = kw.get(name, inspect.signature(prior_training.train_prior).parameters[name].default)
    if old is None:  # a default resolved from the shipped recipe, as the checkpoint records it
        old = prior_training.SHIPPED_PRIOR_RECIPES[False][name]
    changed = {**kw, name: value}
    with pytest.raises(ValueError, match="cannot be resumed") as err:
        prior_training.train_prior(tmp_path / "out", checkpoint=folder, resume=True, **changed)
    text = str(err.value)
    assert "\n" not in text and f"{name}: checkpoint {old!r}, now {value!r}" in text
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_train_prior_refuses_a_checkpoint_path_that_is_no_checkpoint_folder(tmp_path, monkeypatch):
    """A file, or a folder of other files (a sample run), is refused in one line before any data
    is loaded or model built; resume=True in a new folder trains afresh (continue if present)."""
    from fiber_plugins.errors import UserValueError

    png = tmp_path / "digit.png"
    png.write_bytes(b"png")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")

    def no_data(*args, **kwargs):
        raise AssertionError("the checkpoint folder is checked before the data is loaded")

    kw = dict(steps=1, batch_size=4, progress=False)
    with monkeypatch.context() as m:
        m.setattr(cm, "load_digits", no_data)
        for folder, message in [
            (png, "is a file; give a folder"),
            (run, "not a training checkpoint"),
        ]:
            for resume in (True, False):
                with pytest.raises(UserValueError, match=message) as err:
                    prior_training.train_prior(
                        tmp_path / "out", checkpoint=folder, resume=resume, **kw
                    )
                assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in run.iterdir()) == ["run.json"]
    prior_training.train_prior(tmp_path / "out", checkpoint=tmp_path / "new", resume=True, **kw)
    assert json.loads((tmp_path / "new" / "state.json").read_text())["step"] == 1

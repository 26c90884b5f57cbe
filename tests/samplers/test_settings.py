"""Every sampler setting is validated once, where its config is built: one table over every
config class and every setting (bad values refused with one line quoting the value and the
valid range; good values accepted and normalised; JSON round trip), and rows whose guided state
overflows fail with a reason instead of falling back to unguided sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.errors import UserTypeError, UserValueError
from fiber_plugins.samplers import (
    ConditionalConfig,
    DPSConfig,
    GuidanceSchedule,
    LatentRefineConfig,
    NDTMConfig,
    NoiseOptConfig,
    PixelInversionConfig,
)

NAN, INF = math.nan, math.inf

# (config class, field, label in the message, kind, valid range as the message writes it)
# kind: "int", "float" (finite, >= low), "float01" ([0, 1]), "pos" (> 0), "cutoff" ((0, 1] or
# None), "opt" (>= 0 or None), "bool", "guidance" (a number >= 0 or a schedule)
SETTINGS = [
    (GuidanceSchedule, "strength", "guidance strength", "float", ">= 0"),
    (GuidanceSchedule, "low", "guidance interval low", "float01", "in [0, 1]"),
    (GuidanceSchedule, "high", "guidance interval high", "float01", "in [0, 1]"),
    (GuidanceSchedule, "outside", "guidance outside the interval", "float", ">= 0"),
    (GuidanceSchedule, "final", "final guidance", "opt", ">= 0 or None"),
    (NDTMConfig, "num_steps", "num_steps", "int", "an integer >= 1"),
    (NDTMConfig, "inner_steps", "inner_steps", "int", "an integer >= 0"),
    (NDTMConfig, "guidance", "guidance", "guidance", ">= 0"),
    (NDTMConfig, "lr_start", "lr_start", "float", ">= 0"),
    (NDTMConfig, "lr_end", "lr_end", "float", ">= 0"),
    (NDTMConfig, "kappa", "kappa", "float", ">= 0"),
    (NDTMConfig, "tau", "tau", "float", ">= 0"),
    (NDTMConfig, "eta", "eta", "float01", "in [0, 1]"),
    (NDTMConfig, "autocast", "autocast", "bool", "True or False"),
    (NDTMConfig, "trace", "trace", "bool", "True or False"),
    (DPSConfig, "num_steps", "num_steps", "int", "an integer >= 1"),
    (DPSConfig, "guidance", "guidance", "guidance", ">= 0"),
    (DPSConfig, "normalize", "normalize", "bool", "True or False"),
    (DPSConfig, "eta", "eta", "float01", "in [0, 1]"),
    (DPSConfig, "autocast", "autocast", "bool", "True or False"),
    (NoiseOptConfig, "num_steps", "num_steps", "int", "an integer >= 1"),
    (NoiseOptConfig, "max_iters", "max_iters", "int", "an integer >= 1"),
    (NoiseOptConfig, "lr", "lr", "pos", "> 0"),
    (NoiseOptConfig, "eta", "eta", "float01", "in [0, 1]"),
    (NoiseOptConfig, "loss_weight", "loss_weight", "pos", "> 0"),
    (NoiseOptConfig, "lowpass", "lowpass", "cutoff", "in (0, 1] (fraction of Nyquist) or None"),
    (NoiseOptConfig, "norm_weight", "norm_weight", "float", ">= 0"),
    (NoiseOptConfig, "threshold", "threshold", "opt", ">= 0 or None"),
    (NoiseOptConfig, "checkpointing", "checkpointing", "bool", "True or False"),
    (NoiseOptConfig, "autocast", "autocast", "bool", "True or False"),
    (PixelInversionConfig, "num_steps", "num_steps", "int", "an integer >= 1"),
    (PixelInversionConfig, "lr", "lr", "pos", "> 0"),
    (PixelInversionConfig, "tv_weight", "tv_weight", "float", ">= 0"),
    (PixelInversionConfig, "tv_beta", "tv_beta", "pos", "> 0"),
    (PixelInversionConfig, "l2_weight", "l2_weight", "float", ">= 0"),
    (PixelInversionConfig, "init_scale", "init_scale", "float", ">= 0"),
    (PixelInversionConfig, "autocast", "autocast", "bool", "True or False"),
    (LatentRefineConfig, "steps", "steps", "int", "an integer >= 1"),
    (LatentRefineConfig, "lr", "lr", "pos", "> 0"),
    (LatentRefineConfig, "autocast", "autocast", "bool", "True or False"),
    (ConditionalConfig, "num_steps", "num_steps", "int", "an integer >= 1"),
    (ConditionalConfig, "trace", "trace", "bool", "True or False"),
    (ConditionalConfig, "autocast", "autocast", "bool", "True or False"),
]

V, T = UserValueError, UserTypeError
_NUMBER = [(NAN, V), (INF, V), (-INF, V), (-1, V), (True, T), ("3", T), ([1.0], T)]
BAD = {
    "int": [(NAN, T), (INF, T), (2.5, T), (3.0, T), (True, T), ("3", T), (None, T), (-1, V)],
    "float": _NUMBER + [(None, T)],
    "float01": _NUMBER + [(None, T), (1.5, V)],
    "pos": _NUMBER + [(None, T), (0, V), (0.0, V)],
    "cutoff": _NUMBER + [(0.0, V), (1.5, V)],
    "opt": _NUMBER,
    "bool": [(1, T), (0, T), ("yes", T), (None, T), (NAN, T)],
    "guidance": [(NAN, V), (INF, V), (-1, V), (True, T), ("3", T), (None, T)],
}


def _cases():
    for cls, field, label, kind, span in SETTINGS:
        for value, exc in BAD[kind]:
            yield pytest.param(
                cls, field, label, span, value, exc, id=f"{cls.__name__}.{field}={value!r}"
            )


@pytest.mark.parametrize("cls, field, label, span, value, exc", list(_cases()))
def test_bad_setting_is_refused_in_one_line_quoting_value_and_range(
    cls, field, label, span, value, exc
):
    with pytest.raises(exc) as err:
        cls(**{field: value})
    assert isinstance(err.value, ValueError if exc is V else TypeError)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{label} must be "), message
    assert message.endswith(f", got {value!r}"), message
    if field == "guidance" and exc is T:
        assert "a float or a GuidanceSchedule" in message
    else:
        assert span in message, message


def test_every_numeric_setting_is_in_the_table():
    """A new config field without a row here fails this test (the table is the checklist)."""
    import dataclasses

    covered = {(cls, field) for cls, field, *_ in SETTINGS}
    choices = {"kind", "target_mode", "optimiser", "optimise", "norm"}
    for cls in {c for c, *_ in SETTINGS}:
        for f in dataclasses.fields(cls):
            assert f.name in choices or (cls, f.name) in covered, (cls.__name__, f.name)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GuidanceSchedule("interval", low=NAN), "guidance interval low must be"),
        (lambda: GuidanceSchedule("interval", low=0.8, high=0.2), "0 <= low <= high <= 1"),
        (lambda: GuidanceSchedule("ramp", final=NAN), "final guidance must be"),
        (lambda: GuidanceSchedule("cosine"), "unknown guidance schedule 'cosine'"),
        # a setting the kind does not use would be stored but change nothing
        (lambda: GuidanceSchedule(low=0.1, high=0.2), "'constant' does not use low=0.1, high=0.2"),
        (lambda: GuidanceSchedule(final=2.0), "'constant' does not use final=2.0"),
        (lambda: GuidanceSchedule(outside=0.5), "'constant' does not use outside=0.5"),
        (lambda: GuidanceSchedule("interval", final=2.0), "'interval' does not use final=2.0"),
        (lambda: NDTMConfig(guidance={"kind": "constant", "final": 1}), "does not use final=1.0"),
        (lambda: NDTMConfig(guidance={"kind": "ramp", "final": NAN}), "final guidance must be"),
        (lambda: NDTMConfig(guidance={"strength": 1, "gamma": 2}), "settings ['gamma']"),
        (lambda: NDTMConfig(target_mode="dynamic"), "unknown target_mode 'dynamic'"),
        (lambda: NDTMConfig(optimiser="lbfgs"), "unknown optimiser 'lbfgs'; choose one of"),
        (lambda: NoiseOptConfig(optimiser=1), "unknown optimiser 1"),
        (lambda: NDTMConfig.from_dict("num_steps=3"), "NDTM settings must be a dict"),
    ],
)
def test_schedules_choices_and_dicts(make, message):
    with pytest.raises((UserValueError, UserTypeError)) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_values_are_accepted_and_normalised():
    cfg = NDTMConfig(num_steps=np.int64(3), guidance=2, lr_start=1, lr_end=np.float32(0.5))
    assert cfg.guidance == GuidanceSchedule("constant", 2.0)
    assert type(cfg.num_steps) is int and type(cfg.lr_start) is float
    assert type(cfg.lr_end) is float and cfg.lr_end == 0.5
    assert NDTMConfig(inner_steps=0, kappa=0, eta=1).eta == 1.0
    assert NDTMConfig(guidance=1e30).guidance.strength == 1e30  # finite: legal (see below)
    assert NDTMConfig(autocast=np.bool_(True)).autocast is True
    assert DPSConfig(guidance={"kind": "ramp", "strength": 1, "final": 3}).guidance(0.0) == 3.0
    opt = NoiseOptConfig(lowpass=None, threshold=None, norm_weight=0, optimise="all", eta=0.5)
    assert opt.lowpass is None and opt.threshold is None and opt.norm_weight == 0.0
    assert NoiseOptConfig(lowpass=1).lowpass == 1.0
    assert PixelInversionConfig(tv_weight=0, init_scale=0).tv_weight == 0.0
    assert LatentRefineConfig(steps=1, lr=1e3).lr == 1000.0
    assert ConditionalConfig(num_steps=1, trace=False).trace is False


def test_sgd_at_adams_default_rates_warns_once_at_the_users_line():
    """Plain gradient steps at Adam's default rates: a warning naming the rates and what to do,
    attributed to the user's line; not for Adam, nor for SGD with rates of its own."""
    import warnings

    with pytest.warns(
        UserWarning, match=r"'sgd' with the default learning rates \(0\.05, 0\.01\)"
    ) as rec:
        NDTMConfig(optimiser="sgd")
    assert len(rec) == 1 and rec[0].filename == __file__
    assert "set lr_start and lr_end" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NDTMConfig()
        NDTMConfig(optimiser="sgd", lr_start=5.0, lr_end=0.1)
        NDTMConfig(optimiser="sgd", lr_start=0.05, lr_end=0.0)


ROUND_TRIP = [
    GuidanceSchedule("ramp", 0.5, low=0.1, high=0.9, final=2.0),
    NDTMConfig(
        num_steps=11,
        inner_steps=0,
        guidance=GuidanceSchedule("interval", 2.0, 0.2, 0.6, outside=0.5),
        lr_start=0.1,
        lr_end=0.0,
        optimiser="sgd",
        kappa=0.0,
        tau=0.3,
        eta=0.5,
        target_mode="reapprox",
        autocast=True,
        trace=False,
    ),
    DPSConfig(num_steps=9, guidance=GuidanceSchedule("ramp", 3.0, final=1.0), normalize=False),
    NoiseOptConfig(num_steps=7, optimise="all", eta=0.5, lowpass=None, norm="prior", lr=0.5),
    PixelInversionConfig(num_steps=5, tv_weight=0.1, tv_beta=1.0, optimiser="sgd"),
    LatentRefineConfig(steps=3, lr=0.1, optimiser="sgd", autocast=True),
    ConditionalConfig(num_steps=4, trace=False),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: type(c).__name__)
def test_json_round_trip(cfg):
    again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()


# ------------------------------------------------------------------ overflow: fail, with a reason
@pytest.fixture(scope="module")
def color_mnist():
    from fiber_plugins import zoo

    prior = zoo.load("color-mnist-prior")
    subject = zoo.load("color-mnist-classifier")
    objective = fp.FiberObjective(subject, layer="features.8", index=5, reduction="spatial_mean")
    return prior, objective, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "sampler, settings",
    [(fp.NDTMSampler, dict(num_steps=2, inner_steps=2)), (fp.DPSSampler, dict(num_steps=3))],
)
def test_absurd_guidance_fails_with_a_reason_not_unguided(color_mnist, sampler, settings):
    """guidance=1e30 used to give images identical to an unguided run (NDTM: the squared
    gradient overflowed Adam's second moment to inf, so every step of u was 0) or failed rows
    without a reason (DPS). Measured on this model (5 steps, 2 inner steps): NDTM samples stay
    finite up to guidance ~3e10 and fail from 1e11 on; DPS up to ~1e16, failing from ~1e20."""
    prior, objective, ref = color_mnist
    kw = dict(references=[ref], n=2, seed=0, progress=False)
    unguided = sampler(prior, objective, guidance=0.0, **settings).sample(**kw)
    res = sampler(prior, objective, guidance=1e30, **settings).sample(**kw)
    assert not unguided.failed.any() and res.failed.all()
    assert not torch.equal(res.images, unguided.images)
    for m in range(2):
        why = res.reason(0, m)
        assert "non-finite" in why or "overflows" in why
        assert "guidance 1e+30" in why and why != "non-finite value during sampling"
    # a sane guidance on the same rows is unaffected
    ok = sampler(prior, objective, guidance=1.0, **settings).sample(**kw)
    assert not ok.failed.any() and all(ok.reason(0, m) is None for m in range(2))


class _NaNRow(torch.nn.Module):
    """Wraps a subject and writes NaN into batch row 1 of every output (a broken subject)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        if out.shape[0] > 1:
            out = out.clone()
            out[1] = NAN
        return out


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p, o: fp.NDTMSampler(p, o, num_steps=3, inner_steps=1), "fiber loss of x0_hat"),
        (lambda p, o: fp.DPSSampler(p, o, num_steps=3, guidance=1.0), "fiber loss of x0_hat"),
        (lambda p, o: fp.PixelInversionSampler(p, o, num_steps=3), "non-finite fiber loss"),
        (
            lambda p, o: fp.NoiseOptSampler(p, o, num_steps=2, max_iters=1),
            "non-finite image or fiber loss",
        ),
    ],
    ids=["ndtm", "dps", "pixel_inversion", "noise_opt"],
)
def test_a_broken_row_fails_with_its_reason(pixel_prior, subject, references, make, reason):
    objective = fp.FiberObjective(_NaNRow(subject).eval())
    res = make(pixel_prior, objective).sample(
        references=references[:1], n=3, batch_size=3, progress=False
    )
    assert res.failed.tolist() == [[False, True, False]]
    assert reason in res.reason(0, 1) and res.reason(0, 0) is None


def test_refine_records_reasons(pixel_prior, subject, references):
    objective = fp.FiberObjective(_NaNRow(subject).eval())
    images = references[:1].expand(3, -1, -1, -1)
    res = fp.refine_latent(pixel_prior, objective, images, torch.zeros(1, 6), steps=2)
    assert res.failed.tolist() == [[False, True, False]]
    assert "non-finite fiber loss" in res.reason(0, 1) and res.reason(0, 0) is None

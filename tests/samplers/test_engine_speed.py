"""The engine's speed and memory machinery, on the CPU: automatic batch sizing, out-of-memory
back-off, no host syncs in the inner loop, eps(x_t) reuse, and the prior's speed settings
(half weights, channels_last, torch.compile) leaving the fiber-loss distribution unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.priors import acceleration
from fiber_plugins.samplers import engine, memory
from fiber_plugins.samplers.memory import fit_batch_size


def _assert_same_samples(a, b):
    """Same samples up to rounding: the networks' rounding differs between execution paths
    (memory format, traced graphs, thread counts), and Adam's normalised first steps turn it into
    lr-sized moves on a few pixels (up to ~1e-2 seen), so: at most 1% of pixels off by > 1e-3,
    none by > 0.05, and the fiber losses within 10% (guidance itself changes images by ~1)."""
    diff = (a.images - b.images).abs()
    assert (diff > 1e-3).float().mean() < 0.01, (diff > 1e-3).float().mean()
    assert diff.max() < 0.05, diff.max()
    torch.testing.assert_close(a.fiber_loss, b.fiber_loss, rtol=0.1, atol=1e-5)


def _sampler(prior, objective, **kw):
    cfg = dict(num_steps=6, inner_steps=2, guidance=1.0, lr_start=0.2, lr_end=0.05)
    cfg.update(kw)
    return fp.NDTMSampler(prior, objective, **cfg)


class _CountForwards:
    """Counts calls (and the largest batch) of a module through a forward hook."""

    def __init__(self, module):
        self.calls, self.max_batch = 0, 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.calls += 1
        self.max_batch = max(self.max_batch, args[0].shape[0])


# ---------------------------------------------------------------- automatic batch sizing
def test_fit_batch_size_linear_memory_model():
    peak = lambda b: 1000 + 300 * b  # noqa: E731
    assert fit_batch_size(peak, budget_bytes=1000 + 300 * 10, max_rows=100) == 10
    assert fit_batch_size(peak, budget_bytes=1000 + 300 * 10 + 299, max_rows=100) == 10
    assert fit_batch_size(peak, budget_bytes=10**9, max_rows=7) == 7  # never more than the rows
    assert fit_batch_size(peak, budget_bytes=10**9, max_rows=500) == memory.MAX_AUTO_BATCH
    assert fit_batch_size(peak, budget_bytes=1200, max_rows=100) == 1  # batch 1 does not fit
    calls = []
    fit_batch_size(lambda b: calls.append(b) or 1, 10**6, max_rows=1)
    assert calls == [1]  # one row: no second probe


def test_auto_batch_size_on_cpu_takes_all_rows(pixel_prior, subject, references):
    res = _sampler(pixel_prior, fp.FiberObjective(subject), num_steps=2, inner_steps=1).sample(
        references=references[:2], n=3, batch_size="auto", progress=False
    )
    assert res.config["batch_size"] == 6 and not res.failed.any()


class _FakeMeter:
    """Stands in for CUDA's peak-memory counters: peak = static + per_row x (largest batch the
    prior saw since the last reset)."""

    def __init__(self, prior, static, per_row, budget):
        self.counter = _CountForwards(prior.denoiser)
        self.static, self.per_row, self.budget_bytes = static, per_row, budget
        self.resets = 0

    def reset(self):
        self.resets += 1
        self.counter.max_batch = 0
        self.counter.calls = 0

    def peak(self):
        return self.static + self.per_row * self.counter.max_batch

    def budget(self):
        return self.budget_bytes


def test_auto_batch_size_probes_twice_and_fits_the_budget(
    pixel_prior, subject, references, monkeypatch
):
    meter = _FakeMeter(pixel_prior, static=10_000, per_row=1_000, budget=10_000 + 1_000 * 5 + 10)
    monkeypatch.setattr(memory, "memory_meter", lambda device: meter)
    sampler = _sampler(pixel_prior, fp.FiberObjective(subject), num_steps=4, inner_steps=2)
    kw = dict(references=references[:2], n=4, seed=3, progress=False)
    try:
        auto = sampler.sample(batch_size="auto", **kw)
        probe_calls = meter.counter.calls
    finally:
        meter.counter.handle.remove()
    assert meter.resets == 2  # batch 1, then batch 2
    assert auto.config["batch_size"] == 5
    # the probe is one guided step: N inner evaluations + 1 update forward; the last reset is
    # followed by the real run, 8 rows in batches of 5 and 3, 4 steps x 3 forwards each
    assert probe_calls == 3 + 2 * (4 * 3)
    fixed = sampler.sample(batch_size=8, **kw)
    _assert_same_samples(auto, fixed)


def test_bad_batch_size_is_rejected(pixel_prior, subject, references):
    s = _sampler(pixel_prior, fp.FiberObjective(subject))
    for bad in (0, -2, "big", 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int, 'auto' or None"):
            s.sample(references=references[:1], n=1, batch_size=bad, progress=False)


# ---------------------------------------------------------------- out-of-memory back-off
def test_out_of_memory_halves_the_batch_and_keeps_finished_samples(
    pixel_prior, subject, references, monkeypatch, capsys
):
    sampler = _sampler(pixel_prior, fp.FiberObjective(subject), num_steps=3, inner_steps=1)
    real = fp.NDTMSampler.run_batch
    sizes = []

    def flaky(self, batch, progress):
        sizes.append(len(batch.rows))
        if len(batch.rows) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, progress)

    monkeypatch.setattr(fp.NDTMSampler, "run_batch", flaky)
    kw = dict(references=references[:2], n=3, seed=1)
    res = sampler.sample(batch_size=12, progress=True, **kw)
    assert sizes == [6, 3, 3]  # 6 rows fail together, then two halves of 3 finish every row
    assert res.config["batch_size"] == 3
    out = capsys.readouterr()
    assert "out of memory: retrying with batch size 3" in out.out + out.err
    assert torch.isfinite(res.fiber_loss).all() and not res.failed.any()
    ref = sampler.sample(batch_size=3, progress=False, **kw)
    torch.testing.assert_close(res.images, ref.images)

    def always(self, batch, progress):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(fp.NDTMSampler, "run_batch", always)
    with pytest.raises(torch.OutOfMemoryError, match="with gradient checkpointing on"):
        with pytest.warns(UserWarning, match="gradient checkpointing of the prior is on"):
            sampler.sample(batch_size=2, progress=False, **kw)
    assert not pixel_prior.denoiser.is_gradient_checkpointing  # switched off again


# ---------------------------------------------------------------- gradient checkpointing
def _kept_activation_bytes(prior):
    """Bytes autograd keeps between forward and backward for one guided evaluation (x0_hat and
    decode of a batch of 4): what gradient checkpointing exists to cut. Tensors saved inside a
    checkpointed block are held by the checkpoint's own hooks, so they are not counted."""
    x = torch.randn(4, *prior.latent_shape, generator=torch.Generator().manual_seed(0))
    u = torch.zeros_like(x, requires_grad=True)
    step = prior.timesteps(10)[5]
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, x0 = prior.predict(x + u, step)
        loss = prior.decode(x0).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, u)
    return sum(kept), grad


def test_checkpointing_keeps_the_samples_and_cuts_kept_activations(
    pixel_prior, latent_prior, subject, references
):
    objective = fp.FiberObjective(subject)
    for base in (pixel_prior, latent_prior):
        prior = copy.deepcopy(base).accelerate(checkpointing=True)
        assert prior.acceleration["checkpointing"] is True
        assert prior.denoiser.is_gradient_checkpointing
        if prior.vae is not None:
            assert prior.vae.is_gradient_checkpointing
        full, grad_full = _kept_activation_bytes(base)
        ckpt, grad_ckpt = _kept_activation_bytes(prior)
        assert ckpt * 2 <= full, (ckpt, full)
        torch.testing.assert_close(grad_ckpt, grad_full)  # recomputed, not approximated
        kw = dict(references=references[:2], n=2, seed=0, progress=False)
        plain = _sampler(base, objective, num_steps=3, inner_steps=2).sample(**kw)
        res = _sampler(prior, objective, num_steps=3, inner_steps=2).sample(**kw)
        torch.testing.assert_close(res.images, plain.images, rtol=0, atol=1e-5)
        assert res.config["acceleration"]["checkpointing"] is True
        prior.accelerate(checkpointing=False)
        assert not prior.denoiser.is_gradient_checkpointing
        assert prior.acceleration["checkpointing"] is False


def test_checkpointing_needs_a_denoiser_that_has_it(pixel_prior):
    prior = copy.deepcopy(pixel_prior)
    prior.denoiser._supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="UNet2DModel does not support gradient checkpointing"):
        prior.accelerate(checkpointing=True, weights="bf16")
    assert prior.dtype == torch.float32  # nothing was changed by the refused call
    prior.accelerate(checkpointing=False)  # switching off is always possible


def test_a_bad_argument_leaves_the_prior_unchanged(pixel_prior):
    prior = copy.deepcopy(pixel_prior)
    before = dict(prior.acceleration)
    with pytest.raises(ValueError, match="unknown compile setting 'bad'"):
        prior.accelerate(checkpointing=True, weights="bf16", compile="bad")
    assert prior.acceleration == before and prior.dtype == torch.float32
    assert not prior.denoiser.is_gradient_checkpointing


def _oom_unless_checkpointing(monkeypatch, sizes):
    real = fp.NDTMSampler.run_batch

    def flaky(self, batch, progress):
        sizes.append((len(batch.rows), self.prior.denoiser.is_gradient_checkpointing))
        if not self.prior.denoiser.is_gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, progress)

    monkeypatch.setattr(fp.NDTMSampler, "run_batch", flaky)


def test_out_of_memory_at_batch_one_turns_checkpointing_on_for_the_call(
    pixel_prior, subject, references, monkeypatch
):
    prior = copy.deepcopy(pixel_prior)
    sampler = _sampler(prior, fp.FiberObjective(subject), num_steps=3, inner_steps=2)
    kw = dict(references=references[:2], n=2, seed=4, progress=False)
    plain = sampler.sample(batch_size=4, **kw)
    sizes = []
    _oom_unless_checkpointing(monkeypatch, sizes)
    with pytest.warns(
        UserWarning, match="gradient checkpointing of the prior is on for this call"
    ) as caught:
        res = sampler.sample(batch_size=4, **kw)
    # attributed to the user's call (this file), not to a line inside the package
    assert {w.filename for w in caught} == {__file__}
    # 4 -> 2 -> 1 rows fail without checkpointing; with it the first batch size is tried again
    assert sizes == [(4, False), (2, False), (1, False), (4, True)]
    assert res.config["acceleration"]["checkpointing"] == "auto"
    assert res.config["batch_size"] == 4 and not res.failed.any()
    torch.testing.assert_close(res.images, plain.images, rtol=0, atol=1e-5)
    # for this call only: the prior is as the user left it
    assert prior.acceleration["checkpointing"] is False
    assert not prior.denoiser.is_gradient_checkpointing


def test_a_last_single_row_that_runs_out_of_memory_goes_straight_to_checkpointing(
    pixel_prior, subject, references, monkeypatch
):
    """3 rows at batch 2: the trailing 1-row chunk is already one row, so its out-of-memory
    error turns checkpointing on at once instead of retrying the same row at "batch 1"."""
    prior = copy.deepcopy(pixel_prior)
    sampler = _sampler(prior, fp.FiberObjective(subject), num_steps=2, inner_steps=1)
    real = fp.NDTMSampler.run_batch
    sizes = []

    def flaky(self, batch, progress):
        ckpt = self.prior.denoiser.is_gradient_checkpointing
        sizes.append((len(batch.rows), ckpt))
        if len(batch.rows) == 1 and not ckpt:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, progress)

    monkeypatch.setattr(fp.NDTMSampler, "run_batch", flaky)
    with pytest.warns(UserWarning, match="gradient checkpointing of the prior is on"):
        res = sampler.sample(references=references[:1], n=3, batch_size=2, progress=False)
    assert sizes == [(2, False), (1, False), (1, True)]
    assert not res.failed.any() and not prior.denoiser.is_gradient_checkpointing


def test_out_of_memory_with_checkpointing_on_says_what_to_try(
    pixel_prior, subject, references, monkeypatch
):
    prior = copy.deepcopy(pixel_prior).accelerate(checkpointing=True)
    sampler = _sampler(prior, fp.FiberObjective(subject), num_steps=2, inner_steps=1)

    def always(self, batch, progress):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(fp.NDTMSampler, "run_batch", always)
    with pytest.raises(torch.OutOfMemoryError) as info:
        sampler.sample(references=references[:1], n=2, batch_size=2, progress=False)
    msg = str(info.value)
    assert "simulated" in msg and "batch size 1; with gradient checkpointing on" in msg
    assert "prior.accelerate(weights='bf16')" in msg
    assert prior.acceleration["checkpointing"] is True  # the user's own setting stays
    assert prior.denoiser.is_gradient_checkpointing


class _CheckpointAwareMeter(_FakeMeter):
    """A fake meter whose per-row memory drops 4x when the prior checkpoints its blocks."""

    def __init__(self, prior, **kw):
        super().__init__(prior, **kw)
        self.prior = prior

    def peak(self):
        per_row = self.per_row // (4 if self.prior.denoiser.is_gradient_checkpointing else 1)
        return self.static + per_row * self.counter.max_batch


def test_auto_batch_turns_checkpointing_on_when_one_row_does_not_fit(
    pixel_prior, subject, references, monkeypatch
):
    prior = copy.deepcopy(pixel_prior)
    # one row needs 10_000 + 4_000 > budget; with checkpointing a row needs 1_000: 3 rows fit
    meter = _CheckpointAwareMeter(prior, static=10_000, per_row=4_000, budget=13_500)
    monkeypatch.setattr(memory, "memory_meter", lambda device: meter)
    sampler = _sampler(prior, fp.FiberObjective(subject), num_steps=2, inner_steps=1)
    try:
        with pytest.warns(UserWarning, match="one row needs more than the"):
            res = sampler.sample(references=references[:2], n=3, batch_size="auto", progress=False)
    finally:
        meter.counter.handle.remove()
    assert meter.resets == 3  # batch 1 without, then batch 1 and 2 with checkpointing
    assert res.config["batch_size"] == 3
    assert res.config["acceleration"]["checkpointing"] == "auto"
    assert not prior.denoiser.is_gradient_checkpointing


# ---------------------------------------------------------------- no host syncs
_SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "nonzero")


def test_ndtm_inner_loop_has_no_host_syncs(pixel_prior, subject, references, monkeypatch):
    """Every sampling step, inner Adam step and update stays on the device: no .item(), no
    Python bool/float of a tensor, no copy to the host (each would stall a GPU)."""
    objective = fp.FiberObjective(subject)
    sampler = _sampler(pixel_prior, objective, num_steps=3, inner_steps=2, tau=0.1, eta=0.5)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with objective.attached(), torch.no_grad():
        y = objective.target(references[:2] * 2 - 1)
    batch = engine.Batch(
        rows=[(0, 0), (1, 0)],
        generators=gens,
        x_T=torch.randn(2, *pixel_prior.latent_shape),
        target=y,
        ref_latent=None,
        alive=torch.ones(2, dtype=torch.bool),
    )
    pixel_prior.timesteps(3)  # the grid is built once from host-side tables, then cached
    seen = []
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            seen.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with objective.attached():
        img, trace = sampler.run_batch(batch, progress=None)
    monkeypatch.undo()
    assert seen == [], f"host syncs in the NDTM loop: {sorted(set(seen))}"
    assert torch.isfinite(trace).all() and img.shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- eps(x_t) reuse
def _reference_ndtm_with_tau(prior, objective, x_T, target, cfg):
    """NDTM with tau written the straightforward way: a separate forward for eps(x_t) and
    torch.optim.Adam (or SGD, as ``cfg.optimiser`` says) on u (one row, so Adam's per-element
    update equals the engine's)."""
    x = x_T.clone()
    for step in prior.timesteps(cfg.num_steps):
        gamma, lr = cfg.guidance(step.level), cfg.lr(step.index)
        with torch.no_grad():
            eps_ref = prior.predict(x, step)[0]
        u = torch.zeros_like(x, requires_grad=True)
        if cfg.optimiser == "sgd":
            opt = torch.optim.SGD([u], lr=lr)
        else:
            opt = torch.optim.Adam([u], lr=lr, betas=(0.9, 0.999), eps=1e-8)
        for _ in range(cfg.inner_steps):
            opt.zero_grad()
            eps, x0 = prior.predict(x + gamma * u, step)
            fl = objective.distance_between(objective.features(prior.decode(x0)), target)
            J = fl + cfg.kappa * u.pow(2).sum() + cfg.tau * (eps - eps_ref).pow(2).sum()
            J.sum().backward()
            opt.step()
        with torch.no_grad():
            eps, x0 = prior.predict(x + gamma * u, step)
            x = prior.update(x0, eps, step)
    return x


def test_tau_reuses_the_first_inner_forward_and_matches_the_straightforward_code(
    pixel_prior, subject, references
):
    objective = fp.FiberObjective(subject)
    sampler = _sampler(pixel_prior, objective, num_steps=3, inner_steps=3, tau=0.5, trace=False)
    counter = _CountForwards(pixel_prior.denoiser)
    try:
        res = sampler.sample(references=references[:1], n=1, seed=0, progress=False)
        calls = counter.calls
    finally:
        counter.handle.remove()
    # per step: N inner evaluations + 1 update forward (no separate eps(x_t) forward)
    assert calls == 3 * (3 + 1)
    x_T = engine.randn_rows([engine.row_generator(0, 0, 0)], pixel_prior.latent_shape, "cpu")
    with objective.attached():
        y = objective.target(references[:1] * 2 - 1).detach()
        x = _reference_ndtm_with_tau(pixel_prior, objective, x_T, y, sampler.config)
    expected = (x.clamp(-1, 1) + 1) / 2
    # Adam's normalised first steps turn float rounding of near-zero gradients into lr-sized
    # moves, so agreement is ~1e-3 here (tau=0.5 itself changes the images by ~0.86)
    torch.testing.assert_close(res.images[0, 0], expected[0], rtol=0, atol=3e-3)


def test_sgd_at_adams_rates_warns_once_per_sampler(pixel_prior, subject, references):
    """The warning comes when the settings are made, not again from the memory probe or the
    run itself."""
    with pytest.warns(UserWarning, match="'sgd' with the default learning rates") as rec:
        sampler = _sampler(
            pixel_prior,
            fp.FiberObjective(subject),
            num_steps=2,
            optimiser="sgd",
            lr_start=0.05,
            lr_end=0.01,
        )
        sampler.sample(references=references[:1], n=1, seed=0, progress=False, batch_size="auto")
    assert [str(w.message)[:30] for w in rec] == [str(rec[0].message)[:30]], [
        (w.filename, w.lineno) for w in rec
    ]
    assert rec[0].filename == __file__


def test_sgd_control_matches_torch_optim_sgd(pixel_prior, subject, references):
    """optimiser='sgd': plain gradient steps on u, as torch.optim.SGD takes them."""
    objective = fp.FiberObjective(subject)
    kw = dict(num_steps=3, inner_steps=3, tau=0.5, trace=False, optimiser="sgd")
    sampler = _sampler(pixel_prior, objective, **kw, lr_start=20.0, lr_end=5.0)
    res = sampler.sample(references=references[:1], n=1, seed=0, progress=False)
    assert res.config["settings"]["optimiser"] == "sgd"
    x_T = engine.randn_rows([engine.row_generator(0, 0, 0)], pixel_prior.latent_shape, "cpu")
    with objective.attached():
        y = objective.target(references[:1] * 2 - 1).detach()
        x = _reference_ndtm_with_tau(pixel_prior, objective, x_T, y, sampler.config)
    # no normalised steps here, so the two agree to float rounding
    torch.testing.assert_close(res.images[0, 0], ((x.clamp(-1, 1) + 1) / 2)[0], rtol=0, atol=1e-5)
    # and the guidance did something, unlike Adam's: no guidance, or Adam at the same rates, differ
    unguided = _sampler(pixel_prior, objective, **{**kw, "guidance": 0.0}).sample(
        references=references[:1], n=1, seed=0, progress=False
    )
    assert (res.images - unguided.images).abs().max() > 1e-2
    assert res.fiber_loss[0, 0] < unguided.fiber_loss[0, 0]
    adam = _sampler(
        pixel_prior, objective, **{**kw, "optimiser": "adam"}, lr_start=20.0, lr_end=5.0
    )
    adam_res = adam.sample(references=references[:1], n=1, seed=0, progress=False)
    assert (res.images - adam_res.images).abs().max() > 1e-2


# ---------------------------------------------------------------- the prior's speed settings
def test_accelerate_validates_and_records(pixel_prior):
    prior = copy.deepcopy(pixel_prior)
    with pytest.raises(ValueError, match=r"unknown weights precision 'int8'; choose one of"):
        prior.accelerate(weights="int8")
    with pytest.raises(ValueError, match=r"unknown compile setting 'everything'; choose one of"):
        prior.accelerate(compile="everything")
    assert prior.acceleration == {
        "weights": "fp32",
        "channels_last": False,
        "compile": None,
        "checkpointing": False,
    }
    prior.accelerate(weights="bf16", channels_last=True)
    assert prior.dtype == torch.bfloat16
    assert prior.acceleration["weights"] == "bf16" and prior.acceleration["channels_last"]
    conv = prior.denoiser.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_compile_targets_are_blocks(pixel_prior, latent_prior):
    blocks = acceleration.compile_targets(pixel_prior, "blocks")
    unet = pixel_prior.denoiser
    assert blocks == [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
    latent = acceleration.compile_targets(latent_prior, "blocks")
    dec = latent_prior.vae.decoder
    assert set(map(id, [*dec.up_blocks, dec.mid_block])) <= set(map(id, latent))
    assert acceleration.compile_targets(latent_prior, "full") == [latent_prior.denoiser, dec]


def test_half_weights_and_channels_last_keep_the_fiber_loss_distribution(
    trained_prior, subject, block_references
):
    """bf16 weights (cast once, autocast implied) and channels_last: median fiber loss within a
    factor 2 of the fp32 run and far below unguided (the tolerance of the autocast test).
    channels_last changes only the memory layout: the network's output matches fp32 to rounding,
    and the sampled fiber losses stay close. (Sample by sample, NDTM's 12 x 3 Adam steps on a
    trained prior amplify layout-dependent rounding past _assert_same_samples' 1 % of pixels on
    one thread, so the samples are not compared pixel by pixel here.)"""
    objective = fp.FiberObjective(subject)
    kw = dict(references=block_references, n=4, seed=0, progress=False)
    settings = dict(num_steps=12, inner_steps=3, lr_start=0.1, lr_end=0.02)
    fp32 = _sampler(trained_prior, objective, **settings).sample(**kw)
    unguided = _sampler(trained_prior, objective, **{**settings, "guidance": 0.0}).sample(**kw)
    half = copy.deepcopy(trained_prior).accelerate(weights="bf16")
    with pytest.warns(UserWarning, match="bf16/fp16 networks on the CPU"):
        res = _sampler(half, objective, **settings).sample(**kw)
    assert res.images.dtype == torch.float32 and not res.failed.any()
    assert res.config["acceleration"]["weights"] == "bf16"
    ratio = res.median_loss() / fp32.median_loss()
    assert 0.5 <= ratio <= 2.0, ratio
    assert res.median_loss() <= 0.5 * unguided.median_loss()
    nhwc = copy.deepcopy(trained_prior).accelerate(channels_last=True)
    x = torch.randn(4, *trained_prior.latent_shape, generator=torch.Generator().manual_seed(1))
    for step in trained_prior.timesteps(12)[::4]:
        with torch.no_grad():
            torch.testing.assert_close(
                nhwc.model_output(x, step),
                trained_prior.model_output(x, step),
                rtol=1e-4,
                atol=1e-4,
            )
    res = _sampler(nhwc, objective, **settings).sample(**kw)
    assert not res.failed.any()
    assert 0.8 <= res.median_loss() / fp32.median_loss() <= 1.25


def test_compiled_blocks_give_the_same_samples(pixel_prior, latent_prior, subject, references):
    """compile='blocks' traced through dynamo + AOTAutograd (backend aot_eager: no C++ build, the
    same graphs inductor would get) gives the eager samples; compile=None undoes it."""
    torch._dynamo.reset()
    objective = fp.FiberObjective(subject)
    for base in (pixel_prior, latent_prior):
        kw = dict(references=references[:2], n=2, seed=0, progress=False)
        eager = _sampler(base, objective, num_steps=3, inner_steps=2).sample(**kw)
        prior = copy.deepcopy(base).accelerate(compile="blocks", compile_backend="aot_eager")
        compiled = _sampler(prior, objective, num_steps=3, inner_steps=2).sample(**kw)
        _assert_same_samples(compiled, eager)
        assert compiled.config["acceleration"]["compile"] == "blocks"
        prior.accelerate(compile=None)
        assert not any(
            getattr(m, "_compiled_call_impl", None) is not None for m in prior.denoiser.modules()
        )


def test_compiled_blocks_with_checkpointing_give_the_same_samples(pixel_prior, subject, references):
    """Checkpointing inside compiled blocks (dynamo traces diffusers' non-reentrant checkpoint),
    switched on after the blocks were compiled, as the engine does under memory pressure."""
    torch._dynamo.reset()
    objective = fp.FiberObjective(subject)
    kw = dict(references=references[:2], n=2, seed=0, progress=False)
    eager = _sampler(pixel_prior, objective, num_steps=3, inner_steps=2).sample(**kw)
    prior = copy.deepcopy(pixel_prior).accelerate(compile="blocks", compile_backend="aot_eager")
    _sampler(prior, objective, num_steps=1, inner_steps=1).sample(**kw)  # compiled without
    full, _ = _kept_activation_bytes(prior)
    prior.accelerate(checkpointing=True)
    res = _sampler(prior, objective, num_steps=3, inner_steps=2).sample(**kw)
    _assert_same_samples(res, eager)
    assert res.config["acceleration"]["checkpointing"] is True
    kept, _ = _kept_activation_bytes(prior)
    assert kept * 2 <= full, (kept, full)  # the compiled blocks checkpoint (1.9 MB -> 0.8 MB)


@pytest.mark.slow
def test_inductor_compiled_blocks_keep_the_fiber_loss_distribution(
    trained_prior, subject, block_references
):
    """The real inductor backend (C++ code generation on the CPU; minutes)."""
    torch._dynamo.reset()
    objective = fp.FiberObjective(subject)
    kw = dict(references=block_references, n=4, seed=0, progress=False)
    settings = dict(num_steps=12, inner_steps=3, lr_start=0.1, lr_end=0.02)
    eager = _sampler(trained_prior, objective, **settings).sample(**kw)
    prior = copy.deepcopy(trained_prior).accelerate(compile="blocks")
    compiled = _sampler(prior, objective, **settings).sample(**kw)
    ratio = compiled.median_loss() / eager.median_loss()
    assert 0.5 <= ratio <= 2.0, ratio

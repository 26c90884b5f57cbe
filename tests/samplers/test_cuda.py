"""The engine on a CUDA device (marker ``gpu``; run with ``pytest -m gpu`` on a machine with one).

What the CPU suite cannot show: no host synchronisation inside the sampling loop (CUDA's sync
debug mode turns any into an error), automatic batch sizing against real peak-memory counters,
and bf16 weights / inductor-compiled blocks keeping the fiber-loss distribution on the GPU, and
gradient checkpointing lowering the real peak memory.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.samplers import engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _on_cuda(prior, subject):
    return copy.deepcopy(prior).to("cuda"), copy.deepcopy(subject).to("cuda")


def _sampler(prior, objective, **kw):
    cfg = dict(num_steps=12, inner_steps=3, guidance=1.0, lr_start=0.1, lr_end=0.02)
    cfg.update(kw)
    return fp.NDTMSampler(prior, objective, **cfg)


def test_no_host_sync_in_the_sampling_loop(trained_prior, subject, block_references):
    prior, model = _on_cuda(trained_prior, subject)
    objective = fp.FiberObjective(model)
    sampler = _sampler(prior, objective, tau=0.1, eta=0.5, autocast=True)
    with objective.attached(), torch.no_grad():
        y = objective.target(block_references.cuda() * 2 - 1)
    rows = [(r, 0) for r in range(y.shape[0])]
    gens = [engine.row_generator(0, r, m) for r, m in rows]
    batch = engine.Batch(
        rows=rows,
        generators=gens,
        x_T=engine.randn_rows(gens, prior.latent_shape, "cuda"),
        target=y,
        ref_latent=None,
        alive=torch.ones(len(rows), dtype=torch.bool, device="cuda"),
    )
    prior.timesteps(12)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with objective.attached():
            img, trace = sampler.run_batch(batch, progress=None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(trace).all() and img.is_cuda


def test_auto_batch_size_fits_and_matches_a_fixed_batch(trained_prior, subject, block_references):
    prior, model = _on_cuda(trained_prior, subject)
    s = _sampler(prior, fp.FiberObjective(model), num_steps=4, inner_steps=2)
    kw = dict(references=block_references, n=4, seed=0, progress=False)
    auto = s.sample(batch_size="auto", **kw)
    rows = block_references.shape[0] * 4
    assert 1 <= auto.config["batch_size"] <= rows
    fixed = s.sample(batch_size=3, **kw)
    torch.testing.assert_close(auto.images, fixed.images, rtol=1e-3, atol=5e-3)


@pytest.mark.parametrize("setting", ["bf16-weights", "compile-blocks"])
def test_fast_settings_keep_the_fiber_loss_distribution(
    trained_prior, subject, block_references, setting
):
    prior, model = _on_cuda(trained_prior, subject)
    objective = fp.FiberObjective(model)
    kw = dict(references=block_references, n=4, seed=0, progress=False)
    fp32 = _sampler(prior, objective).sample(**kw)
    unguided = _sampler(prior, objective, guidance=0.0).sample(**kw)
    fast = copy.deepcopy(prior)
    if setting == "bf16-weights":
        fast.accelerate(weights="bf16")
    else:
        torch._dynamo.reset()
        fast.accelerate(compile="blocks")
    res = _sampler(fast, objective, autocast=True).sample(**kw)
    ratio = res.median_loss() / fp32.median_loss()
    assert 0.5 <= ratio <= 2.0, ratio
    assert res.median_loss() <= 0.5 * unguided.median_loss()


def test_checkpointing_lowers_peak_memory_and_keeps_the_samples(
    trained_prior, subject, block_references
):
    prior, model = _on_cuda(trained_prior, subject)
    objective = fp.FiberObjective(model)
    kw = dict(references=block_references, n=4, seed=0, progress=False)

    def run(p):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res = _sampler(p, objective, num_steps=3, inner_steps=2).sample(**kw)
        torch.cuda.synchronize()
        return res, torch.cuda.max_memory_allocated() - base

    checkpointed = copy.deepcopy(prior).accelerate(checkpointing=True)
    run(prior)  # warm-up: one-time allocations (cuBLAS/cuDNN workspaces) land outside the peaks
    plain, plain_peak = run(prior)
    ckpt, ckpt_peak = run(checkpointed)
    assert ckpt_peak <= 0.8 * plain_peak, (ckpt_peak, plain_peak)
    torch.testing.assert_close(ckpt.images, plain.images, rtol=1e-3, atol=5e-3)

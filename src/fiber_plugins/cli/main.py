"""``fiber-plugins``: sample, info, demo, train, convert.

User mistakes (a :class:`~fiber_plugins.errors.UserError`: bad names, values, paths, shapes) print
one line ``fiber-plugins: error: ...`` and exit 2; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    MissingExtraError,
    MissingFileError,
    RunInterrupted,
    UserError,
    UserValueError,
)

if TYPE_CHECKING:  # the CLI imports the samplers lazily
    from ..samplers.engine import FiberSampler


def _load_prior(spec: str, device: str | None, args=None):
    from ..priors import load_prior

    text = {
        "--prompt": getattr(args, "prompt", None),
        "--clip-skip": getattr(args, "clip_skip", None),
        "--class-label": getattr(args, "class_label", None),
    }
    if spec.startswith("zoo:"):
        from .. import zoo

        given = [flag for flag, value in text.items() if value is not None]
        if given:
            raise UserValueError(
                f"{', '.join(given)} are settings of text- or class-conditioned priors, not of "
                f"the shipped {spec!r}"
            )
        return zoo.load(spec[4:], device=device)
    return load_prior(
        spec,
        device=device,
        prompt=text["--prompt"],
        clip_skip=text["--clip-skip"],
        class_label=text["--class-label"],
    )


def _device(name: str) -> str:
    from .._utils import resolve_device

    return str(resolve_device(name))


def _batch_size(text: str):
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_positive_int = _int_at_least(1)
_count = _int_at_least(0)


def _finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _guidance(args):
    """The guidance flags as one schedule, read by the samplers' own coercion (check_guidance)."""
    from ..samplers.config import check_guidance

    low, high = args.interval
    schedule = dict(
        kind=args.schedule, strength=args.guidance, low=low, high=high, final=args.final_guidance
    )
    return check_guidance("--guidance", schedule)


def cmd_sample(args) -> int:
    from ..samplers import NDTMConfig, NDTMSampler
    from ..samplers.run_folder import check_out_dir

    # everything the user typed is checked before any model is loaded
    check_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    if (args.reference is None) == (args.target_vector is None):
        raise UserValueError("give --reference IMAGE... or --target-vector FILE (one of them)")
    for ref in args.reference or ():
        _existing_file(ref, "reference image")
    targets = _read_vector(args.target_vector) if args.target_vector else None
    device = _device(args.device)
    config = NDTMConfig(
        num_steps=args.steps,
        inner_steps=args.inner_steps,
        guidance=_guidance(args),
        lr_start=args.lr[0],
        lr_end=args.lr[1],
        kappa=args.kappa,
        tau=args.tau,
        eta=args.eta,
        target_mode=args.target_mode,
        autocast=args.bf16,
    )

    from ..specs.subjects import load_subject
    from ..specs.targets import objective_from_spec

    model, pre = load_subject(args.subject, args.weights)
    prior = _load_prior(args.prior, device, args)
    prior.accelerate(
        weights=args.prior_dtype,
        channels_last=True if args.channels_last else None,
        compile=args.compile if args.compile != "off" else "keep",
        checkpointing=True if args.checkpointing else None,
    )
    model.to(device)
    sae = None
    if args.sae:
        from ..adapters.sae import SparseAutoencoder

        sae = SparseAutoencoder.load(args.sae).to(device)
    objective = objective_from_spec(
        model, args.target, preprocess=pre, distance=args.distance, sae=sae
    )
    sampler: FiberSampler
    if prior.conditional_on_features and args.guide:  # NDTM on the fiber model, conditioned on y*
        print(f"{prior!r}: NDTM guidance on the conditional model (conditioned on each target)")
        sampler = NDTMSampler(prior, objective, config)
    elif prior.conditional_on_features:  # a trained fiber model: conditional sampling
        from ..samplers import ConditionalConfig, ConditionalFiberSampler

        print(
            f"{prior!r}: conditional sampling with {args.steps} steps; the guidance settings "
            "(--inner-steps, --guidance, --schedule, --lr, --kappa, --tau, --eta, --target-mode) "
            "do not apply and are ignored"
        )
        sampler = ConditionalFiberSampler(
            prior, objective, ConditionalConfig(num_steps=args.steps, autocast=args.bf16)
        )
    else:
        sampler = NDTMSampler(prior, objective, config)
    result = sampler.sample(
        references=args.reference,
        targets=targets,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    print(result.summary())
    from ..reporting.report import evaluate_run, write_report

    out = Path(args.out)
    with objective.attached():
        evaluate_run(result, objective, out, prior=prior)  # realism scores too
    try:
        report = write_report(out, result)
    except MissingExtraError as err:  # the samples are written; only the page needs plots
        print(f"wrote {out / 'grid.png'}, samples.safetensors, metrics.json, evaluation.json")
        print(f"no report.html: {err}")
        return 0
    print(f"wrote {out / 'grid.png'}, samples.safetensors, metrics.json, evaluation.json, {report}")
    return 0


def cmd_report(args) -> int:
    from ..samplers.store import is_store

    if is_store(args.run_dir):
        from ..reporting.atlas import write_atlas

        print(f"wrote {write_atlas(args.run_dir)}")
        return 0
    from ..reporting.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _existing_file(path: str, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UserValueError(f"{what} {path!r} is a folder; give a file")
    if not p.is_file():
        raise MissingFileError(f"{what} {path!r} does not exist")
    return p


VECTOR_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")


def _read_vector(path: str):
    """A target vector from .safetensors (first tensor), .npy (no pickles) or .pt/.pth
    (``torch.load(weights_only=True)``), through the package's one weights policy
    (:mod:`fiber_plugins.weights`); anything else is refused in one line."""
    import torch

    from ..weights import read_safetensors, read_torch

    what = "target vector file"
    p = _existing_file(path, what)
    if p.suffix not in VECTOR_SUFFIXES:
        raise UserValueError(
            f"cannot read {what} {path!r}: give a {', '.join(VECTOR_SUFFIXES)} file"
        )
    if p.suffix == ".safetensors":
        tensors = read_safetensors(p, what=what)
        if not tensors:
            raise UserValueError(f"{what} {path!r} holds no tensor")
        value = next(iter(tensors.values()))
    elif p.suffix == ".npy":
        import numpy as np

        try:
            value = torch.from_numpy(np.load(p, allow_pickle=False))
        except (ValueError, OSError, TypeError) as err:  # object arrays need pickles: refused
            raise UserValueError(
                f"cannot read {what} {path!r} ({str(err).splitlines()[0][:120]}); save a numeric "
                "array with np.save"
            ) from None
    else:
        value = read_torch(p, what=what)
    if not isinstance(value, torch.Tensor):
        raise UserValueError(f"{what} {path!r} holds a {type(value).__name__}, not a tensor")
    if value.dtype == torch.bool or value.is_complex():
        raise UserValueError(
            f"{what} {path!r} has dtype {str(value.dtype).replace('torch.', '')}; a target "
            "vector holds real numbers (float or int)"
        )
    return value.float()


def cmd_targets(args) -> int:
    from ..adapters.lens import list_hook_points
    from ..specs.subjects import load_subject

    model, pre = load_subject(args.subject, args.weights)
    if args.input_size:
        if len(args.input_size) != 3 or min(args.input_size) < 1:
            raise UserValueError(
                f"--input-size must be three positive sizes C H W (e.g. 3 224 224), got "
                f"{' '.join(map(str, args.input_size))}"
            )
        shape = (1, *args.input_size)
    elif pre is not None and pre.fixes_size:
        shape = (1, pre.channels or 3, *pre.output_size((1, 1)))
    else:
        raise UserValueError("give the subject's input size, e.g. --input-size 3 224 224")
    from ..adapters.hf import hf_outputs, is_hf_model
    from ..adapters.open_clip import is_open_clip_model, open_clip_outputs

    if is_hf_model(model) or is_open_clip_model(model):  # named outputs: --target output:NAME
        lister = hf_outputs if is_hf_model(model) else open_clip_outputs
        points = lister(model, shape)
        usage = "  (--target output:NAME[:INDEX][:token=cls|mean|max|all|N])"
    else:
        points = list_hook_points(model, shape)
        usage = ""
    width = max((len(n) for n, _ in points), default=10)
    print(f"{'name':{width}s}  shape (batch 1, input {tuple(shape[1:])}){usage}")
    for name, shp in points:
        print(f"{name:{width}s}  {tuple(shp)}")
    return 0


def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    from .. import __version__

    print(f"fiber-plugins {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}")
    for pkg in (
        "diffusers",
        "captum",
        "zennit",
        "zennit-crp",
        "vit-prisma",
        "transformer-lens",
        "timm",
        "torchmetrics",
    ):
        try:
            ver = md.version(pkg)
        except md.PackageNotFoundError:
            ver = "not installed"
        print(f"  {pkg:18s} {ver}")
    from .._utils import resolve_device

    device = resolve_device("auto")
    if device.type == "cuda":
        print(f"device: cuda ({torch.cuda.get_device_name(device)})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo
    from ..samplers.run_folder import check_out_dir

    if check_out_dir(args.out, overwrite=args.overwrite) == "overwrite":
        print(f"replacing the earlier run in {args.out} (--overwrite)")

    out = run_demo(
        args.out,
        n=args.n,
        steps=args.steps,
        seed=args.seed,
        device=_device(args.device),
        overwrite=args.overwrite,
    )
    print(f"wrote {out / 'report.html'} and {out / 'grid.png'}")
    return 0


def cmd_train(args) -> int:
    from ..zoo import training
    from ..zoo._registry import trainers

    assets = Path(__file__).resolve().parents[1] / "assets"
    if args.out and args.into_package:
        raise UserValueError("give --out FOLDER or --into-package, not both")
    if not args.out and not args.into_package:
        raise UserValueError(
            f"give --out FOLDER for the trained {args.model!r}; the shipped model in the "
            "installed package is replaced only with --into-package"
        )
    root = Path(args.out) if args.out else None
    if root is not None and root.exists():
        if not root.is_dir():
            raise UserValueError(f"--out {str(root)!r} is a file; give a folder")
        if any(root.iterdir()) and not args.overwrite:
            raise UserValueError(
                f"--out {str(root)!r} is not empty; pass --overwrite to replace what is there, "
                "or give a new folder"
            )
    folders = trainers()
    out = root or assets / folders[args.model]
    if args.fiber_weight is not None and args.fiber_weight < 0:
        raise UserValueError(f"--fiber-weight must be >= 0, got {args.fiber_weight}")
    if args.fiber_t_max is not None and not 0 < args.fiber_t_max <= 1:
        raise UserValueError(f"--fiber-t-max must be in (0, 1], got {args.fiber_t_max}")
    if args.model != "conditional" and (
        args.fiber_weight is not None or args.fiber_t_max is not None
    ):
        raise UserValueError(
            f"--fiber-weight / --fiber-t-max are settings of 'train conditional', not of "
            f"'train {args.model}'"
        )
    kw = {"seed": args.seed, "device": _device(args.device)}
    if args.steps is not None:
        kw["steps"] = args.steps
    prior_only = {"--objective": args.objective, "--batch-size": args.batch_size,
                  "--checkpoint": args.checkpoint, "--resume": args.resume or None}  # fmt: skip
    given = [flag for flag, value in prior_only.items() if value is not None]
    if given and args.model not in ("prior", "prior-ood"):
        raise UserValueError(f"{', '.join(given)}: settings of 'train prior' / 'train prior-ood'")
    if args.resume and not args.checkpoint:
        raise UserValueError("--resume continues from a checkpoint folder: give --checkpoint DIR")
    if args.checkpoint and not args.resume and Path(args.checkpoint).is_dir():
        if any(Path(args.checkpoint).iterdir()):
            raise UserValueError(
                f"--checkpoint {args.checkpoint!r} holds an earlier run: pass --resume to continue "
                "it, or give a new folder"
            )
    if args.model in ("prior", "prior-ood"):
        extra = {k: v for k, v in (("objective", args.objective), ("batch_size", args.batch_size),
                                    ("checkpoint", args.checkpoint)) if v is not None}  # fmt: skip
        meta = training.train_prior(
            out, ood=args.model == "prior-ood", resume=bool(args.resume), **extra, **kw
        )
    elif args.model == "autoencoder":
        meta = training.train_autoencoder(out, **kw)
    elif args.model in ("conditional", "conditional-nofiber"):
        if args.model == "conditional-nofiber":
            weight, t_max = 0.0, 1.0
        else:
            weight = 0.01 if args.fiber_weight is None else args.fiber_weight
            t_max = 1.0 if args.fiber_t_max is None else args.fiber_t_max
        meta = training.train_conditional(out, fiber_weight=weight, fiber_t_max=t_max, **kw)
    elif args.model == "vit":
        meta = training.train_vit(out, **kw)
    elif args.model == "sae":
        kw.pop("device")
        meta = training.train_sae(out, vit_dir=assets / folders["vit"], **kw)
    else:
        meta = training.train_classifier(out, **kw)
    print({k: v for k, v in meta.items() if not isinstance(v, dict)})
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from ..color_mnist_bench import run_color_mnist_bench

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserValueError(f"--out {args.out!r} is a file; give a folder")

    report = run_color_mnist_bench(
        args.out,
        num_references=args.references,
        num_samples=args.samples,
        steps=args.steps,
        inner_steps=args.inner_steps,
        seed=args.seed,
        device=_device(args.device),
        methods=tuple(args.methods or _BenchMethods()),
        sets=args.sets,
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.md'}, results.json, fidelity_consistency.png")
    return 0 if report["rows"] else 1


# help of guided-diffusion's model/diffusion flags, as its scripts take them (``--num_channels
# 256`` or ``--num-channels 256``; booleans as ``True``/``False``); the flag names themselves
# come from fiber_plugins.priors.adm.ARCHITECTURE_FLAGS, which also checks the values
_ADM_FLAG_HELP = {
    "image_size": ("N", "image side in pixels"),
    "num_channels": ("N", "model channels (the first level's width)"),
    "num_res_blocks": ("N", "res blocks per level"),
    "channel_mult": ("M,M,...", "width multipliers per level (default: guided-diffusion's)"),
    "attention_resolutions": ("R,R,...", "resolutions (pixels) with attention, e.g. 32,16,8"),
    "num_heads": ("N", "attention heads (when --num-head-channels is -1)"),
    "num_head_channels": ("N", "channels per attention head (-1: use --num-heads)"),
    "num_heads_upsample": ("N", "heads of the upsampling path (-1: --num-heads)"),
    "learn_sigma": ("BOOL", "6 output channels (eps and the variance interpolation)"),
    "class_cond": ("BOOL", "class-conditional (label_emb)"),
    "num_classes": ("N", "classes of a class-conditional model (default 1000)"),
    "use_scale_shift_norm": ("BOOL", "FiLM conditioning in the res blocks"),
    "resblock_updown": ("BOOL", "residual blocks for down/upsampling"),
    "use_new_attention_order": ("BOOL", "QKVAttention instead of the legacy head order"),
    "dropout": ("P", "dropout rate (stored in the config; no effect in eval)"),
    "diffusion_steps": ("N", "training timesteps"),
    "noise_schedule": ("linear|cosine", "the beta schedule"),
    "predict_xstart": ("BOOL", "the network predicts x0 instead of eps"),
    "rescale_timesteps": ("BOOL", "the network took t*1000/steps in training"),
    "in_channels": ("N", "image channels (default 3)"),
    "use_fp16": ("BOOL", "accepted, changes nothing (weights are written in fp32)"),
    "use_checkpoint": ("BOOL", "accepted, changes nothing"),
}


def cmd_convert_adm(args) -> int:
    from ..priors.adm import ARCHITECTURE_FLAGS, convert_adm

    flags = {name: getattr(args, name) for name in ARCHITECTURE_FLAGS}
    out = convert_adm(
        args.checkpoint,
        args.out_dir,
        preset=args.preset,
        class_label=args.class_label,
        overwrite=args.overwrite,
        **{k: v for k, v in flags.items() if v is not None},
    )
    print(f"wrote {out}: unet/ (UNet2DModel), scheduler/ (DDPMScheduler), adm_conversion.json")
    print(f"use it with --prior {out} or fiber_plugins.load_prior({str(out)!r})")
    return 0


class _BenchMethods:
    """``--methods`` choices: the benchmark's own METHOD_NAMES, imported only when argparse
    checks a value or prints the choices (so other commands never load the benchmark)."""

    def _names(self) -> list[str]:
        from ..color_mnist_bench import METHOD_NAMES

        return list(METHOD_NAMES)

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fiber-plugins",
        description="Sample what a model does not see: images on the fiber phi(x) = phi(x*).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="NDTM fiber samples of a subject model for a reference image")
    s.add_argument(
        "--subject",
        required=True,
        help="timm:NAME | hf:FOLDER | open_clip:ARCH | module:pkg.mod:factory | zoo:NAME "
        "(see docs/subjects.md)",
    )
    s.add_argument("--weights", help="local weights file for the subject (safetensors or torch)")
    s.add_argument(
        "--target",
        default="logits",
        help="logits | logits:INDEX | layer:NAME[:CHANNEL] | embedding | hook:HOOK | crp:LAYER:IDS | "
        "sae:HOOK:feature=ID | captum:LAYER:neuron=(c,h,w)",
    )
    s.add_argument("--sae", help="SAE folder (cfg.json + sae_weights.safetensors) for sae: targets")
    s.add_argument("--prior", required=True, help="diffusers folder, Hub id, or zoo:NAME")
    s.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help="text-conditioned priors (Stable Diffusion family): condition on this prompt, "
        "encoded once with the folder's text encoder(s) (default: the empty prompt)",
    )
    s.add_argument(
        "--clip-skip",
        type=_count,
        default=None,
        metavar="N",
        help="text encoder hidden states N layers before the last (diffusers' clip_skip)",
    )
    s.add_argument(
        "--class-label",
        type=_count,
        default=None,
        metavar="K",
        help="class of a class-conditional prior (UNet with num_class_embeds: required; DiT: "
        "default its null class)",
    )
    s.add_argument("--reference", nargs="+", help="reference image file(s)")
    s.add_argument(
        "--target-vector",
        help="instead of --reference: an explicit target phi(x*) (.safetensors, .npy or .pt)",
    )
    s.add_argument("-n", type=_positive_int, default=4, help="samples per reference")
    s.add_argument("--steps", type=_positive_int, default=50, help="sampling steps T")
    s.add_argument("--inner-steps", type=_count, default=4, help="NDTM inner Adam steps N")
    s.add_argument("--guidance", type=_finite_float, default=1.0, help="guidance strength gamma")
    s.add_argument("--schedule", default="constant", choices=["constant", "interval", "ramp"])
    s.add_argument(
        "--interval", type=_finite_float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH")
    )
    s.add_argument("--final-guidance", type=_finite_float, default=None)
    s.add_argument(
        "--lr", type=_finite_float, nargs=2, default=(0.05, 0.01), metavar=("START", "END")
    )
    s.add_argument("--kappa", type=_finite_float, default=1e-4)
    s.add_argument("--tau", type=_finite_float, default=0.0)
    s.add_argument("--eta", type=_finite_float, default=0.0)
    s.add_argument("--distance", default="l2", choices=["l2", "l1", "cosine", "kl"])
    s.add_argument("--target-mode", default="static", choices=["static", "reapprox"])
    s.add_argument(
        "--guide",
        action="store_true",
        help="with a conditional fiber model as --prior: run NDTM on it, conditioned on each "
        "target, instead of plain conditional sampling (the default); no effect on other priors",
    )
    s.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    s.add_argument(
        "--prior-dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="cast the prior's weights once (half weights imply autocast in that dtype)",
    )
    s.add_argument(
        "--compile",
        choices=["off", "blocks", "full"],
        default="off",
        help="torch.compile the prior's blocks or whole networks (see docs/performance.md)",
    )
    s.add_argument(
        "--channels-last", action="store_true", help="channels_last memory format for the prior"
    )
    s.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing of the prior's blocks: less memory, ~1 extra forward per "
        "guided step (turned on by itself when one row does not fit)",
    )
    s.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        help="rows per batch: an int, or 'auto' (fit the free GPU memory; default: all, <= 16)",
    )
    s.add_argument("--seed", type=_count, default=0)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument(
        "--out",
        default="runs/fiber",
        help="run folder: finished batches are written as they finish (see docs/cli.md)",
    )
    s.add_argument(
        "--resume",
        action="store_true",
        help="finish the interrupted run in --out (same command otherwise): only missing rows run",
    )
    s.add_argument("--overwrite", action="store_true", help="remove the earlier run in --out first")
    s.set_defaults(func=cmd_sample)

    tg = sub.add_parser(
        "targets",
        help="list a subject's layers / hook points (hf:, open_clip: its named outputs) with "
        "their shapes",
    )
    tg.add_argument(
        "subject",
        help="timm:NAME | module:pkg.mod:factory | zoo:NAME | hf:FOLDER | open_clip:ARCH|FOLDER",
    )
    tg.add_argument("--weights", help="local weights file")
    tg.add_argument("--input-size", type=int, nargs="+", metavar="DIM", help="e.g. 3 224 224")
    tg.set_defaults(func=cmd_targets)

    r = sub.add_parser(
        "report", help="write report.html for a saved run folder, or the atlas of a plan's store"
    )
    r.add_argument("run_dir", metavar="RUN_DIR|STORE")
    r.set_defaults(func=cmd_report)

    from .jobs import add_parsers

    add_parsers(sub)

    i = sub.add_parser("info", help="versions and device")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="offline demo on the shipped Color-MNIST models")
    d.add_argument("--out", default="demo-out")
    d.add_argument("-n", type=_positive_int, default=4)
    d.add_argument("--steps", type=_positive_int, default=25)
    d.add_argument("--seed", type=_count, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a shipped Color-MNIST model (seeded, reproducible)")
    from ..zoo._registry import trainers

    t.add_argument("model", choices=list(trainers()))
    t.add_argument("--out", default=None, help="output folder for the trained model")
    t.add_argument(
        "--into-package",
        action="store_true",
        help="write into the installed package's assets, replacing the shipped model",
    )
    t.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    t.add_argument("--steps", type=_positive_int, default=None)
    t.add_argument(
        "--fiber-weight",
        type=_finite_float,
        default=None,
        help="conditional: lambda_fiber, the weight of the fiber loss in training (default 0.01)",
    )
    t.add_argument(
        "--fiber-t-max",
        type=_finite_float,
        default=None,
        help="conditional: the fiber loss is used at noise levels t <= this (default 1: all)",
    )
    t.add_argument("--seed", type=_count, default=0)
    t.add_argument(
        "--objective",
        choices=["epsilon", "v", "flow"],
        default=None,
        help="prior: flow (rectified flow, the shipped recipe), epsilon (DDPM) or v",
    )
    t.add_argument("--batch-size", type=_positive_int, default=None, help="prior: batch size")
    t.add_argument(
        "--checkpoint", default=None, help="prior: save a checkpoint here every 250 steps"
    )
    t.add_argument(
        "--resume", action="store_true", help="prior: continue from the --checkpoint folder"
    )
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("bench", help="benchmarks: color-mnist (fidelity vs consistency)")
    b.add_argument("name", choices=["color-mnist"])
    b.add_argument("--out", default="bench-out/color-mnist")
    b.add_argument("--references", type=_positive_int, default=16, help="K held-out references")
    b.add_argument("--samples", type=_positive_int, default=4, help="M samples per reference")
    b.add_argument("--steps", type=_positive_int, default=25)
    b.add_argument("--inner-steps", type=_count, default=3)
    b.add_argument(
        "--sets",
        type=_positive_int,
        default=3,
        help="independent sample sets per method (noise seeds SEED, SEED+1, ...; rows give mean "
        "± std, default 3)",
    )
    b.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=_BenchMethods(),
        metavar="METHOD",
        help="methods run with the in-distribution prior (the OOD prior runs unguided and NDTM), "
        "one or more of: %(choices)s (default: all); conditional* are the shipped trained "
        "conditional fiber models",
    )
    b.add_argument("--seed", type=_count, default=0)
    b.add_argument("--device", default="auto")
    b.set_defaults(func=cmd_bench)

    cv = sub.add_parser(
        "convert", help="convert another code base's checkpoint into a prior folder"
    )
    formats = cv.add_subparsers(dest="format", required=True)
    a = formats.add_parser(
        "adm",
        help="an openai/guided-diffusion (ADM) UNet checkpoint -> a diffusers prior folder",
        description="Convert a guided-diffusion UNet checkpoint (read with weights_only=True) into "
        "OUT_DIR (unet/ + scheduler/), which load_prior and --prior read. Give a --preset, or the "
        "architecture flags of the checkpoint's MODEL_FLAGS (guided-diffusion spelling works: "
        "--num_channels 256 --learn_sigma True ...); see docs/priors.md.",
    )
    a.add_argument("checkpoint", help="the ADM state dict (.pt/.pth or .safetensors)")
    a.add_argument("out_dir", help="the prior folder to write (new or empty, or --overwrite)")
    from ..priors.adm import ARCHITECTURE_FLAGS, SUPPORTED_PRESETS

    a.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help=f"a published checkpoint: {' | '.join(SUPPORTED_PRESETS)}",
    )
    a.add_argument(
        "--class-label",
        type=_count,
        default=None,
        metavar="N",
        help="class-conditional checkpoints: write an unconditional prior of this class",
    )
    a.add_argument(
        "--overwrite", action="store_true", help="replace unet/ and scheduler/ in OUT_DIR"
    )
    for name in ARCHITECTURE_FLAGS:
        metavar, text = _ADM_FLAG_HELP.get(name, ("VALUE", ""))
        a.add_argument(
            f"--{name.replace('_', '-')}", f"--{name}", dest=name, metavar=metavar, help=text
        )
    a.set_defaults(func=cmd_convert_adm)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"fiber-plugins: error: {lines[0]}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"fiber-plugins: {err}", file=sys.stderr)
        argv = list(sys.argv[1:] if argv is None else argv)
        again = [a for a in argv if a not in ("--overwrite", "--resume")] + ["--resume"]
        print(f"continue with: fiber-plugins {shlex.join(again)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fiber-plugins: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

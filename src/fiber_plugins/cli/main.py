"""``fiber-plugins``: sample, info, demo, train.

User errors (bad names, paths, shapes) print one line ``fiber-plugins: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USER_ERRORS = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    ImportError,
)


def _load_prior(spec: str, device: str | None):
    from ..priors import load_prior

    if spec.startswith("zoo:"):
        from .. import zoo

        return zoo.load(spec[4:], device=device)
    return load_prior(spec, device=device)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


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


def _guidance(args):
    from ..samplers import GuidanceSchedule

    low, high = args.interval
    return GuidanceSchedule(
        kind=args.schedule, strength=args.guidance, low=low, high=high, final=args.final_guidance
    )


def cmd_sample(args) -> int:
    from ..objectives.spec import objective_from_spec
    from ..samplers import NDTMConfig, NDTMSampler
    from .subjects import load_subject

    device = _device(args.device)
    model, pre = load_subject(args.subject, args.weights)
    prior = _load_prior(args.prior, device)
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
    if (args.reference is None) == (args.target_vector is None):
        raise ValueError("give --reference IMAGE... or --target-vector FILE (one of them)")
    targets = _read_vector(args.target_vector) if args.target_vector else None
    from ..priors import ConditionalFiberModel

    if isinstance(prior, ConditionalFiberModel):  # a trained fiber model: conditional sampling
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
    )
    out = result.save(args.out)
    print(result.summary())
    from ..reporting.report import evaluate_run, write_report

    with objective.attached():
        evaluate_run(result, objective, out)
    report = write_report(out)
    print(f"wrote {out / 'grid.png'}, samples.safetensors, metrics.json, evaluation.json, {report}")
    return 0


def cmd_report(args) -> int:
    from ..reporting.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _read_vector(path: str):
    """A target vector from .safetensors (first tensor), .npy or .pt (weights_only)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"target vector file {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if not tensors:
            raise ValueError(f"{path!r} holds no tensor")
        return next(iter(tensors.values())).float()
    if p.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(p)).float()
    return torch.load(p, map_location="cpu", weights_only=True).float()


def cmd_targets(args) -> int:
    from ..adapters.lens import list_hook_points
    from .subjects import load_subject

    model, pre = load_subject(args.subject, args.weights)
    if args.input_size:
        shape = (1, *args.input_size)
    elif pre is not None and pre.size is not None:
        size = (pre.size, pre.size) if isinstance(pre.size, int) else tuple(pre.size)
        shape = (1, pre.channels or 3, *size)
    else:
        raise ValueError("give the subject's input size, e.g. --input-size 3 224 224")
    points = list_hook_points(model, shape)
    width = max((len(n) for n, _ in points), default=10)
    print(f"{'name':{width}s}  shape (batch 1, input {tuple(shape[1:])})")
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
    if torch.cuda.is_available():
        print(f"device: cuda ({torch.cuda.get_device_name(0)})")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads)")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    out = run_demo(
        args.out, n=args.n, steps=args.steps, seed=args.seed, device=_device(args.device)
    )
    print(f"wrote {out / 'report.html'} and {out / 'grid.png'}")
    return 0


def cmd_train(args) -> int:
    from ..zoo import training

    root = Path(args.out) if args.out else None
    default = Path(__file__).resolve().parents[1] / "assets" / "color_mnist"
    folder = {
        "prior": "prior",
        "prior-ood": "prior_ood",
        "autoencoder": "autoencoder",
        "classifier": "classifier",
        "vit": "vit",
        "sae": "vit_sae",
        "conditional": "conditional",
        "conditional-nofiber": "conditional_nofiber",
    }[args.model]
    out = root or default / folder
    if args.model != "conditional" and (args.fiber_weight is not None or args.fiber_t_max is not None):
        raise ValueError(
            f"--fiber-weight / --fiber-t-max are settings of 'train conditional', not of "
            f"'train {args.model}'"
        )
    kw = {"seed": args.seed, "device": args.device}
    if args.steps:
        kw["steps"] = args.steps
    if args.model in ("prior", "prior-ood"):
        meta = training.train_prior(out, ood=args.model == "prior-ood", **kw)
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
        meta = training.train_sae(out, vit_dir=default / "vit", **kw)
    else:
        meta = training.train_classifier(out, **kw)
    print({k: v for k, v in meta.items() if not isinstance(v, dict)})
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from ..evaluation.color_mnist_bench import run_color_mnist_bench

    report = run_color_mnist_bench(
        args.out,
        num_references=args.references,
        num_samples=args.samples,
        steps=args.steps,
        inner_steps=args.inner_steps,
        seed=args.seed,
        device=_device(args.device),
        methods=tuple(args.methods),
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.md'}, results.json, fidelity_consistency.png")
    return 0 if report["rows"] else 1


# the keys of evaluation.color_mnist_bench.METHOD_NAMES (not imported here: it loads torch)
BENCH_METHODS = (
    "unguided",
    "ndtm",
    "ndtm-reapprox",
    "dps",
    "noise-opt",
    "inversion",
    "conditional",
    "conditional-nofiber",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fiber-plugins",
        description="Sample what a model does not see: images on the fiber phi(x) = phi(x*).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="NDTM fiber samples of a subject model for a reference image")
    s.add_argument("--subject", required=True, help="timm:NAME | module:pkg.mod:factory | zoo:NAME")
    s.add_argument("--weights", help="local weights file for the subject (safetensors or torch)")
    s.add_argument(
        "--target",
        default="logits",
        help="logits | logits:INDEX | layer:NAME[:CHANNEL] | embedding | hook:HOOK | crp:LAYER:IDS | "
        "sae:HOOK:feature=ID | captum:LAYER:neuron=(c,h,w)",
    )
    s.add_argument("--sae", help="SAE folder (cfg.json + sae_weights.safetensors) for sae: targets")
    s.add_argument("--prior", required=True, help="diffusers folder, Hub id, or zoo:NAME")
    s.add_argument("--reference", nargs="+", help="reference image file(s)")
    s.add_argument(
        "--target-vector",
        help="instead of --reference: an explicit target phi(x*) (.safetensors, .npy or .pt)",
    )
    s.add_argument("-n", type=int, default=4, help="samples per reference")
    s.add_argument("--steps", type=int, default=50, help="sampling steps T")
    s.add_argument("--inner-steps", type=int, default=4, help="NDTM inner Adam steps N")
    s.add_argument("--guidance", type=float, default=1.0, help="guidance strength gamma")
    s.add_argument("--schedule", default="constant", choices=["constant", "interval", "ramp"])
    s.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    s.add_argument("--final-guidance", type=float, default=None)
    s.add_argument("--lr", type=float, nargs=2, default=(0.05, 0.01), metavar=("START", "END"))
    s.add_argument("--kappa", type=float, default=1e-4)
    s.add_argument("--tau", type=float, default=0.0)
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--distance", default="l2", choices=["l2", "l1", "cosine", "kl"])
    s.add_argument("--target-mode", default="static", choices=["static", "reapprox"])
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
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", default="runs/fiber", help="output folder")
    s.set_defaults(func=cmd_sample)

    tg = sub.add_parser("targets", help="list a subject's layers / hook points with their shapes")
    tg.add_argument("subject", help="timm:NAME | module:pkg.mod:factory | zoo:NAME")
    tg.add_argument("--weights", help="local weights file")
    tg.add_argument("--input-size", type=int, nargs="+", metavar="DIM", help="e.g. 3 224 224")
    tg.set_defaults(func=cmd_targets)

    r = sub.add_parser("report", help="write report.html for a saved run folder")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    i = sub.add_parser("info", help="versions and device")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="offline demo on the shipped Color-MNIST models")
    d.add_argument("--out", default="demo-out")
    d.add_argument("-n", type=int, default=4)
    d.add_argument("--steps", type=int, default=25)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a shipped Color-MNIST model (seeded, reproducible)")
    t.add_argument(
        "model",
        choices=[
            "prior",
            "prior-ood",
            "autoencoder",
            "classifier",
            "vit",
            "sae",
            "conditional",
            "conditional-nofiber",
        ],
    )
    t.add_argument("--out", default=None, help="output folder (default: the package's assets)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument(
        "--fiber-weight",
        type=float,
        default=None,
        help="conditional: lambda_fiber, the weight of the fiber loss in training (default 0.01)",
    )
    t.add_argument(
        "--fiber-t-max",
        type=float,
        default=None,
        help="conditional: the fiber loss is used at noise levels t <= this (default 1: all)",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_train)
    b = sub.add_parser("bench", help="benchmarks: color-mnist (fidelity vs consistency)")
    b.add_argument("name", choices=["color-mnist"])
    b.add_argument("--out", default="bench-out/color-mnist")
    b.add_argument("--references", type=int, default=16, help="K held-out references")
    b.add_argument("--samples", type=int, default=4, help="M samples per reference")
    b.add_argument("--steps", type=int, default=25)
    b.add_argument("--inner-steps", type=int, default=3)
    b.add_argument(
        "--methods",
        nargs="+",
        default=list(BENCH_METHODS),
        choices=list(BENCH_METHODS),
        help="methods run with the in-distribution prior (the OOD prior runs unguided and NDTM); "
        "conditional* are the shipped trained conditional fiber models",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"fiber-plugins: error: {msg}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fiber-plugins: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""What each ``fiber-plugins`` command does: one ``cmd_*(args) -> exit code`` per command, called
by :func:`fiber_plugins.cli.main.main` with the arguments :mod:`fiber_plugins.cli.parser` read.
The library's heavier modules are imported inside the commands, so parsing the arguments (and
``--help``) loads no prior, sampler or toolkit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import (
    MissingExtraError,
    MissingFileError,
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
        return zoo.load_prior(spec[4:], device=device)
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
        optimiser=args.optimiser,
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
            "(--inner-steps, --guidance, --schedule, --lr, --optimiser, --kappa, --tau, --eta, "
            "--target-mode) do not apply and are ignored"
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
    """A target vector from .safetensors (its one tensor), .npy (no pickles) or .pt/.pth
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
        if len(tensors) > 1:  # which one was meant cannot be guessed
            names = ", ".join(list(tensors)[:4]) + (" ..." if len(tensors) > 4 else "")
            raise UserValueError(
                f"{what} {path!r} holds {len(tensors)} tensors ({names}); save the target vector "
                "alone"
            )
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
    from ..zoo import model_entry

    model, pre = load_subject(args.subject, args.weights)
    zoo_size = model_entry(args.subject[4:]).input_size if args.subject.startswith("zoo:") else None
    if args.input_size:
        if len(args.input_size) != 3 or min(args.input_size) < 1:
            raise UserValueError(
                f"--input-size must be three positive sizes C H W (e.g. 3 224 224), got "
                f"{' '.join(map(str, args.input_size))}"
            )
        shape = (1, *args.input_size)
    elif pre is not None and pre.fixes_size:
        shape = (1, pre.channels or 3, *pre.output_size((1, 1)))
    elif zoo_size is not None:  # a shipped subject knows its input
        shape = (1, *zoo_size)
    else:
        raise UserValueError("give the subject's input size, e.g. --input-size 3 224 224")
    from ..adapters.hf import hf_outputs, is_hf_model
    from ..adapters.open_clip import is_open_clip_model, open_clip_outputs

    if is_hf_model(model) or is_open_clip_model(model):  # named outputs: --target output:NAME
        lister = hf_outputs if is_hf_model(model) else open_clip_outputs
        points = lister(model, shape)
        usage = "  (--target output:NAME[:INDEX][:token=cls|mean|max|all|N])"
    else:
        try:
            points = list_hook_points(model, shape)
        except UserError:
            raise
        except (RuntimeError, ValueError, AssertionError) as err:  # the model's forward refuses
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserValueError(
                f"the subject's forward pass fails on an input of shape {tuple(shape[1:])} "
                f"({first}); give its input size with --input-size C H W"
            ) from None
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

    if check_out_dir(args.out, overwrite=args.overwrite, can_resume=False) == "overwrite":
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
    from ..zoo import prior_training, training
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
    if args.checkpoint:
        from ..training.checkpoint import check_checkpoint

        # a file or a folder of other files is refused; --resume needs a checkpoint to continue
        if check_checkpoint(args.checkpoint, required=args.resume) and not args.resume:
            raise UserValueError(
                f"--checkpoint {args.checkpoint!r} holds an earlier run: pass --resume to continue "
                "it, or give a new folder"
            )
    if args.model in ("prior", "prior-ood"):
        extra = {k: v for k, v in (("objective", args.objective), ("batch_size", args.batch_size),
                                    ("checkpoint", args.checkpoint)) if v is not None}  # fmt: skip
        meta = prior_training.train_prior(
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
    from ..color_mnist_bench import METHOD_NAMES, run_color_mnist_bench

    report = run_color_mnist_bench(
        args.out,
        num_references=args.references,
        num_samples=args.samples,
        steps=args.steps,
        inner_steps=args.inner_steps,
        seed=args.seed,
        device=_device(args.device),
        methods=tuple(args.methods or METHOD_NAMES),
        sets=args.sets,
        overwrite=args.overwrite,
    )
    print((Path(args.out) / "results.md").read_text())
    print(f"wrote {Path(args.out) / 'results.md'}, results.json, fidelity_consistency.png")
    return 0 if report["rows"] else 1


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

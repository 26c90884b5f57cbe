"""What ``fiber-plugins`` accepts: the argument parser, its value types (each a one-line error
for a bad value, quoting it) and the flags of each command."""

from __future__ import annotations

import argparse

from .commands import (
    cmd_bench,
    cmd_convert_adm,
    cmd_demo,
    cmd_info,
    cmd_report,
    cmd_sample,
    cmd_targets,
    cmd_train,
)


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
    s.add_argument(
        "--inner-steps", type=_count, default=4, help="NDTM inner optimiser steps N on the control"
    )
    s.add_argument("--guidance", type=_finite_float, default=1.0, help="guidance strength gamma")
    s.add_argument("--schedule", default="constant", choices=["constant", "interval", "ramp"])
    s.add_argument(
        "--interval", type=_finite_float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH")
    )
    s.add_argument("--final-guidance", type=_finite_float, default=None)
    s.add_argument(
        "--lr", type=_finite_float, nargs=2, default=(0.05, 0.01), metavar=("START", "END")
    )
    s.add_argument(
        "--optimiser",
        default="adam",
        choices=["adam", "sgd"],
        help="optimiser of NDTM's control (adam: the paper's; sgd: plain gradient steps, whose "
        "learning rates are on the scale of the objective's gradient: with sgd, set --lr too; "
        "the default --lr is Adam's, and sgd with it warns)",
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
    t.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="training steps (default: the shipped model's; prior 10,000, prior-ood 2,000)",
    )
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
        help="prior: flow (rectified flow, the shipped recipe; for 'prior' with logit-normal "
        "times, the colour-posterior target and off-law states at h's wrap), epsilon (DDPM) or v",
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
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier benchmark in --out (its files; other files stay)",
    )
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

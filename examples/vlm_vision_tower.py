"""Is the heart's side lost in the vision encoder? Fibers of Qwen2-VL's vision tower for rare
anatomy (paper Sec. 4.4, Fig. 11, App. B.3; the situs inversus cases of Mayer et al., 2025).

A vision-language model answers questions about a chest X-ray of situs inversus (heart on the
right) as if the anatomy were typical. Whether the language model or the vision encoder drops
the information shows in the encoder's fiber: NDTM samples images whose merged vision embedding
(all tokens, as the language model receives them) equals the reference's. The recipe samples the
fibers of the rare-anatomy references and, as the paper's check, of typical-anatomy references
(``--typical``): comparable fiber losses mean the samples reach the same level of invariance. It
also measures how far the left-right mirrored reference lies from the reference in the encoder's
space, next to the fiber samples' losses and the nearest typical image: a mirror image as close
as a fiber sample means the encoder hardly tells the two sides apart.

Weights (nothing is downloaded; only the vision weights of the folder are read):
``huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir ./Qwen2-VL-2B-Instruct``, and a
prior of chest X-rays (``--prior``: an unconditional diffusers model you trained; the paper's is
an 18M-parameter transformer UNet at 384 px).

Run::

    python examples/vlm_vision_tower.py --references situs-inversus/ \\
        --typical chexpert/valid --prior chexpert-prior --out runs/qwen
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import _recipe as R
import torch

QWEN_HOW = "huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir ./Qwen2-VL-2B-Instruct"
PRIOR_HOW = "train an unconditional diffusers prior on chest X-rays and pass its folder"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qwen", default="Qwen2-VL-2B-Instruct", help="Qwen2-VL folder")
    p.add_argument("--references", required=True, help="folder of rare-anatomy references")
    p.add_argument("--num-references", type=int, default=8)
    p.add_argument("--typical", help="folder of typical-anatomy references (the comparison)")
    p.add_argument("--num-typical", type=int, default=8)
    p.add_argument("--token", default="all", help="'all' (default: the whole embedding) or 'mean'")
    R.sampling_arguments(p, "chexpert-prior")
    return p


def _losses(result) -> torch.Tensor:
    return result.fiber_loss.masked_fill(result.failed, float("nan")).nanmedian(1).values


@R.entry
def main(argv: Sequence[str] | None = None) -> int:
    """Sample both fibers, measure the mirrored references, write the table."""
    from fiber_plugins.adapters.hf import qwen2_vl_objective, qwen2_vl_vision_subject

    args = parser().parse_args(argv)
    if args.token not in ("all", "mean"):
        raise R.Missing(f"--token {args.token!r}: choose 'all' or 'mean'")
    sets = {"rare": R.image_files(args.references, args.num_references, "references")}
    if args.typical:
        sets["typical"] = R.image_files(args.typical, args.num_typical, "typical references")
    tower, pre = qwen2_vl_vision_subject(R.need(args.qwen, "Qwen2-VL folder", QWEN_HOW))
    objective = qwen2_vl_objective(tower.to(args.device), pre, token=args.token, name="qwen2-vl")
    R.need(args.prior, "prior folder", PRIOR_HOW)
    prior = R.load_prior(args)
    out = Path(args.out)
    rows, targets = [], {}
    for name, files in sets.items():
        result = R.sample(prior, objective, files, args, out / name)
        targets[name] = result.targets
        row: dict = {
            "references": name,
            "count": len(files),
            "samples": int((~result.failed).sum()),
        }
        row["fiber loss"], row["fiber loss std"] = R.mean_std(_losses(result))
        mirrored = R.outputs(objective, result.references.flip(-1))
        row["mirrored reference"] = R.mean_std(
            objective.distance_between(mirrored, result.targets)
        )[0]
        rows.append(row)
    if "typical" in targets:  # the closest typical anatomy to each rare reference
        d = torch.stack(
            [objective.distance_between(targets["typical"], t[None]) for t in targets["rare"]]
        )
        rows[0]["nearest typical reference"] = R.mean_std(d.min(1).values)[0]
    R.write_table(
        out,
        "table",
        "Qwen2-VL vision embedding: fiber loss (mean of each reference's median)",
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

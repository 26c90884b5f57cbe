"""ImageNet fibers of DINOv2 ViT-B/14 and ResNet50 (pool layer) under the ADM prior, with the
nearest-neighbour and augmentation baselines (paper Sec. 4.2, Fig. 5 and Table 5).

For each subject and each reference, NDTM draws ``-n`` fiber samples under the unconditional
256x256 ADM prior of Dhariwal & Nichol. The table compares their fiber loss with two points of
reference: the closest image of a pool (e.g. ImageNet validation images) in the subject's feature
space, and augmented copies of the reference (random resized crop, flip, colour jitter). A fiber
loss far below both means the samples show invariances that the data set alone would not.

Weights it expects (nothing is downloaded at run time):

* the prior: ``256x256_diffusion_uncond.pt`` from openai/guided-diffusion, converted once with
  ``fiber-plugins convert adm 256x256_diffusion_uncond.pt adm-imagenet256-uncond --preset
  imagenet256-uncond``;
* DINOv2: ``huggingface-cli download facebook/dinov2-base --local-dir ./dinov2-base``;
* ResNet50: ``huggingface-cli download timm/resnet50.tv_in1k --local-dir ./resnet50.tv_in1k``.

Run::

    python examples/imagenet_fibers.py --references imagenet/val --num-references 16 \\
        --pool imagenet/val --pool-size 5000 --out runs/imagenet-fibers

Writes ``OUT/<subject>/`` (an ordinary run folder: grid.png, samples.safetensors, metrics.json,
evaluation.json, report.html) and ``OUT/table.md`` / ``table.json``. Rerun with ``--resume`` to
finish an interrupted run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import _recipe as R
import torch

SUBJECTS = ("dinov2", "resnet50")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subject", nargs="+", choices=SUBJECTS, default=list(SUBJECTS))
    p.add_argument("--references", required=True, help="folder of reference images")
    p.add_argument("--num-references", type=int, default=16)
    p.add_argument("--pool", help="folder of images for the nearest-neighbour baseline")
    p.add_argument("--pool-size", type=int, default=1000, help="images taken from --pool")
    p.add_argument("--dataset-name", default="ImageNet", help="label for the table")
    R.subject_arguments(p, SUBJECTS)
    R.sampling_arguments(p, "adm-imagenet256-uncond")
    return p


@R.entry
def main(argv: Sequence[str] | None = None) -> int:
    """Sample the fibers, evaluate the baselines, write the table."""
    from fiber_plugins.reporting.report import evaluate_run, write_report

    args = parser().parse_args(argv)
    refs = R.image_files(args.references, args.num_references, "references")
    for name in args.subject:  # every file is checked before anything is loaded
        what, how = R.SUBJECT_HELP[name]
        R.need(getattr(args, name), what, how)
    prior = R.load_prior(args)
    pool = R.load_pool(args.pool, prior.image_size, args.pool_size) if args.pool else None
    out = Path(args.out)
    rows = []
    for name in args.subject:
        objective = R.subject_objective(name, args)
        result = R.sample(prior, objective, refs, args, out / name)
        with objective.attached():
            ev = evaluate_run(result, objective, out / name, pool01=pool)
        write_report(out / name, result)
        loss = result.fiber_loss.masked_fill(result.failed, float("nan"))
        per_ref = loss.nanmedian(dim=1).values
        mean, std = R.mean_std(per_ref)
        rows.append(
            {
                "subject": name,
                "dataset": args.dataset_name,
                "references": len(refs),
                "samples": int((~result.failed).sum()),
                "NDTM": mean,
                "NDTM std": std,
                "nearest neighbour": R.mean_std(torch.tensor(ev["nearest_neighbour"]))[0]
                if "nearest_neighbour" in ev
                else float("nan"),
                "augmentation": R.mean_std(torch.tensor(ev["augmentation_median"]))[0],
            }
        )
    R.write_table(
        out,
        "table",
        "Fiber loss (mean over references of each reference's median; paper Table 5)",
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

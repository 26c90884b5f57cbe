"""The FID blind spot: fibers of InceptionV3 scored with Inception features and with another
network's (paper Sec. 4.2, Table 2, Fig. 6).

FID compares Inception feature statistics. Samples from the fiber of the Inception network used
for FID have, by construction, the reference set's features, so their FID *under that network*
is low whatever else changed in the images; a second network (the TensorFlow Inception of Heusel
et al. through torchmetrics, or DINOv2) sees the change. For each subject (the PyTorch
InceptionV3, and DINOv2 as the control whose fiber both networks should judge alike) the recipe
draws NDTM fiber samples of the references and reports:

* PT FID: FID between references and fiber samples with the PyTorch InceptionV3 pool features;
* TF FID: the same with torchmetrics' FID Inception (``--tf-inception`` weights file of
  torch-fidelity, ``weights-inception-2015-12-05-6726825d.pth``), if given;
* DINOv2 FID: the same with DINOv2's pooler output, if ``--dinov2`` is given;
* the top-5 accuracy of a classifier (``--classifier``; default ResNet50) on the originals and on
  the fiber samples, against ``--labels`` (a CSV of ``file,class_index``) or, without labels,
  against the classifier's own top-1 on the original (reported as agreement).

FID needs many images to be meaningful (the paper uses thousands); the toy run in the tests only
checks the plumbing.

Weights (nothing is downloaded): the ADM prior (see imagenet_fibers.py), InceptionV3
(``huggingface-cli download timm/inception_v3.tv_in1k --local-dir ./inception_v3.tv_in1k``), for
TF FID torch-fidelity's file from
https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth,
optionally DINOv2 (``facebook/dinov2-base``) and the ResNet50 classifier
(``timm/resnet50.tv_in1k``).

Run::

    python examples/inception_fid.py --references imagenet/val --num-references 1000 -n 1 \\
        --tf-inception weights-inception-2015-12-05-6726825d.pth --out runs/inception-fid
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import _recipe as R
import torch
from torch import nn

from fiber_plugins.evaluation import frechet_distance, topk_accuracy

TF_HOW = (
    "download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth and pass its path"
)


class Features(nn.Module):
    """A fiber objective's features as an ``nn.Module`` on [0, 1] images (torchmetrics' FID takes
    any such extractor)."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return R.outputs(self.objective, images01)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--references", required=True, help="folder of reference images")
    p.add_argument("--num-references", type=int, default=1000)
    p.add_argument("--tf-inception", help="torch-fidelity Inception weights (TF FID)")
    p.add_argument("--classifier", default="resnet50.tv_in1k/model.safetensors",
                   help="classifier weights for the top-5 accuracy (timm resnet50)")  # fmt: skip
    p.add_argument("--classifier-arch", default="resnet50", help=argparse.SUPPRESS)
    p.add_argument("--labels", help="CSV of file name,ImageNet class index for the references")
    R.subject_arguments(p, ("inception", "dinov2"))
    R.sampling_arguments(p, "adm-imagenet256-uncond")
    return p


def read_labels(path: str, refs: Sequence[Path]) -> torch.Tensor:
    """The class index of each reference from a ``file,class`` CSV (file names or paths)."""
    table = {}
    with open(R.need(path, "labels file", "a CSV with one 'file,class_index' row per image")) as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[1].strip().lstrip("-").isdigit():
                table[Path(row[0]).name] = int(row[1])
    missing = [p.name for p in refs if p.name not in table]
    if missing:
        raise R.Missing(
            f"labels file {path!r} has no class for {missing[0]!r} ({len(missing)} missing)"
        )
    return torch.tensor([table[p.name] for p in refs])


@R.entry
def main(argv: Sequence[str] | None = None) -> int:
    """Sample the fibers of each subject, then score them with every FID network."""
    args = parser().parse_args(argv)
    refs = R.image_files(args.references, args.num_references, "references")
    subjects = ["inception"] + (["dinov2"] if Path(args.dinov2).exists() else [])
    R.need(args.inception, *R.SUBJECT_HELP["inception"])
    if args.tf_inception:
        R.need(args.tf_inception, "TF Inception weights", TF_HOW)
    labels = read_labels(args.labels, refs) if args.labels else None
    classifier = R.classifier(
        args.classifier_arch, args.classifier, args.device, "classifier weights",
        R.SUBJECT_HELP["resnet50"][1],
    )  # fmt: skip
    prior = R.load_prior(args)
    out = Path(args.out)
    objectives = {name: R.subject_objective(name, args) for name in subjects}
    from fiber_plugins.images import as_reference_batch

    originals = as_reference_batch([str(p) for p in refs], size=prior.image_size)
    scores = R.outputs(classifier, refs)  # each original at its own size
    truth = labels if labels is not None else scores.argmax(1)
    rows = [
        {
            "images": "originals",
            "samples": len(refs),
            "top-5": topk_accuracy(scores, truth, 5),
        }
    ]
    for name in subjects:
        result = R.sample(prior, objectives[name], refs, args, out / name)
        ok = ~result.failed
        fibers = result.images[ok]
        row = {"images": f"{name} fiber", "samples": int(ok.sum())}
        rows.append(row)
        if fibers.shape[0] < 2:  # a covariance needs two samples
            print(f"{name}: {fibers.shape[0]} successful samples; no FID (see {out / name})")
            continue
        row["PT FID"] = frechet_distance(originals, fibers, Features(objectives["inception"]))
        if args.tf_inception:
            row["TF FID"] = frechet_distance(originals, fibers, 2048, weights=args.tf_inception)
        if "dinov2" in objectives:
            row["DINOv2 FID"] = frechet_distance(originals, fibers, Features(objectives["dinov2"]))
        expect = truth[:, None].expand_as(ok)[ok]
        row["top-5"] = topk_accuracy(R.outputs(classifier, fibers), expect, 5)
        row["fiber loss"] = float(result.fiber_loss[ok].median())
    what = "accuracy" if labels is not None else "agreement with the original's top-1"
    R.write_table(out, "table", f"FID of fiber samples against the references; top-5 {what}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

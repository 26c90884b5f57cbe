"""Do two classifiers share their fibers? The CheXpert protocol of the paper (Sec. 4.4, Figs. 9-10,
App. B.3): fiber samples of classifier A's logits, relabelled by classifier B, and vice versa.

The paper trains two multi-label classifiers on five CheXpert findings (a frozen BiomedCLIP with
a trained head, and a ConvNeXt trained end to end), calibrates a decision threshold per class,
and takes references on which *both* classifiers are right. NDTM then samples each reference's
fiber under A's five logits (the images A cannot tell from the reference) with a chest X-ray
prior; for each class the agreement is the share of those samples on which B still gives the
original label. The same runs in the other direction. Low agreement means at least one model has
fibers that cross what the other sees as a change of finding.

What it expects (nothing is downloaded; the paper's classifiers and prior are trained by the
user, so the recipe takes any of them):

* ``--model-a`` / ``--model-b``: subjects in the command line's grammar (``module:pkg.mod:factory``
  for your own classifier code, ``timm:NAME``, ...) with ``--weights-a`` / ``--weights-b`` files
  (safetensors or a torch state dict); each returns one logit per class;
* ``--labels``: a CSV with a header ``file,<class 1>,...,<class K>`` and 0/1 labels;
* ``--thresholds-a`` / ``--thresholds-b``: one probability threshold, or one per class;
* ``--prior``: an unconditional diffusers prior of chest X-rays (the paper: a transformer UNet of
  18M parameters, 120k steps at 384 px).

Run::

    python examples/classifier_agreement.py --model-a module:mymodels:biomedclip_head \\
        --weights-a head.safetensors --name-a BiomedCLIP --model-b timm:convnext_tiny \\
        --weights-b convnext.safetensors --name-b ConvNeXt --references chexpert/valid \\
        --labels labels.csv --prior chexpert-prior --out runs/agreement
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import _recipe as R
import torch

import fiber_plugins as fp
from fiber_plugins.evaluation import multilabel_agreement

PRIOR_HOW = "train an unconditional diffusers prior on your chest X-rays and pass its folder"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for side in ("a", "b"):
        p.add_argument(f"--model-{side}", required=True, help="subject spec (module:..., timm:...)")
        p.add_argument(f"--weights-{side}", required=True, help="its weights file")
        p.add_argument(f"--name-{side}", default=side.upper(), help="its name in the table")
        p.add_argument(f"--thresholds-{side}", default="0.5",
                       help="probability threshold: one, or one per class (comma-separated)")  # fmt: skip
    p.add_argument("--references", required=True, help="folder of reference images")
    p.add_argument("--labels", required=True, help="CSV: file,<class 1>,...,<class K> (0/1)")
    p.add_argument("--num-references", type=int, default=64)
    R.sampling_arguments(p, "chexpert-prior")
    return p


def read_labels(path: str, folder: str) -> tuple[list[str], list[Path], torch.Tensor]:
    """(class names, image files, (R, K) 0/1 labels) from the labels CSV."""
    with open(R.need(path, "labels file", "a CSV 'file,<class 1>,...' with 0/1 labels")) as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise R.Missing(
            f"labels file {path!r} needs a header 'file,<class 1>,...' and one row per image"
        )
    classes, files, labels = rows[0][1:], [], []
    for row in rows[1:]:
        image = R.need(Path(folder) / row[0], "reference image", f"listed in {path}")
        try:
            values = [int(v) for v in row[1:]]
        except ValueError:
            raise R.Missing(f"labels file {path!r}: row {row!r} must hold 0/1 labels") from None
        if len(values) != len(classes) or set(values) - {0, 1}:
            raise R.Missing(
                f"labels file {path!r}: row {row!r} needs {len(classes)} labels of 0 or 1"
            )
        files.append(image)
        labels.append(values)
    return classes, files, torch.tensor(labels)


def thresholds(text: str, k: int, flag: str) -> torch.Tensor:
    """Parse ``--thresholds-*``: one probability or ``k`` of them."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise R.Missing(f"{flag} {text!r} must be numbers separated by commas") from None
    if len(values) not in (1, k) or not all(0 < v < 1 for v in values):
        raise R.Missing(f"{flag} {text!r} needs 1 or {k} probabilities in (0, 1)")
    return torch.tensor(values).expand(k) if len(values) == 1 else torch.tensor(values)


def classifier(spec: str, weights: str, device: str) -> fp.FiberObjective:
    """The subject's logits (all classes) as a fiber objective."""
    from fiber_plugins.specs.subjects import load_subject

    model, pre = load_subject(
        spec, str(R.need(weights, f"weights of {spec}", "your trained classifier"))
    )
    return fp.FiberObjective(model.to(device), preprocess=pre, name=spec)


@R.entry
def main(argv: Sequence[str] | None = None) -> int:
    """Select the references both get right, sample both fibers, relabel, write the table."""
    args = parser().parse_args(argv)
    classes, files, labels = read_labels(args.labels, args.references)
    k = len(classes)
    thr = {s: thresholds(getattr(args, f"thresholds_{s}"), k, f"--thresholds-{s}") for s in "ab"}
    models = {s: classifier(getattr(args, f"model_{s}"), getattr(args, f"weights_{s}"), args.device)
              for s in "ab"}  # fmt: skip
    names = {s: getattr(args, f"name_{s}") for s in "ab"}
    probs = {s: R.outputs(models[s], files).sigmoid() for s in "ab"}
    for s in "ab":
        if probs[s].shape[1] != k:
            raise R.Missing(
                f"{names[s]} gives {probs[s].shape[1]} outputs for the {k} classes {classes}"
            )
    right = torch.ones(len(files), dtype=torch.bool)
    for s in "ab":
        right &= ((probs[s] >= thr[s]).long() == labels).all(1)
    if not right.any():
        raise R.Missing(
            f"no reference is classified correctly by both {names['a']} and {names['b']}"
        )
    keep = right.nonzero().flatten()[: args.num_references]
    refs, truth = [files[i] for i in keep], labels[keep]
    print(f"{len(refs)} of {len(files)} references are right under both classifiers")
    prior = R.load_prior(args)
    out = Path(args.out)
    table = {c: {"class": c} for c in classes}
    chart: dict[str, dict[str, float]] = {c: {} for c in classes}
    for s, other in (("a", "b"), ("b", "a")):
        result = R.sample(prior, models[s], refs, args, out / f"fiber-{names[s]}")
        if result.failed.any():
            print(
                f"{int(result.failed.sum())} failed samples of {names[s]}'s fiber are counted as disagreeing"
            )
        flat = result.images.reshape(-1, *result.images.shape[2:])
        for judge in (s, other):
            p = R.outputs(models[judge], flat).sigmoid().reshape(len(refs), args.n, k)
            p = torch.where(result.failed[..., None], 1 - truth[:, None, :].float(), p)
            agree = multilabel_agreement(p, truth, thr[judge])
            key = f"{names[judge]} on {names[s]}'s fiber"
            for c, v in zip(classes, agree.tolist(), strict=True):
                table[c][key] = v
                if judge != s:
                    chart[c][key] = v
    rows = list(table.values())
    rows.append(
        {
            "class": "mean",
            **{key: sum(r[key] for r in rows) / k for key in rows[0] if key != "class"},
        }
    )
    R.write_table(out, "table", "Agreement with the original label on fiber samples", rows)
    R.bar_chart(
        out / "agreement.png",
        "Agreement on the other classifier's fiber",
        chart,
        "share of samples",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

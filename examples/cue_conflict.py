"""Shape or texture? Fibers of cue-conflict images judged by a third classifier (paper Sec. 4.3,
Figs. 7-8; stimuli and label preference of Geirhos et al., ICLR 2019).

Each cue-conflict image has the shape of one category and the texture of another
(``cat1-elephant2.png``: a cat shape in elephant texture). For DINOv2 ViT-B/14 (pooler output)
and ResNet50 (pool layer), NDTM draws fiber samples of every image under the ImageNet ADM prior;
a ConvNeXt-L classifier then labels originals and fiber samples with one of the 16 categories
(ImageNet probabilities averaged over each category's classes, ``data/imagenet16.json``).
Among the decisions that match exactly one of the two labels, the shape share against the
texture share is the label preference: a subject whose fiber keeps the shape moves ConvNeXt
toward the shape label. The table also gives the fiber loss against the nearest neighbour of a
pool (paper Table 5, cue-conflict rows).

Weights and data (nothing is downloaded): the ADM prior and the subjects as in
imagenet_fibers.py; ConvNeXt-L: ``huggingface-cli download timm/convnext_large.fb_in1k
--local-dir ./convnext_large.fb_in1k``; the stimuli: ``git clone
https://github.com/rgeirhos/texture-vs-shape`` (``stimuli/style-transfer-preprocessed-512``).

Run::

    python examples/cue_conflict.py --num-references 160 --pool imagenet/val \\
        --out runs/cue-conflict

Writes ``OUT/<subject>/`` run folders, ``OUT/table.md`` / ``table.json`` and
``OUT/label_preference.png``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

import _recipe as R

from fiber_plugins.evaluation import category_probabilities, label_preference

SUBJECTS = ("dinov2", "resnet50")
STIMULI = "texture-vs-shape/stimuli/style-transfer-preprocessed-512"
STIMULI_HOW = "git clone https://github.com/rgeirhos/texture-vs-shape (the stimuli folder)"
CONVNEXT_HOW = (
    "huggingface-cli download timm/convnext_large.fb_in1k --local-dir ./convnext_large.fb_in1k "
    "and pass ./convnext_large.fb_in1k/model.safetensors"
)
NAME = re.compile(r"^([a-z]+)\d+-([a-z]+)\d+$")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subject", nargs="+", choices=SUBJECTS, default=list(SUBJECTS))
    p.add_argument("--stimuli", default=STIMULI, help=f"cue-conflict images ({STIMULI})")
    p.add_argument("--num-references", type=int, default=160, help="images, spread over shapes")
    p.add_argument("--classifier", default="convnext_large.fb_in1k/model.safetensors",
                   help="ConvNeXt-L weights (timm convnext_large)")  # fmt: skip
    p.add_argument("--classifier-arch", default="convnext_large", help=argparse.SUPPRESS)
    p.add_argument("--categories", default=str(Path(__file__).parent / "data" / "imagenet16.json"),
                   help="category -> ImageNet class indices (JSON)")  # fmt: skip
    p.add_argument("--pool", help="folder of images for the nearest-neighbour baseline")
    p.add_argument("--pool-size", type=int, default=1000)
    R.subject_arguments(p, SUBJECTS)
    R.sampling_arguments(p, "adm-imagenet256-uncond")
    return p


def stimuli(folder: str, count: int, categories: dict) -> tuple[list[Path], list[str], list[str]]:
    """``count`` cue-conflict images spread evenly over the sorted list, with shape and texture
    labels read from their names (``<shape>N-<texture>M``)."""
    files = R.image_files(R.need(folder, "cue-conflict stimuli", STIMULI_HOW), None, "stimuli")
    step = max(1, len(files) // max(1, count))
    files = files[::step][:count]
    shapes, textures = [], []
    for path in files:
        m = NAME.match(path.stem)
        if not m or m[1] not in categories or m[2] not in categories:
            raise R.Missing(
                f"{path.name!r} is not named '<shape>N-<texture>M' with two of the categories "
                f"{sorted(categories)}"
            )
        shapes.append(m[1])
        textures.append(m[2])
    return files, shapes, textures


def decide(classifier, images, categories: dict) -> list[str]:
    """The classifier's 16-category decision for each image."""
    if len(images) == 0:  # every sample of a subject failed
        return []
    probs = R.outputs(classifier, images).softmax(1)
    names, cat = category_probabilities(probs, categories)
    return [names[int(i)] for i in cat.argmax(1)]


@R.entry
def main(argv: Sequence[str] | None = None) -> int:
    """Sample the fibers, label them, write the label preference."""
    args = parser().parse_args(argv)
    path = R.need(args.categories, "category file", "examples/data/imagenet16.json")
    categories = json.loads(path.read_text())["categories"]
    files, shapes, textures = stimuli(args.stimuli, args.num_references, categories)
    for name in args.subject:
        R.need(getattr(args, name), *R.SUBJECT_HELP[name])
    what = "ConvNeXt-L weights"
    classifier = R.classifier(
        args.classifier_arch, args.classifier, args.device, what, CONVNEXT_HOW
    )
    prior = R.load_prior(args)
    pool = R.load_pool(args.pool, prior.image_size, args.pool_size) if args.pool else None
    out = Path(args.out)
    groups = {
        "originals": label_preference(decide(classifier, files, categories), shapes, textures)
    }
    losses = []
    for name in args.subject:
        objective = R.subject_objective(name, args)
        result = R.sample(prior, objective, files, args, out / name)
        ok = ~result.failed
        keep = ok.flatten()
        labels = [(s, t) for s, t in zip(shapes, textures, strict=True) for _ in range(args.n)]
        kept = [lab for lab, k in zip(labels, keep.tolist(), strict=True) if k]
        decisions = decide(classifier, result.images[ok], categories)
        groups[f"{name} fiber"] = label_preference(
            decisions, [s for s, _ in kept], [t for _, t in kept]
        )
        row = {"subject": name, "dataset": "cue conflict", "samples": int(ok.sum())}
        row["NDTM"], row["NDTM std"] = R.mean_std(
            result.fiber_loss.masked_fill(~ok, float("nan")).nanmedian(1).values
        )
        if pool is not None:
            from fiber_plugins.evaluation import NearestNeighbourBaseline

            with objective.attached():
                nn_loss, _ = NearestNeighbourBaseline(objective, pool)(result.targets)
            row["nearest neighbour"] = R.mean_std(nn_loss)[0]
        losses.append(row)
    rows = [{"image set": k, **g} for k, g in groups.items()]
    R.write_table(out, "table", "Label preference of the classifier (Geirhos et al.)", rows)
    R.write_table(out, "fiber_loss", "Fiber loss on cue-conflict images (paper Table 5)", losses)
    R.bar_chart(
        out / "label_preference.png",
        "Which label does the classifier choose?",
        {k: {"shape": g["shape"], "texture": g["texture"]} for k, g in groups.items()},
        "share of decisions",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

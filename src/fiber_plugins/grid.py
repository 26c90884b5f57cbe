"""PNG grids of fiber samples: one row per reference, the reference first.

A base module (it imports nothing of the package): :meth:`FiberResult.save_grid
<fiber_plugins.samplers.FiberResult.save_grid>`, the benchmarks and the report all draw with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ORANGE = (235, 120, 0)  # the frame and caption of flagged (off-manifold) samples


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8."""
    arr = img.detach().float().clamp(0, 1).cpu()
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    return (arr.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def fiber_grid(
    references: torch.Tensor,
    samples: torch.Tensor,
    losses: torch.Tensor | None = None,
    failed: torch.Tensor | None = None,
    tile: int | None = None,
    flagged: torch.Tensor | None = None,
) -> Image.Image:
    """Render a (R, 1 + M) grid: reference, then its M samples captioned with their fiber loss.

    Parameters
    ----------
    references: (R, C, H, W) in [0, 1].
    samples: (R, M, C, H, W) in [0, 1].
    losses: (R, M) fiber losses written under each sample.
    failed: (R, M) bool; failed samples are crossed out.
    tile: display size of one image (small images are enlarged with nearest neighbours).
    flagged: (R, M) bool; flagged samples (off-manifold: see
        ``fiber_plugins.evaluation.realism``) get an orange frame and "flagged" after the loss.
    """
    r, m = samples.shape[:2]
    h, w = samples.shape[-2:]
    if tile is None:
        tile = max(96, min(256, h))
    scale = tile / max(h, w)
    th, tw = round(h * scale), round(w * scale)
    pad, cap = 6, 16
    font = ImageFont.load_default()
    canvas = Image.new(
        "RGB", (pad + (m + 1) * (tw + pad), pad + cap + r * (th + cap + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), "reference", fill=(0, 0, 0), font=font)
    draw.text((pad + tw + pad, 2), "fiber samples (fiber loss)", fill=(0, 0, 0), font=font)
    for i in range(r):
        y = pad + cap + i * (th + cap + pad)
        cells = [references[i]] + [samples[i, j] for j in range(m)]
        for j, img in enumerate(cells):
            x = pad + j * (tw + pad)
            # PIL sets Image.NEAREST with setattr (invisible to its type hints); it is kept over
            # Image.Resampling.NEAREST, which needs pillow >= 9.1
            pil = Image.fromarray(to_uint8(img)).resize((tw, th), Image.NEAREST)  # type: ignore[attr-defined]
            canvas.paste(pil, (x, y))
            if j == 0:
                draw.rectangle(
                    [x - 2, y - 2, x + tw + 1, y + th + 1], outline=(220, 40, 40), width=2
                )
                continue
            if failed is not None and bool(failed[i, j - 1]):
                draw.line([x, y, x + tw, y + th], fill=(220, 0, 0), width=3)
                draw.text((x, y + th + 2), "failed", fill=(220, 0, 0), font=font)
                continue
            off = flagged is not None and bool(flagged[i, j - 1])
            if off:
                draw.rectangle([x - 3, y - 3, x + tw + 2, y + th + 2], outline=ORANGE, width=3)
            caption = f"{float(losses[i, j - 1]):.3g}" if losses is not None else ""
            if off:
                caption = f"{caption} flagged".strip()
            if caption:
                draw.text((x, y + th + 2), caption, fill=ORANGE if off else (0, 0, 0), font=font)
    return canvas


def save_grid(path: str | Path, *args, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fiber_grid(*args, **kwargs).save(path)
    return path

"""Image grids (PNG) for samples, training progress and reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] (torch or numpy) -> (B, H, W, 3) uint8."""
    arr = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    arr = np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8)
    return arr.transpose(0, 2, 3, 1)


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """(3, H, W) float [0, 1] tensor or (H, W, 3) uint8 array -> PIL image."""
    if isinstance(image, torch.Tensor):
        arr = (
            (image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255)
            .round()
            .astype(np.uint8)
        )
    else:
        arr = np.asarray(image, dtype=np.uint8)
    return Image.fromarray(arr)


def make_grid(
    images: Sequence[torch.Tensor | np.ndarray] | torch.Tensor,
    ncol: int,
    row_labels: Sequence[str] | None = None,
    scale: int = 1,
    pad: int = 2,
    label_width: int = 0,
) -> Image.Image:
    """Tile images row-major into a grid; each row may carry a text label on its left.

    ``scale`` upsamples (nearest) small images so that they can be looked at; ``label_width`` 0 picks a
    width from the longest label.
    """
    pics = [to_pil(im) for im in images]
    if not pics:
        raise ValueError("make_grid needs at least one image")
    w, h = pics[0].size
    w, h = w * scale, h * scale
    nrow = (len(pics) + ncol - 1) // ncol
    try:  # a scalable 13 px font (Pillow >= 10.1 with FreeType): its spaces stay visible between words
        font = ImageFont.load_default(size=13)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    if row_labels and not label_width:
        label_width = min(480, 12 + int(max(font.getlength(s) for s in row_labels)))
    if not row_labels:
        label_width = 0
    grid = Image.new("RGB", (label_width + ncol * (w + pad) + pad, nrow * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, im in enumerate(pics):
        r, c = divmod(k, ncol)
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        grid.paste(im, (label_width + pad + c * (w + pad), pad + r * (h + pad)))
    if row_labels:
        for r, text in enumerate(row_labels[:nrow]):
            draw.text((4, pad + r * (h + pad) + h // 2 - 7), text, fill=(0, 0, 0), font=font)
    return grid


def save_grid(path: str | Path, *args, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(*args, **kwargs).save(path)
    return path

"""Sample images on disk: uint8 conversion as ADM rounds, PNG grids (plain, or with a title and a label per row), the
ADM evaluator's ``.npz`` layout and the per-process shards of a multi-process ``sample`` run; labels dealt evenly over
the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path
from ..errors import InputError


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8, rounding as ADM does (``(x + 1) * 127.5``)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(
    images: Tensor,
    path: str | Path,
    nrow: int = 8,
    padding: int = 2,
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """A PNG grid of ``(N, 3, H, W)`` images in [-1, 1], ``nrow`` images per row, written atomically.

    Without ``row_labels`` and ``title`` the PNG is the plain grid. ``row_labels`` (one per row of the grid) are
    written left of the rows and ``title`` above them, in dark text on the grid's white; the grid's pixels are the
    plain grid's, and the PNG's text chunks hold the title (``Title``) and the row labels (``Row labels``, one per
    line) for programs that read them."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.float().clamp(-1, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)
    picture = Image.fromarray(to_uint8(grid[None])[0])
    info = None
    if row_labels is not None or title is not None:
        rows = -(-images.shape[0] // nrow)
        if row_labels is not None and len(row_labels) != rows:
            raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows")
        picture = _labelled(picture, images.shape[-2] + padding, padding, row_labels, title)
        info = PngInfo()
        if title is not None:
            info.add_itxt("Title", title)
        if row_labels is not None:
            info.add_itxt("Row labels", "\n".join(row_labels))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", pnginfo=info)
    return path


def _labelled(grid: Any, row_height: int, padding: int, row_labels: Sequence[str] | None, title: str | None) -> Any:
    """``grid`` (a PIL image whose rows are ``row_height`` pixels apart after a ``padding`` border) on a white canvas
    with the row labels in a left margin and the title in a top band."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(10, min(18, round(0.4 * (row_height - padding))))  # readable next to 32 px tiles, not huge at 256
    font, title_font = ImageFont.load_default(size), ImageFont.load_default(size + 2)
    measure = ImageDraw.Draw(grid)
    gap = max(4, size // 2)
    left = 0
    if row_labels:
        left = gap + max(int(measure.textlength(label, font=font)) for label in row_labels) + gap
    top = 0
    if title is not None:
        box = measure.textbbox((0, 0), title, font=title_font)
        top = gap + (box[3] - box[1]) + gap
    width = max(left + grid.width, (int(measure.textlength(title, font=title_font)) + 2 * gap) if title else 0)
    canvas = Image.new("RGB", (width, top + grid.height), (255, 255, 255))
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    ink = (20, 20, 20)
    if title is not None:
        draw.text((gap, gap), title, fill=ink, font=title_font, anchor="lt")
    for i, label in enumerate(row_labels or ()):
        middle = top + padding + i * row_height + (row_height - padding) / 2
        draw.text((left - gap, middle), label, fill=ink, font=font, anchor="rm")
    return canvas


def class_grid(
    images: Tensor, labels: Sequence[int] | Tensor, names: Sequence[str], max_per_row: int = 8
) -> tuple[Tensor, int, list[str]]:
    """Lay ``images`` out one class per row, classes in id order, for :func:`save_image_grid`: returns ``(images,
    nrow, row_labels)``. Rows hold up to ``max_per_row`` images (as many as the most frequent class has, up to
    that); a class with more continues on the next row under the same name; empty cells are white."""
    labels = torch.as_tensor(labels).long().cpu()
    classes = labels.unique(sorted=True).tolist()
    per_row = max(1, min(max_per_row, max(int((labels == c).sum()) for c in classes)))
    blank = torch.ones_like(images[:1])
    cells: list[Tensor] = []
    row_labels: list[str] = []
    for c in classes:
        members = images[labels == c]
        for start in range(0, members.shape[0], per_row):
            row = members[start : start + per_row]
            cells += [row, blank.expand(per_row - row.shape[0], *row.shape[1:])]
            row_labels.append(names[c] if 0 <= c < len(names) else f"class {c}")
    return torch.cat(cells), per_row, row_labels


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """The ADM evaluator's layout: ``arr_0`` uint8 ``(N, H, W, 3)`` (and ``arr_1`` labels), written atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"ADM .npz needs uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [images] if labels is None else [images, labels.astype(np.int64)]
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez(fh, *arrays)
    return path


def merge_shards(shards: str | Path, expected: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Merge the ``.npz`` shards of a folder (``arr_0`` images, ``arr_1`` rows of ``(global index, label)``) in index
    order; with ``expected``, check that they hold exactly the indices ``0 .. expected - 1``."""
    files = sorted(Path(shards).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz shards in {shards}")
    images, meta = [], []
    for f in files:
        with np.load(f) as d:
            if d["arr_0"].shape[0]:
                images.append(d["arr_0"])
            meta.append(d["arr_1"].reshape(-1, 2))
    index = np.concatenate(meta)
    if len(np.unique(index[:, 0])) != len(index):
        raise InputError(f"shards in {shards} overlap (a sample index appears twice); delete them and resample")
    if expected is not None and not np.array_equal(np.sort(index[:, 0]), np.arange(expected)):
        raise InputError(f"shards in {shards} hold {len(index)} of the {expected} samples; rerun the command to finish")
    order = np.argsort(index[:, 0], kind="stable")
    return np.concatenate(images)[order], index[order, 1]


def balanced_labels(n: int, num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """``i % num_classes`` for ``i < n`` on ``device``: every class equally often (up to one)."""
    return torch.arange(n, device=device) % num_classes


__all__ = ["balanced_labels", "class_grid", "merge_shards", "save_image_grid", "save_npz", "to_uint8"]

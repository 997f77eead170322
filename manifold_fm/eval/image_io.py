"""Sample images on disk: uint8 conversion as ADM rounds, PNG grids, the ADM evaluator's ``.npz`` layout and the
per-process shards of a multi-process ``sample`` run; labels dealt evenly over the classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path
from ..errors import InputError


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, H, W, 3)`` uint8, rounding as ADM does (``(x + 1) * 127.5``)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """A PNG grid of ``(N, 3, H, W)`` images in [-1, 1], ``nrow`` images per row, written atomically."""
    from PIL import Image
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(images.float().clamp(-1, 1).cpu(), nrow=nrow, padding=padding, pad_value=1.0)
    arr = to_uint8(grid[None])[0]
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


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


def balanced_labels(n: int, num_classes: int) -> Tensor:
    """``i % num_classes``: every class equally often (up to one)."""
    return torch.arange(n) % num_classes


__all__ = ["balanced_labels", "merge_shards", "save_image_grid", "save_npz", "to_uint8"]

"""Image folders: an ImageNet-layout reader with the ADM centre crop, and the ``image_dataset`` spec factory.

:class:`ImageFolderDataset` reads ``root/<class>/<image>`` (ImageNet's train layout) and yields ``(image, label)``
with ``image`` a ``(3, size, size)`` float tensor in ``[-1, 1]`` and ``label`` an ``int``. Images get the ADM centre
crop (:func:`adm_center_crop`: box-downsample by 2 while the short side is >= 2x the target, bicubic resize of the
short side, centre crop). Unreadable images raise :class:`ImageReadError` naming the file; latent extraction skips
and counts them. :func:`image_dataset` turns a CLI-style spec (``"builtin"`` or a folder) into a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .builtin_images import BuiltinImages

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """An image file could not be read or decoded; the message names the file and the reason."""


def adm_center_crop(image: object, size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image to ``size x size``: returns a ``(size, size, 3)`` uint8 array.

    Box-downsample by 2 while the short side is >= ``2 * size`` (cheap anti-aliasing), resize the short side to
    ``size`` with bicubic, then crop the centre (as in guided-diffusion's ``center_crop_arr``).
    """
    from PIL import Image

    pil = image
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class ImageFolderDataset(Dataset):
    """Images in ``root/<class_name>/...`` (one folder per class, ImageNet layout), centre-cropped ADM-style.

    Classes are the sorted sub-folder names; label ``k`` is the ``k``-th. Files with an image suffix are listed
    recursively inside each class folder, in sorted order. Reading a corrupt or unreadable file raises
    :class:`ImageReadError` (it is never silently replaced).

    Args:
        root: the folder holding one sub-folder per class.
        size: output side in pixels.
        class_names: optional explicit class list (order = label ids); missing folders are an error.
    """

    def __init__(self, root: str | Path, size: int = 256, class_names: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; pass a folder with one sub-folder per class"
            )
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"ImageFolderDataset size must be a positive integer, got {size!r}")
        self.size = size
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_names is None:
            class_names = found
        missing = [c for c in class_names if c not in found]
        if missing:
            raise FileNotFoundError(f"class folder(s) {missing[:3]} not found under {self.root}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.samples: list[tuple[Path, int]] = []
        for k, name in enumerate(self.class_names):
            files = sorted(
                p for p in (self.root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            self.samples.extend((p, k) for p in files)
        if not self.samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}; expected root/<class>/<image> files"
            )

    @property
    def identity(self) -> str:
        return f"folder:{self.root.resolve()}:size={self.size}:n={len(self.samples)}"

    def __len__(self) -> int:
        return len(self.samples)

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def path(self, index: int) -> Path:
        return self.samples[index][0]

    def load(self, index: int) -> Tensor:
        """The image at ``index`` as ``(3, size, size)`` in ``[-1, 1]``; :class:`ImageReadError` if unreadable."""
        from PIL import Image, UnidentifiedImageError

        path = self.samples[index][0]
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise ImageReadError(f"cannot read image {path}: {exc}") from None
        arr = adm_center_crop(rgb, self.size)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.load(index), self.samples[index][1]


def image_dataset(
    spec: str | Path,
    *,
    split: Literal["train", "test"] = "train",
    size: int = 32,
    per_class: int | None = None,
    seed: int = 0,
) -> BuiltinImages | ImageFolderDataset:
    """A dataset from a CLI-style spec: ``"builtin"`` (:class:`BuiltinImages` of ``split``) or an image folder."""
    if str(spec) == "builtin":
        return BuiltinImages(split, size=size, per_class=per_class, seed=seed)
    return ImageFolderDataset(spec, size=size)

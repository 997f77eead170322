"""The built-in procedural image dataset: a class-conditional RGB set rendered from a seed, with no download.

It yields ``(image, label)`` with ``image`` a ``(3, H, W)`` float tensor in ``[-1, 1]`` and ``label`` an ``int``.

:class:`BuiltinImages` renders 12 classes = 4 shapes (disk, square, triangle, cross) x 3 textures (solid, stripes,
checker). Colours, background gradient, position, scale, rotation and stripe frequency are random per image, so
colour carries no class information and a classifier has to learn shape and texture. Every image is a pure function
of ``(seed, split, index)``: the same arguments give bit-identical tensors on any machine (:func:`render_builtin`
draws the pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

SHAPES = ("disk", "square", "triangle", "cross")
TEXTURES = ("solid", "stripes", "checker")
#: The class names, by class id: shape-texture (``"disk-solid"``, ``"disk-stripes"``, ...).
CLASS_NAMES = tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)

_SPLIT_OFFSET = {"train": 0, "test": 1}
_DEFAULT_PER_CLASS = {"train": 500, "test": 100}


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """HSV in ``[0, 1]`` (shape ``(N,)``) to RGB ``(N, 3)`` in ``[0, 1]`` (the standard hexcone formula)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def _item_params(seed: int, split: str, index: int, num_classes: int) -> dict[str, float]:
    """The random nuisance parameters of one image, drawn from its own generator (order-independent)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_OFFSET[split] * 500_000_000 + index)
    r = torch.rand(14, generator=g, dtype=torch.float64).tolist()
    return {
        "cx": 0.5 * (r[0] - 0.5),  # centre in [-0.25, 0.25] of the half-width
        "cy": 0.5 * (r[1] - 0.5),
        "scale": 0.45 + 0.25 * r[2],  # shape half-size as a fraction of the half-width
        "angle": 2 * math.pi * r[3],
        "fg_h": r[4],
        "fg_s": 0.55 + 0.45 * r[5],
        "fg_v": 0.65 + 0.35 * r[6],
        "bg_h": r[7],
        "bg_s": 0.1 + 0.3 * r[8],
        "bg_v": 0.15 + 0.35 * r[9],
        "grad_angle": 2 * math.pi * r[10],
        "grad_amp": 0.25 * r[11],
        "freq": 2.5 + 2.0 * r[12],  # texture periods across the shape
        "noise_seed": int(r[13] * 2**31),
    }


# Images rendered per block: the per-pixel temporaries of a block (32 x 32 x 32 float64 = 256 KiB each) stay in
# cache, where one pass over thousands of images streamed ~20 MB temporaries through memory dozens of times.
# A multiple of 16 keeps every block's first element at a multiple of 16 elements of the full batch, so PyTorch's
# SIMD loops split transcendental ops (sin, sigmoid) into vector/tail parts exactly as for the whole batch: the
# pixels are bit-identical to a single pass (tested against checksums of the unblocked renderer).
_RENDER_BLOCK = 32


def render_builtin(labels: Sequence[int], params: Sequence[dict[str, float]], size: int = 32) -> Tensor:
    """Render images ``(N, 3, size, size)`` in ``[-1, 1]`` for class ids and their nuisance parameters.

    A class id ``c`` is shape ``SHAPES[c // 3]`` with texture ``TEXTURES[c % 3]``. Shapes are signed-distance
    functions in the rotated, scaled local frame ``(u, v)``, blended with a soft edge about one pixel wide (so the
    images are band-limited enough for a small VAE). Per-image quantities are computed for the whole batch, pixels
    in blocks of ``_RENDER_BLOCK`` images (cache-sized temporaries; same arithmetic, same bits).
    """
    n = len(labels)
    if n == 0:
        return torch.zeros(0, 3, size, size)
    p = {k: torch.tensor([q[k] for q in params], dtype=torch.float64) for k in params[0] if k != "noise_seed"}
    lin = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    # Per-image factors: (N, 1, 1) for the (N, H, W) pixel grids, (N, 3, 1, 1) colours.
    cx, cy = p["cx"][:, None, None], p["cy"][:, None, None]
    ca, sa = torch.cos(p["angle"])[:, None, None], torch.sin(p["angle"])[:, None, None]
    s = p["scale"][:, None, None]
    pixel = 2.0 / size / s
    f = p["freq"][:, None, None] * math.pi / 2
    shape_id = torch.tensor([int(c) // len(TEXTURES) for c in labels])[:, None, None]
    tex_id = torch.tensor([int(c) % len(TEXTURES) for c in labels])[:, None, None]
    fg = _hsv_to_rgb(p["fg_h"], p["fg_s"], p["fg_v"])[:, :, None, None]
    fg_dark = fg * 0.35
    bg = _hsv_to_rgb(p["bg_h"], p["bg_s"], p["bg_v"])[:, :, None, None]
    gc, gs = torch.cos(p["grad_angle"])[:, None, None], torch.sin(p["grad_angle"])[:, None, None]
    grad_amp = p["grad_amp"][:, None, None, None]

    noise_gen = torch.Generator()  # reseeded per image: each image's noise is its own stream
    out = torch.empty(n, 3, size, size)
    for a in range(0, n, _RENDER_BLOCK):
        b = min(n, a + _RENDER_BLOCK)
        m = b - a
        x = xx[None] - cx[a:b]
        y = yy[None] - cy[a:b]
        u = (ca[a:b] * x + sa[a:b] * y) / s[a:b]
        v = (-sa[a:b] * x + ca[a:b] * y) / s[a:b]

        r = torch.sqrt(u**2 + v**2)
        sdf_disk = r - 0.9
        sdf_square = torch.maximum(u.abs(), v.abs()) - 0.75
        # Equilateral triangle (circumradius ~1): intersection of three half-planes.
        h1 = v - 0.5
        h2 = -0.866 * u - 0.5 * v - 0.5
        h3 = 0.866 * u - 0.5 * v - 0.5
        sdf_tri = torch.maximum(torch.maximum(h1, h2), h3)
        bar = 0.3
        sdf_cross = torch.minimum(
            torch.maximum(u.abs() - bar, v.abs() - 0.95), torch.maximum(u.abs() - 0.95, v.abs() - bar)
        )
        sdf = torch.stack([sdf_disk, sdf_square, sdf_tri, sdf_cross])  # (4, m, H, W)
        sdf = torch.gather(sdf, 0, shape_id[a:b].expand(1, m, size, size).clone()).squeeze(0)
        mask = torch.sigmoid(-sdf / (0.5 * pixel[a:b]))

        # sin(f u) is shared by stripes and checker (the same op on the same values: the same bits).
        su = torch.sin(f[a:b] * u)
        stripes = (su > 0).double()
        checker = ((su * torch.sin(f[a:b] * v)) > 0).double()
        t_id = tex_id[a:b]
        pattern = torch.where(t_id == 0, torch.ones_like(u), torch.where(t_id == 1, stripes, checker))

        gdir = gc[a:b] * xx + gs[a:b] * yy
        background = bg[a:b] * (1 + grad_amp[a:b] * gdir[:, None])
        foreground = fg[a:b] * pattern[:, None] + fg_dark[a:b] * (1 - pattern[:, None])
        img = mask[:, None] * foreground + (1 - mask[:, None]) * background

        noise = torch.stack(
            [
                torch.randn(3, size, size, generator=noise_gen.manual_seed(int(q["noise_seed"])), dtype=torch.float64)
                for q in params[a:b]
            ]
        )
        img = (img + 0.015 * noise).clamp(0, 1)
        out[a:b] = img * 2 - 1
    return out


class BuiltinImages(Dataset):
    """The procedural 12-class RGB dataset (see the module docstring); deterministic from ``seed``.

    Args:
        split: ``"train"`` or ``"test"`` (disjoint random streams).
        size: image side in pixels (32 by default; any size >= 8 renders the same scenes at that resolution).
        per_class: images per class (default 500 for train, 100 for test). Item ``i`` has label ``i % 12``.
        seed: the dataset seed.
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        size: int = 32,
        per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"BuiltinImages split must be 'train' or 'test', got {split!r}")
        if not (isinstance(size, int) and size >= 8):
            raise ValueError(f"BuiltinImages size must be an integer >= 8, got {size!r}")
        per_class = _DEFAULT_PER_CLASS[split] if per_class is None else per_class
        if not (isinstance(per_class, int) and per_class >= 1):
            raise ValueError(f"BuiltinImages per_class must be a positive integer, got {per_class!r}")
        self.split = split
        self.size = size
        self.per_class = per_class
        self.seed = seed
        self.class_names = list(CLASS_NAMES)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return self.per_class * self.num_classes

    def __repr__(self) -> str:
        return f"BuiltinImages(split={self.split!r}, size={self.size}, per_class={self.per_class}, seed={self.seed})"

    @property
    def identity(self) -> str:
        """A string naming exactly which images this dataset yields (for manifests)."""
        return f"builtin:{self.split}:size={self.size}:per_class={self.per_class}:seed={self.seed}"

    def label(self, index: int) -> int:
        return index % self.num_classes

    def render(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Images ``(N, 3, size, size)`` and labels ``(N,)`` for many indices at once (vectorised rendering)."""
        idx = [self._check_index(i) for i in indices]
        labels = [self.label(i) for i in idx]
        params = [_item_params(self.seed, self.split, i, self.num_classes) for i in idx]
        if not idx:
            return torch.zeros(0, 3, self.size, self.size), torch.zeros(0, dtype=torch.long)
        return render_builtin(labels, params, self.size), torch.tensor(labels, dtype=torch.long)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The whole dataset as ``(images, labels)`` tensors."""
        return self.render(range(len(self)))

    def _check_index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self!r} of length {n}")
        return int(index)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        images, labels = self.render([index])
        return images[0], int(labels[0])

"""The built-in procedural image dataset and the ImageNet-layout folder reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.data.image_folder import ImageFolderDataset, ImageReadError, adm_center_crop, image_dataset


def test_builtin_shapes_range_labels() -> None:
    ds = BuiltinImages("train", per_class=3)
    assert len(ds) == 3 * ds.num_classes and ds.num_classes >= 10 and len(ds.class_names) == ds.num_classes
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 5
    xs, ys = ds.tensors()
    assert xs.min() >= -1 and xs.max() <= 1
    assert torch.bincount(ys).tolist() == [3] * ds.num_classes  # balanced
    # RGB, not grey: channels differ somewhere.
    assert float((xs[:, 0] - xs[:, 1]).abs().mean()) > 0.05


def test_builtin_deterministic_and_order_independent() -> None:
    a, b = BuiltinImages("train", per_class=2, seed=3), BuiltinImages("train", per_class=2, seed=3)
    batch, _ = a.render([7, 2, 19])
    assert torch.equal(batch[0], b[7][0]) and torch.equal(batch[1], b[2][0]) and torch.equal(batch[2], b[19][0])
    assert not torch.equal(a[0][0], BuiltinImages("train", per_class=2, seed=4)[0][0])
    assert not torch.equal(a[0][0], BuiltinImages("test", per_class=2, seed=3)[0][0])
    # Same scene at a larger size: downsampling the 64px render approximates the 32px one.
    big = BuiltinImages("train", size=64, per_class=2, seed=3)[0][0]
    small = a[0][0]
    assert float((torch.nn.functional.avg_pool2d(big[None], 2)[0] - small).abs().mean()) < 0.1


def test_builtin_colour_alone_does_not_predict_class() -> None:
    """Colour is random per image: a nearest-centroid classifier on mean RGB is near chance (1/12)."""
    xtr, ytr = BuiltinImages("train", per_class=20).tensors()
    xte, yte = BuiltinImages("test", per_class=10).tensors()
    ftr, fte = xtr.mean(dim=(2, 3)), xte.mean(dim=(2, 3))
    cent = torch.stack([ftr[ytr == c].mean(0) for c in range(12)])
    acc = float((torch.cdist(fte, cent).argmin(1) == yte).float().mean())
    assert acc < 0.25


def test_builtin_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        BuiltinImages("val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_class"):
        BuiltinImages(per_class=0)
    with pytest.raises(IndexError):
        BuiltinImages(per_class=1)[12]


def _write(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_adm_center_crop_known_answer() -> None:
    # 32 x 64 (H x W) image whose columns are distinct: no downsampling (short side < 2*32), scale 1, centre columns.
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(64, dtype=np.uint8)[None, :] * 3
    out = adm_center_crop(Image.fromarray(arr), 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, arr[:, 16:48])
    # A constant image stays constant through box downsampling and bicubic resizing.
    const = np.full((200, 130, 3), 77, dtype=np.uint8)
    assert np.all(adm_center_crop(Image.fromarray(const), 32) == 77)


def test_image_folder_reader(tmp_path) -> None:
    rng = np.random.default_rng(0)
    _write(tmp_path / "cat" / "a.png", rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    _write(tmp_path / "cat" / "sub" / "b.jpg", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    _write(tmp_path / "dog" / "c.png", np.full((16, 16, 3), 255, dtype=np.uint8))
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    ds = ImageFolderDataset(tmp_path, size=16)
    assert ds.class_names == ["cat", "dog"] and len(ds) == 4
    labels = [ds.label(i) for i in range(len(ds))]
    assert labels == [0, 0, 1, 1]
    x, y = ds[ds.samples.index((tmp_path / "dog" / "c.png", 1))]
    assert x.shape == (3, 16, 16) and y == 1 and torch.allclose(x, torch.ones_like(x))
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[broken]
    assert image_dataset(tmp_path, size=16).num_classes == 2
    assert isinstance(image_dataset("builtin", split="test", per_class=1), BuiltinImages)


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path)


# SHA-256 of the float32 bytes of renders made by the original single-pass renderer (before block rendering, commit
# f468209), recorded at 1 and 2 threads (identical). The shipped tiny VAE was trained on these pixels: they must not
# change. Multi-block cases (48, 108 images; block size 32), a larger and an odd size, and scattered indices.
_REFERENCE_SHA256 = [
    (("train", 32, 4, 0, None), "9bbdd48e75c44c84db005922147271b9ccbc397536b2c828399cdef06d79a910"),
    (("test", 32, 9, 1, None), "4870c760c49f617ec7220d5ddba94512995e18e8745efe9b5bebb3f03f0ca5c4"),
    (("train", 64, 1, 3, None), "2c46dbe022bcf8f99356813b6d2bd96288d561d840149075fc08aa9dbd318c88"),
    (("train", 33, 3, 5, None), "bafec3f09e14bbdff06e2f62c8952fcde29fc100f4d12b441f94d00312766e63"),
    (
        ("train", 32, 500, 0, (0, 1, 5, 777, 5999, 35, 36)),
        "69a84b291c8f83ebe5b272a93aa448c09959c9360e16cd31bf6b4964c62694de",
    ),
]


@pytest.mark.parametrize(("case", "digest"), _REFERENCE_SHA256, ids=lambda c: str(c)[:40])
def test_builtin_pixels_bitwise_unchanged(case: tuple, digest: str) -> None:
    import hashlib

    split, size, per_class, seed, idx = case
    ds = BuiltinImages(split, size=size, per_class=per_class, seed=seed)
    x = ds.tensors()[0] if idx is None else ds.render(list(idx))[0]
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == digest


def _render_single_pass(labels: list[int], params: list[dict[str, float]], size: int) -> torch.Tensor:
    """The original unblocked renderer, verbatim (an independent reference for the block renderer)."""
    import math

    from manifold_fm.data.builtin_images import TEXTURES, _hsv_to_rgb

    n = len(labels)
    p = {k: torch.tensor([q[k] for q in params], dtype=torch.float64) for k in params[0] if k != "noise_seed"}
    lin = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    x = xx[None] - p["cx"][:, None, None]
    y = yy[None] - p["cy"][:, None, None]
    ca, sa = torch.cos(p["angle"])[:, None, None], torch.sin(p["angle"])[:, None, None]
    s = p["scale"][:, None, None]
    u = (ca * x + sa * y) / s
    v = (-sa * x + ca * y) / s
    shape_id = torch.tensor([int(c) // len(TEXTURES) for c in labels])[:, None, None]
    tex_id = torch.tensor([int(c) % len(TEXTURES) for c in labels])[:, None, None]
    r = torch.sqrt(u**2 + v**2)
    sdf_disk = r - 0.9
    sdf_square = torch.maximum(u.abs(), v.abs()) - 0.75
    h1 = v - 0.5
    h2 = -0.866 * u - 0.5 * v - 0.5
    h3 = 0.866 * u - 0.5 * v - 0.5
    sdf_tri = torch.maximum(torch.maximum(h1, h2), h3)
    bar = 0.3
    sdf_cross = torch.minimum(
        torch.maximum(u.abs() - bar, v.abs() - 0.95), torch.maximum(u.abs() - 0.95, v.abs() - bar)
    )
    sdf = torch.stack([sdf_disk, sdf_square, sdf_tri, sdf_cross])
    sdf = torch.gather(sdf, 0, shape_id.expand(1, n, size, size).clone()).squeeze(0)
    pixel = 2.0 / size / s
    mask = torch.sigmoid(-sdf / (0.5 * pixel))
    f = p["freq"][:, None, None] * math.pi / 2
    stripes = (torch.sin(f * u) > 0).double()
    checker = ((torch.sin(f * u) * torch.sin(f * v)) > 0).double()
    pattern = torch.where(tex_id == 0, torch.ones_like(u), torch.where(tex_id == 1, stripes, checker))
    fg = _hsv_to_rgb(p["fg_h"], p["fg_s"], p["fg_v"])[:, :, None, None]
    fg_dark = fg * 0.35
    bg = _hsv_to_rgb(p["bg_h"], p["bg_s"], p["bg_v"])[:, :, None, None]
    gdir = torch.cos(p["grad_angle"])[:, None, None] * xx + torch.sin(p["grad_angle"])[:, None, None] * yy
    background = bg * (1 + p["grad_amp"][:, None, None, None] * gdir[:, None])
    foreground = fg * pattern[:, None] + fg_dark * (1 - pattern[:, None])
    img = mask[:, None] * foreground + (1 - mask[:, None]) * background
    noise = torch.stack(
        [
            torch.randn(
                3, size, size, generator=torch.Generator().manual_seed(int(q["noise_seed"])), dtype=torch.float64
            )
            for q in params
        ]
    )
    img = (img + 0.015 * noise).clamp(0, 1)
    return (img * 2 - 1).float()


@pytest.mark.parametrize(("size", "count"), [(32, 70), (20, 33), (9, 17)])
def test_block_renderer_equals_single_pass(size: int, count: int) -> None:
    """Same bits as the single-pass renderer on this machine (block boundaries inside the batch, odd sizes)."""
    from manifold_fm.data.builtin_images import _item_params, render_builtin

    idx = list(range(3, 3 + count))
    labels = [i % 12 for i in idx]
    params = [_item_params(2, "train", i, 12) for i in idx]
    assert torch.equal(render_builtin(labels, params, size), _render_single_pass(labels, params, size))
    assert render_builtin([], [], size).shape == (0, 3, size, size)

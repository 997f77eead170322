"""The built-in procedural image dataset and the ImageNet-layout folder reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from manifold_fm.data.images import BuiltinImages, ImageFolderDataset, ImageReadError, adm_center_crop, image_dataset


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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors gain nothing from a second thread and lose a lot when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

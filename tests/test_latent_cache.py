"""Sharded safetensors latent caches: contents, flips, manifest, resume after interruption, skipped images."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from manifold_fm.data.builtin_images import BuiltinImages
from manifold_fm.data.image_folder import ImageFolderDataset
from manifold_fm.data.latents import LatentCache, extract_latents
from manifold_fm.tokenizers import TinyVAE, TinyVAETokenizer


@pytest.fixture(scope="module")
def tok() -> TinyVAETokenizer:
    torch.manual_seed(0)
    return TinyVAETokenizer(TinyVAE(4, (8, 8)).eval().requires_grad_(False), name="tiny-test")


class _Interrupt(Exception):
    pass


class _Flaky(BuiltinImages):
    """Raises once an index at or beyond ``stop`` is requested (a simulated crash mid-extraction)."""

    stop = 10**9

    def render(self, indices):  # type: ignore[override]
        if max(indices) >= self.stop:
            raise _Interrupt
        return super().render(indices)


def test_extract_contents_flips_and_manifest(tmp_path, tok) -> None:
    ds = BuiltinImages("test", per_class=2)  # 24 images
    path = extract_latents(tok, ds, tmp_path, batch_size=4, shard_size=10, progress=False)
    m = json.loads(path.read_text())
    assert m["complete"] and m["count"] == 48 and m["skipped"] == 0 and len(m["shards"]) == 3
    assert m["tokenizer"] == "tiny-test" and m["latent_shape"] == [4, 8, 8] and m["num_classes"] == 12
    assert m["class_names"] == ds.class_names and m["normalization"]["kind"] == "identity"
    assert m["class_ids"][ds.class_names[3]] == 3 and m["class_counts"] == {str(c): 4 for c in range(12)}
    cache = LatentCache(tmp_path)
    assert len(cache) == 48 and cache.latent_shape == (4, 8, 8)
    images, labels = ds.tensors()
    with torch.no_grad():
        direct = tok.encode(images)
        flipped = tok.encode(images.flip(-1))
    # Shard 0 holds source items 0..9: batches of 4, originals then flips per batch.
    z, y = cache[0]
    torch.testing.assert_close(z, direct[0])
    assert y == int(labels[0])
    z4, _ = cache[4]  # first flipped copy of batch 0
    torch.testing.assert_close(z4, flipped[0])
    all_z, all_y = cache.load_all()
    assert all_z.shape == (48, 4, 8, 8) and torch.equal(torch.bincount(all_y), torch.full((12,), 4))
    # Every source latent appears exactly once as an original.
    from safetensors.torch import load_file

    shards = [load_file(str(tmp_path / s["file"])) for s in m["shards"]]
    src = torch.cat([s["source_index"] for s in shards])
    flags = torch.cat([s["flipped"] for s in shards])
    assert sorted(src[flags == 0].tolist()) == list(range(24)) == sorted(src[flags == 1].tolist())
    z_last, y_last = cache[-1]
    assert y_last == int(labels[23])
    torch.testing.assert_close(z_last, flipped[23])
    restored = pickle.loads(pickle.dumps(cache))  # DataLoader workers reopen their own handles
    torch.testing.assert_close(restored[5][0], cache[5][0])
    with pytest.raises(IndexError):
        cache[48]


def test_resume_after_interruption_matches_fresh_run(tmp_path, tok) -> None:
    flaky = _Flaky("test", per_class=2)
    flaky.stop = 20  # dies while encoding the third shard
    with pytest.raises(_Interrupt):
        extract_latents(tok, flaky, tmp_path / "a", batch_size=5, shard_size=10, progress=False)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert len(m["shards"]) == 2 and not m["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(tmp_path / "a")
    first = (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns
    flaky.stop = 10**9
    extract_latents(tok, flaky, tmp_path / "a", batch_size=5, shard_size=10, progress=False)
    assert (tmp_path / "a" / "shard-00000.safetensors").stat().st_mtime_ns == first  # not redone
    extract_latents(
        tok, BuiltinImages("test", per_class=2), tmp_path / "b", batch_size=5, shard_size=10, progress=False
    )
    za, ya = LatentCache(tmp_path / "a").load_all()
    zb, yb = LatentCache(tmp_path / "b").load_all()
    assert torch.equal(za, zb) and torch.equal(ya, yb)


def test_resume_refuses_a_different_setup(tmp_path, tok) -> None:
    ds = BuiltinImages("test", per_class=1)
    extract_latents(tok, ds, tmp_path, batch_size=12, shard_size=12, progress=False)
    with pytest.raises(ValueError, match="flip"):
        extract_latents(tok, ds, tmp_path, flip=False, shard_size=12, progress=False)
    other = TinyVAETokenizer(tok.vae, name="other")
    with pytest.raises(ValueError, match="tokenizer"):
        extract_latents(other, ds, tmp_path, shard_size=12, progress=False)
    # resume=False starts over with the new setup.
    extract_latents(other, ds, tmp_path, flip=False, shard_size=12, resume=False, progress=False)
    assert LatentCache(tmp_path).manifest["tokenizer"] == "other" and len(LatentCache(tmp_path)) == 12


def test_unreadable_images_are_skipped_and_counted(tmp_path, tok) -> None:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    (tmp_path / "img" / "b" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(tmp_path / "img", size=16)
    path = extract_latents(tok, ds, tmp_path / "cache", batch_size=4, shard_size=100, dtype="float16", progress=False)
    m = json.loads(path.read_text())
    assert m["skipped"] == 1 and m["count"] == 12 and m["skipped_items"][0]["path"].endswith("zz_corrupt.jpg")
    assert "zz_corrupt.jpg" in m["skipped_items"][0]["reason"]
    # The same with two reader processes gives the same cache and the same skip record.
    path2 = extract_latents(
        tok, ds, tmp_path / "cache2", batch_size=4, shard_size=100, dtype="float16", progress=False, num_workers=2
    )
    m2 = json.loads(path2.read_text())
    assert m2["skipped_items"] == m["skipped_items"]
    assert torch.equal(LatentCache(tmp_path / "cache2").load_all()[0], LatentCache(tmp_path / "cache").load_all()[0])
    cache = LatentCache(tmp_path / "cache")
    z, y = cache[0]
    assert z.dtype == torch.float32 and z.shape == (4, 4, 4)
    assert cache.labels().tolist().count(1) == 6


def test_cache_errors(tmp_path, tok) -> None:
    with pytest.raises(FileNotFoundError, match="extract-latents"):
        LatentCache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        LatentCache(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        extract_latents(tok, BuiltinImages(per_class=1), tmp_path / "x", dtype="int8")


def _folder(root, classes: int = 2, per_class: int = 5):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return ImageFolderDataset(root, size=16)


def test_one_loader_reads_every_shard(tmp_path, tok, monkeypatch) -> None:
    """With reader worker processes, one DataLoader (one set of workers) serves all shards, and the cache is the
    one read in this process."""
    import torch.utils.data

    ds = _folder(tmp_path / "img")  # 10 images: 4 shards of 3
    made = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            made.append(kwargs.get("num_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    extract_latents(tok, ds, tmp_path / "w", batch_size=2, shard_size=3, progress=False, num_workers=1)
    assert made == [1]
    extract_latents(tok, ds, tmp_path / "p", batch_size=2, shard_size=3, progress=False)
    a, b = LatentCache(tmp_path / "w"), LatentCache(tmp_path / "p")
    assert a.manifest == b.manifest and len(a.manifest["shards"]) == 4
    assert torch.equal(a.load_all()[0], b.load_all()[0])


def test_a_partial_cache_of_the_previous_format_resumes(tmp_path, tok) -> None:
    """Shards written before shard files carried their records (listed only in the manifest) count as done."""
    from safetensors.torch import load_file, save_file

    ds = BuiltinImages("test", per_class=2)  # 24 images: 3 shards of 10
    whole = extract_latents(tok, ds, tmp_path / "whole", batch_size=5, shard_size=10, progress=False)
    part = tmp_path / "part"
    part.mkdir()
    m = json.loads(whole.read_text())
    labels = []
    for s in m["shards"][:2]:  # the old layout: no metadata in the files, the manifest listing the shards done
        tensors = load_file(str(tmp_path / "whole" / s["file"]))
        save_file(tensors, str(part / s["file"]))
        labels.append(tensors["labels"])
    counts = torch.bincount(torch.cat(labels))
    m.update(shards=m["shards"][:2], complete=False, count=sum(len(y) for y in labels))
    m["class_counts"] = {str(c): int(n) for c, n in enumerate(counts) if n > 0}
    (part / "manifest.json").write_text(json.dumps(m))
    before = (part / "shard-00000.safetensors").stat().st_mtime_ns
    extract_latents(tok, ds, part, batch_size=5, shard_size=10, progress=False)
    assert (part / "shard-00000.safetensors").stat().st_mtime_ns == before  # kept, not redone
    assert LatentCache(part).manifest == LatentCache(tmp_path / "whole").manifest
    assert torch.equal(LatentCache(part).load_all()[0], LatentCache(tmp_path / "whole").load_all()[0])


def test_resume_refuses_a_different_normalisation(tmp_path, tok) -> None:
    import copy

    from manifold_fm.tokenizers import LatentNormalization

    ds = BuiltinImages("test", per_class=1)
    extract_latents(tok, ds, tmp_path, batch_size=12, shard_size=6, progress=False)
    other = copy.copy(tok).with_normalization(LatentNormalization(shift=0.5, scale=2.0))
    with pytest.raises(ValueError, match="normalised differently"):
        extract_latents(other, ds, tmp_path, batch_size=12, shard_size=6, progress=False)

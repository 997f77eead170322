"""Latent caches: encode a dataset once into sharded safetensors files plus a JSON manifest; read them memory-mapped.

Layout of a cache directory::

    manifest.json              what the cache holds (below); rewritten atomically after every shard
    shard-00000.safetensors    "latents" (n, C, h, w), "labels" (n,) int64, "source_index" (n,) int64,
                               "flipped" (n,) uint8
    ...

Shard ``k`` encodes source items ``[k * shard_size, (k + 1) * shard_size)``; with ``flip=True`` each image also
contributes its horizontal mirror (stored right after the originals of the same batch). Extraction is resumable: a
rerun with the same tokenizer and dataset continues after the last shard recorded in the manifest; a shard file
written but not recorded (an interruption) is redone. Unreadable images are skipped and listed in the manifest
(``skipped`` count and ``skipped_items``), never silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from manifold_fm.errors import InputError

from ..atomic import atomic_path, write_json_atomic
from .guarded import GuardedItems, collate_guarded
from .image_folder import ImageReadError
from .normalization import LatentNormalization

MANIFEST = "manifest.json"
FORMAT = "manifold-fm-latent-cache-v1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, indent=1)


def _dataset_identity(dataset: Dataset) -> str:
    ident = getattr(dataset, "identity", None)
    return str(ident) if ident is not None else f"{type(dataset).__name__}(n={len(dataset)})"  # type: ignore[arg-type]


def _load_items(dataset: Dataset, indices: Sequence[int]) -> tuple[list[Tensor], list[int], list[int], list[dict]]:
    """Images, labels and source indices of the readable items; a record per unreadable one."""
    images, labels, kept, skipped = [], [], [], []
    render = getattr(dataset, "render", None)
    if callable(render):
        x, y = render(list(indices))
        return list(x), [int(v) for v in y], list(indices), []
    for i in indices:
        try:
            image, label = dataset[i]
        except ImageReadError as exc:
            path = getattr(dataset, "path", None)
            skipped.append({"index": int(i), "path": str(path(i)) if callable(path) else None, "reason": str(exc)})
            continue
        images.append(image)
        labels.append(int(label))
        kept.append(int(i))
    return images, labels, kept, skipped


def _batches(
    dataset: Dataset, lo: int, hi: int, batch_size: int, workers: int
) -> Iterator[tuple[list[Tensor], list[int], list[int], list[dict], int]]:
    """Yield ``(images, labels, kept indices, skipped records, batch length)`` over source items ``[lo, hi)``."""
    render = getattr(dataset, "render", None)
    if callable(render) or workers == 0:
        for start in range(lo, hi, batch_size):
            indices = list(range(start, min(hi, start + batch_size)))
            images, labels, kept, bad = _load_items(dataset, indices)
            yield images, labels, kept, bad, len(indices)
        return
    from torch.utils.data import DataLoader

    path = getattr(dataset, "path", None)
    loader = DataLoader(
        GuardedItems(dataset, range(lo, hi)), batch_size=batch_size, num_workers=workers, collate_fn=collate_guarded
    )
    for images, labels, kept, bad in loader:
        records = [{"index": i, "path": str(path(i)) if callable(path) else None, "reason": r} for i, r in bad]
        yield images, labels, kept, records, len(images) + len(bad)


@torch.no_grad()
def extract_latents(
    tokenizer: Any,
    dataset: Dataset,
    out_dir: str | Path,
    batch_size: int = 64,
    flip: bool = True,
    shard_size: int = 4096,
    resume: bool = True,
    dtype: str = "float32",
    progress: bool = True,
    num_workers: int = 0,
) -> Path:
    """Encode ``dataset`` with ``tokenizer.encode`` (normalised latents) into a cache; returns the manifest path.

    Args:
        tokenizer: a :class:`~manifold_fm.tokenizers.Tokenizer` (its ``name`` and normalisation go in the manifest).
        dataset: yields ``(image (3, H, W) in [-1, 1], label)``; ``class_names`` / ``num_classes`` are recorded.
        out_dir: the cache directory (created).
        flip: also store horizontally flipped copies.
        shard_size: source images per shard.
        resume: continue a partial cache; ``False`` starts over (existing shards are overwritten).
        dtype: storage dtype, ``float32`` / ``float16`` / ``bfloat16``.
        num_workers: DataLoader worker processes that read and crop images (image folders; the built-in dataset
            renders in the main process).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise InputError(f"latent cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise InputError("shard_size and batch_size must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise InputError("cannot extract latents from an empty dataset")
    num_shards = (n + shard_size - 1) // shard_size
    setup = {
        "tokenizer": tokenizer.name,
        "dataset": _dataset_identity(dataset),
        "flip": bool(flip),
        "shard_size": int(shard_size),
        "dtype": dtype,
    }
    manifest_path = out / MANIFEST
    manifest: dict[str, Any] | None = None
    if resume and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        differs = {k: (manifest.get(k), v) for k, v in setup.items() if manifest.get(k) != v}
        if differs:
            key, (old, new) = next(iter(differs.items()))
            raise InputError(
                f"{out} holds a cache with {key}={old!r}, not {new!r}; use another directory or resume=False"
            )
    if manifest is None:
        manifest = {
            "format": FORMAT,
            **setup,
            "tokenizer_info": tokenizer.describe(),
            "normalization": tokenizer.normalization.to_dict(),
            "num_classes": int(getattr(dataset, "num_classes", 0)) or None,
            "class_names": list(getattr(dataset, "class_names", []) or []),
            "class_ids": {str(c): i for i, c in enumerate(getattr(dataset, "class_names", []) or [])},
            "class_counts": {},
            "source_items": n,
            "num_shards": num_shards,
            "shards": [],
            "count": 0,
            "skipped": 0,
            "skipped_items": [],
            "latent_shape": None,
            "complete": False,
        }
        _write_json(manifest_path, manifest)
    done = len(manifest["shards"])
    tdtype = _DTYPES[dtype]
    bar = tqdm(total=n, initial=min(n, done * shard_size), disable=not progress, desc="extract latents")
    for k in range(done, num_shards):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        lat, lab, src, flp, skipped = [], [], [], [], []
        for images, labels, kept, bad, count in _batches(dataset, lo, hi, batch_size, num_workers):
            skipped += bad
            bar.update(count)
            if not images:
                continue
            x = torch.stack(images).to(tokenizer.device)
            z = tokenizer.encode(x).float().cpu()
            y = torch.tensor(labels, dtype=torch.long)
            s = torch.tensor(kept, dtype=torch.long)
            lat.append(z)
            lab.append(y)
            src.append(s)
            flp.append(torch.zeros(len(kept), dtype=torch.uint8))
            if flip:
                lat.append(tokenizer.encode(x.flip(-1)).float().cpu())
                lab.append(y)
                src.append(s)
                flp.append(torch.ones(len(kept), dtype=torch.uint8))
        if lat:
            latents = torch.cat(lat).to(tdtype).contiguous()
            if manifest["latent_shape"] is None:
                manifest["latent_shape"] = list(latents.shape[1:])
            tensors = {
                "latents": latents,
                "labels": torch.cat(lab),
                "source_index": torch.cat(src),
                "flipped": torch.cat(flp),
            }
        else:
            shape = manifest["latent_shape"] or [0]
            tensors = {
                "latents": torch.zeros(0, *shape, dtype=tdtype),
                "labels": torch.zeros(0, dtype=torch.long),
                "source_index": torch.zeros(0, dtype=torch.long),
                "flipped": torch.zeros(0, dtype=torch.uint8),
            }
        name = f"shard-{k:05d}.safetensors"
        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
        count = int(tensors["labels"].shape[0])
        manifest["shards"].append({"file": name, "count": count, "source_range": [lo, hi]})
        manifest["count"] += count
        for label, c in zip(*torch.unique(tensors["labels"], return_counts=True), strict=True):
            key = str(int(label))
            manifest["class_counts"][key] = manifest["class_counts"].get(key, 0) + int(c)
        manifest["skipped"] += len(skipped)
        manifest["skipped_items"] += skipped
        manifest["complete"] = k + 1 == num_shards
        _write_json(manifest_path, manifest)
    bar.close()
    if not manifest["complete"]:
        manifest["complete"] = True
        _write_json(manifest_path, manifest)
    return manifest_path


def manifest_is_spherical(manifest: dict[str, Any]) -> bool:
    """Whether a cache holds projected tokens (``extract-latents --spherical``): the ``SphericalTokenizer`` records
    ``normalization.meta.projected`` and names itself ``spherical(<base>)``."""
    norm = manifest.get("normalization") or {}
    return bool((norm.get("meta") or {}).get("projected")) or str(manifest.get("tokenizer", "")).startswith(
        "spherical("
    )


class LatentCache(Dataset):
    """A torch Dataset of ``(latent (C, h, w) float32, label int)`` over a cache written by :func:`extract_latents`.

    Shards are opened with safetensors' memory-mapped reader on first access (lazily, per worker process, so the
    dataset pickles into DataLoader workers); an item read touches only its own slice of the file.

    With ``raw=True`` every latent is returned denormalised with the manifest's normalisation,
    ``y / scale + shift``: the encoder's raw posterior mode (up to the storage dtype's rounding). Spherical training
    projects these, so its data are exactly ``SphericalTokenizer.encode`` of the images whatever normalisation the
    cache was written with. A spherical cache has the identity normalisation, so ``raw`` changes nothing there.

    Attributes:
        manifest: the parsed ``manifest.json`` (class names, ids and counts, shapes, dtype, tokenizer id,
            normalisation, skipped count and items).
    """

    def __init__(self, root: str | Path, require_complete: bool = True, raw: bool = False) -> None:
        self.root = Path(root)
        self.raw = raw
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; create the cache with `manifold-fm extract-latents`")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON ({exc}); re-run extract-latents with --no-resume") from None
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"{path} is not a manifold-fm latent cache (format {self.manifest.get('format')!r})")
        if require_complete and not self.manifest.get("complete"):
            raise InputError(f"latent cache {self.root} is incomplete; re-run extract-latents to resume it")
        self.counts = [int(s["count"]) for s in self.manifest["shards"]]
        for s in self.manifest["shards"]:
            if not (self.root / s["file"]).is_file():
                raise FileNotFoundError(f"latent cache shard {self.root / s['file']} is missing; re-extract")
        self.offsets = torch.tensor([0, *self.counts]).cumsum(0)
        self._handles: dict[int, Any] = {}
        self._labels: Tensor | None = None
        self._norm = self.normalization if raw else None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["latent_shape"])

    @property
    def spherical(self) -> bool:
        """Whether the cache holds projected tokens (written with ``extract-latents --spherical``)."""
        return manifest_is_spherical(self.manifest)

    @property
    def normalization(self) -> LatentNormalization:
        """The :class:`~manifold_fm.data.normalization.LatentNormalization` the stored latents were written with."""
        record = self.manifest.get("normalization")
        if record is None:
            raise InputError(f"latent cache {self.root}: its manifest records no normalisation; re-extract it")
        return LatentNormalization.from_dict(record)

    def _to_raw(self, latents: Tensor) -> Tensor:
        return latents if self._norm is None else self._norm.denormalize(latents).float()

    @property
    def num_classes(self) -> int | None:
        return self.manifest.get("num_classes")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names", []))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # safetensors handles do not pickle; each worker reopens its own
        return state

    def _handle(self, k: int) -> Any:
        h = self._handles.get(k)
        if h is None:
            from safetensors import safe_open

            h = safe_open(str(self.root / self.manifest["shards"][k]["file"]), framework="pt")
            self._handles[k] = h
        return h

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a latent cache of {n} items")
        k = int(torch.searchsorted(self.offsets, torch.tensor(index), right=True)) - 1
        return k, index - int(self.offsets[k])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        k, j = self._locate(int(index))
        h = self._handle(k)
        latent = self._to_raw(h.get_slice("latents")[j : j + 1].float())[0]
        label = int(h.get_slice("labels")[j : j + 1][0])
        return latent, label

    def labels(self) -> Tensor:
        """All labels ``(N,)`` (read once, small)."""
        if self._labels is None:
            parts = [self._handle(k).get_tensor("labels") for k in range(len(self.counts))]
            self._labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return self._labels

    def load_all(self) -> tuple[Tensor, Tensor]:
        """Every latent (float32) and label as two tensors (for small caches that fit in memory)."""
        parts = [self._to_raw(self._handle(k).get_tensor("latents").float()) for k in range(len(self.counts))]
        return torch.cat(parts), self.labels()

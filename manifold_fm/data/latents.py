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
from collections.abc import Callable, Iterator, Sequence
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


def _shard_batches(
    dataset: Dataset, ranges: Sequence[tuple[int, int, int]], batch_size: int, workers: int
) -> Iterator[tuple[int, bool, list[Tensor], list[int], list[int], list[dict], int]]:
    """``(shard, last, images, labels, kept indices, skipped records, batch length)`` over the source items of every
    shard ``(shard, lo, hi)`` in ``ranges``, in order, batches never crossing a shard (``last``: the shard's last
    batch). With ``workers`` one DataLoader (one set of worker processes) reads every shard; datasets that render
    batches (``render``) load in this process."""
    batches = [(k, list(range(s, min(hi, s + batch_size)))) for k, lo, hi in ranges for s in range(lo, hi, batch_size)]
    last = [i + 1 == len(batches) or batches[i + 1][0] != k for i, (k, _) in enumerate(batches)]
    render = getattr(dataset, "render", None)
    if callable(render) or workers == 0:
        for (k, indices), end in zip(batches, last, strict=True):
            images, labels, kept, bad = _load_items(dataset, indices)
            yield k, end, images, labels, kept, bad, len(indices)
        return
    from torch.utils.data import DataLoader

    path = getattr(dataset, "path", None)
    items = [i for _, indices in batches for i in indices]
    positions, at = [], 0
    for _, indices in batches:
        positions.append(list(range(at, at + len(indices))))
        at += len(indices)
    loader = DataLoader(
        GuardedItems(dataset, items), batch_sampler=positions, num_workers=workers, collate_fn=collate_guarded
    )
    for (k, _), end, (images, labels, kept, bad) in zip(batches, last, loader, strict=True):
        records = [{"index": i, "path": str(path(i)) if callable(path) else None, "reason": r} for i, r in bad]
        yield k, end, images, labels, kept, records, len(images) + len(bad)


def _shard_record(out: Path, k: int, setup: dict[str, Any], legacy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The record of shard ``k`` if it is complete for ``setup``: stored in the shard file's metadata (written with
    it, atomically); a shard listed in a manifest written before records existed (``legacy``) is rebuilt from that
    manifest and the file's labels. ``None``: the shard is to be (re)done."""
    from safetensors import SafetensorError, safe_open

    path = out / f"shard-{k:05d}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            labels = f.get_tensor("labels") if "record" not in meta and legacy is not None else None
    except (SafetensorError, OSError):
        return None
    if "record" in meta:
        record = json.loads(meta["record"])
        return record if record.get("setup") == setup else None
    if legacy is None or labels is None:
        return None
    entry = legacy["shards"][k]
    lo, hi = entry["source_range"]
    values, counts = torch.unique(labels, return_counts=True)
    return {
        "setup": setup,
        "count": int(entry["count"]),
        "source_range": [lo, hi],
        "class_counts": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
        "skipped_items": [s for s in legacy.get("skipped_items", []) if lo <= int(s["index"]) < hi],
        "latent_shape": legacy.get("latent_shape"),
    }


def _assemble(manifest: dict[str, Any], records: dict[int, dict[str, Any]], num_shards: int) -> dict[str, Any]:
    """``manifest`` with the shards ``0 .. m-1`` of the longest run of recorded shards from 0 (counts, classes,
    skipped items, latent shape); complete when that is every shard."""
    out = {**manifest, "shards": [], "count": 0, "class_counts": {}, "skipped": 0, "skipped_items": []}
    for k in range(num_shards):
        rec = records.get(k)
        if rec is None:
            break
        out["shards"].append(
            {"file": f"shard-{k:05d}.safetensors", "count": rec["count"], "source_range": rec["source_range"]}
        )
        out["count"] += rec["count"]
        for label, c in rec["class_counts"].items():
            out["class_counts"][label] = out["class_counts"].get(label, 0) + c
        out["skipped"] += len(rec["skipped_items"])
        out["skipped_items"] += rec["skipped_items"]
        if out["latent_shape"] is None and rec["latent_shape"] is not None:
            out["latent_shape"] = rec["latent_shape"]
    out["class_counts"] = dict(sorted(out["class_counts"].items(), key=lambda kv: int(kv[0])))
    out["complete"] = len(out["shards"]) == num_shards
    return out


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
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Encode ``dataset`` with ``tokenizer.encode`` (normalised latents) into a cache; returns the manifest path.

    Several processes share the work when each calls this with its ``rank`` of ``world_size`` and a ``barrier``
    (e.g. accelerate's ``wait_for_everyone``): process ``r`` encodes shards ``r, r + world_size, ...`` on its
    tokenizer's device; the main process (rank 0) writes the manifest, which lists the shards done so far in order,
    and completes it once every process has finished. A shard file carries its own record (counts, classes, skipped
    items, the setup it was made with) in its metadata, so a stopped run, with any number of processes, redoes only
    the shards that are not complete.

    Args:
        tokenizer: a :class:`~manifold_fm.tokenizers.Tokenizer` (its ``name`` and normalisation go in the manifest).
        dataset: yields ``(image (3, H, W) in [-1, 1], label)``; ``class_names`` / ``num_classes`` are recorded.
        out_dir: the cache directory (created).
        flip: also store horizontally flipped copies.
        shard_size: source images per shard.
        resume: continue a partial cache; ``False`` starts over (existing shards are overwritten).
        dtype: storage dtype, ``float32`` / ``float16`` / ``bfloat16``.
        num_workers: DataLoader worker processes that read and crop images (image folders; the built-in dataset
            renders in the main process); one loader serves all of this process's shards.
        rank, world_size, barrier: this process's share (see above).
        echo: on the main process, told in one line how many shards a resumed cache already holds complete (kept,
            not encoded again).
    """
    from safetensors.torch import save_file

    from ..progress import progress_bar

    if dtype not in _DTYPES:
        raise InputError(f"latent cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise InputError("shard_size and batch_size must be positive")
    wait = barrier or (lambda: None)
    main = rank == 0
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
    previous: dict[str, Any] | None = None
    if resume and manifest_path.is_file():  # every process checks, so all stop together
        previous = json.loads(manifest_path.read_text())
        differs = {k: (previous.get(k), v) for k, v in setup.items() if previous.get(k) != v}
        if differs:
            key, (old, new) = next(iter(differs.items()))
            raise InputError(
                f"{out} holds a cache with {key}={old!r}, not {new!r}; use another directory or resume=False"
            )
        if previous.get("normalization", tokenizer.normalization.to_dict()) != tokenizer.normalization.to_dict():
            raise InputError(
                f"{out} holds latents normalised differently from this tokenizer's normalisation (see its "
                "manifest.json); resume with the same statistics, or use another directory or resume=False"
            )
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
    if previous is not None:  # what the cache was started with stays (its normalisation among them)
        manifest = {**manifest, **{k: previous[k] for k in manifest if k in previous}}
    # a shard is done if it was made with this setup and normalisation (a stale shard of another setup is redone)
    shard_setup = {**setup, "normalization": manifest["normalization"]}
    records: dict[int, dict[str, Any]] = {}
    if previous is not None:
        legacy = previous if previous.get("shards") else None
        for k in range(num_shards):
            rec = _shard_record(out, k, shard_setup, legacy if legacy and k < len(legacy["shards"]) else None)
            if rec is not None:
                records[k] = rec
    if main:
        _write_json(manifest_path, _assemble(manifest, records, num_shards))
        if records and echo is not None:
            echo(f"{out}: {len(records)} of {num_shards} shard(s) were complete (kept, not encoded again)")
    wait()  # nobody writes a shard before the manifest is there
    mine = [(k, k * shard_size, min(n, (k + 1) * shard_size)) for k in range(rank, num_shards, world_size)]
    todo = [r for r in mine if r[0] not in records]
    tdtype = _DTYPES[dtype]
    bar = progress_bar(
        total=sum(hi - lo for _, lo, hi in mine),
        initial=sum(hi - lo for k, lo, hi in mine if k in records),
        disable=not (progress and main),
        desc="extract latents" + (f" (process 0 of {world_size})" if world_size > 1 else ""),
    )
    known_shape = manifest["latent_shape"]

    def write(k: int, lo: int, hi: int, parts: dict[str, list[Tensor]], skipped: list[dict]) -> None:
        nonlocal known_shape
        if parts["latents"]:
            latents = torch.cat(parts["latents"]).to(tdtype).contiguous()
            known_shape = known_shape or list(latents.shape[1:])
            tensors = {
                "latents": latents,
                **{key: torch.cat(parts[key]) for key in ("labels", "source_index", "flipped")},
            }
        else:
            tensors = {
                "latents": torch.zeros(0, *(known_shape or [0]), dtype=tdtype),
                "labels": torch.zeros(0, dtype=torch.long),
                "source_index": torch.zeros(0, dtype=torch.long),
                "flipped": torch.zeros(0, dtype=torch.uint8),
            }
        values, counts = torch.unique(tensors["labels"], return_counts=True)
        record = {
            "setup": shard_setup,
            "count": int(tensors["labels"].shape[0]),
            "source_range": [lo, hi],
            "class_counts": {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
            "skipped_items": skipped,
            "latent_shape": list(tensors["latents"].shape[1:]) if parts["latents"] else None,
            "process": [rank, world_size],  # which process of how many wrote it (provenance only)
        }
        with atomic_path(out / f"shard-{k:05d}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"record": json.dumps(record)})
        records[k] = record
        if main:  # the manifest lists the shards done so far (other processes' too), in order
            for j in range(num_shards):
                if j not in records:
                    rec = _shard_record(out, j, shard_setup, None)
                    if rec is not None:
                        records[j] = rec
            _write_json(manifest_path, _assemble(manifest, records, num_shards))

    ranges = {k: (lo, hi) for k, lo, hi in todo}
    parts: dict[str, list[Tensor]] = {"latents": [], "labels": [], "source_index": [], "flipped": []}
    skipped: list[dict] = []
    for k, last, images, labels, kept, bad, count in _shard_batches(dataset, todo, batch_size, num_workers):
        skipped += bad
        bar.update(count)
        if images:
            x = torch.stack(images).to(tokenizer.device)
            y = torch.tensor(labels, dtype=torch.long)
            src = torch.tensor(kept, dtype=torch.long)
            for mirrored in (False, True) if flip else (False,):
                parts["latents"].append(tokenizer.encode(x.flip(-1) if mirrored else x).float().cpu())
                parts["labels"].append(y)
                parts["source_index"].append(src)
                parts["flipped"].append(torch.full((len(kept),), int(mirrored), dtype=torch.uint8))
        if last:  # written as soon as it is complete
            write(k, *ranges[k], parts, skipped)
            parts, skipped = {key: [] for key in parts}, []
    bar.close()
    wait()  # every process's shards are written
    if main:
        for k in range(num_shards):
            if k not in records:
                rec = _shard_record(out, k, shard_setup, None)
                if rec is not None:
                    records[k] = rec
        final = _assemble(manifest, records, num_shards)
        if not final["complete"]:
            missing = [k for k in range(num_shards) if k not in records]
            raise RuntimeError(f"latent cache {out}: shards {missing[:5]} were not written by their processes")
        _write_json(manifest_path, final)
    wait()  # the complete manifest is there for every process
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

#!/usr/bin/env python
"""ADM-style center crop of an ImageNet-layout folder to ``size x size`` PNGs (the preprocessing of ADM / DiT / SiT).

Input: ``SRC/<class_id>/<image>`` (ImageNet's train layout: one folder per class, e.g. ``n01440764/*.JPEG``).
Output: ``DST/<class_id>/<image stem>.png``, every image RGB ``size x size``, plus ``DST/prepare_report.json``
(counts, skipped files with the reason). Re-running skips images already written, so an interrupted run resumes.

The crop is ADM's ``center_crop_arr`` (guided-diffusion, ``image_datasets.py``), the same function
(:func:`manifold_fm.data.image_folder.adm_center_crop`) that ``manifold-fm extract-latents`` applies on the fly:
while the short side is at least twice the target, halve the image with a BOX filter (anti-aliasing); then resize
with BICUBIC so the short side is ``size``, and cut the central ``size x size`` window. Pre-cropping once makes
latent extraction read small PNGs instead of decoding full-size JPEGs (and gives the image folder the FID reference
can be built from).

Corrupt or unreadable files are never silently dropped: each is listed in the report and counted; the script exits
with status 1 when ``--max-skipped`` is exceeded.

Usage::

    python experiments/imagenet_sfm/scripts/prepare_imagenet.py --src /data/imagenet/train \
        --dst /data/imagenet256 --size 256 --workers 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from manifold_fm.data.image_folder import adm_center_crop

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def iter_images(src: Path) -> Iterator[tuple[str, Path]]:
    """``(class_id, file)`` for every image file under ``src/<class_id>/``, in sorted (deterministic) order."""
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{src} holds no class folders; expected the ImageNet layout SRC/<class_id>/<image>")
    for folder in classes:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                yield folder.name, path


def _write_png(arr: Any, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, out)  # a crash never leaves a truncated PNG under the final name


def process_one(job: tuple[str, str, int]) -> tuple[str, str]:
    """Crop one file; returns ``("written"|"existing"|"skipped", reason)``."""
    src, out, size = job
    out_path = Path(out)
    if out_path.exists():
        return "existing", ""
    try:
        with Image.open(src) as image:
            image.load()
            arr = adm_center_crop(image.convert("RGB"), size)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return "skipped", f"{type(exc).__name__}: {exc}"
    if arr.shape != (size, size, 3):  # only for images smaller than one pixel after scaling: report, don't write
        return "skipped", f"crop has shape {arr.shape}, expected {(size, size, 3)}"
    _write_png(arr, out_path)
    return "written", ""


def prepare(src: Path, dst: Path, size: int = 256, workers: int = 1, progress: bool = True) -> dict:
    """Crop every image of ``src`` into ``dst``; returns (and writes) the report mapping."""
    if size <= 0:
        raise ValueError(f"--size must be positive, got {size}")
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist; pass the ImageNet train folder with --src")
    jobs = []
    for class_id, path in iter_images(src):
        (dst / class_id).mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), str(dst / class_id / f"{path.stem}.png"), size))
    counts = {"written": 0, "existing": 0, "skipped": 0}
    skipped: list[dict[str, str]] = []
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="center-crop", unit="img", disable=not progress)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(process_one, jobs, chunksize=64) if pool else map(process_one, jobs)
        for job, (status, reason) in zip(jobs, results, strict=True):
            counts[status] += 1
            if status == "skipped":
                skipped.append({"file": job[0], "reason": reason})
            bar.update()
    finally:
        if pool is not None:
            pool.shutdown()
    bar.close()
    report = {
        "src": str(src),
        "dst": str(dst),
        "size": size,
        "classes": len({Path(j[1]).parent.name for j in jobs}),
        "images": len(jobs),
        **counts,
        "skipped_files": skipped,
    }
    tmp = dst / ".prepare_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, dst / "prepare_report.json")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="ImageNet train folder: SRC/<class_id>/<image>")
    parser.add_argument("--dst", type=Path, required=True, help="output folder (created; existing PNGs are kept)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(32, os.cpu_count() or 1))
    parser.add_argument("--max-skipped", type=int, default=100, help="exit 1 when more files than this are skipped")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = prepare(args.src, args.dst, args.size, args.workers, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{report['images']} images in {report['classes']} classes: {report['written']} written, "
        f"{report['existing']} already there, {report['skipped']} skipped (see {args.dst / 'prepare_report.json'})"
    )
    if report["skipped"] > args.max_skipped:
        print(f"error: {report['skipped']} files skipped, more than --max-skipped={args.max_skipped}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Build the folder of wheels that the lent GPU machine lacks, for ``experiments/imagenet_sfm/gpu_check.sh``.

That machine (one H100 or H200; Python 3.12 at ``/opt/torch/.venv/bin/python3``, torch 2.11; no network) holds torch,
accelerate, einops, torchdiffeq, safetensors, huggingface_hub, scipy, click, pyyaml, numpy, pillow, torchvision,
tqdm, matplotlib, requests, regex, filelock, zipp, typing_extensions, ... but not diffusers, pydantic, geoopt or
torch-fidelity (the list of what its image holds: ``/work/.library/device/KINDS.md`` of the workplace that lends it,
copied into :data:`IMAGE_HAS` below as far as these wheels need it). This script downloads exactly those packages and
the dependencies of theirs that the image lacks, pinned (:data:`MISSING`), as wheels for CPython 3.12 on
manylinux x86_64, plus two small "floor" wheels (:data:`FLOORS`) of packages the image has but whose version there
is not known to meet the floor these wheels state: pip installs a floor wheel only if the image's copy is older.

It checks each downloaded wheel's own ``Requires-Dist`` (for Python 3.12, no extras) against this folder and the
image, so a pin bump that brings a new dependency fails here rather than on the GPU machine, and it fails when the
folder exceeds :data:`MAX_MIB`. The folder (git-ignored) holds the wheels, ``requirements.txt`` (what
``gpu_check.py`` installs with ``pip install --no-index --find-links``) and ``manifest.json`` (versions, sizes,
sha256, the commands). Run it where PyPI is reachable, then carry the folder to the GPU machine::

    python experiments/imagenet_sfm/scripts/gpu_wheels.py            # -> experiments/imagenet_sfm/wheels/
    python experiments/imagenet_sfm/scripts/gpu_wheels.py --out /tmp/w --python-version 3.12

Pins: the versions this project's test suite runs with (pyproject floors: diffusers >= 0.36 for
``AutoencoderKLFlux2``, pydantic >= 2, geoopt >= 0.5, torch-fidelity >= 0.4), checked here against what the image
holds (diffusers 0.42.1 needs huggingface-hub >= 1.32 and safetensors >= 0.8: the image has 1.33.0 and 0.8.0;
geoopt needs torch >= 2.0.1). importlib_metadata 8.7.0 rather than 10.x: the latter needs lazy-importer, which the
image lacks (diffusers lists importlib_metadata without a marker but imports the standard library's on 3.12).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "wheels"  # git-ignored (.gitignore)
MAX_MIB = 40.0

#: Packages the GPU image lacks, and their dependencies it lacks: distribution -> pinned version.
MISSING: dict[str, str] = {
    "diffusers": "0.42.1",
    "importlib_metadata": "8.7.0",  # a dependency of diffusers
    "pydantic": "2.13.4",
    "pydantic_core": "2.46.4",  # pydantic 2.13.4 pins it
    "annotated_types": "0.7.0",  # pydantic
    "typing_inspection": "0.4.2",  # pydantic
    "geoopt": "0.5.1",
    "torch_fidelity": "0.4.0",
}
#: Packages the image has, carried in case its copy is older than these wheels need (pydantic and pydantic-core need
#: typing-extensions >= 4.14.1; importlib_metadata needs zipp >= 3.20); pip takes them only then.
FLOORS: dict[str, str] = {"typing_extensions": "4.16.0", "zipp": "3.23.0"}
#: What ``gpu_check.py`` installs; pip resolves the rest from this folder and the image.
REQUIREMENTS = ("diffusers==0.42.1", "pydantic==2.13.4", "geoopt==0.5.1", "torch-fidelity==0.4.0")
#: Distributions the GPU image holds that these wheels require, with the version seen there where one was recorded
#: (KINDS.md's pip list; None: present, version not recorded).
IMAGE_HAS: dict[str, str | None] = {
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "numpy": "2.5.2",
    "scipy": None,
    "huggingface-hub": "1.33.0",
    "safetensors": "0.8.0",
    "filelock": None,
    "regex": None,
    "requests": None,
    "pillow": None,
    "tqdm": None,
    "typing-extensions": None,
    "zipp": None,
}
PYTHON_VERSION = "3.12"
# pip matches manylinux tags exactly: the usual glibc levels of current wheels
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``typing_extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def download_command(name: str, version: str, dest: Path, python_version: str = PYTHON_VERSION) -> list[str]:
    """``pip download`` of one wheel, no dependencies, binary only, for CPython ``python_version`` on manylinux
    x86_64."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return [*cmd, "-d", str(dest), f"{name}=={version}"]


def wheel_metadata(path: Path) -> str:
    """The ``METADATA`` text of a wheel."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode("utf-8")


def unmet_requirements(
    metadata: str, folder: dict[str, str], image: dict[str, str | None], python_version: str = PYTHON_VERSION
) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's ``metadata`` (markers evaluated for ``python_version``, no extras)
    that neither ``folder`` (name -> version of the wheels built) nor ``image`` (name -> version there, or None
    where not recorded) satisfies, each with the reason."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - pip's vendored copy
        from pip._vendor.packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    folder = {canonical(k): v for k, v in folder.items()}
    image = {canonical(k): v for k, v in image.items()}
    problems = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonical(req.name)
        have = folder.get(name, image.get(name))
        if name not in folder and name not in image:
            problems.append(f"{req}: neither this folder nor the GPU image holds {name}")
        elif have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
            where = "this folder" if name in folder else "the GPU image"
            problems.append(f"{req}: {where} has {name} {have}")
    return problems


def build(out: Path, python_version: str = PYTHON_VERSION, max_mib: float = MAX_MIB) -> dict:
    """Download every wheel of :data:`MISSING` and :data:`FLOORS` into a fresh ``out`` (replacing it), check their
    dependencies and the total size; returns the manifest."""
    wanted = {**MISSING, **FLOORS}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wheels-", dir=out.parent))
    try:
        commands = []
        for name, version in wanted.items():
            cmd = download_command(name, version, tmp, python_version)
            commands.append(" ".join(["python -m pip", *download_command(name, version, out, python_version)[3:]]))
            print("+", commands[-1], flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(tmp.glob("*.whl"))
        by_name = {canonical(w.name.split("-")[0]): w for w in wheels}
        if set(by_name) != {canonical(n) for n in wanted} or len(wheels) != len(wanted):
            raise SystemExit(f"error: expected one wheel each of {sorted(wanted)}, got {[w.name for w in wheels]}")
        problems = []
        for wheel in wheels:
            problems += [f"{wheel.name}: {p}" for p in unmet_requirements(wheel_metadata(wheel), wanted, IMAGE_HAS)]
        if problems:
            raise SystemExit("error: unmet dependencies:\n  " + "\n  ".join(problems))
        total = sum(w.stat().st_size for w in wheels)
        if total > max_mib * 2**20:
            raise SystemExit(f"error: the wheels take {total / 2**20:.1f} MiB, over the {max_mib:g} MiB limit")
        (tmp / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
        manifest = {
            "python_version": python_version,
            "platforms": list(PLATFORMS),
            "requirements": list(REQUIREMENTS),
            "missing": MISSING,
            "floors": FLOORS,
            "wheels": [
                {"file": w.name, "bytes": w.stat().st_size, "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
                for w in wheels
            ],
            "total_mib": round(total / 2**20, 2),
            "commands": commands,
            "written_by": "python experiments/imagenet_sfm/scripts/gpu_wheels.py",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download the wheels the GPU machine lacks (see the docstring).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to (re)build (default {DEFAULT_OUT})")
    parser.add_argument("--python-version", default=PYTHON_VERSION, help="target CPython version (default 3.12)")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB, help="fail above this total size")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest = build(args.out, args.python_version, args.max_mib)
    for w in manifest["wheels"]:
        print(f"{w['bytes'] / 2**20:8.2f} MiB  {w['file']}")
    print(
        f"{manifest['total_mib']:8.2f} MiB in {len(manifest['wheels'])} wheels -> {args.out} (limit {args.max_mib:g})"
    )
    print(f"install offline: python3 -m pip install --no-index --find-links {args.out} -r {args.out}/requirements.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A user's points from a file, for manifold runs (``data.file``): reading, latitude/longitude conversion, the
on-manifold check and the seeded train/val/test split.

- :func:`read_points`: a CSV (comment lines ``#`` and one header line skipped; every other line one point), an NPY,
  an NPZ (its ``points`` array, else its only/first array) or a PT file (a tensor, or a dict with ``points``). Returns
  float64 points ``(N, *shape)`` and, per row, where it came from (``line 7`` of a CSV, ``row 3`` of an array), for
  messages.
- :func:`latlon_to_sphere`: ``(lat, lon)`` in degrees (or radians) to the unit sphere ``S^2``:
  ``x = cos(lat) cos(lon), y = cos(lat) sin(lon), z = sin(lat)``.
- :func:`check_on_manifold`: every point within ``tolerance`` of the manifold (``Manifold.point_error``), or an
  :class:`~manifold_fm.errors.InputError` naming the first rows that are not (with their error and the tolerance);
  ``project=True`` projects them instead.
- :func:`split_points`: a seeded random split into train/val/test with the given fractions (80/10/10 by default); the
  same seed and number of points give the same split on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from ..manifolds import Manifold

_DT = torch.float64
#: The file suffixes :func:`read_points` reads.
POINT_FORMATS = (".csv", ".txt", ".npy", ".npz", ".pt", ".pth")


def _read_csv(path: Path) -> tuple[Tensor, list[str]]:
    rows: list[list[float]] = []
    where: list[str] = []
    header_seen = False
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        delimited = "," in line or ";" in line
        fields = [f.strip() for f in line.replace(";", ",").split(",")] if delimited else line.split()
        try:
            values = [float(f) for f in fields]
        except ValueError:
            if not rows and not header_seen:
                header_seen = True  # one header line (column names) before the first point
                continue
            raise InputError(f"{path}: line {number} is not a row of numbers: {line[:60]!r}") from None
        if rows and len(values) != len(rows[0]):
            raise InputError(f"{path}: line {number} has {len(values)} columns, the rows before it {len(rows[0])}")
        rows.append(values)
        where.append(f"line {number}")
    if not rows:
        raise InputError(f"{path} holds no rows of numbers")
    return torch.tensor(rows, dtype=_DT), where


def _array(path: Path) -> Tensor:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).copy())
    if suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            keys = list(data.keys())
            if not keys:
                raise InputError(f"{path} holds no arrays")
            arr = data["points"] if "points" in keys else data[keys[0]]
            return torch.from_numpy(np.asarray(arr, dtype=np.float64).copy())
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if "points" not in obj:
            raise InputError(f"{path} holds a dict without 'points' (keys: {', '.join(map(str, obj))})")
        obj = obj["points"]
    if not isinstance(obj, Tensor):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a tensor of points")
    return obj.detach().to(_DT)


def read_points(path: str | Path) -> tuple[Tensor, list[str]]:
    """Points ``(N, *shape)`` in float64 from a CSV, NPY, NPZ or PT file, and where each row came from."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data.file: {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in POINT_FORMATS:
        raise InputError(f"data.file: {path} is not one of {', '.join(POINT_FORMATS)}")
    if suffix in (".csv", ".txt"):
        return _read_csv(path)
    try:
        x = _array(path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"data.file: {path} could not be read ({exc})") from None
    if x.ndim < 2 or x.shape[0] == 0:
        raise InputError(f"data.file: {path} holds an array of shape {tuple(x.shape)}; expected (N, ...) points")
    return x, [f"row {i + 1}" for i in range(x.shape[0])]


def latlon_to_sphere(latlon: Tensor, unit: str = "degrees") -> Tensor:
    """``(..., 2)`` latitude/longitude to ``(..., 3)`` points of the unit sphere:
    ``(cos(lat) cos(lon), cos(lat) sin(lon), sin(lat))``."""
    if latlon.shape[-1] != 2:
        raise InputError(f"latlon: expected 2 columns (latitude, longitude), got {latlon.shape[-1]}")
    scale = math.pi / 180.0 if unit == "degrees" else 1.0
    lat, lon = latlon[..., 0] * scale, latlon[..., 1] * scale
    return torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], dim=-1)


def sphere_to_latlon(x: Tensor) -> Tensor:
    """The inverse of :func:`latlon_to_sphere` in degrees: ``(..., 3)`` unit vectors to ``(..., 2)`` lat/lon."""
    lat = torch.atan2(x[..., 2], torch.linalg.vector_norm(x[..., :2], dim=-1))
    lon = torch.atan2(x[..., 1], x[..., 0])
    return torch.rad2deg(torch.stack([lat, lon], dim=-1))


def check_on_manifold(
    x: Tensor, manifold: Manifold, where: Sequence[str], tolerance: float, project: bool = False, source: str = ""
) -> Tensor:
    """``x`` if every point is within ``tolerance`` of ``manifold`` (then snapped onto it with ``projx``); with
    ``project``, every point projected. Otherwise an :class:`InputError` naming the first off-manifold rows."""
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(-1).nonzero().flatten().tolist()
        raise InputError(f"data.file {source}: {', '.join(where[i] for i in bad[:5])} hold NaN/Inf; remove them")
    try:
        err = manifold.point_error(x)
    except (RuntimeError, ValueError) as exc:
        shape = tuple(x.shape[1:])
        raise InputError(f"data.file {source}: points of shape {shape} do not fit {manifold!r} ({exc})") from None
    off = (err > tolerance).nonzero().flatten().tolist()
    if off and not project:
        listed = ", ".join(f"{where[i]} (error {float(err[i]):.3g})" for i in off[:5])
        more = f" and {len(off) - 5} more" if len(off) > 5 else ""
        raise InputError(
            f"data.file {source}: {len(off)} of {x.shape[0]} points are off {manifold!r} by more than the "
            f"tolerance {tolerance:g}: {listed}{more}; fix them, raise data.tolerance, or set data.project=true"
        )
    return manifold.projx(x)


@dataclass(frozen=True)
class Split:
    """Indices of the train, validation and test points (disjoint, covering all points)."""

    train: Tensor
    val: Tensor
    test: Tensor


def split_points(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """A seeded random split of ``n`` points: ``round(n * val)`` validation and ``round(n * test)`` test points,
    the rest for training (a permutation from a generator seeded by ``seed``)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(f"data.split: three fractions >= 0 that sum to 1 (train, val, test), got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    n_train = n - n_val - n_test
    if n_train < 1 or (fractions[1] > 0 and n_val < 1) or (fractions[2] > 0 and n_test < 1):
        raise InputError(f"data.split: {n} points are too few for the split {list(fractions)}")
    return Split(perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])


__all__ = [
    "POINT_FORMATS",
    "Split",
    "check_on_manifold",
    "latlon_to_sphere",
    "read_points",
    "sphere_to_latlon",
    "split_points",
]

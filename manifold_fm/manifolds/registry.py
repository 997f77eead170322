"""Manifolds by name, for the CLI and configs: :func:`available_manifolds` and :func:`build_manifold`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .base import Manifold
from .euclidean import Euclidean
from .sphere import Sphere, TokenSpheres
from .torus import FlatTorus


def _poincare_ball(c: float = 1.0, base_std: float = 0.5) -> Manifold:
    from .geoopt_adapter import GeooptManifold, import_geoopt

    geoopt = import_geoopt()

    return GeooptManifold(geoopt.PoincareBall(c=c), base_std=base_std)


def _lorentz(k: float = 1.0, base_std: float = 0.5) -> Manifold:
    from .geoopt_adapter import GeooptManifold, import_geoopt

    geoopt = import_geoopt()

    return GeooptManifold(geoopt.Lorentz(k=k), base_std=base_std)


def _spd(base_std: float = 0.5) -> Manifold:
    from .geoopt_adapter import GeooptManifold, import_geoopt

    geoopt = import_geoopt()

    return GeooptManifold(geoopt.SymmetricPositiveDefinite(), base_std=base_std)


def _product(factors: list[Mapping[str, Any]]) -> Manifold:
    """``factors``: a list of mappings ``{"name": ..., "shape": int or list, **kwargs}`` in layout order."""
    from .product import Product

    if not isinstance(factors, (list, tuple)) or not factors:
        raise ValueError("product needs factors: a non-empty list of {name: ..., shape: ...} mappings")
    built = []
    for i, spec in enumerate(factors):
        if not isinstance(spec, Mapping) or "name" not in spec or "shape" not in spec:
            raise ValueError(f"product factor {i} must be a mapping with 'name' and 'shape', got {spec!r}")
        kwargs = {k: v for k, v in spec.items() if k not in ("name", "shape")}
        name = spec["name"]
        if name == "euclidean":
            kwargs.setdefault("point_ndim", 1 if isinstance(spec["shape"], int) else len(spec["shape"]))
        built.append((build_manifold(name, **kwargs), spec["shape"]))
    return Product(built)


# name -> (factory, one-line description)
_REGISTRY: dict[str, tuple[Callable[..., Manifold], str]] = {
    "euclidean": (Euclidean, "flat R^n; straight-line paths and a Gaussian prior (the linear FM baseline)"),
    "sphere": (Sphere, "the sphere |x| = radius on the last axis; slerp geodesics, uniform prior"),
    "token_spheres": (
        TokenSpheres,
        "per-token spheres of radius sqrt(dim) over a channel axis, e.g. (B, C, H, W) latents (SFM)",
    ),
    "flat_torus": (FlatTorus, "the flat torus of angles in [-pi, pi)^n on the last axis; uniform prior"),
    "product": (_product, "heterogeneous factors side by side on a flat last axis, product metric"),
    "poincare_ball": (_poincare_ball, "hyperbolic space, Poincare ball model (geoopt), wrapped-normal prior"),
    "lorentz": (_lorentz, "hyperbolic space, hyperboloid model (geoopt), wrapped-normal prior"),
    "spd": (_spd, "symmetric positive definite matrices, affine-invariant metric (geoopt)"),
}


def available_manifolds() -> dict[str, str]:
    """Registered manifold names mapped to a one-line description, in display order."""
    return {name: desc for name, (_, desc) in _REGISTRY.items()}


def build_manifold(name: str, **kwargs: Any) -> Manifold:
    """Construct a registered manifold, e.g. ``build_manifold("token_spheres", dim=32, axis=1)``.

    Raises:
        ValueError: unknown name or keyword arguments the manifold does not take (the message lists the valid ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown manifold {name!r}; available: {', '.join(_REGISTRY)}")
    factory = _REGISTRY[name][0]
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(p for p in params if p != "self") or "none"
        raise ValueError(f"manifold {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"manifold {name!r}: {err}") from err

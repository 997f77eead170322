"""Manifolds: the geometry layer. Pure tensor math, no ``nn.Module`` state and no I/O."""

from .base import Manifold, ManifoldError
from .euclidean import Euclidean
from .geoopt_adapter import GeooptManifold
from .product import Product
from .registry import available_manifolds, build_manifold
from .sphere import Sphere, TokenSpheres
from .torus import FlatTorus

__all__ = [
    "Euclidean",
    "FlatTorus",
    "GeooptManifold",
    "Manifold",
    "ManifoldError",
    "Product",
    "Sphere",
    "TokenSpheres",
    "available_manifolds",
    "build_manifold",
]

"""Manifolds: the geometry layer. Pure tensor math, no ``nn.Module`` state and no I/O."""

from .base import Manifold, ManifoldError
from .euclidean import Euclidean
from .sphere import Sphere, TokenSpheres

__all__ = ["Euclidean", "Manifold", "ManifoldError", "Sphere", "TokenSpheres"]

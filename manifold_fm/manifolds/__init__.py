"""Manifolds: the geometry layer. Pure tensor math, no ``nn.Module`` state and no I/O."""

from .base import Manifold, ManifoldError
from .sphere import Sphere, TokenSpheres

__all__ = ["Manifold", "ManifoldError", "Sphere", "TokenSpheres"]

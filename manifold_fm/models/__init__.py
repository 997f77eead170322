"""Velocity networks: small MLPs for toy manifolds (here) and the SiT transformer (``manifold_fm.models.sit``)."""

from .mlp import VelocityMLP, sinusoidal_embedding

__all__ = ["VelocityMLP", "sinusoidal_embedding"]

"""manifold-fm: Riemannian flow matching for PyTorch."""

__version__ = "0.1.0"

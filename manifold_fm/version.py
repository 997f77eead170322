"""The library's version (also ``manifold_fm.__version__``; keep equal to ``pyproject.toml``'s)."""

__version__ = "0.1.0"

"""manifold-fm: Riemannian flow matching for PyTorch."""

from .version import __version__

__all__ = ["__version__"]


def __getattr__(name: str) -> object:
    # `manifold_fm.from_pretrained(path)` loads an exported model; imported on first use (it pulls in huggingface_hub)
    if name == "from_pretrained":
        from .pipeline import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'manifold_fm' has no attribute {name!r}")

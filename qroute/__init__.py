"""qroute: move the query, not the KV cache, for MLA attention over a shared corpus."""

__version__ = "0.1.0"

__all__ = ["__version__"]

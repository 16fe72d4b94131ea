"""alfcache: extract per-layer ViT tokens once into chunked, self-describing stores."""
__version__ = "0.1.0"

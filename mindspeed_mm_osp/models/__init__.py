"""Models: the SparseUMMDiT predictor and the shared attention kernel entry point."""

from .attention import attention

__all__ = ["attention"]

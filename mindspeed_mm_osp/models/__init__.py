"""Models: the SparseUMMDiT predictor, the shared attention kernel entry point, and `unwrap` (the model
inside its training wrappers)."""

from .attention import attention
from .wrappers import unwrap

__all__ = ["attention", "unwrap"]

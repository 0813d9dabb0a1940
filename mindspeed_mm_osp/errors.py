"""Expected failures: what `pretrain.py`, `inference.py` and the tools turn into one line and exit status 2.

Each is a domain error that names the file, key or flag and the fix; code raising one from a lower-level
exception chains it (`raise ... from exc`) so a debugger still sees the cause.
"""

from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """The domain error types (imported here, lazily, so importing this module stays cheap)."""
    from .checkpoint.layout import CheckpointError
    from .config import ConfigError
    from .data.readers import ReadError
    from .parallel import ParallelConfigError

    return ConfigError, ParallelConfigError, CheckpointError, ReadError


__all__ = ["user_errors"]

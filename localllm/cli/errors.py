"""The error a command reports as ``Error: ...`` without a traceback."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """An error the command reports as ``Error: ...``."""

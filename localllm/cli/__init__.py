"""The ``localllm`` command: Ollama's command line, through a running server or in this process.

Every command but ``serve`` talks to the server at ``$LOCALLLM_HOST`` (else ``$OLLAMA_HOST``) in
Ollama's API; with neither set, to one answering on ``127.0.0.1:11434``, and when none does, it runs an
Engine on ``$LOCALLLM_HOME`` (default ``~/.localllm``) in this process, as ``--local`` always does
(see `models`). A set host that does not answer is an error. ``serve`` runs the HTTP shim.

This module runs a parsed command and turns its failures into ``Error: ...`` and an exit status.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import IO

from .errors import CLIError
from .parser import build_parser

__all__ = ["main"]


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(f"Warning: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"localllm version is {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    warnings.showwarning = _show_warning
    if args.command != "serve":
        logging.basicConfig(level=logging.ERROR, format="%(message)s")
    from ..errors import LocalLLMError

    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    except Exception as exc:
        if os.environ.get("LOCALLLM_DEBUG") and not isinstance(exc, (CLIError, LocalLLMError)):
            raise
        sys.stdout.flush()
        message = str(exc) or type(exc).__name__
        sys.stderr.write(f"Error: {message}\n")
        return 1
    return status

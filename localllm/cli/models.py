"""Where the commands find models: a server when one is set or answers on the default port, else this process.

Every command but ``serve`` makes its calls on one `Models`: `RemoteModels` speaks Ollama's API to the
server at ``$LOCALLLM_HOST`` (else ``$OLLAMA_HOST``, else ``127.0.0.1:11434`` when something answers
there), `localllm.Client` runs an Engine on ``$LOCALLLM_HOME`` in this process (``--local``, or no server).
Through a server, ``--keepalive`` keeps a model warm for the next command, as ``ollama run`` does; in this
process, models live as long as the command.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

from .remote import ProgressCallback, find_server

if TYPE_CHECKING:
    from ..request import Request
    from ..types import (
        ListResponse,
        MessageLike,
        ProcessResponse,
        ProgressResponse,
        ShowResponse,
        StatusResponse,
    )

__all__ = ["Models", "open_models"]

R = TypeVar("R")


class Models(Protocol):
    """The calls the commands make: `localllm.Client` answers them in this process, `RemoteModels` through a server."""

    def list(self) -> ListResponse: ...

    def show(self, model: str, *, verbose: bool = False) -> ShowResponse: ...

    def ps(self) -> ProcessResponse: ...

    def copy(self, source: str, destination: str) -> StatusResponse: ...

    def delete(self, model: str) -> StatusResponse: ...

    def pull(
        self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None
    ) -> ProgressResponse: ...

    def create(
        self,
        model: str,
        *,
        from_: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Iterable[MessageLike] | None = None,
        quantize: str | None = None,
        modelfile: os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> ProgressResponse: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[False] = False) -> R: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[True]) -> Iterator[R]: ...


@contextlib.contextmanager
def open_models(*, local: bool = False) -> Iterator[Models]:
    """The server's models (see `find_server`), or with `local` (or no server) this process's."""
    server = None if local else find_server()
    if server is not None:
        with server:
            yield server
        return
    from .. import Client

    with Client() as client:
        yield client

"""Where ``run`` and ``embed`` find models: a running server when one answers, else an in-process Client.

Through a server, ``--keepalive`` keeps the model warm for the next command, as ``ollama run`` does;
without one, the models live as long as the command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .remote import RemoteModels, running_server

if TYPE_CHECKING:
    from ..embeddings import EmbedResponse
    from ..types import ChatResponse, GenerateResponse, MessageLike, ProgressResponse, ShowResponse

__all__ = ["Models", "open_models"]


class Models(Protocol):
    """The calls ``run`` makes: `localllm.Client` answers them in this process, `RemoteModels` through a server."""

    def show(self, model: str) -> ShowResponse: ...

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        *,
        format: str | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        stream: Literal[True],
    ) -> Iterator[GenerateResponse]: ...

    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        format: str | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        think: bool | str | None = None,
        stream: Literal[True],
    ) -> Iterator[ChatResponse]: ...

    def embed(
        self,
        model: str,
        input: str | Sequence[str],
        truncate: bool | None = True,
        options: Mapping[str, Any] | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
    ) -> EmbedResponse: ...

    def create(
        self,
        model: str,
        *,
        from_: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        messages: Iterable[MessageLike] | None = None,
    ) -> ProgressResponse: ...


@contextlib.contextmanager
def open_models() -> Iterator[Models]:
    """The server's models at ``$LOCALLLM_HOST`` (or ``$OLLAMA_HOST``) when one answers, else this process's."""
    client = running_server()
    if client is not None:
        with RemoteModels(client) as remote:
            yield remote
        return
    from .. import Client

    with Client() as local:
        yield local

"""`EngineAPI`: the async surface every engine offers, in one process (`Engine`) or over a cluster
(`localllm.ray.ClusterEngine`). The HTTP shim and the command line are written against it, so either
engine serves them; code of your own can take an `EngineAPI` the same way."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar, overload, runtime_checkable

from .request import ChatRequest, GenerateRequest, Request

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .embeddings import EmbeddingsResponse, EmbedResponse
    from .engine import ProgressCallback
    from .options import OptionValues
    from .request import ChatFields, CreateFields, GenerateFields
    from .stream import ChunkStream, ResponseStream
    from .types import (
        ChatResponse,
        GenerateResponse,
        ListResponse,
        MessageLike,
        ModelDumpable,
        ProcessResponse,
        ProgressResponse,
        ShowResponse,
        StatusResponse,
    )

__all__ = ["EngineAPI"]

R = TypeVar("R")


@runtime_checkable
class EngineAPI(Protocol):
    """What an engine does, asynchronously: run requests, and manage the models it runs."""

    # -- requests

    @overload
    def send(self, request: Request[R], *, stream: Literal[False] = False) -> ResponseStream[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: Literal[True]) -> ChunkStream[R]: ...

    @overload
    def send(self, request: Request[R], *, stream: bool) -> ResponseStream[R] | ChunkStream[R]: ...

    def generate(
        self,
        model: str,
        prompt: str | None = None,
        suffix: str | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[GenerateFields],
    ) -> ResponseStream[GenerateResponse] | ChunkStream[GenerateResponse]: ...

    def chat(
        self,
        model: str,
        messages: Iterable[MessageLike] | None = None,
        *,
        stream: bool = False,
        **fields: Unpack[ChatFields],
    ) -> ResponseStream[ChatResponse] | ChunkStream[ChatResponse]: ...

    async def render(self, request: GenerateRequest | ChatRequest) -> str: ...

    async def embed(
        self,
        model: str,
        input: str | Sequence[str],
        truncate: bool | None = True,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
        dimensions: int | None = None,
    ) -> EmbedResponse: ...

    async def embeddings(
        self,
        model: str,
        prompt: str,
        options: OptionValues | ModelDumpable | None = None,
        keep_alive: float | str | None = None,
    ) -> EmbeddingsResponse: ...

    # -- loaded models

    async def load(
        self, model: str, *, options: OptionValues | None = None, keep_alive: float | str | None = None
    ) -> None: ...

    async def unload(self, model: str) -> None: ...

    async def ps(self) -> ProcessResponse: ...

    # -- the model store

    async def list(self) -> ListResponse: ...

    async def show(self, model: str, *, verbose: bool = False) -> ShowResponse: ...

    async def pull(
        self, model: str, *, insecure: bool = False, progress: ProgressCallback | None = None, stream: bool = False
    ) -> ProgressResponse | ChunkStream[ProgressResponse]: ...

    async def create(
        self, model: str, *, stream: bool = False, **fields: Unpack[CreateFields]
    ) -> ProgressResponse | ChunkStream[ProgressResponse]: ...

    async def copy(self, source: str, destination: str) -> StatusResponse: ...

    async def delete(self, model: str) -> StatusResponse: ...

    async def create_blob(self, path: str | os.PathLike[str]) -> str: ...

    def blob_path(self, digest: str) -> Path: ...

    async def has_blob(self, digest: str) -> bool: ...

    async def add_blob(self, digest: str, chunks: AsyncIterable[bytes], *, max_size: int | None = None) -> None: ...

    # -- lifecycle

    async def aclose(self) -> None: ...

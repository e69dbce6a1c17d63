"""The ASGI application: Ollama's API and the OpenAI-compatible API over one Engine."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware

from . import anthropic_api, ollama_api, openai_api, responses_api
from .common import DEFAULT_BODY_TIMEOUT, GiB, HideServerPaths, HTTPSettings, MiB
from .security import RequestGuard, allowed_origins

__all__ = ["create_app"]

DEFAULT_MAX_REQUEST_SIZE = 32 * MiB
DEFAULT_MAX_BLOB_SIZE = 256 * GiB


def create_app(
    engine: Any = None,
    *,
    engine_factory: Callable[[], Any] | None = None,
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
    allow_local_paths: bool = False,
    origins: Sequence[str] = (),
    check_host: bool = True,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> Starlette:
    """An ASGI app serving `engine` (already open), or an engine the app opens and closes itself.

    With `engine_factory`, the app's lifespan calls it, enters the engine
    (``async with``) at startup and closes it at shutdown; ``app.state.engine``
    is the engine while the app runs. `max_request_size` limits the body of
    JSON endpoints and `max_blob_size` that of blob uploads (413 beyond). A body
    that pauses for `body_timeout` seconds is answered with 408, closing the connection.

    Requests name models, not files on the server, unless `allow_local_paths`
    (then regular files only). Requests from a browser page must come from
    an allowed origin: local pages and apps, ``LOCALLLM_ORIGINS`` and
    ``OLLAMA_ORIGINS``, and `origins`. With `check_host` (for a server on
    loopback) the ``Host`` header must name this machine.
    """
    if (engine is None) == (engine_factory is None):
        raise ValueError("pass either an engine (already open) or an engine_factory, not both or neither")
    if max_request_size < 1 or max_blob_size < 1:
        raise ValueError("max_request_size and max_blob_size must be positive")
    if not body_timeout > 0:
        raise ValueError(f"body_timeout must be a positive number of seconds, got {body_timeout!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if engine_factory is None:
            yield
            return
        async with engine_factory() as opened:
            app.state.engine = opened
            try:
                yield
            finally:
                app.state.engine = None

    middleware = [
        Middleware(RequestGuard, origins=allowed_origins(origins), check_host=check_host),
        Middleware(HideServerPaths),
    ]
    routes = [*ollama_api.routes(), *openai_api.routes(), *responses_api.routes(), *anthropic_api.routes()]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = HTTPSettings(
        max_request_size=max_request_size,
        max_blob_size=max_blob_size,
        allow_local_paths=allow_local_paths,
        body_timeout=body_timeout,
    )
    return app

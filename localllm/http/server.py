"""Serving the app with uvicorn: `serve` (async), `run` (blocking) and `ServerThread` (in the background)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import anyio
import attrs
import sniffio
import uvicorn

from .app import DEFAULT_MAX_BLOB_SIZE, DEFAULT_MAX_REQUEST_SIZE, create_app
from .common import DEFAULT_BODY_TIMEOUT
from .connections import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, h11_with_header_timeout

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "ConnectionBounds", "ServerThread", "is_loopback", "run", "serve"]

logger = logging.getLogger("localllm.http")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_exposure(host: str, allow_remote: bool, allow_local_paths: bool) -> None:
    if not is_loopback(host):
        if not allow_remote:
            raise ValueError(
                f"refusing to listen on {host}: it would expose the models and the model store to other machines;"
                " pass allow_remote=True (--allow-remote on the command line) if that is what you want"
            )
        logger.warning(
            "listening on %s: anyone who can reach this address can run, create, pull and delete models"
            " (there is no authentication)",
            host,
        )
    if allow_local_paths:
        logger.warning("local paths are allowed: clients may name files on this machine as models")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # Named as TCP (not protocol 0) so that asyncio turns Nagle off on each connection, as it does for the
    # sockets it opens itself: otherwise every small answer waits some 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


@attrs.frozen
class ConnectionBounds:
    """How long a client may take to send a request's headers, and how many connections may be open at once."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __attrs_post_init__(self) -> None:
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout must be a positive number of seconds, got {self.header_timeout!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections!r}")


def _server(app: Any, log_level: str | None, access_log: bool, bounds: ConnectionBounds) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=5,
        log_config=None,
        http=h11_with_header_timeout(bounds.header_timeout),
        # uvicorn counts the new connection among those open: one more lets exactly max_connections in.
        limit_concurrency=bounds.max_connections + 1,
    )
    return uvicorn.Server(config)


async def serve(
    engine: Any = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    engine_factory: Callable[[], Any] | None = None,
    allow_remote: bool = False,
    allow_local_paths: bool = False,
    origins: Sequence[str] = (),
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    log_level: str | None = "info",
    access_log: bool = False,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve Ollama's API and the OpenAI-compatible API until cancelled (or SIGINT/SIGTERM in the main thread).

    Give an open `engine`, or an `engine_factory` whose engine the server
    opens and closes. Only loopback addresses are allowed unless
    `allow_remote` is set; on loopback, requests must be addressed to this
    machine (the Host header). Requests name models, not server files, unless
    `allow_local_paths`. `origins` are allowed beside the defaults and
    ``LOCALLLM_ORIGINS``/``OLLAMA_ORIGINS`` (see `create_app`).
    Slow clients are bounded: a request's headers must arrive within
    `header_timeout` seconds (else the connection is closed), a body that
    pauses for `body_timeout` seconds gets 408, and a request on a connection
    beyond `max_connections` open at once gets 503.
    `on_ready(host, port)` is called once it listens (useful with
    ``port=0``, which picks a free port). Runs on asyncio (uvicorn does not
    run under trio).
    """
    if sniffio.current_async_library() != "asyncio":
        raise RuntimeError("the HTTP server runs on asyncio (uvicorn); start it with anyio.run(..., backend='asyncio')")
    _check_exposure(host, allow_remote, allow_local_paths)
    bounds = ConnectionBounds(header_timeout, max_connections)
    app = create_app(
        engine,
        engine_factory=engine_factory,
        max_request_size=max_request_size,
        max_blob_size=max_blob_size,
        allow_local_paths=allow_local_paths,
        origins=origins,
        check_host=is_loopback(host),
        body_timeout=body_timeout,
    )
    sock = bind_socket(host, port)
    server = _server(app, log_level, access_log, bounds)
    bound = sock.getsockname()[1]

    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await anyio.sleep(0.01)
        logger.info("localllm is listening on http://%s:%d", host, bound)
        if on_ready is not None:
            on_ready(host, bound)

    async def stop_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            server.should_exit = True

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(announce)
            group.start_soon(stop_when_cancelled)
            # Cancelling serve() asks the server to stop; it then shuts down in order (closing the engine).
            with anyio.CancelScope(shield=True):
                await server.serve(sockets=[sock])
            group.cancel_scope.cancel()
    finally:
        sock.close()
    if not server.started:
        raise RuntimeError("the HTTP server failed to start (see the log)")


def run(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    engine_factory: Callable[[], Any] | None = None,
    allow_remote: bool = False,
    **kwargs: Any,
) -> None:
    """Serve until interrupted, with an engine made by `engine_factory` (default: ``localllm.Engine()``)."""
    if engine_factory is None:
        from .. import Engine

        engine_factory = Engine

    async def main() -> None:
        await serve(host=host, port=port, engine_factory=engine_factory, allow_remote=allow_remote, **kwargs)

    anyio.run(main, backend="asyncio")


class ServerThread:
    """The server in a background thread with its own event loop and engine, e.g. for tests or notebooks::

        with ServerThread(lambda: localllm.Engine(home)) as server:
            client = ollama.Client(host=server.url)

    ``port=0`` (the default here) picks a free port; `url` tells which.
    `engine` is the running engine (it belongs to the server's thread).
    """

    def __init__(
        self,
        engine_factory: Callable[[], Any],
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        allow_remote: bool = False,
        allow_local_paths: bool = False,
        origins: Sequence[str] = (),
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        log_level: str | None = "warning",
        startup_timeout: float = 60.0,
    ) -> None:
        _check_exposure(host, allow_remote, allow_local_paths)
        bounds = ConnectionBounds(header_timeout, max_connections)
        self.host = host
        self._factory = engine_factory
        self._app = create_app(
            engine_factory=engine_factory,
            max_request_size=max_request_size,
            max_blob_size=max_blob_size,
            allow_local_paths=allow_local_paths,
            origins=origins,
            check_host=is_loopback(host),
            body_timeout=body_timeout,
        )
        self._sock = bind_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server = _server(self._app, log_level, False, bounds)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._timeout = startup_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def engine(self) -> Any:
        return self._app.state.engine

    @property
    def open_connections(self) -> int:
        """How many client connections are open now."""
        return len(self._server.server_state.connections)

    def _main(self) -> None:
        try:
            anyio.run(self._server.serve, [self._sock], backend="asyncio")
        except BaseException as exc:
            self._failure = exc

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._main, name="localllm-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the HTTP server failed to start") from self._failure
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""Bounds on each connection that uvicorn does not set itself: a deadline for a request's headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a client that opens a
connection and sends nothing, or dribbles a request's headers a byte at a time, holds its socket for
as long as it likes. Here a request's headers must arrive whole within ``header_timeout`` seconds of
the connection opening, or of the request's first byte on a kept-alive connection; else the connection
is closed. (Bodies are bounded by the app: `common.body_chunks`; the number of connections by
uvicorn's ``limit_concurrency``.)
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DEFAULT_HEADER_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "h11_with_header_timeout"]

logger = logging.getLogger("localllm.http")

DEFAULT_HEADER_TIMEOUT = 30.0
"""Seconds a request's headers may take to arrive."""

DEFAULT_MAX_CONNECTIONS = 512
"""Connections open at once; a request on one more is answered with 503 (as many as requests the engine
queues by default, and well below the common limit of 1024 open files)."""


def h11_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers do not arrive within `header_timeout` s."""

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:
                if self._header_timer is None:  # a new request began on a kept-alive connection
                    self._arm()
            else:  # its headers are in: the app reads the body with a deadline of its own
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.info("closing a connection whose request headers did not arrive within %g s", header_timeout)
                self.transport.close()

    return HeaderTimeoutH11

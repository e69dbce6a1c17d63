"""Who may talk to the shim: the Host and Origin checks that keep web pages away from a local server.

Any page a browser shows can send requests to 127.0.0.1 (a form, or a ``text/plain``
fetch, needs no preflight), and DNS rebinding can give a foreign name a loopback
address. So, as Ollama does, the shim answers 403 to a request whose ``Host`` is not
a local name while it listens on loopback, and to one whose ``Origin`` is not allowed:
local pages and apps by default, more with ``LOCALLLM_ORIGINS`` or ``OLLAMA_ORIGINS``.
Clients that send no ``Origin`` (curl, the ``ollama`` and ``openai`` packages) pass.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .common import JSON

__all__ = ["DEFAULT_ORIGINS", "ORIGIN_VARIABLES", "RequestGuard", "allowed_origins", "is_local_host"]

#: Ollama's default origins; ``*`` stands for any run of characters.
DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

#: Environment variables with more allowed origins, comma-separated.
ORIGIN_VARIABLES = ("LOCALLLM_ORIGINS", "OLLAMA_ORIGINS")

# What a browser may ask for in a preflight, as Ollama allows it.
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def allowed_origins(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The defaults, the origins in `ORIGIN_VARIABLES`, and `extra`."""
    found = list(DEFAULT_ORIGINS)
    for variable in ORIGIN_VARIABLES:
        found.extend(item.strip() for item in os.environ.get(variable, "").split(","))
    found.extend(item.strip() for item in extra)
    return tuple(dict.fromkeys(origin for origin in found if origin))


def origin_regex(origins: Iterable[str]) -> str:
    """One case-insensitive regular expression matching any of `origins` (a ``*`` matches anything)."""
    alternatives = ("|".join(".*".join(re.escape(part) for part in origin.split("*")) for origin in origins)) or "(?!)"
    return f"(?i:{alternatives})"


def _host_name(header: str) -> str:
    """The name or address in a Host header, without its port (or the brackets of an IPv6 address)."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def is_local_host(header: str, hostname: str | None = None) -> bool:
    """Whether a Host header names this machine: localhost, ``*.localhost``, its hostname, a local address.

    A name is what DNS rebinding forges, so only local names pass; an address is
    never rebound, so loopback, private and unspecified addresses pass, as in Ollama.
    """
    name = _host_name(header).lower()
    if name in ("", "localhost") or name.endswith(".localhost"):
        return True
    if name == (hostname if hostname is not None else socket.gethostname()).lower():
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or address.is_private or address.is_unspecified


def _refusal(scope: Scope, message: str) -> JSON:
    if str(scope.get("path", "")).startswith("/v1/"):
        body: object = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    else:
        body = {"error": message}
    return JSON(body, status_code=403)


class RequestGuard:
    """ASGI middleware: 403 for a foreign Host (when `check_host`) or an Origin not in `origins`.

    Requests from allowed origins get CORS headers, and their preflights are answered.
    """

    def __init__(self, app: ASGIApp, *, origins: Sequence[str], check_host: bool) -> None:
        regex = origin_regex(origins)
        self.origins = re.compile(regex)
        self.check_host = check_host
        self.hostname = socket.gethostname()
        self.app = CORSMiddleware(app, allow_origin_regex=regex, allow_methods=_METHODS, allow_headers=["*"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            host = headers.get("host", "")
            origin = headers.get("origin")
            if self.check_host and not is_local_host(host, self.hostname):
                message = f"host {host!r} is not allowed: this server only answers requests addressed to this machine"
                await _refusal(scope, message)(scope, receive, send)
                return
            if origin is not None and self.origins.fullmatch(origin) is None:
                message = (
                    f"origin {origin!r} is not allowed; to allow it, add it to LOCALLLM_ORIGINS (or OLLAMA_ORIGINS)"
                )
                await _refusal(scope, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)

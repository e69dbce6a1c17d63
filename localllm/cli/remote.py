"""The server's address (``$LOCALLLM_HOST``) and the commands that ask a running server over HTTP.

A fresh process has nothing loaded, so ``ps`` and ``stop`` ask the server when one answers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import CLIError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "JSONObject",
    "parse_host",
    "running_models",
    "running_server",
    "server_url",
    "stop_model",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434


def server_url() -> str:
    """The base URL of the server named by ``$LOCALLLM_HOST`` (default ``http://127.0.0.1:11434``)."""
    value = os.environ.get("LOCALLLM_HOST", "").strip() or f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    if "://" not in value:
        value = "http://" + value
    scheme, _, rest = value.partition("://")
    if ":" not in rest.rsplit("]", 1)[-1]:
        rest = f"{rest}:{DEFAULT_PORT}"
    return f"{scheme}://{rest}".rstrip("/")


def parse_host(value: str) -> tuple[str, int]:
    """Host and port from ``host``, ``host:port``, ``[v6]:port`` or a URL; ValueError for a bad port."""
    text = value.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else DEFAULT_PORT
    if text.count(":") == 1:
        host, port = text.split(":")
        return host or DEFAULT_HOST, int(port)
    return text or DEFAULT_HOST, DEFAULT_PORT


def running_server() -> httpx.Client | None:
    """An httpx client for a server answering at $LOCALLLM_HOST, or None."""
    import httpx

    client = httpx.Client(base_url=server_url(), timeout=httpx.Timeout(30.0, connect=0.5))
    try:
        answer = client.get("/")
        if answer.status_code == 200 and "running" in answer.text:
            return client
    except httpx.HTTPError:
        pass
    client.close()
    return None


def _server_error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text or f"HTTP {response.status_code}"


class JSONObject:
    """Attribute access to a JSON object (missing fields are None), read as the Engine's result types are."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return self._data.get(name)


def running_models(client: httpx.Client) -> list[JSONObject]:
    """The server's loaded models (its ``/api/ps``); closes the client."""
    try:
        answer = client.get("/api/ps")
    finally:
        client.close()
    if answer.status_code != 200:
        raise CLIError(_server_error(answer))
    return [JSONObject(m) for m in answer.json().get("models", [])]


def stop_model(client: httpx.Client, model: str) -> bool:
    """Ask the server to unload a model now; False when it has no such model. Closes the client."""
    try:
        answer = client.post("/api/generate", json={"model": model, "keep_alive": 0, "stream": False})
    finally:
        client.close()
    if answer.status_code == 404:
        return False
    if answer.status_code != 200:
        raise CLIError(_server_error(answer))
    return True

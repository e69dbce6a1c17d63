"""An optional HTTP front for an Engine: Ollama's REST API and the OpenAI-compatible API.

Install it with ``pip install 'localllm[http]'``::

    import localllm
    from localllm.http import serve

    async with localllm.Engine() as engine:
        await serve(engine)                     # http://127.0.0.1:11434, like Ollama

Existing Ollama and OpenAI clients then talk to the engine as they would to
Ollama. See docs/http.md for the endpoints and fields supported.
"""

try:
    import sniffio  # noqa: F401
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"localllm.http needs the optional HTTP dependencies ({exc.name} is missing): pip install 'localllm[http]'"
    ) from exc

from .app import create_app
from .common import HTTPSettings
from .server import DEFAULT_HOST, DEFAULT_PORT, ServerThread, is_loopback, run, serve

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "HTTPSettings", "ServerThread", "create_app", "is_loopback", "run", "serve"]

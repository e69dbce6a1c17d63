"""The exceptions localllm raises, grouped by what a caller can do about them.

Our exception hierarchy::

    LocalLLMError
    ├── InputError (also ValueError): the call cannot work as given; fix it, the same call fails again
    │   ├── InvalidModelName
    │   ├── InvalidOptions
    │   ├── InvalidFormat
    │   ├── InvalidRequest
    │   ├── InvalidModelFile
    │   ├── ModelfileError
    │   ├── TemplateError
    │   ├── ToolError
    │   ├── CapabilityError
    │   ├── ContextLengthExceeded
    │   └── BlobTooLarge
    ├── NotFoundError (also LookupError): nothing by that name
    │   └── ModelNotFound
    ├── UnavailableError: refused before any work began; the same call may succeed later
    │   ├── QueueFull
    │   └── EngineClosed
    ├── ResourceError: the machine has too little of something
    │   └── InsufficientMemory
    ├── RunnerError: llama.cpp failed to load or run a model
    │   └── ModelLoadError
    ├── PullError: downloading a model failed
    │   ├── DigestMismatch
    │   └── RegistryUnreachable
    └── ConversionError

Every class still takes a message alone, as ``ModelNotFound("...")``. Those
with data also take it by keyword (``InsufficientMemory(needed=..., available=...)``)
and build the message from it when none is given; the data is then on the
exception (``exc.needed``), None when the raiser did not give it.

Every error also has ``status_code``, the HTTP status its category maps to
(`HTTP_STATUS`, which the HTTP shim answers with), and ``error``, its message,
as ``ollama.ResponseError`` has: ``if exc.status_code == 404: pull(...)`` ports.
"""

from __future__ import annotations

__all__ = [
    "HTTP_STATUS",
    "BlobTooLarge",
    "CapabilityError",
    "ContextLengthExceeded",
    "ConversionError",
    "DigestMismatch",
    "EngineClosed",
    "InputError",
    "InsufficientMemory",
    "InvalidFormat",
    "InvalidModelFile",
    "InvalidModelName",
    "InvalidOptions",
    "InvalidRequest",
    "LocalLLMError",
    "ModelLoadError",
    "ModelNotFound",
    "ModelfileError",
    "NotFoundError",
    "PullError",
    "QueueFull",
    "RegistryUnreachable",
    "ResourceError",
    "RunnerError",
    "TemplateError",
    "ToolError",
    "UnavailableError",
    "http_status",
]


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB ({n} bytes)"


class LocalLLMError(Exception):
    """Base class of every error localllm raises."""

    @property
    def status_code(self) -> int:
        """The HTTP status this error's category maps to (400, 404, 413, 502, 503, else 500)."""
        return http_status(self)

    @property
    def error(self) -> str:
        """The message, under the name ``ollama.ResponseError`` gives it."""
        return str(self)


# --------------------------------------------------------------------------- categories


class InputError(LocalLLMError, ValueError):
    """What the caller gave cannot work: a name, option, format, template, file or request the model cannot serve."""


class NotFoundError(LocalLLMError, LookupError):
    """Nothing exists under the name or path given."""


class UnavailableError(LocalLLMError):
    """The request was turned away before any work began, so retrying it is safe.

    It may succeed after a backoff (a full queue), or on an engine that is open.
    """


class ResourceError(LocalLLMError):
    """The machine lacks what the request needs (memory), whatever else is unloaded."""


class RunnerError(LocalLLMError):
    """llama.cpp failed while running a model.

    A failed runner is replaced on the next request, but the same input may
    fail the same way, so this is not an `UnavailableError`.
    """


class PullError(LocalLLMError):
    """Downloading a model failed."""


class ConversionError(LocalLLMError):
    """Converting or quantizing a model failed."""


# --------------------------------------------------------------------------- input


class InvalidModelName(InputError):
    """A model name breaks the naming rules."""


class InvalidOptions(InputError):
    """An option has the wrong type or an impossible value."""


class InvalidFormat(InputError):
    """A structured-output format or JSON schema cannot be used."""


class InvalidRequest(InputError):
    """A request is malformed (bad messages, prompt, or arguments)."""


class InvalidModelFile(InputError):
    """A model file is not a valid GGUF file (or not one llama.cpp can load)."""


class ModelfileError(InputError):
    """A Modelfile could not be parsed."""


class TemplateError(InputError):
    """A chat or prompt template failed to parse or render."""


class ToolError(InputError):
    """A tool definition is invalid or a tool failed."""


class CapabilityError(InputError):
    """The model cannot do what was asked (embed, think, tools, ...)."""


class ContextLengthExceeded(InputError):
    """A prompt does not fit in the model's context window (the request's num_ctx sets it)."""

    def __init__(self, message: str = "", *, tokens: int | None = None, limit: int | None = None) -> None:
        if not message and tokens is not None and limit is not None:
            message = f"the prompt has {tokens} tokens but the context holds {limit}"
        super().__init__(message)
        #: Tokens in the prompt.
        self.tokens = tokens
        #: Tokens the context holds.
        self.limit = limit


class BlobTooLarge(InputError):
    """A blob is larger than the size allowed for it."""

    def __init__(self, message: str = "", *, limit: int | None = None) -> None:
        if not message and limit is not None:
            message = f"blob is larger than the limit of {limit} bytes"
        super().__init__(message)
        #: The largest size allowed, in bytes.
        self.limit = limit


# --------------------------------------------------------------------------- not found


class ModelNotFound(NotFoundError):
    """No model by that name or path exists."""

    def __init__(self, message: str = "", *, model: str | None = None) -> None:
        if not message and model is not None:
            message = f"model '{model}' not found"
        super().__init__(message)
        #: The name (or path) that was looked for.
        self.model = model


# --------------------------------------------------------------------------- unavailable


class QueueFull(UnavailableError):
    """Too many requests are waiting; try again later."""


class EngineClosed(UnavailableError):
    """The engine was closed (or the model unloaded) before the request could start."""


# --------------------------------------------------------------------------- resources


class InsufficientMemory(ResourceError):
    """A model can never fit in the memory available."""

    def __init__(self, message: str = "", *, needed: int | None = None, available: int | None = None) -> None:
        if not message and needed is not None and available is not None:
            message = (
                f"the model needs {_gib(needed)} but only {_gib(available)} of memory is available "
                "even with every other model unloaded; use a smaller model, num_ctx or num_parallel"
            )
        super().__init__(message)
        #: Bytes the model needs.
        self.needed = needed
        #: Bytes there are for it with every other model unloaded.
        self.available = available


# --------------------------------------------------------------------------- runner


class ModelLoadError(RunnerError):
    """llama.cpp failed to load a model or create its context."""


# --------------------------------------------------------------------------- pull


class DigestMismatch(PullError):
    """Bytes do not hash to the sha256 digest they were given under."""

    def __init__(self, message: str = "", *, expected: str | None = None, actual: str | None = None) -> None:
        if not message and expected is not None and actual is not None:
            message = f"blob has digest {actual}, expected {expected}"
        super().__init__(message)
        #: The digest the bytes should have (``sha256:<hex>``).
        self.expected = expected
        #: The digest they have.
        self.actual = actual


class RegistryUnreachable(PullError):
    """The registry (or the hub, or the storage it sends downloads to) could not be reached at all.

    Its name did not resolve, nothing listened at its address, there was no route to it, or Hugging Face's
    offline mode is on: the pull fails at once, without retrying, since the network or the name must change
    first. Its status is 502 (Bad Gateway), what a proxy answers when its upstream cannot be reached: an HTTP
    client of the shim can tell it from a model that does not exist (404) and from a failure here (500).
    """

    def __init__(self, message: str = "", *, host: str | None = None) -> None:
        if not message and host is not None:
            message = f"cannot reach the registry {host}: check the network connection, a proxy, and the host's name"
        super().__init__(message)
        #: The host that could not be reached (``name`` or ``name:port``).
        self.host = host


# --------------------------------------------------------------------------- HTTP statuses

#: The HTTP status of each category (Ollama's choices), first match wins: 400 what the caller gave,
#: 404 no such model, 503 turned away before any work (retry), 502 a registry out of reach, 500 the rest
#: (see `http_status`).
HTTP_STATUS: tuple[tuple[type[LocalLLMError], int], ...] = (
    (BlobTooLarge, 413),
    (RegistryUnreachable, 502),
    (InputError, 400),
    (NotFoundError, 404),
    (UnavailableError, 503),
)


def http_status(exc: BaseException) -> int:
    """The HTTP status `exc` maps to: its category's in `HTTP_STATUS`, else 500."""
    for kind, status in HTTP_STATUS:
        if isinstance(exc, kind):
            return status
    return 500

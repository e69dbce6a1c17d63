"""The requests an engine runs, as values: `GenerateRequest`, `ChatRequest` and `EmbedRequest`.

Each is frozen and checked once, where it is built: whatever the front door (`Engine.chat`, the sync
`Client`, an HTTP route, the command line, a Ray node), a request that exists is a valid one, and
`Engine.send(request)` runs it. Inputs are taken in the forms users have (dicts or the ollama client's
pydantic objects for messages, tools and options; functions as tools) and kept in one plain form,
so a request pickles (to a Ray node) and compares by value::

    request = localllm.ChatRequest("smollm2", [{"role": "user", "content": "hi"}], options={"temperature": 0})
    reply = await engine.send(request)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar, cast

import attrs

from .chat.prompt import THINK_LEVELS
from .errors import InvalidOptions, InvalidRequest
from .media import media_base64
from .options import check_options
from .scheduler.keepalive import parse_keep_alive
from .types import ChatResponse, EmbedResponse, GenerateResponse, Message, MessageLike, plain_data

if TYPE_CHECKING:
    import os

    from .engine import ProgressCallback
    from .options import OptionValues
    from .types import ModelDumpable

__all__ = [
    "MAX_TOP_LOGPROBS",
    "ChatFields",
    "ChatRequest",
    "CreateFields",
    "EmbedFields",
    "EmbedRequest",
    "GenerateFields",
    "GenerateRequest",
    "Request",
    "as_json",
    "takes_fields_of",
]

R_co = TypeVar("R_co", covariant=True)
F = TypeVar("F", bound=Callable[..., Any])

MAX_TOP_LOGPROBS = 20  # Ollama's and OpenAI's limit
_MAX_TOKEN_ID = 1 << 31  # llama.cpp's token type is a 32-bit signed integer


# --------------------------------------------------------------------------- the checks, one per kind of field


def _model(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRequest("model must be a non-empty string: a model name or a path to a GGUF file")


def _flag(instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{attribute.name} must be true or false, got {value!r}")


def _top_logprobs(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {value!r}")


def _think(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None or isinstance(value, bool) or value in THINK_LEVELS:
        return
    raise InvalidRequest(f"think must be true, false or one of {', '.join(THINK_LEVELS)}; got {value!r}")


def _keep_alive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    try:
        parse_keep_alive(value, default=0.0)
    except InvalidOptions as exc:
        raise InvalidRequest(f"keep_alive: {exc}") from None


def _prompt(value: str | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"prompt must be a string, got {type(value).__name__}")
    return value


def _optional_text(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{attribute.name} must be a string, got {type(value).__name__}")


def _options(value: OptionValues | ModelDumpable | None) -> dict[str, Any] | None:
    """Options checked against the spec (unknown names warn at the caller's line), or None when none are set."""
    return check_options(plain_data(value)) or None


def _format(value: Any) -> str | dict[str, Any] | None:
    """`"json"`, a JSON schema (a mapping, or a pydantic model's schema), or None."""
    value = plain_data(value)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return dict(value)
    raise InvalidRequest(f'format must be "json" or a JSON schema object, got {type(value).__name__}')


def _tool_choice(value: str | Mapping[str, Any] | None) -> str | dict[str, Any] | None:
    value = plain_data(value)
    return dict(value) if isinstance(value, Mapping) else value


def _sequence(name: str, value: Any) -> Sequence[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequest(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _messages(value: Iterable[MessageLike] | None) -> tuple[Message, ...]:
    return tuple(Message.from_any(m, where=f"messages[{i}]") for i, m in enumerate(_sequence("messages", value or ())))


def _tools(value: Iterable[Any] | None) -> tuple[dict[str, Any], ...] | None:
    """Tool definitions (functions, `Tool`s, definition dicts) as the plain dicts a template reads."""
    if not value:
        return None
    from .tools import normalize_tools

    return tuple(tool.to_dict() for tool in normalize_tools(plain_data(t) for t in _sequence("tools", value)))


def _images(value: Iterable[Any] | None) -> tuple[str, ...] | None:
    """Images as base64 text (bytes and paths read and encoded: see `media_base64`)."""
    if not value:
        return None
    return tuple(media_base64(item, f"images[{i}]") for i, item in enumerate(_sequence("images", value))) or None


def _context(value: Iterable[int] | None) -> tuple[int, ...] | None:
    if not value:
        return None
    tokens = tuple(_sequence("context", value))
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < _MAX_TOKEN_ID for t in tokens):
        raise InvalidRequest(f"context must be token ids: integers from 0 to {_MAX_TOKEN_ID - 1}")
    return tokens


def _inputs(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequest(f"input must be a string or a list of strings, got {type(value).__name__}")
    texts = tuple(value)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest(f"input {i} must be a string, got {type(text).__name__}")
    return texts


def _dimensions(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequest(f"dimensions must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- the requests


class Request(Generic[R_co]):
    """A request `Engine.send` runs, whose whole response is an `R_co`."""

    __slots__ = ()


@attrs.frozen
class GenerateRequest(Request[GenerateResponse]):
    """Complete a prompt (Ollama's /api/generate).

    The model's template wraps `prompt` (with the model's SYSTEM and MESSAGE history, or `system`)
    unless `raw`; `context` continues a previous response. An empty prompt (and no context) only
    loads the model, or with ``keep_alive=0`` unloads it.
    """

    model: str = attrs.field(validator=_model)
    prompt: str = attrs.field(default="", converter=_prompt)
    suffix: str | None = attrs.field(default=None, validator=_optional_text, kw_only=True)
    system: str | None = attrs.field(default=None, validator=_optional_text, kw_only=True)
    template: str | None = attrs.field(default=None, validator=_optional_text, kw_only=True)
    context: tuple[int, ...] | None = attrs.field(default=None, converter=_context, kw_only=True)
    raw: bool = attrs.field(default=False, validator=_flag, kw_only=True)
    format: str | dict[str, Any] | None = attrs.field(default=None, converter=_format, kw_only=True)
    images: tuple[str, ...] | None = attrs.field(default=None, converter=_images, kw_only=True)
    options: dict[str, Any] | None = attrs.field(default=None, converter=_options, kw_only=True)
    keep_alive: float | str | None = attrs.field(default=None, validator=_keep_alive, kw_only=True)
    think: bool | str | None = attrs.field(default=None, validator=_think, kw_only=True)
    logprobs: bool = attrs.field(default=False, validator=_flag, kw_only=True)
    top_logprobs: int = attrs.field(default=0, validator=_top_logprobs, kw_only=True)  # applies only with logprobs
    # A prompt too long for the context loses its oldest messages (and then tokens) rather than being refused.
    truncate: bool = attrs.field(default=True, validator=_flag, kw_only=True)
    # Generation that reaches the end of the context shifts it and goes on.
    shift: bool = attrs.field(default=True, validator=_flag, kw_only=True)

    @property
    def is_empty(self) -> bool:
        """Whether it only loads or unloads the model."""
        return not self.prompt and not self.context

    @property
    def image_count(self) -> int:
        return len(self.images or ())


@attrs.frozen
class ChatRequest(Request[ChatResponse]):
    """Continue a conversation (Ollama's /api/chat); no messages only loads (or unloads) the model."""

    model: str = attrs.field(validator=_model)
    messages: tuple[Message, ...] = attrs.field(default=(), converter=_messages)
    tools: tuple[dict[str, Any], ...] | None = attrs.field(default=None, converter=_tools, kw_only=True)
    format: str | dict[str, Any] | None = attrs.field(default=None, converter=_format, kw_only=True)
    options: dict[str, Any] | None = attrs.field(default=None, converter=_options, kw_only=True)
    keep_alive: float | str | None = attrs.field(default=None, validator=_keep_alive, kw_only=True)
    think: bool | str | None = attrs.field(default=None, validator=_think, kw_only=True)
    tool_choice: str | dict[str, Any] | None = attrs.field(default=None, converter=_tool_choice, kw_only=True)
    logprobs: bool = attrs.field(default=False, validator=_flag, kw_only=True)
    top_logprobs: int = attrs.field(default=0, validator=_top_logprobs, kw_only=True)  # applies only with logprobs
    # A conversation too long for the context loses its oldest messages rather than being refused.
    truncate: bool = attrs.field(default=True, validator=_flag, kw_only=True)
    # Generation that reaches the end of the context shifts it and goes on.
    shift: bool = attrs.field(default=True, validator=_flag, kw_only=True)

    @property
    def is_empty(self) -> bool:
        """Whether it only loads or unloads the model."""
        return not self.messages

    @property
    def image_count(self) -> int:
        return sum(len(m.images or ()) for m in self.messages)


@attrs.frozen
class EmbedRequest(Request[EmbedResponse]):
    """Embed one text or several (Ollama's /api/embed): one L2-normalised vector per input."""

    model: str = attrs.field(validator=_model)
    input: tuple[str, ...] = attrs.field(default=(), converter=_inputs)
    # An input longer than the context is cut to it rather than refused.
    truncate: bool = attrs.field(default=True, validator=_flag, kw_only=True)
    options: dict[str, Any] | None = attrs.field(default=None, converter=_options, kw_only=True)
    keep_alive: float | str | None = attrs.field(default=None, validator=_keep_alive, kw_only=True)
    dimensions: int | None = attrs.field(default=None, validator=_dimensions, kw_only=True)

    @property
    def is_empty(self) -> bool:
        """Whether it only loads or unloads the model."""
        return not self.input


# --------------------------------------------------------------------------- the keyword fields, for type checkers
# `Engine.chat(model, messages, **fields)` and its kin take these keywords; the classes above check them.


class GenerateFields(TypedDict, total=False):
    system: str | None
    template: str | None
    context: Sequence[int] | None
    raw: bool
    format: str | Mapping[str, Any] | None
    images: Sequence[Any] | None
    options: OptionValues | ModelDumpable | None
    keep_alive: float | str | None
    think: bool | Literal["low", "medium", "high", "max"] | None
    logprobs: bool
    top_logprobs: int
    truncate: bool
    shift: bool


class ChatFields(TypedDict, total=False):
    tools: Sequence[Any] | None
    format: str | Mapping[str, Any] | None
    options: OptionValues | ModelDumpable | None
    keep_alive: float | str | None
    think: bool | Literal["low", "medium", "high", "max"] | None
    tool_choice: str | Mapping[str, Any] | None
    logprobs: bool
    top_logprobs: int
    truncate: bool
    shift: bool


class CreateFields(TypedDict, total=False):
    """The keywords of `Engine.create` besides ``stream``."""

    from_: str | os.PathLike[str] | None
    files: Mapping[str, str] | None
    adapters: Mapping[str, str] | None
    template: str | None
    system: str | None
    parameters: Mapping[str, Any] | ModelDumpable | None
    messages: Iterable[MessageLike] | None
    license: str | Sequence[str] | None
    renderer: str | None
    parser: str | None
    requires: str | None
    quantize: str | None
    modelfile: str | os.PathLike[str] | None
    progress: ProgressCallback | None


class EmbedFields(TypedDict, total=False):
    truncate: bool
    options: OptionValues | ModelDumpable | None
    keep_alive: float | str | None
    dimensions: int | None


def takes_fields_of(source: Callable[..., Any]) -> Callable[[F], F]:
    """Show the keyword fields of `source` (a request class, or the method a call is passed on to) in the
    decorated method's signature, in place of its ``**fields`` (for `help()` and a notebook's signature
    hints; type checkers read the `*Fields` typed dicts)."""
    fields = [p for p in inspect.signature(source).parameters.values() if p.kind is p.KEYWORD_ONLY]

    def decorate(method: F) -> F:
        signature = inspect.signature(method)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own}
        keywords = [p for p in own if p.kind is p.KEYWORD_ONLY]
        leading = [p for p in own if p.kind is not p.KEYWORD_ONLY]
        shown = leading + [p for p in fields if p.name not in taken] + keywords
        method.__signature__ = signature.replace(parameters=shown)  # type: ignore[attr-defined]
        return method

    return decorate


def as_json(request: Request[Any]) -> dict[str, Any]:
    """The request as Ollama's API takes it (its fields are named as Ollama's JSON fields): the model, and
    every other field that is not at its default."""
    body: dict[str, Any] = {}
    for field in attrs.fields(cast("type[attrs.AttrsInstance]", type(request))):
        value = getattr(request, field.name)
        if field.name == "model" or value != field.default:
            body[field.name] = _json_value(value)
    return body


def _json_value(value: Any) -> Any:
    if attrs.has(type(value)):
        return {k: _json_value(v) for k, v in attrs.asdict(value, recurse=False).items() if v is not None}
    if isinstance(value, (tuple, list)):
        return [_json_value(item) for item in value]
    if isinstance(value, Mapping):
        return {k: _json_value(v) for k, v in value.items()}
    return value

"""The public data types. Field names, shapes and units follow Ollama's API and its Python client (durations in ns)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, Union, cast

import attrs

if TYPE_CHECKING:
    from attrs import AttrsInstance

__all__ = [
    "ChatResponse",
    "EmbedResponse",
    "EmbeddingsResponse",
    "GenerateResponse",
    "ListResponse",
    "Logprob",
    "Message",
    "MessageLike",
    "ModelDetails",
    "ModelDumpable",
    "ModelTensor",
    "ProcessModel",
    "ProcessResponse",
    "ProgressResponse",
    "ShowResponse",
    "StatusResponse",
    "StoredModel",
    "TokenLogprob",
    "ToolCall",
    "ToolCallFunction",
    "Usage",
    "as_dict",
    "combine_chat",
    "combine_generate",
    "iso_time",
    "now_iso",
    "plain_data",
]

ROLES = ("system", "user", "assistant", "tool")


def iso_time(moment: _dt.datetime) -> str:
    """A time as Ollama writes it (RFC 3339, UTC as ``Z``)."""
    return moment.isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    """The current UTC time in Ollama's `created_at` format."""
    return iso_time(_dt.datetime.now(_dt.timezone.utc))


DumpMode = Literal["python", "json"]


def _dump(value: Any, mode: DumpMode, exclude_none: bool) -> Any:
    if isinstance(value, _Subscriptable):
        return value.model_dump(mode=mode, exclude_none=exclude_none)
    if isinstance(value, (list, tuple)):
        return [_dump(v, mode, exclude_none) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v, mode, exclude_none) for k, v in value.items()}
    if mode == "json" and isinstance(value, _dt.datetime):
        return iso_time(value)
    return value


class _Subscriptable:
    """Lets a response be read as the ollama client's pydantic models are.

    ``r.message``, ``r["message"]["content"]``, ``r.get("thinking")``, ``"thinking" in r``
    (a field that is set), ``dict(r)`` (its fields, as pydantic iterates them), ``r.model_dump()``.
    """

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def _field_names(self) -> Iterator[str]:
        return (field.name for field in attrs.fields(cast("type[AttrsInstance]", type(self))))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._field_names() and getattr(self, key) is not None

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for name in self._field_names():
            yield name, getattr(self, name)

    def model_dump(self, *, mode: DumpMode = "python", exclude_none: bool = False) -> dict[str, Any]:
        """The fields as plain dicts and lists, recursively; ``mode="json"`` also writes times as text."""
        return {name: _dump(value, mode, exclude_none) for name, value in self if not (exclude_none and value is None)}

    def model_dump_json(self, *, indent: int | None = None, exclude_none: bool = False) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=exclude_none), indent=indent, ensure_ascii=False)


class ModelDumpable(Protocol):
    """A pydantic model, as the ollama client's `Message`, `Tool` and `Options` are."""

    def model_dump(self, *, exclude_none: bool = ..., by_alias: bool = ...) -> dict[str, Any]: ...


def plain_data(value: Any) -> Any:
    """A pydantic model (the ollama client's Message, Tool, Options) as the dict of the fields given to it.

    Unset fields are left out, so none of them reads as an unknown option; anything else is returned as it is.
    """
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, _Subscriptable):
        return dump(exclude_none=True, by_alias=True)
    return value


@attrs.frozen
class ToolCallFunction(_Subscriptable):
    name: str
    arguments: dict[str, Any] = attrs.field(factory=dict)
    index: int = 0


@attrs.frozen
class ToolCall(_Subscriptable):
    function: ToolCallFunction
    id: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToolCall:
        fn = data.get("function", data)
        arguments = fn.get("arguments") or {}
        if isinstance(arguments, str):
            import json

            arguments = json.loads(arguments) if arguments.strip() else {}
        return cls(
            function=ToolCallFunction(name=fn["name"], arguments=dict(arguments), index=int(fn.get("index", 0))),
            id=str(data.get("id", "")),
        )


MessageLike = Union["Message", Mapping[str, Any], ModelDumpable]
"""What a message may be given as: a `Message`, a dict, or the ollama client's `Message`."""


def _role(instance: Any, attribute: Any, value: str) -> None:
    if value not in ROLES:
        from .errors import InvalidRequest

        raise InvalidRequest(f"message role must be one of {', '.join(ROLES)}; got {value!r}")


def _message_images(value: Any, where: str = "images") -> tuple[str, ...] | None:
    """A message's images as base64 text, as Ollama's API carries them (bytes and paths read and encoded)."""
    from .errors import InvalidRequest
    from .media import media_base64

    if not value:
        return None
    if isinstance(value, (str, bytes, bytearray, memoryview, Mapping)) or not isinstance(value, Iterable):
        raise InvalidRequest(f"{where} must be a list, got {type(value).__name__}")
    return tuple(media_base64(item, f"{where}[{i}]") for i, item in enumerate(value)) or None


@attrs.frozen
class Message(_Subscriptable):
    role: str = attrs.field(validator=_role)
    content: str = ""
    thinking: str | None = None
    images: tuple[str, ...] | None = attrs.field(default=None, converter=_message_images)
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @classmethod
    def from_any(cls, value: MessageLike, *, where: str = "message") -> Message:
        """A message from any form a user has; `where` names it in errors (``messages[2]``)."""
        from .errors import InvalidRequest

        if isinstance(value, Message):
            return value
        value = plain_data(value)
        if not isinstance(value, Mapping):
            raise InvalidRequest(f"a message must be a mapping with 'role' and 'content', got {type(value).__name__}")
        if "role" not in value:
            raise InvalidRequest("a message needs a 'role' (system, user, assistant or tool)")
        content = value.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"message content must be a string, got {type(content).__name__}")
        calls = value.get("tool_calls")
        return cls(
            role=value["role"],
            content=content,
            thinking=value.get("thinking"),
            images=_message_images(value.get("images"), f"{where}.images"),
            tool_calls=tuple(ToolCall.from_dict(c) if not isinstance(c, ToolCall) else c for c in calls)
            if calls
            else None,
            tool_name=value.get("tool_name") or value.get("name"),
            tool_call_id=value.get("tool_call_id"),
        )

    def to_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it (OpenAI-style tool calls)."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.thinking:
            data["thinking"] = self.thinking
            data["reasoning_content"] = self.thinking
        if self.tool_calls:
            data["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments, "index": c.function.index},
                }
                for c in self.tool_calls
            ]
        if self.tool_name:
            data["tool_name"] = self.tool_name
            data["name"] = self.tool_name
        if self.tool_call_id:
            data["tool_call_id"] = self.tool_call_id
        return data


@attrs.frozen
class Usage(_Subscriptable):
    """Timings and counts, as Ollama reports them on the final chunk."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


@attrs.frozen
class TokenLogprob(_Subscriptable):
    """A token and its log probability under the model; `bytes` are the token's own bytes (a piece of a
    multi-byte character has only part of one, and its `token` text shows U+FFFD for the rest)."""

    token: str
    logprob: float
    bytes: tuple[int, ...] = ()


@attrs.frozen
class Logprob(TokenLogprob):
    """A generated token's log probability, and the most likely tokens at its position (when asked for)."""

    top_logprobs: tuple[TokenLogprob, ...] | None = None


@attrs.frozen
class GenerateResponse(_Subscriptable):
    """One chunk of `generate` (and, with `done=True`, the final response)."""

    model: str
    created_at: str
    response: str = ""
    done: bool = False
    thinking: str | None = None
    done_reason: str | None = None
    context: tuple[int, ...] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_cached_count: int = 0  # of prompt_eval_count, the tokens reused from the cache, not evaluated again
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: tuple[Logprob, ...] | None = None  # the tokens of this chunk's text, when asked for


@attrs.frozen
class ChatResponse(_Subscriptable):
    """One chunk of `chat` (and, with `done=True`, the final response)."""

    model: str
    created_at: str
    message: Message
    done: bool = False
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_cached_count: int = 0  # of prompt_eval_count, the tokens reused from the cache, not evaluated again
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    logprobs: tuple[Logprob, ...] | None = None  # the tokens of this chunk's text, when asked for


# --------------------------------------------------------------------------- the model store


@attrs.frozen
class StatusResponse(_Subscriptable):
    """What `copy`, `delete`, `pull` and `create` end with: ``status="success"``."""

    status: str | None = None


@attrs.frozen
class ProgressResponse(StatusResponse):
    """One progress report of `pull` or `create` (bytes done of the blob `digest`, where there is one)."""

    completed: int | None = None
    total: int | None = None
    digest: str | None = None

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ProgressResponse:
        return cls(
            status=event.get("status"),
            completed=event.get("completed"),
            total=event.get("total"),
            digest=event.get("digest"),
        )


@attrs.frozen
class ModelDetails(_Subscriptable):
    """What a model is: its format, family, size and quantization (Ollama's `details`).

    `context_length` and `embedding_length` are known from the model's GGUF, so `show()` gives them and `list()`,
    which reads no GGUF, leaves them None.
    """

    parent_model: str = ""
    format: str = ""
    family: str = ""
    families: tuple[str, ...] | None = None
    parameter_size: str = ""
    quantization_level: str = ""
    context_length: int | None = None
    embedding_length: int | None = None


@attrs.frozen
class StoredModel(_Subscriptable):
    """A model in the store, as `list()` reports it."""

    model: str
    name: str
    modified_at: _dt.datetime
    digest: str
    size: int
    details: ModelDetails
    capabilities: list[str] = attrs.field(factory=list)  # as show()'s: "completion", "tools", "embedding", ...


@attrs.frozen
class ListResponse(_Subscriptable):
    """What `list()` returns: the stored models, most recently modified first."""

    Model: ClassVar[type[StoredModel]] = StoredModel

    models: list[StoredModel] = attrs.field(factory=list)


@attrs.frozen
class ModelTensor(_Subscriptable):
    """One tensor of a model's GGUF file, as `show()` lists it: its name, data type ("Q4_1", "F32", ...) and shape."""

    name: str
    type: str
    shape: list[int]  # GGUF order: the row length first


@attrs.frozen
class ShowResponse(_Subscriptable):
    """What `show()` tells about a model."""

    Tensor: ClassVar[type[ModelTensor]] = ModelTensor

    modified_at: _dt.datetime
    template: str
    modelfile: str
    license: str
    details: ModelDetails
    modelinfo: dict[str, Any]
    parameters: str
    capabilities: list[str]
    system: str = ""
    messages: list[dict[str, Any]] = attrs.field(factory=list)
    tensors: list[ModelTensor] = attrs.field(factory=list)  # every tensor of the model's GGUF, as Ollama lists them
    projector_info: dict[str, Any] | None = None  # the metadata of the model's projector, when it has one

    #: Fields whose name in Ollama's JSON differs (the ollama client reads `model_info` into `modelinfo`).
    json_names: ClassVar[Mapping[str, str]] = {"modelinfo": "model_info"}

    @property
    def model_info(self) -> dict[str, Any]:
        """`modelinfo` under its name in Ollama's JSON (and in earlier versions of localllm)."""
        return self.modelinfo


@attrs.frozen
class ProcessModel(_Subscriptable):
    """A loaded model, as `ps()` reports it."""

    name: str
    model: str
    size: int
    size_vram: int
    digest: str = ""
    details: ModelDetails | None = None
    expires_at: _dt.datetime | None = None
    context_length: int = 0
    gpu_layers: int = 0
    layers_per_device: dict[int, int] = attrs.field(factory=dict)
    active_requests: int = 0
    prompt_cache_size: int = 0  # bytes of saved prompt states the model could start from
    pid: int | None = None  # the runner's own process, with isolation="process"; None: the engine's process


@attrs.frozen
class ProcessResponse(_Subscriptable):
    """What `ps()` returns: the loaded models."""

    Model: ClassVar[type[ProcessModel]] = ProcessModel

    models: list[ProcessModel] = attrs.field(factory=list)


def as_dict(value: Any) -> Any:
    """The JSON-ready form of a response or message, as Ollama's API writes it: fields that are None left out."""
    if attrs.has(type(value)):
        names: Mapping[str, str] = getattr(value, "json_names", {})
        return {names.get(k, k): as_dict(v) for k, v in attrs.asdict(value, recurse=False).items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    if isinstance(value, _dt.datetime):
        return iso_time(value)
    return value


@attrs.frozen
class EmbedResponse(_Subscriptable):
    """The answer of `embed` (Ollama's /api/embed): one L2-normalised vector per input, in order."""

    model: str
    embeddings: list[list[float]] = attrs.field(factory=list)
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


@attrs.frozen
class EmbeddingsResponse(_Subscriptable):
    """The answer of the legacy `embeddings` call (Ollama's /api/embeddings): one raw vector."""

    embedding: list[float] = attrs.field(factory=list)


# --------------------------------------------------------------------------- whole responses from their chunks


def combine_generate(chunks: Sequence[GenerateResponse]) -> GenerateResponse:
    """The whole response of a generate request, from its chunks (as a non-streamed request answers)."""
    from .errors import LocalLLMError

    if not chunks:
        raise LocalLLMError("the model returned no response")
    final = chunks[-1]
    text = "".join(c.response for c in chunks)
    thinking = "".join(c.thinking or "" for c in chunks) or None
    return attrs.evolve(final, response=text, thinking=thinking, logprobs=_all_logprobs(chunks))


def combine_chat(chunks: Sequence[ChatResponse]) -> ChatResponse:
    """The whole response of a chat request, from its chunks (as a non-streamed request answers)."""
    from .errors import LocalLLMError

    if not chunks:
        raise LocalLLMError("the model returned no response")
    final = chunks[-1]
    content = "".join(c.message.content for c in chunks)
    thinking = "".join(c.message.thinking or "" for c in chunks) or None
    calls: list[ToolCall] = [call for c in chunks for call in (c.message.tool_calls or ())]
    message = Message(role="assistant", content=content, thinking=thinking, tool_calls=tuple(calls) or None)
    return attrs.evolve(final, message=message, logprobs=_all_logprobs(chunks))


def _all_logprobs(chunks: Sequence[GenerateResponse] | Sequence[ChatResponse]) -> tuple[Logprob, ...] | None:
    """Every chunk's logprobs, in order: the whole response's, as Ollama gives them when not streaming."""
    return tuple(logprob for chunk in chunks for logprob in chunk.logprobs or ()) or None

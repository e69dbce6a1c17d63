"""The public data types. Field names and units follow Ollama's API (durations in ns)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "ChatResponse",
    "GenerateResponse",
    "Message",
    "ProcessModel",
    "ToolCall",
    "ToolCallFunction",
    "Usage",
    "as_dict",
    "now_iso",
]

ROLES = ("system", "user", "assistant", "tool")


def now_iso() -> str:
    """The current UTC time in Ollama's `created_at` format."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


class _Subscriptable:
    """Lets `chunk["message"]["content"]` work as it does with the ollama client."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


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


def _role(instance: Any, attribute: Any, value: str) -> None:
    if value not in ROLES:
        from .errors import InvalidRequest

        raise InvalidRequest(f"message role must be one of {', '.join(ROLES)}; got {value!r}")


@attrs.frozen
class Message(_Subscriptable):
    role: str = attrs.field(validator=_role)
    content: str = ""
    thinking: str | None = None
    images: tuple[str, ...] | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @classmethod
    def from_any(cls, value: Message | Mapping[str, Any]) -> Message:
        from .errors import InvalidRequest

        if isinstance(value, Message):
            return value
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
            images=tuple(value["images"]) if value.get("images") else None,
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
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


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
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


@attrs.frozen
class ProcessModel(_Subscriptable):
    """A loaded model, as `ps()` reports it."""

    name: str
    model: str
    size: int
    size_vram: int
    digest: str = ""
    details: Any = None
    expires_at: str | None = None
    context_length: int = 0
    gpu_layers: int = 0
    layers_per_device: dict[int, int] = attrs.field(factory=dict)
    active_requests: int = 0


def as_dict(value: Any) -> Any:
    """A JSON-ready dict of a response or message, dropping fields that are None."""
    if attrs.has(type(value)):
        return {k: as_dict(v) for k, v in attrs.asdict(value, recurse=False).items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [as_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    return value

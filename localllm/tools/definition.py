"""`Tool`: what the model sees of a tool (name, description, parameters schema) and the function behind it; `@tool`."""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, overload

import anyio
import attrs

from ..errors import ToolError
from .arguments import bind_arguments
from .schema import function_schema

__all__ = ["Tool", "tool"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolError(
            f"tool name {name!r} is invalid: use letters, digits, '_', '.' or '-' (at most 64), starting with a letter"
        )
    return name


@attrs.define
class Tool:
    """A function the model may call: its definition and (optionally) its implementation."""

    name: str = attrs.field(converter=_check_name)
    description: str = ""
    parameters: dict[str, Any] = attrs.field(factory=lambda: {"type": "object", "properties": {}})
    function: Callable[..., Any] | None = attrs.field(default=None, repr=False)
    needs_approval: bool = False
    timeout: float | None = None

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        needs_approval: bool = False,
        timeout: float | None = None,
    ) -> Tool:
        """Describe a typed Python function: its signature and docstring become the JSON schema."""
        if not callable(fn):
            raise ToolError(f"a tool must be callable, got {type(fn).__name__}")
        target = fn.func if isinstance(fn, functools.partial) else fn
        fn_name = name or getattr(target, "__name__", None) or type(fn).__name__
        schema = function_schema(fn, fn_name)
        return cls(
            name=fn_name,
            description=description if description is not None else schema.description,
            parameters=schema.parameters,
            function=fn,
            needs_approval=needs_approval,
            timeout=timeout,
        )

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        function: Callable[..., Any] | None = None,
        needs_approval: bool = False,
        timeout: float | None = None,
    ) -> Tool:
        """A tool from its JSON definition (`{"type": "function", "function": {...}}` or the inner object)."""
        if not isinstance(data, Mapping):
            raise ToolError(f"a tool definition must be a mapping, got {type(data).__name__}")
        if data.get("type", "function") != "function":
            raise ToolError(f"only function tools are supported, got type {data.get('type')!r}")
        fn = data.get("function", data)
        if not isinstance(fn, Mapping):
            raise ToolError("a tool definition's 'function' must be a mapping")
        if "name" not in fn:
            raise ToolError("a tool definition needs a function name")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, Mapping):
            raise ToolError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
        if params.get("type", "object") != "object":
            raise ToolError(f"tool {fn['name']!r}: parameters must describe an object, got type {params.get('type')!r}")
        props = params.get("properties", {})
        if props is not None and not isinstance(props, Mapping):
            raise ToolError(f"tool {fn['name']!r}: parameters.properties must be an object")
        required = params.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ToolError(f"tool {fn['name']!r}: parameters.required must be a list of names")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"tool {fn['name']!r}: description must be a string")
        return cls(
            name=fn["name"],
            description=description,
            parameters=json.loads(json.dumps(params)),
            function=function,
            needs_approval=needs_approval,
            timeout=timeout,
        )

    def to_dict(self) -> dict[str, Any]:
        """The Ollama/OpenAI function-tool definition."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def bind_arguments(self, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check a call's arguments against the function's signature and convert them to Python values."""
        if self.function is None:
            raise ToolError(f"tool {self.name!r} has no implementation")
        return bind_arguments(self.function, self.name, arguments)

    async def invoke(self, arguments: Mapping[str, Any] | None = None) -> Any:
        """Call the implementation: coroutine functions awaited, plain ones in a worker thread."""
        kwargs = self.bind_arguments(arguments)
        fn = self.function
        assert fn is not None
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
            return await fn(**kwargs)
        result = await anyio.to_thread.run_sync(functools.partial(fn, **kwargs), abandon_on_cancel=True)
        if inspect.isawaitable(result):
            result = await result
        return result


@overload
def tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    needs_approval: bool = False,
    timeout: float | None = None,
) -> Tool: ...


@overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    needs_approval: bool = False,
    timeout: float | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    needs_approval: bool = False,
    timeout: float | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorator: `@tool` or `@tool(needs_approval=True)` turns a function into a `Tool`."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, needs_approval=needs_approval, timeout=timeout)

    return wrap(fn) if fn is not None else wrap

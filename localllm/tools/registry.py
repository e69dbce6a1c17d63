"""Tools from whatever the caller passes (functions, `Tool`s, definition dicts), and `ToolRegistry`, tools by name."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import ToolError
from .definition import Tool

__all__ = ["ToolRegistry", "as_tool", "normalize_tools"]


def as_tool(item: object) -> Tool:
    """A `Tool` from a function, a `Tool`, a definition dict, or an object with a `to_dict()` definition."""
    if isinstance(item, Tool):
        return item
    if isinstance(item, Mapping):
        return Tool.from_dict(item)
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict) and not inspect.isfunction(item):
        data = to_dict()
        if isinstance(data, Mapping):
            return Tool.from_dict(data)
    if callable(item):
        return Tool.from_function(item)
    raise ToolError(f"cannot use {type(item).__name__} as a tool: pass a function, a Tool or a tool definition dict")


def normalize_tools(items: Iterable[Any] | None) -> list[Tool]:
    """Tools from functions, `Tool`s and definition dicts; names must be unique."""
    tools: list[Tool] = []
    seen: set[str] = set()
    for item in items or ():
        t = as_tool(item)
        if t.name in seen:
            raise ToolError(f"two tools are named {t.name!r}")
        seen.add(t.name)
        tools.append(t)
    return tools


class ToolRegistry:
    """Named tools, looked up when the model calls them."""

    def __init__(self, tools: Iterable[Any] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        for t in normalize_tools(tools):
            self._tools[t.name] = t

    def register(self, item: Any, *, replace: bool = False) -> Tool:
        """Add a function, `Tool` or definition dict; returns the `Tool`."""
        t = as_tool(item)
        if t.name in self._tools and not replace:
            raise ToolError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __getitem__(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            raise ToolError(f"no tool named {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def to_dicts(self) -> list[dict[str, Any]]:
        """The definitions to pass as a request's `tools`."""
        return [t.to_dict() for t in self._tools.values()]

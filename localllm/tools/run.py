"""Running one tool call: its result as text for the model, failures and timeouts as error messages."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import anyio
import attrs

from ..errors import ToolError
from .definition import Tool

__all__ = ["run_tool_call"]


def _to_text(result: Any) -> str:
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    if isinstance(result, bytes):
        return result.decode("utf-8", errors="replace")
    if attrs.has(type(result)):
        result = attrs.asdict(result)
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    dump = getattr(result, "model_dump", None)
    if callable(dump):
        result = dump()
    if isinstance(result, (dict, list, tuple, int, float, bool)):
        try:
            return json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            pass
    return str(result)


async def run_tool_call(tool: Tool, arguments: Mapping[str, Any] | None, *, timeout: float | None = 30) -> str:
    """Run one call and return its result as text; failures and timeouts become an error message."""
    try:
        if timeout is not None and timeout > 0:
            with anyio.fail_after(timeout):
                result = await tool.invoke(arguments)
        else:
            result = await tool.invoke(arguments)
    except TimeoutError:
        return f"error: tool {tool.name} timed out after {timeout:g} seconds"
    except ToolError as exc:
        return f"error: {exc}"
    except (Exception, SystemExit) as exc:  # a tool's failure is information for the model
        return f"error: {tool.name} raised {type(exc).__name__}: {exc}"
    try:
        return _to_text(result)
    except Exception as exc:
        return f"error: the result of {tool.name} could not be turned into text: {exc}"

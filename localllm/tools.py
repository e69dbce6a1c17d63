"""Tools for agents: Python functions as model tools, their execution, and the tool-calling loop.

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''Current weather for a city.

        Args:
            city: The city name.
            unit: Temperature unit.
        '''

    async for event in agent_loop(engine, "qwen3", messages, [get_weather]):
        if event.kind == "content":
            print(event.content, end="")

A `Tool` carries the OpenAI/Ollama function definition (name, description,
JSON schema of the parameters) and, optionally, the Python callable that
implements it. `run_tool_call` runs one call — coroutine functions awaited,
plain functions in a worker thread — under a timeout, and always returns text:
a failure becomes an error message for the model, never an exception.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import inspect
import json
import re
import types
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Literal

import anyio
import attrs

from .errors import ToolError
from .types import Message, ToolCall

__all__ = [
    "DEFAULT_SHELL_DENY",
    "AgentEvent",
    "Tool",
    "ToolRegistry",
    "agent_loop",
    "make_shell_tool",
    "normalize_tools",
    "run_tool_call",
    "tool",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


# --------------------------------------------------------------------------------------------------------------------
# Docstrings


@attrs.frozen
class _Doc:
    description: str
    params: dict[str, str]


_SECTION = re.compile(
    r"^(args|arguments|parameters|params|keyword args|keyword arguments|other parameters|returns?|yields?|raises?|"
    r"examples?|notes?|see also|warnings?|attributes|references|todo)\s*:?\s*$",
    re.I,
)
_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments", "other parameters"}


def _parse_docstring(doc: str | None) -> _Doc:
    """Summary and parameter descriptions from a Google, Sphinx or NumPy style docstring."""
    if not doc:
        return _Doc("", {})
    lines = inspect.cleandoc(doc).splitlines()
    params: dict[str, str] = {}
    desc_lines: list[str] = []
    section: str | None = None
    numpy_style = False
    current: str | None = None
    base_indent = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        sphinx = re.match(r"^:(?:param|parameter|arg|argument|key|keyword)\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$", stripped)
        if sphinx:
            section, current = "sphinx", sphinx.group(1)
            params[current] = sphinx.group(2).strip()
            i += 1
            continue
        if re.match(r"^:(type|rtype|returns?|raises?)\b", stripped):
            section, current = "sphinx-other", None
            i += 1
            continue
        underline = i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip() or "x")
        header = _SECTION.match(stripped)
        if header and (stripped.endswith(":") or underline):
            section = header.group(1).lower()
            numpy_style = bool(underline)
            current = None
            base_indent = -1
            i += 2 if underline else 1
            continue
        if section is None:
            desc_lines.append(line)
        elif section in _PARAM_SECTIONS:
            if stripped:
                indent = len(line) - len(line.lstrip())
                if base_indent < 0:
                    base_indent = indent
                google = re.match(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
                numpy = re.match(r"^\*{0,2}(\w+)\s*(?::.*)?$", stripped)
                if indent <= base_indent and numpy_style and numpy:
                    current = numpy.group(1)  # "name : type"; the description follows, indented
                    params[current] = ""
                elif indent <= base_indent and google:
                    current = google.group(1)
                    params[current] = google.group(2).strip()
                elif indent <= base_indent and re.match(r"^\w+$", stripped):
                    current = stripped
                    params[current] = ""
                elif current is not None:
                    params[current] = (params[current] + " " + stripped).strip()
        elif section == "sphinx" and current is not None and stripped:
            params[current] = (params[current] + " " + stripped).strip()
        i += 1
    paragraphs = re.split(r"\n\s*\n", "\n".join(desc_lines).strip())
    description = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    return _Doc(description, params)


# --------------------------------------------------------------------------------------------------------------------
# Type hints -> JSON schema


def _is_typeddict(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, dict) and hasattr(tp, "__annotations__") and hasattr(tp, "__total__")


def _with_null(schema: dict[str, Any]) -> dict[str, Any]:
    t = schema.get("type")
    if isinstance(t, str) and set(schema) <= {"type", "description", "items", "properties", "required"}:
        return {**schema, "type": [t, "null"]}
    if isinstance(t, list) and "null" not in t:
        return {**schema, "type": [*t, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _schema_for(tp: Any, seen: frozenset[Any] = frozenset()) -> dict[str, Any]:
    """A JSON schema for a type annotation."""
    if tp is inspect.Parameter.empty or tp is Any or tp is object:
        return {}
    if tp is None or tp is type(None):
        return {"type": "null"}
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        schema = _schema_for(args[0], seen)
        text = next((a for a in args[1:] if isinstance(a, str)), None)
        return {**schema, "description": text} if text else schema
    if origin is Literal:
        values = [v.value if isinstance(v, enum.Enum) else v for v in args]
        kinds = {_json_type(v) for v in values}
        if len(kinds) == 1 and None not in kinds:
            return {"type": kinds.pop(), "enum": values}
        return {"enum": values}
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        members = [a for a in args if a is not type(None)]
        nullable = len(members) != len(args)
        if len(members) == 1:
            inner = _schema_for(members[0], seen)
            return _with_null(inner) if nullable else inner
        any_of = [_schema_for(m, seen) for m in members]
        if nullable:
            any_of.append({"type": "null"})
        return {"anyOf": any_of}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is _dt.datetime:
        return {"type": "string", "format": "date-time"}
    if tp is _dt.date:
        return {"type": "string", "format": "date"}
    if tp is _dt.time:
        return {"type": "string", "format": "time"}
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return {"type": "string"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]
        kinds = {_json_type(v) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 and None not in kinds else {"enum": values}
    if origin in (list, set, frozenset, Sequence, Iterable):
        return {"type": "array", "items": _schema_for(args[0], seen) if args else {}}
    if tp in (list, set, frozenset, tuple):
        return {"type": "array"}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_for(args[0], seen)}
        items = [_schema_for(a, seen) for a in args]
        return {"type": "array", "prefixItems": items, "minItems": len(items), "maxItems": len(items)}
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict,):
        if len(args) == 2 and args[1] is not Any:
            return {"type": "object", "additionalProperties": _schema_for(args[1], seen)}
        return {"type": "object"}
    if isinstance(tp, type):
        if tp in seen:
            return {"type": "object"}
        if _is_typeddict(tp):
            hints = typing.get_type_hints(tp, include_extras=True)
            required = sorted(getattr(tp, "__required_keys__", set(hints)), key=list(hints).index)
            doc = _parse_docstring(tp.__doc__)
            return _object_schema({k: (v, doc.params.get(k, "")) for k, v in hints.items()}, required, seen | {tp})
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp, include_extras=True)
            doc = _parse_docstring(tp.__doc__)
            fields = [f for f in dataclasses.fields(tp) if f.init]
            required = [
                f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
            return _object_schema(
                {f.name: (hints.get(f.name, Any), doc.params.get(f.name, "")) for f in fields}, required, seen | {tp}
            )
        if attrs.has(tp):
            hints = typing.get_type_hints(tp, include_extras=True)
            doc = _parse_docstring(tp.__doc__)
            afields = [a for a in attrs.fields(tp) if a.init]
            required = [a.alias or a.name for a in afields if a.default is attrs.NOTHING]
            return _object_schema(
                {(a.alias or a.name): (hints.get(a.name, a.type or Any), doc.params.get(a.name, "")) for a in afields},
                required,
                seen | {tp},
            )
        schema_fn = getattr(tp, "model_json_schema", None)
        if callable(schema_fn):  # pydantic models describe themselves
            result = schema_fn()
            if isinstance(result, dict):
                return result
    raise ToolError(f"cannot describe the type {tp!r} as a JSON schema")


def _json_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _object_schema(fields: dict[str, tuple[Any, str]], required: list[str], seen: frozenset[Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, (tp, desc) in fields.items():
        schema = _schema_for(tp, seen)
        if desc and "description" not in schema:
            schema = {**schema, "description": desc}
        props[name] = schema
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


# --------------------------------------------------------------------------------------------------------------------
# Converting arguments back to Python values


def _convert(value: Any, tp: Any) -> Any:
    """Coerce a JSON value to an annotated Python type, where that is unambiguous."""
    if tp is inspect.Parameter.empty or tp is Any or value is None:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _convert(value, args[0])
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        members = [a for a in args if a is not type(None)]
        for m in members:
            try:
                converted = _convert(value, m)
            except (TypeError, ValueError, ToolError):
                continue
            if _matches(converted, m):
                return converted
        return value
    if origin is Literal:
        return value
    if tp is int and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp in (_dt.datetime, _dt.date, _dt.time) and isinstance(value, str):
        return tp.fromisoformat(value)
    if isinstance(tp, type) and issubclass(tp, PurePath) and isinstance(value, str):
        return tp(value)
    if origin in (list, set, frozenset, Sequence, typing.Sequence, Iterable) and isinstance(value, list):
        items = [_convert(v, args[0]) for v in value] if args else value
        return set(items) if origin is set else frozenset(items) if origin is frozenset else list(items)
    if origin is tuple and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        return tuple(_convert(v, a) for v, a in zip(value, args, strict=False)) if args else tuple(value)
    if origin in (dict, Mapping, typing.Mapping) and isinstance(value, dict) and len(args) == 2:
        return {k: _convert(v, args[1]) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, dict):
        if _is_typeddict(tp):
            hints = typing.get_type_hints(tp)
            return {k: _convert(v, hints.get(k, Any)) for k, v in value.items()}
        if dataclasses.is_dataclass(tp) or attrs.has(tp):
            hints = typing.get_type_hints(tp)
            return tp(**{k: _convert(v, hints.get(k, Any)) for k, v in value.items()})
        validate = getattr(tp, "model_validate", None)
        if callable(validate):
            return validate(value)
    return value


def _matches(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) is not None or not isinstance(tp, type):
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if _is_typeddict(tp):
        return isinstance(value, dict)
    return isinstance(value, tp)


# --------------------------------------------------------------------------------------------------------------------
# Tool


def _type_hints(target: Any, signature: inspect.Signature, fn_name: str) -> dict[str, Any]:
    """The function's resolved annotations; names that cannot be resolved are reported per parameter."""
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:
        pass
    namespace = {**vars(typing), **getattr(target, "__globals__", {})}
    hints: dict[str, Any] = {}
    for param in signature.parameters.values():
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # the function's own annotation text
            except Exception:
                raise ToolError(
                    f"{fn_name}: cannot resolve the type {annotation!r} of parameter {param.name!r} "
                    "(define it at module level)"
                ) from None
        hints[param.name] = annotation
    return hints


def _check_name(name: Any) -> str:
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
        target = fn
        if isinstance(fn, functools.partial):
            target = fn.func
        fn_name = name or getattr(target, "__name__", None) or type(fn).__name__
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ToolError(f"cannot read the signature of {fn_name}: {exc}") from None
        hints = _type_hints(target, signature, fn_name)
        doc = _parse_docstring(inspect.getdoc(fn) if not isinstance(fn, functools.partial) else target.__doc__)
        props: dict[str, Any] = {}
        required: list[str] = []
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.kind == param.POSITIONAL_ONLY:
                raise ToolError(f"{fn_name}: positional-only parameter {param.name!r} cannot be passed by name")
            try:
                schema = _schema_for(hints.get(param.name, param.annotation))
            except ToolError as exc:
                raise ToolError(f"{fn_name}, parameter {param.name!r}: {exc}") from None
            if doc.params.get(param.name) and "description" not in schema:
                schema = {**schema, "description": doc.params[param.name]}
            props[param.name] = schema
            if param.default is param.empty:
                required.append(param.name)
        parameters: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            parameters["required"] = required
        return cls(
            name=fn_name,
            description=description if description is not None else doc.description,
            parameters=parameters,
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
        arguments = dict(arguments or {})
        try:
            signature = inspect.signature(self.function)
        except (TypeError, ValueError):
            return arguments
        target = self.function.func if isinstance(self.function, functools.partial) else self.function
        try:
            hints = _type_hints(target, signature, self.name)
        except ToolError:
            hints = {}
        params = signature.parameters
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        unknown = [k for k in arguments if k not in params or params[k].kind in (params[k].VAR_POSITIONAL,)]
        if unknown and not takes_kwargs:
            raise ToolError(f"unexpected argument(s) for {self.name}: {', '.join(sorted(unknown))}")
        missing = [
            p.name
            for p in params.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in arguments
        ]
        if missing:
            raise ToolError(f"missing required argument(s) for {self.name}: {', '.join(missing)}")
        bound = {}
        for key, value in arguments.items():
            annotation = hints.get(key, params[key].annotation if key in params else Any)
            try:
                bound[key] = _convert(value, annotation)
            except (TypeError, ValueError) as exc:
                raise ToolError(f"argument {key!r} of {self.name}: {exc}") from None
        return bound

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


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    needs_approval: bool = False,
    timeout: float | None = None,
) -> Any:
    """Decorator: `@tool` or `@tool(needs_approval=True)` turns a function into a `Tool`."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, needs_approval=needs_approval, timeout=timeout)

    return wrap(fn) if fn is not None else wrap


def _as_tool(item: Any) -> Tool:
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
        t = _as_tool(item)
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
        t = _as_tool(item)
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


# --------------------------------------------------------------------------------------------------------------------
# Running calls


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


# --------------------------------------------------------------------------------------------------------------------
# The agent loop

EventKind = Literal["thinking", "content", "tool_call", "tool_result", "final"]


@attrs.frozen
class AgentEvent:
    """One step of `agent_loop`.

    kind "thinking"/"content": a streamed chunk (`content`/`thinking`); "tool_call": the model asked for
    `call`; "tool_result": `result` of `call` (`approved` False when it was refused); "final": the last
    reply (`content`, `response` the final chunk, `messages` the whole conversation, `done_reason`
    "stop" or "max_rounds").
    """

    kind: EventKind
    round: int
    content: str = ""
    thinking: str = ""
    call: ToolCall | None = None
    result: str | None = None
    approved: bool | None = None
    response: Any = None
    messages: tuple[dict[str, Any], ...] = ()
    done_reason: str | None = None


Approver = Callable[[ToolCall], "bool | Awaitable[bool]"]


def _message_dict(m: Any) -> dict[str, Any]:
    if isinstance(m, Message):
        data: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.thinking:
            data["thinking"] = m.thinking
        if m.images:
            data["images"] = list(m.images)
        if m.tool_calls:
            data["tool_calls"] = [_call_dict(c) for c in m.tool_calls]
        if m.tool_name:
            data["tool_name"] = m.tool_name
        if m.tool_call_id:
            data["tool_call_id"] = m.tool_call_id
        return data
    if isinstance(m, Mapping):
        return dict(m)
    raise ToolError(f"a message must be a mapping or a Message, got {type(m).__name__}")


def _call_dict(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.function.name, "arguments": dict(call.function.arguments), "index": call.function.index}
    data: dict[str, Any] = {"function": function}
    if call.id:
        data["id"] = call.id
    return data


async def _ask(approve: Approver | None, call: ToolCall) -> bool:
    if approve is None:
        return False
    answer = approve(call)
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


async def agent_loop(
    engine: Any,
    model: str,
    messages: Iterable[Any],
    tools: Iterable[Any] | ToolRegistry,
    *,
    max_rounds: int = 8,
    approve: Approver | None = None,
    timeout: float | None = 30,
    options: Mapping[str, Any] | None = None,
    **chat_kwargs: Any,
) -> AsyncIterator[AgentEvent]:
    """Chat, run the tools the model calls, feed the results back, and repeat until it answers.

    Each round is one `engine.chat` call. Tools marked `needs_approval` run only when `approve(call)`
    (a function or coroutine function) says yes; without an `approve` they are refused. Unknown tools,
    refusals, failures and timeouts become tool messages the model can read. Extra keyword arguments
    (`think`, `format`, `keep_alive`, `tool_choice`) are passed to `engine.chat`; `tool_choice` only to
    the first round, so a model made to call a tool first can still answer afterwards.
    """
    if max_rounds < 1:
        raise ToolError("max_rounds must be at least 1")
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
    history: list[dict[str, Any]] = [_message_dict(m) for m in messages]
    definitions = registry.to_dicts()
    for round_ in range(1, max_rounds + 1):
        kwargs = dict(chat_kwargs)
        if round_ > 1:
            kwargs.pop("tool_choice", None)  # a forced first call; afterwards the model may answer
        if options is not None:
            kwargs["options"] = options
        stream = engine.chat(model, list(history), tools=definitions, **kwargs)
        content: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        final_chunk: Any = None
        async for chunk in stream:
            message = chunk.message
            if getattr(message, "thinking", None):
                thinking.append(message.thinking)
                yield AgentEvent("thinking", round_, thinking=message.thinking)
            if message.content:
                content.append(message.content)
                yield AgentEvent("content", round_, content=message.content)
            for call in message.tool_calls or ():
                calls.append(call if isinstance(call, ToolCall) else ToolCall.from_dict(call))
            if chunk.done:
                final_chunk = chunk
        reply: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if thinking:
            reply["thinking"] = "".join(thinking)
        if calls:
            reply["tool_calls"] = [_call_dict(c) for c in calls]
        if not calls or round_ == max_rounds:
            history.append(reply)
            yield AgentEvent(
                "final",
                round_,
                content=reply["content"],
                thinking=reply.get("thinking", ""),
                response=final_chunk,
                messages=tuple(history),
                done_reason="stop" if not calls else "max_rounds",
            )
            return
        history.append(reply)
        for call in calls:
            yield AgentEvent("tool_call", round_, call=call)
            name = call.function.name
            impl = registry.get(name)
            approved: bool | None = None
            if impl is None:
                result = f"error: there is no tool named {name!r}"
            elif impl.function is None:
                result = f"error: tool {name!r} has no implementation here"
            elif impl.needs_approval and not (approved := await _ask(approve, call)):
                result = f"denied: the user did not approve running {name}"
            else:
                result = await run_tool_call(impl, call.function.arguments, timeout=impl.timeout or timeout)
            tool_message: dict[str, Any] = {"role": "tool", "content": result, "tool_name": name}
            if call.id:
                tool_message["tool_call_id"] = call.id
            history.append(tool_message)
            yield AgentEvent("tool_result", round_, call=call, result=result, approved=approved)


# --------------------------------------------------------------------------------------------------------------------
# A shell tool with a deny-list

DEFAULT_SHELL_DENY: tuple[str, ...] = (
    r"\brm\s+(-[a-zA-Z]*[rf][a-zA-Z]*\s+)+(/|~|\*|\$HOME)(\s|$)",
    r"\bmkfs(\.\w+)?\b",
    r"\bdd\s+.*\bof=/dev/",
    r">\s*/dev/(sd|nvme|hd|vd)",
    r"\b(shutdown|reboot|halt|poweroff)\b",
    r":\(\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:",
    r"\bchmod\s+(-R\s+)?[0-7]*777\s+/(\s|$)",
    r"\b(curl|wget)\b[^|]*\|\s*(sudo\s+)?(ba|z|da)?sh\b",
    r"\bsudo\b",
)


def make_shell_tool(
    *,
    deny: Iterable[str] = DEFAULT_SHELL_DENY,
    cwd: str | None = None,
    timeout: float | None = 30,
    needs_approval: bool = True,
    max_output: int = 20_000,
    name: str = "run_shell",
) -> Tool:
    """A tool that runs a shell command, refusing any command that matches a deny pattern (regular expressions).

    It asks for approval by default; the deny-list applies even to approved calls.
    """
    patterns = [re.compile(p) for p in deny]

    async def run_shell(command: str) -> str:
        """Run a shell command and return its exit status and output.

        Args:
            command: The command line to run with /bin/sh.
        """
        if not isinstance(command, str) or not command.strip():
            return "error: empty command"
        for pattern in patterns:
            if pattern.search(command):
                return f"error: command refused by policy (matches {pattern.pattern!r})"
        result = await anyio.run_process(["/bin/sh", "-c", command], cwd=cwd, check=False)
        output = (result.stdout or b"").decode("utf-8", errors="replace")
        errors = (result.stderr or b"").decode("utf-8", errors="replace")
        text = output + (("\n" if output and not output.endswith("\n") else "") + errors if errors else "")
        if len(text) > max_output:
            text = text[:max_output] + f"\n... ({len(text) - max_output} more characters)"
        return f"exit status {result.returncode}\n{text}"

    return Tool.from_function(run_shell, name=name, needs_approval=needs_approval, timeout=timeout)

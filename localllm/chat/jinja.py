"""Hugging Face style Jinja chat templates, rendered in a metered sandbox.

Jinja runs in an immutable sandbox, and every loop item, call, lookup, operator and written piece
of text is charged to the render's `RenderBudget`; filters and string methods whose output can be
far larger than their input are refused before they run when it would exceed the output limit.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import re
import string
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import attrs
import jinja2
from jinja2 import nodes
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from ..errors import TemplateError
from .base import ChatTemplate, TemplateMessage, Think, ToolSpec
from .limits import RenderBudget, TemplateLimits, current_budget, render_budget
from .thinking import KNOWN_THINKING_TAGS, known_thinking_tags

__all__ = ["JinjaTemplate", "jinja_thinking_tags"]

# Numbers a template computes stay printable: Python refuses to print longer ints anyway, and
# multiplying ints of millions of digits holds the interpreter for seconds.
MAX_NUMBER_DIGITS = 4300

# Signs that a Jinja template can think without naming its tags: it then uses the most common pair.
_THINKING_HINTS = re.compile(r"enable_thinking|reasoning_content|\.thinking\b|\[['\"]thinking['\"]\]")


def jinja_thinking_tags(source: str) -> tuple[str, str] | None:
    """The thinking tags of a Jinja template: a known pair in its text, else `<think>` when it hints at thinking."""
    known = known_thinking_tags(source)
    if known is not None:
        return known
    return KNOWN_THINKING_TAGS[0] if _THINKING_HINTS.search(source) else None


def _thinking_variables(think: Think) -> dict[str, object]:
    """A request's `think` as the variables Hugging Face templates read (`enable_thinking`, `reasoning_effort`)."""
    if think is None:
        return {}
    if think is False:
        return {"enable_thinking": False}
    variables: dict[str, object] = {"enable_thinking": True}
    if isinstance(think, str):
        variables["reasoning_effort"] = think
    return variables


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template raised: {message}")


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


# --------------------------------------------------------------------------------------------------------------------
# Sizes of what a filter or string method will build, estimated from its arguments before it runs, for the
# operations whose output can be far larger than their input.


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _padded(value: Any, width: Any = 80, *_: Any, **__: Any) -> int:
    return max(len(str(value)), _count(width))


def _indented(value: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    text = str(value)
    pad = len(width) if isinstance(width, str) else _count(width)
    return len(text) + (text.count("\n") + 1) * pad


def _tab_expanded(value: Any, tabsize: Any = 8, *_: Any, **__: Any) -> int:
    text = str(value)
    return len(text) + text.count("\t") * _count(tabsize)


def _replaced(value: Any, old: Any = "", new: Any = "", count: Any = None, *_: Any, **__: Any) -> int:
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if _count(count) > 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _joined(items: Any, separator: Any = "", *_: Any, **__: Any) -> int:
    if not isinstance(items, (list, tuple)):
        return 0  # an iterator cannot be measured without consuming it; its result is checked after
    return sum(len(i) for i in items if isinstance(i, str)) + len(str(separator)) * max(len(items) - 1, 0)


def _translated(value: Any, table: Any = None, *_: Any, **__: Any) -> int:
    replacements = table.values() if isinstance(table, Mapping) else ()
    return len(str(value)) * max((len(r) for r in replacements if isinstance(r, str)), default=1)


def _wrapped(value: Any, width: Any = 79, breaks: Any = True, wrapstring: Any = None, *_: Any, **__: Any) -> int:
    text = str(value)
    return len(text) + (len(text) // max(_count(width), 1) + 1) * len(str(wrapstring or "\n"))


_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?")


def _percent_formatted(value: Any, *args: Any, **kwargs: Any) -> int:
    """The widest field of a %-format: its widths and precisions (a `*` takes one from the arguments)."""
    numbers = [*args, *kwargs.values()]
    if len(numbers) == 1 and isinstance(numbers[0], tuple):
        numbers = list(numbers[0])
    widest = 0
    for field in _PERCENT_FIELD.finditer(str(value)):
        for size in field.groups():
            if size == "*":
                widest = max([widest, *(abs(n) for n in numbers if _count(n))])
            elif size:
                widest = max(widest, int(size))
    return widest


def _brace_formatted(text: str, values: Iterable[Any]) -> int:
    """The widest field of a `str.format` text; a width taken from an argument may be any integer argument."""
    widest = 0
    for _, _, spec, _ in string.Formatter().parse(text):
        if spec:
            widest = max([widest, *(int(n) for n in re.findall(r"\d+", spec))])
            if "{" in spec:
                widest = max([widest, *(abs(v) for v in values if _count(v))])
    return widest


_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "batch": lambda value, linecount=0, *_, **__: _count(linecount),
    "center": _padded,
    "format": _percent_formatted,
    "indent": _indented,
    "join": _joined,
    "replace": _replaced,
    "slice": lambda value, slices=0, *_, **__: _count(slices),
    "tojson": lambda value, indent=None, *_, **__: _count(indent),
    "wordwrap": _wrapped,
}

_STR_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": _padded,
    "ljust": _padded,
    "rjust": _padded,
    "zfill": _padded,
    "expandtabs": _tab_expanded,
    "replace": _replaced,
    "join": lambda separator, items=(), *_, **__: _joined(items, separator),
    "translate": _translated,
}


def _number_digits(operator: str, left: Any, right: Any) -> float:
    """About how many decimal digits an integer `*` or `**` will produce."""
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (left, right)):
        return 0
    if operator == "*":
        bits = left.bit_length() + right.bit_length()
    elif operator == "**" and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
    else:
        return 0
    return bits * math.log10(2)


def _binop_size(operator: str, left: Any, right: Any) -> int:
    if operator == "*":
        for sequence, times in ((left, right), (right, left)):
            if isinstance(sequence, (str, list, tuple)) and _count(times):
                return len(sequence) * times
    if operator == "%" and isinstance(left, str):
        return _percent_formatted(left, right)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# The metered sandbox


def _counted(budget: RenderBudget, items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        budget.step()
        yield item


# Names no template can write, for the filters the metering inserts.
_ITERATE = "localllm:iterate"
_WRITE = "localllm:write"
_BUILT = "localllm:built"


@jinja2.pass_context  # never folded at compile time: what it counts belongs to one render
def _iterate_filter(context: Context, items: Iterable[Any]) -> Iterator[Any]:
    return _counted(current_budget(), items)


@jinja2.pass_context
def _write_filter(context: Context, value: Any) -> str:
    text = str(value)
    current_budget().write(len(text))
    return text


@jinja2.pass_context
def _built_filter(context: Context, value: Any) -> Any:
    return current_budget().checked(value)


class _Metering(NodeTransformer):
    """Routes every loop's items, every piece of written text and every `~` through the budget.

    Counting writes where they happen bounds text kept in macros and `{% set %}` blocks, not only
    the prompt.
    """

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _filtered(_ITERATE, node.iter)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [_filtered(_WRITE, child) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _filtered(_BUILT, node)


def _filtered(name: str, node: nodes.Node) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


def _metered_filter(filter_: Callable[..., Any], estimate: Callable[..., int] | None) -> Callable[..., Any]:
    passed = 1 if hasattr(filter_, "jinja_pass_arg") else 0  # the context or environment Jinja passes first

    @functools.wraps(filter_)  # keeps the pass-argument marker too
    def metered(*args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        value = args[passed] if len(args) > passed else None
        # A filter works through a collection in one call: it costs a step per item.
        budget.step(len(value) if isinstance(value, Sized) and not isinstance(value, str) else 1)
        if estimate is not None:
            budget.check_size(estimate(*args[passed:], **kwargs))
        return budget.checked(filter_(*args, **kwargs))

    return metered


def _range(*args: int) -> range:
    items = range(*args)
    limits = current_budget().limits
    # len() overflows past sys.maxsize; the arithmetic does not.
    size = max(0, (items.stop - items.start + items.step - (1 if items.step > 0 else -1)) // items.step)
    if size > limits.max_steps:
        raise limits.exceeded("max_steps", f"asks for a range of {size:,} numbers")
    return items


class _MeteredSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with each call, lookup, loop item, operator and written text charged to the render."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters["tojson"] = _tojson
        self.filters = {name: _metered_filter(f, _FILTER_SIZES.get(name)) for name, f in self.filters.items()}
        self.filters.update({_ITERATE: _iterate_filter, _WRITE: _write_filter, _BUILT: _built_filter})
        del self.globals["lipsum"]  # builds any amount of text in one call, and no chat template needs it
        self.globals.update(range=_range, raise_exception=_raise_exception, strftime_now=_strftime_now)

    def metered(self, source: str) -> jinja2.Template:
        tree = _Metering().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.step()
        if isinstance(obj, LoopContext) and args:  # a recursive loop's next level: its items count too
            args = (_counted(budget, args[0]), *args[1:])
        elif isinstance(obj, types.BuiltinMethodType) and isinstance(obj.__self__, str):
            estimate = _STR_METHOD_SIZES.get(obj.__name__)
            if estimate is not None:
                budget.check_size(estimate(obj.__self__, *args, **kwargs))
        return budget.checked(super().call(context, obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        current_budget().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        current_budget().step()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = current_budget()
        budget.step()
        budget.check_size(_binop_size(operator, left, right))
        digits = _number_digits(operator, left, right)
        if digits > MAX_NUMBER_DIGITS:
            raise TemplateError(
                f"chat template computes a number of about {digits:,.0f} digits; "
                f"numbers are limited to {MAX_NUMBER_DIGITS} digits"
            )
        return budget.checked(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        format_ = super().wrap_str_format(value)
        if format_ is None:
            return None
        text: str = value.__self__
        takes_mapping = value.__name__ == "format_map"

        @functools.wraps(format_)
        def checked_format(*args: Any, **kwargs: Any) -> str:
            budget = current_budget()
            mapping = takes_mapping and args and isinstance(args[0], Mapping)
            budget.check_size(_brace_formatted(text, args[0].values() if mapping else [*args, *kwargs.values()]))
            return str(budget.checked(format_(*args, **kwargs)))

        return checked_format


@attrs.define
class JinjaTemplate(ChatTemplate):
    """A Hugging Face style Jinja chat template, rendered in a metered sandbox."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    limits: TemplateLimits | None = attrs.field(default=None, kw_only=True)  # None: `TemplateLimits()` per render
    _compiled: jinja2.Template = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        env = _MeteredSandbox(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        try:
            self._compiled = env.metered(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None
        except Exception as exc:  # untrusted text: a number too long to read, nesting too deep, ...
            raise TemplateError(f"chat template failed to compile: {type(exc).__name__}: {exc}") from None

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.source

    def thinking_tags(self) -> tuple[str, str] | None:
        return jinja_thinking_tags(self.source)

    def render(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        think: Think = None,
        **variables: object,
    ) -> str:
        with render_budget(self.limits if self.limits is not None else TemplateLimits()):
            try:
                return self._compiled.render(
                    messages=[dict(m) for m in messages],
                    tools=list(tools) if tools else None,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token,
                    eos_token=self.eos_token,
                    **{**_thinking_variables(think), **variables},
                )
            except (TemplateError, MemoryError, RecursionError):
                raise
            except jinja2.TemplateError as exc:
                line = getattr(exc, "lineno", None)
                where = f" at line {line}" if line else ""
                raise TemplateError(f"chat template failed{where}: {exc}") from None
            except Exception as exc:  # a template is untrusted code: any failure is the template's
                raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None

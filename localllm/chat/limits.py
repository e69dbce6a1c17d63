"""How far one template render may go, and the budget a render spends.

A render runs in a worker thread, which cannot be stopped from outside, so the limits are checked
inside the render itself: every loop iteration, call and lookup spends a step, every written
character counts against the output limit, and each step checks the deadline.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs

from ..errors import InvalidOptions, TemplateError

__all__ = ["RenderBudget", "TemplateLimits", "current_budget", "render_budget"]

_Value = TypeVar("_Value")
_Number = TypeVar("_Number", int, float)

DEFAULT_TIMEOUT = 2.0
DEFAULT_MAX_STEPS = 4_000_000
DEFAULT_MAX_OUTPUT = 8 * 1024 * 1024

# Per limit: the environment variable that sets its default, and what it counts.
_LIMITS: dict[str, tuple[str, str, str]] = {
    "timeout": ("LOCALLLM_TEMPLATE_TIMEOUT", "time", "seconds"),
    "max_steps": ("LOCALLLM_TEMPLATE_MAX_STEPS", "step", "steps (loop iterations, calls and lookups)"),
    "max_output": ("LOCALLLM_TEMPLATE_MAX_OUTPUT", "output", "characters"),
}


def _from_env(field: str, parse: Callable[[str], _Number], default: _Number) -> _Number:
    variable, _, unit = _LIMITS[field]
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value: _Number | None = parse(text)
    except ValueError:
        value = None
    if value is None or not value > 0:  # NaN too
        kind = "number of" if parse is float else "whole number of"
        raise InvalidOptions(f"{variable} must be a positive {kind} {unit.split(' ')[0]}, got {text!r}")
    return value


def _check_limit(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    kinds = (int, float) if attribute.name == "timeout" else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "number" if attribute.name == "timeout" else "whole number"
        raise InvalidOptions(f"TemplateLimits.{attribute.name} must be a positive {kind}, got {value!r}")


@attrs.frozen
class TemplateLimits:
    """How far one template render may go; exceeding a limit raises `TemplateError`.

    Defaults come from `LOCALLLM_TEMPLATE_TIMEOUT` (seconds), `LOCALLLM_TEMPLATE_MAX_STEPS` and
    `LOCALLLM_TEMPLATE_MAX_OUTPUT` (characters), read when the limits are made, else 2 s, 4 million
    steps and 8 MiB: real chat templates, long conversations with tools included, stay far below.
    """

    timeout: float = attrs.field(factory=lambda: _from_env("timeout", float, DEFAULT_TIMEOUT), validator=_check_limit)
    max_steps: int = attrs.field(factory=lambda: _from_env("max_steps", int, DEFAULT_MAX_STEPS), validator=_check_limit)
    max_output: int = attrs.field(
        factory=lambda: _from_env("max_output", int, DEFAULT_MAX_OUTPUT), validator=_check_limit
    )

    def exceeded(self, field: str, detail: str = "") -> TemplateError:
        """The error for going over one limit, naming it and how to raise it."""
        variable, name, unit = _LIMITS[field]
        value = getattr(self, field)
        amount = f"{value:g}" if field == "timeout" else f"{value:,}"
        what = f"{detail}, over" if detail else "exceeded"
        return TemplateError(
            f"chat template {what} its {name} limit of {amount} {unit}; "
            f"raise it with {variable} or TemplateLimits({field}=...)"
        )


class RenderBudget:
    """One render's spending of its limits: steps taken, characters written, the deadline."""

    __slots__ = ("deadline", "limits", "steps", "written")

    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.steps = 0
        self.written = 0
        self.deadline = time.monotonic() + limits.timeout

    def step(self, count: int = 1) -> None:
        """Spend steps; the deadline is checked with every step, so a runaway loop stops itself."""
        self.steps += count
        if self.steps > self.limits.max_steps:
            raise self.limits.exceeded("max_steps")
        if time.monotonic() > self.deadline:
            raise self.limits.exceeded("timeout")

    def write(self, size: int) -> None:
        """Account for text the template writes, before it is kept."""
        self.written += size
        if self.written > self.limits.max_output:
            raise self.limits.exceeded("max_output")

    def check_size(self, size: int) -> None:
        """Refuse to build one value (a string, a list, a padded field) larger than the output limit."""
        if size > self.limits.max_output:
            raise self.limits.exceeded("max_output", f"would build {size:,} characters or items")

    def checked(self, value: _Value) -> _Value:
        """A value a template built, refused when it is larger than the output limit."""
        if isinstance(value, (str, list, tuple)):
            self.check_size(len(value))
        return value


_budget: contextvars.ContextVar[RenderBudget | None] = contextvars.ContextVar("template_budget", default=None)


@contextlib.contextmanager
def render_budget(limits: TemplateLimits) -> Iterator[RenderBudget]:
    """Run a render under `limits`; a render nested inside another spends the outer one's budget.

    Running out of memory or stack inside a template is the template's failure: `TemplateError`.
    """
    outer = _budget.get()
    if outer is not None:
        yield outer
        return
    budget = RenderBudget(limits)
    token = _budget.set(budget)
    try:
        yield budget
    except MemoryError:
        raise TemplateError("chat template ran out of memory") from None
    except RecursionError:
        raise TemplateError("chat template nested or recursed too deeply") from None
    finally:
        _budget.reset(token)


def current_budget() -> RenderBudget:
    """The budget of the render running in this thread."""
    budget = _budget.get()
    if budget is None:
        # Also what keeps Jinja from running metered filters while folding constants at compile time.
        raise TemplateError("template code ran outside a render")
    return budget

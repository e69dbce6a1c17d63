"""Render chat prompts from a model's template.

Jinja templates come from the GGUF (`tokenizer.chat_template`) and are
untrusted input: they run in an immutable sandbox, and every failure becomes a
`TemplateError` naming the position.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateError

__all__ = ["ChatTemplate", "JinjaTemplate", "PlainTemplate", "is_go_template", "load_template"]


class ChatTemplate:
    """A template that turns messages (dicts, OpenAI/Ollama shape) into a prompt string."""

    source: str = ""

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        raise NotImplementedError

    @property
    def supports_tools(self) -> bool:
        return False

    @property
    def supports_system(self) -> bool:
        return True

    def thinking_tags(self) -> tuple[str, str] | None:
        """The (open, close) tags the model writes its thinking in, judged from the template; None if none."""
        from .thinking import thinking_tags

        return thinking_tags(self.source)

    def tool_call_prefix(self) -> str | None:
        """A template-specific tag that opens tool calls, for `ToolCallParser(prefix=...)`.

        None means the parser's built-in formats are enough.
        """
        return None


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template raised: {message}")


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@attrs.define
class JinjaTemplate(ChatTemplate):
    """A Hugging Face style Jinja chat template, rendered in a sandbox."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    _compiled: jinja2.Template = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._compiled = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template syntax error at line {exc.lineno}: {exc.message}") from None

    @property
    def supports_tools(self) -> bool:
        return "tools" in self.source

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            line = getattr(exc, "lineno", None)
            where = f" at line {line}" if line else ""
            raise TemplateError(f"chat template failed{where}: {exc}") from None
        except Exception as exc:  # a template is untrusted code: any failure is the template's
            raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None


@attrs.define
class PlainTemplate(ChatTemplate):
    """The fallback for models without a chat template (base models).

    Like Ollama's default `{{ .Prompt }}` template: the conversation's text,
    system first, with nothing but blank lines between turns.
    """

    source: str = "{{ .Prompt }}"

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        parts = [str(m.get("content") or "") for m in messages if m.get("content")]
        return "\n\n".join(parts)


_GO_ACTION = re.compile(r"\{\{-?\s*(?:\.|\$|(?:range|if|with|end|else|template|define|block)\b|/\*)")
_JINJA_MARK = re.compile(r"\{%|\{#")


def is_go_template(source: str) -> bool:
    """Whether template text is Ollama's Go template language rather than Jinja.

    Go actions start with a field (`{{ .Prompt }}`), a variable (`{{ $x }}`) or a bare keyword
    (`{{ range ... }}`); Jinja has `{% ... %}` statements and never a leading dot.
    """
    if _JINJA_MARK.search(source):
        return False
    return _GO_ACTION.search(source) is not None


def load_template(source: str | None, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """The chat template for template text: a Go template, a Jinja template, or the plain fallback.

    Empty text gives `PlainTemplate` (Ollama's default `{{ .Prompt }}`). Failures to parse raise
    `TemplateError`.
    """
    if source is None or not source.strip():
        return PlainTemplate()
    if is_go_template(source):
        from .gotemplate import GoTemplate

        return GoTemplate(source)
    return JinjaTemplate(source, bos_token=bos_token, eos_token=eos_token)

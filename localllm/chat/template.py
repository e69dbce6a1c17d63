"""Choose and build a model's chat template: a Go template, a Jinja template, or the plain fallback.

Templates come from GGUF files, Modelfiles and requests, and are untrusted code. Jinja runs in an
immutable sandbox, and every render of either language runs under `TemplateLimits`: a time limit,
a step limit (loop iterations, calls, lookups) and an output limit, checked inside the render
itself, since a thread cannot be stopped from outside. Every failure, a limit included, becomes a
`TemplateError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from ..errors import TemplateError
from .base import ChatTemplate, TemplateMessage, Think, ToolSpec
from .gotemplate import GoTemplate
from .jinja import JinjaTemplate, jinja_thinking_tags
from .limits import TemplateLimits
from .thinking import known_thinking_tags

__all__ = [
    "ChatTemplate",
    "GoTemplate",
    "JinjaTemplate",
    "PlainTemplate",
    "TemplateLimits",
    "is_go_template",
    "load_template",
    "thinking_tags",
]


@attrs.define
class PlainTemplate(ChatTemplate):
    """The fallback for models without a chat template (base models).

    Like Ollama's default `{{ .Prompt }}` template: the conversation's text,
    system first, with nothing but blank lines between turns.
    """

    source: str = "{{ .Prompt }}"

    def render(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        think: Think = None,
        **variables: object,
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


def load_template(
    source: str | None, *, bos_token: str = "", eos_token: str = "", limits: TemplateLimits | None = None
) -> ChatTemplate:
    """The chat template for template text: a Go template, a Jinja template, or the plain fallback.

    Empty text gives `PlainTemplate` (Ollama's default `{{ .Prompt }}`). Failures to parse raise
    `TemplateError`. `limits` bounds each render (default: `TemplateLimits()` at render time).
    """
    if source is None or not source.strip():
        return PlainTemplate()
    if is_go_template(source):
        return GoTemplate(source, limits=limits)
    return JinjaTemplate(source, bos_token=bos_token, eos_token=eos_token, limits=limits)


def thinking_tags(source: str | None) -> tuple[str, str] | None:
    """The (open, close) thinking tags template text supports, or None if it shows no sign of thinking.

    Go templates use Ollama's inference (the text around `.Thinking` inside `range .Messages`), falling
    back to a known tag pair when the template reads the thinking values (`.Thinking`, `.Think`, ...).
    Jinja templates are recognised by a known tag pair in the text, or by `enable_thinking`/
    `reasoning_content` (then `<think>`/`</think>`). Text that fails to parse thinks in no tags.
    """
    if not source:
        return None
    if not is_go_template(source):
        return jinja_thinking_tags(source)
    try:
        template = GoTemplate(source)
    except TemplateError:
        return None
    inferred = template.thinking_tags()
    if inferred is not None:
        return inferred
    return known_thinking_tags(source) if template.reads_thinking else None

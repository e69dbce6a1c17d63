"""What every chat template offers the code that prompts a model: the `ChatTemplate` interface.

Each hook has a default that describes a template without the feature, so callers ask any template
directly and get a plain answer, never an attribute error.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import TypeAlias

from ..errors import CapabilityError

__all__ = ["ChatTemplate", "TemplateMessage", "Think", "ToolSpec"]

#: One message as templates take it: OpenAI/Ollama shape (`role`, `content`, `tool_calls`, ...).
TemplateMessage: TypeAlias = Mapping[str, object]
#: One tool definition, OpenAI shape (`{"type": "function", "function": {...}}`).
ToolSpec: TypeAlias = Mapping[str, object]
#: A request's `think`: unset, on or off, or an effort level ("low", "medium", "high").
Think: TypeAlias = bool | str | None


class ChatTemplate(abc.ABC):
    """A template that turns messages into a prompt string."""

    __slots__ = ()

    #: The template text.
    source: str

    @abc.abstractmethod
    def render(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[ToolSpec] | None = None,
        add_generation_prompt: bool = True,
        think: Think = None,
        **variables: object,
    ) -> str:
        """The prompt for a conversation.

        `tools` are offered to the model when given; `think` is passed in the template's own terms;
        `variables` reach the template as they are, where its language has a place for them.
        """

    @property
    def supports_tools(self) -> bool:
        """Whether the template writes tool definitions into the prompt itself."""
        return False

    @property
    def supports_system(self) -> bool:
        """Whether the template has a place for a system prompt."""
        return True

    @property
    def supports_suffix(self) -> bool:
        """Whether the template takes a suffix (fill-in-the-middle; Ollama's "insert" capability)."""
        return False

    def render_suffix(self, prompt: str, suffix: str, *, think: Think = None) -> str:
        """A fill-in-the-middle prompt (`generate` with a suffix); `CapabilityError` unless `supports_suffix`."""
        raise CapabilityError("this model does not support insert (a prompt with a suffix)")

    def thinking_tags(self) -> tuple[str, str] | None:
        """The (open, close) tags the model writes its thinking in, judged from the template; None if none."""
        return None

    def tool_call_prefix(self) -> str | None:
        """A template-specific tag that opens tool calls, for `ToolCallParser(prefix=...)`.

        None means the parser's built-in formats are enough.
        """
        return None

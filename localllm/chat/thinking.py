"""Split a model's streamed output into thinking and content.

Reasoning models wrap their chain of thought in tags (`<think>...</think>`).
`ThinkingParser` follows Ollama's rules: whitespace before the opening tag and
right after either tag is dropped; output that does not open with the tag is
all content; a tag split across chunks is held back until it is complete.
When the prompt itself opens the thinking block (the template ends with
`<think>`), start the parser with `starts_inside=True`.
"""

from __future__ import annotations

import enum
import re

__all__ = ["KNOWN_THINKING_TAGS", "ThinkingParser", "prompt_opens_thinking", "thinking_tags"]

# (open, close) pairs that reasoning models use, most common first.
KNOWN_THINKING_TAGS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<seed:think>", "</seed:think>"),
    ("◁think▷", "◁/think▷"),
    ("[THINK]", "[/THINK]"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
)

_JINJA_THINKING_HINTS = re.compile(r"enable_thinking|reasoning_content|\.thinking\b|\[['\"]thinking['\"]\]")
_GO_THINKING_VARS = {"thinking", "think", "isthinkset", "thinklevel"}


class _State(enum.Enum):
    LOOKING_FOR_OPENING = 0
    STARTED_EATING_WHITESPACE = 1
    THINKING = 2
    DONE_EATING_WHITESPACE = 3
    DONE = 4


def _overlap(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkingParser:
    """Streaming splitter: `feed(text) -> (thinking, content)`; `finish()` flushes what was held back."""

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>", *, starts_inside: bool = False) -> None:
        if not open_tag or not close_tag:
            raise ValueError("thinking tags must be non-empty")
        self.open_tag = open_tag
        self.close_tag = close_tag
        self._state = _State.STARTED_EATING_WHITESPACE if starts_inside else _State.LOOKING_FOR_OPENING
        self._buf = ""

    @property
    def in_thinking(self) -> bool:
        """Whether the text seen so far leaves the parser inside the thinking block."""
        return self._state in (_State.STARTED_EATING_WHITESPACE, _State.THINKING)

    @property
    def done_thinking(self) -> bool:
        """Whether the parser has moved on to content (the block closed, or never opened)."""
        return self._state in (_State.DONE_EATING_WHITESPACE, _State.DONE)

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        thinking: list[str] = []
        content: list[str] = []
        while self._step(thinking, content):
            pass
        return "".join(thinking), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush held-back text at the end of the output (a partial tag is plain text then)."""
        thinking, content = self.feed("")
        rest, self._buf = self._buf, ""
        if rest:
            if self._state == _State.THINKING:
                thinking += rest
            else:
                self._state = _State.DONE
                content += rest
        return thinking, content

    def _step(self, thinking: list[str], content: list[str]) -> bool:
        """Advance one state; True when another step may make progress on the buffer."""
        state = self._state
        if state == _State.LOOKING_FOR_OPENING:
            trimmed = self._buf.lstrip()
            if trimmed.startswith(self.open_tag):
                after = trimmed[len(self.open_tag) :].lstrip()
                self._buf = after
                self._state = _State.THINKING if after else _State.STARTED_EATING_WHITESPACE
                return True
            if not trimmed or self.open_tag.startswith(trimmed):
                return False  # only whitespace, or a partial opening tag: wait
            self._state = _State.DONE
            content.append(self._buf)  # no thinking block: keep the text exactly as it came
            self._buf = ""
            return False
        if state == _State.STARTED_EATING_WHITESPACE:
            trimmed = self._buf.lstrip()
            self._buf = ""
            if not trimmed:
                return False
            self._buf = trimmed
            self._state = _State.THINKING
            return True
        if state == _State.THINKING:
            idx = self._buf.find(self.close_tag)
            if idx >= 0:
                thinking.append(self._buf[:idx])
                rest = self._buf[idx + len(self.close_tag) :].lstrip()
                self._buf = ""
                if rest:
                    self._state = _State.DONE
                    content.append(rest)
                else:
                    self._state = _State.DONE_EATING_WHITESPACE
                return False
            keep = _overlap(self._buf, self.close_tag)
            thinking.append(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        if state == _State.DONE_EATING_WHITESPACE:
            trimmed = self._buf.lstrip()
            self._buf = ""
            if trimmed:
                self._state = _State.DONE
                content.append(trimmed)
            return False
        content.append(self._buf)
        self._buf = ""
        return False


def prompt_opens_thinking(prompt: str, open_tag: str) -> bool:
    """Whether a rendered prompt already opened the thinking block (so the output starts inside it)."""
    return bool(open_tag) and prompt.rstrip().endswith(open_tag)


def thinking_tags(template_source: str | None) -> tuple[str, str] | None:
    """The (open, close) thinking tags a chat template supports, or None if it shows no sign of thinking.

    Go templates use Ollama's inference (the text around `.Thinking` inside `range .Messages`), falling
    back to a known tag pair when the template uses `.Thinking`/`.Think`/`.IsThinkSet`. Jinja templates
    are recognised by a known tag pair in the text, or by `enable_thinking`/`reasoning_content`
    (then `<think>`/`</think>`).
    """
    if not template_source:
        return None
    from ..errors import TemplateError
    from .template import is_go_template

    known = next(((o, c) for o, c in KNOWN_THINKING_TAGS if o in template_source and c in template_source), None)
    if is_go_template(template_source):
        from .gotemplate import GoTemplate

        try:
            tmpl = GoTemplate(template_source)
        except TemplateError:
            return None
        inferred = tmpl.thinking_tags()
        if inferred is not None:
            return inferred
        if known is not None and _GO_THINKING_VARS & set(tmpl.vars()):
            return known
        return None
    if known is not None:
        return known
    if _JINJA_THINKING_HINTS.search(template_source):
        return KNOWN_THINKING_TAGS[0]
    return None

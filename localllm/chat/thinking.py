"""Split a model's streamed output into thinking and content.

Reasoning models wrap their chain of thought in tags (`<think>...</think>`).
`ThinkingParser` follows Ollama's rules: whitespace before the opening tag and
right after either tag is dropped; output that does not open with the tag is
all content; a tag split across chunks is held back until it is complete.
When the prompt itself opens the thinking block (the template ends with
`<think>`), start the parser with `starts_inside=True`. Which tags a model
uses is judged from its template (`ChatTemplate.thinking_tags`).
"""

from __future__ import annotations

import enum

__all__ = ["KNOWN_THINKING_TAGS", "ThinkingParser", "known_thinking_tags", "prompt_opens_thinking"]

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


def known_thinking_tags(text: str) -> tuple[str, str] | None:
    """The first known (open, close) pair whose tags both appear in `text`, or None."""
    return next(((o, c) for o, c in KNOWN_THINKING_TAGS if o in text and c in text), None)

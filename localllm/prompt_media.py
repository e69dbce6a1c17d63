"""Images and audio in a prompt: where the template puts each, and the tokens that stand in for them.

Each message's images become markers in its text before the template renders it, as Ollama's
``[img-N]`` tags (before the text, or in place of an ``[img]`` the text holds). The markers carry a
random key made when the process starts, so no text a user sends can pass for one. After rendering
(and cutting old messages to fit), the prompt is tokenized piece by piece: text through the model's
tokenizer, each marker as the tokens the runner's projector gives its item (`MediaLayout`), its
embeddings as stand-in ids drawn from the item's content hash.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

import attrs

from .media import Media, MediaLimits, decode_media
from .runner.protocol import TextRunner
from .types import Message

__all__ = [
    "AUDIO_SAMPLE_RATE",
    "Labelled",
    "PromptMedia",
    "decode_all",
    "for_display",
    "labelled",
    "marked_messages",
    "marked_prompt",
]

#: The rate audio is resampled to: every audio encoder libmtmd runs reads 16 kHz (the projector checks).
AUDIO_SAMPLE_RATE = 16_000

_KEY = secrets.token_hex(8)
_MARKER = re.compile(rf"\[media-{_KEY}-(\d+)\]")


def _marker(index: int) -> str:
    return f"[media-{_KEY}-{index}]"


def _mark(content: str, first: int, count: int) -> str:
    prefix = ""
    for index in range(first, first + count):
        if "[img]" in content:
            content = content.replace("[img]", _marker(index), 1)
        else:
            prefix += _marker(index)
    return prefix + content


Labelled = tuple[str, str]
"""An image (base64 text) and where the request holds it ("messages[2].images[0]"), for error messages."""


def marked_messages(messages: Sequence[Message], *, first: int = 0) -> tuple[list[dict[str, Any]], list[Labelled]]:
    """The messages as the template reads them, each image a marker in its text; and the images, in the
    order the markers number them. `messages[first]` is the request's first message."""
    rendered: list[dict[str, Any]] = []
    images: list[Labelled] = []
    for index, message in enumerate(messages):
        data = message.to_template_dict()
        if message.images:
            data["content"] = _mark(message.content, len(images), len(message.images))
            images.extend((f"messages[{index - first}].images[{j}]", image) for j, image in enumerate(message.images))
        rendered.append(data)
    return rendered, images


def labelled(images: Sequence[str]) -> list[Labelled]:
    """A generate request's images, with where it holds each."""
    return [(f"images[{j}]", image) for j, image in enumerate(images)]


def marked_prompt(prompt: str, images: Sequence[str]) -> str:
    """A raw prompt with its images' markers before it (or in place of its ``[img]`` tags)."""
    return _mark(prompt, 0, len(images))


def for_display(prompt: str) -> str:
    """The prompt with Ollama's ``[img-N]`` tags where the markers are."""
    return _MARKER.sub(lambda match: f"[img-{match.group(1)}]", prompt)


def decode_all(images: Sequence[Labelled], limits: MediaLimits) -> list[Media]:
    """Every image (or audio clip) decoded and bounded; `InvalidRequest` naming the first bad one.
    Call in a worker thread: decoding is CPU work."""
    limits.check_count(len(images))
    return [decode_media(data, limits=limits, where=where, sample_rate=AUDIO_SAMPLE_RATE) for where, data in images]


@attrs.frozen
class PromptMedia:
    """A rendered prompt's media, and its tokenizing: call `tokens` from a worker thread (the projector
    reads each new item once, and a runner in a child process answers over a pipe)."""

    items: tuple[Media, ...] = ()

    def tokens(self, runner: TextRunner, prompt: str) -> list[int]:
        pieces = _MARKER.split(prompt)  # text, index, text, index, ..., text
        tokens = runner.tokenize(pieces[0])
        for at in range(1, len(pieces), 2):
            item = self._item(int(pieces[at]))
            tokens.extend(runner.media_layout(item).tokens(item.digest))
            if pieces[at + 1]:
                tokens.extend(runner.tokenize(pieces[at + 1], add_special=False))
        return tokens

    def used(self, prompt: str) -> tuple[Media, ...]:
        """The items whose markers the prompt holds (once each)."""
        seen: dict[bytes, Media] = {}
        for match in _MARKER.finditer(prompt):
            item = self._item(int(match.group(1)))
            seen.setdefault(item.digest, item)
        return tuple(seen.values())

    def _item(self, index: int) -> Media:
        if index >= len(self.items):  # a marker is never forged (see the module's note): this is a bug
            raise IndexError(f"prompt marker {index} beyond the request's {len(self.items)} media items")
        return self.items[index]

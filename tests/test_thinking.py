"""Splitting thinking from content, and finding a template's thinking tags."""

from __future__ import annotations

import pytest

from localllm.chat.template import thinking_tags
from localllm.chat.thinking import ThinkingParser, prompt_opens_thinking

pytestmark = pytest.mark.fast


def run(chunks: list[str], **kwargs: object) -> tuple[str, str]:
    parser = ThinkingParser(**kwargs)  # type: ignore[arg-type]
    thinking: list[str] = []
    content: list[str] = []
    for chunk in chunks:
        t, c = parser.feed(chunk)
        thinking.append(t)
        content.append(c)
    t, c = parser.finish()
    thinking.append(t)
    content.append(c)
    return "".join(thinking), "".join(content)


CASES: list[tuple[str, str, dict[str, object], str, str]] = [
    ("thinking then content", "<think>Let me think.</think>The answer is 4.", {}, "Let me think.", "The answer is 4."),
    ("whitespace around tags", "\n <think>\n\nhmm\n</think>\n\nDone\n", {}, "hmm\n", "Done\n"),
    ("no thinking block", "  Just an answer <think>x</think>", {}, "", "  Just an answer <think>x</think>"),
    ("only thinking", "<think>still going", {}, "still going", ""),
    ("empty thinking", "<think></think>Answer", {}, "", "Answer"),
    ("partial tag is text at the end", "Answer </thi", {}, "", "Answer </thi"),
    ("closing tag look-alike inside", "<think>a </thinking> b</think>c", {}, "a </thinking> b", "c"),
    ("starts inside", "reasoning</think>answer", {"starts_inside": True}, "reasoning", "answer"),
    ("inside, newline first", "\nreasoning\n</think>\n\nanswer", {"starts_inside": True}, "reasoning\n", "answer"),
    (
        "other tags",
        "[THINK]plan[/THINK]result",
        {"open_tag": "[THINK]", "close_tag": "[/THINK]"},
        "plan",
        "result",
    ),
    ("content keeps later tags", "<think>t</think>x <think>y</think>", {}, "t", "x <think>y</think>"),
]


@pytest.mark.parametrize(("text", "kwargs", "thinking", "content"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_split(text: str, kwargs: dict[str, object], thinking: str, content: str) -> None:
    assert run([text], **kwargs) == (thinking, content)
    for i in range(len(text) + 1):
        assert run([text[:i], text[i:]], **kwargs) == (thinking, content), f"split at {i}"
        for j in range(i, len(text) + 1, 3):
            assert run([text[:i], text[i:j], text[j:]], **kwargs) == (thinking, content), f"split at {i}, {j}"
    assert run(list(text), **kwargs) == (thinking, content)


def test_streaming_is_prompt() -> None:
    parser = ThinkingParser()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>abc</") == ("abc", "")
    assert parser.in_thinking
    assert parser.feed("think>xyz") == ("", "xyz")
    assert parser.done_thinking
    assert parser.feed(" more") == ("", " more")


def test_prompt_opens_thinking() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n", "<think>")
    assert not prompt_opens_thinking("<|im_start|>assistant\n", "<think>")


QWEN3_GO = """{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if and $last .Thinking }}<think>{{ .Thinking }}</think>
{{ end }}{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}"""

QWEN3_JINJA = (
    "{%- for message in messages %}{{ message.content }}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)


@pytest.mark.parametrize(
    ("source", "tags"),
    [
        (QWEN3_GO, ("<think>", "</think>")),
        ("{{ range .Messages }}{{ .Content }}{{ end }}", None),
        ("{{ if .Thinking }}/think{{ end }}{{ range .Messages }}{{ .Content }}{{ end }}", None),
        (QWEN3_JINJA, ("<think>", "</think>")),
        ("{% for m in messages %}{{ m.reasoning_content }}{% endfor %}", ("<think>", "</think>")),
        ("{% for m in messages %}[THINK]{{ m.thinking }}[/THINK]{% endfor %}", ("[THINK]", "[/THINK]")),
        ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
        ("", None),
    ],
)
def test_thinking_tags(source: str, tags: tuple[str, str] | None) -> None:
    assert thinking_tags(source) == tags


def test_random_chunkings_agree_with_whole_text() -> None:
    import random

    pieces = ["<think>", "</think>", "<th", "</th", "ink>", " ", "\n", "a", "b", "<", ">", "/"]
    rng = random.Random(99)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        inside = rng.random() < 0.3
        whole = run([text], starts_inside=inside)
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run(chunks, starts_inside=inside) == whole, repr(text)

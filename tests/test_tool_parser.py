"""The streaming tool-call parser, on complete output and on every way of splitting it."""

from __future__ import annotations

import re
from typing import Any

import pytest

from localllm.chat.tools import ToolCallParser, parse_tool_calls
from localllm.types import ToolCall

pytestmark = pytest.mark.fast


def _tool(name: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {name} tool",
            "parameters": {"type": "object", "properties": properties or {}},
        },
    }


TOOLS = [
    _tool("get_temperature", {"city": {"type": "string"}, "format": {"type": "string"}}),
    _tool("get_conditions", {"location": {"type": "string"}}),
    _tool("say_hello"),
    _tool("say_hello_world"),
    _tool(
        "configure",
        {
            "name": {"type": "string"},
            "count": {"type": "integer"},
            "ratio": {"type": "number"},
            "enabled": {"type": "boolean"},
            "options": {"type": "object"},
            "tags": {"type": "array"},
            "note": {"type": ["string", "null"]},
        },
    ),
]

Calls = list[tuple[str, dict[str, Any]]]


def DS(word: str) -> str:
    """A DeepSeek special token, with the full-width bars its tokenizer uses."""
    return f"<\uff5c{word}\uff5c>"


def simple(calls: list[ToolCall]) -> Calls:
    return [(c.function.name, c.function.arguments) for c in calls]


def run_chunks(
    chunks: list[str], *, prefix: str | None = None, tools: list[dict[str, Any]] = TOOLS
) -> tuple[str, Calls]:
    parser = ToolCallParser(tools, prefix=prefix)
    content: list[str] = []
    calls: list[ToolCall] = []
    for chunk in chunks:
        c, k = parser.feed(chunk)
        content.append(c)
        calls.extend(k)
    c, k = parser.finish()
    content.append(c)
    calls.extend(k)
    assert [call.function.index for call in calls] == list(range(len(calls)))
    return "".join(content), simple(calls)


def check_all_splits(text: str, expected_content: str, expected_calls: Calls, *, prefix: str | None = None) -> None:
    assert run_chunks([text], prefix=prefix) == (expected_content, expected_calls)
    for i in range(len(text) + 1):
        got = run_chunks([text[:i], text[i:]], prefix=prefix)
        assert got == (expected_content, expected_calls), f"split at {i}: {text[:i]!r} | {text[i:]!r}"
    assert run_chunks(list(text), prefix=prefix) == (expected_content, expected_calls), "one character at a time"


CASES: list[tuple[str, str, str, Calls]] = [
    ("plain text", "Hello, how are you today?", "Hello, how are you today?", []),
    (
        "hermes",
        '<tool_call>{"name": "get_conditions", "arguments": {"location": "San Francisco"}}</tool_call>',
        "",
        [("get_conditions", {"location": "San Francisco"})],
    ),
    (
        "hermes with text before",
        'Let me check. <tool_call>\n{"name": "get_temperature", "arguments": {"city": "New York"}}\n</tool_call>',
        "Let me check. ",
        [("get_temperature", {"city": "New York"})],
    ),
    (
        "hermes two calls",
        '<tool_call>{"name": "say_hello", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "get_temperature", "arguments": {"city": "London", "format": "celsius"}}</tool_call>',
        "",
        [("say_hello", {}), ("get_temperature", {"city": "London", "format": "celsius"})],
    ),
    (
        "hermes without closing tag",
        '<tool_call>{"name": "get_conditions", "arguments": {"location": "Tokyo"}}',
        "",
        [("get_conditions", {"location": "Tokyo"})],
    ),
    (
        "braces inside strings",
        '<tool_call>{"name": "get_temperature", "arguments": {"city": "a}b{c\\"}", "format": "[{]"}}</tool_call>',
        "",
        [("get_temperature", {"city": 'a}b{c"}', "format": "[{]"})],
    ),
    (
        "nested objects",
        '<tool_call>{"name": "configure", "arguments": {"options": {"a": {"b": [1, {"c": null}]}}, "tags": []}}'
        "</tool_call>",
        "",
        [("configure", {"options": {"a": {"b": [1, {"c": None}]}}, "tags": []})],
    ),
    (
        "arguments as a JSON string",
        '<tool_call>{"name": "get_conditions", "arguments": "{\\"location\\": \\"Oslo\\"}"}</tool_call>',
        "",
        [("get_conditions", {"location": "Oslo"})],
    ),
    (
        "llama bare json with parameters",
        '{"name": "get_temperature", "parameters": {"city": "Tokyo"}}',
        "",
        [("get_temperature", {"city": "Tokyo"})],
    ),
    (
        "llama python tag",
        '<|python_tag|>{"name": "get_conditions", "parameters": {"location": "Rome"}}<|eom_id|>',
        "",
        [("get_conditions", {"location": "Rome"})],
    ),
    (
        "llama python tag, two calls",
        '<|python_tag|>{"name": "say_hello", "parameters": {}}; {"name": "say_hello_world", "parameters": {}}',
        "",
        [("say_hello", {}), ("say_hello_world", {})],
    ),
    (
        "plain json array",
        '[{"name": "say_hello", "arguments": {}}, {"name": "get_conditions", "arguments": {"location": "Lima"}}]',
        "",
        [("say_hello", {}), ("get_conditions", {"location": "Lima"})],
    ),
    (
        "openai function shape",
        '{"type": "function", "function": {"name": "get_conditions", "arguments": {"location": "Kyiv"}}}',
        "",
        [("get_conditions", {"location": "Kyiv"})],
    ),
    (
        "mistral list",
        '[TOOL_CALLS] [{"name": "get_temperature", "arguments": {"city": "London", "format": "fahrenheit"}}, '
        '{"name": "get_conditions", "arguments": {"location": "Tokyo"}}][/TOOL_CALLS]',
        "",
        [("get_temperature", {"city": "London", "format": "fahrenheit"}), ("get_conditions", {"location": "Tokyo"})],
    ),
    (
        "mistral name[ARGS] with prefix names",
        '[TOOL_CALLS]say_hello[ARGS]{}[TOOL_CALLS]say_hello_world[ARGS]{"x": "}"}',
        "",
        [("say_hello", {}), ("say_hello_world", {"x": "}"})],
    ),
    (
        "mistral call id",
        '[TOOL_CALLS]get_conditions[CALL_ID]abc123XYZ[ARGS]{"location": "Bern"}',
        "",
        [("get_conditions", {"location": "Bern"})],
    ),
    (
        "deepseek r1",
        "<think>Wait</think>"
        + DS("tool▁calls▁begin")
        + DS("tool▁call▁begin")
        + "function"
        + DS("tool▁sep")
        + 'get_temperature\n```json\n{"city": "Tokyo"}\n```'
        + DS("tool▁call▁end")
        + DS("tool▁calls▁end")
        + DS("end▁of▁sentence"),
        "<think>Wait</think>",
        [("get_temperature", {"city": "Tokyo"})],
    ),
    (
        "deepseek ascii bars",
        "<|tool▁calls▁begin|><|tool▁call▁begin|>function<|tool▁sep|>get_conditions\n"
        '```json\n{"location": "Paris"}\n```<|tool▁call▁end|><|tool▁calls▁end|>',
        "",
        [("get_conditions", {"location": "Paris"})],
    ),
    (
        "deepseek v3.1",
        DS("tool▁calls▁begin")
        + DS("tool▁call▁begin")
        + "say_hello_world"
        + DS("tool▁sep")
        + "{}"
        + DS("tool▁call▁end")
        + DS("tool▁call▁begin")
        + "get_conditions"
        + DS("tool▁sep")
        + '{"location": "Nice"}'
        + DS("tool▁call▁end")
        + DS("tool▁calls▁end"),
        "",
        [("say_hello_world", {}), ("get_conditions", {"location": "Nice"})],
    ),
    (
        "qwen3 coder xml typed by schema",
        "<tool_call>\n<function=configure>\n<parameter=name>\nmy\nbox\n</parameter>\n<parameter=count>\n3\n"
        "</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n<parameter=enabled>\ntrue\n</parameter>\n"
        '<parameter=options>\n{"a": 1}\n</parameter>\n<parameter=tags>\n["x", "y"]\n</parameter>\n'
        "<parameter=note>\nnull\n</parameter>\n</function>\n</tool_call>",
        "",
        [
            (
                "configure",
                {
                    "name": "my\nbox",
                    "count": 3,
                    "ratio": 0.5,
                    "enabled": True,
                    "options": {"a": 1},
                    "tags": ["x", "y"],
                    "note": None,
                },
            )
        ],
    ),
    (
        "bare xml function",
        "Sure.\n<function=get_conditions>\n<parameter=location>\nSan Jose\n</parameter>\n</function>",
        "Sure.\n",
        [("get_conditions", {"location": "San Jose"})],
    ),
    (
        "text after calls",
        '<tool_call>{"name": "say_hello", "arguments": {}}</tool_call>\n\nDone.',
        "Done.",
        [("say_hello", {})],
    ),
]


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_formats_at_every_split(text: str, content: str, calls: Calls) -> None:
    check_all_splits(text, content, calls)


UNKNOWN: list[tuple[str, str]] = [
    ("unknown tool in hermes", '<tool_call>{"name": "get_stock", "arguments": {}}</tool_call> ok'),
    ("unknown tool as bare json", '{"name": "get_stock", "arguments": {"s": 1}}'),
    ("json that is not a call", '{"answer": 42, "items": [1, 2]}'),
    ("array of non calls", "[1, 2, 3] are numbers"),
    ("arguments not an object", '<tool_call>{"name": "say_hello", "arguments": [1]}</tool_call>'),
    ("unknown mistral name", "[TOOL_CALLS]get_stock[ARGS]{}"),
    ("unknown xml function", "<function=get_stock>\n<parameter=a>\n1\n</parameter>\n</function>"),
    ("tag-like text", "Use <tool> and [TOOL] and <function> tags"),
    ("unfinished call", '<tool_call>{"name": "say_hello", "arguments": {'),
    ("json later in the text", 'I think {"name": "say_hello", "arguments": {}} works'),
    ("markdown link at start", "[docs](http://x) {braces}"),
]


@pytest.mark.parametrize("text", [u[1] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN])
def test_non_calls_pass_through_as_content(text: str) -> None:
    check_all_splits(text, text, [])


def test_prefix_names_are_not_matched_early() -> None:
    parser = ToolCallParser(TOOLS)
    content, calls = parser.feed("[TOOL_CALLS]say_hello")
    assert (content, calls) == ("", [])
    content, calls = parser.feed("_world[ARGS]{}")
    assert content == ""
    assert simple(calls) == [("say_hello_world", {})]


@pytest.mark.parametrize(
    "tokens",
    [
        # Qwen 2.5 as it sometimes closes a call: one brace too many, inside the tags or after them
        ["<tool_call>", "\n", '{"name": "get_temperature", "arguments": {"city": "Paris"}}', "}", "\n", "</tool_call>"],
        ["<tool_call>", '{"name": "get_temperature", ', '"arguments": {"city": "Paris"}}}', "</tool_call>"],
        ["<tool_call>", '{"name": "get_temperature", "arguments": {"city": "Paris"}}', "</tool_call>", "}"],
        ["<tool_call>", '{"name": "get_temperature", "arguments": {"city": "Paris"}}', "}"],  # and no closing tag
        ['{"name": "get_temperature", "arguments": {"city": "Paris"}}', "}"],  # a call as bare JSON
    ],
)
def test_a_stray_bracket_after_a_call_is_not_content(tokens: list[str]) -> None:
    """As Ollama's parser: the call, and no "}" left over as the reply's text."""
    expected = ("", [("get_temperature", {"city": "Paris"})])
    assert run_chunks(tokens, prefix="<tool_call>") == expected
    check_all_splits("".join(tokens), *expected, prefix="<tool_call>")


def test_brackets_are_content_when_no_call_came_before_them() -> None:
    assert run_chunks(["} and ]"]) == ("} and ]", [])
    assert run_chunks(["<tool_call>", "}", " no call"]) == ("<tool_call>} no call", [])


def test_content_streams_before_the_call_and_partial_tags_are_held() -> None:
    parser = ToolCallParser(TOOLS)
    assert parser.feed("Checking the weather <tool") == ("Checking the weather ", [])
    assert parser.in_tool_call is False
    assert parser.feed("_call>") == ("", [])
    assert parser.in_tool_call
    content, calls = parser.feed('{"name": "say_hello", "arguments": {}}')
    assert content == ""
    assert simple(calls) == [("say_hello", {})]
    assert parser.finish() == ("", [])
    parser = ToolCallParser(TOOLS)
    assert parser.feed("a <") == ("a ", [])
    assert parser.feed("b") == ("<b", [])


def test_leading_whitespace_before_a_call_is_dropped_but_kept_for_text() -> None:
    assert run_chunks(["\n\n", '{"name": "say_hello", "arguments": {}}']) == ("", [("say_hello", {})])
    assert run_chunks(["\n\n", "Hi"]) == ("\n\nHi", [])
    assert run_chunks(["  "]) == ("  ", [])


def test_template_prefix() -> None:
    check_all_splits(
        '<function_calls>{"name": "say_hello", "arguments": {}}</function_calls>',
        "",
        [("say_hello", {})],
        prefix="<function_calls>",
    )
    check_all_splits(
        'Ok ```json\n{"name": "say_hello", "arguments": {}}\n```',
        "Ok ",
        [("say_hello", {})],
        prefix="```json",
    )
    # Ollama derives "[TOOL_CALLS] [" from a Mistral template: the bracket belongs to the JSON
    check_all_splits(
        '[TOOL_CALLS] [{"name": "say_hello", "arguments": {}}]',
        "",
        [("say_hello", {})],
        prefix="[TOOL_CALLS] [",
    )


def test_ids_and_indexes() -> None:
    _, calls = parse_tool_calls(
        '<tool_call>{"name": "say_hello", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "say_hello", "arguments": {}}</tool_call>',
        TOOLS,
    )
    assert [c.function.index for c in calls] == [0, 1]
    assert all(re.fullmatch(r"call_[a-z0-9]{8}", c.id) for c in calls)
    assert calls[0].id != calls[1].id


def test_no_tools_means_no_calls() -> None:
    text = '<tool_call>{"name": "say_hello", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, []) == (text, [])


def test_python_literal_arguments_are_tolerated() -> None:
    text = "<tool_call>{'name': 'get_conditions', 'arguments': {'location': 'Rio'}}</tool_call>"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == ""
    assert simple(calls) == [("get_conditions", {"location": "Rio"})]


def test_tools_may_be_objects_with_to_dict() -> None:
    class Def:
        def to_dict(self) -> dict[str, Any]:
            return _tool("ping")

    _, calls = parse_tool_calls('{"name": "ping", "arguments": {}}', [Def()])
    assert simple(calls) == [("ping", {})]


def test_random_chunkings_agree_with_whole_text() -> None:
    import random

    pieces = [
        "<tool_call>", "</tool_call>", "<tool", "{", "}", "[", "]", '"name"', ":", '"say_hello"', '"say_hello_world"',
        '"nope"', ",", '"arguments"', "{}", '{"a": 1}', "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "say_hello", "_world",
        "<function=", "say_hello>", "</function>", "<parameter=a>", "1", "</parameter>", " ", "\n", "text",
        "<|python_tag|>", ";", DS("tool▁calls▁begin"), DS("tool▁call▁begin"), DS("tool▁sep"), DS("tool▁call▁end"),
        "function", '"', "\\",
    ]  # fmt: skip
    rng = random.Random(1234)
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        whole = run_chunks([text])
        if not whole[1]:
            assert whole[0] == text, "text without calls must come back unchanged"
        cuts = sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run_chunks(chunks) == whole, repr(text)


def test_chat_output_parser_splits_thinking_content_and_calls() -> None:
    from localllm.chat.tools import ChatOutputParser

    text = '<think>I should call it.</think>\nCalling. <tool_call>{"name": "say_hello", "arguments": {}}</tool_call>'
    for i in range(len(text) + 1):
        parser = ChatOutputParser(tools=TOOLS, thinking_tags=("<think>", "</think>"))
        parts = [parser.feed(text[:i]), parser.feed(text[i:]), parser.finish()]
        assert "".join(p[0] for p in parts) == "I should call it."
        assert "".join(p[1] for p in parts) == "Calling. "
        assert [c for p in parts for c in simple(p[2])] == [("say_hello", {})]
    plain = ChatOutputParser()
    assert plain.feed("<think>x</think>") == ("", "<think>x</think>", [])
    inside = ChatOutputParser(thinking_tags=("<think>", "</think>"), starts_inside=True)
    assert inside.feed("x</think>y") == ("x", "y", [])

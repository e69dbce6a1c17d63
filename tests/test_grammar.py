"""JSON schema -> GBNF: checked by llama.cpp's own grammar parser and sampler.

Each grammar is loaded into a llama.cpp grammar sampler (with SmolLM2's vocabulary,
loaded vocab-only), and documents are fed to it token by token: a document is
accepted when every token is allowed and the grammar may end after it.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from localllm.chat.grammar import JSON_GBNF, JSON_VALUE_GBNF, format_to_grammar, schema_to_gbnf, tool_call_grammar
from localllm.errors import InvalidFormat

pytestmark = pytest.mark.fast


class Checker:
    """Parses grammars and runs documents through llama.cpp's grammar sampler."""

    def __init__(self, model_path: Path) -> None:
        import llama_cpp

        self.L = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
        assert self.model, "could not load the vocabulary"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)

    def close(self) -> None:
        self.L.llama_model_free(self.model)

    def parses(self, grammar: str) -> bool:
        sampler = self.L.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        self.L.llama_sampler_free(sampler)
        return True

    def tokens(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.L.llama_token * (len(raw) + 8))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def accepts(self, grammar: str, text: str) -> bool:
        sampler = self.L.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler, "grammar failed to parse"
        try:
            for token in [*self.tokens(text), self.eos]:
                data = (self.L.llama_token_data * 1)(self.L.llama_token_data(token, 0.0, 0.0))
                candidates = self.L.llama_token_data_array(data, 1, -1, False)
                self.L.llama_sampler_apply(sampler, ctypes.byref(candidates))
                if math.isinf(data[0].logit):
                    return False
                if token != self.eos:
                    self.L.llama_sampler_accept(sampler, token)  # only ever an allowed token
            return True
        finally:
            self.L.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def llama(smollm2_path: Path) -> Iterator[Checker]:
    checker = Checker(smollm2_path)
    yield checker
    checker.close()


def check(llama: Checker, schema: dict[str, Any], good: list[Any], bad: list[str]) -> None:
    grammar = schema_to_gbnf(schema)
    assert llama.parses(grammar), grammar
    for doc in good:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        jsonschema.validate(json.loads(text), schema)
        assert llama.accepts(grammar, text), f"rejected {text}\n{grammar}"
    for text in bad:
        assert not llama.accepts(grammar, text), f"accepted {text}\n{grammar}"


def test_json_grammars(llama: Checker) -> None:
    assert llama.parses(JSON_GBNF)
    assert llama.accepts(JSON_GBNF, '{"a": [1, -2.5e3, true, false, null, {"b": "c\\n\\u00e9"}], "d": {}}')
    assert llama.accepts(JSON_GBNF, '{\n  "pretty": [\n    1\n  ]\n}')
    for text in ["[1, 2]", '"text"', "42", "{'a': 1}", '{"a": 1,}', '{"a": 01}', '{"a": "\n"}']:
        assert not llama.accepts(JSON_GBNF, text), text
    assert llama.accepts(JSON_VALUE_GBNF, "[1, 2]")
    assert llama.accepts(JSON_VALUE_GBNF, '"text"')


def test_object_properties_in_order_with_optional_ones(llama: Checker) -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "integer"},
            "c": {"type": "boolean"},
            "d": {"type": "null"},
        },
        "required": ["b", "d"],
    }
    check(
        llama,
        schema,
        good=[{"b": 1, "d": None}, {"a": "x", "b": 1, "d": None}, {"a": "x", "b": 1, "c": True, "d": None}],
        bad=['{"d": null, "b": 1}', '{"b": 1}', '{"a": "x", "d": null}', '{"b": 1, "d": null, "e": 1}', "{}"],
    )


def test_all_optional_and_additional_properties(llama: Checker) -> None:
    check(
        llama,
        {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}},
        good=["{}", {"x": 1}, {"y": 2.5}, {"x": 1, "y": -2}],
        bad=['{"y": 1, "x": 2}', '{"z": 1}', '{"x": "1"}'],
    )
    check(
        llama,
        {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": {"type": "integer"},
        },
        good=[{"name": "n"}, {"name": "n", "na": 1, "names": 2, "x": 3}],
        bad=['{"name": "n", "name": 1}', '{"name": "n", "x": "s"}', '{"x": 1}'],
    )
    check(
        llama,
        {"type": "object", "additionalProperties": True},
        good=["{}", {"anything": [1, {"goes": None}]}],
        bad=["[]"],
    )


def test_nested_objects_and_arrays(llama: Checker) -> None:
    schema = {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["id"],
            },
            "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
        },
        "required": ["user", "scores"],
    }
    check(
        llama,
        schema,
        good=[
            {"user": {"id": 1}, "scores": [1]},
            {"user": {"id": 1, "tags": ["a", "b"]}, "scores": [1, 2.5, -3]},
        ],
        bad=[
            '{"user": {"id": 1}, "scores": []}',
            '{"user": {"id": 1}, "scores": [1, 2, 3, 4]}',
            '{"user": {"tags": []}, "scores": [1]}',
            '{"user": {"id": 1.5}, "scores": [1]}',
        ],
    )


def test_enum_const_anyof_nullable(llama: Checker) -> None:
    check(
        llama,
        {
            "type": "object",
            "properties": {
                "color": {"enum": ["red", "green", 3, None]},
                "kind": {"const": "fixed"},
                "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
                "maybe": {"type": ["boolean", "null"]},
                "other": {"oneOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
            },
            "required": ["color", "kind", "value", "maybe", "other"],
        },
        good=[
            {"color": "red", "kind": "fixed", "value": 12, "maybe": None, "other": [1]},
            {"color": 3, "kind": "fixed", "value": "abc", "maybe": True, "other": None},
            {"color": None, "kind": "fixed", "value": -1, "maybe": False, "other": []},
        ],
        bad=[
            '{"color": "blue", "kind": "fixed", "value": 1, "maybe": null, "other": null}',
            '{"color": "red", "kind": "other", "value": 1, "maybe": null, "other": null}',
            '{"color": "red", "kind": "fixed", "value": "abcd", "maybe": null, "other": null}',
        ],
    )
    nullable = schema_to_gbnf({"type": "string", "nullable": True})  # OpenAPI's spelling of ["string", "null"]
    assert llama.accepts(nullable, "null")
    assert llama.accepts(nullable, '"x"')
    assert not llama.accepts(nullable, "1")


def test_refs_defs_and_recursion(llama: Checker) -> None:
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["value"],
            }
        },
        "$ref": "#/$defs/Node",
    }
    check(
        llama,
        schema,
        good=[{"value": 1}, {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}, {"value": 4}]}],
        bad=['{"value": 1, "children": [{"children": []}]}'],
    )
    check(
        llama,
        {
            "definitions": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
            "type": "object",
            "properties": {"p": {"$ref": "#/definitions/Point"}, "q": {"$ref": "#/definitions/Point"}},
            "required": ["p", "q"],
        },
        good=[{"p": {"x": 1}, "q": {"x": 2}}],
        bad=['{"p": {"x": 1}, "q": {}}'],
    )


def test_allof_merges_objects(llama: Checker) -> None:
    check(
        llama,
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]},
            ]
        },
        good=[{"a": "x", "b": 1}],
        bad=['{"a": "x"}', '{"b": 1}'],
    )


def test_strings(llama: Checker) -> None:
    check(llama, {"type": "string", "minLength": 2, "maxLength": 4}, good=['"ab"', '"abcd"'], bad=['"a"', '"abcde"'])
    check(
        llama,
        {"type": "string", "format": "date"},
        good=['"2024-02-29"'],
        bad=['"2024-13-01"', '"yesterday"'],
    )
    check(
        llama,
        {"type": "string", "format": "uuid"},
        good=['"123e4567-e89b-12d3-a456-426614174000"'],
        bad=['"123e4567"'],
    )
    check(llama, {"type": "string", "format": "email"}, good=['"not checked"'], bad=["1"])
    check(llama, {"type": "string"}, good=['"tab\\t quote\\" é"'], bad=['"raw\nnewline"', '"bad \\q escape"'])


@pytest.mark.parametrize(
    ("bounds", "lo", "hi"),
    [
        ({"minimum": 0}, 0, None),
        ({"minimum": 5, "maximum": 123}, 5, 123),
        ({"minimum": -15, "maximum": 7}, -15, 7),
        ({"minimum": -120, "maximum": -30}, -120, -30),
        ({"maximum": 9}, None, 9),
        ({"exclusiveMinimum": 0, "exclusiveMaximum": 100}, 1, 99),
        ({"minimum": 10}, 10, None),
        ({"minimum": 1.5, "maximum": 3.5}, 2, 3),
    ],
)
def test_integer_ranges(llama: Checker, bounds: dict[str, Any], lo: int | None, hi: int | None) -> None:
    grammar = schema_to_gbnf({"type": "integer", **bounds})
    assert llama.parses(grammar), grammar
    probes = {-1000, -200, -121, -120, -119, -31, -30, -29, -16, -15, -14, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
    probes |= {11, 99, 100, 101, 122, 123, 124, 999, 1000, 123456789}
    for n in sorted(probes):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert llama.accepts(grammar, str(n)) == inside, f"{n} with {bounds}"
    assert not llama.accepts(grammar, "007")


def test_numbers(llama: Checker) -> None:
    check(llama, {"type": "number"}, good=["0", "-1.5", "2e10", "3.25E-2"], bad=["+1", ".5", "1.", "NaN"])
    check(llama, {"type": "number", "minimum": 0}, good=["0", "1.5"], bad=["-1"])


def test_arrays(llama: Checker) -> None:
    check(
        llama,
        {"type": "array", "items": {"type": "integer"}, "minItems": 2},
        good=["[1, 2]", "[1,2,3,4]"],
        bad=["[]", "[1]"],
    )
    check(llama, {"type": "array", "maxItems": 0}, good=["[]"], bad=["[1]"])
    check(
        llama,
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        good=['["a", 1]'],
        bad=['["a"]', '[1, "a"]', '["a", 1, 2]'],
    )
    check(llama, {"type": "array"}, good=["[]", '[1, "x", {"a": null}]'], bad=["{}"])


def test_empty_schema_means_any_value(llama: Checker) -> None:
    grammar = schema_to_gbnf({})
    assert llama.parses(grammar)
    for text in ["1", '"x"', "[null]", '{"a": {}}']:
        assert llama.accepts(grammar, text)


def test_tool_call_grammar(llama: Checker) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "now"}},
        {
            "type": "function",
            "function": {
                "name": "search",
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string", "pattern": "^[a-z]+$"}},
                    "required": ["q"],
                },
            },
        },
    ]
    grammar = tool_call_grammar(tools)
    assert llama.parses(grammar), grammar
    assert llama.accepts(grammar, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert llama.accepts(grammar, '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "F"}}')
    assert llama.accepts(grammar, '{"name": "now", "arguments": {}}')
    assert llama.accepts(grammar, '{"name": "search", "arguments": {"q": "anything"}}')
    assert not llama.accepts(grammar, '{"name": "get_weather", "arguments": {}}')
    assert not llama.accepts(grammar, '{"name": "now", "arguments": {"city": "Paris"}}')
    assert not llama.accepts(grammar, '{"name": "other", "arguments": {}}')
    with pytest.raises(InvalidFormat, match="search"):
        tool_call_grammar(tools, strict=True)
    with pytest.raises(InvalidFormat):
        tool_call_grammar([])


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "string", "pattern": "^a$"}, "pattern"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {}, "then": {}}, "if/then/else"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "strin"}, "unknown type"),
        ({"type": "object", "frobnicate": 1}, "unsupported keyword"),
        ({"enum": []}, "non-empty"),
        (False, "matches nothing"),
        ({"$ref": "https://example.com/schema.json"}, "local"),
        ({"$ref": "#/$defs/Missing"}, "does not resolve"),
        ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "recurses"),
        ({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}}, "$ref": "#/$defs/A"}, "recurses"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "less than"),
        ({"type": "string", "minLength": -1}, "non-negative"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "not allowed"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
        ({"type": "number", "maximum": 3.5}, "non-integer numbers"),
        ({"type": "object", "properties": []}, "properties must be an object"),
        ({"type": "number", "multipleOf": 2}, "multipleOf"),
        ("not json", "not valid JSON"),
        (["a", "list"], "must be an object"),
    ],
)
def test_unsupported_or_invalid_schemas(schema: Any, message: str) -> None:
    with pytest.raises(InvalidFormat, match=message):
        schema_to_gbnf(schema)


def test_format_to_grammar() -> None:
    assert format_to_grammar(None) is None
    assert format_to_grammar("") is None
    assert format_to_grammar("json") == JSON_GBNF
    empty_object = {"type": "object", "properties": {}}
    assert format_to_grammar(empty_object) == schema_to_gbnf(empty_object)
    assert format_to_grammar('{"type": "integer"}') == schema_to_gbnf({"type": "integer"})
    with pytest.raises(InvalidFormat):
        format_to_grammar("yaml")
    with pytest.raises(InvalidFormat):
        format_to_grammar(42)


def test_annotations_are_ignored() -> None:
    plain = schema_to_gbnf({"type": "object", "properties": {"a": {"type": "string"}}})
    annotated = schema_to_gbnf(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "T",
            "description": "D",
            "type": "object",
            "properties": {"a": {"type": "string", "title": "A", "default": "x", "examples": ["y"]}},
        }
    )
    assert plain == annotated


def test_lenient_mode_drops_what_it_cannot_enforce() -> None:
    grammar = schema_to_gbnf({"type": "string", "pattern": "^a+$"}, strict=False)
    assert grammar == schema_to_gbnf({"type": "string"})

"""The HTTP shim under fuzzing: every endpoint gets malformed requests, and the server must hold.

Hypothesis writes requests of the wrong shape for each route of Ollama's API and the OpenAI-compatible
API: fields of the wrong type, missing or extra; numbers too large, negative, or not numbers at all;
deep nesting, long and odd text; bad options, messages, tools, formats, images and contexts; raw
bytes, odd content types, unknown paths and methods. After each request the server must have
answered below 500 (a 4xx naming a field it was given wrong, or a 2xx when the input happens to be
valid) with no internal error in the body or the stream, and must still answer ``GET /api/version``
and ``GET /api/ps``.
After the requests that change the store, and at the end, the store must be whole: every blob a
manifest names is there, and every blob hashes to its name.

Requests that could generate are kept cheap (`num_predict` 1 to 4), pulls name only a registry on
loopback (or a loopback port nothing listens on), and examples are derandomized, so a failure
reproduces.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import socket
import string
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import httpx
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from pictures import b64, png, png_header_only, wav
from servers import OCIRegistry, localllm_shim, sha256_digest, tiny_gguf

from localllm.errors import InvalidModelName
from localllm.http import ServerThread
from localllm.options import OPTION_TYPES
from localllm.registry.names import ModelName

Body = dict[str, Any]
Strategy = st.SearchStrategy


def fuzz(examples: int) -> settings:
    """Reproducible runs (no example database, no deadline: a request may load a model) of `examples` examples."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


MODEL = "smollm2"
EMBEDDER = "minilm"
VISION = "vis"  # SmolLM2 with a test projector: the model on which images are decoded
#: Names the store-changing requests play with; the models the others run on are never among them.
SCRATCH_NAMES = ("fuzz-a", "fuzz-b:v1", "scratch/fuzz-c:latest")
#: Where pulls go: a registry on loopback, written into names when the request is sent.
REGISTRY = "<registry>"

TINY = tiny_gguf(seed=7)
JUNK = b"these bytes are no model at all\n" * 8
UPLOADED = (sha256_digest(TINY), sha256_digest(JUNK))
NEVER_UPLOADED = "sha256:" + "ab" * 32


# --------------------------------------------------------------------------------------------------- values


BIG_NUMBERS = (
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    -(2**31) - 1,
    10**30,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    0.5,
    -1,
    0,
)
NUMBERS_AS_TEXT = (
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "inf",
    "1e400",
    "-1e400",
    "0x10",
    "1_000",
    "-1",
    "٣",
    "18446744073709551616",
    " 42 ",
    "4.0",
)
ODD_TEXT = (
    "",
    " ",
    "\x00",
    "\ud800",
    "a\udfffb",
    "\u202e\u2066rtl",
    "\ufeff",
    "🦙" * 40,
    "e" + "\u0301" * 200,
    "\r\n\t\x0b",
    "İß\ufb03",
    "null",
    "true",
    "{}",
    "[]",
    "{{ .Prompt }}",
    "{{ range .Messages }}{{ end }",
    "{% for x in y %}",
    "%s%n%x",
    "../../etc/passwd",
    "/dev/zero",
    "C:\\Windows",
    "~root",
    "model.gguf",
    MODEL,
    "SMOLLM2:LATEST",
)

#: Long text: a page, and more than the model's context holds.
long_text = st.sampled_from((300, 3000, 30_000)).map(lambda length: "x" * length)
odd_text: Strategy[str] = st.sampled_from(NUMBERS_AS_TEXT + ODD_TEXT) | long_text | st.text(max_size=30)
scalars: Strategy[Any] = (
    st.none()
    | st.booleans()
    | st.sampled_from(BIG_NUMBERS)
    | st.integers(-1000, 1000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | odd_text
)


def nested(depth: int) -> Any:
    """Arrays and objects, alternating, `depth` levels deep."""
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"deeper": value}
    return value


#: Around the shim's limit of 100 levels, and far beyond it (as far as this side's JSON encoder goes).
deep: Strategy[Any] = st.sampled_from((2, 97, 98, 99, 100, 101, 600)).map(nested)
junk: Strategy[Any] = (
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
        max_leaves=8,
    )
    | deep
)


def one_of_or_junk(*values: Any) -> Strategy[Any]:
    """Plausible values of a field, or anything at all."""
    return st.sampled_from(values) | junk


def mappings(values: Mapping[str, Strategy[Any]]) -> Strategy[dict[str, Any]]:
    """Objects with some of the known keys (each with its own values) and some unknown ones."""
    return st.fixed_dictionaries({}, optional=dict(values)).flatmap(
        lambda known: st.dictionaries(odd_text, junk, max_size=2).map(lambda extra: {**extra, **known})
    )


# Each option's values: wrong types, beyond its range or its C type, and valid ones that are cheap to run.
# Left out: a num_ctx that can never fit (an honest 500: InsufficientMemory), many threads (slow).
EDGE_VALUES: dict[str, tuple[Any, ...]] = {
    "num_ctx": (1, 8, 2048, 2**31, -1, 0),
    "num_batch": (1, 2, 7, 2048, 2**20 + 1, 0, 2**31),
    "num_gpu": (-1, 0, 999, -2, 2**31),
    "main_gpu": (0, 3, -1, 2**31),
    "num_thread": (0, 1, 2, 513, 2**31 - 1, 2**32, -1),
    "num_keep": (-1, 0, 2**31 - 1, -(2**31), 2**31),
    "seed": (-1, 0, 2**32, 2**63 - 1),
    "top_k": (-1, 0, 1, 2**31 - 1, 2**40),
    "top_p": (0, 1, 1e-308, 2, -1),
    "min_p": (0, 1, 0.5, 2),
    "typical_p": (0, 1e-308, 1, 1.5),
    "repeat_last_n": (-1, 0, 64, 4096, 2**31 - 1, -2, 2**40),
    "temperature": (0, 5e-324, 1e38, 1e308, -1),
    "repeat_penalty": (-1e308, 0, 2, 1e39),
    "presence_penalty": (-1e38, 0, 1e308),
    "frequency_penalty": (-1e308, 0, 1e38),
    "stop": ([""], "", ["\n"], [1], "x" * 1000, [], ["\ud800"]),
}
option_values = {name: one_of_or_junk(*EDGE_VALUES.get(name, (True, False))) for name in OPTION_TYPES}
options: Strategy[Any] = mappings(option_values) | junk

keep_alive = one_of_or_junk(0, -1, "5m", "0s", "-1m", "1h30m", "1e300", 1e300, 1e19, "99999999999h", "5 minutes")
think = one_of_or_junk(True, False, "low", "high", "max", "medium ")
PICTURE = b64(png((90, 160, 40)))
#: Images a stranger might send: real ones, declared sizes past every limit, audio, a path, bytes of nothing.
IMAGE_ITEMS = (
    PICTURE,
    f"data:image/png;base64,{PICTURE}",
    b64(png_header_only(60000, 60000)),
    b64(png_header_only(16384, 16384)),
    b64(png_header_only(1, 2**31 - 1)),
    b64(png((1, 2, 3), size=1)),
    b64(wav()),
    b64(b"ID3" + bytes(32)),
    b64(b"GIF89a" + bytes(16)),
    "/etc/passwd",
)
image_items = st.sampled_from(IMAGE_ITEMS) | st.binary(max_size=64).map(b64) | odd_text
images = one_of_or_junk(
    ["aGVsbG8="], ["not base64!"], [""], ["data:image/png;base64,AAAA"], "aGVsbG8=", [1]
) | st.lists(image_items, max_size=3)
json_schema = one_of_or_junk(
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "string", "pattern": "(a*)*b"},
    {"$ref": "#"},
    {"type": "array", "minItems": 10**9},
    {"type": "integer", "minimum": 1e308},
    {"enum": []},
    {"type": "nonsense"},
    {"type": "array", "maxItems": 10**8},
    {"anyOf": [{"$ref": "#/anyOf/0"}]},
)
format_value = st.sampled_from(("json", "", "xml", "JSON")) | json_schema
tool_calls = st.lists(
    mappings(
        {
            "id": one_of_or_junk("call_1", ""),
            "function": mappings(
                {
                    "name": one_of_or_junk("get_weather", ""),
                    "arguments": one_of_or_junk({"city": "Paris"}, '{"city": "Paris"}', "{not json", "", "[1]"),
                    "index": one_of_or_junk(0, -1, 2**40),
                }
            ),
        }
    ),
    max_size=2,
)
tools = st.lists(
    mappings(
        {
            "type": one_of_or_junk("function", "retrieval"),
            "function": mappings(
                {
                    "name": one_of_or_junk("get_weather", "", "a b"),
                    "description": odd_text,
                    "parameters": json_schema,
                }
            ),
        }
    )
    | junk,
    max_size=3,
)
tool_choice = one_of_or_junk("auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}})
roles = one_of_or_junk("user", "system", "assistant", "tool", "developer", "USER", "function", "")
ollama_messages = st.lists(
    mappings(
        {
            "role": roles,
            "content": odd_text | junk,
            "images": images,
            "thinking": odd_text | junk,
            "tool_calls": tool_calls | junk,
            "tool_name": odd_text | junk,
        }
    )
    | junk,
    max_size=3,
)
content_parts = st.lists(
    mappings(
        {
            "type": one_of_or_junk("text", "image_url", "input_audio"),
            "text": odd_text | junk,
            "image_url": one_of_or_junk(
                {"url": "data:image/png;base64,AAAA"}, {"url": "https://127.0.0.1:1/x.png"}, "data:,x"
            )
            | image_items.map(
                lambda item: {"url": item if item.startswith("data:") else f"data:image/png;base64,{item}"}
            ),
            "input_audio": one_of_or_junk(
                {"data": b64(wav()), "format": "wav"}, {"data": b64(wav()), "format": "mp3"}, {"data": PICTURE}
            )
            | image_items.map(lambda item: {"data": item, "format": "wav"}),
        }
    ),
    max_size=3,
)
openai_messages = st.lists(
    mappings(
        {
            "role": roles,
            "content": odd_text | content_parts | junk,
            "tool_calls": tool_calls | junk,
            "tool_call_id": odd_text | junk,
            "name": odd_text | junk,
            "reasoning": odd_text | junk,
        }
    )
    | junk,
    max_size=3,
)
token_ids = one_of_or_junk([1, 2, 3], [-1], [2**31], [49151, 49152], [2**62], [0] * 3000, [1.5], ["1"])
texts = odd_text | st.lists(odd_text, max_size=3) | junk
model_names = one_of_or_junk(MODEL, EMBEDDER, "nothere", "hf.co/x/y", "a" * 300, "../x", "smollm2:", "/x:y:z", "a//b")


# --------------------------------------------------------------------------------------------------- endpoints


@attrs.frozen
class Endpoint:
    """A JSON route, a valid body it answers cheaply, and the values to try in each field."""

    method: str
    path: str
    base: Body
    fields: Mapping[str, Strategy[Any]]

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


top_logprobs = one_of_or_junk(0, 5, 20, 21, -1, 2**31)
OLLAMA_GENERATION = {
    "model": model_names,
    "options": options,
    "keep_alive": keep_alive,
    "stream": junk,
    "logprobs": junk,
    "top_logprobs": top_logprobs,
}

GENERATE = Endpoint(
    "POST",
    "/api/generate",
    {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
    {
        **OLLAMA_GENERATION,
        "prompt": texts,
        "suffix": texts,
        "system": texts,
        "template": texts,
        "context": token_ids,
        "raw": junk,
        "format": format_value,
        "images": images,
        "think": think,
    },
)
CHAT = Endpoint(
    "POST",
    "/api/chat",
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 1}},
    {
        **OLLAMA_GENERATION,
        "messages": ollama_messages | junk,
        "tools": tools | junk,
        "tool_choice": tool_choice,
        "format": format_value,
        "think": think,
    },
)
EMBED = Endpoint(
    "POST",
    "/api/embed",
    {"model": EMBEDDER, "input": "hi"},
    {
        "model": model_names,
        "input": texts,
        "truncate": junk,
        "dimensions": one_of_or_junk(1, 0, -1, 2**31),
        "options": options,
        "keep_alive": keep_alive,
    },
)
EMBEDDINGS = Endpoint(
    "POST",
    "/api/embeddings",
    {"model": EMBEDDER, "prompt": "hi"},
    {"model": model_names, "prompt": texts, "options": options, "keep_alive": keep_alive},
)
SHOW = Endpoint("POST", "/api/show", {"model": MODEL}, {"model": model_names, "name": model_names, "verbose": junk})
PUSH = Endpoint("POST", "/api/push", {"model": MODEL}, {"model": model_names, "insecure": junk, "stream": junk})
PULL = Endpoint(
    "POST",
    "/api/pull",
    {"model": f"{REGISTRY}/library/tiny:latest", "insecure": True, "stream": False},
    {
        "model": one_of_or_junk(f"{REGISTRY}/library/tiny:latest", f"{REGISTRY}/library/missing:v2", "hf.co/x/y:Q4"),
        "name": model_names,
        "insecure": junk,
        "stream": junk,
    },
)

OPENAI_SAMPLING = {
    "model": model_names,
    "stream": junk,
    "stream_options": mappings({"include_usage": junk}) | junk,
    "max_tokens": one_of_or_junk(1, 0, -1, 2**31, 2**63),
    "max_completion_tokens": one_of_or_junk(2, 0, -5),
    "temperature": one_of_or_junk(0, 2, -1, 1e308),
    "top_p": one_of_or_junk(0, 1, 2),
    "seed": one_of_or_junk(0, -1, 2**63),
    "stop": one_of_or_junk("\n", [""], [1], ["a"] * 10),
    "frequency_penalty": one_of_or_junk(-2, 2, 1e308),
    "presence_penalty": one_of_or_junk(-2, 2, -1e308),
    "n": one_of_or_junk(1, 2, 0),
    "user": junk,
    "logit_bias": junk,
}
CHAT_COMPLETIONS = Endpoint(
    "POST",
    "/v1/chat/completions",
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    {
        **OPENAI_SAMPLING,
        "messages": openai_messages | junk,
        "tools": tools | junk,
        "tool_choice": tool_choice,
        "response_format": mappings(
            {
                "type": one_of_or_junk("text", "json_object", "json_schema", "yaml"),
                "json_schema": mappings({"name": odd_text, "schema": json_schema}) | junk,
            }
        )
        | junk,
        "reasoning_effort": one_of_or_junk("low", "none", "xhigh", "extreme"),
        "reasoning": mappings({"effort": one_of_or_junk("high", "ultra")}) | junk,
        "logprobs": junk,
        "top_logprobs": top_logprobs,
    },
)
COMPLETIONS = Endpoint(
    "POST",
    "/v1/completions",
    {"model": MODEL, "prompt": "hi", "max_tokens": 1},
    {
        **OPENAI_SAMPLING,
        "prompt": texts,
        "suffix": texts,
        "echo": junk,
        "best_of": one_of_or_junk(1, 2, 0),
        "logprobs": top_logprobs,  # the legacy API gives a count here
    },
)
OPENAI_EMBEDDINGS = Endpoint(
    "POST",
    "/v1/embeddings",
    {"model": EMBEDDER, "input": "hi"},
    {
        "model": model_names,
        "input": texts | one_of_or_junk([[1, 2]], [1, 2], []),
        "encoding_format": one_of_or_junk("float", "base64", "int8"),
        "dimensions": one_of_or_junk(1, 0, -1, 2**31),
        "user": junk,
    },
)

anthropic_blocks = st.lists(
    mappings(
        {
            "type": one_of_or_junk("text", "image", "tool_use", "tool_result", "thinking", "document"),
            "text": odd_text | junk,
            "source": mappings({"type": one_of_or_junk("base64", "url"), "data": one_of_or_junk("aGVsbG8=", "")}),
            "id": one_of_or_junk("toolu_1", ""),
            "name": one_of_or_junk("get_weather", ""),
            "input": one_of_or_junk({"city": "Paris"}, "[1]"),
            "tool_use_id": one_of_or_junk("toolu_1", ""),
            "content": odd_text | junk,
            "thinking": odd_text | junk,
        }
    ),
    max_size=3,
)
ANTHROPIC_MESSAGES = Endpoint(
    "POST",
    "/v1/messages",
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    {
        "model": model_names,
        "messages": st.lists(
            mappings({"role": one_of_or_junk("user", "assistant", "system"), "content": odd_text | anthropic_blocks}),
            max_size=3,
        )
        | junk,
        "system": odd_text | anthropic_blocks | junk,
        "max_tokens": one_of_or_junk(1, 0, -1, 2**31, 2**63),
        "temperature": one_of_or_junk(0, 2, -1, 1e308),
        "top_p": one_of_or_junk(0, 1, 2),
        "top_k": one_of_or_junk(0, 1, -1, 2**63),
        "stop_sequences": one_of_or_junk(["\n"], [""], [1], "x"),
        "stream": junk,
        "tools": st.lists(
            mappings({"name": one_of_or_junk("get_weather", ""), "description": odd_text, "input_schema": json_schema})
        )
        | junk,
        "tool_choice": mappings({"type": one_of_or_junk("auto", "any", "tool", "none"), "name": odd_text}) | junk,
        "thinking": mappings({"type": one_of_or_junk("enabled", "disabled"), "budget_tokens": junk}) | junk,
        "metadata": junk,
    },
)
response_items = st.lists(
    mappings(
        {
            "type": one_of_or_junk("message", "function_call", "function_call_output", "reasoning", "item_reference"),
            "role": roles,
            "content": odd_text | content_parts | junk,
            "call_id": odd_text | junk,
            "name": one_of_or_junk("get_weather", ""),
            "arguments": one_of_or_junk("{}", '{"city": "Paris"}', "[1]", "{"),
            "output": odd_text | junk,
        }
    ),
    max_size=4,
)
RESPONSES = Endpoint(
    "POST",
    "/v1/responses",
    {"model": MODEL, "input": "hi", "max_output_tokens": 1},
    {
        "model": model_names,
        "stream": junk,
        "input": texts | response_items,
        "instructions": texts,
        "max_output_tokens": one_of_or_junk(1, 0, -1, 2**31, 2**63),
        "temperature": one_of_or_junk(0, 2, -1, 1e308),
        "top_p": one_of_or_junk(0, 1, 2),
        "tools": st.lists(
            mappings(
                {
                    "type": one_of_or_junk("function", "web_search"),
                    "name": one_of_or_junk("get_weather", ""),
                    "parameters": json_schema | junk,
                }
            ),
            max_size=2,
        )
        | junk,
        "tool_choice": one_of_or_junk("auto", "none", "required", {"type": "function", "name": "get_weather"}),
        "text": mappings(
            {"format": mappings({"type": one_of_or_junk("text", "json_object", "json_schema"), "schema": json_schema})}
        )
        | junk,
        "reasoning": mappings({"effort": one_of_or_junk("low", "none", "ultra")}) | junk,
        "previous_response_id": junk,
        "store": junk,
    },
)

scratch_names = one_of_or_junk(*SCRATCH_NAMES, "a" * 81, "x/y/z/w", "..", "fuzz-a:")
digests = one_of_or_junk(*UPLOADED, NEVER_UPLOADED, "sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64, "")
modelfile_lines = st.sampled_from(
    (
        f"FROM {MODEL}",
        "FROM nothere",
        "FROM ./model.gguf",
        "FROM /etc/passwd",
        "FROM",
        "PARAMETER num_ctx 512",
        "PARAMETER num_ctx 99999999999999999999",
        "PARAMETER num_thread 100000",
        "PARAMETER repeat_penalty nan",
        "PARAMETER temperature inf",
        "PARAMETER stop <|im_end|>",
        "PARAMETER nonsense 1",
        "PARAMETER num_predict",
        'TEMPLATE """{{ .Prompt }}"""',
        'TEMPLATE """{{ .Prompt }"""',
        "TEMPLATE {% for %}",
        'SYSTEM """unterminated',
        "SYSTEM be brief",
        "ADAPTER ./lora.gguf",
        "LICENSE MIT",
        "MESSAGE user hi",
        "MESSAGE wizard hi",
        "REQUIRES 0.5.0",
        "REQUIRES soon",
        "\x00",
        "# a comment",
    )
)
modelfiles = st.lists(modelfile_lines | odd_text, min_size=1, max_size=5).map("\n".join)
CREATE = Endpoint(
    "POST",
    "/api/create",
    {"model": SCRATCH_NAMES[0], "from": MODEL, "stream": False},
    {
        "model": scratch_names,
        "from": model_names,
        "files": st.dictionaries(
            st.sampled_from(("model.gguf", "config.json", "../x", "a/b.gguf", "")) | odd_text, digests
        )
        | junk,
        "adapters": st.dictionaries(st.sampled_from(("lora.gguf", "../x")) | odd_text, digests) | junk,
        "template": texts,
        "system": texts,
        "parameters": mappings(option_values) | junk,
        "messages": ollama_messages | junk,
        "license": texts,
        "quantize": one_of_or_junk("q4_0", "Q8_0", "f16", "q4_K_M", "bogus", ""),
        "modelfile": modelfiles | junk,
        "stream": junk,
    },
)
COPY = Endpoint(
    "POST",
    "/api/copy",
    {"source": MODEL, "destination": SCRATCH_NAMES[1]},
    {"source": scratch_names | model_names, "destination": scratch_names},
)
DELETE = Endpoint("DELETE", "/api/delete", {"model": SCRATCH_NAMES[1]}, {"model": scratch_names, "name": scratch_names})

#: The generation routes again, on the model that decodes images, changing mostly what carries them.
VISION_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.just("hi"), "images": images}), min_size=1, max_size=2
)
OPENAI_VISION_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": content_parts}), min_size=1, max_size=2
)
VISION_GENERATE = Endpoint(
    "POST",
    "/api/generate",
    {**GENERATE.base, "model": VISION, "images": [PICTURE]},
    {"images": images, "prompt": texts, "raw": junk},
)
VISION_CHAT = Endpoint(
    "POST",
    "/api/chat",
    {**CHAT.base, "model": VISION, "messages": [{"role": "user", "content": "hi", "images": [PICTURE]}]},
    {"messages": VISION_MESSAGES | ollama_messages},
)
VISION_CHAT_COMPLETIONS = Endpoint(
    "POST",
    "/v1/chat/completions",
    {
        **CHAT_COMPLETIONS.base,
        "model": VISION,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PICTURE}"}}],
            }
        ],
    },
    {"messages": OPENAI_VISION_MESSAGES | openai_messages},
)

#: Answers in the 500s that are the documented answer, not a failure.
DOCUMENTED_5XX = {("POST /api/push", 501)}

#: Top-level keys no endpoint knows.
EXTRA_FIELDS = ("", "nonsense", "Model", "model ", "\ud800", "__proto__", "constructor")


# --------------------------------------------------------------------------------------------------- requests


@attrs.frozen
class Case:
    """One request, and the fields it got wrong (a 400 must name one of them)."""

    method: str
    path: str
    route: str
    content: bytes | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    blamed: frozenset[str] = frozenset()

    def describe(self) -> str:
        shown = self.content if self.content is None or len(self.content) <= 600 else self.content[:600] + b"..."
        return f"{self.method} {self.path} {shown!r}"


def key_names(value: Any, depth: int = 3) -> set[str]:
    """The keys of the objects in `value`, a few levels down."""
    if depth == 0:
        return set()
    if isinstance(value, dict):
        names = {key for key in value if isinstance(key, str)}
        return names.union(*(key_names(item, depth - 1) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(key_names(item, depth - 1) for item in value[:5]))
    return set()


@st.composite
def json_case(draw: st.DrawFn, endpoint: Endpoint, finish: Callable[[Body], Body] = lambda body: body) -> Case:
    """The endpoint's valid body with one to three fields replaced, removed or added; `finish` keeps it cheap."""
    body = copy.deepcopy(endpoint.base)
    blamed: set[str] = set()
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*endpoint.fields, *EXTRA_FIELDS]))
        if name in body and draw(st.integers(0, 4)) == 0:
            del body[name]
            blamed.add(name)
        else:
            body[name] = draw(endpoint.fields.get(name, junk))
            blamed.update({name, *key_names(body[name])})
    content = json.dumps(finish(body)).encode()
    return Case(
        endpoint.method, endpoint.path, endpoint.route, content, {"content-type": "application/json"}, frozenset(blamed)
    )


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def few_tokens(body: Body) -> Body:
    """Ollama's generation endpoints: any num_predict that would be taken becomes a small one."""
    options = body.get("options")
    if options is None:
        body["options"] = {"num_predict": 2}
    elif isinstance(options, dict) and (options.get("num_predict") is None or is_number(options["num_predict"])):
        body["options"] = {**options, "num_predict": 1 + len(options) % 4}
    return body


def few_openai_tokens(body: Body) -> Body:
    """The OpenAI endpoints: max_tokens (or max_completion_tokens) small whenever one would be taken."""
    limits = [key for key in ("max_completion_tokens", "max_tokens") if body.get(key) is not None]
    for key in limits:
        if is_number(body[key]):
            body[key] = 3
    if not limits:
        body["max_tokens"] = 2
    return body


def few_response_tokens(body: Body) -> Body:
    """/v1/responses: max_output_tokens small whenever it would be taken."""
    if body.get("max_output_tokens") is None or is_number(body["max_output_tokens"]):
        body["max_output_tokens"] = 3
    return body


def names_model(value: Any, model: str) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return ModelName.parse(value) == ModelName.parse(model)
    except InvalidModelName:
        return False


def spare_the_models(body: Body) -> Body:
    """Store changes never replace or delete the models the other tests run on."""
    for key in ("model", "name", "destination"):
        if any(names_model(body.get(key), model) for model in (MODEL, EMBEDDER, VISION)):
            body[key] = SCRATCH_NAMES[2]
    return body


def loopback_only(registry: str) -> Callable[[Body], Body]:
    """A pull names `registry` (on loopback), or a name the shim refuses: never a host on the network."""

    def finish(body: Body) -> Body:
        for key in ("model", "name"):
            value = body.get(key)
            if not isinstance(value, str):
                continue
            value = value.replace(REGISTRY, registry)
            try:
                host = ModelName.parse(value).host
            except InvalidModelName:
                host = registry
            body[key] = value if host == registry else f"{registry}/library/tiny:latest"
        return body

    return finish


# --------------------------------------------------------------------------------------------------- checks


def error_messages(answer: httpx.Response) -> list[str]:
    """Every error the answer carries: its body's, or the ones written into its stream."""
    kind = answer.headers.get("content-type", "")
    if kind.startswith("application/x-ndjson"):
        items = [json.loads(line) for line in answer.text.splitlines() if line.strip()]
    elif kind.startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in answer.text.splitlines() if line.startswith("data: ")]
        items = [json.loads(event) for event in events if event != "[DONE]"]
    elif kind.startswith("application/json") and answer.content:
        items = [answer.json()]
    else:
        return []
    messages = []
    for item in items:
        error = item.get("error") if isinstance(item, dict) else None
        if isinstance(error, dict):  # OpenAI's shape: its type tells a server error from a client's
            assert error.get("type") not in ("api_error", "server_error"), error
            error = error.get("message")
        if error is not None:
            messages.append(str(error))
    return messages


#: Other words by which errors name a field: a format is a "JSON schema" to the engine, the text that goes into
#: the prompt is "the prompt" once it does not fit, the thinking asked for over OpenAI's API is Ollama's `think`,
#: and a key without a name is named by the path below it.
ALIASES = {
    "format": ("json schema",),
    "response_format": ("json schema",),
    "quantize": ("quantization",),
    **dict.fromkeys(("system", "suffix", "template", "context", "tools"), ("prompt",)),
    "messages": ("prompt", "image", "audio"),  # a message's images and audio clips are named as such
    **dict.fromkeys(("reasoning_effort", "reasoning"), ("think",)),
    "": ("request body", "'["),
}


def names_a_field(message: str, blamed: frozenset[str]) -> bool:
    """Whether an error names one of the fields made wrong (a key no text can hold is named by its problem)."""
    folded = message.casefold()
    if "request body is nested" in folded:  # so deep that the parser gave up before seeing any field
        return True
    for name in blamed:
        if re.search("[\ud800-\udfff]", name):
            name = "surrogate"
        words = (name.casefold().rstrip("s"), *ALIASES.get(name, ())) if name else ALIASES[name]
        if any(word in folded for word in words):
            return True
    return False


@attrs.define
class Fuzzer:
    """Sends cases to the shim and checks each answer, and that the server is still there."""

    http: httpx.Client
    registry: str
    answered: dict[str, Counter[str]] = attrs.field(factory=dict)  # route -> status class ("2xx", ...) -> count

    def send(self, case: Case) -> httpx.Response:
        answer = self.http.request(case.method, case.path, content=case.content, headers=dict(case.headers))
        self.answered.setdefault(case.route, Counter())[f"{answer.status_code // 100}xx"] += 1
        where = case.describe()
        documented = (case.route, answer.status_code) in DOCUMENTED_5XX
        assert answer.status_code < 500 or documented, f"{where}\n-> {answer.status_code} {answer.text[:1000]}"
        messages = error_messages(answer)
        for message in messages:
            assert not message.startswith("internal error"), f"{where}\n-> {message}"
        if answer.status_code == 400 and case.blamed:
            assert any(names_a_field(m, case.blamed) for m in messages), f"{where}\n-> 400 {messages} {case.blamed}"
        assert self.http.get("/api/version").status_code == 200, f"the server stopped answering after {where}"
        # What a request leaves behind in the loaded models (a keep_alive, options) must not break listing them.
        running = self.http.get("/api/ps")
        assert running.status_code == 200, f"/api/ps broke after {where}\n-> {running.status_code} {running.text[:500]}"
        return answer


@functools.cache
def sha256_of(path: Path, size: int, modified_ns: int) -> str:
    """A file's sha256, computed once per version of it (the store holds a model of 100 MB)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_problems(models: Path) -> list[str]:
    """What is wrong with an Ollama-layout store: missing or misnamed blobs, and leftovers."""
    blobs = models / "blobs"
    problems = []
    for blob in blobs.iterdir():
        match = re.fullmatch(r"sha256-([0-9a-f]{64})", blob.name)
        if match is None:
            problems.append(f"a leftover file in blobs: {blob.name}")
        elif sha256_of(blob, blob.stat().st_size, blob.stat().st_mtime_ns) != match.group(1):
            problems.append(f"{blob.name} does not hash to its name")
    for manifest in (models / "manifests").rglob("*"):
        if not manifest.is_file():
            continue
        data = json.loads(manifest.read_bytes())
        for layer in [data["config"], *data["layers"]]:
            if not (blobs / layer["digest"].replace(":", "-")).is_file():
                problems.append(f"{manifest.relative_to(models)} names {layer['digest']}, which is not stored")
    return problems


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def server(home: Path, smollm2_path: Path) -> Iterator[ServerThread]:
    with localllm_shim(home, smollm2_path) as running:
        yield running


@pytest.fixture(scope="module")
def registry() -> Iterator[OCIRegistry]:
    running = OCIRegistry().start()
    try:
        running.add_model("library/tiny", "latest", tiny_gguf(seed=3))
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def fuzzer(
    server: ServerThread, registry: OCIRegistry, minilm_gguf: Path, smollm2_path: Path, projector_path: Path
) -> Iterator[Fuzzer]:
    """The client, with the blobs the requests name uploaded, and an embedding model and a vision model created
    as Ollama's clients do."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        fuzzer = Fuzzer(http, registry.host)
        embedder, text_model, projector = (path.read_bytes() for path in (minilm_gguf, smollm2_path, projector_path))
        for data in (TINY, JUNK, embedder, text_model, projector):
            fuzzer.send(Case("POST", f"/api/blobs/{sha256_digest(data)}", "POST /api/blobs/{digest}", data))
        vision_files = {"model.gguf": sha256_digest(text_model), "mmproj.gguf": sha256_digest(projector)}
        for name, files, parameters in (
            (EMBEDDER, {"minilm.gguf": sha256_digest(embedder)}, {"num_thread": 1}),
            (VISION, vision_files, {"num_thread": 1, "num_ctx": 2048}),
        ):
            body = {"model": name, "files": files, "parameters": parameters, "stream": False}
            created = fuzzer.send(Case("POST", "/api/create", "POST /api/create", json.dumps(body).encode()))
            assert created.status_code == 200, created.text
        yield fuzzer
        total = sum(fuzzer.answered.values(), Counter())
        print(f"\nfuzz requests: {total.total()} on {len(fuzzer.answered)} routes, {dict(sorted(total.items()))}")
        for route, statuses in sorted(fuzzer.answered.items()):
            print(f"  {statuses.total():5d}  {route:32}  {dict(sorted(statuses.items()))}")


# --------------------------------------------------------------------------------------------------- generation


@fuzz(200)
@given(case=json_case(GENERATE, few_tokens))
def test_generate(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(200)
@given(case=json_case(CHAT, few_tokens))
def test_chat(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(150)
@given(case=json_case(CHAT_COMPLETIONS, few_openai_tokens))
def test_openai_chat_completions(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(120)
@given(
    case=st.sampled_from((VISION_GENERATE, VISION_CHAT, VISION_CHAT_COMPLETIONS)).flatmap(
        lambda endpoint: json_case(endpoint, few_openai_tokens if endpoint.path.startswith("/v1") else few_tokens)
    )
)
def test_images_on_a_vision_model(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(120)
@given(case=json_case(COMPLETIONS, few_openai_tokens))
def test_openai_completions(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(120)
@given(case=json_case(RESPONSES, few_response_tokens))
def test_openai_responses(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(150)
@given(case=json_case(ANTHROPIC_MESSAGES, few_openai_tokens))
def test_anthropic_messages(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


@fuzz(150)
@given(case=st.sampled_from((EMBED, EMBEDDINGS, OPENAI_EMBEDDINGS)).flatmap(json_case))
def test_embeddings(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


# --------------------------------------------------------------------------------------------------- reading the store


@fuzz(80)
@given(case=st.sampled_from((SHOW, PUSH)).flatmap(json_case))
def test_show_and_push(fuzzer: Fuzzer, case: Case) -> None:
    fuzzer.send(case)


query_text = st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), max_size=20)  # below the surrogates
listing_routes = st.sampled_from(
    (
        ("GET", "/api/tags"),
        ("HEAD", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/api/version"),
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/v1/models"),
    )
)


@fuzz(40)
@given(route=listing_routes, query=st.dictionaries(query_text, query_text, max_size=3), body=st.binary(max_size=64))
def test_listings_ignore_queries_and_bodies(
    fuzzer: Fuzzer, route: tuple[str, str], query: dict[str, str], body: bytes
) -> None:
    method, path = route
    answer = fuzzer.send(Case(method, f"{path}?{httpx.QueryParams(query)}", f"{method} {path}", body or None))
    assert answer.status_code == 200


def in_path(value: Any, safe: str) -> str:
    """Any value as (a bounded length of) text in a URL path."""
    return quote(str(value)[:2000], safe=safe, errors="surrogatepass")


#: Encoded already: what a path may spell that no text quoted for it would.
ENCODED = ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%00", "%ff", "%ED%A0%80")


@fuzz(60)
@given(
    model=st.sampled_from(ENCODED)
    | one_of_or_junk(MODEL, f"{MODEL}:latest", "a/b/c/d", "x" * 400).map(lambda value: in_path(value, "/:"))
)
def test_openai_model_by_name(fuzzer: Fuzzer, model: str) -> None:
    fuzzer.send(Case("GET", f"/v1/models/{model}", "GET /v1/models/{model}"))


# --------------------------------------------------------------------------------------------------- pull


@fuzz(80)
@given(case=st.data())
def test_pull(fuzzer: Fuzzer, case: st.DataObject) -> None:
    fuzzer.send(case.draw(json_case(PULL, loopback_only(fuzzer.registry))))


def test_a_pull_from_nowhere_streams_its_start_and_stops_when_left(fuzzer: Fuzzer) -> None:
    """A registry port nothing listens on: the pull retries for long, so read its first line and leave."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        body = {"model": f"127.0.0.1:{unused.getsockname()[1]}/library/tiny:latest", "insecure": True}
        with fuzzer.http.stream("POST", "/api/pull", json=body) as answer:
            assert answer.status_code == 200
            first = json.loads(next(answer.iter_lines()))
        fuzzer.answered["POST /api/pull"]["2xx"] += 1
    assert first == {"status": "pulling manifest"}
    assert fuzzer.http.get("/api/version").status_code == 200


# --------------------------------------------------------------------------------------------------- changing the store


@fuzz(100)
@given(
    digest=st.sampled_from(ENCODED)
    | one_of_or_junk(*UPLOADED, NEVER_UPLOADED, "sha256-" + "a" * 64, "sha256:" + "G" * 64, "sha256:").map(
        lambda value: in_path(value, ":")
    ),
    data=st.sampled_from((TINY, JUNK, b"")) | st.binary(max_size=512),
    method=st.sampled_from(("HEAD", "POST")),
    matching=st.booleans(),
)
def test_blobs(fuzzer: Fuzzer, digest: str, data: bytes, method: str, matching: bool) -> None:
    if matching:
        digest = sha256_digest(data)
    route = f"{method} /api/blobs/{{digest}}"
    answer = fuzzer.send(Case(method, f"/api/blobs/{digest}", route, data or None))
    if answer.status_code < 300:  # a blob is stored under that digest (sent now, or already there)
        assert fuzzer.http.head(f"/api/blobs/{digest}").status_code == 200


@fuzz(200)
@given(case=json_case(CREATE, spare_the_models))
def test_create(fuzzer: Fuzzer, home: Path, case: Case) -> None:
    fuzzer.send(case)
    assert store_problems(home / "models") == []


@fuzz(150)
@given(case=st.sampled_from((COPY, DELETE)).flatmap(lambda endpoint: json_case(endpoint, spare_the_models)))
def test_copy_and_delete(fuzzer: Fuzzer, home: Path, case: Case) -> None:
    fuzzer.send(case)
    assert store_problems(home / "models") == []


# --------------------------------------------------------------------------------------------------- the wire

OLLAMA_ROUTES = (GENERATE, CHAT, EMBED, EMBEDDINGS, SHOW, PUSH, PULL, CREATE, COPY, DELETE)
JSON_ROUTES = (*OLLAMA_ROUTES, CHAT_COMPLETIONS, COMPLETIONS, OPENAI_EMBEDDINGS, RESPONSES, ANTHROPIC_MESSAGES)
CONTENT_TYPES = (
    "application/json",
    "application/json; charset=utf-16",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
    "*/*",
)
# Whatever parses names a path as the model, which every route refuses (a pull never leaves this machine).
raw_bodies = st.binary(max_size=2048) | st.sampled_from(
    (
        b"",
        b"null",
        b"[]",
        b'"smollm2"',
        b"1e400",
        b"{",
        b'{"model": "\xff\xfe"}',
        b'\xef\xbb\xbf{"model": "../x"}',
        '{"model": "../x", "source": "../x"}'.encode("utf-16"),
        b'{"model": "../x", "model": 1}',
        b"model=smollm2&prompt=hi",
        b"{" * 100_000,
        b"[" * 50 + b"]" * 50,
        b'{"model": "../x"}' + b" " * 100_000,
        b'{"model": NaN}',
        b"\x00" * 64,
    )
)


@fuzz(300)
@given(endpoint=st.sampled_from(JSON_ROUTES), body=raw_bodies, content_type=st.sampled_from(CONTENT_TYPES))
def test_raw_bytes_and_content_types(fuzzer: Fuzzer, endpoint: Endpoint, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    answer = fuzzer.send(Case(endpoint.method, endpoint.path, endpoint.route, body, headers))
    assert answer.status_code >= 400


#: The methods each route answers (GET routes answer HEAD too).
ROUTES: dict[str, frozenset[str]] = {
    **{endpoint.path: frozenset({endpoint.method}) for endpoint in JSON_ROUTES},
    **{path: frozenset({"GET", "HEAD"}) for path in ("/", "/api/version", "/api/tags", "/api/ps", "/v1/models")},
    f"/api/blobs/{UPLOADED[0]}": frozenset({"HEAD", "POST"}),
    f"/v1/models/{MODEL}": frozenset({"GET", "HEAD"}),
}
# Generated tails have no dots: the client itself would resolve "." and ".." segments.
odd_paths = st.sampled_from(
    (
        "/api",
        "/api/",
        "/api/generate/",
        "//api//generate",
        "/API/GENERATE",
        "/api/blobs/",
        "/api/blobs/sha256:../../etc/passwd",
        "/api/blobs/%2e%2e%2fetc",
        "/v1",
        "/v1/models/",
        "/v1/chat",
        "/v1/chat/completions/x",
        "/%00",
        "/api/%ff",
        "/" + "a" * 4000,
        "/api/" + "%F0%9F%A6%99" * 20,
    )
) | st.text(string.ascii_letters + string.digits + "-_~:/@!$&'()*+,;=", max_size=30).map(lambda tail: "/api/" + tail)


@fuzz(200)
@given(
    path=st.sampled_from(sorted(ROUTES)) | odd_paths,
    method=st.sampled_from(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "FUZZ")),
)
def test_paths_and_methods(fuzzer: Fuzzer, path: str, method: str) -> None:
    """A method a route does not answer, or a path no route has (the routes themselves are fuzzed above)."""
    assume(method not in ROUTES.get(path, ()))
    answer = fuzzer.send(Case(method, path, "paths and methods"))
    assert answer.status_code >= 300, f"{method} {path} -> {answer.status_code}"


# --------------------------------------------------------------------------------------------------- at the end


def test_the_store_is_whole(fuzzer: Fuzzer, home: Path) -> None:
    assert store_problems(home / "models") == []
    tags = fuzzer.http.get("/api/tags").json()["models"]
    assert MODEL in {model["name"].split(":")[0] for model in tags}

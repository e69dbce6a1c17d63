"""Requests as values: built and checked once, sent by `Engine.send`, the same from every front door."""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest

import localllm
from localllm import ChatRequest, EmbedRequest, Engine, EngineAPI, GenerateRequest
from localllm.request import as_json

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the loop does not matter here; the stream tests run both


# --------------------------------------------------------------------------- built and checked once


@pytest.mark.fast
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ChatRequest(""), "model must be a non-empty string"),
        (lambda: ChatRequest("m", "hi"), "messages must be a list"),
        (lambda: ChatRequest("m", [{"content": "no role"}]), "needs a 'role'"),
        (lambda: ChatRequest("m", think="loud"), "think must be true, false or one of low"),
        (lambda: ChatRequest("m", top_logprobs=21), "top_logprobs must be between 0 and 20"),
        (lambda: ChatRequest("m", truncate="yes"), "truncate must be true or false"),
        (lambda: ChatRequest("m", options={"temperature": "hot"}), "temperature"),
        (lambda: ChatRequest("m", options=[1, 2]), "options must be a mapping"),
        (lambda: ChatRequest("m", keep_alive="soon"), "keep_alive"),
        (lambda: ChatRequest("m", format=3), 'format must be "json" or a JSON schema'),
        (lambda: GenerateRequest("m", 42), "prompt must be a string"),
        (lambda: GenerateRequest("m", "x", context=[1, -2]), "context must be token ids"),
        (lambda: GenerateRequest("m", "x", system=7), "system must be a string"),
        (lambda: EmbedRequest("m", [1, 2]), "input 0 must be a string"),
        (lambda: EmbedRequest("m", "x", dimensions=0), "dimensions must be a positive integer"),
    ],
)
def test_a_bad_field_is_refused_where_the_request_is_built(build: Any, message: str) -> None:
    with pytest.raises(localllm.LocalLLMError, match=message):
        build()


@pytest.mark.fast
def test_two_tools_of_one_name_are_refused() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(localllm.ToolError, match="two tools are named 'f'"):
        ChatRequest("m", HELLO, tools=[tool, tool])


@pytest.mark.fast
def test_inputs_are_kept_in_one_plain_form() -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    request = ChatRequest("m", [localllm.Message(role="user", content="hi")], tools=[add], format="")
    assert request.messages == (localllm.Message(role="user", content="hi"),)
    assert request.tools is not None and request.tools[0]["function"]["name"] == "add"
    assert request.format is None
    assert ChatRequest("m", HELLO) == ChatRequest("m", tuple(HELLO))  # compared by value
    assert EmbedRequest("m", "one").input == ("one",) and EmbedRequest("m", "").is_empty
    assert GenerateRequest("m", None).prompt == "" and GenerateRequest("m").is_empty


@pytest.mark.fast
def test_a_request_is_frozen_and_pickles() -> None:
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    request = ChatRequest("m", HELLO, tools=[add], options={"temperature": 0}, think="high")
    with pytest.raises(AttributeError):
        request.model = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(request)) == request  # what a Ray node receives


@pytest.mark.fast
def test_an_unknown_option_warns_at_the_callers_line(home: Path) -> None:
    with pytest.warns(UserWarning, match="ignoring unknown option 'tempreture'") as built:
        ChatRequest("m", HELLO, options={"tempreture": 0})
    assert built[0].filename == __file__
    engine = Engine(home)
    with pytest.warns(UserWarning, match="tempreture") as called:
        engine.chat("m", HELLO, options={"tempreture": 0})  # not awaited: nothing runs
    assert called[0].filename == __file__


@pytest.mark.fast
def test_as_json_is_ollamas_request_body() -> None:
    request = ChatRequest("m", HELLO, options={"temperature": 0}, think=True, keep_alive="5m")
    assert as_json(request) == {
        "model": "m",
        "messages": [{"role": "user", "content": "Say hello."}],
        "options": {"temperature": 0.0},
        "think": True,
        "keep_alive": "5m",
    }
    assert as_json(GenerateRequest("m", "hi", raw=True)) == {"model": "m", "prompt": "hi", "raw": True}


# --------------------------------------------------------------------------- one surface


@pytest.mark.fast
@pytest.mark.parametrize(("method", "request_class"), [("chat", ChatRequest), ("generate", GenerateRequest)])
def test_signatures_show_the_request_fields(method: str, request_class: type) -> None:
    fields = {p.name for p in inspect.signature(request_class).parameters.values() if p.kind is p.KEYWORD_ONLY}
    for owner in (Engine, localllm.Client):
        shown = set(inspect.signature(getattr(owner, method)).parameters)
        assert fields <= shown, f"{owner.__name__}.{method} does not show {sorted(fields - shown)}"


def _protocol_members() -> list[str]:
    return sorted(
        name for name in vars(EngineAPI) if not name.startswith("_") and callable(getattr(EngineAPI, name, None))
    )


@pytest.mark.fast
def test_engine_and_cluster_engine_are_engine_apis(home: Path) -> None:
    from localllm.ray import ClusterEngine

    assert {"send", "generate", "chat", "embed", "embeddings", "list", "show", "ps", "pull", "create"} <= set(
        _protocol_members()
    )
    cluster = ClusterEngine()  # nothing starts until it is used
    for engine in (Engine(home), cluster):
        assert isinstance(engine, EngineAPI)
        for name in _protocol_members():
            member = getattr(type(engine), name)
            assert inspect.iscoroutinefunction(member) == inspect.iscoroutinefunction(getattr(EngineAPI, name)), (
                f"{type(engine).__name__}.{name} is not async as EngineAPI.{name} is"
            )
    cluster.close()


@pytest.mark.fast
def test_send_refuses_what_is_not_a_request(home: Path) -> None:
    with pytest.raises(
        localllm.InvalidRequest, match="send\\(\\) takes a GenerateRequest, ChatRequest or EmbedRequest"
    ):
        Engine(home).send({"model": "m"})  # type: ignore[call-overload]


# --------------------------------------------------------------------------- sent on the real model


async def test_send_runs_each_kind_of_request(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        chat = ChatRequest(model, HELLO, options={**GREEDY, "num_predict": 8})
        sent = await engine.send(chat)
        assert isinstance(sent, localllm.ChatResponse) and sent.message.content
        assert (await engine.chat(model, HELLO, options={**GREEDY, "num_predict": 8})).message.content == (
            sent.message.content
        )
        chunks = [chunk async for chunk in await engine.send(chat, stream=True)]
        assert chunks[-1].done and "".join(c.message.content for c in chunks) == sent.message.content

        generated = await engine.send(GenerateRequest(model, "The sky is", options={**GREEDY, "num_predict": 4}))
        assert generated.done and generated.eval_count == 4 and generated.context

        embedded = await engine.send(EmbedRequest(model, ["a", "b"], dimensions=8))
        assert isinstance(embedded, localllm.EmbedResponse)
        assert [len(v) for v in embedded.embeddings] == [8, 8]


def test_the_sync_client_sends_requests(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    with localllm.Client(home) as client, warnings.catch_warnings():
        warnings.simplefilter("error")
        request = ChatRequest(model, HELLO, options={**GREEDY, "num_predict": 6})
        whole = client.send(request)
        streamed = list(client.send(request, stream=True))
        assert "".join(c.message.content for c in streamed) == whole.message.content
        assert client.send(EmbedRequest(model, "x")).embeddings


async def test_the_prompt_is_ready_before_a_runner_is_leased(smollm2_path: Path, home: Path) -> None:
    """The template comes from the GGUF's metadata: a request it refuses loads nothing, and `render`
    shows a prompt without loading the model."""
    model = str(smollm2_path)
    async with Engine(home) as engine:
        with pytest.raises(localllm.CapabilityError, match="does not support thinking"):
            await engine.chat(model, HELLO, think=True)
        with pytest.raises(localllm.InvalidRequest, match="tool_choice"):
            await engine.chat(model, HELLO, tools=[_tool("f")], tool_choice="sometimes")
        prompt = await engine.render(ChatRequest(model, HELLO))
        assert prompt.endswith("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n")
        assert (await engine.render(GenerateRequest(model, "raw text", raw=True))) == "raw text"
        assert (await engine.ps()).models == []
        reply = await engine.chat(model, HELLO, options={**GREEDY, "num_predict": 2})
        assert reply.done and [m.name for m in (await engine.ps()).models] == [model]


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.fast
@pytest.mark.parametrize(
    ("fields", "source"),
    [
        ("GenerateFields", GenerateRequest),
        ("ChatFields", ChatRequest),
        ("EmbedFields", EmbedRequest),
        ("CreateFields", Engine.create),
        ("EngineArguments", Engine),
    ],
)
def test_the_typed_keywords_match_what_takes_them(fields: str, source: Any) -> None:
    """The `TypedDict`s type checkers read for ``**fields`` name exactly the keywords that are taken."""
    import localllm.engine
    import localllm.request

    typed = getattr(localllm.request, fields, None) or getattr(localllm.engine, fields)
    keywords = {p.name for p in inspect.signature(source).parameters.values() if p.kind is p.KEYWORD_ONLY}
    positional_too = {"suffix"} if source is GenerateRequest else set()  # generate(model, prompt, suffix)
    assert set(typed.__annotations__) == keywords - positional_too - {"stream"}

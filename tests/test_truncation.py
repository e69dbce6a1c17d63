"""Conversations longer than the context, as Ollama handles them: the oldest messages are dropped
(system messages and the latest message stay), `truncate=False` refuses instead, on every front door."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import localllm_shim

import localllm
from localllm import ContextLengthExceeded, Engine
from localllm.chat.base import ChatTemplate
from localllm.chat.prompt import fit_conversation, prepare_chat
from localllm.chat.template import load_template
from localllm.gguf.inspect import read_info
from localllm.http import ServerThread

GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 8}
SMALL_CONTEXT = {**GREEDY, "num_ctx": 512}
SYSTEM = {"role": "system", "content": "You are a terse assistant. Always answer in one short sentence."}

Conversation = list[Mapping[str, Any]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the truncation is the same under every event loop; the model runs are what cost


def long_chat(turns: int = 59) -> Conversation:
    """A system message, then `turns` alternating user and assistant messages ending with a user's."""
    messages: Conversation = [SYSTEM]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        text = f"Message number {i}: the weather in town {i} was mild, the market sold apples and pears, and the "
        messages.append({"role": role, "content": text + "train left on time in the morning."})
    messages[-1] = {"role": "user", "content": "Which number was the last message?"}
    return messages


def ollama_cut(
    messages: Sequence[Mapping[str, Any]], render: Callable[[Conversation], str], fits: Callable[[str], bool]
) -> Conversation:
    """Ollama's own walk (server/prompt.go): try each cut from the oldest message on, the first that fits wins."""
    last = len(messages) - 1
    for start in range(last + 1):
        kept = [m for m in messages[:start] if m["role"] == "system"] + list(messages[start:])
        if fits(render(kept)) or start == last:
            return kept
    raise AssertionError("unreachable")


def smollm2_template(path: Path) -> ChatTemplate:
    info = read_info(path)
    return load_template(info.chat_template, bos_token=info.bos_token or "", eos_token=info.eos_token or "")


def chatml_render(template: ChatTemplate) -> Callable[[Conversation], str]:
    return lambda conversation: template.render(conversation, add_generation_prompt=True)


# --------------------------------------------------------------------------- the cut itself


def test_the_cut_is_ollamas_for_every_budget(smollm2_path: Path) -> None:
    render = chatml_render(smollm2_template(smollm2_path))
    messages = long_chat(21)
    messages.insert(9, {"role": "system", "content": "A second system message, in the middle."})
    full = len(render(messages))
    for budget in range(0, full + 50, 37):

        def fits(prompt: str, budget: int = budget) -> bool:
            return len(prompt) <= budget

        kept, prompt = fit_conversation(messages, render, fits)
        assert kept == ollama_cut(messages, render, fits), budget
        assert prompt == render(kept)
        assert kept[-1] == messages[-1]  # the latest message always stays
        assert [m for m in kept if m["role"] == "system"] == [m for m in messages if m["role"] == "system"]
    assert fit_conversation(messages, render, lambda p: True) == (messages, render(messages))


def test_system_messages_before_the_cut_lead_the_prompt(smollm2_path: Path) -> None:
    render = chatml_render(smollm2_template(smollm2_path))
    messages = long_chat(9)
    kept, prompt = fit_conversation(messages, render, lambda p: len(p) <= len(render([SYSTEM, *messages[-3:]])))
    assert kept == [SYSTEM, *messages[-3:]]
    assert prompt.index(SYSTEM["content"]) < prompt.index(messages[-3]["content"])
    assert messages[-4]["content"] not in prompt


def test_a_latest_message_too_long_alone_is_kept_with_the_system_messages(smollm2_path: Path) -> None:
    render = chatml_render(smollm2_template(smollm2_path))
    messages = long_chat(7)
    kept, _ = fit_conversation(messages, render, lambda p: len(p) <= 10)
    assert kept == [SYSTEM, messages[-1]]


def test_tool_instructions_count_against_the_context(smollm2_path: Path) -> None:
    """A template without tools gets them described in its system prompt: the cut counts that text too."""
    template = smollm2_template(smollm2_path)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = long_chat(9)
    plain = prepare_chat(template, messages)
    budget = len(plain.prompt)
    with_tools = prepare_chat(template, messages, tools=[tool], fits=lambda p: len(p) <= budget)
    assert len(with_tools.prompt) <= budget and "get_weather" in with_tools.prompt
    assert SYSTEM["content"] in with_tools.prompt and messages[-1]["content"] in with_tools.prompt
    assert messages[1]["content"] not in with_tools.prompt
    # The reply that turns out to be text is written from the same, cut conversation.
    assert with_tools.text_reply is not None and messages[1]["content"] not in with_tools.text_reply.prompt


# --------------------------------------------------------------------------- on the engine


async def loaded_runner(engine: Engine) -> Any:
    return (await engine.scheduler.running())[0].runner


async def expected_prompt_tokens(engine: Engine, path: Path, messages: Conversation, limit: int) -> list[int]:
    """The tokens Ollama's walk would send: the template rendered and tokenized by the loaded model."""
    runner = await loaded_runner(engine)
    bos, eos = runner.special_token_text()
    info = read_info(path)
    render = chatml_render(load_template(info.chat_template, bos_token=bos, eos_token=eos))
    kept = ollama_cut(messages, render, lambda prompt: len(runner.tokenize(prompt)) <= limit)
    assert kept[0] == SYSTEM and kept[-1] == messages[-1] and len(kept) < len(messages)
    tokens: list[int] = runner.tokenize(render(kept))
    return tokens


async def test_a_long_chat_drops_its_oldest_messages(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    messages = long_chat()
    async with Engine(home) as engine:
        reply = await engine.chat(model, messages, options=SMALL_CONTEXT)
        expected = await expected_prompt_tokens(engine, smollm2_path, messages, 512)
        with pytest.raises(ContextLengthExceeded, match="context holds 512") as refused:
            await engine.chat(model, messages, options=SMALL_CONTEXT, truncate=False)
    assert reply.done and reply.eval_count >= 1
    assert reply.prompt_eval_count == len(expected) <= 512  # what was sent: the system message, then the newest
    assert refused.value.limit == 512 and refused.value.tokens is not None and refused.value.tokens > 2000


async def test_a_chat_that_fits_is_sent_whole(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    messages = long_chat(5)
    async with Engine(home) as engine:
        truncated = await engine.chat(model, messages, options=SMALL_CONTEXT)
        whole = await engine.chat(model, messages, options=SMALL_CONTEXT, truncate=False, shift=False)
        runner = await loaded_runner(engine)
        bos, eos = runner.special_token_text()
        info = read_info(smollm2_path)
        prompt = chatml_render(load_template(info.chat_template, bos_token=bos, eos_token=eos))(messages)
        sent = len(runner.tokenize(prompt))
    assert truncated.prompt_eval_count == whole.prompt_eval_count == sent


async def test_the_models_message_history_is_dropped_first(smollm2_path: Path, home: Path) -> None:
    """A Modelfile's MESSAGE history is history: sent with chat and generate, as Ollama does, and dropped to fit."""
    history = long_chat(40)[1:]
    history[-1] = {"role": "assistant", "content": "Noted."}
    async with Engine(home) as engine:
        await engine.create("historian", from_=str(smollm2_path), system=SYSTEM["content"], messages=history)
        chat = await engine.chat("historian", [{"role": "user", "content": "Hi"}], options=SMALL_CONTEXT)
        generated = await engine.generate("historian", "Hi", options=SMALL_CONTEXT)
        with pytest.raises(ContextLengthExceeded):
            await engine.chat("historian", [{"role": "user", "content": "Hi"}], options=SMALL_CONTEXT, truncate=False)
        with pytest.raises(ContextLengthExceeded):
            await engine.generate("historian", "Hi", options=SMALL_CONTEXT, truncate=False)
        # Without the history (a request with a context goes on from there, as in Ollama) the prompt is short.
        bare = await engine.generate("historian", "Hi", context=[1], options=SMALL_CONTEXT, truncate=False)
    assert chat.done and generated.done
    assert bare.prompt_eval_count < 100 < generated.prompt_eval_count <= 512
    assert chat.prompt_eval_count == generated.prompt_eval_count  # the same conversation, cut the same way


def test_the_client_takes_truncate(smollm2_path: Path, home: Path) -> None:
    with localllm.Client(home) as client:
        with pytest.raises(ContextLengthExceeded):
            client.chat(str(smollm2_path), long_chat(), options=SMALL_CONTEXT, truncate=False)
        with pytest.raises(localllm.InvalidRequest, match="shift must be true or false"):
            client.generate(str(smollm2_path), "Hi", shift="no")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Ollama's HTTP API


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        yield running


def test_the_shim_takes_truncate(server: ServerThread) -> None:
    chat = {"model": "smollm2", "messages": long_chat(), "options": SMALL_CONTEXT, "stream": False}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        answered = http.post("/api/chat", json={**chat, "shift": False})
        refused = http.post("/api/chat", json={**chat, "truncate": False})
        generate = {"model": "smollm2", "prompt": "word " * 600, "options": SMALL_CONTEXT, "stream": False}
        refused_generate = http.post("/api/generate", json={**generate, "truncate": False})
        not_a_flag = http.post("/api/chat", json={**chat, "truncate": "no"})
    assert answered.status_code == 200 and answered.json()["prompt_eval_count"] <= 512
    assert refused.status_code == 400 and "context holds 512" in refused.json()["error"]
    assert refused_generate.status_code == 400 and "context holds 512" in refused_generate.json()["error"]
    assert not_a_flag.status_code == 400 and "truncate" in not_a_flag.json()["error"]

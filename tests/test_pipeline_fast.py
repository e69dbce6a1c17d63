"""The request pipeline end to end on a scripted model: what the engine makes of a reply it is given.

Each engine here runs the real registry, the real SmolLM2 file's metadata and chat template, the
scheduler, the runner's batching and the output parsers; only the compute is `ScriptedBackend`, whose
model replies with the text the test chose. What needs llama.cpp's kernels (sampling, grammars, real
text) is tested on the real model elsewhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from fakes import ENDLESS, TIMEOUT, ScriptedBackend

import localllm
from localllm import Engine
from localllm.errors import InvalidRequest
from localllm.runner.worker import Runner

pytestmark = pytest.mark.fast

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
HELLO = [{"role": "user", "content": "Hello!"}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

# ChatML with Ollama's tool and thinking fields, as Qwen's templates write them.
TOOLS_TEMPLATE = """{{- if .Tools }}<|im_start|>system
Tools:{{ range .Tools }} {{ .Function.Name }}{{ end }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ if .ToolCalls }}{{ range .ToolCalls }}<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>{{ end }}{{ else }}{{ .Content }}{{ end }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
THINKING_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ if .Think }}<think>
{{ end }}"""


@pytest.fixture(scope="module")
def store(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose store holds SmolLM2 under templates with tools and with thinking, made once for the module."""
    home = tmp_path_factory.mktemp("store")
    with localllm.Client(home) as client:
        client.create("tooly", modelfile=f'FROM {smollm2_path}\nTEMPLATE """{TOOLS_TEMPLATE}"""\n')
        client.create("thinker", modelfile=f'FROM {smollm2_path}\nTEMPLATE """{THINKING_TEMPLATE}"""\n')
    return home


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
async def engine(store: Path, backend: ScriptedBackend) -> AsyncIterator[Engine]:
    async with Engine(store, backend=backend) as engine:
        yield engine


# -- the model's own template, and the reply as text -----------------------------------


async def test_chat_renders_the_files_template_and_streams_the_reply(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = "Hi there! How can I help?"
    chunks = [chunk async for chunk in engine.chat(str(smollm2_path), HELLO)]
    assert "".join(c.message.content for c in chunks) == "Hi there! How can I help?"
    assert len(chunks) > 2, "the reply streams in pieces"
    final = chunks[-1]
    assert final.done and final.done_reason == "stop"
    assert final.eval_count == len(backend.reply)  # one token a byte
    # SmolLM2's own template, special tokens and default system prompt included.
    assert backend.prompts == [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    ]
    # One token a byte, and one for each special token.
    specials = 3 * len("<|im_start|>") + 2 * len("<|im_end|>")
    assert final.prompt_eval_count == len(backend.prompts[0]) - specials + 5


async def test_a_special_token_in_the_reply_ends_it(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = "Done.<|im_end|>never shown"
    reply = await engine.chat(str(smollm2_path), HELLO)
    assert reply.message.content == "Done."
    assert reply.done_reason == "stop" and reply.eval_count == len("Done.")


async def test_generate_raw_and_context_round_trip(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = lambda prompt: prompt.upper()
    first = await engine.generate(str(smollm2_path), "abc", raw=True)
    assert (first.response, backend.prompts[-1]) == ("ABC", "abc")
    assert first.context is not None
    # The context of a response carries the conversation on: the next prompt follows it.
    second = await engine.generate(str(smollm2_path), "d", raw=True, context=first.context)
    assert backend.prompts[-1] == "abcABCd"
    assert second.response == "ABCABCD"


# -- how a reply ends ----------------------------------------------------------------------


async def test_done_reasons_stop_length_and_stop_sequences(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    model = str(smollm2_path)
    backend.reply = "one two three four"
    stopped = await engine.generate(model, "count", options={"num_predict": 100})
    assert (stopped.response, stopped.done_reason, stopped.eval_count) == ("one two three four", "stop", 18)
    cut = await engine.generate(model, "count", options={"num_predict": 5})
    assert (cut.response, cut.done_reason, cut.eval_count) == ("one t", "length", 5)
    at_stop = await engine.generate(model, "count", options={"stop": ["three"]})
    assert (at_stop.response, at_stop.done_reason) == ("one two ", "stop")
    # A stop sequence split over many tokens is still found, and text that only began one is sent.
    chunks = [c.response async for c in engine.generate(model, "count", options={"stop": ["thx"]})]
    assert "".join(chunks) == "one two three four"


async def test_an_endless_reply_shifts_the_context_and_ends_at_num_predict(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = ENDLESS
    options = {"num_ctx": 64, "num_predict": 200}
    reply = await engine.generate(str(smollm2_path), "go", raw=True, options=options)
    assert (reply.done_reason, reply.eval_count, reply.response) == ("length", 200, "ab" * 100)
    unshifted = await engine.generate(str(smollm2_path), "go", raw=True, options=options, shift=False)
    assert unshifted.done_reason == "length"
    assert (unshifted.prompt_eval_count or 0) + (unshifted.eval_count or 0) == 64


async def test_truncate_off_refuses_a_prompt_longer_than_the_context(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    model = str(smollm2_path)
    long_prompt = "word " * 100
    with pytest.raises(localllm.ContextLengthExceeded, match="num_ctx") as refused:
        await engine.generate(model, long_prompt, raw=True, options={"num_ctx": 64}, truncate=False)
    assert (refused.value.tokens, refused.value.limit) == (500, 64)
    with pytest.raises(localllm.ContextLengthExceeded, match="truncate"):
        await engine.chat(model, [{"role": "user", "content": long_prompt}], options={"num_ctx": 64}, truncate=False)
    assert backend.prompts == [], "nothing ran"
    # With truncate on (the default) the prompt is cut to fit, keeping its end, and answered.
    backend.reply = "ok"
    cut = await engine.generate(model, long_prompt, raw=True, options={"num_ctx": 64})
    assert cut.response == "ok" and 0 < (cut.prompt_eval_count or 0) < 64
    assert long_prompt.endswith(backend.prompts[-1][-20:])


# -- tools -------------------------------------------------------------------------------


async def test_a_call_without_native_tools_becomes_tool_calls(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = CALL
    chunks = [chunk async for chunk in engine.chat(str(smollm2_path), PARIS, tools=[WEATHER_TOOL])]
    calls = [call for chunk in chunks for call in chunk.message.tool_calls or ()]
    assert len(calls) == 1
    assert (calls[0].function.name, calls[0].function.arguments) == ("get_weather", {"city": "Paris"})
    assert calls[0].id.startswith("call_")
    assert "".join(c.message.content for c in chunks) == ""
    assert chunks[-1].done_reason == "stop"
    # SmolLM2's template has no tools: they are described in the system prompt, and a grammar keeps a call
    # well-formed while letting the reply be text.
    assert '"name": "get_weather"' in backend.prompts[0] and "You can call the following tools" in backend.prompts[0]
    assert backend.grammars[0] is not None and "free-text" in backend.grammars[0]


async def test_a_text_reply_to_tools_is_written_without_the_tool_instructions(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = lambda prompt: "It is sunny." if "following tools" not in prompt else "Sunny, I think."
    reply = await engine.chat(str(smollm2_path), PARIS, tools=[WEATHER_TOOL])
    assert reply.message.tool_calls is None
    assert reply.message.content == "It is sunny."
    assert len(backend.prompts) == 2 and "following tools" not in backend.prompts[1]
    assert backend.grammars[1] is None


async def test_required_tool_choice_forces_a_call_grammar(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = CALL
    reply = await engine.chat(str(smollm2_path), PARIS, tools=[WEATHER_TOOL], tool_choice="required")
    assert reply.message.tool_calls is not None and reply.message.tool_calls[0].function.name == "get_weather"
    assert backend.grammars[0] is not None and "free-text" not in backend.grammars[0]
    with pytest.raises(InvalidRequest, match="tool_choice"):
        await engine.chat(str(smollm2_path), PARIS, tools=[WEATHER_TOOL], tool_choice="sometimes")


async def test_native_tool_calls_are_parsed_from_the_templates_tags(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    model = "tooly"
    assert "tools" in (await engine.show(model)).capabilities
    backend.reply = f"Let me look.<tool_call>\n{CALL}\n</tool_call>"
    reply = await engine.chat(model, PARIS, tools=[WEATHER_TOOL])
    assert reply.message.content == "Let me look."
    assert reply.message.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in reply.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert backend.prompts[0].startswith("<|im_start|>system\nTools: get_weather<|im_end|>")
    assert backend.grammars == [None], "a template with tools needs no grammar"
    # The call goes back into the conversation as the template writes it.
    turn: list[Any] = [*PARIS, reply.message, {"role": "tool", "content": "18 degrees"}]
    backend.reply = "It is 18 degrees."
    answer = await engine.chat(model, turn, tools=[WEATHER_TOOL])
    assert answer.message.content == "It is 18 degrees."
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>' in backend.prompts[1]


# -- thinking ----------------------------------------------------------------------------


async def test_thinking_is_split_from_the_content(engine: Engine, backend: ScriptedBackend, smollm2_path: Path) -> None:
    model = "thinker"
    assert "thinking" in (await engine.show(model)).capabilities
    backend.reply = "First, 2 + 2.\n</think>\n\nFour."
    chunks = [chunk async for chunk in engine.chat(model, HELLO)]
    assert backend.prompts[0].endswith("<|im_start|>assistant\n<think>\n")  # the prompt opens the thinking
    assert "".join(c.message.thinking or "" for c in chunks) == "First, 2 + 2.\n"
    assert "".join(c.message.content for c in chunks) == "Four."
    reply = await engine.chat(model, HELLO, think=True)
    assert (reply.message.thinking, reply.message.content) == ("First, 2 + 2.\n", "Four.")
    # With thinking off the prompt does not open it, and the reply is all content.
    backend.reply = "Four."
    plain = await engine.chat(model, HELLO, think=False)
    assert (plain.message.thinking, plain.message.content) == (None, "Four.")
    assert backend.prompts[-1].endswith("<|im_start|>assistant\n")
    # generate splits it too.
    backend.reply = "hmm</think>Four."
    generated = await engine.generate(model, "2 + 2?", think=True)
    assert (generated.thinking, generated.response) == ("hmm", "Four.")


async def test_thinking_on_a_model_that_cannot_think_is_refused(engine: Engine, smollm2_path: Path) -> None:
    with pytest.raises(localllm.CapabilityError, match="thinking"):
        await engine.chat(str(smollm2_path), HELLO, think=True)


# -- structured outputs --------------------------------------------------------------------


async def test_format_constrains_the_reply_with_a_grammar(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    backend.reply = '{"city": "Lisbon"}'
    reply = await engine.chat(str(smollm2_path), HELLO, format=schema)
    assert json.loads(reply.message.content) == {"city": "Lisbon"}
    assert backend.grammars[0] is not None and '"\\"city\\""' in backend.grammars[0]
    anything = await engine.generate(str(smollm2_path), "cats as JSON", format="json")
    assert json.loads(anything.response) == {"city": "Lisbon"}
    assert backend.grammars[1] is not None and backend.grammars[1] != backend.grammars[0]
    plain = await engine.generate(str(smollm2_path), "cats")
    assert plain.response == '{"city": "Lisbon"}' and backend.grammars[2] is None
    with pytest.raises(localllm.InvalidFormat):
        await engine.generate(str(smollm2_path), "cats", format="yaml")


# -- logprobs ------------------------------------------------------------------------------


async def test_logprobs_one_per_token_with_the_top_alternatives(
    engine: Engine, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    backend.reply = "Yes, é."
    chunks = [c async for c in engine.chat(str(smollm2_path), HELLO, logprobs=True, top_logprobs=3)]
    final = chunks[-1]
    assert final.message.content == "" and final.done
    logprobs = [lp for c in chunks[:-1] for lp in c.logprobs or ()]
    assert len(logprobs) == final.eval_count == len("Yes, é.".encode())
    # Every byte of the text is in one token's bytes; "é" is two tokens of one byte each.
    assert b"".join(bytes(lp.bytes) for lp in logprobs) == "Yes, é.".encode()
    assert [lp.token for lp in logprobs[:4]] == ["Y", "e", "s", ","]
    # The scripted model puts 10 on its choice and 0 on every other token of its vocabulary.
    n_vocab = backend.models[0].n_vocab
    expected = 10 - math.log(math.exp(10) + n_vocab - 1)
    for lp in logprobs:
        assert lp.logprob == pytest.approx(expected)
        assert lp.top_logprobs is not None and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == pytest.approx(expected)
    # Each chunk carries the logprobs of its own text.
    for chunk in chunks[:-1]:
        assert b"".join(bytes(lp.bytes) for lp in chunk.logprobs or ()) == chunk.message.content.encode()
    whole = await engine.generate(str(smollm2_path), "hi", logprobs=True)
    assert whole.logprobs is not None and len(whole.logprobs) == len("Yes, é.".encode())
    assert all(lp.top_logprobs is None for lp in whole.logprobs)


# -- cancellation, loading and unloading ---------------------------------------------------


async def test_breaking_out_of_a_stream_frees_the_slot(
    store: Path, backend: ScriptedBackend, smollm2_path: Path
) -> None:
    model = str(smollm2_path)
    backend.reply = ENDLESS
    async with Engine(store, num_parallel=1, backend=backend) as engine:
        await engine.generate(model)  # loaded, so the gate below is on this runner's context
        # The story's prompt and two tokens are decoded; the decode of its third token waits at the gate.
        backend.context.hold(after=3)
        received = 0
        async for _chunk in engine.generate(model, "story", raw=True, options={"num_predict": -1}):
            received += 1
            if received == 3:
                # Left while the story's next decode is under way (held at the gate), not before it starts.
                assert await anyio.to_thread.run_sync(backend.context.held.wait, TIMEOUT)
                break
        running = (await engine.scheduler.running())[0]
        assert running.users == 0, "leaving the loop gave the lease back"
        await assert_the_slot_frees(engine, backend, model)


async def test_cancelling_the_task_frees_the_slot(store: Path, backend: ScriptedBackend, smollm2_path: Path) -> None:
    model = str(smollm2_path)
    backend.reply = ENDLESS
    async with Engine(store, num_parallel=1, backend=backend) as engine:
        await engine.generate(model)
        backend.context.hold(after=3)
        received = 0
        streaming = anyio.Event()

        async def consume() -> None:
            nonlocal received
            async for _chunk in engine.generate(model, "story", raw=True, options={"num_predict": -1}):
                received += 1
                if received == 3:
                    streaming.set()

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await streaming.wait()
            assert await anyio.to_thread.run_sync(backend.context.held.wait, TIMEOUT)
            group.cancel_scope.cancel()
        assert received == 3
        assert (await engine.scheduler.running())[0].users == 0
        await assert_the_slot_frees(engine, backend, model)


async def assert_the_slot_frees(engine: Engine, backend: ScriptedBackend, model: str) -> None:
    """With the abandoned story's decode held, release it: a follow-up must run at once in its one slot."""
    held_at = len(backend.context.decoded)
    backend.context.release()
    backend.reply = "hi"
    with anyio.fail_after(TIMEOUT):
        follow_up = await engine.generate(model, "next", raw=True)
    assert follow_up.response == "hi"
    runner = (await engine.scheduler.running())[0].runner
    assert isinstance(runner, Runner)
    assert (runner.active_count, runner.pending_count) == (0, 0)
    # After the held decode, only the follow-up's: its prompt, then its two tokens (each decoded for the
    # logits that choose the next; the last one's choose the end). The story took no step more.
    assert len(backend.context.decoded) - held_at == 1 + 1 + 2


async def test_empty_requests_load_and_unload(engine: Engine, backend: ScriptedBackend, smollm2_path: Path) -> None:
    model = str(smollm2_path)
    loaded = await engine.generate(model)
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    assert [m.model for m in (await engine.ps()).models] == [model]
    assert len(backend.models) == 1 and not backend.prompts
    again = await engine.chat(model, [])
    assert again.done_reason == "load" and len(backend.models) == 1, "already loaded: not loaded twice"
    unloaded = await engine.chat(model, [], keep_alive=0)
    assert (unloaded.done_reason, unloaded.message.content) == ("unload", "")
    assert (await engine.ps()).models == []
    assert backend.models[0].closed and backend.context.closed
    await engine.generate(model, keep_alive="5m")
    assert len(backend.models) == 2


def test_a_backend_cannot_serve_runner_processes(home: Path) -> None:
    with pytest.raises(InvalidRequest, match='isolation="thread"'):
        Engine(home, isolation="process", backend=ScriptedBackend())

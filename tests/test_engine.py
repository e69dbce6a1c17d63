"""The engine core on the real SmolLM2 model: generation, sampling, batching, cancellation, errors."""

from __future__ import annotations

import gc
import threading
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest

import localllm
from localllm import Engine

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


async def collect(stream: localllm.ResponseStream) -> list:
    return [chunk async for chunk in stream]


async def test_raw_generate_matches_llama_cpp_python(smollm2_path: Path, home: Path) -> None:
    from localllm.runner.llama import reference_llama

    prompt = "Once upon a time, in a land far away, there lived"
    # Flash attention on, as llama.cpp's "auto" (localllm's default) picks it on a CPU.
    reference_model = reference_llama(
        str(smollm2_path), n_ctx=2048, n_threads=2, n_batch=512, flash_attn=True, verbose=False
    )
    reference = reference_model.create_completion(prompt, max_tokens=32, temperature=0, repeat_penalty=1.0)
    reference_tokens = reference_model.tokenize(reference["choices"][0]["text"].encode(), add_bos=False, special=True)
    del reference_model

    async with Engine(home) as engine:
        reply = await engine.generate(
            str(smollm2_path), prompt, raw=True, options={**GREEDY, "num_predict": 32, "num_ctx": 2048}
        )
    assert reply.done and reply.done_reason == "length"
    assert reply.eval_count == 32 == reference["usage"]["completion_tokens"]
    assert reply.response == reference["choices"][0]["text"]
    assert reply.context is not None and list(reply.context[-32:])[: len(reference_tokens)] == reference_tokens[:32]


async def test_same_seed_same_output_and_seeds_differ(smollm2_path: Path, home: Path) -> None:
    options = {"temperature": 0.8, "num_predict": 32}
    async with Engine(home) as engine:
        model = str(smollm2_path)
        first = await engine.generate(model, "Write a story about a cat.", options={**options, "seed": 42})
        again = await engine.generate(model, "Write a story about a cat.", options={**options, "seed": 42})
        other = await engine.generate(model, "Write a story about a cat.", options={**options, "seed": 7})
    assert first.response == again.response
    assert first.response != other.response


async def test_stop_sequence_across_token_boundaries(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        free = await engine.generate(
            model, "List the planets of the solar system.", options={**GREEDY, "num_predict": 40}
        )
        chunks = [
            c.response
            for c in await collect(
                engine.generate(model, "List the planets of the solar system.", options={**GREEDY, "num_predict": 40})
            )
        ]
        # A stop string that starts inside one token and ends inside a later one.
        boundary = len(chunks[0]) + len(chunks[1]) + len(chunks[2])
        stop = free.response[boundary - 2 : boundary + 3]
        stopped = await engine.generate(
            model, "List the planets of the solar system.", options={**GREEDY, "num_predict": 40, "stop": [stop]}
        )
    assert len(stop) == 5
    assert stopped.done_reason == "stop"
    assert stopped.response == free.response[: free.response.find(stop)]
    assert stop not in stopped.response


async def test_num_predict_and_context_overflow(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        short = await engine.generate(model, "Count to twenty:", options={**GREEDY, "num_predict": 5})
        assert short.eval_count == 5 and short.done_reason == "length"

        # Generation that runs into the end of the context shifts it and goes on to num_predict, as in Ollama.
        options = {**GREEDY, "num_ctx": 48, "num_predict": 100}
        full = await engine.generate(model, "Tell me a very long story.", options=options)
        assert (full.done_reason, full.eval_count) == ("length", 100)
        # With shift off, it stops there instead: `length`, the context's worth of tokens.
        stopped = await engine.generate(model, "Tell me a very long story.", options=options, shift=False)
        assert stopped.done_reason == "length" and stopped.prompt_eval_count is not None
        assert stopped.prompt_eval_count + (stopped.eval_count or 0) == 48

        # A prompt longer than the context is cut to fit, keeping its start and its end, and answered.
        cut = await engine.generate(model, "word " * 200, options={**GREEDY, "num_ctx": 64, "num_predict": 4})
        assert cut.done_reason == "length" and 0 < (cut.prompt_eval_count or 0) < 64
        with pytest.raises(localllm.ContextLengthExceeded, match="num_ctx"):
            await engine.generate(model, "word " * 200, options={"num_ctx": 64}, truncate=False)

        # The runner is still healthy afterwards.
        after = await engine.generate(model, "Count to twenty:", options={**GREEDY, "num_predict": 5})
        assert after.response == short.response


async def test_four_concurrent_chats_interleave_and_agree_with_solo(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    questions = ["Why is the sky blue?", "What is a prime number?", "Name three fruits.", "How do birds fly?"]
    options = {**GREEDY, "num_predict": 48}
    # Without flash attention, a sequence's logits hardly depend on what else is in its batch: greedy
    # output agrees for 48 tokens. With it, near-ties flip within a dozen or so (docs/benchmarks.md).
    async with Engine(home, num_parallel=4, flash_attention=False) as engine:
        solo = []
        for question in questions:
            chunks = await collect(engine.chat(model, [{"role": "user", "content": question}], options=options))
            solo.append([c.message.content for c in chunks if not c.done])

        events: list[str] = []  # in the order the event loop saw them
        batched: dict[int, list[str]] = {}

        async def run(i: int) -> None:
            pieces = []
            async for chunk in engine.chat(model, [{"role": "user", "content": questions[i]}], options=options):
                if not pieces and not chunk.done:
                    events.append("first")
                if chunk.done:
                    events.append("done")
                else:
                    pieces.append(chunk.message.content)
            batched[i] = pieces

        async with anyio.create_task_group() as group:
            for i in range(4):
                group.start_soon(run, i)

    assert events[:4] == ["first"] * 4, f"every chat must start before any finishes: {events}"
    agreement = []
    for i in range(4):
        same = 0
        for a, b in zip(solo[i], batched[i], strict=False):
            if a != b:
                break
            same += 1
        agreement.append(same)
    print(f"tokens agreeing with the solo run, per chat: {agreement}")
    assert all(n >= 16 for n in agreement), agreement


async def test_breaking_out_frees_the_slot(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    endless = {**GREEDY, "num_predict": 100_000}  # greedy, this story runs for minutes unless stopped
    async with Engine(home, num_parallel=1) as engine:
        received = 0
        async for _chunk in engine.generate(model, "Once upon a time", raw=True, options=endless):
            received += 1
            if received == 3:
                break
        # With one slot, the follow-up can only start once the abandoned story has left it: at once, not in
        # minutes (the bound only catches a slot that was never freed).
        with anyio.fail_after(60):
            reply = await engine.generate(model, "Say hi.", options={**GREEDY, "num_predict": 3})
        assert reply.done
        runner = (await engine.scheduler.running())[0].runner
        assert runner.active_count == 0
        assert runner.pending_count == 0


async def test_cancelling_the_task_frees_the_slot(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1) as engine:
        chunks = 0
        streaming = anyio.Event()

        async def consume() -> None:
            nonlocal chunks
            try:
                options = {**GREEDY, "num_predict": 1000}
                async for _chunk in engine.generate(model, "Tell me a long story.", options=options):
                    chunks += 1
                    if chunks == 3:
                        streaming.set()
            finally:
                streaming.set()

        # Cancelled by its owner mid-stream, however long the first tokens take on a busy machine.
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await streaming.wait()
            group.cancel_scope.cancel()
        assert chunks >= 3
        reply = await engine.generate(model, "Say hi.", options={**GREEDY, "num_predict": 3})
        assert reply.done
        runner = (await engine.scheduler.running())[0].runner
        assert runner.active_count == 0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # which loop does not matter: where the work runs does
async def test_the_event_loop_never_waits_on_the_model(
    smollm2_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding runs in the runner's thread and a long prompt is tokenized in a worker thread: the event loop
    only passes text on, so it never stalls while a model works (checked by thread, not by a stopwatch)."""
    from localllm.runner import llama
    from localllm.service import INLINE_WORK_CHARS

    model = str(smollm2_path)
    decoded_on: set[threading.Thread] = set()
    tokenized_on: set[threading.Thread] = set()
    decode, tokenize = llama.LlamaContext.decode, llama.LlamaModel.tokenize

    def recording_decode(self: llama.LlamaContext, batch: Any) -> int:
        decoded_on.add(threading.current_thread())
        return decode(self, batch)

    def recording_tokenize(self: llama.LlamaModel, text: str, **kwargs: Any) -> list[int]:
        if len(text) > INLINE_WORK_CHARS:
            tokenized_on.add(threading.current_thread())
        return tokenize(self, text, **kwargs)

    monkeypatch.setattr(llama.LlamaContext, "decode", recording_decode)
    monkeypatch.setattr(llama.LlamaModel, "tokenize", recording_tokenize)
    long_prompt = "Rivers run to the sea. " * (INLINE_WORK_CHARS // 20)
    async with Engine(home) as engine:
        reply = await engine.generate(model, "Write an essay about rivers.", options={**GREEDY, "num_predict": 32})
        # Cut to the context after it is tokenized, so little of it is evaluated.
        await engine.generate(model, long_prompt, raw=True, options={**GREEDY, "num_predict": 1, "num_ctx": 256})
    assert reply.eval_count == 32
    loop_thread = threading.current_thread()
    assert decoded_on and loop_thread not in decoded_on
    assert tokenized_on and loop_thread not in tokenized_on


async def test_follow_up_turn_reuses_the_prefix(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        messages = [{"role": "user", "content": "My name is Ada. Remember it."}]
        first = await engine.chat(model, messages, options={**GREEDY, "num_predict": 24})
        messages += [
            {"role": "assistant", "content": first.message.content},
            {"role": "user", "content": "What is my name?"},
        ]
        second = await engine.chat(model, messages, options={**GREEDY, "num_predict": 24})
        runner = (await engine.scheduler.running())[0].runner
        template = runner.model.metadata("tokenizer.chat_template")
        assert template
    assert second.prompt_eval_count > first.prompt_eval_count + first.eval_count  # the whole prompt, as Ollama counts
    evaluated = second.prompt_eval_count - second.prompt_cached_count
    assert evaluated < 20, (second.prompt_eval_count, second.prompt_cached_count)


async def test_generate_chunks_and_final_fields(smollm2_path: Path, home: Path) -> None:
    async with Engine(home) as engine:
        chunks = await collect(engine.generate(str(smollm2_path), "Hello", options={"num_predict": 8, "seed": 1}))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    final = chunks[-1]
    assert final.model == str(smollm2_path)
    assert final.created_at.endswith("Z")
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, field), int)
    assert final.total_duration >= final.eval_duration > 0
    assert final.prompt_eval_count > 0 and final.eval_count == 8
    assert final["done_reason"] == "length"


async def test_missing_and_bad_files_and_bad_options(smollm2_path: Path, home: Path, tmp_path: Path) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is not a model")
    async with Engine(home) as engine:
        with pytest.raises(localllm.ModelNotFound):
            await engine.generate(str(tmp_path / "missing.gguf"), "hi")
        with pytest.raises(localllm.InvalidModelFile):
            await engine.generate(str(not_gguf), "hi")
        with pytest.raises(localllm.InvalidOptions, match="temperature"):
            await engine.generate(str(smollm2_path), "hi", options={"temperature": "hot"})
        with pytest.warns(UserWarning, match="nonsense"):
            reply = await engine.generate(str(smollm2_path), "hi", options={"nonsense": 1, "num_predict": 2})
        assert reply.done
        with pytest.raises(localllm.LocalLLMError):
            await engine.chat(str(smollm2_path), [{"role": "wizard", "content": "hi"}])


def test_engine_under_trio(smollm2_path: Path, home: Path) -> None:
    import trio

    async def main() -> tuple[str, list[str]]:
        async with Engine(home) as engine:
            reply = await engine.chat(
                str(smollm2_path), [{"role": "user", "content": "Say hello."}], options={**GREEDY, "num_predict": 8}
            )
            pieces = []
            async with trio.open_nursery() as nursery:

                async def stream(i: int) -> None:
                    async for chunk in engine.generate(
                        str(smollm2_path), f"Count to {i}:", options={**GREEDY, "num_predict": 4}
                    ):
                        pieces.append(chunk.response)

                for i in range(3):
                    nursery.start_soon(stream, i + 2)
            return reply.message.content, pieces

    content, pieces = trio.run(main)
    assert content
    assert len(pieces) >= 3 * 4


async def test_engine_without_a_context_manager_as_in_a_notebook(smollm2_path: Path, home: Path) -> None:
    engine = Engine(home)
    reply = await engine.generate(str(smollm2_path), "Hi", options={"num_predict": 3})
    assert reply.done
    await engine.aclose()
    assert not [t for t in threading.enumerate() if t.name.startswith("localllm-")]
    with pytest.raises(localllm.EngineClosed):
        await engine.generate(str(smollm2_path), "Hi")


def runner_threads(ignore: frozenset[threading.Thread] = frozenset()) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("localllm-runner") and t not in ignore]


async def test_an_engine_dropped_unclosed_unloads_its_models(smollm2_path: Path, home: Path) -> None:
    """A notebook cell `engine = Engine(); await engine.generate(...)` run again holds one model loaded, not more."""
    others = frozenset(runner_threads())  # another test's default client may hold runners of its own
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the dropped engine is not "another engine on the store"
        for _ in range(3):
            engine = Engine(home)
            gc.collect()  # CPython drops the old engine as the name is rebound; a cycle would wait for the collector
            reply = await engine.generate(str(smollm2_path), "Hi", options={**GREEDY, "num_predict": 3})
            assert reply.done
            assert len(runner_threads(others)) == 1
    del engine
    gc.collect()
    assert runner_threads(others) == []


async def test_a_request_keeps_its_engine(smollm2_path: Path, home: Path) -> None:
    """`await Engine().generate(...)` on an engine nobody names: the request holds its engine until it is done."""
    others = frozenset(runner_threads())
    reply = await Engine(home).generate(str(smollm2_path), "Hi", options={**GREEDY, "num_predict": 3})
    assert reply.done and reply.eval_count == 3
    gc.collect()
    assert runner_threads(others) == []


async def test_a_second_open_engine_on_the_same_store_warns(smollm2_path: Path, home: Path) -> None:
    options = {**GREEDY, "num_predict": 1}
    async with Engine(home) as first, Engine(home) as second:
        await first.generate(str(smollm2_path), "Hi", options=options)
        with pytest.warns(RuntimeWarning, match="another Engine in this process already runs models from"):
            await second.generate(str(smollm2_path), "Hi", options=options)
    async with Engine(home) as third:  # the others are closed: nothing to say
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            await third.generate(str(smollm2_path), "Hi", options=options)

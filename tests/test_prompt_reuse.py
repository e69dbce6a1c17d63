"""Prompt prefixes reused on the real SmolLM2 model: copied between slots, kept in RAM when a slot is
reused, and kept on disk across processes. The next token's logprob tells a reused prefix that holds the
right KV entries from one that does not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from localllm import Engine
from localllm.runner import prompt_cache
from localllm.runner.prompt_cache import PromptCache


@pytest.fixture
def anyio_backend() -> str:
    # What this module checks happens in the runner's thread, the same under every event loop; the model
    # runs are what cost. The loops themselves are tested end to end in test_engine.py and, on the scripted
    # model, in test_pipeline_fast.py.
    return "asyncio"


GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_ctx": 2048}
FACTS = " ".join(
    f"Fact {i}: the {word} is {i * 7 % 13} meters long." for i, word in enumerate(["river", "bridge"] * 12)
)
SYSTEM = f"You answer in one word. {FACTS}"


def prompt(question: str, system: str = SYSTEM) -> str:
    return f"{system}\n\nQuestion: {question}\nAnswer:"


async def first_token(engine: Engine, model: str, text: str) -> Any:
    """A one-token greedy reply with its logprob."""
    return await engine.generate(model, text, raw=True, logprobs=True, options={**GREEDY, "num_predict": 1})


def same_next_token(a: Any, b: Any) -> bool:
    # Batches of other sizes round differently, so the logprobs agree closely, not exactly (more
    # closely without flash attention, which the test across slots therefore turns off).
    (x,), (y,) = a.logprobs, b.logprobs
    return bool(x.token == y.token and abs(x.logprob - y.logprob) < 0.05)


async def test_a_prefix_another_slot_holds_is_copied_into_a_free_slot(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=2, flash_attention=False) as engine:
        cold = await first_token(engine, model, prompt("How long is the river?"))
        assert cold.prompt_cached_count == 0 and cold.prompt_eval_count > 200
        telling = anyio.Event()

        async def tell() -> None:  # keeps the slot that holds the shared prefix busy
            async for _ in engine.generate(model, prompt("Tell a story."), raw=True, options=GREEDY):
                telling.set()

        async with anyio.create_task_group() as group:
            group.start_soon(tell)
            await telling.wait()
            warm = await first_token(engine, model, prompt("How long is the bridge?"))
            group.cancel_scope.cancel()
    async with Engine(home, num_parallel=2, flash_attention=False) as engine:
        fresh = await first_token(engine, model, prompt("How long is the bridge?"))
    assert warm.prompt_cached_count >= cold.prompt_eval_count - 12  # all but the question was copied
    assert same_next_token(warm, fresh)


async def test_a_dropped_conversation_comes_back_from_ram_within_the_byte_limit(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    systems = [f"Variant {n}. {SYSTEM}" for n in "ABC"]
    async with Engine(home, num_parallel=1) as engine:
        first = await first_token(engine, model, prompt("Why?", systems[0]))
        await first_token(engine, model, prompt("Why?", systems[1]))  # drops A's conversation from the slot
        (loaded,) = (await engine.ps()).models
        state = loaded.prompt_cache_size
        assert state > 0
        again = await first_token(engine, model, prompt("Why?", systems[0]))
        assert again.prompt_cached_count == again.prompt_eval_count - 1  # the last token gives the logits
        assert same_next_token(first, again)

    # Room for one state only: the least recently used one leaves.
    async with Engine(home, num_parallel=1, prompt_cache_size=state * 3 // 2) as engine:
        for system in systems:
            await first_token(engine, model, prompt("Why?", system))  # A, then B (A saved), then C (B saved, A out)
        evicted = await first_token(engine, model, prompt("Why?", systems[0]))
        assert evicted.prompt_cached_count < 20
        kept = await first_token(engine, model, prompt("Why?", systems[2]))  # saved when A took the slot
        assert kept.prompt_cached_count == kept.prompt_eval_count - 1
        assert (await engine.ps()).models[0].prompt_cache_size <= state * 3 // 2


def test_the_disk_cache_survives_a_restart_and_ignores_a_corrupted_entry(smollm2_path: Path, home: Path) -> None:
    script = textwrap.dedent(
        f"""
        import anyio, localllm

        async def main():
            async with localllm.Engine({str(home)!r}, num_parallel=1, prompt_cache=True) as engine:
                reply = await engine.generate({str(smollm2_path)!r}, {prompt("Why?")!r}, raw=True,
                                              options={{"temperature": 0, "num_predict": 1, "num_ctx": 2048}})
                print(reply.prompt_cached_count)

        anyio.run(main)
        """
    )
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["0"]
    entries = list((home / "cache" / "prompts").glob("*.kvcache"))
    assert len(entries) == 1

    async def restarted() -> Any:
        async with Engine(home, num_parallel=1, prompt_cache=True) as engine:
            return await engine.generate(
                str(smollm2_path), prompt("Why?"), raw=True, options={**GREEDY, "num_predict": 1}
            )

    reply = anyio.run(restarted)
    assert reply.prompt_cached_count == reply.prompt_eval_count - 1

    data = bytearray(entries[0].read_bytes())
    data[-100] ^= 0xFF  # inside the saved state
    entries[0].write_bytes(bytes(data))
    reply = anyio.run(restarted)
    assert reply.prompt_cached_count == 0
    assert not entries[0].exists() or entries[0].read_bytes() != bytes(data), "a corrupted entry must not stay"


async def test_nothing_is_written_to_disk_unless_asked(smollm2_path: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1) as engine:
        await first_token(engine, str(smollm2_path), prompt("Why?"))
        await first_token(engine, str(smollm2_path), prompt("How?", "Another system prompt. " * 20))
        assert (await engine.ps()).models[0].prompt_cache_size > 0  # kept in RAM
    assert not (home / "cache").exists()


async def test_the_disk_cache_restores_only_what_this_home_saved_and_drops_what_fails(
    smollm2_path: Path, home: Path, tmp_path: Path
) -> None:
    model = str(smollm2_path)
    async with Engine(home, num_parallel=1, prompt_cache=True) as engine:
        cold = await first_token(engine, model, prompt("Why?"))
    (saved,) = (home / "cache" / "prompts").glob("*.kvcache")

    # Copied into another home, the entry is not restored: that home has a key of its own.
    other = tmp_path / "other-home"
    (other / "cache" / "prompts").mkdir(parents=True)
    shutil.copy(saved, other / "cache" / "prompts" / saved.name)
    async with Engine(other, num_parallel=1, prompt_cache=True) as engine:
        copied = await first_token(engine, model, prompt("Why?"))
    assert copied.prompt_cached_count == 0 and same_next_token(cold, copied)

    # Signed with this home's key, but its state holds ten positions more than its entry claims: llama.cpp
    # restores it, the runner sees it does not fit, drops it and evaluates the prompt instead.
    key_file = home / "prompt-cache.key"
    with saved.open("rb") as stream:
        header = prompt_cache._read_header(stream, prompt_cache.load_key(key_file))
        state = stream.read()
    saved.unlink()
    cache = PromptCache(1 << 30, directory=home / "cache" / "prompts", key_file=key_file)
    cache.put(header.key, header.tokens[:-10], state)
    cache.close()
    (forged,) = (home / "cache" / "prompts").glob("*.kvcache")
    async with Engine(home, num_parallel=1, prompt_cache=True) as engine:
        warm = await first_token(engine, model, prompt("Why?"))
        again = await first_token(engine, model, prompt("Why?"))
    assert warm.prompt_cached_count == 0 and same_next_token(cold, warm)
    assert again.prompt_cached_count == again.prompt_eval_count - 1  # the runner goes on, its slot reused
    assert not forged.exists()

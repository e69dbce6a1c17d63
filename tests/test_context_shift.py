"""The context window, handled as Ollama handles it: a prompt too long for it is cut, and generation that
reaches its end shifts it (keeping the first `num_keep` tokens, dropping half of the rest) and goes on.

The cut and the shift are checked on the fake backend (what is kept, which positions llama.cpp sees,
what a later request may reuse), then on the real SmolLM2 model, in a thread and in a runner process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from fakes import BOS, reply, serving, tokens
from fakes import params as fake_params

import localllm
from localllm import Engine
from localllm.errors import ContextLengthExceeded
from localllm.options import Options
from localllm.runner.prompt_cache import PromptCache
from localllm.runner.protocol import LoadConfig, SamplingParams, SequenceHandle, SequenceResult, cut_prompt, keep_count
from localllm.runner.worker import Runner


@pytest.fixture
def anyio_backend() -> str:
    # What this module checks happens in the runner's thread, the same under every event loop; the model
    # runs are what cost. The loops themselves are tested end to end in test_engine.py and, on the scripted
    # model, in test_pipeline_fast.py.
    return "asyncio"


GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
STORY = "<|im_start|>user\nTell me a very long story about a dragon.<|im_end|>\n<|im_start|>assistant\n"


# -- cutting a prompt -----------------------------------------------------------------------


def test_a_cut_keeps_num_keep_tokens_then_the_end_leaving_half_the_rest_free() -> None:
    prompt = list(range(600))
    cut = cut_prompt(prompt, 256, keep=5)
    # Ollama: 256 - (256 - 5) // 2 = 131 tokens, the first 5 and the last 126.
    assert len(cut) == 131
    assert cut == [*prompt[:5], *prompt[-126:]]


@pytest.mark.parametrize("n_ctx", [2, 3, 8, 256])
@pytest.mark.parametrize("keep", [0, 1, 4, 255, 10_000])
@pytest.mark.parametrize("length", [1, 7, 8, 600])
def test_a_cut_prompt_always_leaves_room_and_keeps_its_start(n_ctx: int, keep: int, length: int) -> None:
    prompt = list(range(length))
    cut = cut_prompt(prompt, n_ctx, keep)
    if length < n_ctx:
        assert cut == prompt
        return
    assert 1 <= len(cut) < n_ctx
    kept = min(keep, n_ctx - 1)
    assert cut[:kept] == prompt[:kept]
    assert cut[kept:] == prompt[len(prompt) - (len(cut) - kept) :]


def test_what_a_cut_or_shift_keeps() -> None:
    prompt = [BOS, 10, 11, 12, 13, 14]
    assert keep_count(prompt, 4, BOS, 256) == 5  # num_keep, and the BOS token on top, as Ollama counts
    assert keep_count(prompt[1:], 4, BOS, 256) == 4
    assert keep_count(prompt, -1, BOS, 256) == 7  # negative: the whole prompt (BOS counted once more)
    assert keep_count(prompt, 4, -1, 256) == 4  # a model without a BOS token
    assert keep_count(prompt, 1000, BOS, 64) == 63  # never the whole context: something must go
    assert keep_count(prompt, 4, BOS, 1) == 0


# -- on the fake backend --------------------------------------------------------------------


async def test_generation_shifts_the_context_and_goes_on() -> None:
    with serving(num_parallel=1, num_ctx=8) as (runner, backend):
        text, result = await reply(runner.submit(tokens("a"), fake_params()))
        context = backend.context
        # The whole alphabet, far past eight tokens: the end-of-generation token after "z" ends it.
        assert (text, result.done_reason, result.eval_count) == ("bcdefghijklmnopqrstuvwxyz", "stop", 25)
        # num_keep (4) counts generated tokens too where the prompt is shorter.
        assert context.shifts and all(keep == 4 for _, keep, _ in context.shifts)
        assert all(pos < 8 for d in context.decoded for _, _, pos, _ in d.rows)
        # Once done, the slot holds only what it kept, and its record says so.
        assert runner.slots[0].cached == tokens("abcd") == tokens(context.cached(0))


async def test_num_keep_tokens_survive_every_shift() -> None:
    with serving(num_parallel=1, num_ctx=16) as (runner, backend):
        handle = runner.submit(tokens("KEEP."), fake_params(num_predict=60, num_keep=4))
        text, result = await reply(handle)
        assert (text, result.done_reason, result.eval_count) == ("." * 60, "length", 60)
        context = backend.context
        # Full at 15 tokens: keep 4, drop half of the other 11.
        assert context.shifts[0] == (0, 4, 5)
        assert all(keep == 4 for _, keep, _ in context.shifts)
        assert all(pos < 16 for d in context.decoded for _, _, pos, _ in d.rows)
        assert context.cached(0) == "KEEP" and runner.slots[0].cached == tokens("KEEP")


async def test_without_shift_generation_stops_at_the_end_of_the_context() -> None:
    with serving(num_parallel=1, num_ctx=8) as (runner, backend):
        text, result = await reply(runner.submit(tokens("a"), fake_params(shift=False)))
        assert (text, result.done_reason, result.eval_count) == ("bcdefgh", "length", 7)
        assert backend.context.shifts == []


async def test_a_prompt_too_long_is_cut_or_refused() -> None:
    with serving(num_parallel=1, num_ctx=8) as (runner, backend):
        with pytest.raises(ContextLengthExceeded, match="num_ctx"):
            runner.submit(tokens("abcdefghij"), fake_params(truncate=False))
        text, result = await reply(runner.submit(tokens("abcdefghij"), fake_params(num_predict=2)))
        # 8 - (8 - 4) // 2 = 6 tokens: the first four, then the last two.
        assert str(backend.context.decoded[0]) == "0:a@0 0:b@1 0:c@2 0:d@3 0:i@4 0:j@5*"
        assert (text, result.prompt_eval_count) == ("kl", 6)


async def test_a_tiny_context_and_a_huge_num_keep_reach_no_invalid_position() -> None:
    with serving(num_parallel=1, num_ctx=2) as (runner, backend):
        text, result = await reply(runner.submit(tokens("."), fake_params(num_predict=10, num_keep=1 << 30)))
        assert (text, result.eval_count, result.done_reason) == ("." * 10, 10, "length")
        assert all(pos < 2 for d in backend.context.decoded for _, _, pos, _ in d.rows)
        with pytest.raises(ContextLengthExceeded):
            runner.submit(tokens("abc"), fake_params(truncate=False))


async def test_a_shifted_sequence_is_reused_and_saved_only_as_far_as_it_kept(tmp_path: Path) -> None:
    prompt = "SYSTEM" * 12 + "."  # 73 tokens
    with serving(PromptCache(1 << 20, directory=tmp_path), num_parallel=2, num_ctx=80) as (runner, backend):
        await reply(runner.submit(tokens(prompt), fake_params(num_predict=20, num_keep=-1)))
        assert backend.context.shifts
        # Its slot kept the whole prompt (num_keep -1), nothing past it: the rest was shifted.
        assert runner.slots[0].cached == tokens(prompt) == tokens(backend.context.cached(0))
        _, again = await reply(runner.submit(tokens(prompt + "....."), fake_params(num_predict=1)))
        assert again.prompt_cached_count == len(prompt)
    # What went to the disk is the kept part too: a new runner restores exactly that.
    cache = PromptCache(1 << 20, directory=tmp_path)
    with serving(cache, num_parallel=2, num_ctx=80) as (runner, backend):
        hit = cache.lookup(runner.cache_key, tokens(prompt + "!"))
        assert hit is not None and hit.common == len(prompt)
        _, result = await reply(runner.submit(tokens(prompt + "!"), fake_params(num_predict=1)))
        assert backend.context.restores and result.prompt_cached_count == len(prompt)


@attrs.define
class RecordingDrafter:
    """Drafts nothing, and records which sequences asked for drafts, with their histories."""

    asked: list[tuple[int, int]] = attrs.field(factory=list)  # (sequence, history length)

    def propose(self, histories: Mapping[int, Sequence[int]], limits: Mapping[int, int]) -> dict[int, list[int]]:
        self.asked.extend((seq, len(history)) for seq, history in histories.items())
        return {}

    def close(self) -> None:
        pass


async def test_drafting_stops_once_a_sequence_has_shifted() -> None:
    drafter = RecordingDrafter()
    with serving(num_parallel=1, num_ctx=16, drafter=drafter) as (runner, backend):
        _, result = await reply(runner.submit(tokens("...."), fake_params(num_predict=40)))
        assert result.eval_count == 40 and backend.context.shifts
        # Drafts were asked for before the first shift only: after it, a history would be shorter again.
        lengths = [length for _, length in drafter.asked]
        assert lengths and lengths == sorted(set(lengths)) and max(lengths) < 16


# -- on the real model ----------------------------------------------------------------------


async def complete(runner: Runner, prompt: str, params: SamplingParams) -> tuple[str, SequenceResult]:
    handle: SequenceHandle = runner.submit(runner.tokenize(prompt), params)
    text = ""
    with anyio.fail_after(600):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, localllm.LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return text, item
                text += item if isinstance(item, str) else item.text


async def pieces(stream: localllm.ResponseStream) -> list[str]:
    """The text of each chunk of a chat, one token's text each."""
    return [chunk.message.content async for chunk in stream if not chunk.done]


@pytest.fixture(scope="module")
def small_runner(smollm2_path: Path) -> Iterator[Runner]:
    runner = Runner(LoadConfig(str(smollm2_path), num_ctx=256, num_parallel=1))
    try:
        yield runner
    finally:
        runner.close()


async def test_generation_past_the_context_goes_on_to_num_predict(smollm2_path: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1) as engine:
        reply_ = await engine.generate(
            str(smollm2_path), STORY, raw=True, options={**GREEDY, "num_ctx": 256, "num_predict": 400}
        )
        assert (reply_.done_reason, reply_.eval_count) == ("length", 400)
        assert reply_.prompt_eval_count is not None and reply_.prompt_eval_count + 400 > 256
        assert reply_.response.strip()


async def test_without_shift_the_real_model_stops_at_the_end_of_the_context(small_runner: Runner) -> None:
    options = Options(temperature=0, repeat_penalty=1.0, num_predict=400)
    _, result = await complete(small_runner, STORY, SamplingParams(options, shift=False))
    assert result.done_reason == "length"
    assert result.prompt_eval_count + result.eval_count == 256  # the last token is never evaluated
    # With shift, the same request goes past it, and agrees with the stopped one before the shift.
    _, longer = await complete(small_runner, STORY, SamplingParams(options))
    assert (longer.done_reason, longer.eval_count) == ("length", 400)
    assert longer.tokens[:32] == result.tokens[:32]


async def test_a_prompt_too_long_for_the_context_is_cut_and_answered(smollm2_path: Path, home: Path) -> None:
    prompt = "Remember this. " + "The cat sat on the mat. " * 90 + "Where did the cat sit?"
    async with Engine(home, num_parallel=1) as engine:
        reply_ = await engine.generate(
            str(smollm2_path), prompt, raw=True, options={**GREEDY, "num_ctx": 256, "num_predict": 8}
        )
    assert reply_.done_reason == "length" and reply_.eval_count == 8
    assert reply_.prompt_eval_count is not None and 0 < reply_.prompt_eval_count <= 256


async def test_truncate_off_refuses_a_prompt_too_long(small_runner: Runner) -> None:
    tokens_ = small_runner.tokenize("word " * 600)
    assert len(tokens_) >= 600
    with pytest.raises(ContextLengthExceeded, match="num_ctx"):
        small_runner.submit(tokens_, SamplingParams(Options(temperature=0), truncate=False))
    # With truncate (the default), the first num_keep tokens and the end are evaluated.
    _, result = await complete(small_runner, "word " * 600, SamplingParams(Options(temperature=0, num_predict=1)))
    keep = keep_count(tokens_, 4, small_runner.model.bos_token, 256)
    assert result.prompt_eval_count == 256 - (256 - keep) // 2


async def test_one_sequence_shifts_while_three_others_agree_with_their_solo_runs(
    smollm2_path: Path, home: Path
) -> None:
    model = str(smollm2_path)
    questions = ["What is a prime number?", "Name three fruits.", "How do birds fly?"]
    options: dict[str, Any] = {**GREEDY, "num_ctx": 256, "num_predict": 48}
    # Without flash attention, greedy output hardly depends on the rest of the batch (see test_engine.py).
    async with Engine(home, num_parallel=4, flash_attention=False) as engine:
        solo = [await pieces(engine.chat(model, [{"role": "user", "content": q}], options=options)) for q in questions]
        batched: dict[int, list[str]] = {}
        long = []

        async def ask(i: int) -> None:
            batched[i] = await pieces(engine.chat(model, [{"role": "user", "content": questions[i]}], options=options))

        async def shifting() -> None:
            long.append(await engine.generate(model, STORY, raw=True, options={**options, "num_predict": 300}))

        async with anyio.create_task_group() as group:
            group.start_soon(shifting)
            for i in range(3):
                group.start_soon(ask, i)

    (story,) = long
    assert (story.done_reason, story.eval_count) == ("length", 300)
    for i in range(3):
        same = 0
        for a, b in zip(solo[i], batched[i], strict=False):
            if a != b:
                break
            same += 1
        assert same >= 16, (solo[i], batched[i])


async def test_a_runner_process_shifts_too(smollm2_path: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1, isolation="process") as engine:
        reply_ = await engine.generate(
            str(smollm2_path), STORY, raw=True, options={**GREEDY, "num_ctx": 256, "num_predict": 300}
        )
    assert (reply_.done_reason, reply_.eval_count) == ("length", 300)

"""Speculative decoding on the real model: greedy output is the same token for token, with or without drafts.

The target for a draft model is SmolLM2 requantized to Q8_0 from the bundled Q4_1 file, which then
drafts for it: the same vocabulary, and close enough that most drafts are accepted. Prompt lookup
drafts from the sequence itself; the prompt makes the model copy a paragraph it has seen.

Flash attention is on throughout: without it, llama.cpp's attention rounds a batch of several tokens
of one sequence (a verified draft) differently from a single token, so greedy output may drift where
two tokens are nearly tied.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from localllm import Engine, ModelNotFound
from localllm.errors import LocalLLMError
from localllm.options import Options
from localllm.runner.draft import DraftModelMismatch, ModelDrafter, NgramDrafter
from localllm.runner.protocol import LoadConfig, SamplingParams, SequenceResult
from localllm.runner.worker import Runner


@pytest.fixture
def anyio_backend() -> str:
    # What this module checks happens in the runner's thread, the same under every event loop; the model
    # runs are what cost. The loops themselves are tested end to end in test_engine.py and, on the scripted
    # model, in test_pipeline_fast.py.
    return "asyncio"


GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. The early bird catches the worm, but the second mouse "
    "gets the cheese. A journey of a thousand miles begins with a single step."
)
COPYING = f"Copy the paragraph.\n\nParagraph: {PARAGRAPH}\n\nCopy: {PARAGRAPH}\n\nParagraph: {PARAGRAPH}\n\nCopy:"
STORY = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
RECIPE = "<|im_start|>user\nHow do I make a cup of tea?<|im_end|>\n<|im_start|>assistant\n"
NUM_CTX = 1024


@pytest.fixture(scope="module")
def q8_target(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 requantized from Q4_1 to Q8_0: a target the Q4_1 file can draft for."""
    import llama_cpp

    from localllm.runner.llama import ensure_backend

    ensure_backend()
    path = tmp_path_factory.mktemp("target") / "smollm2-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(smollm2_path).encode(), str(path).encode(), params) == 0
    return path


# -- the runner's own results ---------------------------------------------------------------


@pytest.fixture(scope="module")
def copying_runners(smollm2_path: Path) -> Iterator[tuple[Runner, Runner]]:
    """The same model without drafts and with prompt lookup."""
    config = LoadConfig(str(smollm2_path), num_ctx=NUM_CTX, num_parallel=1, flash_attention=True)
    plain = Runner(config)
    try:
        lookup = Runner(attrs.evolve(config, prompt_lookup=True))
        try:
            assert isinstance(lookup.drafter, NgramDrafter) and plain.drafter is None
            yield plain, lookup
        finally:
            lookup.close()
    finally:
        plain.close()


_plain_replies: dict[tuple[int, str, str], tuple[str, SequenceResult]] = {}


async def plain_reply(runner: Runner, prompt: str, **options: Any) -> tuple[str, SequenceResult]:
    """`complete` on the runner without drafts, computed once per test run."""
    key = (id(runner), prompt, repr(sorted(options.items())))
    if key not in _plain_replies:
        _plain_replies[key] = await complete(runner, prompt, **options)
    return _plain_replies[key]


async def complete(runner: Runner, prompt: str, **options: Any) -> tuple[str, SequenceResult]:
    handle = runner.submit(runner.tokenize(prompt), SamplingParams(Options(**GREEDY, **options)))
    text = ""
    with anyio.fail_after(120):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return text, item
                assert isinstance(item, str)
                text += item


async def test_prompt_lookup_gives_the_plain_greedy_tokens(copying_runners: tuple[Runner, Runner]) -> None:
    plain, lookup = copying_runners
    expected_text, expected = await plain_reply(plain, COPYING, num_predict=64)
    text, result = await complete(lookup, COPYING, num_predict=64)
    assert result.tokens == expected.tokens
    assert text == expected_text
    assert PARAGRAPH[:40] in text, "the prompt should have made the model copy the paragraph"
    assert expected.draft_count == 0
    # Copying, most drafts are right: several tokens per decode.
    assert result.draft_accepted_count >= 30
    assert result.draft_accepted_count <= result.draft_count


@pytest.mark.parametrize("num_predict", [2, 7, 19, 33])
async def test_num_predict_is_exact_when_several_drafts_are_accepted(
    copying_runners: tuple[Runner, Runner], num_predict: int
) -> None:
    plain, lookup = copying_runners
    _, expected = await plain_reply(plain, COPYING, num_predict=40)
    _, result = await complete(lookup, COPYING, num_predict=num_predict)
    assert result.done_reason == "length"
    assert result.tokens == expected.tokens[:num_predict]
    assert result.eval_count == num_predict
    if num_predict > 7:
        assert result.draft_accepted_count >= num_predict // 2


@pytest.mark.parametrize("stop", ["brown", "worm", "mouse gets", "step."])
async def test_a_stop_sequence_is_exact_when_several_drafts_are_accepted(
    copying_runners: tuple[Runner, Runner], stop: str
) -> None:
    plain, lookup = copying_runners
    full, _ = await plain_reply(plain, COPYING, num_predict=48)
    assert stop in full
    expected, _ = await plain_reply(plain, COPYING, num_predict=48, stop=[stop])
    text, result = await complete(lookup, COPYING, num_predict=48, stop=[stop])
    assert text == expected == full[: full.index(stop)]
    assert result.done_reason == "stop"
    assert result.draft_accepted_count > 0


# -- through the engine: options, names, Modelfiles ------------------------------------------


async def generate_all(engine: Engine, model: str, prompts: list[str], **options: Any) -> list[str]:
    """Generate for every prompt at once (each in its own slot); the texts in prompt order."""
    texts = [""] * len(prompts)

    async def one(i: int) -> None:
        reply = await engine.generate(
            model, prompts[i], raw=True, options={**GREEDY, "num_ctx": NUM_CTX, "num_predict": 48, **options}
        )
        texts[i] = reply.response

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return texts


async def drafting_runner(engine: Engine) -> Runner:
    runners = [m.runner for m in await engine.scheduler.running() if isinstance(m.runner, Runner) and m.runner.drafter]
    assert len(runners) == 1
    return runners[0]


async def test_a_draft_model_gives_the_targets_greedy_tokens(home: Path, q8_target: Path, smollm2_path: Path) -> None:
    async with Engine(home, num_parallel=2, flash_attention=True) as engine:
        for prompts in ([STORY], [STORY, RECIPE]):
            expected = await generate_all(engine, str(q8_target), prompts)
            drafted = await generate_all(engine, str(q8_target), prompts, draft_model=str(smollm2_path))
            assert drafted == expected
        runner = await drafting_runner(engine)
    assert isinstance(runner.drafter, ModelDrafter)
    assert runner.config.draft_model_path == str(smollm2_path.resolve())
    assert runner.drafts_accepted >= 48  # of 3 x 48 tokens
    assert runner.drafts_accepted <= runner.drafted


async def test_the_draft_model_is_a_name_or_a_modelfile_parameter(home: Path, smollm2_path: Path) -> None:
    async with Engine(home, num_parallel=1, flash_attention=True) as engine:
        await engine.create("smollm2-draft", from_=str(smollm2_path))
        await engine.create("smollm2-fast", modelfile="FROM smollm2-draft\nPARAMETER draft_model smollm2-draft\n")
        shown = await engine.show("smollm2-fast")
        assert "draft_model" in (shown.parameters or "")
        expected = await generate_all(engine, "smollm2-draft", [COPYING])
        assert await generate_all(engine, "smollm2-fast", [COPYING]) == expected
        runner = await drafting_runner(engine)
        assert isinstance(runner.drafter, ModelDrafter)
        assert runner.config.draft_model_path == runner.config.model_path  # the model drafting for itself
        assert runner.drafts_accepted == runner.drafted > 0
        with pytest.raises(ModelNotFound, match="draft_model: model 'no-such-draft' not found"):
            await engine.generate("smollm2-draft", "Hi", options={"draft_model": "no-such-draft"})


async def test_a_draft_with_another_vocabulary_is_refused(home: Path, smollm2_path: Path, gemma3_path: Path) -> None:
    async with Engine(home, num_parallel=1) as engine:
        with pytest.raises(DraftModelMismatch, match=r"cannot draft for this model: it has 262\d+ tokens where"):
            await engine.generate(str(smollm2_path), "Hi", options={"draft_model": str(gemma3_path)})
        # The runner that could not load left nothing behind; the model still serves without the draft.
        reply = await engine.generate(str(smollm2_path), "Hi", options={**GREEDY, "num_predict": 2})
        assert reply.done

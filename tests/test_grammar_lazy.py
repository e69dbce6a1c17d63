"""Grammar-constrained sampling on the real SmolLM2 model: the grammar checks the token the chain
picks, and masks the whole vocabulary only when that token is not allowed.

Greedy output must be exactly what applying the grammar first gives; sampled output must follow
the grammar token by token (checked by a separate llama.cpp grammar sampler) and parse once done;
and nothing a caller does may reach llama.cpp in a state that aborts the process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

from localllm import Engine, RunnerError
from localllm.chat.grammar import format_to_grammar
from localllm.options import Options
from localllm.runner.llama import Batch, LlamaContext, LlamaModel, SamplerChain


@pytest.fixture
def anyio_backend() -> str:
    # What this module checks happens in the runner's thread, the same under every event loop; the model
    # runs are what cost. The loops themselves are tested end to end in test_engine.py and, on the scripted
    # model, in test_pipeline_fast.py.
    return "asyncio"


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}
# Words the model would not say by itself: every token of them is forced by the grammar.
UNLIKELY = {
    "type": "object",
    "properties": {"animal": {"enum": ["axolotl", "quokka", "pangolin"]}, "legs": {"type": "integer", "maximum": 8}},
    "required": ["animal", "legs"],
}
BARE_ENUM = {"enum": ["zyzzyva", "quixotic"]}
PERSON_PROMPT = "Describe a person called Ana who is 34 years old, as a JSON object."
ANIMAL_PROMPT = "Which animal do you like best? Answer in JSON."
FORMATS: list[tuple[str, Any, str]] = [
    ("schema", PERSON, PERSON_PROMPT),
    ("json", "json", PERSON_PROMPT),
    ("unlikely", UNLIKELY, ANIMAL_PROMPT),
    ("bare-enum", BARE_ENUM, ANIMAL_PROMPT),
]
GREEDY = Options(temperature=0, repeat_penalty=1.0)


def chatml(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class Llama:
    """SmolLM2 with a one-sequence context, decoding token by token."""

    def __init__(self, path: Path) -> None:
        self.model = LlamaModel(str(path))
        # One thread: no thread waits on another, so the pace holds on a busy machine.
        self.context = LlamaContext(self.model, n_ctx=512, n_batch=128, n_seq_max=1, n_threads=1)
        self.batch = Batch(128, 1)

    def close(self) -> None:
        self.batch.close()
        self.context.close()
        self.model.close()

    def generate(self, prompt: str, sample: Any, max_tokens: int) -> tuple[list[int], bool]:
        """Tokens sampled by `sample(context, index)` until end of generation (then True) or `max_tokens`."""
        tokens = self.model.tokenize(chatml(prompt), add_special=False, parse_special=True)
        self.context.clear()
        self.batch.clear()
        for pos, token in enumerate(tokens):
            self.batch.add(token, pos, 0, pos == len(tokens) - 1)
        index, pos, out = len(tokens) - 1, len(tokens), []
        for _ in range(max_tokens):
            assert self.context.decode(self.batch) == 0
            token = sample(self.context, index)
            if self.model.is_eog(token):
                return out, True
            out.append(token)
            self.batch.clear()
            self.batch.add(token, pos, 0, True)
            index, pos = 0, pos + 1
        return out, False

    def text(self, tokens: list[int]) -> str:
        return b"".join(self.model.token_bytes(t) for t in tokens).decode()


class GrammarChecker:
    """llama.cpp's own grammar sampler, fed one token at a time."""

    def __init__(self, model: LlamaModel, grammar: str) -> None:
        import llama_cpp

        self.L = llama_cpp
        self.model = model
        self.handle = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
        assert self.handle

    def close(self) -> None:
        self.L.llama_sampler_free(self.handle)

    def allows(self, token: int) -> bool:
        data = (self.L.llama_token_data * 1)(self.L.llama_token_data(token, 1.0, 0.0))
        array = self.L.llama_token_data_array(data, 1, -1, False)
        self.L.llama_sampler_apply(self.handle, self.L.byref(array))
        return bool(data[0].logit != float("-inf"))

    def follows(self, tokens: list[int], *, complete: bool) -> bool:
        """Whether `tokens` are allowed one after another (and, if `complete`, the grammar may end there)."""
        for token in tokens:
            if not self.allows(token):
                return False
            self.L.llama_sampler_accept(self.handle, token)
        return not complete or self.allows(self.model.eos_token)


@pytest.fixture(scope="module")
def llama(smollm2_path: Path) -> Iterator[Llama]:
    runner = Llama(smollm2_path)
    yield runner
    runner.close()


def check_output(llama: Llama, fmt: Any, tokens: list[int], done: bool) -> None:
    grammar = format_to_grammar(fmt)
    assert grammar is not None
    checker = GrammarChecker(llama.model, grammar)
    try:
        assert checker.follows(tokens, complete=done), llama.text(tokens)
    finally:
        checker.close()
    if done:
        data = json.loads(llama.text(tokens))
        if isinstance(fmt, dict):
            jsonschema.validate(data, fmt)


def greedy_pair(llama: Llama, grammar: str, prompt: str, max_tokens: int) -> tuple[list[int], bool]:
    """Greedy output with the grammar checked lazily; asserted equal to applying the grammar first."""
    import llama_cpp

    lazy = SamplerChain(llama.model, GREEDY, grammar=grammar)
    try:
        tokens, done = llama.generate(prompt, lazy.sample, max_tokens)
    finally:
        lazy.close()
    # The reference: llama.cpp's grammar sampler ahead of greedy in one chain, over the whole vocabulary.
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_grammar(llama.model.vocab, grammar.encode(), b"root")
    )
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        reference = llama.generate(
            prompt, lambda context, index: llama_cpp.llama_sampler_sample(chain, context.handle, index), max_tokens
        )
    finally:
        llama_cpp.llama_sampler_free(chain)
    assert (tokens, done) == reference, (llama.text(tokens), llama.text(reference[0]))
    return tokens, done


@pytest.mark.parametrize(("fmt", "prompt"), [(f, p) for _, f, p in FORMATS], ids=[name for name, _, _ in FORMATS])
def test_greedy_output_is_what_applying_the_grammar_first_gives(llama: Llama, fmt: Any, prompt: str) -> None:
    grammar = format_to_grammar(fmt)
    assert grammar is not None
    tokens, done = greedy_pair(llama, grammar, prompt, 48)
    check_output(llama, fmt, tokens, done)
    if fmt != "json":  # the schemas are bounded: the document closes in time
        assert done


def test_end_of_generation_waits_until_the_grammar_is_complete(llama: Llama) -> None:
    prompt = "What is 2 + 2?"
    free = SamplerChain(llama.model, GREEDY)
    try:
        tokens, done = llama.generate(prompt, free.sample, 40)
    finally:
        free.close()
    assert done and len(llama.text(tokens)) < 30, "the model would end its answer early by itself"
    tokens, done = greedy_pair(llama, "root ::= [a-zA-Z0-9 ,.!?\\n]{30,40}", prompt, 60)
    assert done and 30 <= len(llama.text(tokens)) <= 40


def test_the_grammar_forces_what_the_model_would_not_say(llama: Llama) -> None:
    free = SamplerChain(llama.model, GREEDY)
    try:
        tokens, _ = llama.generate(ANIMAL_PROMPT, free.sample, 12)
    finally:
        free.close()
    assert not llama.text(tokens).startswith('"'), "the model would begin the bare enum by itself"
    forced = SamplerChain(llama.model, GREEDY, grammar=format_to_grammar(BARE_ENUM))
    try:
        tokens, done = llama.generate(ANIMAL_PROMPT, forced.sample, 48)
    finally:
        forced.close()
    assert done and json.loads(llama.text(tokens)) in BARE_ENUM["enum"]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("fmt", "prompt"), [(f, p) for _, f, p in FORMATS], ids=[name for name, _, _ in FORMATS])
def test_sampled_output_follows_the_grammar(llama: Llama, fmt: Any, prompt: str, seed: int) -> None:
    # Temperature 1 with Ollama's top_k 40 and top_p 0.9, and a repeat penalty: every sampler stage runs.
    options = Options(temperature=1.0, seed=seed, repeat_penalty=1.1)
    sampler = SamplerChain(llama.model, options, grammar=format_to_grammar(fmt), n_ctx=512)
    try:
        tokens, done = llama.generate(prompt, sampler.sample, 64)
    finally:
        sampler.close()
    check_output(llama, fmt, tokens, done)


def test_nothing_that_would_abort_llama_cpp_gets_through(llama: Llama) -> None:
    model = llama.model
    sampler = SamplerChain(model, GREEDY, grammar=format_to_grammar(PERSON))
    try:
        # End of generation before the document is complete: llama.cpp's grammar would abort the process.
        with pytest.raises(RunnerError, match="grammar"):
            sampler.accept(model.eos_token)
        with pytest.raises(RunnerError, match="grammar"):
            sampler.accept(model.tokenize("hello", add_special=False)[0])
        for outside in (-1, model.n_vocab):
            with pytest.raises(RunnerError, match="vocabulary"):
                sampler.accept(outside)
        sampler.accept(model.tokenize("{", add_special=False)[0])  # the sampler is still usable
    finally:
        sampler.close()
        sampler.close()
    # A grammar no token can satisfy (a NUL character) and that cannot end yet.
    stuck = SamplerChain(model, GREEDY, grammar='root ::= "\\x00"')
    try:
        with pytest.raises(RunnerError, match="no next token"):
            llama.generate(PERSON_PROMPT, stuck.sample, 1)
    finally:
        stuck.close()


async def test_concurrent_sampled_requests_follow_their_formats(llama: Llama, smollm2_path: Path, home: Path) -> None:
    replies: dict[tuple[str, int], Any] = {}

    async def one(name: str, fmt: Any, prompt: str, seed: int, engine: Engine) -> None:
        # Seed 0 here: greedy.
        options = {"temperature": 1.0 if seed else 0.0, "seed": seed, "num_predict": 160, "num_thread": 1}
        replies[name, seed] = await engine.generate(str(smollm2_path), prompt, format=fmt, options=options)

    async with Engine(home, num_parallel=2) as engine:
        async with anyio.create_task_group() as group:
            for seed in (1, 2):
                for name, fmt, prompt in FORMATS[:3]:
                    group.start_soon(one, name, fmt, prompt, seed, engine)
        # And greedy, two at a time, next to a free request.
        async with anyio.create_task_group() as group:
            for name, fmt, prompt in (FORMATS[0], FORMATS[3]):
                group.start_soon(one, name, fmt, prompt, 0, engine)
            group.start_soon(one, "free", None, PERSON_PROMPT, 0, engine)
    assert len(replies) == 9
    for (name, _seed), reply in replies.items():
        if name == "free":
            continue
        fmt = next(f for n, f, _ in FORMATS if n == name)
        tokens = llama.model.tokenize(reply.response, add_special=False, parse_special=False)
        done = reply.done_reason == "stop"
        assert done or name == "json", (name, reply.response)  # the schemas are bounded
        check_output(llama, fmt, tokens, done)


def test_plain_greedy_picks_what_llama_cpps_greedy_sampler_picks(llama: Llama) -> None:
    """Greedy without penalties reads the most likely token off the logits: the same token every time."""
    import llama_cpp

    ours = SamplerChain(llama.model, GREEDY)
    reference = llama_cpp.llama_sampler_init_greedy()
    picks: list[tuple[int, int]] = []

    def both(context: LlamaContext, index: int) -> int:
        picked = ours.sample(context, index)
        picks.append((picked, int(llama_cpp.llama_sampler_sample(reference, context.handle, index))))
        return picked

    try:
        llama.generate(PERSON_PROMPT, both, 32)
    finally:
        llama_cpp.llama_sampler_free(reference)
        ours.close()
    assert len(picks) > 8 and all(a == b for a, b in picks)

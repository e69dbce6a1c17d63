"""The runner's scheduling logic, on a fake backend: batching, chunking, prefix reuse, cancellation, endings.

The fake model has one token per ASCII character. Its "model" continues the alphabet: after a letter
comes the next one, after "z" the end-of-generation token, and any other character repeats forever.
Its logits say so: the successor scores 3, the end-of-generation token 2, the token after the
successor 1, every other token 0.
The fake context records every batch it is given and keeps each sequence's cached positions, checking
them as llama.cpp does; its decodes can be held at a gate, so a test can act between two steps.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import numpy as np
import numpy.typing as npt
import pytest

from localllm.errors import ContextLengthExceeded, EngineClosed, InvalidFormat, LocalLLMError, RunnerError
from localllm.options import Options
from localllm.runner.backend import Batch, Context, Model
from localllm.runner.prompt_cache import PromptCache
from localllm.runner.protocol import LoadConfig, SamplingParams, ScoredText, SequenceHandle, SequenceResult
from localllm.runner.worker import Runner, log_softmax, most_likely
from localllm.types import Logprob

EOG, BOS = 0, 1
N_VOCAB = 128
TIMEOUT = 5.0  # seconds; every wait here normally ends within milliseconds


def tokens(text: str) -> list[int]:
    return [ord(char) for char in text]


def successor(token: int) -> int:
    char = chr(token)
    if char == "z":
        return EOG
    return token + 1 if "a" <= char < "z" else token


# -- the fake backend ---------------------------------------------------------------


@attrs.define
class FakeModel:
    bos_token: int = BOS
    eos_token: int = EOG
    closed: bool = False

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return ([BOS] if add_special else []) + tokens(text)

    def token_bytes(self, token: int) -> bytes:
        return b"" if token in (EOG, BOS) else chr(token).encode()

    def token_text(self, token: int) -> str:
        return {EOG: "</s>", BOS: "<s>"}.get(token, chr(token))

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        if any(not 0 <= token < N_VOCAB for token in tokens):
            raise LocalLLMError("token ids outside the vocabulary")

    def metadata(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeBatch:
    capacity: int
    rows: list[tuple[int, int, int, bool]] = attrs.field(factory=list)  # (seq_id, token, pos, logits)
    closed: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.rows)

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        if len(self.rows) >= self.capacity:
            raise IndexError("batch is full")
        self.rows.append((seq_id, token, pos, logits))
        return len(self.rows) - 1

    def clear(self) -> None:
        self.rows.clear()

    def close(self) -> None:
        self.closed = True


@attrs.frozen
class Decoded:
    """One batch as the runner handed it to decode, with the status decode returned."""

    rows: tuple[tuple[int, int, int, bool], ...]
    status: int

    def __str__(self) -> str:
        """Like "0:d@3* 1:n@0": sequence, token, position, and * where logits were asked for."""
        return " ".join(f"{seq}:{chr(token)}@{pos}{'*' if logits else ''}" for seq, token, pos, logits in self.rows)


@attrs.define
class FakeContext:
    n_ctx_seq: int
    n_batch: int
    n_seq_max: int
    decoded: list[Decoded] = attrs.field(factory=list)
    kv: dict[int, dict[int, int]] = attrs.field(factory=dict)  # seq_id -> position -> token
    removals: list[tuple[int, int]] = attrs.field(factory=list)  # seq_rm calls
    copies: list[tuple[int, int]] = attrs.field(factory=list)  # seq_cp calls
    restores: list[int] = attrs.field(factory=list)  # state_set calls
    statuses: deque[int] = attrs.field(factory=deque)  # what the next decodes return (then 0)
    held: threading.Event = attrs.field(factory=threading.Event)  # set while a decode waits at the gate
    logit_reads: int = 0
    closed: bool = False
    _open: threading.Event = attrs.field(factory=threading.Event)

    def __attrs_post_init__(self) -> None:
        self._open.set()

    def hold(self) -> None:
        """Make the next decode wait until `release`."""
        self._open.clear()

    def release(self) -> None:
        self.held.clear()
        self._open.set()

    @property
    def last(self) -> Decoded:
        return next(d for d in reversed(self.decoded) if d.status == 0)

    def decode(self, batch: Batch) -> int:
        assert isinstance(batch, FakeBatch)
        if not self._open.is_set():
            self.held.set()
            if not self._open.wait(TIMEOUT):
                raise AssertionError("the test never released the decode gate")
        rows = tuple(batch.rows)
        ends = {seq: max(cells, default=-1) for seq, cells in self.kv.items()}
        for seq, token, pos, _ in rows:  # llama.cpp's own checks: each sequence continues where it ends
            assert 0 <= seq < self.n_seq_max and 0 <= token < N_VOCAB
            assert pos == ends.get(seq, -1) + 1, f"sequence {seq} continues at {pos}, not after {ends.get(seq)}"
            ends[seq] = pos
        status = self.statuses.popleft() if self.statuses else 0
        self.decoded.append(Decoded(rows, status))
        if status == 0:
            for seq, token, pos, _ in rows:
                self.kv.setdefault(seq, {})[pos] = token
        return status

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        _, token, _, logits = self.last.rows[index]
        assert logits, f"logits read at batch index {index}, which has none"
        self.logit_reads += 1
        values = np.zeros(N_VOCAB, dtype=np.float32)
        following = successor(token)
        values[EOG] = 2.0
        values[(following + 1) % N_VOCAB] = 1.0
        values[following] = 3.0
        return values

    def seq_rm(self, seq_id: int, p0: int) -> bool:
        self.removals.append((seq_id, p0))
        cells = self.kv.get(seq_id, {})
        for pos in [pos for pos in cells if pos >= p0]:
            del cells[pos]
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        return min(self.kv.get(seq_id) or [-1])

    def seq_cp(self, src: int, dst: int) -> bool:
        self.copies.append((src, dst))
        self.kv[dst] = dict(self.kv.get(src, {}))
        return True

    def state_get(self, seq_id: int) -> bytes:
        return json.dumps(sorted(self.kv.get(seq_id, {}).items())).encode()

    def state_set(self, seq_id: int, state: bytes) -> bool:
        self.restores.append(seq_id)
        self.kv[seq_id] = {pos: token for pos, token in json.loads(state)}
        return True

    def cached(self, seq_id: int) -> str:
        cells = self.kv.get(seq_id, {})
        return "".join(chr(cells[pos]) for pos in sorted(cells))

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeSampler:
    accepted: list[int] = attrs.field(factory=list)
    closed: bool = False

    def sample(self, context: Context, index: int) -> int:
        assert isinstance(context, FakeContext)
        _, token, _, logits = context.last.rows[index]
        assert logits, f"sampled at batch index {index}, which has no logits"
        following = successor(token)
        self.accepted.append(following)
        return following

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeBackend:
    fail_at: str | None = None  # "context" or "batch": that step of loading raises
    model: FakeModel = attrs.field(factory=FakeModel)
    contexts: list[FakeContext] = attrs.field(factory=list)
    batches: list[FakeBatch] = attrs.field(factory=list)
    samplers: list[FakeSampler] = attrs.field(factory=list)
    state_format: str = "fake"

    @property
    def context(self) -> FakeContext:
        return self.contexts[-1]

    def load_model(self, config: LoadConfig, *, gpu_layers: int, tensor_split: Sequence[float] | None) -> FakeModel:
        return self.model

    def new_context(self, model: Model, config: LoadConfig) -> FakeContext:
        if self.fail_at == "context":
            raise LocalLLMError("no room for the context")
        self.contexts.append(FakeContext(config.num_ctx, config.num_batch, config.num_parallel))
        return self.context

    def new_batch(self, capacity: int, n_seq_max: int) -> FakeBatch:
        if self.fail_at == "batch":
            raise LocalLLMError("no room for the batch")
        self.batches.append(FakeBatch(capacity))
        return self.batches[-1]

    def new_sampler(self, model: Model, options: Options, *, grammar: str | None, n_ctx: int) -> FakeSampler:
        if grammar == "unparseable":
            raise InvalidFormat("the output grammar could not be parsed")
        self.samplers.append(FakeSampler())
        return self.samplers[-1]


# -- helpers ------------------------------------------------------------------------


@contextmanager
def serving(prompt_cache: PromptCache | None = None, **config: Any) -> Iterator[tuple[Runner, FakeBackend]]:
    backend = FakeBackend()
    runner = Runner(LoadConfig("fake.gguf", **config), backend=backend, prompt_cache=prompt_cache)
    try:
        yield runner, backend
    finally:
        backend.context.release()
        runner.close()


def params(
    grammar: str | None = None, *, logprobs: bool = False, top_logprobs: int = 0, **options: Any
) -> SamplingParams:
    return SamplingParams(Options(**options), grammar=grammar, logprobs=logprobs, top_logprobs=top_logprobs)


async def reply(handle: SequenceHandle) -> tuple[str, SequenceResult]:
    """Everything a sequence produced: its text and its result (or the error it failed with)."""
    text = ""
    with anyio.fail_after(TIMEOUT):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return text, item
                text += item


async def scored_reply(handle: SequenceHandle) -> tuple[list[ScoredText], SequenceResult]:
    """Everything a sequence that asked for logprobs produced: its pieces of scored text, and its result."""
    pieces = []
    with anyio.fail_after(TIMEOUT):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return pieces, item
                assert isinstance(item, ScoredText), f"plain text {item!r} from a sequence that asked for logprobs"
                pieces.append(item)


async def held(context: FakeContext) -> None:
    """Wait until the worker is inside a decode, held at the gate."""
    assert await anyio.to_thread.run_sync(context.held.wait, TIMEOUT)


# -- batching -----------------------------------------------------------------------


async def test_concurrent_sequences_share_every_batch_next_tokens_first() -> None:
    with serving(num_parallel=2) as (runner, backend):
        context = backend.context
        context.hold()
        first = runner.submit(tokens("abc"), params(num_predict=5))
        await held(context)  # the first prompt is being decoded alone
        second = runner.submit(tokens("nop"), params(num_predict=4))
        context.release()
        text, result = await reply(first)
        assert (text, result.done_reason, result.prompt_eval_count, result.eval_count) == ("defgh", "length", 3, 5)
        assert (await reply(second))[0] == "qrst"

    assert [str(d) for d in context.decoded] == [
        "0:a@0 0:b@1 0:c@2*",
        "0:d@3* 1:n@0 1:o@1 1:p@2*",  # the running sequence's next token before the newcomer's prompt
        "0:e@4* 1:q@3*",
        "0:f@5* 1:r@4*",
        "0:g@6* 1:s@5*",
    ]


async def test_a_long_prompt_is_chunked_and_never_delays_a_running_sequence() -> None:
    with serving(num_parallel=2, num_batch=4) as (runner, backend):
        context = backend.context
        context.hold()
        running = runner.submit(tokens("a"), params(num_predict=6))
        await held(context)
        long = runner.submit(tokens("klmnopqrs"), params(num_predict=2))
        context.release()
        assert (await reply(running))[0] == "bcdefg"
        text, result = await reply(long)
        assert (text, result.prompt_eval_count) == ("tu", 9)

    assert [str(d) for d in context.decoded] == [
        "0:a@0*",
        "0:b@1* 1:k@0 1:l@1 1:m@2",
        "0:c@2* 1:n@3 1:o@4 1:p@5",
        "0:d@3* 1:q@6 1:r@7 1:s@8*",
        "0:e@4* 1:t@9*",
        "0:f@5*",
    ]


async def test_prompt_chunks_go_in_admission_order_whatever_the_slot() -> None:
    with serving(num_parallel=2, num_batch=4) as (runner, backend):
        context = backend.context
        await reply(runner.submit(tokens("y"), params()))  # slot 0 is now the more recently used
        start = len(context.decoded)
        context.hold()
        earlier = runner.submit(tokens("......"), params(num_predict=1))  # to slot 1, the least recently used
        await held(context)
        later = runner.submit(tokens("bbbbbb"), params(num_predict=1))  # to slot 0
        context.release()
        await reply(earlier)
        await reply(later)

    assert [str(d) for d in context.decoded[start : start + 3]] == [
        "1:.@0 1:.@1 1:.@2 1:.@3",
        "1:.@4 1:.@5* 0:b@0 0:b@1",
        "0:b@2 0:b@3 0:b@4 0:b@5*",
    ]


# -- prefix reuse -------------------------------------------------------------------


async def test_a_shared_prefix_is_reused_from_the_slot_that_holds_the_longest() -> None:
    with serving(num_parallel=2) as (runner, backend):
        context = backend.context
        await reply(runner.submit(tokens("hello wor"), params(num_predict=2)))  # slot 0
        await reply(runner.submit(tokens("goodbye"), params(num_predict=1)))  # slot 1, the least recently used
        assert (context.cached(0), context.cached(1)) == ("hello wors", "goodbye")
        start = len(context.decoded)

        # Slot 1 was used last, so only the shared prefix can send this request there.
        text, result = await reply(runner.submit(tokens("goodbye moon"), params(num_predict=1)))
        assert (text, result.prompt_eval_count, result.prompt_cached_count) == ("o", 12, 7)
        assert context.removals[-1] == (1, 7)
        assert str(context.decoded[start]) == "1: @7 1:m@8 1:o@9 1:o@10 1:n@11*"
        assert backend.samplers[-1].accepted[:12] == tokens("goodbye moon")  # penalties still see the whole prompt

        # A prompt the slot holds entirely: its last token is evaluated again, for its logits.
        text, result = await reply(runner.submit(tokens("hello wor"), params(num_predict=1)))
        assert (text, result.prompt_eval_count, result.prompt_cached_count) == ("s", 9, 8)
        assert str(context.decoded[-1]) == "0:r@8*"


async def test_a_cache_that_lost_its_first_positions_is_evaluated_again() -> None:
    with serving(num_parallel=1) as (runner, backend):
        context = backend.context
        await reply(runner.submit(tokens("abcd"), params(num_predict=1)))
        del context.kv[0][0]  # as a sliding-window cache drops what left its window
        _, result = await reply(runner.submit(tokens("abcdx"), params(num_predict=1)))
        assert (result.prompt_eval_count, result.prompt_cached_count) == (5, 0)
        assert context.removals[-1] == (0, 0)
        assert context.cached(0) == "abcdx"


# -- prefixes shared across slots and kept in the prompt cache --------------------------

SYSTEM = "." * 40 + "," * 40  # a long shared start; the fake model repeats punctuation forever


async def test_a_long_prefix_another_slot_holds_is_copied_not_evaluated() -> None:
    with serving(num_parallel=2, num_ctx=512) as (runner, backend):
        context = backend.context
        context.hold()
        first = runner.submit(tokens(SYSTEM + "ab"), params(num_predict=40))  # slot 0
        await held(context)
        context.release()
        context.hold()
        await held(context)  # the first prompt is in slot 0's cache, and slot 0 is busy
        second = runner.submit(tokens(SYSTEM + "xy"), params(num_predict=1))
        context.release()
        text, result = await reply(second)
        assert context.copies == [(0, 1)]
        assert (text, result.prompt_eval_count, result.prompt_cached_count) == ("z", 82, 80)
        assert context.cached(1) == SYSTEM + "xy"
        assert (await reply(first))[0].startswith("cdef")
        assert context.cached(0).startswith(SYSTEM + "abcdef")  # the donor is untouched


async def test_a_short_shared_prefix_is_evaluated_rather_than_copied() -> None:
    with serving(num_parallel=2) as (runner, backend):
        context = backend.context
        context.hold()
        first = runner.submit(tokens("." * 20 + "ab"), params(num_predict=30))
        await held(context)
        context.release()
        context.hold()
        await held(context)
        second = runner.submit(tokens("." * 20 + "xy"), params(num_predict=1))
        context.release()
        _, result = await reply(second)
        assert context.copies == [] and result.prompt_cached_count == 0
        await reply(first)


async def test_a_slot_reused_for_another_conversation_keeps_the_first_in_the_cache() -> None:
    cache = PromptCache(1 << 20)
    with serving(cache, num_parallel=1, num_ctx=512) as (runner, backend):
        context = backend.context
        await reply(runner.submit(tokens(SYSTEM + "ab"), params(num_predict=2)))
        await reply(runner.submit(tokens("?" * 90), params(num_predict=1)))  # drops the first conversation
        assert len(cache) == 1 and runner.prompt_cache_bytes == cache.size_bytes() > 0
        start = len(context.decoded)
        text, result = await reply(runner.submit(tokens(SYSTEM + "abcdq"), params(num_predict=1)))
        assert context.restores == [0]
        assert (text, result.prompt_cached_count) == ("r", 83)  # the state held the prompt and one reply token
        assert str(context.decoded[start]) == "0:d@83 0:q@84*"


async def test_a_cache_without_room_keeps_nothing() -> None:
    cache = PromptCache(10)
    with serving(cache, num_parallel=1, num_ctx=512) as (runner, backend):
        await reply(runner.submit(tokens(SYSTEM + "ab"), params(num_predict=2)))
        await reply(runner.submit(tokens("?" * 90), params(num_predict=1)))
        _, result = await reply(runner.submit(tokens(SYSTEM + "abcdq"), params(num_predict=1)))
        assert backend.context.restores == [] and result.prompt_cached_count == 0


async def test_a_persistent_cache_lets_a_new_runner_start_where_the_last_one_ended(tmp_path: Path) -> None:
    with serving(PromptCache(1 << 20, directory=tmp_path), num_parallel=2, num_ctx=512) as (runner, _):
        await reply(runner.submit(tokens(SYSTEM + "ab"), params(num_predict=2)))
    with serving(PromptCache(1 << 20, directory=tmp_path), num_parallel=2, num_ctx=512) as (runner, backend):
        _, result = await reply(runner.submit(tokens(SYSTEM + "abcdq"), params(num_predict=1)))
        assert backend.context.restores and result.prompt_cached_count == 83


# -- cancellation -------------------------------------------------------------------


async def test_cancelling_a_running_sequence_hands_its_slot_to_a_waiting_one() -> None:
    with serving(num_parallel=1) as (runner, backend):
        context = backend.context
        context.hold()
        endless = runner.submit(tokens("."), params())
        await held(context)
        waiting = runner.submit(tokens("x"), params())
        assert (runner.active_count, runner.pending_count) == (1, 1)
        endless.cancel()
        context.release()
        assert (await reply(waiting))[0] == "yz"

    # The decode under way when it was cancelled was the cancelled sequence's last.
    assert [str(d) for d in context.decoded] == ["0:.@0*", "0:x@0*", "0:y@1*", "0:z@2*"]
    assert endless.finished and backend.samplers[0].closed
    assert runner.active_count == 0


async def test_cancelling_a_queued_sequence_withdraws_it() -> None:
    with serving(num_parallel=1) as (runner, backend):
        context = backend.context
        context.hold()
        running = runner.submit(tokens("w"), params())
        await held(context)
        queued = runner.submit(tokens("abc"), params())
        queued.cancel()
        assert queued.finished and runner.pending_count == 0
        context.release()
        assert (await reply(running))[0] == "xyz"

    assert all(seq == 0 and chr(token) in "wxyz" for d in context.decoded for seq, token, _, _ in d.rows)
    assert len(backend.samplers) == 1


# -- how sequences end --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "options", "config", "text", "reason", "eval_count"),
    [
        pytest.param("a", {"num_predict": 3}, {}, "bcd", "length", 3, id="num_predict"),
        pytest.param("w", {}, {}, "xyz", "stop", 3, id="end-of-generation token"),
        pytest.param("a", {"stop": ["de"]}, {}, "bc", "stop", 4, id="stop sequence"),
        pytest.param("w", {"stop": ["z!"]}, {}, "xyz", "stop", 3, id="text held as a possible stop is flushed"),
        pytest.param("a", {}, {"num_ctx": 8}, "bcdefgh", "length", 7, id="context full"),
    ],
)
async def test_how_a_sequence_ends(
    prompt: str, options: dict[str, Any], config: dict[str, int], text: str, reason: str, eval_count: int
) -> None:
    with serving(**config) as (runner, backend):
        emitted, result = await reply(runner.submit(tokens(prompt), params(**options)))
        assert (emitted, result.done_reason) == (text, reason)
        assert (result.prompt_eval_count, result.eval_count) == (len(prompt), eval_count)
        assert result.prompt_eval_duration >= 0 and result.eval_duration >= 0
        assert backend.samplers[0].closed and runner.active_count == 0


async def test_prompts_the_runner_refuses() -> None:
    with serving(num_ctx=8) as (runner, _):
        with pytest.raises(LocalLLMError, match="empty"):
            runner.submit([], params())
        with pytest.raises(ContextLengthExceeded):
            runner.submit(tokens("abcdefgh"), params())
        with pytest.raises(LocalLLMError, match="vocabulary"):
            runner.submit([N_VOCAB], params())


async def test_a_sampler_that_cannot_be_built_fails_only_its_sequence() -> None:
    with serving(num_parallel=1) as (runner, _):
        bad = runner.submit(tokens("a"), params(grammar="unparseable"))
        good = runner.submit(tokens("x"), params())
        with pytest.raises(InvalidFormat):
            await reply(bad)
        assert bad.finished
        assert (await reply(good))[0] == "yz"


# -- failures -----------------------------------------------------------------------


async def test_a_decode_error_fails_the_runner_and_everything_it_holds() -> None:
    with serving(num_parallel=2) as (runner, backend):
        context = backend.context
        context.hold()
        first = runner.submit(tokens("abc"), params())
        await held(context)
        second = runner.submit(tokens("nop"), params())
        queued = runner.submit(tokens("xyz"), params())
        context.statuses.extend([0, -1])  # the decode under way succeeds, the next one fails
        context.release()
        for handle in (first, second, queued):
            with pytest.raises(RunnerError, match="llama_decode returned -1"):
                await reply(handle)
        assert not runner.healthy
        with pytest.raises(RunnerError, match="retry"):
            runner.submit(tokens("a"), params())


async def test_a_full_cache_fails_only_the_sequences_in_that_batch() -> None:
    with serving(num_parallel=3, num_batch=4) as (runner, backend):
        context = backend.context
        context.hold()
        running = runner.submit(tokens("a"), params())
        await held(context)
        prompting = runner.submit(tokens("bcdefgh"), params())
        waiting = runner.submit(tokens("x"), params())  # no room for its prompt in the failing batch
        context.statuses.extend([0, 1])
        context.release()
        for handle in (running, prompting):
            with pytest.raises(RunnerError, match="context is full"):
                await reply(handle)
        assert (await reply(waiting))[0] == "yz"
        assert runner.healthy
        assert str(context.decoded[1]) == "0:b@1* 1:b@0 1:c@1 1:d@2"
        assert (context.cached(0), context.cached(1)) == ("", "")  # the failed sequences' caches are dropped


# -- lifetime -----------------------------------------------------------------------


async def test_closing_fails_what_is_left_and_frees_everything() -> None:
    backend = FakeBackend()
    runner = Runner(LoadConfig("fake.gguf", num_parallel=1), backend=backend)
    running = runner.submit(tokens("."), params())
    queued = runner.submit(tokens("x"), params())
    runner.close()
    for handle in (running, queued):
        with pytest.raises(EngineClosed):
            await reply(handle)
    assert backend.model.closed and backend.context.closed and backend.batches[0].closed
    assert all(sampler.closed for sampler in backend.samplers)
    assert not runner.healthy


@pytest.mark.parametrize("fail_at", ["context", "batch"])
def test_a_failed_load_frees_what_was_made(fail_at: str) -> None:
    backend = FakeBackend(fail_at=fail_at)
    with pytest.raises(LocalLLMError, match="no room"):
        Runner(LoadConfig("fake.gguf"), backend=backend)
    assert backend.model.closed
    assert all(context.closed for context in backend.contexts)


# -- logprobs -----------------------------------------------------------------------

# The fake logits: the successor 3, the end-of-generation token 2, the token after the successor 1, the rest 0.
NORMALIZER = float(np.log(np.exp(3.0) + np.exp(2.0) + np.exp(1.0) + (N_VOCAB - 3)))
SUCCESSOR, END, AFTER = 3.0 - NORMALIZER, 2.0 - NORMALIZER, 1.0 - NORMALIZER


async def test_logprobs_cost_nothing_unless_asked_for() -> None:
    with serving() as (runner, backend):
        handle = runner.submit(tokens("a"), params(num_predict=3))
        items = []
        with anyio.fail_after(TIMEOUT):
            while not any(isinstance(item, SequenceResult) for item in items):
                items.extend(await handle.mailbox.get_all())
        assert items[:-1] == ["b", "c", "d"]
        assert backend.context.logit_reads == 0


async def test_each_piece_of_text_carries_its_tokens_logprobs() -> None:
    with serving() as (runner, backend):
        pieces, result = await scored_reply(
            runner.submit(tokens("a"), params(num_predict=3, logprobs=True, top_logprobs=3))
        )
    assert [piece.text for piece in pieces] == ["b", "c", "d"]
    assert [[logprob.token for logprob in piece.logprobs] for piece in pieces] == [["b"], ["c"], ["d"]]
    first = pieces[0].logprobs[0]
    assert first.logprob == pytest.approx(SUCCESSOR) and first.bytes == (ord("b"),)
    assert first.top_logprobs is not None
    assert [(top.token, top.logprob) for top in first.top_logprobs] == [
        ("b", pytest.approx(SUCCESSOR)),
        ("</s>", pytest.approx(END)),  # a control token, named as the vocabulary names it
        ("c", pytest.approx(AFTER)),
    ]
    assert result.eval_count == 3 and backend.context.logit_reads == 3


async def test_without_top_logprobs_only_the_sampled_token_is_scored() -> None:
    with serving() as (runner, _):
        pieces, _ = await scored_reply(runner.submit(tokens("a"), params(num_predict=1, logprobs=True)))
    assert pieces == [ScoredText("b", (Logprob(token="b", logprob=pytest.approx(SUCCESSOR), bytes=(98,)),))]


async def test_the_end_of_generation_token_has_no_logprob() -> None:
    with serving() as (runner, _):
        pieces, result = await scored_reply(runner.submit(tokens("w"), params(logprobs=True)))
    assert [logprob.token for piece in pieces for logprob in piece.logprobs] == ["x", "y", "z"]
    assert (result.done_reason, result.eval_count) == ("stop", 3)


async def test_logprobs_wait_with_text_held_as_a_possible_stop_and_end_with_it() -> None:
    with serving() as (runner, _):
        # "d" is held as the start of "de", then "e" completes the stop: neither is part of the reply.
        stopped, result = await scored_reply(runner.submit(tokens("a"), params(stop=["de"], logprobs=True)))
        # "z" is held as the start of "z!", which never comes: it goes out at the end with its logprob.
        flushed, _ = await scored_reply(runner.submit(tokens("w"), params(stop=["z!"], logprobs=True)))
    assert [(piece.text, [lp.token for lp in piece.logprobs]) for piece in stopped] == [("b", ["b"]), ("c", ["c"])]
    assert result.eval_count == 4  # generated, though not sent
    assert [(piece.text, [lp.token for lp in piece.logprobs]) for piece in flushed] == [
        ("x", ["x"]),
        ("y", ["y"]),
        ("z", ["z"]),
    ]


def test_log_softmax_is_stable_for_large_logits() -> None:
    logits = np.array([1000.0, 999.0, 998.0, -1000.0], dtype=np.float32)
    logprobs = log_softmax(logits)
    assert np.isfinite(logprobs).all() and np.exp(logprobs).sum() == pytest.approx(1.0)
    assert logprobs[:3] == pytest.approx(log_softmax(np.array([2.0, 1.0, 0.0, -1998.0], dtype=np.float32))[:3])
    assert most_likely(logprobs, 2).tolist() == [0, 1]
    assert most_likely(logprobs, 10).tolist() == [0, 1, 2, 3]  # never more than the vocabulary

"""Drafting (prompt lookup) and the worker's verification of drafts, on a fake backend.

The fake model has one token per ASCII character and continues the alphabet: after a letter comes the
next one, after "z" the end-of-generation token, and any other character repeats. The fake context
checks, as llama.cpp does, that each sequence continues right after the last position it holds, so a
rejected draft left in the cache fails the next decode. A scripted drafter proposes the true
continuation, optionally with a wrong token at a chosen place.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import attrs
import numpy as np
import numpy.typing as npt
import pytest

from localllm.errors import LocalLLMError
from localllm.options import Options
from localllm.runner.backend import Batch, Context, Model
from localllm.runner.draft import DraftModelMismatch, ModelDrafter, NgramDrafter, check_same_vocabulary
from localllm.runner.protocol import LoadConfig, SamplingParams, SequenceHandle, SequenceResult
from localllm.runner.worker import Runner

EOG = 0
N_VOCAB = 128
TIMEOUT = 5.0

# -- prompt lookup ------------------------------------------------------------------------


def test_lookup_drafts_what_followed_the_last_earlier_occurrence() -> None:
    drafter = NgramDrafter()
    #            0  1  2  3  4  5  6  7  8  9 10
    history = [5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert drafter.lookup(history, 3) == [7, 8, 1]  # the later "1 2 3" wins
    assert drafter.lookup(history, 1) == [7]
    assert drafter.lookup(history, 0) == []


def test_lookup_prefers_the_longest_match() -> None:
    drafter = NgramDrafter(max_ngram=4, min_ngram=2)
    # "2 3" last occurs before 6, but "1 2 3" (longer) only before 4.
    history = [1, 2, 3, 4, 4, 2, 3, 6, 1, 2, 3]
    assert drafter.lookup(history, 2) == [4, 4]
    assert NgramDrafter(max_ngram=2, min_ngram=2).lookup(history, 2) == [6, 1]


def test_lookup_needs_a_match_of_min_ngram_tokens() -> None:
    history = [1, 2, 3, 4, 5, 3]  # only the last token, 3, occurred before
    assert NgramDrafter(min_ngram=2).lookup(history, 4) == []
    assert NgramDrafter(min_ngram=1).lookup(history, 4) == [4, 5, 3]
    assert NgramDrafter().lookup([1, 2], 4) == []
    assert NgramDrafter().lookup([], 4) == []


def test_a_repeating_history_drafts_into_its_own_tail() -> None:
    assert NgramDrafter().lookup([1, 2, 1, 2, 1, 2], 8) == [1, 2]
    assert NgramDrafter().lookup([7, 7, 7, 7, 7], 3) == [7]


def test_propose_is_per_sequence_within_each_limit() -> None:
    drafter = NgramDrafter()
    histories = {0: [1, 2, 3, 1, 2], 1: [4, 5, 6, 4, 5], 3: [9, 8, 7]}
    assert drafter.propose(histories, {0: 1, 1: 5, 3: 5}) == {0: [3], 1: [6, 4, 5]}
    assert drafter.propose(histories, {1: 2}) == {1: [6, 4]}


# -- the fake backend ---------------------------------------------------------------------


def successor(token: int) -> int:
    char = chr(token)
    if char == "z":
        return EOG
    return token + 1 if "a" <= char < "z" else token


@attrs.define
class FakeModel:
    bos_token: int = -1
    eos_token: int = EOG
    n_vocab: int = N_VOCAB

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [ord(char) for char in text]

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == EOG else chr(token).encode()

    def token_text(self, token: int) -> str:
        return "</s>" if token == EOG else chr(token)

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        if any(not 0 <= token < N_VOCAB for token in tokens):
            raise LocalLLMError("token ids outside the vocabulary")

    def metadata(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        pass


@attrs.define
class FakeBatch:
    capacity: int
    rows: list[tuple[int, int, int, bool]] = attrs.field(factory=list)  # (seq_id, token, pos, logits)

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
        pass


@attrs.define
class FakeContext:
    n_ctx_seq: int
    n_batch: int
    decoded: list[tuple[tuple[int, int, int, bool], ...]] = attrs.field(factory=list)
    kv: dict[int, dict[int, int]] = attrs.field(factory=dict)  # seq_id -> position -> token
    removals: list[tuple[int, int]] = attrs.field(factory=list)

    def decode(self, batch: Batch) -> int:
        assert isinstance(batch, FakeBatch)
        rows = tuple(batch.rows)
        ends = {seq: max(cells, default=-1) for seq, cells in self.kv.items()}
        for seq, _token, pos, _ in rows:
            assert pos == ends.get(seq, -1) + 1, f"sequence {seq} continues at {pos}, not after {ends.get(seq)}"
            assert pos < self.n_ctx_seq
            ends[seq] = pos
        self.decoded.append(rows)
        for seq, token, pos, _ in rows:
            self.kv.setdefault(seq, {})[pos] = token
        return 0

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        _, token, _, logits = self.decoded[-1][index]
        assert logits, f"logits read at batch index {index}, which has none"
        values = np.zeros(N_VOCAB, dtype=np.float32)
        values[successor(token)] = 3.0
        return values

    def seq_rm(self, seq_id: int, p0: int) -> bool:
        self.removals.append((seq_id, p0))
        cells = self.kv.get(seq_id, {})
        for pos in [pos for pos in cells if pos >= p0]:
            del cells[pos]
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        return min(self.kv.get(seq_id) or [-1])

    def cached(self, seq_id: int) -> str:
        cells = self.kv.get(seq_id, {})
        return "".join(chr(cells[pos]) for pos in sorted(cells))

    def close(self) -> None:
        pass


@attrs.define
class FakeSampler:
    def sample(self, context: Context, index: int) -> int:
        assert isinstance(context, FakeContext)
        _, token, _, logits = context.decoded[-1][index]
        assert logits, f"sampled at batch index {index}, which has no logits"
        return successor(token)

    def accept(self, token: int) -> None:
        pass

    def close(self) -> None:
        pass


@attrs.define
class FakeBackend:
    state_format: str = "fake"
    contexts: list[FakeContext] = attrs.field(factory=list)

    def load_model(self, config: LoadConfig, *, gpu_layers: int, tensor_split: Sequence[float] | None) -> FakeModel:
        return FakeModel()

    def new_context(self, model: Model, config: LoadConfig) -> FakeContext:
        self.contexts.append(FakeContext(config.num_ctx, config.num_batch))
        return self.contexts[-1]

    def new_batch(self, capacity: int, n_seq_max: int) -> FakeBatch:
        return FakeBatch(capacity)

    def new_sampler(self, model: Model, options: Options, *, grammar: str | None, n_ctx: int) -> FakeSampler:
        return FakeSampler()


@attrs.define
class ScriptedDrafter:
    """Drafts the true continuation, but `wrong_at` (a draft index) gets a wrong token."""

    wrong_at: int | None = None
    asked: list[dict[int, int]] = attrs.field(factory=list)  # the limits of each call
    closed: bool = False

    def propose(self, histories: Mapping[int, Sequence[int]], limits: Mapping[int, int]) -> dict[int, list[int]]:
        self.asked.append(dict(limits))
        drafts = {}
        for seq, history in histories.items():
            draft, token = [], history[-1]
            for i in range(limits[seq]):
                token = successor(token)
                draft.append(ord("!") if i == self.wrong_at else token)
                if token == EOG:
                    break
            drafts[seq] = draft
        return drafts

    def close(self) -> None:
        self.closed = True


@contextmanager
def serving(drafter: ScriptedDrafter | None, **config: Any) -> Iterator[tuple[Runner, FakeContext]]:
    backend = FakeBackend()
    runner = Runner(LoadConfig("fake.gguf", **config), backend=backend, drafter=drafter)
    try:
        yield runner, backend.contexts[-1]
    finally:
        runner.close()


def params(grammar: str | None = None, *, logprobs: bool = False, **options: Any) -> SamplingParams:
    return SamplingParams(Options(**options), grammar=grammar, logprobs=logprobs)


async def reply(handle: SequenceHandle) -> tuple[str, SequenceResult]:
    text = ""
    with anyio.fail_after(TIMEOUT):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return text, item
                text += item if isinstance(item, str) else item.text


def generated_per_decode(context: FakeContext, seq: int) -> list[int]:
    """How many rows each decode held for the sequence."""
    return [sum(1 for row in rows if row[0] == seq) for rows in context.decoded]


# -- verification -------------------------------------------------------------------------


async def test_accepted_drafts_give_several_tokens_per_decode() -> None:
    drafter = ScriptedDrafter()
    with serving(drafter, num_parallel=1, draft_max=4) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params()))
    assert text == "bcdefghijklmnopqrstuvwxyz"
    assert result.done_reason == "stop" and result.eval_count == 25
    # The prompt, then the next token and 4 drafted ones per decode: 5 new tokens each time.
    assert generated_per_decode(context, 0) == [1, 5, 5, 5, 5, 5]  # instead of 26 decodes
    assert result.draft_count == result.draft_accepted_count == 20
    assert (runner.drafted, runner.drafts_accepted) == (20, 20)
    assert context.removals == [(0, 0)]  # nothing drafted was ever dropped


@pytest.mark.parametrize("wrong_at", [0, 2])
async def test_a_wrong_draft_is_dropped_from_the_cache_and_changes_nothing(wrong_at: int) -> None:
    drafter = ScriptedDrafter(wrong_at=wrong_at)
    with serving(drafter, num_parallel=1, draft_max=4) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params(num_predict=12)))
        assert text == "bcdefghijklm"
        assert result.eval_count == 12
        # Each step keeps the drafted tokens before the wrong one, then the model's own token.
        assert result.draft_accepted_count < result.draft_count
        assert (result.draft_accepted_count == 0) == (wrong_at == 0)
        # The prompt "a" and the next token "b" at 0 and 1, then the drafts kept; the rest dropped.
        assert context.removals[1] == (0, 2 + wrong_at)
        # What the cache holds is what the slot says it holds: every token kept, none drafted and dropped.
        assert context.cached(0) == "abcdefghijkl"[: len(context.kv[0])]
        assert runner.slots[0].cached == [ord(c) for c in context.cached(0)]


@pytest.mark.parametrize("num_predict", [1, 2, 5, 6, 7, 11])
async def test_num_predict_is_exact_with_drafts(num_predict: int) -> None:
    drafter = ScriptedDrafter()
    with serving(drafter, num_parallel=1, draft_max=4) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params(num_predict=num_predict)))
        assert text == "bcdefghijklmnopqrstuvwxyz"[:num_predict]
        assert result.done_reason == "length" and result.eval_count == num_predict
        # Never drafted past num_predict (those tokens could not be kept): each step drafts at most
        # one token fewer than num_predict leaves, as it yields one more than it drafts.
        generated, drafted = 1, 0
        while generated < num_predict:
            step = min(4, num_predict - generated - 1)
            drafted, generated = drafted + step, generated + step + 1
        assert result.draft_count == result.draft_accepted_count == drafted
        assert runner.slots[0].cached == [ord(c) for c in context.cached(0)]


@pytest.mark.parametrize("stop", ["e", "ghi", "kl", "z"])
async def test_a_stop_sequence_inside_accepted_drafts_ends_the_text_there(stop: str) -> None:
    with serving(ScriptedDrafter(), num_parallel=1, draft_max=8) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params(stop=[stop])))
        alphabet = "bcdefghijklmnopqrstuvwxyz"
        assert text == alphabet[: alphabet.index(stop)]
        assert result.done_reason == "stop"
        assert result.eval_count == alphabet.index(stop) + len(stop)
        assert runner.slots[0].cached == [ord(c) for c in context.cached(0)]


async def test_the_context_length_is_never_passed_by_a_draft() -> None:
    with serving(ScriptedDrafter(), num_parallel=1, num_ctx=10, draft_max=8) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params()))
    assert result.done_reason == "length"
    assert text == "bcdefghij"[: result.eval_count]
    assert max(context.kv[0]) < 10


async def test_drafts_fit_the_batch_and_leave_room_for_prompts() -> None:
    prompt = [ord(".")] * 30 + [ord("a")]
    with serving(ScriptedDrafter(), num_parallel=2, num_batch=8, draft_max=8) as (runner, context):
        handles = [runner.submit([ord("a")], params(num_predict=20)), runner.submit(prompt, params(num_predict=20))]
        texts = [(await reply(handle))[0] for handle in handles]
    assert texts == ["bcdefghijklmnopqrstu"] * 2
    assert max(len(rows) for rows in context.decoded) == 8  # drafts filled the batch, never more
    # Each decode gave the waiting prompt at least 3 of the 7 places the running sequence's next token
    # left (or all it still needed); drafts took the rest.
    seq_of_prompt = next(row[0] for rows in context.decoded for row in rows if len(rows) > 1 and row[1] == ord("."))
    left = len(prompt)
    for rows in context.decoded:
        taken = sum(1 for row in rows if row[0] == seq_of_prompt and row[2] < len(prompt))
        if 0 < left:
            assert taken >= min(3, left)
        left -= taken


async def test_no_drafts_for_logprobs_or_grammars() -> None:
    drafter = ScriptedDrafter()
    with serving(drafter, num_parallel=1) as (runner, _context):
        for asked in (params("root ::= [a-z]*", num_predict=5), params(logprobs=True, num_predict=5)):
            text, result = await reply(runner.submit([ord("a")], asked))
            assert text == "bcdef"
            assert result.draft_count == 0
        assert drafter.asked == []
    assert drafter.closed  # the runner owns the drafter it was given


# -- a draft model --------------------------------------------------------------------------


def draft_model(backend: FakeBackend, target: Model | None = None, **config: Any) -> ModelDrafter:
    load = LoadConfig("target.gguf", draft_model_path="draft.gguf", **config)
    return ModelDrafter(backend, target or FakeModel(), load)


def letters(text: str) -> list[int]:
    return [ord(char) for char in text]


def test_a_draft_model_drafts_every_slot_in_the_same_decodes() -> None:
    backend = FakeBackend()
    drafter = draft_model(backend, num_parallel=2)
    context = backend.contexts[-1]
    drafts = drafter.propose({0: letters("xab"), 1: letters("k")}, {0: 3, 1: 4})
    assert drafts == {0: letters("cde"), 1: letters("lmno")}
    # One decode catches both sequences up (drafting each one's first token), then one per drafted position.
    assert [len(rows) for rows in context.decoded] == [4, 2, 2, 1]
    assert [sum(logits for *_, logits in rows) for rows in context.decoded] == [2, 2, 2, 1]
    drafter.close()


def test_a_draft_model_keeps_what_still_holds_and_evaluates_only_what_is_new() -> None:
    backend = FakeBackend()
    drafter = draft_model(backend, num_parallel=1)
    context = backend.contexts[-1]
    assert drafter.propose({0: letters("ab")}, {0: 4}) == {0: letters("cdef")}
    assert context.cached(0) == "abcde"  # the last drafted token was never evaluated
    # The target kept "c" and "d", then chose "x" where "e" was drafted.
    decodes = len(context.decoded)
    assert drafter.propose({0: letters("abcdx")}, {0: 2}) == {0: letters("yz")}
    assert context.removals[-1] == (0, 4)
    assert context.decoded[decodes][0][1:3] == (ord("x"), 4)  # evaluation resumed at the first new token
    assert context.cached(0) == "abcdxy"
    # A history the drafter holds all of, and more: only its last token is evaluated again, for its logits.
    assert drafter.propose({0: letters("abc")}, {0: 1}) == {0: [ord("d")]}
    assert context.cached(0) == "abc"
    drafter.close()


def test_a_draft_model_stops_at_the_end_of_the_text_and_the_context() -> None:
    backend = FakeBackend()
    drafter = draft_model(backend, num_parallel=1, num_ctx=8)
    assert drafter.propose({0: letters("wx")}, {0: 6}) == {0: [*letters("yz"), EOG]}
    assert drafter.propose({0: letters("abcdef")}, {0: 6}) == {0: letters("gh")}  # positions 6 and 7 only
    assert drafter.propose({0: letters("abcdefgh")}, {0: 6}) == {}
    drafter.close()


class OtherTexts(FakeModel):
    """A vocabulary as large, with the same special tokens, whose tokens mean other things."""

    def token_text(self, token: int) -> str:
        return "?"


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (FakeModel(n_vocab=N_VOCAB + 1), "it has 128 tokens where the model has 129"),
        (FakeModel(eos_token=1), "its BOS/EOS tokens are -1/0 where the model's are -1/1"),
        (OtherTexts(), "token 0 is '</s>' in it but '?' in the model"),
    ],
)
def test_a_draft_model_with_another_vocabulary_is_refused(target: Model, problem: str) -> None:
    with pytest.raises(
        DraftModelMismatch, match=re.escape(f"the draft model draft.gguf cannot draft for this model: {problem}")
    ):
        check_same_vocabulary(target, FakeModel(), "draft.gguf")

"""Drafting (prompt lookup, a draft model) and the worker's verification of drafts, on the fake backend
of `fakes`.

Its context checks, as llama.cpp does, that each sequence continues right after the last position it
holds, so a rejected draft left in the cache fails the next decode. A scripted drafter proposes the
true continuation, optionally with a wrong token at a chosen place.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import pytest
from fakes import EOG, N_VOCAB, FakeBackend, FakeContext, FakeModel, params, reply, serving, successor

from localllm.runner.backend import Model
from localllm.runner.draft import DraftModelMismatch, ModelDrafter, NgramDrafter, check_same_vocabulary
from localllm.runner.protocol import LoadConfig
from localllm.runner.worker import Runner

pytestmark = pytest.mark.fast

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
def drafting(drafter: ScriptedDrafter | None, **config: Any) -> Iterator[tuple[Runner, FakeContext]]:
    with serving(drafter=drafter, **config) as (runner, backend):
        yield runner, backend.context


def rows_of(context: FakeContext) -> list[tuple[tuple[int, int, int, bool], ...]]:
    """The rows of each decode: (sequence, token, position, logits asked for)."""
    return [decoded.rows for decoded in context.decoded]


def generated_per_decode(context: FakeContext, seq: int) -> list[int]:
    """How many rows each decode held for the sequence."""
    return [sum(1 for row in rows if row[0] == seq) for rows in rows_of(context)]


# -- verification -------------------------------------------------------------------------


async def test_accepted_drafts_give_several_tokens_per_decode() -> None:
    drafter = ScriptedDrafter()
    with drafting(drafter, num_parallel=1, draft_max=4) as (runner, context):
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
    with drafting(drafter, num_parallel=1, draft_max=4) as (runner, context):
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
    with drafting(drafter, num_parallel=1, draft_max=4) as (runner, context):
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
    with drafting(ScriptedDrafter(), num_parallel=1, draft_max=8) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params(stop=[stop])))
        alphabet = "bcdefghijklmnopqrstuvwxyz"
        assert text == alphabet[: alphabet.index(stop)]
        assert result.done_reason == "stop"
        assert result.eval_count == alphabet.index(stop) + len(stop)
        assert runner.slots[0].cached == [ord(c) for c in context.cached(0)]


async def test_the_context_length_is_never_passed_by_a_draft() -> None:
    with drafting(ScriptedDrafter(), num_parallel=1, num_ctx=10, draft_max=8) as (runner, context):
        text, result = await reply(runner.submit([ord("a")], params(shift=False)))
    assert result.done_reason == "length"
    assert text == "bcdefghij"[: result.eval_count]
    assert max(context.kv[0]) < 10


async def test_drafts_fit_the_batch_and_leave_room_for_prompts() -> None:
    prompt = [ord(".")] * 30 + [ord("a")]
    with drafting(ScriptedDrafter(), num_parallel=2, num_batch=8, draft_max=8) as (runner, context):
        handles = [runner.submit([ord("a")], params(num_predict=20)), runner.submit(prompt, params(num_predict=20))]
        texts = [(await reply(handle))[0] for handle in handles]
    assert texts == ["bcdefghijklmnopqrstu"] * 2
    assert max(len(rows) for rows in rows_of(context)) == 8  # drafts filled the batch, never more
    # Each decode gave the waiting prompt at least 3 of the 7 places the running sequence's next token
    # left (or all it still needed); drafts took the rest.
    seq_of_prompt = next(row[0] for rows in rows_of(context) for row in rows if len(rows) > 1 and row[1] == ord("."))
    left = len(prompt)
    started = False  # the first decode may come before the prompt was submitted
    for rows in rows_of(context):
        taken = sum(1 for row in rows if row[0] == seq_of_prompt and row[2] < len(prompt))
        started = started or taken > 0
        if started and 0 < left:
            assert taken >= min(3, left)
        left -= taken
    assert left == 0


async def test_no_drafts_for_logprobs_or_grammars() -> None:
    drafter = ScriptedDrafter()
    with drafting(drafter, num_parallel=1) as (runner, _context):
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
    assert [len(rows) for rows in rows_of(context)] == [4, 2, 2, 1]
    assert [sum(logits for *_, logits in rows) for rows in rows_of(context)] == [2, 2, 2, 1]
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
    assert rows_of(context)[decodes][0][1:3] == (ord("x"), 4)  # evaluation resumed at the first new token
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


def test_a_long_history_is_caught_up_one_batch_per_step() -> None:
    """No step of the worker waits on the draft model for a whole long prompt: a cancelled request is let
    go at the next step, and the others keep decoding meanwhile."""
    backend = FakeBackend()
    drafter = draft_model(backend, num_parallel=1, num_batch=4)
    context = backend.contexts[-1]
    history = letters("abcdefghij")  # ten tokens, four a batch
    assert drafter.propose({0: history}, {0: 2}) == {}  # not caught up yet: no draft this step
    assert drafter.propose({0: history}, {0: 2}) == {}
    assert drafter.propose({0: history}, {0: 2}) == {0: letters("kl")}
    assert [len(rows) for rows in rows_of(context)] == [4, 4, 2, 1]  # never more than a batch a decode
    assert context.cached(0) == "abcdefghijk"
    drafter.close()


class OtherTexts(FakeModel):
    """A vocabulary as large, with the same special tokens, whose tokens mean other things."""

    def token_text(self, token: int) -> str:
        return "?"


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (FakeModel(n_vocab=N_VOCAB + 1), "it has 128 tokens where the model has 129"),
        (FakeModel(eos_token=1), "its BOS/EOS tokens are 1/0 where the model's are 1/1"),
        (OtherTexts(), "token 0 is '</s>' in it but '?' in the model"),
    ],
)
def test_a_draft_model_with_another_vocabulary_is_refused(target: Model, problem: str) -> None:
    with pytest.raises(
        DraftModelMismatch, match=re.escape(f"the draft model draft.gguf cannot draft for this model: {problem}")
    ):
        check_same_vocabulary(target, FakeModel(), "draft.gguf")

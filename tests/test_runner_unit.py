"""The runner's scheduling logic, on the fake backend of `fakes`: batching, chunking, prefix reuse,
cancellation, endings."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from fakes import (
    N_VOCAB,
    TIMEOUT,
    FakeBackend,
    held,
    params,
    reply,
    scored_reply,
    serving,
    tokens,
)

from localllm.errors import ContextLengthExceeded, EngineClosed, InvalidFormat, LocalLLMError, RunnerError
from localllm.runner.prompt_cache import PromptCache
from localllm.runner.protocol import LoadConfig, ScoredText, SequenceResult
from localllm.runner.worker import Runner, log_softmax, most_likely
from localllm.types import Logprob

pytestmark = pytest.mark.fast

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

    # The earlier prompt gets the room first; each batch holds its sequences in slot order.
    assert [str(d) for d in context.decoded[start : start + 3]] == [
        "1:.@0 1:.@1 1:.@2 1:.@3",
        "0:b@0 0:b@1 1:.@4 1:.@5*",
        "0:b@2 0:b@3 0:b@4 0:b@5*",
    ]


async def test_a_batch_holds_its_sequences_in_slot_order_whatever_their_admission() -> None:
    """llama.cpp evaluates a batch whose sequences are out of order in more, smaller pieces."""
    with serving(num_parallel=3) as (runner, backend):
        context = backend.context
        await reply(runner.submit(tokens("y"), params()))  # slot 0 is now the more recently used
        context.hold()
        first = runner.submit(tokens("ab"), params(num_predict=3))
        await held(context)
        second = runner.submit(tokens("mn"), params(num_predict=3))
        third = runner.submit(tokens("uv"), params(num_predict=3))
        context.release()
        for handle in (first, second, third):
            await reply(handle)
    for decoded in context.decoded:
        seq_ids = [row[0] for row in decoded.rows]
        assert seq_ids == sorted(seq_ids), str(decoded)
    assert {row[0] for d in context.decoded for row in d.rows} == {0, 1, 2}


async def test_an_idle_runner_ends_its_thread_and_the_next_request_starts_one() -> None:
    """An idle runner's thread would keep llama.cpp's OpenMP team alive, which slows every other runner."""
    with serving() as (runner, _backend):
        assert (await reply(runner.submit(tokens("ab"), params(num_predict=2))))[0] == "cd"
        thread = next(t for t in threading.enumerate() if t.name == f"localllm-runner-{id(runner):x}")
        await anyio.to_thread.run_sync(thread.join, TIMEOUT)  # it ends by itself once idle
        assert not thread.is_alive() and runner.healthy
        assert (await reply(runner.submit(tokens("mn"), params(num_predict=2))))[0] == "op"


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
        # The first token after a restored state goes alone, so that a refused state fails nothing else.
        assert [str(d) for d in context.decoded[start:]] == ["0:d@83", "0:q@84*"]


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
        pytest.param("a", {"shift": False}, {"num_ctx": 8}, "bcdefgh", "length", 7, id="context full, no shift"),
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
            runner.submit(tokens("abcdefgh"), params(truncate=False))
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

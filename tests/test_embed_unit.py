"""The embedding runner's logic on the fake backend of `fakes`: packing inputs into shared batches, pooling,
normalisation, cancellation and failed batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import numpy as np
import pytest
from fakes import TIMEOUT, FakeBackend, FakeModel, held, token_vector, tokens

from localllm.errors import CapabilityError, ContextLengthExceeded, EngineClosed, RunnerError
from localllm.runner.backend import Pooling
from localllm.runner.embed import EmbeddingRunner, EmbedHandle, EmbedResult
from localllm.runner.protocol import LoadConfig

WORDS = "one two three four five six seven eight nine ten eleven twelve".split()

pytestmark = pytest.mark.fast  # a fake backend: no model file, no llama.cpp


@contextmanager
def embedding(
    *,
    architecture: str = "bert",
    pooling: Pooling = Pooling.MEAN,
    n_ctx_train: int = 512,
    max_parallel_sequences: int = 64,
    **config: Any,
) -> Iterator[tuple[EmbeddingRunner, FakeBackend]]:
    """An embedding runner on a fresh fake backend, closed afterwards."""
    backend = FakeBackend(
        model=FakeModel(n_ctx_train=n_ctx_train, architecture=architecture),
        pooling=pooling,
        max_parallel_sequences=max_parallel_sequences,
    )
    runner = EmbeddingRunner(LoadConfig("fake.gguf", embeddings=True, **config), backend=backend)
    try:
        yield runner, backend
    finally:
        backend.embedding_context.release()
        runner.close()


async def result(handle: EmbedHandle) -> EmbedResult:
    with anyio.fail_after(TIMEOUT):
        return await handle.result()


def mean_vector(ids: Sequence[int]) -> np.ndarray:
    return np.mean([token_vector(token, pos) for pos, token in enumerate(ids)], axis=0)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def batches(backend: FakeBackend) -> list[list[list[int]]]:
    """The inputs (as token lists) of every batch decoded, in sequence-id order."""
    context = backend.embedding_context
    return [[seq for _, seq in sorted(context.sequences(d).items())] for d in context.decoded]


# -- packing ------------------------------------------------------------------------


@pytest.mark.parametrize(("slots", "sizes"), [(64, [12]), (5, [5, 5, 2])])
async def test_an_encoder_packs_inputs_into_batches_up_to_its_sequence_slots(slots: int, sizes: list[int]) -> None:
    inputs = [tokens(word) for word in WORDS]
    with embedding(max_parallel_sequences=slots) as (runner, backend):
        response = await result(runner.submit_embed(inputs))
        assert [len(batch) for batch in batches(backend)] == sizes
        assert [seq for batch in batches(backend) for seq in batch] == inputs  # in order, each one once
    assert np.allclose(response.embeddings, [unit(mean_vector(ids)) for ids in inputs])
    assert response.prompt_eval_count == sum(len(ids) for ids in inputs)


async def test_a_batch_holds_only_whole_inputs_that_fit_its_tokens() -> None:
    inputs = [tokens(chr(ord("a") + i) * 15) for i in range(5)]
    with embedding(max_parallel_sequences=4, num_ctx=40, num_batch=40) as (runner, backend):
        assert runner.n_batch == 40
        response = await result(runner.submit_embed(inputs))
        assert [len(batch) for batch in batches(backend)] == [2, 2, 1]  # a third input of 15 would not fit in 40
    assert np.allclose(response.embeddings, [unit(mean_vector(ids)) for ids in inputs])


async def test_a_decoder_packs_as_many_inputs_as_it_has_parallel_slots() -> None:
    inputs = [tokens(word) for word in WORDS[:5]]
    with embedding(architecture="llama", num_parallel=2) as (runner, backend):
        assert runner.n_seq_max == 2
        response = await result(runner.submit_embed(inputs))
        assert [len(batch) for batch in batches(backend)] == [2, 2, 1]
    assert np.allclose(response.embeddings, [unit(mean_vector(ids)) for ids in inputs])


async def test_waiting_requests_share_the_next_batch() -> None:
    with embedding() as (runner, backend):
        context = backend.embedding_context
        context.hold()
        first = runner.submit_embed([tokens("one")])
        await held(context)  # the first request is being computed alone
        second = runner.submit_embed([tokens("two"), tokens("three")])
        third = runner.submit_embed([tokens("four")])
        context.release()
        answers = [await result(handle) for handle in (first, second, third)]
        assert batches(backend) == [[tokens("one")], [tokens("two"), tokens("three"), tokens("four")]]
        assert not runner.busy
    assert [len(answer.embeddings) for answer in answers] == [1, 2, 1]
    assert np.allclose(answers[1].embeddings, [unit(mean_vector(tokens(w))) for w in ("two", "three")])
    assert np.allclose(answers[2].embeddings, [unit(mean_vector(tokens("four")))])


# -- pooling and normalisation ------------------------------------------------------


async def test_without_pooling_in_the_model_the_runner_takes_the_mean_of_each_inputs_tokens() -> None:
    inputs = [tokens("abc"), tokens("d"), tokens("ef")]
    with embedding(architecture="llama", pooling=Pooling.NONE) as (runner, backend):
        response = await result(runner.submit_embed(inputs, normalize=False))
        assert len(backend.embedding_context.decoded) == 1  # each input at its own offset in one batch
    # (token, position, 1) averaged over each input's own tokens
    assert np.allclose(response.embeddings, [[98.0, 1.0, 1.0], [100.0, 0.0, 1.0], [101.5, 0.5, 1.0]])


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [(Pooling.MEAN, [98, 1, 1]), (Pooling.CLS, [97, 0, 1]), (Pooling.LAST, [99, 2, 1])],
)
async def test_a_model_that_pools_gives_each_input_its_own_pooled_vector(pooling: Pooling, expected: list[int]) -> None:
    with embedding(pooling=pooling) as (runner, _):
        response = await result(runner.submit_embed([tokens("xy"), tokens("abc")], normalize=False))
    assert np.allclose(response.embeddings[1], expected)


async def test_vectors_are_unit_length_unless_raw_ones_are_asked_for() -> None:
    inputs = [tokens("hello"), tokens("z")]
    with embedding() as (runner, _):
        normalized = np.array((await result(runner.submit_embed(inputs))).embeddings)
        raw = np.array((await result(runner.submit_embed(inputs, normalize=False))).embeddings)
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1.0)
    assert np.allclose(raw, [mean_vector(ids) for ids in inputs])
    assert np.allclose(normalized, raw / np.linalg.norm(raw, axis=1, keepdims=True))


async def test_a_reranker_is_refused_and_freed() -> None:
    backend = FakeBackend(model=FakeModel(architecture="bert"), pooling=Pooling.RANK)
    with pytest.raises(CapabilityError, match="reranking"):
        EmbeddingRunner(LoadConfig("rerank.gguf", embeddings=True), backend=backend)
    assert backend.embedding_context.closed and backend.model.closed


# -- limits -------------------------------------------------------------------------


async def test_inputs_longer_than_the_training_context_are_refused_or_truncated() -> None:
    with embedding(n_ctx_train=8, num_ctx=2048) as (runner, backend):
        assert runner.n_ctx_seq == 8  # position embeddings end there, whatever num_ctx says
        with pytest.raises(ContextLengthExceeded, match="9 tokens but the context holds 8"):
            runner.submit_embed([tokens("short"), tokens("ninechars")])
        assert runner.truncate(tokens("ninechars")) == tokens("ninechar")
        assert backend.embedding_context.decoded == []


# -- cancellation and failures ------------------------------------------------------


async def test_a_request_cancelled_while_waiting_is_never_computed() -> None:
    with embedding() as (runner, backend):
        context = backend.embedding_context
        context.hold()
        first = runner.submit_embed([tokens("one")])
        await held(context)
        dropped = runner.submit_embed([tokens("two")])
        dropped.cancel()
        context.release()
        await result(first)
        await result(runner.submit_embed([tokens("three")]))
        assert batches(backend) == [[tokens("one")], [tokens("three")]]
        assert not runner.busy


async def test_a_request_cancelled_between_its_batches_computes_no_more_of_them() -> None:
    inputs = [tokens(word) for word in WORDS[:6]]
    with embedding(max_parallel_sequences=2) as (runner, backend):
        context = backend.embedding_context
        context.hold()
        dropped = runner.submit_embed(inputs)
        await held(context)  # its first two inputs are being computed
        dropped.cancel()
        context.release()
        await result(runner.submit_embed([tokens("next")]))
        assert batches(backend) == [inputs[:2], [tokens("next")]]
        assert not runner.busy and runner.active_count == 0


async def test_a_failed_batch_fails_its_requests_and_the_runner_serves_the_next() -> None:
    inputs = [tokens(word) for word in WORDS[:3]]
    with embedding(max_parallel_sequences=2) as (runner, backend):
        context = backend.embedding_context
        context.statuses.append(-1)
        with pytest.raises(RunnerError, match="embedding batch failed"):
            await result(runner.submit_embed(inputs))  # its last input, in the next batch, is not computed
        assert len(context.decoded) == 1
        response = await result(runner.submit_embed(inputs[:1]))
        assert np.allclose(response.embeddings, [unit(mean_vector(inputs[0]))])
        assert runner.healthy and not runner.busy


async def test_closing_frees_the_batch_context_and_model_and_refuses_new_requests() -> None:
    with embedding() as (runner, backend):
        await result(runner.submit_embed([tokens("one")]))
        runner.close()
        assert backend.batches[-1].closed and backend.embedding_context.closed and backend.model.closed
        with pytest.raises(EngineClosed):
            runner.submit_embed([tokens("two")])

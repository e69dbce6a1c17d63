"""Images in the runner's batch loop, on the fake backend and a fake projector (`fakes.FakeProjector`):
each evaluated in a step of its own and whole, never decoded as tokens, reused by content, cancellable."""

from __future__ import annotations

import anyio
import pytest
from fakes import IMAGE_CELL, TIMEOUT, FakeProjector, held, params, reply, serving, tokens

from localllm.errors import InvalidRequest
from localllm.media import DecodedImage
from localllm.runner.protocol import MediaLayout, locate_media, placeholder_tokens
from localllm.runner.worker import Runner

pytestmark = pytest.mark.fast


def image(width: int, shade: int = 0) -> DecodedImage:
    """A one-row image; the fake projector makes `width` embeddings of it."""
    return DecodedImage(width, 1, bytes([shade]) * width * 3)


def prompt_with(runner: Runner, before: str, item: DecodedImage, after: str) -> list[int]:
    return [*tokens(before), *runner.media_layout(item).tokens(item.digest), *tokens(after)]


def projector_of(backend: object) -> FakeProjector:
    projector = backend.projector  # type: ignore[attr-defined]
    assert isinstance(projector, FakeProjector)
    return projector


async def test_an_image_is_evaluated_whole_in_a_step_of_its_own_between_its_text() -> None:
    with serving(num_parallel=1, projector_path="proj.gguf") as (runner, backend):
        red = image(3)
        handle = runner.submit(prompt_with(runner, "ab", red, "cd"), params(num_predict=2), media=[red])
        _, result = await reply(handle)
        context = backend.context
    # "ab<" then the image's three embeddings, then ">cd": every token decoded is a vocabulary id.
    assert projector_of(backend).evaluated == [(0, 3, 3)]
    assert [str(d) for d in context.decoded][:2] == ["0:a@0 0:b@1 0:<@2", "0:>@6 0:c@7 0:d@8*"]
    assert result.prompt_eval_count == 9 and result.prompt_cached_count == 0
    assert context.cached(0).startswith("ab<" + chr(IMAGE_CELL) * 3 + ">cd")


async def test_the_same_image_is_reused_from_the_slot_and_another_is_not() -> None:
    with serving(num_parallel=1, projector_path="proj.gguf") as (runner, backend):
        red, blue = image(3, 1), image(3, 2)
        await reply(runner.submit(prompt_with(runner, "ab", red, "cd"), params(num_predict=1), media=[red]))
        _, again = await reply(runner.submit(prompt_with(runner, "ab", red, "cd"), params(num_predict=1), media=[red]))
        _, other = await reply(
            runner.submit(prompt_with(runner, "ab", blue, "cd"), params(num_predict=1), media=[blue])
        )
    assert again.prompt_cached_count == again.prompt_eval_count - 1  # the image's entries too
    assert other.prompt_cached_count == 3  # "ab<": the other image starts where the first one did
    assert [entry[1:] for entry in projector_of(backend).evaluated] == [(3, 3), (3, 3)]


async def test_one_image_per_step_while_a_running_sequence_keeps_its_pace() -> None:
    with serving(num_parallel=3, projector_path="proj.gguf") as (runner, backend):
        context = backend.context
        context.hold()
        running = runner.submit(tokens("a"), params(num_predict=6))
        await held(context)
        red, blue = image(2, 1), image(2, 2)
        first = runner.submit(prompt_with(runner, "x", red, "y"), params(num_predict=1), media=[red])
        second = runner.submit(prompt_with(runner, "x", blue, "y"), params(num_predict=1), media=[blue])
        context.release()
        await reply(first)
        await reply(second)
        await reply(running)
    # Each step holds the running sequence's next token; the two images went in two different steps.
    steps_with_running = [d for d in context.decoded if any(row[0] == 0 for row in d.rows)]
    assert len(steps_with_running) >= 6
    positions = [position for _seq, position, _count in projector_of(backend).evaluated]
    assert len(positions) == 2


async def test_a_request_cancelled_while_its_image_is_read_frees_its_slot() -> None:
    with serving(num_parallel=1, projector_path="proj.gguf") as (runner, backend):
        projector = projector_of(backend)
        projector.hold()
        red = image(4)
        handle = runner.submit(prompt_with(runner, "ab", red, "cd"), params(num_predict=50), media=[red])
        assert await anyio.to_thread.run_sync(projector.held.wait, TIMEOUT)  # the image is being read
        handle.cancel()
        projector.release()
        text, result = await reply(runner.submit(tokens("mn"), params(num_predict=2)))  # the one slot serves it
    assert text == "op" and result.done_reason == "length"


async def test_a_prompt_cut_through_an_image_drops_the_image_whole() -> None:
    red = image(4)
    stand_ins = placeholder_tokens(red.digest, 4)
    # A too-long prompt keeps its start and its end: here the end kept only the last two stand-ins.
    layout = [MediaLayout((), 4, ())]
    kept, spans = locate_media([1, 2, *stand_ins[2:], 5, 6], [red], layout)
    assert kept == [1, 2, 5, 6] and spans == ()
    kept, spans = locate_media([1, *stand_ins, 5], [red], layout)
    assert kept == [1, *stand_ins, 5] and [(s.start, s.count) for s in spans] == [(1, 4)]
    with pytest.raises(InvalidRequest):
        locate_media([1, -7, 5], [red], layout)  # a negative id that stands in for nothing


async def test_what_the_runner_refuses() -> None:
    with serving(num_parallel=1, projector_path="proj.gguf") as (runner, _backend):
        red = image(3)
        ends_with_image = [*tokens("ab"), *placeholder_tokens(red.digest, 3)]
        with pytest.raises(InvalidRequest):  # the layout adds ">" after it; without it the image would be last
            runner.submit(ends_with_image, params(), media=[red])
        with pytest.raises(InvalidRequest):
            runner.submit([*tokens("ab"), -5, *tokens("c")], params(), media=[red])


def test_stand_ins_are_negative_distinct_and_the_same_for_the_same_pixels() -> None:
    a, b = image(8, 1), image(8, 2)
    assert placeholder_tokens(a.digest, 8) == placeholder_tokens(image(8, 1).digest, 8)
    assert set(placeholder_tokens(a.digest, 8)).isdisjoint(placeholder_tokens(b.digest, 8))
    assert all(token < 0 for token in placeholder_tokens(a.digest, 8))


async def test_an_image_at_fewer_positions_than_embeddings_moves_what_follows_back() -> None:
    """M-RoPE: the text after an image goes on from the image's last position, in the slot and when its
    prefix is reused."""
    with serving(num_parallel=1, projector_path="proj.gguf") as (runner, backend):
        tall = DecodedImage(6, 2, bytes(6 * 2 * 3))  # six embeddings at three positions
        _, first = await reply(
            runner.submit(prompt_with(runner, "ab", tall, "cd"), params(num_predict=2), media=[tall])
        )
        _, again = await reply(
            runner.submit(prompt_with(runner, "ab", tall, "ce"), params(num_predict=1), media=[tall])
        )
        context = backend.context
    assert projector_of(backend).evaluated == [(0, 3, 6)]  # once: the second request reused it
    # "ab<" at 0-2, the image at 3-5, then ">cd" from 6 on; the next request keeps "ab<", the image, ">c".
    assert [str(d) for d in context.decoded][:2] == ["0:a@0 0:b@1 0:<@2", "0:>@6 0:c@7 0:d@8*"]
    assert str(context.decoded[-1]).startswith("0:e@8*")
    assert first.prompt_eval_count == 12 and again.prompt_cached_count == 11

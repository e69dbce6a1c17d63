"""Images on the real SmolLM2 through a real libmtmd projector (a tiny random-weight one, `projector.py`).

The answers mean nothing; the plumbing is what is checked: each image becomes the projector's 16
embeddings in the prompt, an image changes the next-token distribution, the same image is reused from
a slot's cache, images batch with text, a prompt too long drops old messages counting their images, and
a runner in a child process takes images too and survives hostile ones.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image
from projector import TOKENS_PER_IMAGE

from localllm import ChatRequest, Engine, GenerateRequest
from localllm.errors import CapabilityError, ContextLengthExceeded, InvalidRequest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # what is checked happens in the runner; test_engine.py runs both event loops


GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_ctx": 1024, "num_predict": 1}
QUESTION = "Describe the picture in one word."


def picture(color: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


async def vision_model(engine: Engine, smollm2_path: Path, projector_path: Path) -> str:
    model = await engine.create_blob(smollm2_path)
    projector = await engine.create_blob(projector_path)
    await engine.create("vis", files={"model.gguf": model, "mmproj.gguf": projector})
    return "vis"


async def ask(engine: Engine, *images: bytes, content: str = QUESTION, **options: Any) -> Any:
    messages = [{"role": "user", "content": content, "images": list(images)}]
    return await engine.chat("vis", messages, logprobs=True, top_logprobs=5, options={**GREEDY, **options})


def first(response: Any) -> dict[str, float]:
    """The first reply token's most likely tokens and their logprobs."""
    return {entry.token: entry.logprob for entry in response.logprobs[0].top_logprobs}


def close(a: dict[str, float], b: dict[str, float]) -> bool:
    # Batches of other sizes round differently: the same distribution agrees closely, not exactly.
    return a.keys() == b.keys() and all(abs(a[token] - b[token]) < 0.05 for token in a)


async def test_an_image_is_its_projectors_embeddings_in_the_prompt_and_changes_the_reply(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        assert "vision" in (await engine.show("vis")).capabilities
        text = await ask(engine)
        red = await ask(engine, picture("red"))
        blue = await ask(engine, picture("blue"))
        both = await ask(engine, picture("red"), picture("blue"))
    assert red.prompt_eval_count == text.prompt_eval_count + TOKENS_PER_IMAGE
    assert both.prompt_eval_count == text.prompt_eval_count + 2 * TOKENS_PER_IMAGE
    assert not close(first(text), first(red))
    assert not close(first(red), first(blue))


async def test_the_same_image_again_is_read_from_the_cache(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        cold = await ask(engine, picture("green"))
        warm = await ask(engine, picture("green"))
        other = await ask(engine, picture("purple"))
    assert warm.prompt_cached_count == warm.prompt_eval_count - 1  # all but the token whose logits choose
    assert close(first(cold), first(warm))
    # Another image shares the text before it, never the image's entries.
    assert other.prompt_cached_count < cold.prompt_eval_count - TOKENS_PER_IMAGE


async def test_a_picture_re_encoded_differently_is_the_same_image(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "orange").save(buffer, "BMP")
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        png = await ask(engine, picture("orange"))
        bmp = await ask(engine, buffer.getvalue())
    assert bmp.prompt_cached_count == bmp.prompt_eval_count - 1  # keyed by the pixels, not the file's bytes
    assert close(first(png), first(bmp))


async def test_requests_with_images_batch_with_a_text_request(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    requests = [((picture("red"),), QUESTION), ((picture("blue"),), QUESTION), ((), "Name a colour.")]
    together: list[Any] = [None] * len(requests)
    async with Engine(home, num_parallel=3) as engine:
        await vision_model(engine, smollm2_path, projector_path)

        async def run(index: int) -> None:
            images, content = requests[index]
            together[index] = await ask(engine, *images, content=content)

        async with anyio.create_task_group() as group:  # one runner, three slots: one shared batch loop
            for index in range(len(requests)):
                group.start_soon(run, index)
    async with Engine(home, num_parallel=1) as engine:
        alone = [await ask(engine, *images, content=content) for images, content in requests]
    for solo, batched in zip(alone, together, strict=True):
        assert batched.prompt_eval_count == solo.prompt_eval_count
        assert close(first(batched), first(solo))


async def test_a_conversation_too_long_drops_old_messages_counting_their_images(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    colors = ["red", "green", "blue", "yellow", "white", "black"]
    messages: list[dict[str, Any]] = []
    for color in colors:
        messages.append({"role": "user", "content": f"This one is {color}.", "images": [picture(color)]})
        messages.append({"role": "assistant", "content": "Noted."})
    messages.append({"role": "user", "content": QUESTION})
    options = {**GREEDY, "num_ctx": 160}
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        response = await engine.chat("vis", messages, options=options)
        with pytest.raises(ContextLengthExceeded) as refused:
            await engine.chat("vis", messages, options=options, truncate=False)
    assert response.prompt_eval_count <= 160
    # Six images are 96 embeddings: the count refused is the text and every image.
    assert refused.value.tokens > 6 * TOKENS_PER_IMAGE + 6 * 8


async def test_images_through_a_runner_in_a_child_process(smollm2_path: Path, projector_path: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        in_thread = await ask(engine, picture("red"))
    async with Engine(home, num_parallel=1, isolation="process") as engine:
        child = await ask(engine, picture("red"))
        pid = (await engine.ps()).models[0].pid
        huge = _png_header(60000, 60000)
        for hostile in (huge, b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"not an image at all"):
            with pytest.raises(InvalidRequest):
                await ask(engine, hostile)
        again = await ask(engine, picture("red"))
        assert (await engine.ps()).models[0].pid == pid  # the same child served them all
    assert pid is not None
    assert child.prompt_eval_count == in_thread.prompt_eval_count
    assert close(first(child), first(in_thread))
    assert again.prompt_cached_count == again.prompt_eval_count - 1


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` pixels, with a one-byte image after it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


async def test_what_a_vision_request_may_not_be(smollm2_path: Path, projector_path: Path, home: Path) -> None:
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        with pytest.raises(InvalidRequest, match="end with an image"):  # its embeddings would choose no token
            await engine.generate("vis", "[img]", raw=True, images=[picture("red")], options=GREEDY)
        with pytest.raises(CapabilityError, match="not a vision model"):
            await engine.generate(str(smollm2_path), QUESTION, images=[picture("red")], options=GREEDY)
        reply = await engine.generate("vis", QUESTION, images=[picture("red")], options=GREEDY)
        rendered = await engine.render(
            ChatRequest("vis", [{"role": "user", "content": "hi", "images": [picture("red")]}])
        )
    assert reply.context is not None and all(token >= 0 for token in reply.context)  # stand-ins stay inside
    assert "[img-0]hi" in rendered


async def test_a_generate_prompt_places_its_image_where_it_says(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    async with Engine(home, num_parallel=1) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        before = await engine.render(GenerateRequest("vis", "Look: [img] What is it?", images=[picture("red")]))
        prefixed = await engine.render(GenerateRequest("vis", "What is it?", images=[picture("red")]))
    assert "Look: [img-0] What is it?" in before
    assert "[img-0]What is it?" in prefixed


async def test_an_image_kept_on_disk_serves_the_next_process(
    smollm2_path: Path, projector_path: Path, home: Path
) -> None:
    content = "Here is a long story about colours. " * 6 + QUESTION  # past the fewest tokens worth saving
    async with Engine(home, num_parallel=1, prompt_cache=True) as engine:
        await vision_model(engine, smollm2_path, projector_path)
        cold = await ask(engine, picture("teal"), content=content)
    async with Engine(home, num_parallel=1, prompt_cache=True) as engine:
        warm = await ask(engine, picture("teal"), content=content)
        other = await ask(engine, picture("navy"), content=content)
    assert warm.prompt_cached_count == warm.prompt_eval_count - 1
    assert close(first(cold), first(warm))
    assert other.prompt_cached_count < other.prompt_eval_count - TOKENS_PER_IMAGE  # the image's entries differ

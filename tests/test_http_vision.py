"""Images (and audio) through the HTTP shim, driven by the official `ollama`, `openai` and `anthropic` clients.

The model is SmolLM2 with a tiny random-weight vision projector (tests/projector.py): its answers mean
nothing, but each image puts its 16 embeddings in the prompt (``prompt_eval_count`` counts them) and
changes what the model predicts next, while greedy decoding keeps every answer reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from pictures import b64, png, png_header_only, wav
from projector import TOKENS_PER_IMAGE
from servers import localllm_shim

from localllm.http import ServerThread

VISION = "vis"
TEXT_ONLY = "smollm2"
GREEDY = {"temperature": 0, "num_predict": 4}
QUESTION = "What is in this picture?"
#: How a model whose projector only sees refuses a WAV clip.
NO_AUDIO = "not audio|no audio input"

RED = png((200, 30, 30))
BLUE = png((20, 40, 220))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, projector_path: Path
) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home"), smollm2_path) as running:
        with ollama.Client(host=running.url) as setup:
            files = {"model.gguf": setup.create_blob(smollm2_path), "mmproj.gguf": setup.create_blob(projector_path)}
            assert setup.create(VISION, files=files, parameters={"num_ctx": 2048, "num_thread": 1}).status == "success"
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def openai_client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def raw(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def first_token_logprobs(reply: ollama.ChatResponse) -> dict[str, float]:
    assert reply.logprobs, "asked for logprobs, got none"
    first = reply.logprobs[0]
    assert first.top_logprobs
    return {choice.token: choice.logprob for choice in first.top_logprobs}


def ask(client: ollama.Client, *images: bytes) -> ollama.ChatResponse:
    message: dict[str, Any] = {"role": "user", "content": QUESTION}
    if images:
        message["images"] = list(images)
    return client.chat(model=VISION, messages=[message], options=GREEDY, logprobs=True, top_logprobs=5)


def assert_served(raw: httpx.Client) -> None:
    """The server still answers a request with an image after refusing a bad one."""
    reply = raw.post(
        "/api/generate",
        json={"model": VISION, "prompt": QUESTION, "images": [b64(RED)], "stream": False, "options": GREEDY},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["done"] is True


# --------------------------------------------------------------------------- Ollama's API


def test_ollama_chat_counts_the_image_and_sees_it(client: ollama.Client) -> None:
    plain = ask(client)
    red = ask(client, RED)
    again = ask(client, RED)
    blue = ask(client, BLUE)

    assert red.message.content is not None and red.done
    assert red.prompt_eval_count == plain.prompt_eval_count + TOKENS_PER_IMAGE
    assert blue.prompt_eval_count == red.prompt_eval_count

    # The image reaches the model: what it predicts first changes with it and is the same for the same image.
    without, with_red, with_red_again, with_blue = map(first_token_logprobs, (plain, red, again, blue))
    assert with_red != pytest.approx(without, abs=1e-3)
    assert with_red_again == pytest.approx(with_red, abs=1e-3)
    assert with_blue != pytest.approx(with_red, abs=1e-3)


def test_ollama_generate_takes_a_path_or_bytes(client: ollama.Client, tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    picture.write_bytes(RED)
    plain = client.generate(model=VISION, prompt=QUESTION, options=GREEDY)
    from_path = client.generate(model=VISION, prompt=QUESTION, images=[picture], options=GREEDY)
    from_bytes = client.generate(model=VISION, prompt=QUESTION, images=[RED], options=GREEDY)

    assert from_path.prompt_eval_count == plain.prompt_eval_count + TOKENS_PER_IMAGE
    assert from_bytes.prompt_eval_count == from_path.prompt_eval_count
    assert from_bytes.response == from_path.response  # greedy: the same picture, the same answer


def test_two_images_count_twice(client: ollama.Client) -> None:
    one = ask(client, RED)
    two = ask(client, RED, BLUE)
    assert two.prompt_eval_count == one.prompt_eval_count + TOKENS_PER_IMAGE


# --------------------------------------------------------------------------- OpenAI's and Anthropic's APIs


def test_openai_chat_completion_with_an_image_url(openai_client: openai.OpenAI) -> None:
    def complete(*parts: dict[str, Any]) -> Any:
        content = [{"type": "text", "text": QUESTION}, *parts]
        return openai_client.chat.completions.create(
            model=VISION, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=4
        )

    plain = complete()
    seen = complete({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(RED)}"}})
    assert seen.choices[0].finish_reason in ("stop", "length")
    assert plain.usage is not None and seen.usage is not None
    assert seen.usage.prompt_tokens == plain.usage.prompt_tokens + TOKENS_PER_IMAGE


def test_openai_responses_with_an_input_image(openai_client: openai.OpenAI) -> None:
    def respond(*parts: dict[str, Any]) -> Any:
        content = [{"type": "input_text", "text": QUESTION}, *parts]
        return openai_client.responses.create(
            model=VISION, input=[{"role": "user", "content": content}], temperature=0, max_output_tokens=16
        )

    plain = respond()
    seen = respond({"type": "input_image", "image_url": f"data:image/png;base64,{b64(RED)}", "detail": "auto"})
    assert seen.status in ("completed", "incomplete")
    assert plain.usage is not None and seen.usage is not None
    assert seen.usage.input_tokens == plain.usage.input_tokens + TOKENS_PER_IMAGE


def test_anthropic_image_block(server: ServerThread) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120) as client:

        def message(*blocks: dict[str, Any]) -> anthropic.types.Message:
            content = [*blocks, {"type": "text", "text": QUESTION}]
            return client.messages.create(
                model=VISION,
                messages=[{"role": "user", "content": content}],
                max_tokens=4,
                extra_body={"temperature": 0},
            )

        plain = message()
        source = {"type": "base64", "media_type": "image/png", "data": b64(RED)}
        seen = message({"type": "image", "source": source})
    assert seen.stop_reason in ("end_turn", "max_tokens")
    assert seen.usage.input_tokens == plain.usage.input_tokens + TOKENS_PER_IMAGE


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (b64(png_header_only(60000, 60000)), "60000x60000"),
        (b64(bytes(range(256)) * 4), "not an image"),
        ("this is not base64!", "not valid base64"),
        ("/etc/passwd", "not valid base64"),  # text is never read as a path on the server
    ],
    ids=["huge-header", "random-bytes", "not-base64", "a-path"],
)
def test_a_bad_image_is_refused_by_name_and_the_server_goes_on(raw: httpx.Client, image: str, reason: str) -> None:
    messages = [{"role": "user", "content": QUESTION, "images": [image]}]
    refused = raw.post("/api/chat", json={"model": VISION, "messages": messages, "stream": False})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert "messages[0].images[0]" in error and reason in error, error  # names the image and the fault
    assert "root:" not in error
    assert_served(raw)


def test_a_bad_image_on_the_other_routes(raw: httpx.Client, openai_client: openai.OpenAI) -> None:
    bomb = b64(png_header_only(60000, 60000))
    refused = raw.post("/api/generate", json={"model": VISION, "prompt": QUESTION, "images": [bomb], "stream": False})
    assert refused.status_code == 400 and "image" in refused.json()["error"], refused.text

    with pytest.raises(openai.BadRequestError, match="image"):
        openai_client.chat.completions.create(
            model=VISION,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bomb}"}}],
                }
            ],
            max_tokens=4,
        )
    assert_served(raw)


def test_an_image_to_a_text_only_model_is_refused(client: ollama.Client, openai_client: openai.OpenAI) -> None:
    with pytest.raises(ollama.ResponseError, match="does not support images") as refused:
        client.chat(model=TEXT_ONLY, messages=[{"role": "user", "content": QUESTION, "images": [RED]}])
    assert refused.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="does not support images"):
        openai_client.chat.completions.create(
            model=TEXT_ONLY,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(RED)}"}}],
                }
            ],
            max_tokens=4,
        )


# --------------------------------------------------------------------------- audio


def test_openai_input_audio_reaches_the_model(openai_client: openai.OpenAI) -> None:
    # The projector sees only: a WAV clip is carried like an image, and the model says it has no audio input.
    clip = {"type": "input_audio", "input_audio": {"data": b64(wav()), "format": "wav"}}
    with pytest.raises(openai.BadRequestError, match=NO_AUDIO):
        openai_client.chat.completions.create(
            model=VISION,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Listen."}, clip]}],
            max_tokens=4,
        )


def test_openai_input_audio_must_be_wav(openai_client: openai.OpenAI) -> None:
    clip = {"type": "input_audio", "input_audio": {"data": b64(b"ID3" + bytes(64)), "format": "mp3"}}
    with pytest.raises(openai.BadRequestError, match="send audio as WAV"):
        openai_client.chat.completions.create(
            model=VISION, messages=[{"role": "user", "content": [clip]}], max_tokens=4
        )


def test_responses_input_audio(openai_client: openai.OpenAI) -> None:
    clip = {"type": "input_audio", "input_audio": {"data": b64(wav()), "format": "wav"}}
    with pytest.raises(openai.BadRequestError, match=NO_AUDIO):
        openai_client.responses.create(model=VISION, input=[{"role": "user", "content": [clip]}], max_output_tokens=16)

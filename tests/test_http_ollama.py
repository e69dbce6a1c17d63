"""Ollama's REST API over a real engine, driven by the official `ollama` Python client."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from servers import OCIRegistry, localllm_shim, tiny_gguf

from localllm.http import ServerThread
from localllm.http.ollama_api import OLLAMA_API_VERSION

GREEDY = {"temperature": 0, "num_predict": 12, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with localllm_shim(tmp_path_factory.mktemp("home")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: ollama.Client, smollm2_path: Path) -> str:
    """SmolLM2 created the way Ollama's clients do it: upload the file as a blob, then create from its digest."""
    digest = client.create_blob(smollm2_path)
    events = list(
        client.create(
            "smollm2",
            files={"SmolLM2-135M-Instruct.Q4_1.gguf": digest},
            system="You are a helpful assistant.",
            parameters={"num_ctx": 2048, "num_thread": 1, "stop": ["<|im_end|>"]},
            stream=True,
        )
    )
    assert events[-1].status == "success"
    return "smollm2"


@pytest.fixture(scope="module")
def minilm(client: ollama.Client, minilm_gguf: Path) -> str:
    """all-MiniLM-L6-v2 converted to GGUF, uploaded and created: an embedding model."""
    gguf_path = minilm_gguf
    digest = client.create_blob(gguf_path)
    assert client.create("minilm", files={"minilm.gguf": digest}, parameters={"num_thread": 1}).status == "success"
    return "minilm"


def test_root_version_and_blob_checks(server: ServerThread, model: str, smollm2_path: Path) -> None:
    with httpx.Client(base_url=server.url) as raw:
        assert raw.get("/").text == "Ollama is running"
        assert raw.head("/").status_code == 200
        # Ollama's version, which clients compare to decide what to send; localllm's own is `localllm --version`'s
        assert raw.get("/api/version").json() == {"version": OLLAMA_API_VERSION}
        digest = "sha256:" + "0" * 64
        assert raw.head(f"/api/blobs/{digest}").status_code == 404
        assert raw.head("/api/blobs/sha256:nothex").status_code == 400
    blob_digest = "sha256:" + hashlib.sha256(smollm2_path.read_bytes()).hexdigest()  # uploaded by `model`
    with httpx.Client(base_url=server.url) as raw:
        assert raw.head(f"/api/blobs/{blob_digest}").status_code == 200


def test_list_and_show(client: ollama.Client, model: str) -> None:
    listed = {m.model: m for m in client.list().models}
    entry = listed["smollm2:latest"]
    assert entry.size > 90_000_000
    assert len(entry.digest or "") == 64
    assert entry.details is not None and entry.details.family == "llama"
    assert entry.details.quantization_level == "Q4_1"

    info = client.show(model)
    assert "FROM " in (info.modelfile or "")
    assert "completion" in (info.capabilities or [])
    assert info.modelinfo is not None and info.modelinfo["general.architecture"] == "llama"
    assert "num_ctx" in (info.parameters or "") and "2048" in (info.parameters or "")
    assert info.details is not None and info.details.format == "gguf"


def test_tags_list_capabilities(server: ServerThread, model: str, minilm: str) -> None:
    """Each model's capabilities in /api/tags, as Ollama lists them, so a client picks models without a show each."""
    with httpx.Client(base_url=server.url) as raw:
        listed = {m["name"]: m for m in raw.get("/api/tags").json()["models"]}
        assert listed["smollm2:latest"]["capabilities"] == ["completion"]
        assert listed["minilm:latest"]["capabilities"] == ["embedding"]
        for name, entry in listed.items():
            assert raw.post("/api/show", json={"model": name}).json()["capabilities"] == entry["capabilities"]


def test_show_lists_tensors_and_a_projectors_metadata(
    client: ollama.Client, server: ServerThread, model: str, tmp_path: Path
) -> None:
    """As Ollama's /api/show: every tensor's name, type and shape; `projector_info` only for a model with one."""
    from test_validation_routes import projector_gguf

    from localllm.registry.store import MEDIA_PROJECTOR

    with httpx.Client(base_url=server.url) as raw:
        shown = raw.post("/api/show", json={"model": model, "verbose": True}).json()
        tensors = {t["name"]: t for t in shown["tensors"]}
        assert len(tensors) == len(shown["tensors"]) > 100
        assert tensors["token_embd.weight"] == {"name": "token_embd.weight", "type": "Q8_0", "shape": [576, 49152]}
        assert tensors["output_norm.weight"]["type"] == "F32"
        assert "projector_info" not in shown
        assert raw.post("/api/show", json={"model": model}).json()["tensors"] == shown["tensors"]  # as Ollama

        with OCIRegistry() as registry:
            registry.add_model(
                "library/seeing", "latest", tiny_gguf(seed=4), extra=[(MEDIA_PROJECTOR, projector_gguf(tmp_path))]
            )
            name = f"{registry.host}/library/seeing:latest"
            assert client.pull(name, insecure=True).status == "success"
        seeing = raw.post("/api/show", json={"model": name}).json()
        assert seeing["projector_info"]["general.architecture"] == "clip"
        assert "vision" in seeing["capabilities"]
        assert [t["name"] for t in seeing["tensors"]] == ["token_embd.weight", "output_norm.weight"]
        client.delete(name)


def test_debug_render_only_answers_the_prompt_without_running_the_model(
    server: ServerThread, client: ollama.Client, model: str
) -> None:
    """Ollama's `_debug_render_only`: the rendered prompt under `_debug_info`, one JSON object, nothing generated."""
    client.generate(model, keep_alive=0)  # unloaded, to see that rendering loads nothing
    chat = [{"role": "user", "content": "Name a color."}]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # the model's SYSTEM
        "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    )
    with httpx.Client(base_url=server.url, timeout=120) as raw:
        answer = raw.post("/api/chat", json={"model": model, "messages": chat, "_debug_render_only": True})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        body = answer.json()
        assert body["message"] == {"role": "", "content": ""} and body["done"] is False
        assert body["_debug_info"] == {"rendered_template": expected}
        generated = raw.post(
            "/api/generate", json={"model": model, "prompt": "Hi", "system": "Be brief.", "_debug_render_only": True}
        ).json()
        assert generated["response"] == "" and generated["done"] is False
        assert generated["_debug_info"]["rendered_template"] == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        )
        as_is = {"model": model, "prompt": "x y", "raw": True, "_debug_render_only": True}
        assert raw.post("/api/generate", json=as_is).json()["_debug_info"] == {"rendered_template": "x y"}
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        with_tools = {"model": model, "messages": chat, "tools": [tool], "_debug_render_only": True}
        assert "get_weather" in raw.post("/api/chat", json=with_tools).json()["_debug_info"]["rendered_template"]
        assert raw.get("/api/ps").json()["models"] == []  # nothing was loaded, let alone run

        with_image = [{"role": "user", "content": "What is this?", "images": ["aGk="]}]
        refused = raw.post("/api/chat", json={"model": model, "messages": with_image, "_debug_render_only": True})
        assert refused.status_code == 400 and "images" in refused.json()["error"]  # as a request with images is

    # The rendered prompt is the one the model runs on: sent raw, it gets the same greedy reply.
    reply = client.chat(model, chat, options=GREEDY)
    assert client.generate(model, expected, raw=True, options=GREEDY).response == reply.message.content


def test_generate_whole_and_streamed(client: ollama.Client, model: str) -> None:
    whole = client.generate(model, "Name a color.", options=GREEDY)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.response
    assert whole.eval_count is not None and 0 < whole.eval_count <= 12
    assert whole.prompt_eval_count and whole.total_duration and whole.eval_duration
    assert whole.context

    chunks = list(client.generate(model, "Name a color.", options=GREEDY, stream=True))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert "".join(c.response or "" for c in chunks) == whole.response  # greedy: the same text
    assert chunks[-1].context and chunks[-1].eval_count == whole.eval_count


def test_chat_whole_and_streamed(client: ollama.Client, model: str) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    whole = client.chat(model, messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.done and whole.prompt_eval_count

    chunks = list(client.chat(model, messages=messages, options=GREEDY, stream=True))
    assert chunks[-1].done and chunks[-1].done_reason in ("stop", "length")
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content

    # A follow-up turn with history.
    history = [*messages, {"role": "assistant", "content": whole.message.content}, {"role": "user", "content": "Again"}]
    again = client.chat(model, messages=history, options=GREEDY)
    assert again.message.content


def test_chat_with_tools(client: ollama.Client, model: str) -> None:
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
          city: The name of the city
        """
        return "sunny"

    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    reply = client.chat(model, messages=messages, tools=[get_weather], options={**GREEDY, "num_predict": 48})
    assert reply.done
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments, dict)

    # The round trip: the model's call and the tool's answer go back in the history.
    history = [
        *messages,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny, 21 degrees", "tool_name": "get_weather"},
    ]
    answer = client.chat(model, messages=history, tools=[get_weather], options=GREEDY)
    assert answer.done and answer.message.role == "assistant"


def test_chat_forced_tool_call(server: ServerThread, model: str) -> None:
    """`tool_choice` (an extension of the Ollama request) makes the model call the tool."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [tool],
        "tool_choice": "required",
        "stream": False,
        "options": {**GREEDY, "num_predict": 64},
    }
    answer = httpx.post(f"{server.url}/api/chat", json=body, timeout=120).json()
    calls = answer["message"]["tool_calls"]
    assert calls and calls[0]["function"]["name"] == "get_weather"
    assert isinstance(calls[0]["function"]["arguments"], dict)


def test_structured_output(client: ollama.Client, model: str) -> None:
    schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    reply = client.generate(model, "Name a color as JSON.", format=schema, options={**GREEDY, "num_predict": 40})
    import json

    assert isinstance(json.loads(reply.response)["color"], str)


def test_embed(client: ollama.Client, minilm: str, model: str) -> None:
    result = client.embed(minilm, ["The cat sits on the mat.", "A dog plays in the park."])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 384
    assert abs(sum(x * x for x in result.embeddings[0]) - 1.0) < 1e-3  # normalised
    assert result.prompt_eval_count and result.prompt_eval_count > 0

    single = client.embed(minilm, "The cat sits on the mat.")
    assert single.embeddings[0] == pytest.approx(result.embeddings[0], abs=1e-4)

    legacy = client.embeddings(minilm, prompt="The cat sits on the mat.")
    assert len(legacy.embedding) == 384

    text_model = client.embed("smollm2", "a text generation model embeds too, as in Ollama")
    assert len(text_model.embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError) as failure:
        client.generate(minilm, "an embedding model does not generate")
    assert failure.value.status_code == 400


def test_ps_load_and_unload(client: ollama.Client, model: str) -> None:
    client.generate(model, "Hi", options=GREEDY)
    running = {m.model: m for m in client.ps().models}
    assert "smollm2:latest" in running
    entry = running["smollm2:latest"]
    assert entry.size and entry.size > 0 and entry.size_vram == 0
    assert entry.context_length == 2048
    assert entry.expires_at is not None

    unloaded = client.generate(model, keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "smollm2:latest" not in {m.model for m in client.ps().models}
    loaded = client.generate(model)
    assert loaded.done_reason == "load"
    assert "smollm2:latest" in {m.model for m in client.ps().models}


def test_copy_and_delete(client: ollama.Client, model: str) -> None:
    assert client.copy(model, "copied").status == "success"
    assert "copied:latest" in {m.model for m in client.list().models}
    assert client.delete("copied").status == "success"
    assert "copied:latest" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as failure:
        client.delete("copied")
    assert failure.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as failure:
        client.copy("no-such-model", "other")
    assert failure.value.status_code == 404


def test_create_from_model_with_system(client: ollama.Client, model: str) -> None:
    result = client.create("pirate", from_=model, system="You are a pirate.", parameters={"temperature": 0.5})
    assert result.status == "success"
    info = client.show("pirate")
    assert "pirate" in (info.modelfile or "")
    assert "temperature" in (info.parameters or "")
    client.delete("pirate")


def test_create_keeps_renderer_parser_and_requires(server: ServerThread, model: str) -> None:
    """As fields of the request (as Ollama's create takes them) or as lines of a Modelfile, they are stored."""
    registry = server.engine.registry
    for name, body in (
        ("fields", {"from": model, "renderer": "harmony", "parser": "harmony", "requires": "0.12.0"}),
        ("lines", {"modelfile": f"FROM {model}\nRENDERER harmony\nPARSER harmony\nREQUIRES 0.12.0\n"}),
    ):
        answer = httpx.post(f"{server.url}/api/create", json={"model": name, "stream": False, **body}, timeout=60)
        assert answer.json() == {"status": "success"}, answer.text
        resolved = registry.resolve(name)
        assert (resolved.renderer, resolved.parser) == ("harmony", "harmony")
        _stored, manifest = registry.find(name)
        assert json.loads(registry.store.read_blob(manifest.config.digest))["requires"] == "0.12.0"
        registry.delete(name)
    answer = httpx.post(
        f"{server.url}/api/create",
        json={"model": "bad", "from": model, "requires": "soon", "stream": False},
        timeout=60,
    )
    assert answer.status_code == 400 and "REQUIRES" in answer.json()["error"]


def test_create_errors(server: ServerThread, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as failure:
        client.create("broken", files={"model.gguf": "sha256:" + "1" * 64})
    assert failure.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as failure:
        client.create("broken", from_="no-such-model")
    assert failure.value.status_code == 404
    answer = httpx.post(f"{server.url}/api/create", json={"model": "broken", "stream": False}, timeout=30)
    assert answer.status_code == 400 and "error" in answer.json()


def test_unknown_model_is_404(client: ollama.Client) -> None:
    for call in (
        lambda: client.show("no-such-model"),
        lambda: client.generate("no-such-model", "hi"),
        lambda: list(client.generate("no-such-model", "hi", stream=True)),
        lambda: client.chat("no-such-model", messages=[{"role": "user", "content": "hi"}]),
    ):
        with pytest.raises(ollama.ResponseError) as failure:
            call()
        assert failure.value.status_code == 404


def test_pull_from_a_registry(client: ollama.Client) -> None:
    with OCIRegistry() as registry:
        registry.add_model("library/tiny", "latest", tiny_gguf(seed=3, rows=400))
        name = f"{registry.host}/library/tiny:latest"
        events = list(client.pull(name, insecure=True, stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        layers = [e for e in events if e.digest]
        assert layers and layers[-1].completed == layers[-1].total
        assert name in {m.model for m in client.list().models}

        assert client.pull(name, insecure=True).status == "success"  # not streamed; nothing left to fetch

        with pytest.raises(ollama.ResponseError) as failure:
            client.pull(f"{registry.host}/library/missing:latest", insecure=True)
        assert failure.value.status_code == 404
    client.delete(name)


def test_create_from_safetensors_files(client: ollama.Client, minilm: str, minilm_dir: Path) -> None:
    """A Hugging Face model's files, uploaded one by one, are converted at create (as Ollama does)."""
    folder = minilm_dir
    wanted = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
    files = {
        str(path.relative_to(folder)): client.create_blob(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and (path.name in wanted or path.parent.name == "1_Pooling" or path.name == "modules.json")
    }
    assert "1_Pooling/config.json" in files
    statuses = [e.status for e in client.create("minilm-st", files=files, parameters={"num_thread": 1}, stream=True)]
    assert statuses[-1] == "success" and "converting model" in statuses
    assert "embedding" in (client.show("minilm-st").capabilities or [])
    converted = client.embed("minilm-st", "The cat sits on the mat.").embeddings[0]
    reference = client.embed(minilm, "The cat sits on the mat.").embeddings[0]
    assert converted == pytest.approx(reference, abs=1e-3)
    client.delete("minilm-st")

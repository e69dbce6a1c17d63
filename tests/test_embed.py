"""Embeddings: all-MiniLM-L6-v2 converted to GGUF must agree with sentence-transformers.

The reference vectors come from tests/data/make_minilm_reference.py (sentence-transformers
on the same safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import localllm
from localllm.embeddings import EmbedResponse
from localllm.errors import CapabilityError, ContextLengthExceeded, InvalidRequest
from localllm.gguf.architectures import is_embedding_model
from localllm.gguf.convert import convert_hf_to_gguf
from localllm.runner.embed import EmbeddingRunner
from localllm.runner.protocol import LoadConfig

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())
SENTENCES: list[str] = REFERENCE["sentences"]
EXPECTED = np.array(REFERENCE["embeddings"])


def cosines(vectors: list[list[float]], expected: np.ndarray) -> np.ndarray:
    got = np.array(vectors)
    return np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))


async def test_matches_sentence_transformers(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        response = await engine.embed(str(minilm_gguf), SENTENCES)
        assert isinstance(response, EmbedResponse)
        assert response.model == str(minilm_gguf)
        assert len(response.embeddings) == len(SENTENCES) >= 8
        assert all(len(v) == 384 for v in response["embeddings"])
        similarity = cosines(response.embeddings, EXPECTED)
        assert similarity.min() >= 0.99, similarity
        assert np.allclose(np.linalg.norm(np.array(response.embeddings), axis=1), 1.0, atol=1e-5)
        assert response.prompt_eval_count == sum(len(ids) for ids in REFERENCE["token_ids"])
        assert (response.total_duration or 0) >= (response.load_duration or 0) > 0


async def test_tokenization_matches_hugging_face(minilm_gguf: Path) -> None:
    runner = await anyio.to_thread.run_sync(lambda: EmbeddingRunner(LoadConfig(str(minilm_gguf), embeddings=True)))
    try:
        assert [runner.tokenize(s) for s in SENTENCES] == REFERENCE["token_ids"]
    finally:
        runner.close()
    assert runner.model.handle is None  # freed on close, not by the garbage collector


async def test_inputs_are_packed_into_shared_batches(minilm_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve inputs take one encoder pass; with room for five sequences a batch, three; same vectors either way."""
    from localllm.runner import embed as embed_module

    async def run(max_sequences: int) -> tuple[list[list[float]], int]:
        monkeypatch.setattr(embed_module, "ENCODER_MAX_SEQUENCES", max_sequences)
        runner = await anyio.to_thread.run_sync(lambda: EmbeddingRunner(LoadConfig(str(minilm_gguf), embeddings=True)))
        calls = {"n": 0}
        decode = runner.context.decode

        def counting(batch: Any) -> int:
            calls["n"] += 1
            return decode(batch)

        runner.context.decode = counting  # type: ignore[method-assign]
        try:
            result = await runner.submit_embed([runner.tokenize(s) for s in SENTENCES]).result()
        finally:
            runner.close()
        return result.embeddings, calls["n"]

    packed, passes = await run(64)
    assert passes == 1
    split, passes = await run(5)
    assert passes == 3
    # Different batch shapes round F16 activations differently: equal up to float noise.
    assert cosines(packed, np.array(split)).min() >= 0.9999
    assert cosines(packed, EXPECTED).min() >= 0.99


async def test_single_and_batched_agree(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        batched = (await engine.embed(str(minilm_gguf), SENTENCES[:4])).embeddings
        single = [(await engine.embed(str(minilm_gguf), s)).embeddings[0] for s in SENTENCES[:4]]
        assert np.allclose(np.array(batched), np.array(single), atol=1e-5)


async def test_concurrent_requests(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        results: dict[int, list[list[float]]] = {}

        async def one(i: int) -> None:
            results[i] = (await engine.embed(str(minilm_gguf), SENTENCES[i : i + 3])).embeddings

        async with anyio.create_task_group() as tg:
            for i in range(0, len(SENTENCES), 3):
                tg.start_soon(one, i)
        got = [v for i in sorted(results) for v in results[i]]
        assert cosines(got, EXPECTED).min() >= 0.99
        (model,) = (await engine.ps()).models
        assert model.active_requests == 0


async def test_truncation(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        long_text = "embedding " * 700  # about 1400 tokens; MiniLM's positions end at 512
        with pytest.raises(ContextLengthExceeded, match="512"):
            await engine.embed(str(minilm_gguf), ["short", long_text], truncate=False)
        response = await engine.embed(str(minilm_gguf), long_text)
        assert response.prompt_eval_count == 512
        with pytest.raises(ContextLengthExceeded):
            await engine.embed(str(minilm_gguf), long_text, truncate=False, options={"num_ctx": 128})
        small = await engine.embed(str(minilm_gguf), long_text, options={"num_ctx": 128})
        assert small.prompt_eval_count == 128


async def test_truncation_keeps_the_closing_separator(minilm_gguf: Path) -> None:
    runner = await anyio.to_thread.run_sync(lambda: EmbeddingRunner(LoadConfig(str(minilm_gguf), embeddings=True)))
    try:
        tokens = runner.tokenize("word " * 600)
        cut = runner.truncate(tokens)
        assert len(cut) == runner.n_ctx_seq == 512
        assert cut[0] == 101 and cut[-1] == 102  # [CLS] ... [SEP], as Hugging Face truncates
    finally:
        runner.close()


async def test_dimensions(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        full = (await engine.embed(str(minilm_gguf), SENTENCES[0])).embeddings[0]
        short = (await engine.embed(str(minilm_gguf), SENTENCES[0], dimensions=64)).embeddings[0]
        assert len(short) == 64
        assert np.linalg.norm(short) == pytest.approx(1.0, abs=1e-6)
        expected = np.array(full[:64]) / np.linalg.norm(full[:64])
        assert np.allclose(short, expected, atol=1e-6)
        assert len((await engine.embed(str(minilm_gguf), "x", dimensions=1000)).embeddings[0]) == 384
        for bad in (0, -3, 2.5, True):
            with pytest.raises(InvalidRequest, match="dimensions"):
                await engine.embed(str(minilm_gguf), "x", dimensions=bad)  # type: ignore[arg-type]


async def test_legacy_embeddings_are_raw(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        legacy = await engine.embeddings(str(minilm_gguf), SENTENCES[0])
        vector = np.array(legacy["embedding"])
        assert vector.shape == (384,)
        assert np.linalg.norm(vector) > 1.5  # not normalised, as Ollama's /api/embeddings
        assert np.dot(vector / np.linalg.norm(vector), EXPECTED[0]) >= 0.99
        assert (await engine.embeddings(str(minilm_gguf), "")).embedding == []


async def test_empty_input_loads_and_keep_alive_zero_unloads(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        response = await engine.embed(str(minilm_gguf), [])
        assert response.embeddings == []
        assert len((await engine.ps()).models) == 1
        response = await engine.embed(str(minilm_gguf), "", keep_alive=0)
        assert response.embeddings == []
        assert (await engine.ps()).models == []


async def test_bad_input(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        with pytest.raises(InvalidRequest, match="input 1 must be a string"):
            await engine.embed(str(minilm_gguf), ["a", 3])  # type: ignore[list-item]
        with pytest.raises(InvalidRequest, match="string or a list"):
            await engine.embed(str(minilm_gguf), 42)  # type: ignore[arg-type]


async def test_capabilities(home: Path, minilm_gguf: Path, smollm2_path: Path) -> None:
    async with localllm.Engine(home) as engine:
        assert is_embedding_model(minilm_gguf)
        assert not is_embedding_model(smollm2_path)
        with pytest.raises(CapabilityError, match="embedding model"):
            await engine.generate(str(minilm_gguf), "hello")
        with pytest.raises(CapabilityError, match="embedding model"):
            await engine.chat(str(minilm_gguf), [{"role": "user", "content": "hello"}])
        assert (await engine.ps()).models == []  # refused before anything was loaded


async def test_cancelled_request_frees_the_runner(home: Path, minilm_gguf: Path) -> None:
    async with localllm.Engine(home) as engine:
        many = [f"sentence number {i} about {SENTENCES[i % len(SENTENCES)]}" for i in range(400)]
        with anyio.move_on_after(0.01):
            await engine.embed(str(minilm_gguf), many)
        # The runner finishes or drops the cancelled work and serves the next request normally.
        with anyio.fail_after(30):
            response = await engine.embed(str(minilm_gguf), SENTENCES[:2])
        assert cosines(response.embeddings, EXPECTED[:2]).min() >= 0.99
        (model,) = (await engine.ps()).models
        assert model.active_requests == 0


def test_works_under_trio(home: Path, minilm_gguf: Path) -> None:
    import trio  # noqa: F401  (a test dependency: missing, this test fails rather than skips)

    async def main() -> list[list[float]]:
        async with localllm.Engine(home) as engine:
            return (await engine.embed(str(minilm_gguf), SENTENCES[:3])).embeddings

    vectors = anyio.run(main, backend="trio")
    assert cosines(vectors, EXPECTED[:3]).min() >= 0.99


async def test_named_model_from_a_hugging_face_folder(home: Path, minilm_dir: Path) -> None:
    folder = minilm_dir
    async with localllm.Engine(home) as engine:
        events: list[dict[str, Any]] = []
        await engine.create("all-minilm", from_=str(folder), progress=events.append)
        assert events[0]["status"] == "converting model" and events[-1]["status"] == "success"
        shown = await engine.show("all-minilm")
        assert shown.capabilities == ["embedding"]
        response = await engine.embed("all-minilm", SENTENCES)
        assert cosines(response.embeddings, EXPECTED).min() >= 0.99


async def test_causal_model_with_last_token_pooling(home: Path, tmp_path: Path) -> None:
    """A decoder with a sentence-transformers Pooling module (as Qwen3-Embedding has) embeds through its KV cache.

    The reference is transformers' final hidden state of the last token (tests/data/make_tiny_models.py).
    """
    import shutil

    folder = tmp_path / "tiny-embed"
    shutil.copytree(Path(__file__).parent / "data" / "tiny_llama", folder)
    (folder / "modules.json").write_text(
        json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    path = convert_hf_to_gguf(folder, tmp_path / "tiny-embed.gguf", out_type="f32")
    assert is_embedding_model(path)
    prompts = json.loads((folder / "reference.json").read_text())["prompts"]
    expected = np.array([p["last_hidden"] for p in prompts])
    async with localllm.Engine(home) as engine:
        response = await engine.embed(str(path), [p["prompt"] for p in prompts])
        single = await engine.embed(str(path), prompts[1]["prompt"])
        with pytest.raises(CapabilityError, match="embedding model"):
            await engine.generate(str(path), "hello")
    assert response.prompt_eval_count == sum(len(p["token_ids"]) for p in prompts)
    assert cosines(response.embeddings, expected).min() >= 0.9999
    assert np.allclose(single.embeddings[0], response.embeddings[1], atol=1e-5)


async def test_a_text_generation_model_embeds_by_the_mean_of_its_hidden_states(home: Path, smollm2_path: Path) -> None:
    """As Ollama's /api/embed does with any model; the reference is llama.cpp's own mean pooling."""
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN

    from localllm.runner.llama import reference_llama

    texts = ["The cat sat on the mat.", "Stock prices fell sharply on Monday."]
    async with localllm.Engine(home) as engine:
        response = await engine.embed(str(smollm2_path), texts)
        reply = await engine.generate(str(smollm2_path), "Hi", options={"temperature": 0, "num_predict": 2})
        assert reply.done  # its text runner loads beside the embedding runner
        assert len((await engine.ps()).models) == 2
    reference = reference_llama(
        str(smollm2_path), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=512, verbose=False
    )
    expected = np.array([reference.embed(text, normalize=True) for text in texts])
    vectors = np.array(response.embeddings)
    assert vectors.shape == (2, 576)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The mean and the last token's state are ~0.71 apart; llama.cpp's kernels here and in the reference's
    # context differ by rounding only.
    assert cosines(response.embeddings, expected).min() >= 0.998

"""embed and embeddings: texts -> vectors, through an embedding runner.

`embed` follows Ollama's /api/embed: one text or a list of texts, every
vector L2-normalised, `truncate` (default on) cutting inputs longer than the
context, `dimensions` cutting vectors shorter (and normalising them again).
`embeddings` is the legacy single-prompt call (/api/embeddings): one raw,
unnormalised vector in the `embedding` field.

As in Ollama, every model embeds: an embedding model (a GGUF that declares a
pooling type, or a BERT-style encoder) as it says, a text generation model by
the mean of its hidden states. Asking an embedding model to generate raises
CapabilityError.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import numpy as np

from .errors import ContextLengthExceeded, InvalidRequest
from .options import OptionValues
from .request import EmbedRequest
from .runner.protocol import EmbedRunner
from .service import off_loop_if_long
from .types import EmbeddingsResponse, EmbedResponse

if TYPE_CHECKING:
    from .service import ModelService

__all__ = ["EmbedResponse", "EmbeddingsResponse", "embed", "embeddings"]


# --------------------------------------------------------------------------- requests


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    if dimensions is None or dimensions >= len(vector):
        return vector
    cut = np.asarray(vector[:dimensions], dtype=np.float64)
    norm = float(np.linalg.norm(cut))
    return (cut / norm).tolist() if norm > 0 else cut.tolist()


def _tokenize_all(runner: EmbedRunner, texts: list[str], truncate: bool) -> list[list[int]]:
    limit = runner.n_ctx_seq
    out: list[list[int]] = []
    for i, text in enumerate(texts):
        tokens = runner.tokenize(text, add_special=True)
        if not tokens:
            raise InvalidRequest(f"input {i} is empty after tokenization")
        if len(tokens) > limit:
            if not truncate:
                raise ContextLengthExceeded(
                    f"input {i} has {len(tokens)} tokens but the model's context holds {limit}; "
                    "shorten it, raise num_ctx (up to the model's trained length), or pass truncate=True"
                )
            tokens = runner.truncate(tokens, limit)
        out.append(tokens)
    return out


async def _run(service: ModelService, request: EmbedRequest, *, normalize: bool) -> tuple[list[list[float]], int, int]:
    """Embed the request's inputs; returns (vectors, load_duration, prompt_eval_count)."""
    with service.admit():  # counted under max_queue for the whole request
        resolved = await service.resolve(request.model, "embed")
        options = service.options(resolved, request.options)
        if request.is_empty:  # an empty request loads the model (or, with keep_alive 0, unloads it), as in Ollama
            _reason, load = await service.load_or_unload(resolved, options, request.keep_alive, "embed")
            return [], load, 0
        lease = await service.lease_embed(resolved, options, request.keep_alive)
        try:
            runner = lease.runner
            texts = list(request.input)
            tokenize = functools.partial(_tokenize_all, runner, texts, request.truncate)
            tokens = await off_loop_if_long(sum(len(t) for t in texts), tokenize)
            handle = runner.submit_embed(tokens, normalize=normalize)
            try:
                result = await handle.result()
            except BaseException:
                handle.cancel()
                raise
            return result.embeddings, lease.load_duration, result.prompt_eval_count
        finally:
            lease.release()


async def embed(service: ModelService, request: EmbedRequest) -> EmbedResponse:
    """Embed one text or several (packed into shared batches); every vector is L2-normalised.

    `truncate=False` makes an input longer than the context raise
    ContextLengthExceeded instead of being cut. `dimensions` keeps the first
    that many components of each vector and normalises them again. An empty
    input (or list) loads the model and returns no vectors.
    """
    started = time.perf_counter()
    vectors, load, count = await _run(service, request, normalize=True)
    return EmbedResponse(
        model=request.model,
        embeddings=[_shorten(v, request.dimensions) for v in vectors],
        total_duration=int((time.perf_counter() - started) * 1e9),
        load_duration=load,
        prompt_eval_count=count,
    )


async def embeddings(
    service: ModelService,
    model: str,
    prompt: str = "",
    *,
    options: OptionValues | None = None,
    keep_alive: float | str | None = None,
) -> EmbeddingsResponse:
    """The legacy single-prompt call: the raw (unnormalised) vector of `prompt`, cut to the context if needed."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
    request = EmbedRequest(model, prompt, options=options, keep_alive=keep_alive)
    vectors, _load, _count = await _run(service, request, normalize=False)
    return EmbeddingsResponse(embedding=vectors[0] if vectors else [])

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
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np

from .errors import ContextLengthExceeded, InvalidRequest
from .options import OptionValues
from .runner.protocol import EmbedRunner
from .service import off_loop_if_long
from .types import _Subscriptable

if TYPE_CHECKING:
    from .service import ModelService

__all__ = ["EmbedResponse", "EmbeddingsResponse", "embed", "embeddings"]


@attrs.frozen
class EmbedResponse(_Subscriptable):
    """The answer of `embed` (Ollama's /api/embed): one L2-normalised vector per input, in order."""

    model: str
    embeddings: list[list[float]] = attrs.field(factory=list)
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


@attrs.frozen
class EmbeddingsResponse(_Subscriptable):
    """The answer of the legacy `embeddings` call (Ollama's /api/embeddings): one raw vector."""

    embedding: list[float] = attrs.field(factory=list)


# --------------------------------------------------------------------------- requests


def _inputs(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        texts = list(value)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"input {i} must be a string, got {type(text).__name__}")
        return texts
    raise InvalidRequest(f"input must be a string or a list of strings, got {type(value).__name__}")


def _dimensions(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"dimensions must be a positive integer, got {value!r}")
    return value


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


async def _run(
    service: ModelService,
    model: str,
    texts: list[str],
    *,
    truncate: bool,
    normalize: bool,
    options: OptionValues | None,
    keep_alive: float | str | None,
) -> tuple[list[list[float]], int, int, str]:
    """Embed `texts`; returns (vectors, load_duration, prompt_eval_count, model name)."""
    with service.admit():  # counted under max_queue for the whole request
        resolved = await service.resolve(model, "embed")
        opts = service.options(resolved, options)
        if not texts:  # an empty request loads the model (or, with keep_alive 0, unloads it), as in Ollama
            _reason, load = await service.load_or_unload(resolved, opts, keep_alive, "embed")
            return [], load, 0, model
        lease = await service.lease_embed(resolved, opts, keep_alive)
        try:
            runner = lease.runner
            tokenize = functools.partial(_tokenize_all, runner, texts, truncate)
            tokens = await off_loop_if_long(sum(len(t) for t in texts), tokenize)
            handle = runner.submit_embed(tokens, normalize=normalize)
            try:
                result = await handle.result()
            except BaseException:
                handle.cancel()
                raise
            return result.embeddings, lease.load_duration, result.prompt_eval_count, model
        finally:
            lease.release()


async def embed(
    service: ModelService,
    model: str,
    input: str | Sequence[str],
    *,
    truncate: bool = True,
    dimensions: int | None = None,
    options: OptionValues | None = None,
    keep_alive: float | str | None = None,
) -> EmbedResponse:
    """Embed one text or several (packed into shared batches); every vector is L2-normalised.

    `truncate=False` makes an input longer than the context raise
    ContextLengthExceeded instead of being cut. `dimensions` keeps the first
    that many components of each vector and normalises them again. An empty
    input (or list) loads the model and returns no vectors.
    """
    started = time.perf_counter()
    texts = _inputs(input)
    dims = _dimensions(dimensions)
    vectors, load, count, name = await _run(
        service, model, texts, truncate=bool(truncate), normalize=True, options=options, keep_alive=keep_alive
    )
    return EmbedResponse(
        model=name,
        embeddings=[_shorten(v, dims) for v in vectors],
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
    vectors, _load, _count, _name = await _run(
        service,
        model,
        [prompt] if prompt else [],
        truncate=True,
        normalize=False,
        options=options,
        keep_alive=keep_alive,
    )
    return EmbeddingsResponse(embedding=vectors[0] if vectors else [])

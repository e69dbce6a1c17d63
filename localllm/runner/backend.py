"""What the runners need of llama.cpp, as protocols: a model, contexts, a batch and samplers.

`Runner` and `EmbeddingRunner` build each of them through a `Backend`. `LlamaBackend` (in `llama.py`)
is llama.cpp itself; a test can pass a fake and drive the batching, prefix reuse, pooling and
cancellation logic without a model file. This module does not import llama_cpp.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..options import Options
from .protocol import LoadConfig, MediaLayout

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ..media import Media

__all__ = ["Backend", "Batch", "Context", "EmbeddingContext", "Model", "Pooling", "Projector", "Sampler"]


class Pooling(enum.IntEnum):
    """How a sequence's token embeddings become one vector (llama.cpp's `llama_pooling_type` values)."""

    NONE = 0  # no pooling in the model: one embedding per token
    MEAN = 1
    CLS = 2  # the first token's
    LAST = 3  # the last token's
    RANK = 4  # a reranker's score, not an embedding


class Model(Protocol):
    """A loaded model: its vocabulary and metadata."""

    @property
    def bos_token(self) -> int:
        """The beginning-of-sequence token; negative where the model has none."""
        ...

    @property
    def eos_token(self) -> int:
        """The end-of-sequence token; negative where the model has none."""
        ...

    @property
    def n_vocab(self) -> int:
        """How many tokens the vocabulary holds."""
        ...

    @property
    def n_ctx_train(self) -> int:
        """The context the model was trained on (where position embeddings end); 0 when unknown."""
        ...

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (a piece may hold part of a UTF-8 character)."""
        ...

    def token_text(self, token: int) -> str: ...

    def is_eog(self, token: int) -> bool:
        """Whether the token ends generation."""
        ...

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        """Raise a `LocalLLMError` for ids outside the vocabulary (llama.cpp would abort on them)."""
        ...

    def metadata(self, key: str) -> str | None: ...

    def close(self) -> None: ...


class Batch(Protocol):
    """A reusable batch of tokens, each for one position of one sequence."""

    @property
    def capacity(self) -> int: ...

    @property
    def n_tokens(self) -> int: ...

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append a token; returns its index in the batch (where its logits will be)."""
        ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


class Context(Protocol):
    """The KV cache of one model, holding independent sequences, and the decoding over it."""

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one sequence may hold."""
        ...

    @property
    def n_batch(self) -> int:
        """The most tokens one decode takes."""
        ...

    def decode(self, batch: Batch) -> int:
        """Evaluate a batch: 0 on success, 1 when the cache has no room, 2 when aborted, negative on errors."""
        ...

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """The last decode's logits at batch position `index`, one per vocabulary entry: a view into the
        context's own buffer, valid until the next decode."""
        ...

    def seq_rm(self, seq_id: int, p0: int) -> bool:
        """Drop a sequence's cache entries from position `p0` on; False where it cannot."""
        ...

    def shift(self, seq_id: int, keep: int, discard: int) -> bool:
        """Drop a sequence's entries at positions [keep, keep + discard) and move those after them back by
        `discard` (a context shift); False where this cache cannot."""
        ...

    def seq_pos_min(self, seq_id: int) -> int:
        """The sequence's lowest cached position; -1 when it holds none."""
        ...

    def seq_pos_max(self, seq_id: int) -> int:
        """The sequence's highest cached position; -1 when it holds none."""
        ...

    def seq_cp(self, src: int, dst: int) -> bool:
        """Make `dst` hold everything `src` holds (its own entries dropped); False where this cache cannot."""
        ...

    def state_get(self, seq_id: int) -> bytes:
        """A sequence's cache entries, serialized; empty where this cache cannot."""
        ...

    def state_set(self, seq_id: int, state: bytes) -> bool:
        """Replace a sequence's entries with a serialized state from `state_get`; False if it does not fit."""
        ...

    def close(self) -> None: ...


class EmbeddingContext(Protocol):
    """A context that computes embeddings: each decode evaluates whole sequences, from their first token."""

    @property
    def n_batch(self) -> int:
        """The most tokens one decode takes."""
        ...

    @property
    def pooling(self) -> Pooling:
        """How the context pools each sequence (the model's own pooling)."""
        ...

    @property
    def n_embd(self) -> int:
        """The length of each vector."""
        ...

    def decode(self, batch: Batch) -> int:
        """Evaluate a batch of whole sequences, nothing of the last batch kept: 0 on success, non-zero on errors."""
        ...

    def pooled(self, seq_id: int) -> npt.NDArray[np.float32]:
        """The last decode's pooled vector of a sequence (pooling other than `NONE`): a copy."""
        ...

    def token_embedding(self, index: int) -> npt.NDArray[np.float32]:
        """The last decode's embedding of the token at batch position `index`: a copy."""
        ...

    def close(self) -> None: ...


class Sampler(Protocol):
    """One sequence's sampler chain."""

    def sample(self, context: Context, index: int) -> int:
        """Choose a token from the logits at batch position `index` (this also accepts it)."""
        ...

    def accept(self, token: int) -> None:
        """Record a token the sequence holds (penalties and grammars look back over them)."""
        ...

    def close(self) -> None: ...


class Projector(Protocol):
    """A model's vision or audio projector: images and audio become embeddings in a sequence's cache."""

    def layout(self, media: Media) -> MediaLayout:
        """How the item goes into a prompt; `InvalidRequest` or `CapabilityError` where it cannot."""
        ...

    def evaluate(self, context: Context, media: Media, *, position: int, seq_id: int) -> int:
        """Encode the item and decode its embeddings into the sequence from `position` on: 0 on success."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Makes the objects a runner works with. Every object made has an owner that closes it."""

    @property
    def state_format(self) -> str:
        """Names the layout of `Context.state_get`'s bytes: states of another format are never restored."""
        ...

    @property
    def max_parallel_sequences(self) -> int:
        """The most sequences one context may hold."""
        ...

    def load_model(self, config: LoadConfig, *, gpu_layers: int, tensor_split: Sequence[float] | None) -> Model: ...

    def new_context(self, model: Model, config: LoadConfig) -> Context:
        """A context of `config.num_parallel` sequences of `config.num_ctx` tokens each, with the
        configuration's LoRA adapters applied; closing it frees them too."""
        ...

    def new_embedding_context(
        self, model: Model, config: LoadConfig, *, n_ctx: int, n_batch: int, n_seq_max: int
    ) -> EmbeddingContext:
        """A context computing embeddings for `n_seq_max` sequences sharing `n_ctx` tokens, each batch of up
        to `n_batch` tokens evaluated in one pass; raises a `LocalLLMError` for pooling it does not know."""
        ...

    def new_batch(self, capacity: int, n_seq_max: int) -> Batch: ...

    def new_projector(self, model: Model, config: LoadConfig, *, gpu_layers: int) -> Projector:
        """The projector `config.projector_path` names, for the model."""
        ...

    def new_sampler(self, model: Model, options: Options, *, grammar: str | None, n_ctx: int) -> Sampler:
        """A sampler chain for the options; raises `InvalidFormat` for a grammar it cannot parse."""
        ...

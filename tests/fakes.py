"""A fake llama.cpp behind the runner's `Backend` protocol, for the runner's unit tests.

The fake model has one token per ASCII character. Its "model" continues the alphabet: after a letter
comes the next one, after "z" the end-of-generation token, and any other character repeats forever.
Its logits say so: the successor scores 3, the end-of-generation token 2, the token after the
successor 1, every other token 0.
The fake context records every batch it is given and keeps each sequence's cached positions, checking
them as llama.cpp does; its decodes can be held at a gate, so a test can act between two steps.
The fake embedding context gives the token at position p of a sequence the embedding (token, p, 1), and
pools as the backend is told to (mean, first or last token) or not at all (Pooling.NONE).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import attrs
import numpy as np
import numpy.typing as npt

from localllm.errors import InvalidFormat, LocalLLMError
from localllm.options import Options
from localllm.runner.backend import Batch, Context, Model, Pooling
from localllm.runner.draft import Drafter
from localllm.runner.prompt_cache import PromptCache
from localllm.runner.protocol import LoadConfig, SamplingParams, ScoredText, SequenceHandle, SequenceResult
from localllm.runner.worker import Runner

EOG, BOS = 0, 1
N_VOCAB = 128
TIMEOUT = 5.0  # seconds; every wait here normally ends within milliseconds


def tokens(text: str) -> list[int]:
    return [ord(char) for char in text]


def successor(token: int) -> int:
    char = chr(token)
    if char == "z":
        return EOG
    return token + 1 if "a" <= char < "z" else token


# -- the fake backend ---------------------------------------------------------------


@attrs.define
class FakeModel:
    bos_token: int = BOS
    eos_token: int = EOG
    n_vocab: int = N_VOCAB
    n_ctx_train: int = 0
    architecture: str | None = None  # general.architecture
    closed: bool = False

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return ([BOS] if add_special else []) + tokens(text)

    def token_bytes(self, token: int) -> bytes:
        return b"" if token in (EOG, BOS) else chr(token).encode()

    def token_text(self, token: int) -> str:
        return {EOG: "</s>", BOS: "<s>"}.get(token, chr(token))

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        if any(not 0 <= token < N_VOCAB for token in tokens):
            raise LocalLLMError("token ids outside the vocabulary")

    def metadata(self, key: str) -> str | None:
        return self.architecture if key == "general.architecture" else None

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeBatch:
    capacity: int
    rows: list[tuple[int, int, int, bool]] = attrs.field(factory=list)  # (seq_id, token, pos, logits)
    closed: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.rows)

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        if len(self.rows) >= self.capacity:
            raise IndexError("batch is full")
        self.rows.append((seq_id, token, pos, logits))
        return len(self.rows) - 1

    def clear(self) -> None:
        self.rows.clear()

    def close(self) -> None:
        self.closed = True


@attrs.frozen
class Decoded:
    """One batch as the runner handed it to decode, with the status decode returned."""

    rows: tuple[tuple[int, int, int, bool], ...]
    status: int

    def __str__(self) -> str:
        """Like "0:d@3* 1:n@0": sequence, token, position, and * where logits were asked for."""
        return " ".join(f"{seq}:{chr(token)}@{pos}{'*' if logits else ''}" for seq, token, pos, logits in self.rows)


@attrs.define
class FakeContext:
    n_ctx_seq: int
    n_batch: int
    n_seq_max: int
    decoded: list[Decoded] = attrs.field(factory=list)
    kv: dict[int, dict[int, int]] = attrs.field(factory=dict)  # seq_id -> position -> token
    removals: list[tuple[int, int]] = attrs.field(factory=list)  # seq_rm calls
    copies: list[tuple[int, int]] = attrs.field(factory=list)  # seq_cp calls
    shifts: list[tuple[int, int, int]] = attrs.field(factory=list)  # shift calls: (seq_id, keep, discard)
    restores: list[int] = attrs.field(factory=list)  # state_set calls
    statuses: deque[int] = attrs.field(factory=deque)  # what the next decodes return (then 0)
    held: threading.Event = attrs.field(factory=threading.Event)  # set while a decode waits at the gate
    logit_reads: int = 0
    closed: bool = False
    _open: threading.Event = attrs.field(factory=threading.Event)

    def __attrs_post_init__(self) -> None:
        self._open.set()

    def hold(self) -> None:
        """Make the next decode wait until `release`."""
        self._open.clear()

    def release(self) -> None:
        self.held.clear()
        self._open.set()

    @property
    def last(self) -> Decoded:
        return next(d for d in reversed(self.decoded) if d.status == 0)

    def decode(self, batch: Batch) -> int:
        assert isinstance(batch, FakeBatch)
        if not self._open.is_set():
            self.held.set()
            if not self._open.wait(TIMEOUT):
                raise AssertionError("the test never released the decode gate")
        rows = tuple(batch.rows)
        ends = {seq: max(cells, default=-1) for seq, cells in self.kv.items()}
        for seq, token, pos, _ in rows:  # llama.cpp's own checks: each sequence continues where it ends
            assert 0 <= seq < self.n_seq_max and 0 <= token < N_VOCAB and pos < self.n_ctx_seq
            assert pos == ends.get(seq, -1) + 1, f"sequence {seq} continues at {pos}, not after {ends.get(seq)}"
            ends[seq] = pos
        status = self.statuses.popleft() if self.statuses else 0
        self.decoded.append(Decoded(rows, status))
        if status == 0:
            for seq, token, pos, _ in rows:
                self.kv.setdefault(seq, {})[pos] = token
        return status

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        _, token, _, logits = self.last.rows[index]
        assert logits, f"logits read at batch index {index}, which has none"
        self.logit_reads += 1
        values = np.zeros(N_VOCAB, dtype=np.float32)
        following = successor(token)
        values[EOG] = 2.0
        values[(following + 1) % N_VOCAB] = 1.0
        values[following] = 3.0
        return values

    def seq_rm(self, seq_id: int, p0: int) -> bool:
        self.removals.append((seq_id, p0))
        cells = self.kv.get(seq_id, {})
        for pos in [pos for pos in cells if pos >= p0]:
            del cells[pos]
        return True

    def shift(self, seq_id: int, keep: int, discard: int) -> bool:
        self.shifts.append((seq_id, keep, discard))
        cells = self.kv.get(seq_id, {})
        assert 0 <= keep and 1 <= discard and keep + discard <= len(cells), "a shift past the sequence's end"
        self.kv[seq_id] = {
            pos if pos < keep else pos - discard: token
            for pos, token in cells.items()
            if not keep <= pos < keep + discard
        }
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        return min(self.kv.get(seq_id) or [-1])

    def seq_cp(self, src: int, dst: int) -> bool:
        self.copies.append((src, dst))
        self.kv[dst] = dict(self.kv.get(src, {}))
        return True

    def state_get(self, seq_id: int) -> bytes:
        return json.dumps(sorted(self.kv.get(seq_id, {}).items())).encode()

    def state_set(self, seq_id: int, state: bytes) -> bool:
        self.restores.append(seq_id)
        self.kv[seq_id] = {pos: token for pos, token in json.loads(state)}
        return True

    def cached(self, seq_id: int) -> str:
        cells = self.kv.get(seq_id, {})
        return "".join(chr(cells[pos]) for pos in sorted(cells))

    def close(self) -> None:
        self.closed = True


def token_vector(token: int, pos: int) -> npt.NDArray[np.float32]:
    """The fake embedding of a token at a position in its sequence."""
    return np.array([token, pos, 1.0], dtype=np.float32)


@attrs.define
class FakeEmbeddingContext:
    n_batch: int
    n_seq_max: int
    pooling: Pooling
    n_embd: int = 3
    decoded: list[Decoded] = attrs.field(factory=list)
    statuses: deque[int] = attrs.field(factory=deque)  # what the next decodes return (then 0)
    held: threading.Event = attrs.field(factory=threading.Event)  # set while a decode waits at the gate
    closed: bool = False
    _open: threading.Event = attrs.field(factory=threading.Event)

    def __attrs_post_init__(self) -> None:
        self._open.set()

    def hold(self) -> None:
        """Make the next decode wait until `release`."""
        self._open.clear()

    def release(self) -> None:
        self.held.clear()
        self._open.set()

    @property
    def last(self) -> Decoded:
        return next(d for d in reversed(self.decoded) if d.status == 0)

    def sequences(self, decoded: Decoded) -> dict[int, list[int]]:
        """The tokens of each sequence in one decoded batch."""
        found: dict[int, list[int]] = {}
        for seq, token, _, _ in decoded.rows:
            found.setdefault(seq, []).append(token)
        return found

    def decode(self, batch: Batch) -> int:
        assert isinstance(batch, FakeBatch)
        if not self._open.is_set():
            self.held.set()
            if not self._open.wait(TIMEOUT):
                raise AssertionError("the test never released the decode gate")
        rows = tuple(batch.rows)
        assert 0 < len(rows) <= self.n_batch
        ends: dict[int, int] = {}
        for seq, token, pos, logits in rows:  # whole sequences, each from position 0, every token's output kept
            assert 0 <= seq < self.n_seq_max and 0 <= token < N_VOCAB and logits
            assert pos == ends.get(seq, -1) + 1, f"sequence {seq} continues at {pos}, not after {ends.get(seq)}"
            ends[seq] = pos
        status = self.statuses.popleft() if self.statuses else 0
        self.decoded.append(Decoded(rows, status))
        return status

    def pooled(self, seq_id: int) -> npt.NDArray[np.float32]:
        assert self.pooling != Pooling.NONE, "a pooled vector read from a context that does not pool"
        vectors = [token_vector(token, pos) for seq, token, pos, _ in self.last.rows if seq == seq_id]
        assert vectors, f"sequence {seq_id} is not in the last batch"
        if self.pooling == Pooling.CLS:
            return vectors[0]
        if self.pooling == Pooling.LAST:
            return vectors[-1]
        return np.mean(vectors, axis=0).astype(np.float32)

    def token_embedding(self, index: int) -> npt.NDArray[np.float32]:
        _, token, pos, _ = self.last.rows[index]
        return token_vector(token, pos)

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeSampler:
    accepted: list[int] = attrs.field(factory=list)
    closed: bool = False

    def sample(self, context: Context, index: int) -> int:
        assert isinstance(context, FakeContext)
        _, token, _, logits = context.last.rows[index]
        assert logits, f"sampled at batch index {index}, which has no logits"
        following = successor(token)
        self.accepted.append(following)
        return following

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


@attrs.define
class FakeBackend:
    fail_at: str | None = None  # "context" or "batch": that step of loading raises
    model: FakeModel = attrs.field(factory=FakeModel)
    contexts: list[FakeContext] = attrs.field(factory=list)
    batches: list[FakeBatch] = attrs.field(factory=list)
    samplers: list[FakeSampler] = attrs.field(factory=list)
    state_format: str = "fake"
    max_parallel_sequences: int = 64
    pooling: Pooling = Pooling.MEAN  # how embedding contexts pool
    embedding_contexts: list[FakeEmbeddingContext] = attrs.field(factory=list)

    @property
    def context(self) -> FakeContext:
        return self.contexts[-1]

    def load_model(self, config: LoadConfig, *, gpu_layers: int, tensor_split: Sequence[float] | None) -> FakeModel:
        return self.model

    def new_context(self, model: Model, config: LoadConfig) -> FakeContext:
        if self.fail_at == "context":
            raise LocalLLMError("no room for the context")
        self.contexts.append(FakeContext(config.num_ctx, config.num_batch, config.num_parallel))
        return self.context

    @property
    def embedding_context(self) -> FakeEmbeddingContext:
        return self.embedding_contexts[-1]

    def new_embedding_context(
        self, model: Model, config: LoadConfig, *, n_ctx: int, n_batch: int, n_seq_max: int
    ) -> FakeEmbeddingContext:
        if self.fail_at == "context":
            raise LocalLLMError("no room for the context")
        assert n_ctx % n_seq_max == 0 and n_batch % n_seq_max == 0, "llama.cpp splits both evenly over the slots"
        self.embedding_contexts.append(FakeEmbeddingContext(n_batch, n_seq_max, self.pooling))
        return self.embedding_context

    def new_batch(self, capacity: int, n_seq_max: int) -> FakeBatch:
        if self.fail_at == "batch":
            raise LocalLLMError("no room for the batch")
        self.batches.append(FakeBatch(capacity))
        return self.batches[-1]

    def new_sampler(self, model: Model, options: Options, *, grammar: str | None, n_ctx: int) -> FakeSampler:
        if grammar == "unparseable":
            raise InvalidFormat("the output grammar could not be parsed")
        self.samplers.append(FakeSampler())
        return self.samplers[-1]


# -- helpers ------------------------------------------------------------------------


@contextmanager
def serving(
    prompt_cache: PromptCache | None = None, drafter: Drafter | None = None, **config: Any
) -> Iterator[tuple[Runner, FakeBackend]]:
    """A runner on a fresh fake backend, closed afterwards."""
    backend = FakeBackend()
    runner = Runner(LoadConfig("fake.gguf", **config), backend=backend, prompt_cache=prompt_cache, drafter=drafter)
    try:
        yield runner, backend
    finally:
        backend.context.release()
        runner.close()


def params(
    grammar: str | None = None,
    *,
    logprobs: bool = False,
    top_logprobs: int = 0,
    truncate: bool = True,
    shift: bool = True,
    **options: Any,
) -> SamplingParams:
    return SamplingParams(
        Options(**options),
        grammar=grammar,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        truncate=truncate,
        shift=shift,
    )


async def reply(handle: SequenceHandle) -> tuple[str, SequenceResult]:
    """Everything a sequence produced: its text and its result (or the error it failed with)."""
    text = ""
    with anyio.fail_after(TIMEOUT):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return text, item
                text += item if isinstance(item, str) else item.text


async def scored_reply(handle: SequenceHandle) -> tuple[list[ScoredText], SequenceResult]:
    """Everything a sequence that asked for logprobs produced: its pieces of scored text, and its result."""
    pieces = []
    with anyio.fail_after(TIMEOUT):
        while True:
            for item in await handle.mailbox.get_all():
                if isinstance(item, LocalLLMError):
                    raise item
                if isinstance(item, SequenceResult):
                    return pieces, item
                assert isinstance(item, ScoredText), f"plain text {item!r} from a sequence that asked for logprobs"
                pieces.append(item)


async def held(context: FakeContext | FakeEmbeddingContext) -> None:
    """Wait until the worker is inside a decode, held at the gate."""
    assert await anyio.to_thread.run_sync(context.held.wait, TIMEOUT)

"""Fake llama.cpps behind the runner's `Backend` protocol: `FakeBackend` for the runner's unit tests, and
`ScriptedBackend` (at the end) for whole-engine tests.

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

import functools
import json
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import attrs
import numpy as np
import numpy.typing as npt

from localllm.errors import InvalidFormat, InvalidRequest, LocalLLMError
from localllm.gguf.inspect import GGUFInfo
from localllm.options import Options
from localllm.runner.backend import Batch, Context, Model, Pooling
from localllm.runner.draft import Drafter
from localllm.runner.prompt_cache import PromptCache
from localllm.runner.protocol import (
    LoadConfig,
    MediaLayout,
    SamplingParams,
    ScoredText,
    SequenceHandle,
    SequenceResult,
)
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


def _opened() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


@attrs.define
class Gate:
    """A gate the fake's work waits at while it is held, so a test can act between two steps."""

    held: threading.Event = attrs.field(factory=threading.Event, kw_only=True)  # set while work waits at it
    _open: threading.Event = attrs.field(factory=_opened, kw_only=True)

    def hold(self) -> None:
        """Make the next piece of work (a decode, an image's evaluation) wait until `release`."""
        self._open.clear()

    def release(self) -> None:
        self.held.clear()
        self._open.set()

    def wait_at_gate(self) -> None:
        if not self._open.is_set():
            self.held.set()
            if not self._open.wait(TIMEOUT):
                raise AssertionError("the test never released the gate")


@attrs.define
class FakeContext(Gate):
    n_ctx_seq: int
    n_batch: int
    n_seq_max: int
    decoded: list[Decoded] = attrs.field(factory=list)
    kv: dict[int, dict[int, int]] = attrs.field(factory=dict)  # seq_id -> position -> token
    removals: list[tuple[int, int]] = attrs.field(factory=list)  # seq_rm calls
    copies: list[tuple[int, int]] = attrs.field(factory=list)  # seq_cp calls
    shifts: list[tuple[int, int, int]] = attrs.field(factory=list)  # shift calls: (seq_id, keep, discard)
    restores: list[int] = attrs.field(factory=list)  # state_set calls
    failing_restores: str | None = None  # how state_set fails: "refuse" (returns False) or "raise"; None: it does not
    statuses: deque[int] = attrs.field(factory=deque)  # what the next decodes return (then 0)
    logit_reads: int = 0
    closed: bool = False

    @property
    def last(self) -> Decoded:
        return next(d for d in reversed(self.decoded) if d.status == 0)

    def decode(self, batch: Batch) -> int:
        assert isinstance(batch, FakeBatch)
        self.wait_at_gate()
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

    def seq_pos_max(self, seq_id: int) -> int:
        return max(self.kv.get(seq_id) or [-1])

    def seq_cp(self, src: int, dst: int) -> bool:
        self.copies.append((src, dst))
        self.kv[dst] = dict(self.kv.get(src, {}))
        return True

    def state_get(self, seq_id: int) -> bytes:
        return json.dumps(sorted(self.kv.get(seq_id, {}).items())).encode()

    def state_set(self, seq_id: int, state: bytes) -> bool:
        self.restores.append(seq_id)
        if self.failing_restores == "raise":
            raise ValueError("a state this context cannot read")
        if self.failing_restores == "refuse":
            return False
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
class FakeEmbeddingContext(Gate):
    n_batch: int
    n_seq_max: int
    pooling: Pooling
    n_embd: int = 3
    decoded: list[Decoded] = attrs.field(factory=list)
    statuses: deque[int] = attrs.field(factory=deque)  # what the next decodes return (then 0)
    closed: bool = False

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
        self.wait_at_gate()
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
    projector: FakeProjector | None = None

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

    def new_projector(self, model: Model, config: LoadConfig, *, gpu_layers: int) -> FakeProjector:
        self.projector = FakeProjector()
        return self.projector

    def new_sampler(self, model: Model, options: Options, *, grammar: str | None, n_ctx: int) -> FakeSampler:
        if grammar == "unparseable":
            raise InvalidFormat("the output grammar could not be parsed")
        self.samplers.append(FakeSampler())
        return self.samplers[-1]


IMAGE_CELL = ord("#")  # what a fake projector writes into the cache for each of an image's embeddings


@attrs.define
class FakeProjector(Gate):
    """A projector that makes `image.width` embeddings of an image, between begin and end markers, at
    `width // height` positions (fewer for a taller image, as M-RoPE places them), and writes one cell per
    position into the fake context's cache; `hold` makes the next evaluation wait until `release`."""

    evaluated: list[tuple[int, int, int]] = attrs.field(factory=list)  # (seq_id, position, count)
    closed: bool = False

    def layout(self, media: Any) -> MediaLayout:
        return MediaLayout((ord("<"),), media.width, (ord(">"),), media.width // media.height)

    def evaluate(self, context: Any, media: Any, *, position: int, seq_id: int) -> int:
        self.wait_at_gate()
        cells = context.kv.setdefault(seq_id, {})
        assert position == max(cells, default=-1) + 1, "an image goes right after what the sequence holds"
        for offset in range(media.width // media.height):
            cells[position + offset] = IMAGE_CELL
        self.evaluated.append((seq_id, position, media.width))
        return 0

    def close(self) -> None:
        self.closed = True


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


# -- a scripted model for whole-engine tests ----------------------------------------

#: The reply a `ScriptedBackend` gives: a fixed text, or a function of the prompt the model was given (the
#: tokens decoded as text, special tokens written out). A reply that is `ENDLESS` never ends.
Reply = str | Callable[[str], str]
ENDLESS = "\0endless"
_EOG_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|return|>", "<|call|>")
_CONTROL = 3  # GGUF token type of a control token


class ScriptedModel:
    """A real GGUF's metadata, chat template and special tokens, with a byte-level tokenizer of its own.

    Tokens 0-255 are the bytes of UTF-8 text; the file's control tokens (`<|im_start|>`, ...) follow from
    256 on, so text round-trips through tokenize and detokenize exactly, with special tokens parsed out
    of it as llama.cpp parses them. No weights are read.
    """

    def __init__(self, path: str) -> None:
        info = _gguf_info(path, os.stat(path).st_mtime_ns)
        self._metadata = info.metadata
        vocab: list[str] = info.get("tokenizer.ggml.tokens", [])
        types: list[int] = info.get("tokenizer.ggml.token_type", [])
        self.specials = [text for text, kind in zip(vocab, types, strict=False) if kind == _CONTROL]
        self._special_ids = {text: 256 + i for i, text in enumerate(self.specials)}
        # Longest first, so a special token is never cut short by another that starts it.
        names = sorted(self.specials, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.bos_token = self._mapped(info.get("tokenizer.ggml.bos_token_id"))
        self.eos_token = self._mapped(info.get("tokenizer.ggml.eos_token_id"))
        self._add_bos = bool(info.get("tokenizer.ggml.add_bos_token", False))
        self._eog = {self.eos_token, self._mapped(info.get("tokenizer.ggml.eot_token_id"))} - {-1}
        self._eog |= {self._special_ids[name] for name in _EOG_NAMES if name in self._special_ids}
        self.n_vocab = 256 + len(self.specials)
        self.closed = False

    def _mapped(self, file_id: object) -> int:
        """This tokenizer's id for a token id of the file's vocabulary (-1 for none, or not a control token)."""
        vocab: list[str] = self._metadata.get("tokenizer.ggml.tokens", [])
        if not isinstance(file_id, int) or not 0 <= file_id < len(vocab):
            return -1
        return self._special_ids.get(vocab[file_id], -1)

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        result = [self.bos_token] if add_special and self._add_bos and self.bos_token >= 0 else []
        parts = self._splitter.split(text) if parse_special and self._splitter else [text]
        for part in parts:
            special = self._special_ids.get(part) if parse_special else None
            result.extend([special] if special is not None else part.encode())
        return result

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text with special tokens written out: what the model was shown."""
        data = b"".join(self.token_text(t).encode() if t >= 256 else bytes([t]) for t in tokens)
        return data.decode(errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if 0 <= token < 256 else b""  # control tokens have no text of their own

    def token_text(self, token: int) -> str:
        if 0 <= token < 256:
            return bytes([token]).decode(errors="replace")
        return self.specials[token - 256] if 256 <= token < self.n_vocab else ""

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        bad = [t for t in tokens if not 0 <= t < self.n_vocab]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary of {self.n_vocab}")

    def metadata(self, key: str) -> str | None:
        value = self._metadata.get(key)
        if value is None or isinstance(value, list):
            return None
        return ("true" if value else "false") if isinstance(value, bool) else str(value)

    def close(self) -> None:
        self.closed = True


@functools.lru_cache(maxsize=8)
def _gguf_info(path: str, _mtime_ns: int) -> GGUFInfo:
    """A model file's metadata, read once per test run (its vocabulary takes a while to parse)."""
    from localllm.gguf import read_info

    return read_info(path)


@attrs.define
class _Replying:
    """A sequence's reply, once its prompt is evaluated: the position of its prompt's last token, and the tokens."""

    start: int
    tokens: list[int] | None  # None: endless


@attrs.define
class ScriptedContext(Gate):
    """A KV cache of token ids whose "model" gives each sequence the backend's reply to its prompt.

    The logits at a position favour the reply's next token (10 against 0 for every other token), then the
    end-of-sequence token; a greedy sampler reads them back. Decodes can be held at a gate, as
    `FakeContext`'s.
    """

    model: ScriptedModel
    backend: ScriptedBackend
    n_ctx_seq: int
    n_batch: int
    n_seq_max: int
    decoded: list[Decoded] = attrs.field(factory=list)
    kv: dict[int, dict[int, int]] = attrs.field(factory=dict)  # seq_id -> position -> token
    replies: dict[int, _Replying] = attrs.field(factory=dict)
    closed: bool = False
    _holding_after: int | None = None  # decodes to let through before the gate closes; None: leave it

    def hold(self, after: int = 0) -> None:
        """Make the decode after the next `after` ones wait until `release` (call it before they can start)."""
        self._holding_after = after

    @property
    def last(self) -> Decoded:
        return next(d for d in reversed(self.decoded) if d.status == 0)

    def decode(self, batch: Batch) -> int:
        assert isinstance(batch, FakeBatch)
        if self._holding_after is not None:
            if self._holding_after == 0:
                self._open.clear()
                self._holding_after = None
            else:
                self._holding_after -= 1
        self.wait_at_gate()
        rows = tuple(batch.rows)
        ends = {seq: max(cells, default=-1) for seq, cells in self.kv.items()}
        for seq, token, pos, _ in rows:  # llama.cpp's own checks: each sequence continues where it ends
            assert 0 <= seq < self.n_seq_max and 0 <= token < self.model.n_vocab and pos < self.n_ctx_seq
            assert pos == ends.get(seq, -1) + 1, f"sequence {seq} continues at {pos}, not after {ends.get(seq)}"
            ends[seq] = pos
        self.decoded.append(Decoded(rows, 0))
        for seq, token, pos, _ in rows:
            self.kv.setdefault(seq, {})[pos] = token
        return 0

    def start_reply(self, index: int) -> None:
        """The prompt of the sequence at batch position `index` ends there: ask the backend for its reply."""
        seq, _, pos, _ = self.last.rows[index]
        cells = self.kv[seq]
        prompt = self.model.detokenize([cells[p] for p in sorted(cells) if p <= pos])
        text = self.backend.reply_to(prompt)
        tokens = None if text == ENDLESS else self.model.tokenize(text, add_special=False, parse_special=True)
        self.replies[seq] = _Replying(pos, tokens)

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        seq, _, pos, logits = self.last.rows[index]
        assert logits, f"logits read at batch index {index}, which has none"
        reply = self.replies[seq]
        step = pos - reply.start
        if reply.tokens is None:
            following = ord("ab"[step % 2])
        else:
            following = reply.tokens[step] if step < len(reply.tokens) else self.model.eos_token
        values = np.zeros(self.model.n_vocab, dtype=np.float32)
        values[following] = 10.0
        return values

    def seq_rm(self, seq_id: int, p0: int) -> bool:
        cells = self.kv.get(seq_id, {})
        for pos in [pos for pos in cells if pos >= p0]:
            del cells[pos]
        return True

    def shift(self, seq_id: int, keep: int, discard: int) -> bool:
        cells = self.kv.get(seq_id, {})
        self.kv[seq_id] = {
            pos if pos < keep else pos - discard: token
            for pos, token in cells.items()
            if not keep <= pos < keep + discard
        }
        if seq_id in self.replies:  # the reply goes on where it was: its positions moved back with the rest
            self.replies[seq_id].start -= discard
        return True

    def seq_pos_min(self, seq_id: int) -> int:
        return min(self.kv.get(seq_id) or [-1])

    def seq_pos_max(self, seq_id: int) -> int:
        return max(self.kv.get(seq_id) or [-1])

    def seq_cp(self, src: int, dst: int) -> bool:
        self.kv[dst] = dict(self.kv.get(src, {}))
        return True

    def state_get(self, seq_id: int) -> bytes:
        return json.dumps(sorted(self.kv.get(seq_id, {}).items())).encode()

    def state_set(self, seq_id: int, state: bytes) -> bool:
        self.kv[seq_id] = {pos: token for pos, token in json.loads(state)}
        return True

    def close(self) -> None:
        self.closed = True


@attrs.define
class GreedySampler:
    """Chooses the most likely token; on its first call, where the prompt ends, the model starts its reply."""

    grammar: str | None
    started: bool = False
    accepted: list[int] = attrs.field(factory=list)
    closed: bool = False

    def sample(self, context: Context, index: int) -> int:
        assert isinstance(context, ScriptedContext)
        if not self.started:
            context.start_reply(index)
            self.started = True
        return int(np.argmax(context.logits(index)))

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


@attrs.define
class ScriptedBackend:
    """A fake llama.cpp for whole-engine tests: the model file's metadata is real, the compute a script.

    Give it to `Engine(backend=...)`: every text model then replies with `reply` (a text, or a function of
    the prompt), so a test drives the registry, templates, scheduler, request pipeline and parsers end to
    end with a reply it chose. It records every prompt it saw and the grammar each sampler was given.
    """

    reply: Reply = ""
    prompts: list[str] = attrs.field(factory=list)
    grammars: list[str | None] = attrs.field(factory=list)
    models: list[ScriptedModel] = attrs.field(factory=list)
    contexts: list[ScriptedContext] = attrs.field(factory=list)
    state_format: str = "scripted"

    @property
    def context(self) -> ScriptedContext:
        return self.contexts[-1]

    def reply_to(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.reply(prompt) if callable(self.reply) else self.reply

    def load_model(self, config: LoadConfig, *, gpu_layers: int, tensor_split: Sequence[float] | None) -> ScriptedModel:
        self.models.append(ScriptedModel(config.model_path))
        return self.models[-1]

    def new_context(self, model: Model, config: LoadConfig) -> ScriptedContext:
        assert isinstance(model, ScriptedModel)
        self.contexts.append(ScriptedContext(model, self, config.num_ctx, config.num_batch, config.num_parallel))
        return self.context

    def new_batch(self, capacity: int, n_seq_max: int) -> FakeBatch:
        return FakeBatch(capacity)

    def new_sampler(self, model: Model, options: Options, *, grammar: str | None, n_ctx: int) -> GreedySampler:
        self.grammars.append(grammar)
        return GreedySampler(grammar)

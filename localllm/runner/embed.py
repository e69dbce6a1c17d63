"""The embedding runner: one worker thread per loaded embedding model, packing many inputs into each batch.

A request is a list of token sequences. The worker takes waiting sequences in
order and puts as many as fit (up to the context's sequence slots and batch
size) into one batch as separate sequences, runs the model once, and reads one
pooled vector per sequence: pooled by llama.cpp as the GGUF says (mean, CLS or
last token), or here when the model has no pooling (the mean over the tokens,
as for a text generation model asked to embed). Vectors are
L2-normalised unless the request asks for raw ones. A request whose inputs
span several batches gets its answer when its last input is done.

The model, context and batch come from a `Backend`: llama.cpp's by default, a
fake in the unit tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import CapabilityError, ContextLengthExceeded, EngineClosed, LocalLLMError, RunnerError
from ..gguf.architectures import ENCODER_ARCHITECTURES
from .backend import Backend, Pooling
from .mailbox import Mailbox
from .protocol import LoadConfig
from .threads import WorkerThread

__all__ = ["EmbedHandle", "EmbedResult", "EmbeddingRunner"]

logger = logging.getLogger("localllm.runner")

#: Sequences packed into one batch for encoders (they cost no KV cache, so many fit).
ENCODER_MAX_SEQUENCES = 64

#: An input placed in the batch: its request, its index there, its sequence id and its first batch position.
Placed = tuple["EmbedHandle", int, int, int]


@attrs.frozen
class EmbedResult:
    """The vectors of one request, in input order, with Ollama's counters (durations in ns)."""

    embeddings: list[list[float]]
    prompt_eval_count: int
    prompt_eval_duration: int


class EmbedHandle:
    """The coroutine's side of one embedding request."""

    def __init__(self, runner: EmbeddingRunner, inputs: list[list[int]], normalize: bool) -> None:
        self.runner = runner
        self.inputs = inputs
        self.normalize = normalize
        # Items: EmbedResult (done) or LocalLLMError (failed).
        self.mailbox: Mailbox[EmbedResult | LocalLLMError] = Mailbox()
        self.cancelled = threading.Event()
        self.finished = False
        # Worker-side state.
        self._vectors: list[list[float] | None] = [None] * len(inputs)
        self._next = 0  # first input not yet put in a batch
        self._done = 0
        self._started: float | None = None

    async def result(self) -> EmbedResult:
        """Wait for the vectors (raises the runner's error if it failed)."""
        items = await self.mailbox.get_all()
        item = items[0]
        if isinstance(item, EmbedResult):
            return item
        raise item

    def cancel(self) -> None:
        """Drop the request: inputs not yet in a batch are never computed. Safe from any thread."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.runner._withdraw(self)


def _l2_normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class EmbeddingRunner:
    """One loaded embedding model and the thread that serves it. Create it in a worker thread (loading blocks)."""

    def __init__(
        self,
        config: LoadConfig,
        *,
        gpu_layers: int = 0,
        tensor_split: tuple[float, ...] | None = None,
        backend: Backend | None = None,
    ) -> None:
        if backend is None:
            from .llama import LlamaBackend  # imports llama_cpp

            backend = LlamaBackend()
        self.config = config
        self.backend = backend
        self.model = backend.load_model(config, gpu_layers=gpu_layers, tensor_split=tensor_split)
        try:
            self.architecture = self.model.metadata("general.architecture") or ""
            self.encoder = self.architecture in ENCODER_ARCHITECTURES
            train_ctx = self.model.n_ctx_train
            # Position embeddings end at the training context: never run past it.
            self.n_ctx_seq: int = min(config.num_ctx, train_ctx) if train_ctx > 0 else config.num_ctx
            limit = backend.max_parallel_sequences
            self.n_seq_max = min(ENCODER_MAX_SEQUENCES, limit) if self.encoder else max(1, config.num_parallel)
            # A whole input must fit in one batch: its pooled vector is computed in one pass.
            n_batch = max(config.num_batch, self.n_ctx_seq)
            # llama.cpp splits a batch evenly over the sequence slots when it sizes its graph (and aborts
            # the process if it cannot): keep the batch a multiple of the slot count.
            n_batch = -(-n_batch // self.n_seq_max) * self.n_seq_max
            self.context = backend.new_embedding_context(
                self.model, config, n_ctx=self.n_ctx_seq * self.n_seq_max, n_batch=n_batch, n_seq_max=self.n_seq_max
            )
        except BaseException:
            self.model.close()
            raise
        try:
            self.n_batch = self.context.n_batch
            self.pooling = self.context.pooling
            if self.pooling == Pooling.RANK:
                raise CapabilityError(f"{config.model_path} is a reranking model; it does not produce embeddings")
            self.n_embd = self.context.n_embd
            self._special_tail = self._find_special_tail()
            self.batch = backend.new_batch(self.n_batch, self.n_seq_max)
        except BaseException:
            self.context.close()
            self.model.close()
            raise
        self._pending: deque[EmbedHandle] = deque()
        self._in_flight: list[EmbedHandle] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._closed = False
        self.failure: str | None = None  # why the worker died, once it has
        self._worker = WorkerThread(self._run, f"localllm-embed-{id(self):x}", self._cond)
        logger.debug(
            "embedding runner for %s: %s pooling, %d dims, %d sequences of up to %d tokens per batch of %d",
            config.model_path,
            self.pooling.name.lower(),
            self.n_embd,
            self.n_seq_max,
            self.n_ctx_seq,
            self.n_batch,
        )

    def _find_special_tail(self) -> list[int]:
        """Tokens the tokenizer appends to every input (BERT's [SEP], an EOS): kept when truncating."""
        probe = "hello world"
        plain = self.tokenize(probe, add_special=False)
        full = self.tokenize(probe, add_special=True)
        for start in range(len(full) - len(plain) + 1):
            if plain and full[start : start + len(plain)] == plain:
                return full[start + len(plain) :]
        return []

    # -- the coroutine side -------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._in_flight)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or bool(self._in_flight)

    @property
    def prompt_cache_bytes(self) -> int:
        return 0  # embeddings are computed whole each time

    @property
    def pid(self) -> int | None:
        return None  # embedding runners always run in this process

    @property
    def healthy(self) -> bool:
        """False once the worker thread has died: the scheduler replaces such a runner."""
        return self.failure is None and (self._worker.alive or not self._worker.started)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def truncate(self, tokens: list[int], limit: int | None = None) -> list[int]:
        """Cut `tokens` to `limit` (default: the context), keeping the tokenizer's closing special tokens."""
        limit = self.n_ctx_seq if limit is None else limit
        if len(tokens) <= limit:
            return tokens
        tail = self._special_tail
        if tail and len(tail) < limit and tokens[-len(tail) :] == tail:
            return tokens[: limit - len(tail)] + tail
        return tokens[:limit]

    def submit_embed(self, inputs: Sequence[Sequence[int]], *, normalize: bool = True) -> EmbedHandle:
        """Queue token sequences for embedding. Call from the event loop (the handle's mailbox binds to it)."""
        if self.failure is not None:
            raise RunnerError(f"the embedding runner failed: {self.failure}; retry to load it again")
        if self._stopping:
            raise EngineClosed("this model has been unloaded")
        prepared = [list(tokens) for tokens in inputs]
        if not prepared:
            raise LocalLLMError("nothing to embed")
        for i, tokens in enumerate(prepared):
            if not tokens:
                raise LocalLLMError(f"input {i} is empty after tokenization")
            if len(tokens) > self.n_ctx_seq:
                raise ContextLengthExceeded(
                    f"input {i} has {len(tokens)} tokens but the context holds {self.n_ctx_seq}; "
                    "shorten it or let it be truncated"
                )
            self.model.check_token_ids(tokens)
        handle = EmbedHandle(self, prepared, normalize)
        with self._cond:
            self._pending.append(handle)
            self._worker.wake()
        return handle

    def _withdraw(self, handle: EmbedHandle) -> None:
        with self._cond:
            try:
                self._pending.remove(handle)
            except ValueError:
                return  # in a batch now: the worker drops it when that batch is done
        handle.finished = True

    def close(self) -> None:
        """Stop the worker, fail what is still queued, and free the batch, the context and the model."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._stopping = True
            self._cond.notify_all()
        self._worker.join()
        closed = EngineClosed("the model was unloaded before this request finished")
        for handle in list(self._pending) + self._in_flight:
            if not handle.finished:
                handle.finished = True
                handle.mailbox.put(closed)
        self._pending.clear()
        self._in_flight = []
        self.batch.close()
        self.context.close()
        self.model.close()

    # -- the worker thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._worker.wait(lambda: self._stopping or bool(self._pending)):
                        return  # idle: the thread ends, and with it llama.cpp's OpenMP team (see `threads`)
                    if self._stopping:
                        return
                    placed = self._fill_batch()
                if placed:
                    self._step(placed)
        except BaseException as exc:  # never let the thread die silently
            logger.exception("embedding runner thread failed")
            self.failure = str(exc) or type(exc).__name__
            error = RunnerError(f"the embedding runner failed: {self.failure}; retry to load it again")
            with self._cond:
                self._stopping = True
                for handle in list(self._pending) + self._in_flight:
                    if not handle.finished:
                        handle.finished = True
                        handle.mailbox.put(error)
                self._pending.clear()
                self._in_flight = []

    def _fill_batch(self) -> list[Placed]:
        """Put waiting inputs into the batch, in order, as far as it has room (called with the lock held).

        Returns (handle, input index, sequence id, first batch position) for every input placed.
        """
        batch = self.batch
        batch.clear()
        placed: list[Placed] = []
        while self._pending:
            handle = self._pending[0]
            if handle.cancelled.is_set():
                self._pending.popleft()
                handle.finished = True
                continue
            tokens = handle.inputs[handle._next]
            if len(placed) >= self.n_seq_max or batch.n_tokens + len(tokens) > batch.capacity:
                break
            seq_id = len(placed)
            start = batch.n_tokens
            for pos, token in enumerate(tokens):
                batch.add(token, pos, seq_id, True)  # every token feeds the pool, llama.cpp's or ours
            placed.append((handle, handle._next, seq_id, start))
            if handle._started is None:
                handle._started = time.perf_counter()
            if handle not in self._in_flight:
                self._in_flight.append(handle)
            handle._next += 1
            if handle._next == len(handle.inputs):
                self._pending.popleft()
        return placed

    def _step(self, placed: list[Placed]) -> None:
        status = self.context.decode(self.batch)
        if status != 0:
            self._fail(
                [h for h, _, _, _ in placed], RunnerError(f"the embedding batch failed (decode status {status})")
            )
            return
        for handle, index, seq_id, start in placed:
            vector = self._pooled(seq_id, start, len(handle.inputs[index]))
            handle._vectors[index] = (_l2_normalize(vector) if handle.normalize else vector).tolist()
            handle._done += 1
        now = time.perf_counter()
        finished = {id(h): h for h, _, _, _ in placed if h._done == len(h.inputs)}
        with self._cond:
            self._in_flight = [h for h in self._in_flight if id(h) not in finished]
        for handle in finished.values():
            if handle.finished:
                continue
            handle.finished = True
            vectors = [v for v in handle._vectors if v is not None]
            handle.mailbox.put(
                EmbedResult(
                    embeddings=vectors,
                    prompt_eval_count=sum(len(t) for t in handle.inputs),
                    prompt_eval_duration=int((now - (handle._started or now)) * 1e9),
                )
            )
        # Cancelled requests whose inputs were partly computed leave the in-flight list here.
        with self._cond:
            dropped = [h for h in self._in_flight if h.cancelled.is_set() and h not in self._pending]
            self._in_flight = [h for h in self._in_flight if h not in dropped]
        for handle in dropped:
            handle.finished = True

    def _pooled(self, seq_id: int, start: int, length: int) -> npt.NDArray[np.float32]:
        if self.pooling != Pooling.NONE:
            return self.context.pooled(seq_id)
        # No pooling in the model (a text generation model): the mean of its tokens' hidden states.
        total = np.zeros(self.n_embd, dtype=np.float64)
        for i in range(start, start + length):
            total += self.context.token_embedding(i)
        return (total / length).astype(np.float32)

    def _fail(self, handles: list[EmbedHandle], error: LocalLLMError) -> None:
        with self._cond:
            for handle in handles:
                if handle in self._pending:
                    self._pending.remove(handle)
            self._in_flight = [h for h in self._in_flight if h not in handles]
        for handle in {id(h): h for h in handles}.values():
            if not handle.finished:
                handle.finished = True
                handle.mailbox.put(error)

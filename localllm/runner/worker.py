"""The runner: one worker thread per loaded model, serving many sequences with continuous batching.

Each step the worker admits waiting sequences into free slots, puts every
active sequence's pending tokens (the next sampled token, or a chunk of its
prompt) into one batch, decodes once, and samples each sequence that needs a
token with its own sampler chain. Results go to the waiting coroutine through
a `Mailbox`; the event loop never waits on llama.cpp.

With a drafter (speculative decoding), a sequence's next token goes into the batch with the tokens
drafted to follow it; the sequence keeps each drafted token its own sampler chooses, so one decode
may yield several tokens, and drops the cache entries of the rest.

The context window is handled as Ollama handles it: a prompt that leaves no room to generate is cut
(keeping its first `num_keep` tokens), and a sequence whose next token would not fit shifts its context:
it keeps `num_keep` tokens, drops half of the rest and goes on. Past the kept tokens, a shifted
sequence's entries are not what evaluating its tokens from the start would give, so they are never
reused, and are dropped once the sequence ends.

A request reuses the longest prefix of its prompt that is already evaluated:
its slot's own cache entries, another slot's (copied over), or a state saved
in the `PromptCache` when a slot's contents were about to be dropped. A saved
state is checked once restored (the positions of the tokens it claims, no
more, no fewer) and the first token after it decoded alone; one that fails is
dropped from the cache and the prompt evaluated instead.

The model, context, batch and samplers come from a `Backend`: llama.cpp's
unless another is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import CapabilityError, EngineClosed, InvalidFormat, InvalidRequest, LocalLLMError, RunnerError
from ..types import Logprob, TokenLogprob
from .backend import Backend, Model, Projector, Sampler
from .draft import Drafter, make_drafter
from .mailbox import Mailbox
from .prompt_cache import CacheHit, PromptCache
from .protocol import (
    LoadConfig,
    MediaLayout,
    MediaSpan,
    SamplingParams,
    ScoredText,
    SequenceHandle,
    SequenceResult,
    check_prompt_fits,
    cut_prompt,
    keep_count,
    locate_media,
)
from .text import StopMatcher, Utf8Stream
from .threads import WorkerThread, in_a_passing_thread

if TYPE_CHECKING:
    from ..media import Media

__all__ = ["Runner"]

logger = logging.getLogger("localllm.runner")


@attrs.define
class _Logprobs:
    """A sequence's token logprobs, each held until the text of its token has been sent.

    Positions count characters of decoded text: a token's text spans [start, end). Text held back
    (part of a character, or a possible stop sequence) holds its tokens' logprobs back with it.
    """

    top: int  # how many of the most likely tokens to report at each position
    decoded: int = 0
    sent: int = 0
    pending: deque[tuple[int, int, Logprob]] = attrs.field(factory=deque)  # (start, end, logprob)

    def add(self, logprob: Logprob, chars: int) -> None:
        self.pending.append((self.decoded, self.decoded + chars, logprob))
        self.decoded += chars

    def take(self, sent: int, *, cut: bool = False) -> tuple[Logprob, ...]:
        """The logprobs of the tokens whose text is now sent in full, after `sent` more characters.

        With `cut` (a stop sequence ended the text here), tokens partly sent count too, as in Ollama,
        and those wholly inside the stop sequence are dropped.
        """
        self.sent += sent
        taken = []
        while self.pending and (self.pending[0][1] <= self.sent or (cut and self.pending[0][0] < self.sent)):
            taken.append(self.pending.popleft()[2])
        if cut:
            self.pending.clear()
        return tuple(taken)


@attrs.define
class _Active:
    handle: SequenceHandle
    slot: _Slot
    sampler: Sampler
    prompt_pos: int  # next prompt token to evaluate
    num_predict: int
    num_keep: int = 0  # leading tokens a context shift keeps
    logprobs: _Logprobs | None = None  # None unless the request asked for logprobs
    utf8: Utf8Stream = attrs.field(factory=Utf8Stream)
    stops: StopMatcher = attrs.field(factory=lambda: StopMatcher(()))
    next_token: int | None = None
    batch_index: int | None = None
    generated: list[int] = attrs.field(factory=list)
    prompt_evaluated: int = 0
    started: float = attrs.field(factory=time.perf_counter)
    first_token_at: float | None = None
    draft: list[int] = attrs.field(factory=list)  # tokens drafted after next_token, in the batch right behind it
    draft_count: int = 0
    draft_accepted_count: int = 0


@attrs.define
class _Slot:
    seq_id: int
    cached: list[int] = attrs.field(factory=list)  # tokens whose KV entries this sequence holds
    active: _Active | None = None
    last_used: float = 0.0
    # After a context shift: how many leading entries are still what evaluating `cached` would give.
    plain: int | None = None
    # Positions past entries: where a projector places an image at fewer positions than it has embeddings
    # (M-RoPE), the next entry's position is len(cached) + offset.
    offset: int = 0

    @property
    def next_position(self) -> int:
        return len(self.cached) + self.offset

    @property
    def reusable(self) -> Sequence[int]:
        """The tokens whose entries a request with the same prefix may reuse."""
        return self.cached if self.plain is None else self.cached[: self.plain]


class Runner:
    """One loaded model and the thread that serves it. Create it in a worker thread (loading blocks)."""

    def __init__(
        self,
        config: LoadConfig,
        *,
        gpu_layers: int = 0,
        tensor_split: tuple[float, ...] | None = None,
        backend: Backend | None = None,
        prompt_cache: PromptCache | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        """`drafter` drafts tokens for speculative decoding (the runner closes it); by default the one the
        configuration asks for, if any."""
        if backend is None:
            from .llama import LlamaBackend  # imports llama_cpp

            backend = LlamaBackend()
        self.config = config
        self.backend = backend
        self.prompt_cache = prompt_cache
        self.cache_key = state_key(config, backend.state_format)
        with contextlib.ExitStack() as undo:  # a failed load frees what was made so far
            self.model = backend.load_model(config, gpu_layers=gpu_layers, tensor_split=tensor_split)
            undo.callback(self.model.close)
            self.context = backend.new_context(self.model, config)
            undo.callback(self.context.close)
            # Room for every slot's next token, however small num_batch is.
            self.batch = backend.new_batch(max(self.context.n_batch, config.num_parallel), config.num_parallel)
            undo.callback(self.batch.close)
            self.projector: Projector | None = None
            if config.projector_path is not None:
                model = self.model
                self.projector = in_a_passing_thread(
                    lambda: backend.new_projector(model, config, gpu_layers=gpu_layers)
                )
                undo.callback(self.projector.close)
            self._layouts: OrderedDict[bytes, MediaLayout] = OrderedDict()  # by media digest, the latest kept
            if drafter is None:
                drafter = make_drafter(backend, self.model, config, gpu_layers=gpu_layers, tensor_split=tensor_split)
            self.drafter = drafter
            self.drafted = self.drafts_accepted = 0  # tokens drafted, and of those the model chose, since loading
            undo.pop_all()
        self.slots = [_Slot(seq_id=i) for i in range(config.num_parallel)]
        self._pending: deque[SequenceHandle] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._closed = False
        self.failure: str | None = None  # why the worker died, once it has
        self._worker = WorkerThread(self._run, f"localllm-runner-{id(self):x}", self._cond)

    # -- the coroutine side -------------------------------------------------------

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one sequence may hold: num_ctx (llama.cpp may round its cache up)."""
        return min(self.config.num_ctx, self.context.n_ctx_seq)

    @property
    def prompt_cache_bytes(self) -> int:
        return self.prompt_cache.size_bytes(self.cache_key) if self.prompt_cache is not None else 0

    @property
    def pid(self) -> int | None:
        return None  # this process

    @property
    def active_count(self) -> int:
        return sum(1 for slot in self.slots if slot.active is not None)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self.active_count > 0

    @property
    def healthy(self) -> bool:
        """False once the worker thread has died: the scheduler replaces such a runner."""
        return self.failure is None and (self._worker.alive or not self._worker.started)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        tokens = self.model.tokenize(text, add_special=add_special, parse_special=True)
        # A template that writes the BOS token itself plus llama.cpp's own BOS would double it.
        if add_special and len(tokens) >= 2 and tokens[0] == tokens[1] == self.model.bos_token:
            del tokens[0]
        return tokens

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        """Raise InvalidRequest for ids outside the vocabulary (llama.cpp would abort on them)."""
        self.model.check_token_ids(tokens)

    def special_token_text(self) -> tuple[str, str]:
        """The text of the BOS and EOS tokens ("" where the model has none), for chat templates."""
        model = self.model
        bos, eos = model.bos_token, model.eos_token
        return (model.token_text(bos) if bos >= 0 else "", model.token_text(eos) if eos >= 0 else "")

    def chat_template(self) -> str | None:
        """The chat template the model file carries, if any."""
        return self.model.metadata("tokenizer.chat_template")

    def media_layout(self, media: Media) -> MediaLayout:
        """How an image or audio clip goes into this model's prompts (remembered by its content hash)."""
        if self.projector is None:
            raise CapabilityError("this model has no projector: it takes text only")
        layout = self._layouts.get(media.digest)
        if layout is None:
            layout = self.projector.layout(media)
            self._layouts[media.digest] = layout
            while len(self._layouts) > _LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        return layout

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        media: Sequence[Media] = (),
        mailbox: Mailbox[str | ScoredText | SequenceResult | LocalLLMError] | None = None,
    ) -> SequenceHandle:
        """Queue a sequence. Call from the event loop (the handle's mailbox binds to it), unless `mailbox`
        says where the sequence's items go. The prompt holds the stand-ins of each of `media`."""
        if self.failure is not None:
            raise RunnerError(f"the runner failed: {self.failure}; retry to load it again")
        if self._stopping:
            raise EngineClosed("this model has been unloaded")
        check_prompt_fits(prompt, self.n_ctx_seq, truncate=params.truncate)
        spans: tuple[MediaSpan, ...] = ()
        if media:
            layouts = [self.media_layout(item) for item in media]
            self.model.check_token_ids([token for token in prompt if token >= 0])
            # The stand-ins a cut left whole; negative ids that stand in for nothing are refused.
            prompt, spans = locate_media(self._cut(prompt, params), media, layouts)
            if spans and spans[-1].end >= len(prompt):
                raise InvalidRequest("a prompt cannot end with an image or audio clip: put text after it")
        else:
            self.model.check_token_ids(prompt)
            prompt = self._cut(prompt, params)
        handle = SequenceHandle(self, prompt, params, mailbox, spans)
        with self._cond:
            self._pending.append(handle)
            self._worker.wake()
        return handle

    def _cut(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """The prompt, cut as Ollama cuts one that leaves no room to generate."""
        if len(prompt) < self.n_ctx_seq:
            return prompt
        keep = keep_count(prompt, params.options.num_keep, self.model.bos_token, self.n_ctx_seq)
        cut = cut_prompt(prompt, self.n_ctx_seq, keep)
        logger.warning(
            "truncating the prompt: %d tokens of %d kept, the first %d among them", len(cut), len(prompt), keep
        )
        return cut

    def _withdraw(self, handle: SequenceHandle) -> None:
        with self._cond:
            try:
                self._pending.remove(handle)
            except ValueError:
                return  # already admitted: the worker drops it at its next step
        handle.finished = True

    def close(self) -> None:
        """Stop the worker, fail what is still queued, and free every llama.cpp handle."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._stopping = True
            self._cond.notify_all()
        self._worker.join()
        closed = EngineClosed("the model was unloaded before this request finished")
        for handle in self._pending:
            handle.mailbox.put(closed)
        self._pending.clear()
        for slot in self.slots:
            if slot.active is not None:
                slot.active.handle.mailbox.put(closed)
                slot.active.sampler.close()
                slot.active = None
            if self.failure is None:  # the worker has stopped: what each slot holds is what its cache holds
                with contextlib.suppress(Exception):  # saving is a courtesy: unloading must not fail on it
                    self._save(slot)
        if self.drafter is not None:
            self.drafter.close()
        if self.projector is not None:
            self.projector.close()
        self.batch.close()
        self.context.close()
        self.model.close()

    # -- the worker thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._worker.wait(self._has_work):
                        return  # idle: the thread ends, and with it llama.cpp's OpenMP team (see `threads`)
                    if self._stopping:
                        return
                    admitted = self._admit()
                for active in admitted:
                    self._prepare(active)
                self._step()
        except BaseException as exc:  # never let the thread die silently
            logger.exception("runner thread failed")
            self.failure = str(exc) or type(exc).__name__
            error = RunnerError(f"the runner failed: {self.failure}; retry to load it again")
            for slot in self.slots:
                if slot.active is not None:
                    slot.active.handle.mailbox.put(error)
                    slot.active.handle.finished = True
                    slot.active.sampler.close()
                    slot.active = None
            with self._cond:
                self._stopping = True
                for handle in self._pending:
                    handle.mailbox.put(error)
                self._pending.clear()

    def _has_work(self) -> bool:
        return self._stopping or bool(self._pending) or self.active_count > 0

    def _admit(self) -> list[_Active]:
        """Move waiting sequences into free slots (called with the lock held)."""
        admitted: list[_Active] = []
        while self._pending:
            free = [slot for slot in self.slots if slot.active is None]
            if not free:
                break
            handle = self._pending.popleft()
            # Prefer the slot that already holds the longest prefix of this prompt.
            slot = max(free, key=lambda s: (_common_prefix(s.reusable, handle.prompt), -s.last_used))
            try:
                sampler = self._make_sampler(handle.params)
            except LocalLLMError as exc:
                handle.finished = True
                handle.mailbox.put(exc)
                continue
            # As Ollama: generation without a limit (or past it) stops after ten context windows, so a
            # shifting sequence cannot run forever.
            limit = _CONTEXT_WINDOWS * self.n_ctx_seq
            num_predict = handle.params.options.num_predict
            active = _Active(
                handle=handle,
                slot=slot,
                sampler=sampler,
                prompt_pos=0,
                num_predict=num_predict if 0 <= num_predict <= limit else limit,
                num_keep=keep_count(
                    handle.prompt, handle.params.options.num_keep, self.model.bos_token, self.n_ctx_seq
                ),
                logprobs=_Logprobs(handle.params.top_logprobs) if handle.params.logprobs else None,
                stops=StopMatcher(handle.params.options.stop),
            )
            slot.active = active
            admitted.append(active)
        return admitted

    def _make_sampler(self, params: SamplingParams) -> Sampler:
        try:
            return self.backend.new_sampler(self.model, params.options, grammar=params.grammar, n_ctx=self.n_ctx_seq)
        except InvalidFormat:
            raise
        except Exception as exc:
            raise RunnerError(f"could not build the sampler: {exc}") from None

    def _prepare(self, active: _Active) -> None:
        """Start from the longest evaluated prefix of the prompt at hand; drop the rest of the slot's entries."""
        slot, prompt = active.slot, active.handle.prompt
        limit = len(prompt) - 1  # always evaluate one token, for its logits
        keep = min(_common_prefix(slot.reusable, prompt), limit)
        donor, from_donor = self._best_donor(slot, prompt, limit, own=keep)
        hit = self.prompt_cache.lookup(self.cache_key, prompt) if self.prompt_cache is not None else None
        from_cache = min(hit.common, limit) if hit is not None else 0
        restored: CacheHit | None = None
        if max(from_donor, from_cache) > keep:
            self._save(slot)  # what this slot held may serve a later request
            if from_donor >= from_cache and donor is not None and self.context.seq_cp(donor.seq_id, slot.seq_id):
                slot.cached[:] = donor.cached
                keep = from_donor
            elif hit is not None and self._restore(slot, hit, active.handle.media):
                restored = hit
                keep = from_cache
            else:
                slot.cached.clear()
                keep = 0
        elif len(slot.cached) - keep >= _WORTH_SAVING:
            self._save(slot)
        media = active.handle.media
        keep = _outside_media(media, keep)  # an image is evaluated whole, never from its middle
        kept_offset = _offset_before(media, keep)
        if keep > 0 and (
            self.context.seq_pos_min(slot.seq_id) > 0 or not self.context.seq_rm(slot.seq_id, keep + kept_offset)
        ):
            keep = 0  # a sliding-window cache may have dropped early positions: start over
        if keep == 0:
            self.context.seq_rm(slot.seq_id, 0)
            kept_offset = 0
        del slot.cached[keep:]
        slot.offset = kept_offset
        active.prompt_pos = keep
        if not active.handle.params.grammar:
            # Penalties look back over the prompt too, as they do in llama-server.
            window = active.handle.params.options.repeat_last_n
            for token in prompt[-window:] if window > 0 else []:
                if token >= 0:  # not an image's stand-in
                    active.sampler.accept(token)
        if restored is not None and keep > 0 and not self._first_decode(active):
            self._drop_restored(slot, restored)
            active.prompt_pos = 0

    def _restore(self, slot: _Slot, hit: CacheHit, media: Sequence[MediaSpan]) -> bool:
        """Put a saved state into the slot, checked against the tokens its entry claims.

        A state llama.cpp refuses, or one whose positions are not those of its tokens from position 0 (one
        more, fewer, or past the context), is dropped from the cache: the prompt is evaluated instead.
        """
        tokens = hit.tokens
        last_position = len(tokens) - 1 + _offset_before(media, len(tokens))
        try:
            restored = self.context.state_set(slot.seq_id, hit.state)
        except Exception:  # a state the backend cannot even read is as good as one it refused
            logger.exception("restoring a saved prompt state failed")
            restored = False
        if restored and not (
            0 < len(tokens) <= self.n_ctx_seq
            and self.context.seq_pos_min(slot.seq_id) == 0
            and self.context.seq_pos_max(slot.seq_id) == last_position
        ):
            logger.warning("a saved prompt state does not hold the %d positions its entry claims", len(tokens))
            restored = False
        if not restored:
            self._drop_restored(slot, hit)
            return False
        slot.cached[:] = tokens
        return True

    def _first_decode(self, active: _Active) -> bool:
        """Evaluate the first prompt token after a restored state on its own: if llama.cpp refuses it, only
        the restored state can be at fault, and no other sequence's tokens are lost with it."""
        slot, prompt = active.slot, active.handle.prompt
        span = _media_at(active.handle.media, active.prompt_pos)
        if span is not None:
            return self._evaluate_media(active, span) == 0
        token, last = prompt[active.prompt_pos], active.prompt_pos == len(prompt) - 1
        self.batch.clear()
        index = self.batch.add(token, slot.next_position, slot.seq_id, last)
        status = self.context.decode(self.batch)
        if status != 0:
            logger.warning("decoding after a restored prompt state failed (%d): evaluating the prompt instead", status)
            return False
        slot.cached.append(token)
        active.prompt_pos += 1
        active.prompt_evaluated += 1
        if last:  # the prompt's last token: its logits choose the first token of the reply
            active.batch_index = index
            self._sample(active, time.perf_counter())
        return True

    def _drop_restored(self, slot: _Slot, hit: CacheHit) -> None:
        """Empty the slot of a saved state that failed, and drop that state from the cache."""
        self.context.seq_rm(slot.seq_id, 0)
        slot.cached.clear()
        slot.offset = 0
        if self.prompt_cache is not None:
            self.prompt_cache.drop(self.cache_key, hit.tokens)

    def _best_donor(self, slot: _Slot, prompt: Sequence[int], limit: int, *, own: int) -> tuple[_Slot | None, int]:
        """Another slot holding a longer prefix of the prompt than this one's `own`, worth copying over,
        and how much of the prompt it holds (0 without one)."""
        best, best_len = None, own + _WORTH_COPYING
        for other in self.slots:
            if other is not slot and (length := min(_common_prefix(other.reusable, prompt), limit)) >= best_len:
                if self.context.seq_pos_min(other.seq_id) == 0:  # a sliding window may have dropped its start
                    best, best_len = other, length
        return best, best_len if best is not None else 0

    def _save(self, slot: _Slot) -> None:
        """Keep what the slot holds in the prompt cache, before it is dropped or overwritten."""
        cache = self.prompt_cache
        if cache is None or len(slot.cached) < _WORTH_SAVING or cache.covers(self.cache_key, slot.cached):
            return
        if slot.plain is not None:
            return  # shifted: the state is not that of its tokens evaluated from the start
        if self.context.seq_pos_min(slot.seq_id) != 0:
            return  # a sliding window dropped its start: the state could not be reused
        state = self.context.state_get(slot.seq_id)
        if state:
            cache.put(self.cache_key, slot.cached, state)

    def _step(self) -> None:
        self._drop_cancelled()
        if self.projector is not None:
            self._media_step(self._in_admission_order())
        actives = self._in_admission_order()
        if not actives:
            return
        # Who gets room is decided in admission order: next tokens first, one each (with its draft), so
        # running sequences never wait on a long prompt; then prompt chunks, as far as the batch has room.
        budget = self.batch.capacity
        runs: list[tuple[_Active, list[int]]] = []  # each sequence's tokens in this step, in order
        drafts = self._drafts(actives)
        for active in actives:
            active.batch_index = None
            if active.next_token is not None:
                if len(active.slot.cached) + 1 >= self.n_ctx_seq and not self._shift(active):
                    self._finish(active, "length")  # this cache cannot shift: the context is full
                    continue
                active.draft = drafts.get(active.slot.seq_id, [])
                runs.append((active, [active.next_token, *active.draft]))
                budget -= 1 + len(active.draft)
        for active in actives:
            prompt = active.handle.prompt
            if active.prompt_pos >= len(prompt) or budget <= 0:
                continue
            # Up to its next image or audio clip, which a step of its own evaluates.
            take = min(_text_before_media(active.handle.media, active.prompt_pos, len(prompt)), budget)
            if take > 0:
                runs.append((active, prompt[active.prompt_pos : active.prompt_pos + take]))
                budget -= take
        if not runs:
            return
        # The batch holds the sequences in slot order: llama.cpp splits one whose sequences are out of
        # order into several smaller evaluations (with four slots, up to half again the time of a step).
        batch = self.batch
        batch.clear()
        in_batch: list[_Active] = []
        for active, tokens in sorted(runs, key=lambda run: run[0].slot.seq_id):
            slot = active.slot
            if active.next_token is not None:  # its next token, with logits everywhere: `_sample` verifies a draft
                active.batch_index = batch.add(active.next_token, slot.next_position, slot.seq_id, True)
                slot.cached.append(active.next_token)
                active.next_token = None
                for ahead, token in enumerate(active.draft):
                    batch.add(token, slot.next_position + ahead, slot.seq_id, True)
            else:  # a prompt chunk: logits for the prompt's last token only
                prompt, end = active.handle.prompt, active.prompt_pos + len(tokens)
                for i in range(active.prompt_pos, end):
                    index = batch.add(prompt[i], slot.next_position, slot.seq_id, i == len(prompt) - 1)
                    slot.cached.append(prompt[i])
                if end == len(prompt):
                    active.batch_index = index
                active.prompt_evaluated += len(tokens)
                active.prompt_pos = end
            in_batch.append(active)
        status = self.context.decode(batch)
        if status < 0:  # llama.cpp's own error: the context cannot be trusted any more
            raise RunnerError(f"llama_decode returned {status}")
        if status != 0:  # this batch did not fit or was aborted; sequences that waited outside it are unharmed
            self._fail_batch(in_batch, status)
            return
        now = time.perf_counter()
        for active in actives:
            if active.batch_index is not None:
                self._sample(active, now)

    def _in_admission_order(self) -> list[_Active]:
        """The active sequences in admission order (`started` is set on admission), whichever slots they hold."""
        return sorted((slot.active for slot in self.slots if slot.active is not None), key=lambda a: a.started)

    def _media_step(self, actives: Sequence[_Active]) -> None:
        """Evaluate the first image or audio clip a sequence has reached, one per step: the projector's encode
        holds up the other sequences for one item at most."""
        for active in actives:
            span = _media_at(active.handle.media, active.prompt_pos)
            if span is not None and active.next_token is None:
                status = self._evaluate_media(active, span)
                if status != 0:
                    self._fail_batch([active], status)
                return

    def _evaluate_media(self, active: _Active, span: MediaSpan) -> int:
        """Put one item's embeddings into the sequence's cache; llama.cpp's status (0 when done)."""
        assert self.projector is not None
        slot = active.slot
        status = self.projector.evaluate(self.context, span.media, position=slot.next_position, seq_id=slot.seq_id)
        if status == 0:
            slot.cached.extend(active.handle.prompt[span.start : span.end])
            slot.offset += span.positions - span.count
            active.prompt_pos = span.end
            active.prompt_evaluated += span.count
        return status

    def _shift(self, active: _Active) -> bool:
        """Make room for the sequence's next token: keep its first `num_keep` tokens, drop half of the rest
        and move what follows back over them. False where it cannot."""
        slot = active.slot
        held = len(slot.cached)
        keep = min(active.num_keep, held - 1)
        if keep < 0:
            return False
        discard = max((held - keep) // 2, 1)
        if not self.context.shift(slot.seq_id, keep, discard):
            logger.warning("this model's cache cannot shift the context: generation ends at its end")
            return False
        del slot.cached[keep : keep + discard]
        slot.plain = keep if slot.plain is None else min(slot.plain, keep)
        return True

    def _drafts(self, actives: Sequence[_Active]) -> dict[int, list[int]]:
        """Draft tokens for the sequences that take them (by slot), within the batch's spare room."""
        if self.drafter is None:
            return {}
        generating = [active for active in actives if active.next_token is not None]
        drafting = [active for active in generating if _may_draft(active)]
        if not drafting:
            return {}
        spare = self.batch.capacity - len(generating)
        waiting = sum(len(active.handle.prompt) - active.prompt_pos for active in actives)
        room = spare - min(waiting, spare // 2)  # prompt chunks keep up to half the spare room
        limits: dict[int, int] = {}
        histories: dict[int, list[int]] = {}
        for i, active in enumerate(drafting):
            share = room // len(drafting) + (1 if i < room % len(drafting) else 0)
            # Nothing worth drafting past num_predict or the context: those tokens could never be kept.
            left = min(active.num_predict - len(active.generated), self.n_ctx_seq - 1 - len(active.slot.cached)) - 1
            limit = min(self.config.draft_max, share, left)
            if limit > 0 and active.next_token is not None:
                limits[active.slot.seq_id] = limit
                histories[active.slot.seq_id] = [*active.slot.cached, active.next_token]
        if not histories:
            return {}
        proposed = self.drafter.propose(histories, limits)
        return {seq: draft[: limits[seq]] for seq, draft in proposed.items() if seq in limits and draft}

    def _sample(self, active: _Active, now: float) -> None:
        """Choose the sequence's next token, then, while it is the drafted one, the token after it too.

        Every token chosen is kept, so the sampler never has to take one back; the KV entries of the
        drafted tokens the model did not choose are dropped.
        """
        if active.first_token_at is None:
            active.first_token_at = now
        index = active.batch_index or 0
        draft, accepted = active.draft, 0
        active.draft = []
        while True:
            token = active.sampler.sample(self.context, index)
            ending = self._emit(active, token, index)
            if ending is not None or accepted == len(draft) or token != draft[accepted]:
                break
            # The drafted token is the model's choice: its entry is in the cache, its logits choose the next.
            active.slot.cached.append(token)
            accepted += 1
            index += 1
        if draft:
            active.draft_count += len(draft)
            active.draft_accepted_count += accepted
            self.drafted += len(draft)
            self.drafts_accepted += accepted
            if accepted < len(draft):
                self.context.seq_rm(active.slot.seq_id, active.slot.next_position)
        if ending is None:
            active.next_token = token
        else:
            reason, flush = ending
            self._finish(active, reason, flush=flush)

    def _emit(self, active: _Active, token: int, index: int) -> tuple[str, bool] | None:
        """Add a chosen token to the sequence and send its text; how the sequence ends with it, if it does:
        (done reason, whether text held back is flushed)."""
        if self.model.is_eog(token):  # not part of the text, so it has no logprob either (as in Ollama)
            return "stop", True
        active.generated.append(token)
        piece = active.utf8.feed(self.model.token_bytes(token))
        if active.logprobs is not None:
            logprob = token_logprob(self.model, self.context.logits(index), token, active.logprobs.top)
            active.logprobs.add(logprob, len(piece))
        text, stopped = active.stops.feed(piece)
        self._send(active, text, cut=stopped)
        if stopped:
            return "stop", False
        if len(active.generated) >= active.num_predict:
            return "length", True
        if not active.handle.params.shift and len(active.slot.cached) + 1 >= self.n_ctx_seq:
            return "length", True  # the context is full, and this sequence may not shift it
        return None

    def _send(self, active: _Active, text: str, *, cut: bool = False, final: bool = False) -> None:
        """Send text, with the logprobs of the tokens it completes when the sequence asked for them.

        `cut`: a stop sequence ended the text here; `final`: the last text, after which every token's
        text has been sent (so every logprob still held goes with it).
        """
        logprobs = active.logprobs
        if logprobs is None:
            if text:
                active.handle.mailbox.put(text)
            return
        if not (text or cut or final):
            return  # text held back holds its tokens' logprobs back too
        scored = logprobs.take(len(text), cut=cut)
        if text or scored:
            active.handle.mailbox.put(ScoredText(text, scored))

    def _finish(self, active: _Active, reason: str, *, flush: bool = True) -> None:
        if flush:  # text held back as a possible stop sequence turned out not to be one
            tail, stopped = active.stops.feed(active.utf8.flush())
            if not stopped:
                tail += active.stops.flush()
            self._send(active, tail, cut=stopped, final=True)
        end = time.perf_counter()
        first = active.first_token_at or end
        prompt = len(active.handle.prompt)
        result = SequenceResult(
            done_reason=reason,
            prompt_eval_count=prompt,
            prompt_cached_count=prompt - active.prompt_evaluated,
            prompt_eval_duration=int((first - active.started) * 1e9),
            eval_count=len(active.generated),
            eval_duration=int((end - first) * 1e9),
            tokens=tuple(active.generated),
            draft_count=active.draft_count,
            draft_accepted_count=active.draft_accepted_count,
        )
        self._release(active)
        active.handle.finished = True
        active.handle.mailbox.put(result)
        self._persist(active.slot)

    def _persist(self, slot: _Slot) -> None:
        """With a cache on disk, save what a slot holds once its request is done: a new process may start there."""
        if self.prompt_cache is not None and self.prompt_cache.persistent:
            self._save(slot)

    def _release(self, active: _Active) -> None:
        active.sampler.close()
        slot = active.slot
        slot.active = None
        slot.last_used = time.monotonic()
        if slot.plain is not None:  # a shifted sequence: only its kept part can serve a later request
            if not self.context.seq_rm(slot.seq_id, slot.plain):
                self.context.seq_rm(slot.seq_id, 0)
                slot.plain = 0
            del slot.cached[slot.plain :]
            slot.plain = None

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            active = slot.active
            if active is not None and active.handle.cancelled.is_set():
                # What is cached stays a valid prefix for the next request.
                self._release(active)
                active.handle.finished = True
                self._persist(slot)

    def _fail_batch(self, actives: list[_Active], status: int) -> None:
        reason = {1: "the context is full", 2: "decoding was aborted"}.get(status, f"llama.cpp's status {status}")
        error = RunnerError(f"decoding failed: {reason}")
        for active in actives:
            self.context.seq_rm(active.slot.seq_id, 0)
            active.slot.cached.clear()
            active.slot.offset = 0
            self._release(active)
            active.handle.finished = True
            active.handle.mailbox.put(error)


_WORTH_COPYING = 32  # tokens another slot must hold beyond this slot's prefix to copy its cache over
_WORTH_SAVING = 64  # the fewest tokens worth keeping in the prompt cache
_LAYOUTS_KEPT = 256  # media layouts remembered, by content hash
_CONTEXT_WINDOWS = 10  # without num_predict, generation stops after this many context windows of tokens


def state_key(config: LoadConfig, state_format: str) -> str:
    """What a saved state depends on: the weights, adapters, projector (its images' entries) and cache layout,
    and the state's format."""
    parts = [
        state_format,
        _file_identity(config.model_path),
        *(_file_identity(path) for path in config.adapters),
        *([f"projector {_file_identity(config.projector_path)}"] if config.projector_path else []),
        f"ctx={config.num_ctx} parallel={config.num_parallel} kv={config.kv_cache_type} fa={config.flash_attention}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _file_identity(path: str) -> str:
    # Store blobs are named by their digest; any other file by where it is, its size and its mtime.
    name = os.path.basename(path)
    if name.startswith("sha256-"):
        return name
    try:
        stat = os.stat(path)
    except OSError:
        return os.path.abspath(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


def token_logprob(model: Model, logits: npt.NDArray[np.float32], token: int, top: int) -> Logprob:
    """The sampled token's logprob, and the `top` most likely tokens', from one position's logits.

    These are the model's own distribution (a softmax of the raw logits), before penalties, grammar,
    temperature or truncation shape what is sampled: what OpenAI and Ollama report.
    """
    logprobs = log_softmax(logits)
    sampled = _scored(model, token, logprobs)
    alternatives = tuple(_scored(model, int(t), logprobs) for t in most_likely(logprobs, top)) if top > 0 else None
    return Logprob(token=sampled.token, logprob=sampled.logprob, bytes=sampled.bytes, top_logprobs=alternatives)


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """log(softmax(x)) = x - max - log(sum(exp(x - max))): shifted by the max, exp cannot overflow."""
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def most_likely(logprobs: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.intp]:
    """The ids of the `n` most likely tokens, most likely first (a partial sort: the vocabulary is large)."""
    if n < len(logprobs):
        candidates = np.argpartition(-logprobs, n - 1)[:n]
    else:
        candidates = np.arange(len(logprobs))
    return candidates[np.argsort(-logprobs[candidates], kind="stable")]


def _scored(model: Model, token: int, logprobs: npt.NDArray[np.float64]) -> TokenLogprob:
    # A control token has no text of its own; its name ("<|im_end|>") tells an alternative apart.
    data = model.token_bytes(token) or model.token_text(token).encode()
    return TokenLogprob(token=data.decode("utf-8", errors="replace"), logprob=float(logprobs[token]), bytes=tuple(data))


def _may_draft(active: _Active) -> bool:
    """Whether the sequence takes drafts: not with logprobs or a grammar, which the verification leaves out,
    nor once its context has shifted (a draft model would evaluate the shifted tokens over again)."""
    return (
        active.logprobs is None
        and not active.handle.params.grammar
        and active.slot.plain is None
        and not active.handle.media  # a draft model cannot read the images' stand-ins
    )


def _media_at(media: Sequence[MediaSpan], position: int) -> MediaSpan | None:
    """The item whose stand-ins start at `position` of the prompt, if one does."""
    for span in media:
        if span.start == position:
            return span
        if span.start > position:
            break
    return None


def _text_before_media(media: Sequence[MediaSpan], position: int, end: int) -> int:
    """How many prompt tokens from `position` on come before the next item (or the prompt's `end`)."""
    for span in media:
        if span.start >= position:
            return span.start - position
    return end - position


def _offset_before(media: Sequence[MediaSpan], index: int) -> int:
    """How far the positions of the prompt's entries from `index` on are past their indexes."""
    return sum(span.positions - span.count for span in media if span.end <= index)


def _outside_media(media: Sequence[MediaSpan], position: int) -> int:
    """`position`, or the start of the item it falls inside."""
    for span in media:
        if span.start < position < span.end:
            return span.start
    return position


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

"""What crosses between the engine and a runner: load configurations, sampling parameters, sequence handles.

This module does not import llama_cpp, so the engine can be imported without it.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
import numpy as np

from ..errors import ContextLengthExceeded, InvalidRequest, LocalLLMError
from ..options import Options
from ..types import Logprob
from .mailbox import Mailbox

if TYPE_CHECKING:
    from ..media import Media
    from .embed import EmbedHandle

__all__ = [
    "KV_CACHE_TYPES",
    "EmbedRunner",
    "LoadConfig",
    "MediaLayout",
    "MediaSpan",
    "ModelRunner",
    "SamplingParams",
    "ScoredText",
    "SequenceHandle",
    "SequenceResult",
    "TextRunner",
    "check_prompt_fits",
    "cut_prompt",
    "keep_count",
    "locate_media",
    "placeholder_tokens",
]

KV_CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml type ids


_OPTION_DEFAULTS = Options()


@attrs.frozen
class LoadConfig:
    """Everything that decides how a model is loaded: equal configs share a runner.

    The fields named after options are the load options a runner takes as they are (`RUNNER_LOAD_OPTIONS`),
    with the options' defaults; `options.runner_load_values` gives their values from a request's options.
    """

    model_path: str
    num_ctx: int = _OPTION_DEFAULTS.num_ctx
    num_batch: int = _OPTION_DEFAULTS.num_batch
    num_parallel: int = 4
    num_thread: int = _OPTION_DEFAULTS.num_thread
    # Requested GPU layers (-1: as many as fit); the scheduler's plan decides the real count.
    num_gpu: int = _OPTION_DEFAULTS.num_gpu
    main_gpu: int = _OPTION_DEFAULTS.main_gpu
    use_mmap: bool = _OPTION_DEFAULTS.use_mmap
    use_mlock: bool = _OPTION_DEFAULTS.use_mlock
    embeddings: bool = False
    kv_cache_type: str = attrs.field(default="f16", validator=attrs.validators.in_(KV_CACHE_TYPES))
    adapters: tuple[str, ...] = ()
    flash_attention: bool | None = None  # None: as llama.cpp decides for the device
    repack: bool | None = None  # llama.cpp's extra CPU weight layouts; None: where known to be safe
    # Speculative decoding: a draft model's file (same vocabulary), else prompt lookup when asked for.
    draft_model_path: str | None = None
    draft_max: int = _OPTION_DEFAULTS.draft_max  # the most tokens drafted for a sequence in one step
    prompt_lookup: bool = _OPTION_DEFAULTS.prompt_lookup
    # A vision (or audio) projector's file: the runner reads images and audio through it.
    projector_path: str | None = None


@attrs.frozen
class SamplingParams:
    """How one sequence is sampled: the request's options, a grammar its output must follow, and
    whether to report each token's logprob (with the `top_logprobs` most likely tokens at its position).

    `truncate`: a prompt longer than the context is cut (keeping `num_keep` tokens) instead of refused;
    `shift`: generation that reaches the end of the context shifts it and goes on, as Ollama does."""

    options: Options = attrs.field(factory=Options)
    grammar: str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    truncate: bool = True
    shift: bool = True


@attrs.frozen
class ScoredText:
    """Text, and the logprobs of the tokens whose text it completes: what a sequence that asked for
    logprobs sends instead of plain text."""

    text: str
    logprobs: tuple[Logprob, ...]


@attrs.frozen
class SequenceResult:
    """How a sequence ended, with Ollama's counters (durations in ns).

    `prompt_eval_count` is the whole prompt (what was left of it after a cut), as Ollama counts it;
    `prompt_cached_count` is the part of it whose KV entries a slot already held, so only the rest was
    evaluated. `eval_count` counts every token generated, across context shifts. With speculative decoding,
    `draft_count` tokens were drafted for the sequence and the model confirmed `draft_accepted_count`.
    """

    done_reason: str
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int
    tokens: tuple[int, ...] = ()
    prompt_cached_count: int = 0
    draft_count: int = 0
    draft_accepted_count: int = 0


def check_prompt_fits(prompt: Sequence[int], n_ctx_seq: int, *, truncate: bool) -> None:
    """Raise for a prompt a sequence cannot take: an empty one, or one that leaves no room to generate
    when it may not be cut (`truncate` false, or a context too small to cut it for)."""
    if not prompt:
        raise LocalLLMError("the prompt is empty after tokenization")
    if len(prompt) >= n_ctx_seq and (not truncate or n_ctx_seq < 2):
        raise ContextLengthExceeded(
            f"the prompt has {len(prompt)} tokens but the context holds {n_ctx_seq}; "
            "raise num_ctx, shorten the prompt, or leave truncate on to cut it",
            tokens=len(prompt),
            limit=n_ctx_seq,
        )


def keep_count(prompt: Sequence[int], num_keep: int, bos_token: int, n_ctx_seq: int) -> int:
    """How many leading tokens a cut prompt or a shifted context keeps, as Ollama counts them: `num_keep`
    (negative: the whole prompt), one more where the prompt starts with the BOS token, and always at least
    one token fewer than the context holds, so that something can be discarded."""
    keep = len(prompt) if num_keep < 0 else num_keep
    if bos_token >= 0 and prompt and prompt[0] == bos_token:
        keep += 1
    return max(0, min(keep, n_ctx_seq - 1))


def cut_prompt(prompt: Sequence[int], n_ctx_seq: int, keep: int) -> list[int]:
    """A prompt that does not leave room to generate, cut as Ollama cuts it: the first `keep` tokens, then
    the end of the prompt, so that about half of what follows the kept tokens is free for the answer."""
    if len(prompt) < n_ctx_seq or n_ctx_seq < 2:
        return list(prompt)
    keep = max(0, min(keep, n_ctx_seq - 1))
    limit = n_ctx_seq - max((n_ctx_seq - keep) // 2, 1)  # between keep and n_ctx_seq - 1, at least 1
    tail = limit - keep
    return [*prompt[:keep], *prompt[len(prompt) - tail :]] if tail > 0 else list(prompt[:keep])


def placeholder_tokens(digest: bytes, count: int) -> list[int]:
    """Stand-ins for an image's (or audio clip's) `count` embeddings in a token list.

    Negative, so never a vocabulary id, and drawn from the media's content hash: prompts holding the same
    image compare equal over it (and reuse its cache entries, in a slot or the prompt cache), and a
    different image differs from its first stand-in on, but for a 2**-31 chance per stand-in.
    """
    words = np.frombuffer(hashlib.shake_128(b"localllm media\0" + digest).digest(4 * count), dtype="<u4")
    return [-1 - int(word) for word in words & 0x7FFFFFFF]


@attrs.frozen
class MediaLayout:
    """How the projector puts one media item into a prompt: the text tokens it wraps the item in (an
    image's begin and end markers, for some models), how many embeddings the item becomes, and how many
    positions they take (fewer, where the projector places them in two dimensions: M-RoPE)."""

    before: tuple[int, ...]
    count: int
    after: tuple[int, ...]
    positions: int = attrs.field(default=attrs.Factory(lambda layout: layout.count, takes_self=True))

    def tokens(self, digest: bytes) -> list[int]:
        return [*self.before, *placeholder_tokens(digest, self.count), *self.after]


@attrs.frozen
class MediaSpan:
    """Where a media item's embeddings sit in a sequence's prompt, and the positions they take."""

    start: int
    count: int
    media: Media
    positions: int

    @property
    def end(self) -> int:
        return self.start + self.count


def locate_media(
    prompt: Sequence[int], media: Sequence[Media], layouts: Sequence[MediaLayout]
) -> tuple[list[int], tuple[MediaSpan, ...]]:
    """The prompt and the span of each media item's stand-ins in it (`media[i]` laid out as `layouts[i]`).

    Stand-ins of an item cut short (a too-long prompt loses its middle) are dropped from the prompt: an
    item is evaluated whole or not at all. Any other negative token is refused.
    """
    starts: dict[int, tuple[Media, list[int], int]] = {}
    every: set[int] = set()
    for item, layout in zip(media, layouts, strict=True):
        stand_ins = placeholder_tokens(item.digest, layout.count)
        if stand_ins:
            starts[stand_ins[0]] = (item, stand_ins, layout.positions)
            every.update(stand_ins)
    kept: list[int] = []
    spans: list[MediaSpan] = []
    i = 0
    while i < len(prompt):
        token = prompt[i]
        if token >= 0:
            kept.append(token)
            i += 1
            continue
        found = starts.get(token)
        if found is not None and list(prompt[i : i + len(found[1])]) == found[1]:
            spans.append(MediaSpan(len(kept), len(found[1]), found[0], found[2]))
            kept.extend(found[1])
            i += len(found[1])
        elif token not in every:
            raise InvalidRequest(f"token id {token} is not in the vocabulary")
        else:
            i += 1  # part of an item whose start was cut off
    return kept, tuple(spans)


class _Withdraw(Protocol):
    def _withdraw(self, handle: SequenceHandle) -> None: ...


class SequenceHandle:
    """The coroutine's side of one sequence: events in, cancellation out."""

    def __init__(
        self,
        runner: _Withdraw,
        prompt: list[int],
        params: SamplingParams,
        mailbox: Mailbox[str | ScoredText | SequenceResult | LocalLLMError] | None = None,
        media: tuple[MediaSpan, ...] = (),
    ) -> None:
        """`mailbox`: where the items go; by default a new one bound to the running event loop."""
        self.runner = runner
        self.prompt = prompt
        self.params = params
        self.media = media  # the images and audio in the prompt, in order
        # Items: str or ScoredText (text), SequenceResult (done) or LocalLLMError (failed).
        self.mailbox: Mailbox[str | ScoredText | SequenceResult | LocalLLMError] = (
            mailbox if mailbox is not None else Mailbox()
        )
        self.cancelled = threading.Event()
        self.finished = False

    def cancel(self) -> None:
        """Stop generating; the slot is freed within one decode step. Safe from any thread."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.runner._withdraw(self)


class _Runner(Protocol):
    """What every runner offers the scheduler and the request pipelines."""

    @property
    def busy(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def pending_count(self) -> int: ...

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one sequence may hold."""
        ...

    @property
    def prompt_cache_bytes(self) -> int:
        """Bytes of saved prompt states this runner could restore."""
        ...

    @property
    def pid(self) -> int | None:
        """The id of the process the runner lives in when that is a child process; None in this one."""
        ...

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...

    def close(self) -> None: ...


class TextRunner(_Runner, Protocol):
    """A runner that generates text: sequences in, text and a result out."""

    def submit(self, prompt: list[int], params: SamplingParams, *, media: Sequence[Media] = ()) -> SequenceHandle:
        """Queue a sequence; `media` are the images and audio whose stand-ins (`media_layout`) the prompt holds."""
        ...

    def media_layout(self, media: Media) -> MediaLayout:
        """How an image or audio clip goes into this model's prompts; `CapabilityError` or `InvalidRequest`
        where the model cannot take it."""
        ...

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        """Raise InvalidRequest for ids outside the model's vocabulary."""
        ...

    def special_token_text(self) -> tuple[str, str]:
        """The text of the BOS and EOS tokens ("" where the model has none), for chat templates."""
        ...

    def chat_template(self) -> str | None:
        """The chat template the model file carries, if any."""
        ...


class EmbedRunner(_Runner, Protocol):
    """A runner that embeds: token sequences in, one vector each out."""

    def truncate(self, tokens: list[int], limit: int | None = None) -> list[int]: ...

    def submit_embed(self, inputs: Sequence[Sequence[int]], *, normalize: bool = True) -> EmbedHandle: ...


ModelRunner = TextRunner | EmbedRunner
"""Any runner the scheduler may hold."""

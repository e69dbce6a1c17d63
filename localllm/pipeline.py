"""generate and chat: from a request to a running sequence, and from its text to Ollama-shaped chunks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio
import attrs

from .chat.template import load_template
from .errors import CapabilityError, ContextLengthExceeded, InvalidRequest
from .options import Options
from .prompt_media import Labelled, PromptMedia, decode_all, for_display, labelled, marked_messages, marked_prompt
from .request import ChatRequest, GenerateRequest
from .runner.protocol import LoadConfig, SamplingParams, ScoredText, SequenceHandle, SequenceResult, TextRunner
from .scheduler.scheduler import Lease
from .service import Admitted, off_loop_if_long
from .stream import Job
from .types import ChatResponse, GenerateResponse, Logprob, Message, ToolCall, now_iso

if TYPE_CHECKING:
    from .chat.harmony import HarmonyParser
    from .chat.prompt import PreparedChat
    from .chat.tools import ChatOutputParser
    from .registry.registry import ResolvedModel
    from .service import ModelService

__all__ = ["open_chat", "open_generate", "render", "render_chat", "render_generate"]

T = TypeVar("T")

Logprobs = tuple[Logprob, ...] | None
"""The logprobs of a piece of text: None unless the request asked for them."""


def _sampling(request: GenerateRequest | ChatRequest, options: Options, grammar: str | None) -> SamplingParams:
    return SamplingParams(
        options,
        grammar,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        truncate=request.truncate,
        shift=request.shift,
    )


Fits = Callable[[str], bool]
"""Whether a rendered prompt fits the context."""


class PromptCounter:
    """Whether a rendered prompt fits one sequence's context, as Ollama's chat truncation counts it
    (the prompt's tokens, an image's embeddings among them, against the context, `<=`); it keeps the
    tokens of what it counted, so the prompt that is sent is not tokenized twice. Called from the thread
    that renders the prompt."""

    def __init__(self, runner: TextRunner, media: PromptMedia) -> None:
        self._runner = runner
        self._media = media
        self.limit = runner.n_ctx_seq
        self._counted: dict[str, list[int]] = {}

    def fits(self, prompt: str) -> bool:
        tokens = self._counted.get(prompt)
        if tokens is None:
            tokens = self._counted[prompt] = self._media.tokens(self._runner, prompt)
        return len(tokens) <= self.limit

    async def tokens(self, prompt: str) -> list[int]:
        counted = self._counted.get(prompt)
        return counted if counted is not None else await _tokenize(self._runner, prompt, self._media)


def _check_untruncated(tokens: Sequence[int], runner: TextRunner) -> None:
    """With `truncate` off, a prompt the context cannot take is refused before anything runs, as Ollama does."""
    if len(tokens) >= runner.n_ctx_seq:
        raise ContextLengthExceeded(
            f"the prompt has {len(tokens)} tokens but the context holds {runner.n_ctx_seq}; "
            "raise num_ctx, shorten the prompt, or leave truncate on to drop the oldest messages",
            tokens=len(tokens),
            limit=runner.n_ctx_seq,
        )


class Output(Protocol[T]):
    """One request's output state: what its sequence's text becomes, and its last chunks."""

    def text(self, piece: str, logprobs: Logprobs, job: RunJob[Any]) -> list[T]: ...

    def done(self, result: SequenceResult, total: int, load_duration: int) -> list[T]: ...


class RunJob(Job[T], Generic[T]):
    """A submitted sequence: its text goes through the request's `Output` into chunks; it owns its lease."""

    def __init__(
        self, lease: Lease[LoadConfig, TextRunner], handle: SequenceHandle, output: Output[T], *, started: float
    ) -> None:
        self.lease = lease
        self.handle = handle
        self.output = output
        self._started = started

    def switch(self, handle: SequenceHandle) -> None:
        """Go on with another sequence on the same runner; this one stops, and what it sent since is dropped."""
        self.handle.cancel()
        self.handle = handle

    async def next_chunks(self) -> tuple[list[T], bool]:
        chunks: list[T] = []
        handle = self.handle
        for item in await handle.mailbox.get_all():
            if self.handle is not handle:
                break  # the output switched to another sequence
            if isinstance(item, str):
                chunks.extend(self.output.text(item, None, self))
            elif isinstance(item, ScoredText):
                chunks.extend(self.output.text(item.text, item.logprobs, self))
            elif isinstance(item, SequenceResult):
                total = int((time.perf_counter() - self._started) * 1e9)
                self.close()
                chunks.extend(self.output.done(item, total, self.lease.load_duration))
                return chunks, True
            else:
                self.close()
                raise item
        return chunks, False

    def close(self) -> None:
        if not self.handle.finished:
            self.handle.cancel()
        self.lease.release()


class DoneJob(Job[T]):
    """A request answered without generating (load / unload)."""

    def __init__(self, chunk: T) -> None:
        self._chunk = chunk

    async def next_chunks(self) -> tuple[list[T], bool]:
        return [self._chunk], True

    def close(self) -> None:
        pass


def _durations(result: SequenceResult, total: int, load: int) -> dict[str, Any]:
    return {
        "total_duration": total,
        "load_duration": load,
        "prompt_eval_count": result.prompt_eval_count,
        "prompt_cached_count": result.prompt_cached_count,
        "prompt_eval_duration": result.prompt_eval_duration,
        "eval_count": result.eval_count,
        "eval_duration": result.eval_duration,
    }


# --------------------------------------------------------------------------- generate


@attrs.define
class GenerateOutput:
    """A generate request's output: its text, split by the thinking parser when the template thinks; last,
    the context (prompt and reply tokens) and the counts."""

    name: str
    prompt_tokens: tuple[int, ...]
    parser: ChatOutputParser | HarmonyParser | None = None

    def text(self, piece: str, logprobs: Logprobs, job: RunJob[Any]) -> list[GenerateResponse]:
        thinking = ""
        if self.parser is not None:
            thinking, piece, _calls = self.parser.feed(piece)
        if not (piece or thinking or logprobs):  # logprobs go out even while a parser holds text back, as in Ollama
            return []
        return [self._chunk(piece, thinking, logprobs)]

    def done(self, result: SequenceResult, total: int, load_duration: int) -> list[GenerateResponse]:
        chunks = []
        if self.parser is not None:
            thinking, content, _calls = self.parser.finish()
            if thinking or content:
                chunks.append(self._chunk(content, thinking, None))
        final = GenerateResponse(
            model=self.name,
            created_at=now_iso(),
            done=True,
            done_reason=result.done_reason,
            # An image's stand-ins are no vocabulary ids: a context sent back holds the text around it.
            context=tuple(token for token in self.prompt_tokens if token >= 0) + result.tokens,
            **_durations(result, total, load_duration),
        )
        return [*chunks, final]

    def _chunk(self, piece: str, thinking: str, logprobs: Logprobs) -> GenerateResponse:
        return GenerateResponse(
            model=self.name, created_at=now_iso(), response=piece, thinking=thinking or None, logprobs=logprobs or None
        )


async def open_generate(service: ModelService, request: GenerateRequest) -> Job[GenerateResponse]:
    with service.admit() as admission:  # counted under max_queue from here until its job is closed
        return Admitted(await _open_generate(service, request), admission)


async def _open_generate(service: ModelService, request: GenerateRequest) -> Job[GenerateResponse]:
    started = time.perf_counter()
    resolved = await _resolve(service, request)
    options = service.options(resolved, request.options)
    if request.is_empty:
        reason, load = await service.load_or_unload(resolved, options, request.keep_alive, "generate")
        return DoneJob(
            GenerateResponse(
                model=request.model, created_at=now_iso(), done=True, done_reason=reason, load_duration=load
            )
        )
    prompt = await render_generate(service, resolved, request)  # before the lease: a bad request loads nothing
    lease = await service.lease_text(resolved, options, request.keep_alive)
    runner = lease.runner
    try:
        if request.context:
            try:
                await _off_loop(runner, len(request.context), lambda: runner.check_token_ids(request.context or ()))
            except InvalidRequest as exc:
                raise InvalidRequest(f"invalid value for 'context': {exc}") from None
        tokens = await _tokenize(runner, prompt.text, prompt.media)
        if prompt.cuttable and len(tokens) > runner.n_ctx_seq:
            # Too long: rendered again without the oldest of the model's MESSAGEs, as Ollama does.
            counter = PromptCounter(runner, prompt.media)
            prompt = await render_generate(service, resolved, request, fits=counter.fits, media=prompt.media)
            tokens = await counter.tokens(prompt.text)
        tokens = list(request.context or ()) + tokens
        if not request.truncate:
            _check_untruncated(tokens, runner)
        handle = runner.submit(
            tokens, _sampling(request, options, prompt.grammar), media=prompt.media.used(prompt.text)
        )
    except BaseException:
        lease.release()
        raise
    parser = prompt.prepared.parser() if prompt.prepared is not None and prompt.prepared.thinking_tags else None
    return RunJob(lease, handle, GenerateOutput(request.model, tuple(tokens), parser), started=started)


@attrs.frozen
class GeneratePrompt:
    """A generate request's prompt, as rendered before a runner is leased."""

    text: str
    grammar: str | None
    #: The chat preparation behind it (its thinking tags), where the model's template wrapped the prompt.
    prepared: PreparedChat | None = None
    #: Whether a prompt too long for the context may lose the oldest of the model's MESSAGEs (as Ollama's
    #: truncation): only with the model's own template, never a raw, suffix or request-templated prompt.
    cuttable: bool = False
    #: The request's images and audio, decoded; the prompt marks where each goes.
    media: PromptMedia = attrs.field(factory=PromptMedia)


async def render_generate(
    service: ModelService,
    resolved: ResolvedModel,
    request: GenerateRequest,
    *,
    fits: Fits | None = None,
    media: PromptMedia | None = None,
) -> GeneratePrompt:
    """The prompt of a generate request: `raw` as it is, else through the model's template (or the
    request's own) with the model's SYSTEM and MESSAGE history; `fits` cuts the history to the context.
    The request's images are decoded here unless `media` holds them already."""
    from .chat.prompt import prepare_chat_in_thread

    grammar = _grammar_for(request.format)
    images = request.images or ()
    if media is None:
        media = await _decode(service, labelled(images))
    if request.raw:
        return GeneratePrompt(marked_prompt(request.prompt, images), grammar, media=media)
    if request.template:
        template = await anyio.to_thread.run_sync(load_template, request.template)
    else:
        template = await service.template(resolved)
    if request.suffix:
        if not template.supports_suffix:
            raise CapabilityError("this model does not support insert (a prompt with a suffix)")
        if images:
            raise CapabilityError("images cannot go with a suffix (insert); send them without one")
        return GeneratePrompt(
            await anyio.to_thread.run_sync(template.render_suffix, request.prompt, request.suffix), grammar
        )
    system = request.system if request.system is not None else resolved.system
    messages = ([{"role": "system", "content": system}] if system else []) + [
        # The model's MESSAGE history, as Ollama sends it unless the request carries a context.
        *([] if request.context else [Message.from_any(m).to_template_dict() for m in resolved.messages]),
        {"role": "user", "content": marked_prompt(request.prompt, images)},
    ]
    prepared = await prepare_chat_in_thread(template, messages, think=request.think, format=request.format, fits=fits)
    # As in Ollama, a request's own template is run as it is; the model's loses old messages to fit.
    cuttable = request.truncate and not request.template
    return GeneratePrompt(prepared.prompt, prepared.grammar, prepared, cuttable, media)


def _grammar_for(format: Any) -> str | None:
    from .chat.grammar import format_to_grammar

    return format_to_grammar(format)


# --------------------------------------------------------------------------- chat


@attrs.define
class ChatOutput:
    """A chat request's output: its text read by the parser into thinking, content and tool calls.

    With `text_reply`, a reply that may be a call or text has yet to show which: its first piece decides,
    and text is written again from the conversation without the injected tool instructions, so that
    they can never reach the reply."""

    name: str
    parser: ChatOutputParser | HarmonyParser
    request: ChatRequest
    options: Options
    text_reply: PreparedChat | None = None
    text_tokens: list[int] = attrs.field(factory=list)
    media: PromptMedia = attrs.field(factory=PromptMedia)

    def text(self, piece: str, logprobs: Logprobs, job: RunJob[Any]) -> list[ChatResponse]:
        if self.text_reply is not None and piece:
            text_reply, self.text_reply = self.text_reply, None
            if not piece.startswith("{"):  # the grammar starts every call with "{"
                self.parser = text_reply.parser()
                sampling = _sampling(self.request, self.options, text_reply.grammar)
                runner = job.lease.runner
                job.switch(runner.submit(self.text_tokens, sampling, media=self.media.used(text_reply.prompt)))
                return []
        thinking, content, calls = self.parser.feed(piece)
        if not (thinking or content or calls or logprobs):  # logprobs go out even while the parser holds text back
            return []
        return [self._chunk(thinking, content, calls, logprobs)]

    def done(self, result: SequenceResult, total: int, load_duration: int) -> list[ChatResponse]:
        thinking, content, calls = self.parser.finish()
        chunks = [self._chunk(thinking, content, calls)] if thinking or content or calls else []
        chunks.append(
            ChatResponse(
                model=self.name,
                created_at=now_iso(),
                message=Message(role="assistant", content=""),
                done=True,
                done_reason=result.done_reason,
                **_durations(result, total, load_duration),
            )
        )
        return chunks

    def _chunk(self, thinking: str, content: str, calls: list[ToolCall], logprobs: Logprobs = None) -> ChatResponse:
        message = Message(
            role="assistant", content=content, thinking=thinking or None, tool_calls=tuple(calls) if calls else None
        )
        return ChatResponse(model=self.name, created_at=now_iso(), message=message, logprobs=logprobs or None)


async def open_chat(service: ModelService, request: ChatRequest) -> Job[ChatResponse]:
    with service.admit() as admission:  # counted under max_queue from here until its job is closed
        return Admitted(await _open_chat(service, request), admission)


async def _open_chat(service: ModelService, request: ChatRequest) -> Job[ChatResponse]:
    started = time.perf_counter()
    resolved = await _resolve(service, request)
    options = service.options(resolved, request.options)
    if request.is_empty:
        reason, load = await service.load_or_unload(resolved, options, request.keep_alive, "generate")
        return DoneJob(
            ChatResponse(
                model=request.model,
                created_at=now_iso(),
                message=Message(role="assistant"),
                done=True,
                done_reason=reason,
                load_duration=load,
            )
        )
    # Before the lease: a bad request (or image) loads nothing.
    prepared, media = await render_chat(service, resolved, request)
    lease = await service.lease_text(resolved, options, request.keep_alive)
    runner = lease.runner
    try:
        tokens = await _tokenize(runner, prepared.prompt, media)
        if request.truncate and len(tokens) > runner.n_ctx_seq:
            # Too long: rendered again without the oldest messages, as Ollama's chat truncation does.
            counter = PromptCounter(runner, media)
            prepared, media = await render_chat(service, resolved, request, fits=counter.fits, media=media)
            tokens = await counter.tokens(prepared.prompt)
        if not request.truncate:
            _check_untruncated(tokens, runner)
        text_reply = prepared.text_reply
        text_tokens = await _tokenize(runner, text_reply.prompt, media) if text_reply is not None else []
        handle = runner.submit(tokens, _sampling(request, options, prepared.grammar), media=media.used(prepared.prompt))
    except BaseException:
        lease.release()
        raise
    output = ChatOutput(request.model, prepared.parser(), request, options, text_reply, text_tokens, media)
    return RunJob(lease, handle, output, started=started)


async def render_chat(
    service: ModelService,
    resolved: ResolvedModel,
    request: ChatRequest,
    *,
    fits: Fits | None = None,
    media: PromptMedia | None = None,
) -> tuple[PreparedChat, PromptMedia]:
    """The prompt, grammar and output parsing of a chat request: the model's MESSAGE history and SYSTEM
    before the request's messages, through the model's template; `fits` cuts the conversation to the context.
    With them, the messages' images, decoded here unless `media` holds them already."""
    from .chat.prompt import prepare_chat_in_thread

    template = await service.template(resolved)
    conversation = _with_model_messages(resolved, request.messages)
    messages, images = marked_messages(conversation, first=len(conversation) - len(request.messages))
    if media is None:
        media = await _decode(service, images)
    prepared = await prepare_chat_in_thread(
        template,
        messages,
        tools=list(request.tools or ()),
        tool_choice=request.tool_choice,
        think=request.think,
        format=request.format,
        fits=fits,
    )
    return prepared, media


async def render(service: ModelService, request: GenerateRequest | ChatRequest) -> str:
    """The prompt a request would run, without loading the model (nor cutting it to the context, which
    takes the loaded model's tokenizer)."""
    resolved = await _resolve(service, request)
    if isinstance(request, ChatRequest):
        return for_display((await render_chat(service, resolved, request))[0].prompt)
    return for_display((await render_generate(service, resolved, request)).text)


async def _resolve(service: ModelService, request: GenerateRequest | ChatRequest) -> ResolvedModel:
    """The request's model, checked to generate text, and to see when the request carries images."""
    resolved = await service.resolve(request.model, "generate")
    if request.image_count:
        service.check_images(request.model, resolved)
    return resolved


async def _decode(service: ModelService, images: Sequence[Labelled]) -> PromptMedia:
    """The request's images and audio, decoded and bounded in a worker thread."""
    if not images:
        return PromptMedia()
    return PromptMedia(tuple(await anyio.to_thread.run_sync(decode_all, images, service.media_limits)))


async def _tokenize(runner: TextRunner, text: str, media: PromptMedia) -> list[int]:
    if media.items:  # the projector reads each new item: never on the event loop
        return await anyio.to_thread.run_sync(media.tokens, runner, text)
    return await _off_loop(runner, len(text), lambda: runner.tokenize(text))


async def _off_loop(runner: TextRunner, size: int, work: Callable[[], T]) -> T:
    """Work on the runner's vocabulary: inline when small and in this process; a runner in a child
    process answers over a pipe, which the event loop never waits on."""
    if runner.pid is not None:
        return await anyio.to_thread.run_sync(work)
    return await off_loop_if_long(size, work)


def _with_model_messages(resolved: ResolvedModel, messages: Sequence[Message]) -> list[Message]:
    """Prepend the model's own MESSAGE history and SYSTEM prompt, as Ollama does."""
    prefix = [Message.from_any(m) for m in resolved.messages]
    system = resolved.system
    has_system = any(m.role == "system" for m in messages)
    if system and not has_system and not any(m.role == "system" for m in prefix):
        prefix.insert(0, Message(role="system", content=system))
    return prefix + list(messages)

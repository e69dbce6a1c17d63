"""The tool-calling loop: chat, run the tools the model calls, feed the results back, until it answers."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from ..errors import ToolError
from ..types import ChatResponse, Message, ToolCall
from .registry import ToolRegistry
from .run import run_tool_call

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["AgentEvent", "Approver", "EventKind", "agent_loop"]

EventKind = Literal["thinking", "content", "tool_call", "tool_result", "final"]


@attrs.frozen
class AgentEvent:
    """One step of `agent_loop`.

    kind "thinking"/"content": a streamed chunk (`content`/`thinking`); "tool_call": the model asked for
    `call`; "tool_result": `result` of `call` (`approved` False when it was refused); "final": the last
    reply (`content`, `response` the final chunk, `messages` the whole conversation, `done_reason`
    "stop" or "max_rounds").
    """

    kind: EventKind
    round: int
    content: str = ""
    thinking: str = ""
    call: ToolCall | None = None
    result: str | None = None
    approved: bool | None = None
    response: ChatResponse | None = None
    messages: tuple[dict[str, Any], ...] = ()
    done_reason: str | None = None


Approver = Callable[[ToolCall], "bool | Awaitable[bool]"]


def _message_dict(m: Message | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(m, Message):
        data: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.thinking:
            data["thinking"] = m.thinking
        if m.images:
            data["images"] = list(m.images)
        if m.tool_calls:
            data["tool_calls"] = [_call_dict(c) for c in m.tool_calls]
        if m.tool_name:
            data["tool_name"] = m.tool_name
        if m.tool_call_id:
            data["tool_call_id"] = m.tool_call_id
        return data
    if isinstance(m, Mapping):
        return dict(m)
    raise ToolError(f"a message must be a mapping or a Message, got {type(m).__name__}")


def _call_dict(call: ToolCall) -> dict[str, Any]:
    function = {"name": call.function.name, "arguments": dict(call.function.arguments), "index": call.function.index}
    data: dict[str, Any] = {"function": function}
    if call.id:
        data["id"] = call.id
    return data


async def _ask(approve: Approver | None, call: ToolCall) -> bool:
    if approve is None:
        return False
    answer = approve(call)
    if inspect.isawaitable(answer):
        answer = await answer
    return bool(answer)


async def agent_loop(
    engine: Engine,
    model: str,
    messages: Iterable[Message | Mapping[str, Any]],
    tools: Iterable[Any] | ToolRegistry,
    *,
    max_rounds: int = 8,
    approve: Approver | None = None,
    timeout: float | None = 30,
    options: Mapping[str, Any] | None = None,
    **chat_kwargs: Any,
) -> AsyncIterator[AgentEvent]:
    """Chat, run the tools the model calls, feed the results back, and repeat until it answers.

    Each round is one `engine.chat` call. Tools marked `needs_approval` run only when `approve(call)`
    (a function or coroutine function) says yes; without an `approve` they are refused. Unknown tools,
    refusals, failures and timeouts become tool messages the model can read. Extra keyword arguments
    (`think`, `format`, `keep_alive`, `tool_choice`) are passed to `engine.chat`; `tool_choice` only to
    the first round, so a model made to call a tool first can still answer afterwards.
    """
    if max_rounds < 1:
        raise ToolError("max_rounds must be at least 1")
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
    history: list[dict[str, Any]] = [_message_dict(m) for m in messages]
    definitions = registry.to_dicts()
    for round_ in range(1, max_rounds + 1):
        kwargs = dict(chat_kwargs)
        if round_ > 1:
            kwargs.pop("tool_choice", None)  # a forced first call; afterwards the model may answer
        if options is not None:
            kwargs["options"] = options
        stream = engine.chat(model, list(history), tools=definitions, **kwargs)
        content: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        final_chunk: ChatResponse | None = None
        async for chunk in stream:
            message = chunk.message
            if message.thinking:
                thinking.append(message.thinking)
                yield AgentEvent("thinking", round_, thinking=message.thinking)
            if message.content:
                content.append(message.content)
                yield AgentEvent("content", round_, content=message.content)
            for call in message.tool_calls or ():
                calls.append(call if isinstance(call, ToolCall) else ToolCall.from_dict(call))
            if chunk.done:
                final_chunk = chunk
        reply: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if thinking:
            reply["thinking"] = "".join(thinking)
        if calls:
            reply["tool_calls"] = [_call_dict(c) for c in calls]
        if not calls or round_ == max_rounds:
            history.append(reply)
            yield AgentEvent(
                "final",
                round_,
                content=reply["content"],
                thinking=reply.get("thinking", ""),
                response=final_chunk,
                messages=tuple(history),
                done_reason="stop" if not calls else "max_rounds",
            )
            return
        history.append(reply)
        for call in calls:
            yield AgentEvent("tool_call", round_, call=call)
            name = call.function.name
            impl = registry.get(name)
            approved: bool | None = None
            if impl is None:
                result = f"error: there is no tool named {name!r}"
            elif impl.function is None:
                result = f"error: tool {name!r} has no implementation here"
            elif impl.needs_approval and not (approved := await _ask(approve, call)):
                result = f"denied: the user did not approve running {name}"
            else:
                result = await run_tool_call(impl, call.function.arguments, timeout=impl.timeout or timeout)
            tool_message: dict[str, Any] = {"role": "tool", "content": result, "tool_name": name}
            if call.id:
                tool_message["tool_call_id"] = call.id
            history.append(tool_message)
            yield AgentEvent("tool_result", round_, call=call, result=result, approved=approved)

"""From a chat request to a prompt, a grammar and an output parser.

This is where tools, thinking and structured outputs meet the template:

- a template with native tool support gets the tools; one without gets them described in the
  system prompt, and its output is constrained by a grammar so even a small model writes a
  well-formed call (`{"name": ..., "arguments": {...}}`) or plain text; a reply that is text is
  written again without that description (`PreparedChat.text_reply`), so it can never echo it;
- `tool_choice="required"` (or a named function) forces a call with a grammar for any model;
- a template that can think thinks unless `think` is false, and its thinking is split from the
  content with the template's tags; asking a template that cannot think to think is an error;
- `format` ("json" or a JSON schema) constrains the whole reply;
- a harmony model (gpt-oss: `RENDERER`/`PARSER harmony`, or a template in harmony's markers) has its
  reply read by `HarmonyParser`, which finds thinking and calls in harmony's channels;
- a conversation longer than the context loses its oldest messages, as Ollama's `/api/chat` does
  (`fit_conversation`): system messages and the latest message always stay.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import attrs

from ..errors import CapabilityError, InvalidRequest
from .base import ChatTemplate, Think
from .grammar import format_to_grammar, tool_call_grammar
from .harmony import HarmonyParser, harmony_final_opened, harmony_reply_start, harmony_think, uses_harmony
from .thinking import prompt_opens_thinking
from .tools import ChatOutputParser

__all__ = ["PreparedChat", "fit_conversation", "prepare_chat", "prepare_chat_in_thread"]

TOOL_CHOICES = ("auto", "none", "required")
THINK_LEVELS = ("low", "medium", "high", "max")

# Text that is not a call: anything that does not open with "{" (after optional spaces).
_TEXT_RULE = "free-text ::= [ \\t\\n]* [^{ \\t\\n] [^\\x00]*"


@attrs.frozen
class PreparedChat:
    prompt: str
    grammar: str | None
    tools: tuple[Mapping[str, Any], ...]
    tool_prefix: str | None
    thinking_tags: tuple[str, str] | None
    starts_inside_thinking: bool
    #: The request prepared without the tool instructions injected into its system prompt: when the
    #: reply does not open a call, it is written from this instead, so the instructions never reach it.
    text_reply: PreparedChat | None = None
    #: For a harmony model: what the prompt leaves open of the reply, for `HarmonyParser`; None otherwise.
    harmony_start: str | None = None

    def parser(self) -> ChatOutputParser | HarmonyParser:
        if self.harmony_start is not None:
            return HarmonyParser(self.harmony_start)
        return ChatOutputParser(
            tools=list(self.tools) or None,
            tool_prefix=self.tool_prefix,
            thinking_tags=self.thinking_tags,
            starts_inside=self.starts_inside_thinking,
        )


def _describe_tools(tools: Sequence[Mapping[str, Any]]) -> str:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return (
        "You can call the following tools. To call one, reply with only a JSON object of the form "
        '{"name": "<tool name>", "arguments": {<arguments>}} and nothing else. '
        "Otherwise, answer normally.\n\nTools:\n" + listing
    )


def _with_tool_system(messages: list[dict[str, Any]], description: str) -> list[dict[str, Any]]:
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{description}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]


def _chosen_tools(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> tuple[str, list[Mapping[str, Any]]]:
    """Normalise OpenAI-style tool_choice: ("auto" | "none" | "required", the tools a call may use)."""
    if tool_choice is None:
        return "auto", list(tools)
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICES:
            choices = ", ".join(TOOL_CHOICES)
            raise InvalidRequest(f"tool_choice must be one of {choices} or a function, got {tool_choice!r}")
        return tool_choice, list(tools)
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        chosen = [t for t in tools if (t.get("function") or t).get("name") == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the request's tools")
        return "required", chosen
    raise InvalidRequest(f"tool_choice must be a string or a function object, got {tool_choice!r}")


Conversation = list[Mapping[str, Any]]


def _cut(messages: Sequence[Mapping[str, Any]], start: int) -> Conversation:
    """The conversation from `start` on, after the system messages before it (which are never dropped)."""
    return [m for m in messages[:start] if m.get("role") == "system"] + list(messages[start:])


def fit_conversation(
    messages: Sequence[Mapping[str, Any]],
    render: Callable[[Conversation], str],
    fits: Callable[[str], bool],
) -> tuple[Conversation, str]:
    """The messages to prompt with, and their prompt: as Ollama's chat truncation chooses them.

    The whole conversation when its prompt fits; else the oldest messages are dropped, as few as make
    it fit. System messages and the latest message always stay, so when even the latest alone does not
    fit, that is what is sent (and the runner cuts the prompt itself, or refuses it). Ollama tries each
    cut from the oldest on; dropping a message never lengthens the prompt, so a bisection finds the same
    cut with a handful of renders however long the conversation is.
    """
    conversation = list(messages)
    prompt = render(conversation)
    last = len(conversation) - 1
    if last <= 0 or fits(prompt):
        return conversation, prompt
    shortest = _cut(conversation, last)
    shortest_prompt = render(shortest)
    if not fits(shortest_prompt):
        return shortest, shortest_prompt
    too_long, long_enough, kept = 0, last, (shortest, shortest_prompt)  # the cut at `long_enough` fits
    while long_enough - too_long > 1:
        middle = (too_long + long_enough) // 2
        candidate = _cut(conversation, middle)
        candidate_prompt = render(candidate)
        if fits(candidate_prompt):
            long_enough, kept = middle, (candidate, candidate_prompt)
        else:
            too_long = middle
    return kept


def _thinking(template: ChatTemplate, think: Think) -> tuple[Think, tuple[str, str] | None]:
    """The `think` to render with, and the tags to split thinking off with (None when not thinking).

    As in Ollama, a template that can think thinks unless `think` is false, and asking a template
    that cannot think to think is an error.
    """
    if not (think is None or isinstance(think, bool) or think in THINK_LEVELS):
        raise InvalidRequest(f"think must be true, false, 'low', 'medium', 'high' or 'max', got {think!r}")
    tags = template.thinking_tags()
    if tags is None:
        if think is None or think is False:
            return think, None
        raise CapabilityError("this model does not support thinking; leave `think` unset")
    if think is False:
        return False, None
    return (True if think is None else think), tags


def prepare_chat(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] = (),
    tool_choice: Any = None,
    think: Think = None,
    format: Any = None,
    fits: Callable[[str], bool] | None = None,
) -> PreparedChat:
    """Render the prompt and decide the grammar and output parsing for one chat request.

    `fits` says whether a prompt fits the context; given, the conversation is cut to fit (`fit_conversation`).
    """
    choice, callable_tools = _chosen_tools(tools, tool_choice) if tools else ("none", [])
    if choice == "none":
        callable_tools = []
    harmony = uses_harmony(template)
    native = bool(callable_tools) and (template.supports_tools or harmony)
    # Harmony writes thinking and calls in channels of its own: its parser reads them, with no grammar for calls.
    think, tags = (harmony_think(think), None) if harmony else _thinking(template, think)

    grammar = format_to_grammar(format)
    description = _describe_tools(callable_tools) if callable_tools and not native else None
    shown_tools = list(callable_tools) if native else None

    def render(conversation: Conversation) -> str:
        shown = [dict(m) for m in conversation]
        if description is not None:
            shown = _with_tool_system(shown, description)
        return template.render(shown, tools=shown_tools, add_generation_prompt=True, think=think)

    if fits is None:
        kept, prompt = list(messages), render(list(messages))
    else:
        kept, prompt = fit_conversation(messages, render, fits)
    text_reply = None
    if description is not None and choice == "auto" and grammar is None:  # the grammar below lets the reply be text
        text_reply = prepare_chat(template, kept, think=think)  # shorter than `prompt`, so it fits too
    if callable_tools and grammar is None and not harmony:
        call = tool_call_grammar(callable_tools)
        if choice == "required":
            grammar = call
        elif not native:
            # A call, when the model starts one, is always well-formed; anything else is free text.
            grammar = call.replace("root ::=", "call-root ::=", 1) + f"\nroot ::= call-root | free-text\n{_TEXT_RULE}\n"
    harmony_start = harmony_reply_start(kept) if harmony else None
    if harmony_start is not None and grammar is not None:  # a constrained reply cannot write harmony's headers
        prompt, harmony_start = harmony_final_opened(prompt, harmony_start)
    return PreparedChat(
        prompt=prompt,
        grammar=grammar,
        tools=tuple(callable_tools),
        tool_prefix=template.tool_call_prefix() if native else None,
        thinking_tags=tags,
        starts_inside_thinking=bool(tags) and prompt_opens_thinking(prompt, tags[0]) if tags else False,
        text_reply=text_reply,
        harmony_start=harmony_start,
    )


async def prepare_chat_in_thread(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] = (),
    tool_choice: Any = None,
    think: Think = None,
    format: Any = None,
    fits: Callable[[str], bool] | None = None,
) -> PreparedChat:
    """`prepare_chat` in a worker thread: a template is untrusted code, and its render must never stall the event loop.

    The render stops itself at its `TemplateLimits`; cancelling waits for that, since a thread cannot be killed.
    """
    prepare = functools.partial(
        prepare_chat, template, messages, tools=tools, tool_choice=tool_choice, think=think, format=format, fits=fits
    )
    return await anyio.to_thread.run_sync(prepare)

"""A ``localllm run`` session: its model, options and history, and how replies stream to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .format import go_duration
from .portal import wait

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal

    from ..engine import Engine
    from ..types import ChatResponse, GenerateResponse, ToolCall

__all__ = ["Printer", "Session", "print_stats"]


class Printer:
    """Writes streamed text and thinking to stdout, marking thinking as Ollama does."""

    def __init__(self, *, hide_thinking: bool = False, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.hide_thinking = hide_thinking
        self.thinking = False
        self.plain = not self.out.isatty()

    def write(self, content: str, thinking: str | None = None) -> None:
        if thinking and not self.hide_thinking:
            if not self.thinking:
                self.thinking = True
                self.out.write("Thinking...\n" if self.plain else "\x1b[90m\x1b[1mThinking...\x1b[0m\x1b[90m\n")
            self.out.write(thinking)
        if content and self.thinking:
            self.thinking = False
            self.out.write("\n...done thinking.\n\n" if self.plain else "\n\x1b[1m...done thinking.\x1b[0m\n\n")
        if content:
            self.out.write(content)
        self.out.flush()

    def tool_calls(self, calls: Sequence[ToolCall] | None) -> None:
        for call in calls or ():
            arguments = json.dumps(dict(call.function.arguments), ensure_ascii=False)
            self.out.write(f"Calling {call.function.name}({arguments})\n")
        self.out.flush()


def print_stats(final: GenerateResponse | ChatResponse, out: TextIO | None = None) -> None:
    """The timings ``--verbose`` prints (to stderr), as Ollama prints them."""
    stream = out or sys.stderr

    def rate(count: int | None, duration: int | None) -> str:
        if not count or not duration:
            return "0.00 tokens/s"
        return f"{count / (duration / 1e9):.2f} tokens/s"

    stream.write(f"total duration:       {go_duration(final.total_duration)}\n")
    stream.write(f"load duration:        {go_duration(final.load_duration)}\n")
    stream.write(f"prompt eval count:    {final.prompt_eval_count or 0} token(s)\n")
    stream.write(f"prompt eval duration: {go_duration(final.prompt_eval_duration)}\n")
    stream.write(f"prompt eval rate:     {rate(final.prompt_eval_count, final.prompt_eval_duration)}\n")
    stream.write(f"eval count:           {final.eval_count or 0} token(s)\n")
    stream.write(f"eval duration:        {go_duration(final.eval_duration)}\n")
    stream.write(f"eval rate:            {rate(final.eval_count, final.eval_duration)}\n")
    stream.flush()


class Session:
    """The state of ``localllm run``: model, options, history."""

    def __init__(self, engine: Engine, portal: BlockingPortal, args: argparse.Namespace) -> None:
        self.engine = engine
        self.portal = portal
        self.model: str = args.model
        self.options: dict[str, Any] = {}
        self.messages: list[dict[str, Any]] = []
        self.system: str | None = None
        self.format: str | None = args.format or None
        self.keep_alive: str | None = args.keepalive
        self.think: bool | str | None = args.think
        self.verbose: bool = args.verbose
        self.printer = Printer(hide_thinking=args.hidethinking)

    def _common(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"options": dict(self.options) or None, "format": self.format}
        if self.keep_alive is not None:
            kwargs["keep_alive"] = self.keep_alive
        if self.think is not None:
            kwargs["think"] = self.think
        return kwargs

    async def _generate(self, prompt: str) -> GenerateResponse | None:
        final = None
        async for chunk in self.engine.generate(self.model, prompt, **self._common()):
            self.printer.write(chunk.response, chunk.thinking)
            final = chunk
        return final

    async def _chat(self) -> tuple[ChatResponse | None, dict[str, Any]]:
        content: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        final = None
        async for chunk in self.engine.chat(self.model, self.messages, **self._common()):
            message = chunk.message
            self.printer.write(message.content, message.thinking)
            content.append(message.content)
            thinking.append(message.thinking or "")
            if message.tool_calls:
                calls.extend(message.tool_calls)
                self.printer.tool_calls(message.tool_calls)
            final = chunk
        reply: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if any(thinking):
            reply["thinking"] = "".join(thinking)
        if calls:
            reply["tool_calls"] = calls
        return final, reply

    def one_shot(self, prompt: str) -> None:
        """Answer one prompt (a completion, no history)."""
        final = wait(self.portal.start_task_soon(self._generate, prompt))
        sys.stdout.write("\n\n")
        sys.stdout.flush()
        if self.verbose and final is not None:
            print_stats(final)

    def send(self, text: str) -> None:
        """Send a user message and stream the reply; Ctrl-C drops the message from the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            final, reply = wait(self.portal.start_task_soon(self._chat))
        except KeyboardInterrupt:
            self.messages.pop()
            sys.stdout.write("\n\n")
            return
        except Exception:
            self.messages.pop()
            raise
        self.messages.append(reply)
        sys.stdout.write("\n\n")
        sys.stdout.flush()
        if self.verbose and final is not None:
            print_stats(final)

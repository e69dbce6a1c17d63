"""A ``localllm run`` session: its model, options and history, and how replies stream to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .format import go_duration

if TYPE_CHECKING:
    from ..types import ChatResponse, GenerateResponse, ShowResponse, ToolCall
    from .models import Models

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

    def __init__(self, models: Models, args: argparse.Namespace, info: ShowResponse) -> None:
        self.models = models
        self.model: str = args.model
        # The model's own MESSAGE history: the server puts it before ours, and /save keeps it.
        self.model_messages: list[dict[str, Any]] = list(info.messages or ())
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

    def show(self) -> ShowResponse:
        """What the session's model is."""
        return self.models.show(self.model)

    def load(self) -> None:
        """Load the model now (kept per ``--keepalive``), so the first answer does not wait for it."""
        self._load(self.model)

    def _load(self, model: str) -> None:
        from ..request import GenerateRequest

        for _chunk in self.models.send(GenerateRequest(model, keep_alive=self.keep_alive), stream=True):
            pass

    def clear(self) -> None:
        """Forget the conversation; the system message stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def switch(self, model: str) -> ShowResponse:
        """Go on with `model` (loaded now): its own system message and history; parameters and modes stay."""
        info = self.models.show(model)
        self._load(model)
        self.model = model
        self.model_messages = list(info.messages or ())
        self.system = None
        self.messages = []
        return info

    def save(self, name: str) -> None:
        """Create model `name`: this model with the session's system message, parameters and conversation."""
        history = [
            {"role": m["role"], "content": m.get("content") or ""}
            for m in (*self.model_messages, *self.messages)
            if m.get("role") in ("system", "user", "assistant")  # what a Modelfile's MESSAGE can say
        ]
        self.models.create(
            name,
            from_=self.model,
            system=self.system,
            parameters=dict(self.options) or None,
            messages=history or None,
        )

    def _generate(self, prompt: str) -> GenerateResponse | None:
        from ..request import GenerateRequest

        final = None
        for chunk in self.models.send(GenerateRequest(self.model, prompt, **self._common()), stream=True):
            self.printer.write(chunk.response, chunk.thinking)
            final = chunk
        return final

    def _chat(self) -> tuple[ChatResponse | None, dict[str, Any]]:
        from ..request import ChatRequest

        content: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        final = None
        for chunk in self.models.send(ChatRequest(self.model, self.messages, **self._common()), stream=True):
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
        final = self._generate(prompt)
        sys.stdout.write("\n\n")
        sys.stdout.flush()
        if self.verbose and final is not None:
            print_stats(final)

    def send(self, text: str) -> None:
        """Send a user message and stream the reply; Ctrl-C drops the message from the history."""
        self.messages.append({"role": "user", "content": text})
        try:
            final, reply = self._chat()
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

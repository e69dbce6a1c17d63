"""The ``localllm`` command: Ollama's command line over an in-process Engine.

Each command opens an Engine on ``$LOCALLLM_HOME`` (default ``~/.localllm``)
in this process. ``serve`` runs the HTTP shim; ``ps`` and ``stop`` ask a
running server (``$LOCALLLM_HOST``, default ``127.0.0.1:11434``) when one
answers, since a fresh process has nothing loaded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as _dt
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

import anyio
import anyio.from_thread

__all__ = ["main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434


class CLIError(Exception):
    """An error the command reports as ``Error: ...``."""


# --------------------------------------------------------------------------- formatting


def human_bytes(size: int) -> str:
    """Sizes as Ollama prints them: decimal units, no decimals from 10 up."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            value = size / scale
            if value >= 10 or value == int(value):
                return f"{int(value)} {unit}"
            return f"{value:.1f} {unit}"
    return f"{size} B"


def _human_duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 14:
        return f"{hours // 24} days"
    if hours < 24 * 60:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 730:
        return f"{hours // (24 * 30)} months"
    return f"{whole // (3600 * 24 * 365)} years"


def parse_time(value: Any) -> _dt.datetime | None:
    if not value:
        return None
    if isinstance(value, _dt.datetime):
        return value
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()
    return parsed


def human_time(value: Any, zero: str = "Never") -> str:
    """``2 minutes ago``, ``4 minutes from now``, ``Forever``."""
    moment = parse_time(value)
    if moment is None or moment.year <= 1:
        return zero
    delta = (_dt.datetime.now(_dt.timezone.utc) - moment).total_seconds()
    if delta < -20 * 365 * 24 * 3600:
        return "Forever"
    if delta < 0:
        return _human_duration(-delta) + " from now"
    return _human_duration(delta) + " ago"


def go_duration(ns: int | None) -> str:
    """A duration in nanoseconds as Go prints one (``1.234s``, ``56.7ms``)."""
    if not ns:
        return "0s"

    def trim(value: float, digits: int) -> str:
        text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return text or "0"

    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return trim(ns / 1e3, 3) + "µs"
    if ns < 1_000_000_000:
        return trim(ns / 1e6, 6) + "ms"
    seconds = ns / 1e9
    if seconds < 60:
        return trim(seconds, 9) + "s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{int(minutes)}m{trim(secs, 9)}s"
    return f"{int(hours)}h{text}" if hours else text


def table(rows: Sequence[Sequence[str]], *, indent: bool = False, out: TextIO | None = None) -> None:
    """Left-aligned columns separated by four spaces, no borders (Ollama's tables)."""
    stream = out or sys.stdout
    if not rows:
        return
    widths = [max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(max(len(r) for r in rows))]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        line = "    ".join(cells).rstrip()
        stream.write(("    " + line if indent else line) + "\n")


# --------------------------------------------------------------------------- progress display


class Progress:
    """Status lines and a bar per layer, redrawn in place on a terminal, printed once per line otherwise."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.lines: dict[str, str] = {}  # key -> rendered line, in order of appearance
        self.done: set[str] = set()
        self._drawn = 0
        self._last_draw = 0.0

    def _bar(self, label: str, completed: int, total: int) -> str:
        fraction = min(max(completed / total, 0.0), 1.0) if total else 1.0
        width = 25
        filled = int(fraction * width)
        bar = "█" * filled + " " * (width - filled)
        size = human_bytes(total) if completed >= total else f"{human_bytes(completed)}/{human_bytes(total)}"
        return f"{label} {int(fraction * 100):3d}% ▕{bar}▏ {size}"

    def update(self, event: dict[str, Any]) -> None:
        status = str(event.get("status") or "")
        total = event.get("total")
        completed = event.get("completed")
        digest = event.get("digest")
        if isinstance(total, int) and total > 0:
            if not completed:
                return  # the announcement of a layer, before any byte of it
            if status.startswith("pulling") and isinstance(digest, str) and digest:
                key = digest
                label = f"pulling {digest.removeprefix('sha256:')[:12]}:"
            else:
                key = status.split(" sha256:", 1)[0]  # "copying file" and "copying file sha256:..." share a line
                label = f"{key}:"
            line = self._bar(label, int(completed), total)
            finished = int(completed) >= total
        else:
            if not status:
                return
            key, line, finished = "status:" + status, status, True
        previous = self.lines.get(key)
        self.lines[key] = line
        if self.tty:
            self._draw(force=finished and previous != line)
        elif finished and key not in self.done:
            self.out.write(line + "\n")
            self.out.flush()
        if finished:
            self.done.add(key)

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        parts = []
        if self._drawn:
            parts.append(f"\x1b[{self._drawn}A")
        for line in self.lines.values():
            parts.append("\r\x1b[2K" + line + "\n")
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(self.lines)

    def close(self) -> None:
        if self.tty:
            self._draw(force=True)


# --------------------------------------------------------------------------- engine access


@contextlib.contextmanager
def open_engine() -> Iterator[tuple[Any, Any]]:
    """An Engine running on an event loop in a background thread, and the portal to call it through.

    The main thread stays free for the terminal (readline, Ctrl-C).
    """
    from .engine import Engine

    with anyio.from_thread.start_blocking_portal() as portal, portal.wrap_async_context_manager(Engine()) as engine:
        yield engine, portal


def wait(future: concurrent.futures.Future[Any]) -> Any:
    """The result of a task on the portal; Ctrl-C cancels the task (freeing its slot) and re-raises."""
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        with contextlib.suppress(BaseException):
            future.result(timeout=30)
        raise


def server_url() -> str:
    value = os.environ.get("LOCALLLM_HOST", "").strip() or f"{DEFAULT_HOST}:{DEFAULT_PORT}"
    if "://" not in value:
        value = "http://" + value
    scheme, _, rest = value.partition("://")
    if ":" not in rest.rsplit("]", 1)[-1]:
        rest = f"{rest}:{DEFAULT_PORT}"
    return f"{scheme}://{rest}".rstrip("/")


def running_server() -> Any:
    """An httpx client for a server answering at $LOCALLLM_HOST, or None."""
    import httpx

    client = httpx.Client(base_url=server_url(), timeout=httpx.Timeout(30.0, connect=0.5))
    try:
        answer = client.get("/")
        if answer.status_code == 200 and "running" in answer.text:
            return client
    except httpx.HTTPError:
        pass
    client.close()
    return None


def _server_error(response: Any) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text or f"HTTP {response.status_code}"


# --------------------------------------------------------------------------- commands: the store


def cmd_list(args: argparse.Namespace) -> int:
    with open_engine() as (engine, portal):
        models = portal.call(engine.list)
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    prefix = (args.prefix or "").lower()
    for m in models:
        if prefix and not m.name.lower().startswith(prefix):
            continue
        rows.append([m.name, m.digest[:12], human_bytes(m.size), human_time(m.modified_at)])
    table(rows)
    return 0


def _processor(size: int, vram: int) -> str:
    if vram == 0:
        return "100% CPU"
    if vram == size:
        return "100% GPU"
    if vram > size or size == 0:
        return "Unknown"
    cpu = round((size - vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def _until(expires_at: Any) -> str:
    moment = parse_time(expires_at)
    if moment is None:
        return "Never"
    if moment < _dt.datetime.now(_dt.timezone.utc):
        return "Stopping..."
    return human_time(moment)


def cmd_ps(args: argparse.Namespace) -> int:
    client = running_server()
    if client is not None:
        try:
            answer = client.get("/api/ps")
        finally:
            client.close()
        if answer.status_code != 200:
            raise CLIError(_server_error(answer))
        models = [_Obj(m) for m in answer.json().get("models", [])]
    else:
        with open_engine() as (engine, portal):
            models = portal.call(engine.ps)
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        size, vram = int(m.size or 0), int(m.size_vram or 0)
        rows.append(
            [
                m.name,
                (m.digest or "")[:12],
                human_bytes(size),
                _processor(size, vram),
                str(m.context_length or ""),
                _until(m.expires_at),
            ]
        )
    table(rows)
    return 0


class _Obj:
    """Attribute access to a JSON object (missing fields are None)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return self._data.get(name)


def cmd_rm(args: argparse.Namespace) -> int:
    with open_engine() as (engine, portal):
        for name in args.models:
            portal.call(engine.delete, name)
            print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    with open_engine() as (engine, portal):
        portal.call(engine.copy, args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    client = running_server()
    if client is not None:
        try:
            answer = client.post("/api/generate", json={"model": args.model, "keep_alive": 0, "stream": False})
        finally:
            client.close()
        if answer.status_code == 404:
            raise CLIError(f'couldn\'t find model "{args.model}" to stop')
        if answer.status_code != 200:
            raise CLIError(_server_error(answer))
        return 0
    from .errors import ModelNotFound

    with open_engine() as (engine, portal):
        try:
            portal.call(engine.unload, args.model)
        except ModelNotFound:
            raise CLIError(f'couldn\'t find model "{args.model}" to stop') from None
    return 0


def _progress_callback(display: Progress) -> Callable[[dict[str, Any]], None]:
    def callback(event: dict[str, Any]) -> None:
        display.update(dict(event))

    return callback


def cmd_pull(args: argparse.Namespace) -> int:
    display = Progress()
    try:
        with open_engine() as (engine, portal):
            wait(
                portal.start_task_soon(
                    lambda: engine.pull(args.model, progress=_progress_callback(display), insecure=args.insecure)
                )
            )
    finally:
        display.close()
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    modelfile = Path(args.file) if args.file else Path("Modelfile")
    if not modelfile.is_file():
        if args.file:
            raise CLIError(f"no such Modelfile: {args.file}")
        raise CLIError("no Modelfile found in the current folder; give one with -f")
    display = Progress()
    display.update({"status": "gathering model components"})
    try:
        with open_engine() as (engine, portal):
            wait(
                portal.start_task_soon(
                    lambda: engine.create(
                        args.model, modelfile=modelfile, quantize=args.quantize, progress=_progress_callback(display)
                    )
                )
            )
    finally:
        display.close()
    return 0


# --------------------------------------------------------------------------- show


def _model_rows(info: Any) -> list[list[str]]:
    details = info.details
    model_info = info.model_info or {}
    arch = str(model_info.get("general.architecture") or "")
    rows: list[list[str]] = []
    if arch:
        rows.append(["", "architecture", arch])
    else:
        rows.append(["", "architecture", str(details.family or "")])
    params = details.parameter_size or ""
    if not params and model_info.get("general.parameter_count"):
        params = str(model_info["general.parameter_count"])
    if params:
        rows.append(["", "parameters", params])
    for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
        value = model_info.get(f"{arch}.{key}")
        if value is not None:
            rows.append(["", label, str(value)])
    rows.append(["", "quantization", str(details.quantization_level or "")])
    return rows


def _head(text: str, count: int) -> list[list[str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [["", line] for line in lines[:count]]
    if len(lines) > count:
        rows.append(["", "..."])
    return rows


def show_info(info: Any, *, verbose: bool = False, out: TextIO | None = None) -> None:
    stream = out or sys.stdout

    def section(title: str, rows: list[list[str]]) -> None:
        stream.write(f"  {title}\n")
        table(rows, out=stream)
        stream.write("\n")

    section("Model", _model_rows(info))
    if info.capabilities:
        section("Capabilities", [["", str(c)] for c in info.capabilities])
    if info.parameters:
        section("Parameters", [["", *line.split(None, 1)] for line in info.parameters.splitlines() if line.strip()])
    if verbose and info.model_info:
        rows = []
        for key in sorted(info.model_info):
            value = info.model_info[key]
            if isinstance(value, (list, tuple)):
                text = (
                    "["
                    + " ".join(str(v) for v in value[:3])
                    + (f" ...+{len(value) - 3} more]" if len(value) > 3 else "]")
                )
            else:
                text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
            rows.append(["", key, text])
        section("Metadata", rows)
    if info.system:
        section("System", _head(info.system, 2))
    if info.license:
        section("License", _head(info.license, 2))


def cmd_show(args: argparse.Namespace) -> int:
    chosen = [name for name in ("license", "modelfile", "parameters", "system", "template") if getattr(args, name)]
    if len(chosen) > 1:
        raise CLIError(
            "only one of '--license', '--modelfile', '--parameters', '--system', or '--template' can be specified"
        )
    with open_engine() as (engine, portal):
        info = portal.call(lambda: engine.show(args.model, verbose=args.verbose))
    if not chosen:
        show_info(info, verbose=args.verbose)
        return 0
    value = getattr(info, chosen[0]) or ""
    if chosen[0] in ("system", "template"):
        sys.stdout.write(value)
    else:
        print(value)
    return 0


# --------------------------------------------------------------------------- run


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

    def tool_calls(self, calls: Any) -> None:
        for call in calls or ():
            arguments = json.dumps(dict(call.function.arguments), ensure_ascii=False)
            self.out.write(f"Calling {call.function.name}({arguments})\n")
        self.out.flush()


def print_stats(final: Any, out: TextIO | None = None) -> None:
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

    def __init__(self, engine: Any, portal: Any, args: argparse.Namespace) -> None:
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

    async def _generate(self, prompt: str) -> Any:
        final = None
        async for chunk in self.engine.generate(self.model, prompt, **self._common()):
            self.printer.write(chunk.response, chunk.thinking)
            final = chunk
        return final

    async def _chat(self) -> tuple[Any, dict[str, Any]]:
        content: list[str] = []
        thinking: list[str] = []
        calls: list[Any] = []
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
        final = wait(self.portal.start_task_soon(self._generate, prompt))
        sys.stdout.write("\n\n")
        sys.stdout.flush()
        if self.verbose and final is not None:
            print_stats(final)

    def send(self, text: str) -> None:
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


def _usage(out: TextIO) -> None:
    out.write(
        "Available Commands:\n"
        "  /set            Set session variables\n"
        "  /show           Show model information\n"
        "  /clear          Clear session context\n"
        "  /bye            Exit\n"
        "  /?, /help       Help for a command\n"
        "\n"
        'Use """ to begin a multi-line message.\n\n'
    )


def _usage_set(out: TextIO) -> None:
    out.write(
        "Available Commands:\n"
        "  /set parameter ...     Set a parameter\n"
        "  /set system <string>   Set system message\n"
        "  /set format json       Enable JSON mode\n"
        "  /set noformat          Disable formatting\n"
        "  /set verbose           Show LLM stats\n"
        "  /set quiet             Disable LLM stats\n"
        "  /set think             Enable thinking\n"
        "  /set nothink           Disable thinking\n\n"
    )


def _usage_show(out: TextIO) -> None:
    out.write(
        "Available Commands:\n"
        "  /show info         Show details for this model\n"
        "  /show license      Show model license\n"
        "  /show modelfile    Show Modelfile for this model\n"
        "  /show parameters   Show parameters for this model\n"
        "  /show system       Show system message\n"
        "  /show template     Show prompt template\n\n"
    )


def _usage_parameters(out: TextIO) -> None:
    out.write(
        "Available Parameters:\n"
        "  /set parameter seed <int>             Random number seed\n"
        "  /set parameter num_predict <int>      Max number of tokens to predict\n"
        "  /set parameter top_k <int>            Pick from top k num of tokens\n"
        "  /set parameter top_p <float>          Pick token based on sum of probabilities\n"
        "  /set parameter min_p <float>          Pick token based on top token probability * min_p\n"
        "  /set parameter num_ctx <int>          Set the context size\n"
        "  /set parameter temperature <float>    Set creativity level\n"
        "  /set parameter repeat_penalty <float> How strongly to penalize repetitions\n"
        "  /set parameter repeat_last_n <int>    Set how far back to look for repetitions\n"
        "  /set parameter num_gpu <int>          The number of layers to send to the GPU\n"
        "  /set parameter stop <string> <string> ...   Set the stop parameters\n\n"
    )


def _set_command(session: Session, words: list[str], line: str) -> None:
    from .errors import LocalLLMError
    from .options import parse_option_value

    if len(words) < 2:
        _usage_set(sys.stderr)
        return
    what = words[1]
    if what == "parameter":
        if len(words) < 4:
            _usage_parameters(sys.stderr)
            return
        name, values = words[2], words[3:]
        try:
            parsed = [parse_option_value(name, value) for value in values]
        except LocalLLMError as exc:
            print(f"Couldn't set parameter: {exc}")
            return
        if name == "stop":
            session.options[name] = [value for item in parsed for value in item]
        else:
            session.options[name] = parsed[0]
        print(f"Set parameter '{name}' to '{', '.join(values)}'")
    elif what == "system":
        text = line.split("system", 1)[1].strip()
        if not text:
            _usage_set(sys.stderr)
            return
        if text.startswith('"""') and text.endswith('"""') and len(text) >= 6:
            text = text[3:-3]
        session.system = text
        message = {"role": "system", "content": text}
        if session.messages and session.messages[-1]["role"] == "system":
            session.messages[-1] = message
        else:
            session.messages.append(message)
        print("Set system message.")
    elif what == "format":
        if len(words) < 3 or words[2] != "json":
            print("Invalid or missing format. For 'json' mode use '/set format json'")
        else:
            session.format = "json"
            print("Set format to 'json' mode.")
    elif what == "noformat":
        session.format = None
        print("Disabled format.")
    elif what == "verbose":
        session.verbose = True
        print("Set 'verbose' mode.")
    elif what == "quiet":
        session.verbose = False
        print("Set 'quiet' mode.")
    elif what == "think":
        session.think = words[2] if len(words) > 2 else True
        print(f"Set 'think' mode to '{words[2]}'." if len(words) > 2 else "Set 'think' mode.")
    elif what == "nothink":
        session.think = False
        print("Set 'nothink' mode.")
    else:
        print(f"Unknown command '/set {what}'. Type /? for help")


def _show_command(session: Session, words: list[str]) -> None:
    if len(words) < 2:
        _usage_show(sys.stderr)
        return
    info = session.portal.call(session.engine.show, session.model)
    what = words[1]
    if what == "info":
        show_info(info, out=sys.stderr)
    elif what == "license":
        print(info.license or "No license was specified for this model.")
    elif what == "modelfile":
        print(info.modelfile)
    elif what == "parameters":
        print("Model defined parameters:")
        if not info.parameters:
            print("  No additional parameters were specified for this model.")
        else:
            for line in info.parameters.splitlines():
                print(f"  {line}")
        print()
        if session.options:
            print("User defined parameters:")
            for key, value in session.options.items():
                print(f"  {key:<30} {value}")
            print()
    elif what == "system":
        text = session.system or info.system
        print(text + "\n" if text else "No system message was specified for this model.")
    elif what == "template":
        print(info.template or "No prompt template was specified for this model.")
    else:
        print(f"Unknown command '/show {what}'. Type /? for help")


def _read_line(prompt: str, interactive_terminal: bool) -> str:
    if interactive_terminal:
        return input(prompt)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def interactive(session: Session) -> None:
    """The chat loop: one line a message, commands starting with a slash, ``\"\"\"`` for several lines."""
    terminal = sys.stdin.isatty()
    if terminal:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
    buffer: list[str] = []
    multiline = False
    while True:
        try:
            line = _read_line("... " if multiline else ">>> ", terminal)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            if not multiline and not buffer:
                print("\nUse Ctrl + d or /bye to exit.")
            buffer, multiline = [], False
            continue
        if multiline:
            if line.endswith('"""'):
                buffer.append(line[:-3])
                multiline = False
            else:
                buffer.append(line)
                continue
        elif line.startswith('"""'):
            rest = line[3:]
            if rest.endswith('"""') and len(rest) >= 3:
                buffer.append(rest[:-3])
            else:
                buffer.append(rest)
                multiline = True
                continue
        elif line.startswith("/"):
            words = line.split()
            command = words[0]
            if command in ("/bye", "/exit"):
                return
            if command == "/clear":
                session.messages = [{"role": "system", "content": session.system}] if session.system else []
                print("Cleared session context")
            elif command == "/set":
                _set_command(session, words, line)
            elif command == "/show":
                _show_command(session, words)
            elif command in ("/?", "/help"):
                topic = words[1].lstrip("/") if len(words) > 1 else ""
                {"set": _usage_set, "show": _usage_show}.get(topic, _usage)(sys.stderr)
            else:
                print(f"Unknown command '{command}'. Type /? for help")
            continue
        else:
            buffer.append(line)
        text = "\n".join(buffer)
        buffer = []
        if text.strip():
            session.send(text)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = " ".join(args.prompt)
    stdin_is_terminal = sys.stdin.isatty()
    one_shot = bool(prompt) or (not stdin_is_terminal and not args.interactive)
    if one_shot and not stdin_is_terminal and not args.interactive:
        piped = sys.stdin.read()
        if piped:
            prompt = piped + (" " + prompt if prompt else "")
    with open_engine() as (engine, portal):
        info = portal.call(engine.show, args.model)
        session = Session(engine, portal, args)
        if "embedding" in (info.capabilities or ()) and "completion" not in (info.capabilities or ()):
            if not prompt:
                raise CLIError(
                    f'embedding models require input text. Usage: localllm run {args.model} "your text here"'
                )
            result = portal.call(lambda: engine.embed(args.model, prompt))
            print(json.dumps([float(x) for x in result.embeddings[0]]))
            return 0
        if one_shot:
            session.one_shot(prompt)
            return 0
        load = getattr(engine, "load", None)
        if load is not None:
            wait(portal.start_task_soon(lambda: load(args.model, keep_alive=args.keepalive)))
        for message in info.messages or ():
            if message.get("role") == "user":
                print(f">>> {message.get('content', '')}")
            elif message.get("role") == "assistant":
                print(f"{message.get('content', '')}\n")
        interactive(session)
    return 0


# --------------------------------------------------------------------------- serve


def _parse_host(value: str) -> tuple[str, int]:
    text = value.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else DEFAULT_PORT
    if text.count(":") == 1:
        host, port = text.split(":")
        return host or DEFAULT_HOST, int(port)
    return text or DEFAULT_HOST, DEFAULT_PORT


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .http import run
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    host, port = DEFAULT_HOST, DEFAULT_PORT
    if os.environ.get("LOCALLLM_HOST"):
        try:
            host, port = _parse_host(os.environ["LOCALLLM_HOST"])
        except ValueError:
            raise CLIError(f"invalid LOCALLLM_HOST {os.environ['LOCALLLM_HOST']!r}") from None
    if args.host is not None:
        host = args.host
    if args.port is not None:
        port = args.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs: dict[str, Any] = {}
    if args.max_request_size is not None:
        kwargs["max_request_size"] = args.max_request_size
    try:
        run(host, port, allow_remote=args.allow_remote, **kwargs)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return 0


# --------------------------------------------------------------------------- parser and main


def _think_value(text: str) -> bool | str:
    lowered = text.lower()
    if lowered in ("", "true"):
        return True
    if lowered == "false":
        return False
    if lowered in ("low", "medium", "high", "max"):
        return lowered
    raise argparse.ArgumentTypeError(f"invalid value for --think: {text!r} (true, false, low, medium, high or max)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localllm",
        description="Large language models, run in this process (Ollama's engine as a Python library).",
    )
    parser.add_argument("-v", "--version", action="store_true", help="show the version")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve Ollama's API and the OpenAI-compatible API over HTTP")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, or $LOCALLLM_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (default 11434)")
    serve.add_argument(
        "--allow-remote", action="store_true", help="allow listening on an address other machines can reach"
    )
    serve.add_argument("--max-request-size", type=int, help="largest JSON request body, in bytes")
    serve.set_defaults(handler=cmd_serve)

    create = commands.add_parser("create", help="create a model from a Modelfile")
    create.add_argument("model", metavar="MODEL")
    create.add_argument("-f", "--file", help="the Modelfile (default: ./Modelfile)")
    create.add_argument("-q", "--quantize", help="quantize the model to this level (e.g. q4_K_M)")
    create.set_defaults(handler=cmd_create)

    show = commands.add_parser("show", help="show information about a model")
    show.add_argument("model", metavar="MODEL")
    for name in ("license", "modelfile", "parameters", "system", "template"):
        show.add_argument(f"--{name}", action="store_true", help=f"show the model's {name}")
    show.add_argument("-v", "--verbose", action="store_true", help="show more (all metadata)")
    show.set_defaults(handler=cmd_show)

    run = commands.add_parser("run", help="run a model: answer a prompt, or chat")
    run.add_argument("model", metavar="MODEL")
    run.add_argument("prompt", metavar="PROMPT", nargs="*")
    run.add_argument("--format", choices=["json"], help="the response format")
    run.add_argument("--keepalive", help="how long to keep the model loaded (e.g. 5m)")
    run.add_argument("--verbose", action="store_true", help="show timings after each response")
    run.add_argument(
        "--think", nargs="?", const="true", type=_think_value, help="think before answering (true, false, or a level)"
    )
    run.add_argument("--hidethinking", action="store_true", help="think, but do not print the thinking")
    run.add_argument("--nowordwrap", action="store_true", help="do not wrap words (output is never wrapped)")
    run.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("-i", "--interactive", action="store_true", help="chat even when standard input is not a terminal")
    run.set_defaults(handler=cmd_run)

    stop = commands.add_parser("stop", help="unload a running model")
    stop.add_argument("model", metavar="MODEL")
    stop.set_defaults(handler=cmd_stop)

    pull = commands.add_parser("pull", help="download a model from a registry or Hugging Face")
    pull.add_argument("model", metavar="MODEL")
    pull.add_argument("--insecure", action="store_true", help="allow plain http registries")
    pull.set_defaults(handler=cmd_pull)

    for name in ("list", "ls"):
        listing = commands.add_parser(name, help="list models" if name == "list" else "list models (alias)")
        listing.add_argument("prefix", metavar="PREFIX", nargs="?", help="only names starting with this")
        listing.set_defaults(handler=cmd_list)

    ps = commands.add_parser("ps", help="list running models")
    ps.set_defaults(handler=cmd_ps)

    cp = commands.add_parser("cp", help="copy a model")
    cp.add_argument("source", metavar="SOURCE")
    cp.add_argument("destination", metavar="DESTINATION")
    cp.set_defaults(handler=cmd_cp)

    rm = commands.add_parser("rm", help="remove models")
    rm.add_argument("models", metavar="MODEL", nargs="+")
    rm.set_defaults(handler=cmd_rm)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    sys.stderr.write(f"Warning: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"localllm version is {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    warnings.showwarning = _show_warning
    if args.command != "serve":
        logging.basicConfig(level=logging.ERROR, format="%(message)s")
    from .errors import LocalLLMError

    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    except Exception as exc:
        if os.environ.get("LOCALLLM_DEBUG") and not isinstance(exc, (CLIError, LocalLLMError)):
            raise
        sys.stdout.flush()
        message = str(exc) or type(exc).__name__
        sys.stderr.write(f"Error: {message}\n")
        return 1
    return status

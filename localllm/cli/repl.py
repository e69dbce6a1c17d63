"""The interactive chat of ``localllm run``: reading lines, ``\"\"\"`` blocks, and the slash commands."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from .errors import CLIError
from .format import show_info
from .session import Session

__all__ = ["interactive", "print_history"]


def _usage(out: TextIO) -> None:
    out.write(
        "Available Commands:\n"
        "  /set            Set session variables\n"
        "  /show           Show model information\n"
        "  /load <model>   Load a session or model\n"
        "  /save <model>   Save your current session\n"
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
    from ..errors import LocalLLMError
    from ..options import parse_option_value

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
    info = session.show()
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


def print_history(messages: Iterable[Mapping[str, Any]]) -> None:
    """A model's stored conversation, as the prompt would have shown it."""
    for message in messages:
        if message.get("role") == "user":
            print(f">>> {message.get('content', '')}")
        elif message.get("role") == "assistant":
            print(f"{message.get('content', '')}\n")


def _load_command(session: Session, words: list[str]) -> None:
    from ..errors import LocalLLMError, NotFoundError

    if len(words) != 2:
        print("Usage:\n  /load <modelname>")
        return
    model = words[1]
    print(f"Loading model '{model}'")
    try:
        info = session.switch(model)
    except NotFoundError:
        print(f"Couldn't find model '{model}'")
        return
    except (LocalLLMError, CLIError) as exc:
        print(f"error: {exc}")
        return
    print_history(info.messages or ())


def _save_command(session: Session, words: list[str]) -> None:
    from ..errors import InvalidModelName, LocalLLMError

    if len(words) != 2:
        print("Usage:\n  /save <modelname>")
        return
    name = words[1]
    try:
        session.save(name)
    except InvalidModelName:
        print(f"error: The model name '{name}' is invalid")
        return
    except (LocalLLMError, CLIError) as exc:
        print(f"error: {exc}")
        return
    print(f"Created new model '{name}'")


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
                session.clear()
                print("Cleared session context")
            elif command == "/load":
                _load_command(session, words)
            elif command == "/save":
                _save_command(session, words)
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

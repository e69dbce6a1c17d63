"""The command line's grammar: subcommands, their arguments and the handler each one runs."""

from __future__ import annotations

import argparse

from .commands import cmd_cp, cmd_create, cmd_list, cmd_ps, cmd_pull, cmd_rm, cmd_run, cmd_serve, cmd_show, cmd_stop

__all__ = ["build_parser"]


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
    """The parser; each subcommand sets ``handler``, the function that runs it."""
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
    serve.add_argument(
        "--allow-local-paths",
        action="store_true",
        help="let clients name files on this machine as models (regular files only)",
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

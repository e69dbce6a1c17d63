"""The command line's grammar: subcommands, their arguments and the handler each one runs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .commands import (
    cmd_cp,
    cmd_create,
    cmd_embed,
    cmd_list,
    cmd_ps,
    cmd_pull,
    cmd_push,
    cmd_rm,
    cmd_run,
    cmd_serve,
    cmd_show,
    cmd_stop,
)

__all__ = ["build_parser"]

#: ``--think=WORD`` and what it asks of the model (``--think`` alone is ``true``).
THINK_VALUES: dict[str, bool | str] = {
    "true": True,
    "false": False,
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
}


class IntermixedParser(argparse.ArgumentParser):
    """Options anywhere among the words (``run MODEL --keepalive 10m PROMPT``), as Ollama's command takes them."""

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:  # the intermixed parse calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _add_flag_values(parser: argparse.ArgumentParser, flag: str, values: dict[str, Any]) -> None:
    """Accept ``--flag=WORD`` for each word, while ``--flag`` alone takes no value (a prompt may follow it)."""
    for word, value in values.items():
        parser.add_argument(
            f"{flag}={word}", dest=flag.lstrip("-"), action="store_const", const=value, help=argparse.SUPPRESS
        )


def _add_embedding_options(parser: argparse.ArgumentParser, scope: str = "") -> None:
    parser.add_argument("--dimensions", type=int, metavar="N", help=f"{scope}keep the first N dimensions of the vector")
    parser.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        help=f"{scope}cut inputs longer than the context (the default), or fail on them",
    )
    _add_flag_values(parser, "--truncate", {"true": True, "false": False})


LOCAL_HELP = "run in this process, on the local store, even when a server is set or running"


def _add_local_flag(parser: argparse.ArgumentParser) -> None:
    """``--local`` among a command's words too; left unset there unless given, so one before the command counts."""
    parser.add_argument("--local", action="store_true", default=argparse.SUPPRESS, help=LOCAL_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The parser; each subcommand sets ``handler``, the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="localllm",
        description="Large language models: through a running server, or in this process (Ollama's engine as a "
        "Python library).",
    )
    parser.add_argument("-v", "--version", action="store_true", help="show the version")
    parser.add_argument("--local", action="store_true", help=LOCAL_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=IntermixedParser)

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
    serve.add_argument("--ray", action="store_true", help="serve the models of a Ray cluster: one engine per node")
    serve.add_argument("--ray-address", help="the Ray cluster to join (default: the one this machine is part of)")
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
        "--think",
        action="store_const",
        const=True,
        help="think before answering; --think=false turns it off, --think=low|medium|high|max sets how much",
    )
    _add_flag_values(run, "--think", THINK_VALUES)
    run.add_argument("--hidethinking", action="store_true", help="think, but do not print the thinking")
    run.add_argument("--nowordwrap", action="store_true", help="do not wrap words (output is never wrapped)")
    run.add_argument("--insecure", action="store_true", help="allow a plain http registry when the model is pulled")
    run.add_argument("-i", "--interactive", action="store_true", help="chat even when standard input is not a terminal")
    _add_embedding_options(run, "embedding models: ")
    run.set_defaults(handler=cmd_run)

    embed = commands.add_parser("embed", help="print the embedding of a text (from the words given, or stdin)")
    embed.add_argument("model", metavar="MODEL")
    embed.add_argument("text", metavar="TEXT", nargs="*")
    embed.add_argument("--keepalive", help="how long to keep the model loaded (e.g. 5m)")
    _add_embedding_options(embed)
    embed.set_defaults(handler=cmd_embed)

    stop = commands.add_parser("stop", help="unload a running model")
    stop.add_argument("model", metavar="MODEL")
    stop.set_defaults(handler=cmd_stop)

    pull = commands.add_parser("pull", help="download a model from a registry or Hugging Face")
    pull.add_argument("model", metavar="MODEL")
    pull.add_argument("--insecure", action="store_true", help="allow plain http registries")
    pull.set_defaults(handler=cmd_pull)

    push = commands.add_parser("push", help="not supported: localllm does not upload models to a registry")
    push.add_argument("model", metavar="MODEL")
    push.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    push.set_defaults(handler=cmd_push)

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

    for name, command in commands.choices.items():
        if name != "serve":  # the server is this process
            _add_local_flag(command)
    return parser

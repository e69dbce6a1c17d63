"""One handler per subcommand: read the parsed arguments, call the Engine, print the result, return the status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CLIError
from .format import human_bytes, human_time, processor, show_info, table, until
from .models import Models, open_models
from .portal import open_engine, wait
from .progress import Progress, progress_callback
from .remote import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    JSONObject,
    host_setting,
    parse_host,
    running_models,
    running_server,
    stop_model,
)
from .repl import interactive, print_history
from .session import Session

if TYPE_CHECKING:
    from ..types import ProcessModel

__all__ = [
    "cmd_cp",
    "cmd_create",
    "cmd_embed",
    "cmd_list",
    "cmd_ps",
    "cmd_pull",
    "cmd_push",
    "cmd_rm",
    "cmd_run",
    "cmd_serve",
    "cmd_show",
    "cmd_stop",
]


# --------------------------------------------------------------------------- the store


def cmd_list(args: argparse.Namespace) -> int:
    with open_engine() as (engine, portal):
        models = portal.call(engine.list).models
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    prefix = (args.prefix or "").lower()
    for m in models:
        if prefix and not m.name.lower().startswith(prefix):
            continue
        rows.append([m.name, m.digest[:12], human_bytes(m.size), human_time(m.modified_at)])
    table(rows)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    client = running_server()
    models: Sequence[ProcessModel | JSONObject]
    if client is not None:
        models = running_models(client)
    else:
        with open_engine() as (engine, portal):
            models = portal.call(engine.ps).models
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        size, vram = int(m.size or 0), int(m.size_vram or 0)
        rows.append(
            [
                m.name,
                (m.digest or "")[:12],
                human_bytes(size),
                processor(size, vram),
                str(m.context_length or ""),
                until(m.expires_at),
            ]
        )
    table(rows)
    return 0


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
    not_found = CLIError(f'couldn\'t find model "{args.model}" to stop')
    client = running_server()
    if client is not None:
        if not stop_model(client, args.model):
            raise not_found
        return 0
    from ..errors import ModelNotFound

    with open_engine() as (engine, portal):
        try:
            portal.call(engine.unload, args.model)
        except ModelNotFound:
            raise not_found from None
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    display = Progress()
    try:
        with open_engine() as (engine, portal):
            wait(
                portal.start_task_soon(
                    lambda: engine.pull(args.model, progress=progress_callback(display), insecure=args.insecure)
                )
            )
    finally:
        display.close()
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    raise CLIError(
        f"cannot push '{args.model}': localllm does not push models to a registry "
        "(its store has Ollama's layout, so `ollama push` can, with OLLAMA_MODELS set to localllm's models folder)"
    )


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
                        args.model, modelfile=modelfile, quantize=args.quantize, progress=progress_callback(display)
                    )
                )
            )
    finally:
        display.close()
    return 0


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


# --------------------------------------------------------------------------- run, embed and serve


def _with_piped_input(words: Sequence[str]) -> str:
    """The words as one text, after what standard input holds when it is not a terminal (as ``ollama run`` reads)."""
    piped = "" if sys.stdin.isatty() else sys.stdin.read()
    return " ".join(part for part in (piped, *words) if part)


def _print_embedding(models: Models, args: argparse.Namespace, text: str) -> None:
    if not text:
        usage = f'localllm {args.command} {args.model} "your text here"'
        raise CLIError(f"embedding models require input text. Usage: {usage}")
    result = models.embed(
        args.model, text, truncate=args.truncate, keep_alive=args.keepalive, dimensions=args.dimensions
    )
    print(json.dumps([float(x) for x in result.embeddings[0]], separators=(",", ":")))


def cmd_run(args: argparse.Namespace) -> int:
    words = " ".join(args.prompt)
    chat = sys.stdin.isatty() or args.interactive  # else standard input is the prompt, not the chat
    prompt = words if chat else _with_piped_input(args.prompt)
    one_shot = bool(words) or not chat
    with open_models() as models:
        info = models.show(args.model)
        capabilities = info.capabilities or ()
        if "embedding" in capabilities and "completion" not in capabilities:
            _print_embedding(models, args, prompt)
            return 0
        session = Session(models, args, info)
        if one_shot:
            session.one_shot(prompt)
            return 0
        session.load()
        print_history(session.model_messages)
        interactive(session)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    with open_models() as models:
        _print_embedding(models, args, _with_piped_input(args.text))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..http import run
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    host, port = DEFAULT_HOST, DEFAULT_PORT
    setting = host_setting()
    if setting is not None:
        variable, value = setting
        try:
            host, port = parse_host(value)
        except ValueError:
            raise CLIError(f"invalid {variable} {value!r}") from None
    if args.host is not None:
        host = args.host
    if args.port is not None:
        port = args.port
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kwargs: dict[str, Any] = {}
    if args.max_request_size is not None:
        kwargs["max_request_size"] = args.max_request_size
    if args.ray or args.ray_address:
        try:
            from ..ray import ClusterEngine
        except ImportError as exc:
            raise CLIError(str(exc)) from None
        address = args.ray_address
        kwargs["engine_factory"] = lambda: ClusterEngine(address)
    try:
        run(host, port, allow_remote=args.allow_remote, allow_local_paths=args.allow_local_paths, **kwargs)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return 0

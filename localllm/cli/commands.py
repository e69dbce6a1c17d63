"""One handler per subcommand: read the parsed arguments, call the models (`open_models`), print, return the status."""

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
from .progress import Progress, progress_callback
from .remote import DEFAULT_HOST, DEFAULT_PORT, host_setting, parse_host
from .repl import interactive, print_history
from .session import Session

if TYPE_CHECKING:
    from ..types import ShowResponse

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
    with open_models(local=args.local) as models:
        listed = models.list().models
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    prefix = (args.prefix or "").lower()
    for m in listed:
        if prefix and not m.name.lower().startswith(prefix):
            continue
        rows.append([m.name, m.digest[:12], human_bytes(m.size), human_time(m.modified_at)])
    table(rows)
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    with open_models(local=args.local) as models:
        running = models.ps().models
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in running:
        rows.append(
            [
                m.name,
                m.digest[:12],
                human_bytes(m.size),
                processor(m.size, m.size_vram),
                str(m.context_length or ""),
                until(m.expires_at),
            ]
        )
    table(rows)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with open_models(local=args.local) as models:
        for name in args.models:
            models.delete(name)
            print(f"deleted '{name}'")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    with open_models(local=args.local) as models:
        models.copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def _same_model(a: str, b: str) -> bool:
    """Whether two names name one model (``smollm2`` is ``smollm2:latest``); paths are compared as written."""
    from ..errors import LocalLLMError
    from ..parsing import ModelName

    try:
        return ModelName.parse(a) == ModelName.parse(b)
    except LocalLLMError:
        return a == b


def cmd_stop(args: argparse.Namespace) -> int:
    from ..request import GenerateRequest

    with open_models(local=args.local) as models:
        if not any(_same_model(m.name, args.model) or _same_model(m.model, args.model) for m in models.ps().models):
            raise CLIError(f'couldn\'t find model "{args.model}" to stop')
        for _chunk in models.send(
            GenerateRequest(args.model, keep_alive=0), stream=True
        ):  # an empty request: unload it now
            pass
    return 0


def _pull(models: Models, model: str, *, insecure: bool) -> None:
    """Pull a model, drawing its progress as ``ollama pull`` does."""
    display = Progress()
    try:
        models.pull(model, insecure=insecure, progress=progress_callback(display))
    finally:
        display.close()


def cmd_pull(args: argparse.Namespace) -> int:
    with open_models(local=args.local) as models:
        _pull(models, args.model, insecure=args.insecure)
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
    with open_models(local=args.local) as models:
        display = Progress()
        display.update({"status": "gathering model components"})
        try:
            models.create(args.model, modelfile=modelfile, quantize=args.quantize, progress=progress_callback(display))
        finally:
            display.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    chosen = [name for name in ("license", "modelfile", "parameters", "system", "template") if getattr(args, name)]
    if len(chosen) > 1:
        raise CLIError(
            "only one of '--license', '--modelfile', '--parameters', '--system', or '--template' can be specified"
        )
    with open_models(local=args.local) as models:
        info = models.show(args.model, verbose=args.verbose)
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
    from ..request import EmbedRequest

    request = EmbedRequest(
        args.model, text, truncate=args.truncate is not False, keep_alive=args.keepalive, dimensions=args.dimensions
    )
    result = models.send(request)
    print(json.dumps([float(x) for x in result.embeddings[0]], separators=(",", ":")))


def _show_or_pull(models: Models, model: str, *, insecure: bool) -> ShowResponse:
    """The model's details; a model not in the store is pulled first, as ``ollama run`` does (a path is not)."""
    from ..errors import LocalLLMError, ModelNotFound
    from ..parsing import ModelName

    try:
        return models.show(model)
    except ModelNotFound as missing:
        try:
            ModelName.parse(model)
        except LocalLLMError:
            raise missing from None  # not a name a registry has, such as the path of a missing file
    _pull(models, model, insecure=insecure)
    return models.show(model)


def cmd_run(args: argparse.Namespace) -> int:
    words = " ".join(args.prompt)
    chat = sys.stdin.isatty() or args.interactive  # else standard input is the prompt, not the chat
    prompt = words if chat else _with_piped_input(args.prompt)
    one_shot = bool(words) or not chat
    with open_models(local=args.local) as models:
        info = _show_or_pull(models, args.model, insecure=args.insecure)
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
    with open_models(local=args.local) as models:
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

"""The runner child, a program of its own: ``python -m localllm.runner.child``, started by `ProcessRunner`.

It never imports the user's main module (as multiprocessing's spawn would), so a script needs no
``if __name__ == "__main__":`` guard to use runner processes. Its stdin and stdout carry the messages
(`wire`); as soon as it starts it moves them aside, so that whatever else writes to stdout (llama.cpp, a
stray print) lands in its log (stderr, a file the engine reads to explain a crash) instead of the pipe.

It reads a `ChildStart`, loads a `Runner`, answers ``("ready", ...)`` or ``("load_failed", ...)``, and then
relays between the pipe and the runner until told to close. A thread of its own sends ``("beat",)`` every
`beat_interval` seconds from the start, so the engine can tell a child that is slow from one that is stopped
or frozen. A child whose parent is gone exits: its pipe reaches end of file, and on Linux the kernel also
kills it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from ..errors import LocalLLMError, RunnerError
from ..media import DecodedAudio, DecodedImage
from . import wire
from .mailbox import Mailbox
from .protocol import SamplingParams, ScoredText, SequenceHandle, SequenceResult

if TYPE_CHECKING:
    from .worker import Runner

__all__ = ["main"]

logger = logging.getLogger("localllm.runner")

Item = str | ScoredText | SequenceResult | LocalLLMError


class _Pipe:
    """The child's end of the pipe to the engine, shared by its control, worker and heartbeat threads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, message: tuple[object, ...]) -> None:
        with self._lock:
            try:
                wire.send(self.fd, message)
            except OSError:  # the parent is gone
                os._exit(1)


class _PipeMailbox(Mailbox[Item]):
    """Where a sequence's items go in the child: down the pipe, tagged with the sequence's number."""

    def __init__(self, pipe: _Pipe, seq: int, runner: Runner, sequences: dict[int, SequenceHandle]) -> None:
        # No event loop here: nothing of `Mailbox` but its type is used.
        self._pipe = pipe
        self._seq = seq
        self._runner = runner
        self._sequences = sequences
        self.ended = False

    def put(self, item: Item) -> None:
        if isinstance(item, (str, ScoredText)):
            self._pipe.send(("text", self._seq, item))
            return
        self.ended = True
        self._sequences.pop(self._seq, None)
        if isinstance(item, SequenceResult):
            self._pipe.send(("done", self._seq, item, self._runner.prompt_cache_bytes))
        else:
            self._pipe.send(("error", self._seq, type(item).__name__, str(item)))

    async def get_all(self) -> list[Item]:
        raise NotImplementedError("the child's mailboxes are only written to")


class _LogRelay(logging.Handler):
    """Every record to stderr (the log whose tail explains a crash), and those the engine's loggers would
    show to the engine."""

    def __init__(self, pipe: _Pipe, forward_level: int) -> None:
        super().__init__(logging.DEBUG)
        self._pipe = pipe
        self._forward_level = forward_level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            sys.stderr.write(f"{record.levelname.lower()} {record.name}: {text}\n")
            sys.stderr.flush()
            if record.levelno >= self._forward_level:
                self._pipe.send(("log", record.name, record.levelno, text))
        except Exception:
            self.handleError(record)


def _take_pipes() -> tuple[int, int]:
    """The message pipes (stdin, stdout) moved to descriptors of their own; stdin then reads nothing and
    stdout writes to the log."""
    inbound, outbound = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return inbound, outbound


def _die_with_parent(parent_pid: int) -> None:
    """Second line of defence after the pipe's end of file: the kernel kills this child with its parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _beat(pipe: _Pipe, interval: float) -> None:
    """Signs of life: a child that is stopped, frozen or holds the pipe forever sends none."""
    while True:
        time.sleep(interval)
        pipe.send(("beat",))


def main() -> None:
    """Serve one runner, then exit without the interpreter's teardown (llama.cpp's is not needed)."""
    inbound, outbound = _take_pipes()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the group: the engine decides
    faulthandler.enable()  # a crash in llama.cpp leaves the Python stacks in the log
    try:
        start = wire.receive(inbound)
    except (EOFError, OSError, ValueError):
        os._exit(1)
    if not isinstance(start, wire.ChildStart):
        sys.stderr.write(f"the engine sent {type(start).__name__} instead of a ChildStart\n")
        os._exit(2)
    _die_with_parent(start.parent_pid)
    pipe = _Pipe(outbound)
    threading.Thread(target=_beat, args=(pipe, start.beat_interval), name="localllm-beat", daemon=True).start()
    root = logging.getLogger("localllm")
    root.addHandler(_LogRelay(pipe, start.forward_level))
    root.setLevel(logging.DEBUG)
    root.propagate = False
    _serve(inbound, pipe, start)
    sys.stderr.flush()
    os._exit(0)


def _serve(inbound: int, pipe: _Pipe, start: wire.ChildStart) -> None:
    """Load the runner, then relay between the pipe and it until told to close."""
    try:
        from .prompt_cache import PromptCache
        from .worker import Runner

        cache = PromptCache(start.prompt_cache_bytes, directory=start.prompt_cache_dir, key_file=start.prompt_cache_key)
        try:
            runner = Runner(
                start.config, gpu_layers=start.gpu_layers, tensor_split=start.tensor_split, prompt_cache=cache
            )
        except BaseException:
            cache.close()
            raise
    except BaseException as exc:
        pipe.send(("load_failed", type(exc).__name__, str(exc)))
        return
    bos, eos = runner.special_token_text()
    pipe.send(("ready", runner.n_ctx_seq, bos, eos, runner.chat_template(), runner.prompt_cache_bytes))
    try:
        _relay(inbound, pipe, runner)
    finally:
        runner.close()
        cache.close()


def _relay(inbound: int, pipe: _Pipe, runner: Runner) -> None:
    sequences: dict[int, SequenceHandle] = {}
    while True:
        try:
            message = wire.receive(inbound)
        except (EOFError, OSError, ValueError):
            os._exit(1)  # the parent is gone: nobody is left to serve
        match message:
            case ("submit", int(seq), list(prompt), SamplingParams() as params, tuple(media)):
                mailbox = _PipeMailbox(pipe, seq, runner, sequences)
                try:
                    handle = runner.submit(prompt, params, media=media, mailbox=mailbox)
                except LocalLLMError as exc:
                    pipe.send(("error", seq, type(exc).__name__, str(exc)))
                    continue
                sequences[seq] = handle
                if mailbox.ended:  # it ended before it was recorded
                    sequences.pop(seq, None)
            case ("cancel", int(seq)):
                cancelled = sequences.pop(seq, None)
                if cancelled is not None:
                    cancelled.cancel()
            case ("call", int(call_id), str(name), tuple(args)):
                try:
                    value = _answer(runner, name, args)
                except LocalLLMError as exc:
                    pipe.send(("reply", call_id, False, (type(exc).__name__, str(exc))))
                else:
                    pipe.send(("reply", call_id, True, value))
            case ("abort",):
                os.abort()  # test-only: what llama.cpp does on a failed assertion
            case ("close",):
                return
            case _:
                logger.warning("unknown message from the engine: %.200r", message)


def _answer(runner: Runner, name: str, args: tuple[object, ...]) -> object:
    match name, args:
        case "tokenize", (str(text), bool(add_special)):
            return runner.tokenize(text, add_special=add_special)
        case "check_token_ids", (list(tokens),):
            runner.check_token_ids(tokens)
            return None
        case "media_layout", (DecodedImage() | DecodedAudio() as media,):
            return runner.media_layout(media)
    raise RunnerError(f"the runner process has no call {name}{args!r:.100}")


if __name__ == "__main__":
    main()

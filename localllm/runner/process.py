"""A text runner in a child process: the same `Runner`, behind a pipe.

With `Engine(isolation="process")` each text runner lives in a child process the engine owns, so a
crash inside llama.cpp (an abort, a segfault, the kernel's OOM killer) takes down that child, never
the engine. The engine side is `ProcessRunner`, a `TextRunner` whose sequences stream the same
items as the worker thread's; the child runs `serve`, which loads a `Runner` and relays.

The child is started with the "spawn" method (the engine has threads; forking it would copy locks
held by them) from the proxy's reader thread, the one thread that reads the pipe, hands each message
to its sequence, and joins the child once the pipe closes. Messages are tuples of plain values,
pickled by the connection:

    engine -> child   ("submit", seq, prompt, params)  ("cancel", seq)  ("call", id, name, args)
                      ("close",)  ("abort",)
    child -> engine   ("ready", n_ctx_seq, bos, eos, chat_template, prompt_cache_bytes)
                      ("load_failed", error class, message)
                      ("text", seq, str | ScoredText)  ("done", seq, SequenceResult, prompt_cache_bytes)
                      ("error", seq, error class, message)  ("reply", id, ok, value)
                      ("log", logger, level, message)

A child that dies fails every sequence it held with a `RunnerError` saying how (the signal or exit
code, and the last lines of its stderr, where llama.cpp writes), and the runner reports itself
unhealthy, so the scheduler loads a fresh one for the next request. A child whose parent is gone
exits: its pipe reaches end of file, and on Linux the kernel also kills it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import errors
from ..errors import EngineClosed, LocalLLMError, ModelLoadError, RunnerError
from .mailbox import Mailbox
from .protocol import LoadConfig, SamplingParams, ScoredText, SequenceHandle, SequenceResult, check_prompt_fits

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .worker import Runner

__all__ = ["ProcessRunner", "serve"]

logger = logging.getLogger("localllm.runner")

T = TypeVar("T")
Item = str | ScoredText | SequenceResult | LocalLLMError

_CLOSE_TIMEOUT = 60.0  # seconds a child may take to close its runner before it is killed
_TAIL_LINES = 20
_TAIL_BYTES = 16 << 10


class _Sequence(SequenceHandle):
    """A sequence on the engine side, with the number the child knows it by."""

    def __init__(self, runner: ProcessRunner, prompt: list[int], params: SamplingParams, seq: int) -> None:
        super().__init__(runner, prompt, params)
        self.seq = seq


class _Call:
    """A request and its reply (from the reader thread), for the calls that return a value."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = None
        self.error: LocalLLMError | None = None

    def settle(self, value: object = None, error: LocalLLMError | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()


class ProcessRunner:
    """A `TextRunner` whose model is loaded and served in a child process. Create it in a worker thread
    (it waits until the child has loaded the model, and raises what loading raised)."""

    def __init__(
        self,
        config: LoadConfig,
        *,
        gpu_layers: int = 0,
        tensor_split: tuple[float, ...] | None = None,
        prompt_cache_bytes: int = 0,
        prompt_cache_dir: Path | None = None,
    ) -> None:
        self.config = config
        self._lock = threading.Lock()  # the tables below, and the failure / closing state
        self._send_lock = threading.Lock()
        self._sequences: dict[int, _Sequence] = {}
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._closing = False
        self.failure: str | None = None  # how the child died, once it has
        self._load_error: LocalLLMError | None = None
        self._ready = threading.Event()
        self._n_ctx_seq = 0
        self._special = ("", "")
        self._template: str | None = None
        self._cache_bytes = 0
        fd, self._log_path = tempfile.mkstemp(prefix="localllm-runner-", suffix=".log")
        os.close(fd)
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=serve,
            args=(
                child_conn,
                os.getpid(),
                config,
                gpu_layers,
                tensor_split,
                prompt_cache_bytes,
                prompt_cache_dir,
                self._log_path,
                logging.getLogger("localllm").getEffectiveLevel(),
            ),
            name=f"localllm-runner {os.path.basename(config.model_path)}",
            daemon=True,  # multiprocessing also ends it if this process exits without closing it
        )
        # The reader starts the child and lives as long as it does: on Linux the child dies with the
        # thread that started it, so that must not be a pool thread that may retire.
        self._reader = threading.Thread(target=self._read, args=(child_conn,), name="localllm-runner-pipe", daemon=True)
        self._reader.start()
        self._ready.wait()
        if self._load_error is not None:
            self._reader.join()  # the child has exited, or is about to: reap it
            self._conn.close()
            _unlink(self._log_path)
            raise self._load_error

    # -- what the scheduler and the pipelines call ----------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def n_ctx_seq(self) -> int:
        return self._n_ctx_seq

    @property
    def pending_count(self) -> int:
        return max(0, len(self._sequences) - self.config.num_parallel)

    @property
    def busy(self) -> bool:
        return bool(self._sequences)

    @property
    def healthy(self) -> bool:
        """False once the child has died (or was closed): the scheduler replaces such a runner."""
        return self.failure is None and not self._closing and self._reader.is_alive()

    @property
    def prompt_cache_bytes(self) -> int:
        # As of the child's last finished sequence: asking it would block the caller (`ps()`, on the event loop).
        return self._cache_bytes

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self._call(list, "tokenize", text, add_special)

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        self._call(type(None), "check_token_ids", list(tokens))

    def special_token_text(self) -> tuple[str, str]:
        return self._special

    def chat_template(self) -> str | None:
        return self._template

    def submit(self, prompt: list[int], params: SamplingParams) -> SequenceHandle:
        """Queue a sequence in the child. Call from the event loop (the handle's mailbox binds to it)."""
        check_prompt_fits(prompt, self.n_ctx_seq, truncate=params.truncate)  # a prompt to cut is cut in the child
        with self._lock:
            self._check_usable()
            handle = _Sequence(self, prompt, params, next(self._ids))
            self._sequences[handle.seq] = handle
        # Sent outside the lock; if the child dies meanwhile, the reader fails the sequence.
        with contextlib.suppress(OSError):
            self._send(("submit", handle.seq, prompt, params))
        return handle

    def _withdraw(self, handle: SequenceHandle) -> None:
        if not isinstance(handle, _Sequence):
            return
        with self._lock:
            known = self._sequences.pop(handle.seq, None) is not None
        handle.finished = True
        if known:
            with contextlib.suppress(OSError):
                self._send(("cancel", handle.seq))

    def close(self) -> None:
        """Close the child's runner (which fails what is still queued), and reap the child."""
        with self._lock:
            if self._closing:
                closed = True
            else:
                closed, self._closing = False, True
        if not closed:
            with contextlib.suppress(OSError):
                self._send(("close",))
        if threading.current_thread() is not self._reader:
            self._reader.join(_CLOSE_TIMEOUT)
            if self._reader.is_alive():
                logger.warning("the runner process %s did not close in time: killing it", self.pid)
                self._process.kill()
                self._reader.join()
        self._conn.close()
        _unlink(self._log_path)

    def _abort_child(self) -> None:
        """Test-only: make the child call abort(), as llama.cpp does on a failed assertion."""
        self._send(("abort",))

    # -- helpers -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise RunnerError(f"the runner failed: {self.failure}; retry to load it again")
        if self._closing:
            raise EngineClosed("this model has been unloaded")

    def _send(self, message: tuple[object, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _call(self, kind: type[T], name: str, *args: object) -> T:
        """Run one of the runner's methods in the child and wait for its result."""
        call = _Call()
        with self._lock:
            self._check_usable()
            call_id = next(self._ids)
            self._calls[call_id] = call
        try:
            self._send(("call", call_id, name, args))
        except OSError:
            pass  # the child is gone: the reader settles the call
        call.done.wait()
        if call.error is not None:
            raise call.error
        if not isinstance(call.value, kind):
            raise RunnerError(f"the runner process answered {name} with {type(call.value).__name__}")
        return call.value

    # -- the reader thread ------------------------------------------------------------------

    def _read(self, child_conn: Connection) -> None:
        try:
            self._process.start()
        except BaseException as exc:
            self._load_error = ModelLoadError(f"could not start a runner process: {exc}")
            self._ready.set()
            return
        finally:
            child_conn.close()  # ours would keep the pipe open after the child's end is gone
        try:
            while True:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    break
                self._dispatch(message)
        finally:
            self._process.join()
            self._ended()

    def _dispatch(self, message: object) -> None:
        match message:
            case ("text", int(seq), str() | ScoredText() as text):
                handle = self._sequences.get(seq)
                if handle is not None:
                    handle.mailbox.put(text)
            case ("done", int(seq), SequenceResult() as result, int(cache_bytes)):
                self._cache_bytes = cache_bytes
                self._settle(seq, result)
            case ("error", int(seq), str(name), str(text)):
                self._settle(seq, _error(name, text))
            case ("reply", int(call_id), bool(ok), value):
                with self._lock:
                    call = self._calls.pop(call_id, None)
                if call is None:
                    pass
                elif ok:
                    call.settle(value)
                else:
                    name, text = value if isinstance(value, tuple) else ("RunnerError", value)
                    call.settle(error=_error(name, text))
            case ("log", str(name), int(level), str(text)):
                logging.getLogger(name).log(level, "%s", text)
            case ("ready", int(n_ctx_seq), str(bos), str(eos), (str() | None) as template, int(cache_bytes)):
                self._n_ctx_seq, self._special, self._template = n_ctx_seq, (bos, eos), template
                self._cache_bytes = cache_bytes
                self._ready.set()
            case ("load_failed", str(name), str(text)):
                self._load_error = _error(name, text, default=ModelLoadError)
                self._ready.set()
            case _:
                logger.warning("the runner process %s sent an unknown message: %.200r", self.pid, message)

    def _settle(self, seq: int, item: Item) -> None:
        """A sequence ended in the child: its last item."""
        with self._lock:
            handle = self._sequences.pop(seq, None)
        if handle is not None:
            handle.finished = True
            handle.mailbox.put(item)

    def _ended(self) -> None:
        """The child is gone and reaped: fail whatever it still held."""
        code = self._process.exitcode
        with self._lock:
            if self._closing and code == 0:
                error: LocalLLMError = EngineClosed("the model was unloaded before this request finished")
            else:
                how = _describe_exit(code)
                self.failure = f"the runner process (pid {self._process.pid}) {how}"
                tail = _tail(self._log_path)
                message = f"the runner failed: {self.failure}; retry to load it again"
                if tail:
                    message += "\nthe last lines of its log:\n" + tail
                error = RunnerError(message)
            sequences, self._sequences = list(self._sequences.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        if self.failure is not None and self._ready.is_set() and self._load_error is None:
            logger.error("%s", error)
        for handle in sequences:
            handle.finished = True
            handle.mailbox.put(error)
        for call in calls:
            call.settle(error=error)
        if not self._ready.is_set():
            self._load_error = ModelLoadError(
                f"could not load {self.config.model_path}: {str(error).removeprefix('the runner failed: ')}"
            )
            self._ready.set()


def _error(name: object, message: object, default: type[LocalLLMError] = RunnerError) -> LocalLLMError:
    """The error the child raised, as the same class where it is one of ours."""
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, LocalLLMError):
        try:
            return cls(str(message))
        except Exception:  # a constructor that wants more than a message
            pass
    return default(str(message) if cls is not None else f"{name}: {message}")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _tail(path: str) -> str:
    """The last lines of a child's log."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
            text = file.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-_TAIL_LINES:])


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


# -- the child -------------------------------------------------------------------------------


class _Pipe:
    """The child's end of the pipe, shared by its control thread and the runner's worker thread."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[object, ...]) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (OSError, ValueError):  # the parent is gone
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
    """In the child: every record to stderr (the log file whose tail explains a crash), and those the
    engine's loggers would show to the engine."""

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


def _die_with_parent(parent_pid: int) -> None:
    """Second line of defence after the pipe's end of file: the kernel kills this child with its parent."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def serve(
    conn: Connection,
    parent_pid: int,
    config: LoadConfig,
    gpu_layers: int,
    tensor_split: tuple[float, ...] | None,
    prompt_cache_bytes: int,
    prompt_cache_dir: Path | None,
    log_path: str,
    forward_level: int,
) -> None:
    """The child's main: load the runner, then relay between the pipe and it until told to close."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 2)  # llama.cpp (and a dying interpreter) write to stderr: keep it for the crash report
    os.close(log)
    _die_with_parent(parent_pid)
    pipe = _Pipe(conn)
    root = logging.getLogger("localllm")
    root.addHandler(_LogRelay(pipe, forward_level))
    root.setLevel(logging.DEBUG)
    root.propagate = False
    try:
        from .prompt_cache import PromptCache
        from .worker import Runner

        cache = PromptCache(prompt_cache_bytes, directory=prompt_cache_dir)
        try:
            runner = Runner(config, gpu_layers=gpu_layers, tensor_split=tensor_split, prompt_cache=cache)
        except BaseException:
            cache.close()
            raise
    except BaseException as exc:
        pipe.send(("load_failed", type(exc).__name__, str(exc)))
        return
    bos, eos = runner.special_token_text()
    pipe.send(("ready", runner.n_ctx_seq, bos, eos, runner.chat_template(), runner.prompt_cache_bytes))
    try:
        _relay(pipe, runner)
    finally:
        runner.close()
        cache.close()


def _relay(pipe: _Pipe, runner: Runner) -> None:
    sequences: dict[int, SequenceHandle] = {}
    while True:
        try:
            message = pipe.conn.recv()
        except (EOFError, OSError):
            os._exit(1)  # the parent is gone: nobody is left to serve
        match message:
            case ("submit", int(seq), list(prompt), SamplingParams() as params):
                mailbox = _PipeMailbox(pipe, seq, runner, sequences)
                try:
                    handle = runner.submit(prompt, params, mailbox=mailbox)
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
    raise RunnerError(f"the runner process has no call {name}{args!r:.100}")

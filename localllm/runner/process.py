"""A text runner in a child process: the same `Runner`, in a program of its own behind a pipe.

With `Engine(isolation="process")` each text runner lives in a child process the engine owns, so a
crash inside llama.cpp (an abort, a segfault, the kernel's OOM killer) takes down that child, never
the engine. The engine side is `ProcessRunner`, a `TextRunner` whose sequences stream the same
items as the worker thread's; the child is ``python -m localllm.runner.child`` (`child.py`), which
loads a `Runner` and relays. Being a program and not a multiprocessing child, it never imports the
user's main module, so scripts need no main guard.

Messages are tuples of plain values, framed on the child's stdin and stdout (`wire`):

    engine -> child   ChildStart  ("submit", seq, prompt, params, media)  ("cancel", seq)  ("call", id, name, args)
                      ("close",)  ("abort",)
    child -> engine   ("ready", n_ctx_seq, bos, eos, chat_template, prompt_cache_bytes)
                      ("load_failed", error class, message)
                      ("text", seq, str | ScoredText)  ("done", seq, SequenceResult, prompt_cache_bytes)
                      ("error", seq, error class, message)  ("reply", id, ok, value)
                      ("log", logger, level, message)  ("beat",)

Three threads per child, none of them the event loop's, so the event loop never waits on a child: the
reader starts the child (on Linux the child dies with the thread that started it, so that must be one
that lives as long as it does), reads every message and hands it on, and reaps the child at end of
file; the writer sends what the engine queues (a stopped child stops reading, and a full pipe then
blocks only the writer); the watchdog kills a child that sends nothing for `timeout` seconds while it
has work (loading, sequences, calls), though it beats every `timeout / 4` s (1 s at most); and calls
(`tokenize`, `check_token_ids`) wait at most `timeout` for their answer.

A child that dies or hangs fails every sequence and call it held with a `RunnerError` saying how (the
signal or exit code, or that it hung, and the last lines of its stderr, where llama.cpp and Python
write), and the runner reports itself unhealthy, so the scheduler loads a fresh one for the next
request. `close()` is bounded: the child is told to close, then terminated, then killed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

from .. import errors
from ..errors import EngineClosed, LocalLLMError, ModelLoadError, RunnerError
from . import wire
from .protocol import (
    LoadConfig,
    MediaLayout,
    SamplingParams,
    ScoredText,
    SequenceHandle,
    SequenceResult,
    check_prompt_fits,
)

if TYPE_CHECKING:
    from ..media import Media

__all__ = ["ProcessRunner"]

logger = logging.getLogger("localllm.runner")

T = TypeVar("T")
Item = str | ScoredText | SequenceResult | LocalLLMError

_CLOSE_GRACE = 5.0  # seconds a child told to close may take (its runner finishes a step, saves its cache)
_TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
_REAP_WAIT = 5.0  # seconds to wait for a killed child (one stuck in the kernel may take longer: give up)
_START_GRACE = 30.0  # seconds a child may take to send its first message, whatever the timeout
_MAX_BEAT = 1.0  # seconds: the longest interval between a child's beats, and between the watchdog's checks
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
    (it waits until the child has loaded the model, and raises what loading raised).

    `timeout`: seconds the child may stay silent while it has work, and that a call may wait for its
    answer, before the child counts as hung and is killed (None: `LOCALLLM_RUNNER_TIMEOUT`, 30 s)."""

    def __init__(
        self,
        config: LoadConfig,
        *,
        gpu_layers: int = 0,
        tensor_split: tuple[float, ...] | None = None,
        prompt_cache_bytes: int = 0,
        prompt_cache_dir: Path | None = None,
        prompt_cache_key: Path | None = None,
        timeout: float | None = None,
    ) -> None:
        from ..settings import read_setting

        self.config = config
        self.timeout = cast("float", read_setting("runner_timeout")) if timeout is None else float(timeout)
        self._beat = min(self.timeout / 4, _MAX_BEAT)
        self._lock = threading.Lock()  # the tables below, and the failure / closing state
        self._sequences: dict[int, _Sequence] = {}
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._layouts: dict[bytes, MediaLayout] = {}  # by media digest
        self._closing = False
        self.failure: str | None = None  # how the child died, once it has
        self._hung: str | None = None  # why the child counts as hung, once it does
        self._last_heard = time.monotonic()
        self._started = False  # whether the child has sent anything yet
        self._load_error: LocalLLMError | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()  # the child is gone and reaped
        self._n_ctx_seq = 0
        self._special = ("", "")
        self._template: str | None = None
        self._cache_bytes = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()  # for the writer; None ends it
        self._outbox.put(
            wire.ChildStart(
                parent_pid=os.getpid(),
                config=config,
                gpu_layers=gpu_layers,
                tensor_split=tensor_split,
                prompt_cache_bytes=prompt_cache_bytes,
                prompt_cache_dir=prompt_cache_dir,
                prompt_cache_key=prompt_cache_key,
                forward_level=logging.getLogger("localllm").getEffectiveLevel(),
                beat_interval=self._beat,
            )
        )
        log_fd, self._log_path = tempfile.mkstemp(prefix="localllm-runner-", suffix=".log")
        self._reader = threading.Thread(target=self._read, args=(log_fd,), name="localllm-runner-pipe", daemon=True)
        self._writer = threading.Thread(target=self._write, name="localllm-runner-send", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="localllm-runner-watch", daemon=True)
        self._reader.start()
        self._ready.wait()  # the watchdog kills a child that goes silent while it loads
        if self._load_error is not None:
            with self._lock:
                self._closing = True
            self._reap()
            self._outbox.put(None)
            _unlink(self._log_path)
            raise self._load_error

    # -- what the scheduler and the pipelines call ----------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

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
        """False once the child has died or hung (or was closed): the scheduler replaces such a runner."""
        return self.failure is None and self._hung is None and not self._closing and not self._stopped.is_set()

    @property
    def prompt_cache_bytes(self) -> int:
        # As of the child's last finished sequence: asking it would block the caller (`ps()`, on the event loop).
        return self._cache_bytes

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """The child's answer (call from a worker thread: it waits up to `timeout` seconds)."""
        return self._call(list, "tokenize", text, add_special)

    def check_token_ids(self, tokens: Sequence[int]) -> None:
        """The child's answer (call from a worker thread: it waits up to `timeout` seconds)."""
        self._call(type(None), "check_token_ids", list(tokens))

    def special_token_text(self) -> tuple[str, str]:
        return self._special

    def chat_template(self) -> str | None:
        return self._template

    def media_layout(self, media: Media) -> MediaLayout:
        """The child's answer, remembered by the item's content hash (call from a worker thread: it waits up
        to `timeout` seconds)."""
        layout = self._layouts.get(media.digest)
        if layout is None:
            layout = self._layouts[media.digest] = self._call(MediaLayout, "media_layout", media)
        return layout

    def submit(self, prompt: list[int], params: SamplingParams, *, media: Sequence[Media] = ()) -> SequenceHandle:
        """Queue a sequence in the child. Call from the event loop (the handle's mailbox binds to it);
        it never waits for the child."""
        check_prompt_fits(prompt, self.n_ctx_seq, truncate=params.truncate)  # a prompt to cut is cut in the child
        with self._lock:
            self._check_usable()
            self._note_work()
            handle = _Sequence(self, prompt, params, next(self._ids))
            self._sequences[handle.seq] = handle
        # If the child dies meanwhile, the reader fails the sequence.
        self._outbox.put(("submit", handle.seq, prompt, params, tuple(media)))
        return handle

    def _withdraw(self, handle: SequenceHandle) -> None:
        if not isinstance(handle, _Sequence):
            return
        with self._lock:
            known = self._sequences.pop(handle.seq, None) is not None
        handle.finished = True
        if known:
            self._outbox.put(("cancel", handle.seq))

    def close(self) -> None:
        """Close the child's runner (which fails what is still queued) and reap the child: a child that
        has not exited `_CLOSE_GRACE` seconds later is terminated, and killed `_TERM_GRACE` seconds after."""
        with self._lock:
            already, self._closing = self._closing, True
        if not already:
            self._outbox.put(("close",))
        if threading.current_thread() is not self._reader:
            self._reap()
        self._outbox.put(None)
        _unlink(self._log_path)

    def _abort_child(self) -> None:
        """Test-only: make the child call abort(), as llama.cpp does on a failed assertion."""
        self._outbox.put(("abort",))

    # -- helpers -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._hung is not None:
            raise RunnerError(f"the runner failed: the runner process (pid {self.pid}) {self._hung}")
        if self.failure is not None:
            raise RunnerError(f"the runner failed: {self.failure}; retry to load it again")
        if self._closing:
            raise EngineClosed("this model has been unloaded")

    def _note_work(self) -> None:
        """Work for an idle child (under the lock): its silence counts from now, not from its last beat."""
        if not self._sequences and not self._calls:
            self._last_heard = max(self._last_heard, time.monotonic())

    def _call(self, kind: type[T], name: str, *args: object) -> T:
        """Run one of the runner's methods in the child and wait, at most `timeout` seconds, for its result."""
        call = _Call()
        with self._lock:
            self._check_usable()
            self._note_work()
            call_id = next(self._ids)
            self._calls[call_id] = call
        self._outbox.put(("call", call_id, name, args))
        if not call.done.wait(self.timeout):
            self._declare_hung(f"did not answer {name} within {self.timeout:g} s")
            if not call.done.wait(_REAP_WAIT + _TERM_GRACE):  # the reader settles it once the child is gone
                with self._lock:
                    self._calls.pop(call_id, None)
                raise RunnerError(f"the runner process (pid {self.pid}) did not answer {name}: it hung")
        if call.error is not None:
            raise call.error
        if not isinstance(call.value, kind):
            raise RunnerError(f"the runner process answered {name} with {type(call.value).__name__}")
        return call.value

    def _declare_hung(self, what: str) -> None:
        """Kill a child that stopped making progress; the reader then fails what it held, saying so."""
        with self._lock:
            if self._hung is not None or self._stopped.is_set():
                return
            self._hung = f"hung: it {what} while it had work, so it was killed (LOCALLLM_RUNNER_TIMEOUT sets the bound)"
        logger.error("the runner process %s %s", self.pid, self._hung)
        self._kill()

    def _kill(self) -> None:
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.kill()

    def _reap(self) -> None:
        """Wait for the child to end, within bounds: terminate it, then kill it, when it takes too long."""
        if self._hung is not None or self.failure is not None:
            self._kill()
        elif not _joined(self._reader, _CLOSE_GRACE) and self._process is not None:
            logger.warning("the runner process %s did not close within %g s: terminating it", self.pid, _CLOSE_GRACE)
            with contextlib.suppress(OSError):
                self._process.terminate()
            if not _joined(self._reader, _TERM_GRACE):
                logger.warning("the runner process %s did not terminate: killing it", self.pid)
                self._kill()
        if not _joined(self._reader, _REAP_WAIT):
            logger.error("the runner process %s outlived SIGKILL for %g s; leaving it", self.pid, _REAP_WAIT)

    # -- the reader, writer and watchdog threads ----------------------------------------------

    def _read(self, log_fd: int) -> None:
        try:
            self._process = subprocess.Popen(
                _child_command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_fd,
                env=_child_environment(),
                close_fds=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._load_error = ModelLoadError(f"could not start a runner process: {exc}")
            self._stopped.set()
            self._ready.set()
            return
        finally:
            os.close(log_fd)  # the child has its own copy as stderr
        assert self._process.stdout is not None
        self._writer.start()
        self._watchdog.start()
        inbound = self._process.stdout.fileno()
        try:
            while True:
                try:
                    message = wire.receive(inbound)
                except (EOFError, OSError):
                    break
                except Exception as exc:  # not a message of ours: the child is beyond trusting
                    self._declare_hung(f"sent something that is not a message ({exc!r:.100})")
                    break
                self._last_heard = time.monotonic()
                self._started = True
                self._dispatch(message)
        finally:
            try:
                self._process.wait(_REAP_WAIT)  # at the end of its pipe a child is exiting
            except subprocess.TimeoutExpired:
                self._kill()
                self._process.wait()
            self._process.stdout.close()
            self._ended()

    def _write(self) -> None:
        """Send what the engine queues, in order; a stopped child blocks only this thread."""
        assert self._process is not None and self._process.stdin is not None
        pipe = self._process.stdin
        try:
            while True:
                message = self._outbox.get()
                if message is None:
                    return
                try:
                    wire.send(pipe.fileno(), cast("tuple[object, ...]", message))
                except OSError:
                    return  # the child is gone: the reader fails what it held
        finally:
            with contextlib.suppress(OSError):
                pipe.close()

    def _watch(self) -> None:
        """Kill the child when it sends nothing for `timeout` seconds while it has work."""
        while not self._stopped.wait(self._beat):
            with self._lock:
                working = not self._ready.is_set() or bool(self._sequences) or bool(self._calls)
                silent = time.monotonic() - self._last_heard
            # A fresh interpreter imports localllm before it can beat: a slow machine gets time to start.
            bound = self.timeout if self._started else max(self.timeout, _START_GRACE)
            if working and silent > bound:
                self._declare_hung(f"sent nothing for {silent:.1f} s")
                return

    def _dispatch(self, message: object) -> None:
        match message:
            case ("beat",):
                pass
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
        assert self._process is not None
        code = self._process.returncode
        log = ""
        with self._lock:
            self._stopped.set()
            if self._closing and code == 0 and self._hung is None:
                error: LocalLLMError = EngineClosed("the model was unloaded before this request finished")
            else:
                how = self._hung or _describe_exit(code)
                self.failure = f"the runner process (pid {self._process.pid}) {how}"
                tail = _tail(self._log_path)
                log = "\nthe last lines of its log:\n" + tail if tail else ""
                error = RunnerError(f"the runner failed: {self.failure}; retry to load it again{log}")
            sequences, self._sequences = list(self._sequences.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        self._outbox.put(None)  # nobody is left to write to
        if self.failure is not None and self._ready.is_set() and self._load_error is None:
            if self._hung is None and not self._closing:  # what was hung or would not close is logged already
                logger.error("%s", error)
        for handle in sequences:
            handle.finished = True
            handle.mailbox.put(error)
        for call in calls:
            call.settle(error=error)
        if not self._ready.is_set():  # it died while loading: its log says why, a retry would not
            how = self.failure or f"the runner process (pid {self._process.pid}) {_describe_exit(code)}"
            self._load_error = ModelLoadError(f"could not load {self.config.model_path}: {how}{log}")
            self._ready.set()


def _joined(thread: threading.Thread, timeout: float) -> bool:
    thread.join(timeout)
    return not thread.is_alive()


def _child_command() -> list[str]:
    """The child's command line: this interpreter, running the child's module."""
    if not sys.executable:
        raise ValueError('this interpreter does not know its own executable (sys.executable); use isolation="thread"')
    # -P: the working directory is not put first on the child's path, where a file could stand in for a module.
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "localllm.runner.child"]


def _child_environment() -> dict[str, str]:
    """This process's environment, with the folder this localllm was imported from on the child's path
    when it is not installed (a checkout), so the child runs the same code."""
    environment = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    if root not in _site_directories():
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), environment.get("PYTHONPATH")]))
    return environment


def _site_directories() -> set[Path]:
    folders = [*getattr(site, "getsitepackages", list)(), getattr(site, "getusersitepackages", str)()]
    return {Path(folder).resolve() for folder in folders if folder}


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

"""Runners in child processes: the same results as in threads, and a crash that only costs a request."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest

from localllm import Client, Engine, InvalidRequest, LocalLLMError, ModelLoadError, RunnerError
from localllm.runner import process
from localllm.runner.process import ProcessRunner
from localllm.runner.protocol import LoadConfig
from localllm.runner.worker import Runner

GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_ctx": 512}
PROMPT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Name a fruit."}]
ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children() -> set[int]:
    """The live (or unreaped) child processes of this process, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(entry.name))
    return found


def _runner(engine: Engine) -> ProcessRunner:
    (model,) = engine.scheduler.loaded.values()
    assert isinstance(model.runner, ProcessRunner)
    return model.runner


def test_the_isolation_setting(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Engine(home).settings.isolation == "thread"
    assert Engine(home, isolation="process").settings.isolation == "process"
    monkeypatch.setenv("LOCALLLM_ISOLATION", "process")
    assert Engine(home).settings.isolation == "process"
    assert Engine(home, isolation="thread").settings.isolation == "thread"
    monkeypatch.setenv("LOCALLLM_ISOLATION", "container")
    with pytest.raises(InvalidRequest, match=r"LOCALLLM_ISOLATION must be 'thread'.*'process'.*'container'"):
        Engine(home)
    with pytest.raises(InvalidRequest, match="isolation must be"):
        Engine(home, isolation="threads")


def test_a_load_that_fails_in_the_child_fails_as_in_a_thread(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    errors = []
    before = _children()
    for make in (Runner, ProcessRunner):
        with pytest.raises(LocalLLMError) as info:
            make(LoadConfig(str(bad), num_ctx=512))
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    assert _children() <= before  # the child that failed to load was reaped


def test_a_child_that_dies_while_it_starts_says_why(
    smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for a child that cannot start (a broken install, say): it writes why and exits.
    dying = [sys.executable, "-c", "import sys; sys.stderr.write('cannot import llama_cpp\\n'); sys.exit(3)"]
    monkeypatch.setattr(process, "_child_command", lambda: dying)
    before = _children()
    with pytest.raises(ModelLoadError) as info:
        ProcessRunner(LoadConfig(str(smollm2_path), num_ctx=512))
    message = str(info.value)
    assert str(smollm2_path) in message and "exited with code 3" in message and "cannot import llama_cpp" in message
    assert _children() <= before


async def test_a_bad_gguf_fails_alike_through_the_engine(tmp_path: Path, home: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(40))
    kinds = []
    for isolation in ("thread", "process"):
        async with Engine(home, isolation=isolation) as engine:
            with pytest.raises(LocalLLMError) as info:
                await engine.generate(str(bad), "hi")
            kinds.append(type(info.value))
    assert kinds[0] is kinds[1]


async def test_a_child_process_serves_as_a_thread_does(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    options = {**GREEDY, "num_predict": 8}
    async with Engine(home, num_parallel=2) as engine:
        expected_text = (await engine.generate(model, PROMPT, options=options)).response
        expected_chat = (await engine.chat(model, MESSAGES, options=options)).message.content
        assert (await engine.ps()).models[0].pid is None
    asked_from: list[threading.Thread] = []
    tokenize = ProcessRunner.tokenize

    def recording_tokenize(self: ProcessRunner, text: str, *, add_special: bool = True) -> list[int]:
        asked_from.append(threading.current_thread())
        return tokenize(self, text, add_special=add_special)

    async with Engine(home, isolation="process", num_parallel=2) as engine:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ProcessRunner, "tokenize", recording_tokenize)
            reply = await engine.generate(model, PROMPT, options=options)
        assert reply.response == expected_text and reply.eval_count == 8
        # The child answers over a pipe: the event loop's thread never waits for it.
        assert asked_from and threading.current_thread() not in asked_from
        assert (await engine.chat(model, MESSAGES, options=options)).message.content == expected_chat
        streamed = [chunk.message.content async for chunk in engine.chat(model, MESSAGES, stream=True, options=options)]
        assert len(streamed) > 2 and "".join(streamed) == expected_chat
        # The second turn of a conversation starts from what the slot holds.
        again = await engine.generate(model, PROMPT + expected_text, options=options)
        assert again.prompt_cached_count > 0
        # Breaking out of a stream cancels it in the child; the runner serves the next request.
        chunks = 0
        async for _chunk in engine.generate(model, PROMPT, stream=True, options={**GREEDY, "num_predict": 400}):
            chunks += 1
            if chunks == 3:
                break
        runner = _runner(engine)
        assert (await engine.generate(model, PROMPT, options=options)).response == expected_text
        assert not runner.busy
        (shown,) = (await engine.ps()).models
        pid = shown.pid
        assert pid is not None and pid != os.getpid() and pid == runner.pid and _alive(pid)
    assert not _alive(pid)


async def test_a_child_that_dies_fails_its_request_and_is_replaced(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    long = {**GREEDY, "num_predict": 400}
    pids = []
    async with Engine(home, isolation="process", num_parallel=2) as engine:
        for how, signal_name in ((_kill, "SIGKILL"), (_abort, "SIGABRT")):
            chunks = 0
            with pytest.raises(RunnerError) as info:
                async for _chunk in engine.generate(model, PROMPT, stream=True, options=long):
                    chunks += 1
                    if chunks == 2:
                        runner = _runner(engine)
                        pids.append(runner.pid)
                        how(runner)
            message = str(info.value)
            assert signal_name in message and str(runner.pid) in message and "the last lines of its log" in message
            assert not runner.healthy
            # The next request loads a fresh child.
            reply = await engine.generate(model, PROMPT, options={**GREEDY, "num_predict": 4})
            assert reply.eval_count == 4 and _runner(engine).pid not in pids
        pids.append(_runner(engine).pid)
    assert not any(_alive(pid) for pid in pids if pid is not None)


def _kill(runner: ProcessRunner) -> None:
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGKILL)


def _abort(runner: ProcessRunner) -> None:
    runner._abort_child()


async def test_a_stopped_child_fails_the_next_request_and_the_event_loop_runs_on(
    smollm2_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCALLLM_RUNNER_TIMEOUT", "3")
    model = str(smollm2_path)
    short = {**GREEDY, "num_predict": 4}
    asked, answered = threading.Event(), threading.Event()
    tokenize = ProcessRunner.tokenize

    def watched_tokenize(self: ProcessRunner, text: str, *, add_special: bool = True) -> list[int]:
        asked.set()
        try:
            return tokenize(self, text, add_special=add_special)
        finally:
            answered.set()

    loop_ran_while_the_child_was_asked: list[bool] = []

    async def meanwhile() -> None:
        # Once the request waits on the stopped child, this task (on the same loop) still gets turns,
        # and a worker thread's result still reaches it.
        await anyio.to_thread.run_sync(asked.wait, 120)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        await anyio.to_thread.run_sync(lambda: None)
        loop_ran_while_the_child_was_asked.append(asked.is_set() and not answered.is_set())

    engine = Engine(home, isolation="process", num_parallel=1)
    stopped: int | None = None
    try:
        assert (await engine.generate(model, PROMPT, options=short)).eval_count == 4
        runner = _runner(engine)
        assert runner.timeout == 3.0 and runner.pid is not None
        stopped = runner.pid
        os.kill(stopped, signal.SIGSTOP)
        with monkeypatch.context() as patch:
            patch.setattr(ProcessRunner, "tokenize", watched_tokenize)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(meanwhile)
                with anyio.fail_after(120), pytest.raises(RunnerError) as info:
                    await engine.generate(model, PROMPT, options=short)
        assert loop_ran_while_the_child_was_asked == [True]
        message = str(info.value)
        assert "hung" in message and str(stopped) in message and "LOCALLLM_RUNNER_TIMEOUT" in message
        assert not runner.healthy and not _alive(stopped)
        # The next request loads a fresh child.
        assert (await engine.generate(model, PROMPT, options=short)).eval_count == 4
        fresh = _runner(engine).pid
        assert fresh is not None and fresh != stopped
    finally:
        if stopped is not None and _alive(stopped):  # the test failed: do not leave a stopped process behind
            os.kill(stopped, signal.SIGKILL)
        with anyio.fail_after(120):
            await engine.aclose()
    assert not _alive(fresh)


async def test_a_stream_whose_child_stops_fails_saying_it_hung(
    smollm2_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCALLLM_RUNNER_TIMEOUT", "3")
    model = str(smollm2_path)
    async with Engine(home, isolation="process", num_parallel=1) as engine:
        chunks = 0
        with anyio.fail_after(120), pytest.raises(RunnerError, match="hung") as info:
            async for _chunk in engine.generate(model, PROMPT, stream=True, options={**GREEDY, "num_predict": 400}):
                chunks += 1
                if chunks == 2:
                    runner = _runner(engine)
                    assert runner.pid is not None
                    os.kill(runner.pid, signal.SIGSTOP)
        assert str(runner.pid) in str(info.value) and not _alive(runner.pid)
        assert (await engine.generate(model, PROMPT, options={**GREEDY, "num_predict": 4})).eval_count == 4


async def test_closing_an_engine_whose_child_is_stopped_returns(smollm2_path: Path, home: Path) -> None:
    engine = Engine(home, isolation="process", num_parallel=1)
    stopped: int | None = None
    try:
        assert (await engine.generate(str(smollm2_path), PROMPT, options={**GREEDY, "num_predict": 2})).eval_count == 2
        stopped = _runner(engine).pid
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
    finally:
        # Told to close, the stopped child cannot: it is terminated, then killed, within seconds.
        with anyio.fail_after(120):
            await engine.aclose()
        if stopped is not None and _alive(stopped):
            os.kill(stopped, signal.SIGKILL)
            pytest.fail("aclose() left the stopped child running")


def test_a_script_without_a_main_guard_uses_runner_processes(smollm2_path: Path, home: Path, tmp_path: Path) -> None:
    options = {**GREEDY, "num_predict": 8}
    with Client(home) as client:
        expected = client.generate(str(smollm2_path), PROMPT, options=options).response
    script = tmp_path / "plain_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            import sys

            import localllm

            async def main():
                async with localllm.Engine(sys.argv[1], isolation="process") as engine:
                    reply = await engine.generate(sys.argv[2], {PROMPT!r}, options={options!r})
                    (model,) = (await engine.ps()).models
                    print(model.pid)
                    print(repr(reply.response))

            asyncio.run(main())
            """
        )
    )
    # The script imports this checkout's localllm, wherever it lies.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, str(script), str(home / "script"), str(smollm2_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    pid, reply = run.stdout.splitlines()
    assert int(pid) > 0 and reply == repr(expected)

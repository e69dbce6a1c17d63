"""Runners in child processes: the same results as in threads, and a crash that only costs a request."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from pathlib import Path

import pytest

from localllm import Engine, InvalidRequest, LocalLLMError, RunnerError
from localllm.runner.process import ProcessRunner
from localllm.runner.protocol import LoadConfig
from localllm.runner.worker import Runner

GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_ctx": 512}
PROMPT = "The three primary colors are"
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
    for make in (Runner, ProcessRunner):
        with pytest.raises(LocalLLMError) as info:
            make(LoadConfig(str(bad), num_ctx=512))
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    assert not multiprocessing.active_children()


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
    assert not multiprocessing.active_children()
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
    assert not multiprocessing.active_children()
    assert not any(_alive(pid) for pid in pids if pid is not None)


def _kill(runner: ProcessRunner) -> None:
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGKILL)


def _abort(runner: ProcessRunner) -> None:
    runner._abort_child()

"""The host process survives: kernels safe on every CPU, failed runners replaced, closing during a load."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from localllm import Engine, EngineClosed, RunnerError
from localllm.runner.llama import repack_default, repack_is_safe
from localllm.scheduler.loader import RunnerFactory

GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
AMX_BUILD = "CPU : SSE3 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 |"
PLAIN_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | REPACK = 1 |"


def test_repacking_is_off_only_where_amx_kernels_could_run() -> None:
    amx_cpu = frozenset({"avx512f", "amx_tile", "amx_int8", "amx_bf16"})
    other_cpu = frozenset({"avx2", "avx512f"})
    assert not repack_is_safe(AMX_BUILD, amx_cpu)
    assert not repack_is_safe(AMX_BUILD, None), "unknown CPU flags: assume the worst"
    assert repack_is_safe(AMX_BUILD, other_cpu), "AMX kernels cannot be picked on a CPU without AMX"
    assert repack_is_safe(PLAIN_BUILD, amx_cpu), "a build without AMX kernels keeps repacking"
    assert repack_is_safe(PLAIN_BUILD, None)


def test_the_repack_setting_comes_from_the_engine_or_the_environment(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Engine(home).settings.repack is None
    assert Engine(home, repack=False).settings.repack is False
    monkeypatch.setenv("LOCALLLM_REPACK", "on")
    assert Engine(home).settings.repack is True
    monkeypatch.setenv("LOCALLLM_REPACK", "off")
    assert Engine(home).settings.repack is False
    monkeypatch.setenv("LOCALLLM_REPACK", "maybe")
    with pytest.raises(Exception, match="LOCALLLM_REPACK"):
        Engine(home)


@pytest.mark.parametrize("repack", [True, False])
async def test_the_repack_setting_reaches_llama_cpp(
    repack: bool, gemma3_path: Path, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if repack and not repack_default():
        pytest.fail("this machine's llama.cpp build would use AMX kernels: run this test where repacking is safe")
    caplog.set_level(logging.DEBUG, logger="localllm.llama_cpp")
    async with Engine(home, repack=repack) as engine:
        reply = await engine.generate(str(gemma3_path), "One, two,", options={**GREEDY, "num_predict": 2})
    assert reply.done
    # llama.cpp logs each weight buffer it allocates; Gemma's Q4_K weights go to the repacked layout.
    assert ("CPU_REPACK model buffer size" in caplog.text) is repack


async def test_batched_prompts_decode_across_many_threads_many_times(smollm2_path: Path, home: Path) -> None:
    """Multi-token batches over more threads than cores: where ggml's AMX matmul was used, this trapped."""
    model = str(smollm2_path)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma"
    async with Engine(home, num_parallel=4) as engine:
        options = {**GREEDY, "num_predict": 2, "num_ctx": 512, "num_thread": 4, "num_batch": 128}
        for round_ in range(10):
            replies: list[Any] = []
            async with anyio.create_task_group() as group:
                for i in range(4):
                    # A fresh prefix each time: the whole prompt is decoded, not taken from the cache.
                    prompt = f"Round {round_}, stream {i}: {words} {words}. Say the next word:"
                    group.start_soon(_append, replies, engine.generate(model, prompt, raw=True, options=options))
            assert len(replies) == 4 and all(r.done and r.prompt_eval_count > 50 for r in replies)


async def test_a_runner_whose_thread_fails_is_replaced(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    options = {**GREEDY, "num_predict": 4}
    async with Engine(home, keep_alive=-1) as engine:
        await engine.generate(model, "Hello", options=options)
        (loaded,) = await engine.scheduler.running()
        broken = loaded.runner

        def fail(*_args: Any) -> None:
            raise RuntimeError("injected failure")

        broken._step = fail  # the worker thread raises at its next step
        with pytest.raises(RunnerError, match="injected failure"):
            await engine.generate(model, "Hello again", options=options)
        assert not broken.healthy
        reply = await engine.generate(model, "Hello once more", options=options)
        assert reply.done and reply.eval_count == 4
        running = (await engine.ps()).models
        assert len(running) == 1
        (fresh,) = await engine.scheduler.running()
        assert fresh.runner is not broken and fresh.runner.healthy


async def test_closing_during_a_slow_load_leaves_no_runner_behind(
    smollm2_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(home)
    loading = threading.Event()
    real_load = RunnerFactory.load

    def slow_load(factory: RunnerFactory, config: Any) -> Any:  # a fake loader: the real one, after a pause
        loading.set()
        threading.Event().wait(0.5)
        return real_load(factory, config)

    monkeypatch.setattr(RunnerFactory, "load", slow_load)
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await engine.generate(str(smollm2_path), "Hello", options={"num_predict": 4})
        except EngineClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(ask)
        await anyio.to_thread.run_sync(loading.wait)
        await engine.aclose()
        assert not [t.name for t in threading.enumerate() if t.name.startswith("localllm-")]
    assert errors, "a request whose model finished loading after close must fail, not be served"


async def _append(into: list[Any], awaitable: Any) -> None:
    into.append(await awaitable)


async def test_a_batch_smaller_than_the_slots_and_a_huge_penalty_window_are_safe(
    smollm2_path: Path, home: Path
) -> None:
    """num_batch below num_parallel made llama.cpp abort; a huge repeat_last_n made it allocate gigabytes."""
    async with Engine(home, num_parallel=2) as engine:
        options = {**GREEDY, "num_batch": 1, "num_predict": 3, "repeat_last_n": 2**31 - 1, "num_ctx": 512}
        replies: list[Any] = []
        async with anyio.create_task_group() as group:
            for prompt in ("One, two,", "Red, green,"):
                group.start_soon(_append, replies, engine.generate(str(smollm2_path), prompt, options=options))
    # Greedy, so neither reply ends early on an end-of-text token.
    assert [(r.eval_count, r.done_reason) for r in replies] == [(3, "length"), (3, "length")]

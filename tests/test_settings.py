"""Engine settings: each from its argument, LOCALLLM_* or OLLAMA_* variable, parsed as Ollama parses them; the
defaults that follow Ollama's (num_ctx by GPU memory, capped at the trained context; repeat_penalty 1.0); and
the README's settings tables, checked against the specification so they stay true."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from localllm import Engine, InputError, InvalidRequest, Options
from localllm.options import LOAD_OPTIONS, RUNNER_LOAD_OPTIONS, merge_options
from localllm.runner.protocol import LoadConfig
from localllm.scheduler.devices import DeviceInventory, GpuDevice, SystemMemory, discover
from localllm.scheduler.loader import RunnerFactory
from localllm.scheduler.memory import estimate_file_memory, gpu_overhead_from_env, plan_layers
from localllm.settings import NOT_READ, SETTINGS, EngineSettings, default_context_length

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
SETTING_VARIABLES = {variable for setting in SETTINGS for variable in setting.variables}

# Per setting: (a variable's text, the value it gives), (another text and value), an argument value.
SAMPLES: dict[str, tuple[tuple[str, Any], tuple[str, Any], Any]] = {
    "home": (("/tmp/a", "/tmp/a"), ("/tmp/b", "/tmp/b"), "/tmp/c"),
    "models": (("/tmp/a", "/tmp/a"), ("/tmp/b", "/tmp/b"), "/tmp/c"),
    "num_parallel": (("2", 2), ("3", 3), 5),
    "max_loaded_models": (("1", 1), ("2", 2), 4),
    "max_queue": (("7", 7), ("8", 8), 9),
    "keep_alive": (("1h30m", 5400.0), ("10", 10.0), "2m"),
    "context_length": (("1024", 1024), ("2048", 2048), None),
    "kv_cache_type": (("q8_0", "q8_0"), ("Q4_0", "q4_0"), "f16"),
    "flash_attention": (("1", True), ("false", False), True),
    "gpu_overhead": (("1048576", 1 << 20), ("2e9", 2_000_000_000), None),
    "sched_spread": (("true", True), ("0", False), None),
    "repack": (("on", True), ("off", False), True),
    "prompt_cache": (("1", True), ("/tmp/cache", "/tmp/cache"), False),
    "prompt_cache_size": (("0", 0), ("1024", 1024), 2048),
    "isolation": (("process", "process"), ("thread", "thread"), "process"),
    "runner_timeout": (("5", 5.0), ("1m30s", 90.0), None),
}

# Per setting: a text no variable may hold.
BAD = {
    "num_parallel": "0",
    "max_loaded_models": "-1",
    "max_queue": "many",
    "keep_alive": "soon",
    "context_length": "4k",
    "kv_cache_type": "q3_k",
    "flash_attention": "maybe",
    "gpu_overhead": "lots",
    "sched_spread": "yes please",
    "repack": "sometimes",
    "prompt_cache_size": "big",
    "isolation": "container",
    "runner_timeout": "0",
}

ENGINE_ARGUMENTS = {
    "home",
    "models",
    "num_parallel",
    "max_loaded_models",
    "max_queue",
    "keep_alive",
    "kv_cache_type",
    "flash_attention",
    "repack",
    "prompt_cache",
    "prompt_cache_size",
    "isolation",
}

FIELDS = {"prompt_cache": "prompt_cache_dir", "prompt_cache_size": "prompt_cache_bytes"}


def field_value(settings: EngineSettings, name: str) -> Any:
    value = getattr(settings, FIELDS.get(name, name))
    if name == "prompt_cache":
        return {None: False, settings.home / "cache" / "prompts": True}.get(value, str(value))
    return str(value) if isinstance(value, Path) else value


def resolved(environ: dict[str, str], **arguments: Any) -> EngineSettings:
    arguments = {"home": "/tmp/home", **arguments}
    names = ("home", "models", "num_parallel", "max_loaded_models", "max_queue", "keep_alive", "kv_cache_type")
    positional = [arguments.pop(name, None) for name in names]
    return EngineSettings.resolve(*positional, **arguments, environ=environ)


@pytest.mark.fast
def test_the_specification_covers_the_engine_arguments() -> None:
    assert {s.name for s in SETTINGS if s.argument} == ENGINE_ARGUMENTS
    assert set(SAMPLES) == {s.name for s in SETTINGS}
    for setting in SETTINGS:
        assert setting.variables[0] == f"LOCALLLM_{setting.name.upper()}"
        assert setting.variables[1:] in ((), (f"OLLAMA_{setting.name.upper()}",))


@pytest.mark.fast
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_each_source_in_order_argument_localllm_ollama_default(setting: Any) -> None:
    (first_text, first), (second_text, second), argument = SAMPLES[setting.name]
    name = setting.name
    if name == "home":  # the test helper passes home as an argument
        settings = EngineSettings.resolve(None, None, None, None, None, None, None, environ={})
        assert settings.home == Path.home() / ".localllm"
        env = {"LOCALLLM_HOME": first_text}
        assert EngineSettings.resolve(None, None, None, None, None, None, None, environ=env).home == Path(first)
        assert EngineSettings.resolve(argument, None, None, None, None, None, None, environ=env).home == Path(argument)
        return
    default = field_value(resolved({}), name)
    if name == "models":
        assert default == "/tmp/home/models"
    else:
        assert default == setting.default
    ollama = setting.variables[1] if len(setting.variables) == 2 else None
    local_variable = setting.variables[0]
    if ollama is not None:
        assert field_value(resolved({ollama: first_text}), name) == first
        assert field_value(resolved({ollama: first_text, local_variable: second_text}), name) == second
    assert field_value(resolved({local_variable: second_text}), name) == second
    if setting.argument:
        env = {variable: first_text for variable in setting.variables}
        expected = argument
        if name == "keep_alive":
            expected = 120.0
        assert field_value(resolved(env, **{name: argument}), name) == expected


@pytest.mark.fast
def test_values_read_as_ollama_reads_them() -> None:
    def keep_alive(text: str) -> float:
        return resolved({"OLLAMA_KEEP_ALIVE": text}).keep_alive

    assert keep_alive("5m") == 300 and keep_alive("300ms") == 0.3 and keep_alive("90") == 90
    assert keep_alive("0") == 0 and keep_alive("-1") == math.inf and keep_alive("-5m") == math.inf
    # Surrounding spaces and quotes go, as in Ollama's envconfig.Var.
    assert resolved({"OLLAMA_NUM_PARALLEL": ' "2" '}).num_parallel == 2
    assert resolved({"OLLAMA_KV_CACHE_TYPE": "'q8_0'"}).kv_cache_type == "q8_0"
    # Go's booleans (strconv.ParseBool) and auto for the settings llama.cpp may decide.
    for text, value in (("1", True), ("t", True), ("TRUE", True), ("0", False), ("F", False), ("auto", None)):
        assert resolved({"OLLAMA_FLASH_ATTENTION": text}).flash_attention is value
    # An empty variable is unset.
    assert resolved({"LOCALLLM_NUM_PARALLEL": "", "OLLAMA_NUM_PARALLEL": "2"}).num_parallel == 2


@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_names_its_variable(name: str) -> None:
    setting = next(s for s in SETTINGS if s.name == name)
    for variable in setting.variables:
        with pytest.raises(InvalidRequest, match=rf"environment variable {variable} must .*got '{BAD[name]}'"):
            resolved({variable: BAD[name]})


@pytest.mark.fast
def test_a_bad_argument_names_the_argument() -> None:
    with pytest.raises(InvalidRequest, match="num_parallel must be at least 1"):
        resolved({}, num_parallel=0)
    with pytest.raises(InvalidRequest, match="kv_cache_type must be f16, q8_0 or q4_0"):
        resolved({}, kv_cache_type="q3_k")
    with pytest.raises(InvalidRequest, match="keep_alive"):
        resolved({}, keep_alive="soon")
    with pytest.raises(InputError, match="flash_attention must be True, False or None"):
        resolved({}, flash_attention="yes")


@pytest.mark.fast
def test_engine_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OLLAMA_NUM_PARALLEL", "2")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-models"))
    monkeypatch.setenv("LOCALLLM_MAX_QUEUE", "3")
    engine = Engine(tmp_path)
    assert (engine.settings.num_parallel, engine.settings.max_queue) == (2, 3)
    assert engine.settings.models == tmp_path / "ollama-models"
    assert Engine(tmp_path, num_parallel=1).settings.num_parallel == 1


def child_environment(**variables: str) -> dict[str, str]:
    """This environment without any setting's variable, plus `variables`."""
    env = {name: value for name, value in os.environ.items() if name not in SETTING_VARIABLES}
    return {**env, **variables}


def test_ollama_variables_take_effect_in_a_new_process(tmp_path: Path) -> None:
    env = child_environment(
        LOCALLLM_HOME=str(tmp_path),
        OLLAMA_MODELS=str(tmp_path / "shared"),
        OLLAMA_NUM_PARALLEL="2",
        OLLAMA_MAX_LOADED_MODELS="1",
        OLLAMA_MAX_QUEUE="16",
        OLLAMA_KEEP_ALIVE="1h",
        OLLAMA_CONTEXT_LENGTH="1024",
        OLLAMA_FLASH_ATTENTION="true",
        OLLAMA_KV_CACHE_TYPE="q8_0",
        OLLAMA_GPU_OVERHEAD="1048576",
        OLLAMA_SCHED_SPREAD="1",
    )
    script = "import attrs, json, localllm; print(json.dumps(attrs.asdict(localllm.Engine().settings), default=str))"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    settings = json.loads(out)
    assert settings == {
        **settings,
        "models": str(tmp_path / "shared"),
        "num_parallel": 2,
        "max_loaded_models": 1,
        "max_queue": 16,
        "keep_alive": 3600.0,
        "context_length": 1024,
        "flash_attention": True,
        "kv_cache_type": "q8_0",
        "gpu_overhead": 1 << 20,
        "sched_spread": True,
    }


def test_ollama_context_length_sets_the_loaded_context(smollm2_path: Path, tmp_path: Path) -> None:
    env = child_environment(LOCALLLM_HOME=str(tmp_path), OLLAMA_CONTEXT_LENGTH="1024", OLLAMA_NUM_PARALLEL="1")
    script = (
        "import sys, localllm\n"
        "with localllm.Client() as client:\n"
        "    client.generate(sys.argv[1], '')\n"
        "    print(client.ps().models[0].context_length)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(smollm2_path)], env=env, capture_output=True, text=True, check=True
    )
    assert run.stdout.split() == ["1024"]


# -- defaults as Ollama's ----------------------------------------------------------------------------------------


@pytest.mark.fast
def test_default_context_length_by_gpu_memory() -> None:
    assert default_context_length([], 0) == 4096  # CPU only
    assert default_context_length([16 * GiB], 0) == 4096
    assert default_context_length([24 * GiB], 0) == 32768
    assert default_context_length([24 * GiB], 2 * GiB) == 4096  # the overhead is not counted
    assert default_context_length([24 * GiB, 24 * GiB], 0) == 262144  # GPUs add up
    assert default_context_length([80 * GiB], 0) == 262144


def inventory(*gpu_gib: int) -> DeviceInventory:
    gpus = [
        GpuDevice(index=i, name=f"GPU {i}", total_memory=g * GiB, free_memory=g * GiB) for i, g in enumerate(gpu_gib)
    ]
    return DeviceInventory(gpus=gpus, system=SystemMemory(total=64 * GiB, free=64 * GiB))


@pytest.mark.fast
def test_the_engine_default_num_ctx_and_loaded_model_count_follow_the_devices() -> None:
    settings = resolved({})
    assert RunnerFactory(settings, devices=inventory()).default_num_ctx() == 4096
    assert RunnerFactory(settings, devices=inventory(24)).default_num_ctx() == 32768
    assert RunnerFactory(settings, devices=inventory(80)).default_num_ctx() == 262144
    assert RunnerFactory(resolved({"OLLAMA_CONTEXT_LENGTH": "2048"}), devices=inventory(80)).default_num_ctx() == 2048
    assert RunnerFactory(settings, devices=inventory()).max_loaded_models() == 3
    assert RunnerFactory(settings, devices=inventory(24, 24)).max_loaded_models() == 6
    assert RunnerFactory(resolved({}, max_loaded_models=1), devices=inventory(24)).max_loaded_models() == 1


@pytest.mark.fast
def test_gpu_overhead_and_spread_reach_the_layer_plan(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCALLLM_GPU_OVERHEAD", raising=False)
    monkeypatch.setenv("OLLAMA_GPU_OVERHEAD", str(GiB))
    assert gpu_overhead_from_env() == GiB
    estimate = estimate_file_memory(str(smollm2_path), num_ctx=2048, num_parallel=1)
    two = inventory(8, 8)
    assert len(plan_layers(estimate, two, overhead=0).layers_per_device) == 1  # one GPU holds it
    assert len(plan_layers(estimate, two, overhead=0, spread=True).layers_per_device) == 2
    # Through the engine's settings: an overhead as large as the GPU leaves no room on it.
    config = RunnerFactory(resolved({}), devices=inventory(1)).config_for(str(smollm2_path), (), Options())
    assert RunnerFactory(resolved({}), devices=inventory(1)).plan(config).gpu_layers > 0
    crowded = RunnerFactory(resolved({"OLLAMA_GPU_OVERHEAD": str(GiB)}), devices=inventory(1))
    assert crowded.plan(config).gpu_layers == 0
    spread = RunnerFactory(resolved({"OLLAMA_SCHED_SPREAD": "1"}), devices=two)
    assert len(spread.plan(config).layers_per_device) == 2


@pytest.mark.fast
def test_four_slots_cost_what_the_readme_says(smollm2_path: Path) -> None:
    sizes = []
    for parallel in (1, 4):
        factory = RunnerFactory(resolved({}, num_parallel=parallel), devices=inventory())
        sizes.append(round(factory.size(factory.config_for(str(smollm2_path), (), Options()))[0] / (1 << 20)))
    assert f"for {sizes[1]} instead of {sizes[0]} MiB loaded at num_ctx 4096" in readme_section("Settings")


@pytest.mark.fast
def test_repeat_penalty_defaults_to_ollamas_one() -> None:
    assert Options().repeat_penalty == 1.0
    assert merge_options({"temperature": 0}).repeat_penalty == 1.0


@pytest.mark.fast
def test_num_ctx_is_capped_at_the_trained_context(smollm2_path: Path) -> None:
    factory = RunnerFactory(resolved({}), devices=inventory())
    big = factory.config_for(str(smollm2_path), (), Options(num_ctx=16384))
    assert big.num_ctx == 8192  # SmolLM2 was trained on 8192 tokens
    assert big == factory.config_for(str(smollm2_path), (), Options(num_ctx=8192))
    assert factory.size(big) == factory.size(attrs.evolve(big, num_ctx=8192))
    assert factory.config_for(str(smollm2_path), (), Options(num_ctx=1000)).num_ctx == 1000


async def test_ps_shows_the_capped_context_and_defaults_match_ollama(smollm2_path: Path, home: Path) -> None:
    model = str(smollm2_path)
    prompt = "Repeat after me: one two one two one two"
    async with Engine(home, num_parallel=1) as engine:
        default = await engine.generate(model, prompt, options={"temperature": 0, "num_predict": 16})
        expected = default_context_length([gpu.total_memory for gpu in discover().gpus], 0)  # 4096 without a GPU
        assert [p.context_length for p in (await engine.ps()).models] == [min(expected, 8192)]
        plain = await engine.generate(model, prompt, options={"temperature": 0, "num_predict": 16, "repeat_penalty": 1})
        assert default.response == plain.response  # no repeat penalty unless asked, as Ollama
        await engine.generate(model, "", options={"num_ctx": 16384})
        running = (await engine.ps()).models
        assert [p.context_length for p in running] == [8192]


# -- the README's tables -------------------------------------------------------------------------------------------


def markdown_tables(section: str) -> list[list[list[str]]]:
    """Every table of a markdown section: rows of cells, header and rule left out."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in section.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
                continue  # the header
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        else:
            current = None
    return tables


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


@pytest.mark.fast
def test_the_readme_settings_table_matches_the_specification() -> None:
    settings_table, differences = markdown_tables(readme_section("Settings"))
    assert len(settings_table) == len(SETTINGS)
    for row, setting in zip(settings_table, SETTINGS, strict=True):
        argument, environment, default = row
        assert (names(argument) or [setting.name]) == [setting.name]
        assert argument == (f"`{setting.name}`" if setting.argument else "—")
        assert names(environment) == list(setting.variables)
        assert default == setting.doc_default
    differing = {s.name: s for s in SETTINGS if s.ollama_default is not None}
    assert [names(row[0])[0] for row in differences] == list(differing)
    for name_cell, ours, ollamas, reason in differences:
        setting = differing[names(name_cell)[0]]
        assert (ours, ollamas) == (setting.doc_default, setting.ollama_default)
        assert reason


@pytest.mark.fast
def test_options_defaults_are_ollamas() -> None:
    # api.DefaultOptions: the README lists no option default as differing.
    ollama = {
        "num_predict": -1,
        "num_keep": 4,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.9,
        "typical_p": 1.0,
        "repeat_last_n": 64,
        "repeat_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": -1,
        "num_batch": 512,
        "num_gpu": -1,
        "num_thread": 0,
        "min_p": 0.0,
    }
    defaults = Options().to_dict()
    assert {name: defaults[name] for name in ollama} == ollama


# Every variable Ollama's envconfig reads (AsMap), bar proxies and device selection (CUDA_VISIBLE_DEVICES and kin,
# which llama.cpp reads itself).
OLLAMA_VARIABLES = {
    "OLLAMA_DEBUG",
    "OLLAMA_DEBUG_LOG_REQUESTS",
    "OLLAMA_GO_TEMPLATE",
    "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_KV_CACHE_TYPE",
    "OLLAMA_GPU_OVERHEAD",
    "OLLAMA_IGPU_ENABLE",
    "OLLAMA_HOST",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_LLM_LIBRARY",
    "OLLAMA_LOAD_TIMEOUT",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_MAX_TRANSFER_STREAMS",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_MODELS",
    "OLLAMA_NO_CLOUD",
    "OLLAMA_NOHISTORY",
    "OLLAMA_NOPRUNE",
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_ORIGINS",
    "OLLAMA_SCHED_SPREAD",
    "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_EDITOR",
    "OLLAMA_REMOTES",
    "OLLAMA_VULKAN",
    "OLLAMA_AUTH",
}


@pytest.mark.fast
def test_every_ollama_variable_is_read_or_said_not_to_be() -> None:
    read = {variable for variable in SETTING_VARIABLES if variable.startswith("OLLAMA_")}
    assert OLLAMA_VARIABLES <= read | set(NOT_READ)
    assert not read & set(NOT_READ)
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    section = reference[reference.index("\n## Engine settings\n") :]
    section = section[: section.index("\n## ", 1)]
    for variable in NOT_READ:
        assert f"`{variable}`" in section, variable


def test_every_load_option_is_a_load_configuration_field_and_back() -> None:
    """A load option LoadConfig lacked would not reach the runner, nor load another one when it changes."""
    config_fields = {field.name: field for field in attrs.fields(attrs.resolve_types(LoadConfig))}
    option_fields = {field.name: field for field in attrs.fields(Options)}
    assert set(RUNNER_LOAD_OPTIONS) == set(config_fields) & set(option_fields)
    # The one load option a runner does not take as it is: the model a draft_model names, as a file.
    assert LOAD_OPTIONS - set(RUNNER_LOAD_OPTIONS) == {"draft_model"}
    assert "draft_model_path" in config_fields
    for name in RUNNER_LOAD_OPTIONS:
        assert (config_fields[name].type, config_fields[name].default) == (
            option_fields[name].type,
            option_fields[name].default,
        ), name


def test_every_load_option_of_a_request_reaches_the_load_configuration(smollm2_path: Path) -> None:
    defaults = Options()
    changed = {
        name: not value if isinstance(value, bool) else value + 1
        for name in RUNNER_LOAD_OPTIONS
        for value in [getattr(defaults, name)]
    }
    factory = RunnerFactory(resolved({}), devices=inventory())
    config = factory.config_for(str(smollm2_path), (), Options(**changed))
    assert {name: getattr(config, name) for name in RUNNER_LOAD_OPTIONS} == changed
    assert config != factory.config_for(str(smollm2_path), (), defaults)  # so it loads another runner

"""Templates are untrusted code: every render runs under time, step and output limits, off the event loop."""

from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from localllm import Engine
from localllm.chat import TemplateLimits
from localllm.chat import prompt as chat_prompt
from localllm.chat.gotemplate import GoTemplate
from localllm.chat.template import JinjaTemplate, load_template
from localllm.errors import InvalidOptions, TemplateError

USER = [{"role": "user", "content": "hi"}]

# SmolLM2-135M-Instruct's own chat template (tokenizer.chat_template in its GGUF).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5's tool-calling chat template, in Jinja and as Ollama's Go template.
QWEN_JINJA = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> tags<|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first)
      or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

QWEN_GO = """{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

NESTED_JINJA = "{% for i in range(12000) %}{% for j in range(12000) %}{% endfor %}{% endfor %}"
NESTED_GO = "{{ range 100000 }}{{ range 100000 }}{{ end }}{{ end }}"

SMALL = TemplateLimits(timeout=10, max_steps=10_000, max_output=10_000)
NO_STEP_LIMIT = TemplateLimits(timeout=0.2, max_steps=10**12)


def long_conversation(turns: int) -> list[dict[str, Any]]:
    """A long agent conversation: each turn a question, a tool call, its result and an answer."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        call = {"function": {"name": "get_weather", "arguments": {"city": f"City {i}"}}}
        messages += [
            {"role": "user", "content": f"What is the weather in City {i}? " + "Please be precise. " * 20},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"temperature": 18, "sky": "sunny"}'},
            {"role": "assistant", "content": "It is 18 degrees and sunny. " * 10},
        ]
    return [*messages, {"role": "user", "content": "Thanks!"}]


def jinja(source: str, limits: TemplateLimits | None = None) -> str:
    return JinjaTemplate(source, limits=limits).render(USER)


def go(source: str, limits: TemplateLimits | None = None) -> str:
    return GoTemplate(source, limits=limits).execute({})


# --------------------------------------------------------------------------------------------------------------------
# Jinja


@pytest.mark.fast
def test_jinja_nested_loops_hit_the_step_limit() -> None:
    with pytest.raises(TemplateError, match=r"step limit of 10,000 steps.*LOCALLLM_TEMPLATE_MAX_STEPS"):
        jinja(NESTED_JINJA, SMALL)


@pytest.mark.fast
def test_jinja_default_limits_stop_the_hostile_template() -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateError, match="limit"):
        jinja(NESTED_JINJA)
    assert time.perf_counter() - started < 2 * TemplateLimits().timeout


@pytest.mark.fast
def test_jinja_runaway_loops_hit_the_time_limit() -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateError, match=r"time limit of 0.2 seconds.*LOCALLLM_TEMPLATE_TIMEOUT"):
        jinja(NESTED_JINJA, NO_STEP_LIMIT)
    assert time.perf_counter() - started < 1.0


@pytest.mark.fast
def test_jinja_string_repetition_is_refused_before_it_allocates() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match=r"would build 1,000,000,000 characters.*output limit"):
            jinja("{{ 'x' * 10**9 }}")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


@pytest.mark.fast
@pytest.mark.parametrize(
    "source",
    [
        "{{ '%1000000000d' % 1 }}",
        "{{ '%*d' % (1000000000, 1) }}",
        "{{ '%1000000000d' | format(1) }}",
        "{{ '{:>1000000000}'.format(1) }}",
        "{{ '{:>{w}}'.format(1, w=1000000000) }}",
        "{{ 'x'.ljust(1000000000) }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ 'x' | indent(1000000000) }}",
        "{{ [1] | batch(1000000000, 0) | list }}",
        "{% set s = 'x' * 30000 %}{{ s.replace('x', s) }}",
        "{{ (['x' * 1000000] * 100) | join }}",
    ],
)
def test_jinja_amplifying_operations_are_refused(source: str) -> None:
    with pytest.raises(TemplateError, match="output limit"):
        jinja(source)


@pytest.mark.fast
def test_jinja_huge_output_hits_the_output_limit() -> None:
    with pytest.raises(TemplateError, match=r"output limit of 10,000 characters.*LOCALLLM_TEMPLATE_MAX_OUTPUT"):
        jinja("{% for i in range(1000) %}0123456789abcdef{% endfor %}", SMALL)


@pytest.mark.fast
def test_jinja_text_kept_in_a_variable_counts_as_output() -> None:
    source = "{% set kept %}{% for i in range(1000) %}0123456789abcdef{% endfor %}{% endset %}{{ kept | length }}"
    with pytest.raises(TemplateError, match="output limit"):
        jinja(source, SMALL)


@pytest.mark.fast
def test_jinja_doubling_a_string_is_stopped() -> None:
    source = '{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}'
    with pytest.raises(TemplateError, match="output limit"):
        jinja(source)


@pytest.mark.fast
@pytest.mark.parametrize(
    "source",
    [
        "{{ 10 ** (10 ** 9) }}",  # a number of a billion digits
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # endless recursion
        "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
        "{{ " + "9" * 5000 + " }}",  # a literal too long to read
        "{{ lipsum(10**6) }}",
    ],
)
def test_jinja_other_runaways_are_template_errors(source: str) -> None:
    with pytest.raises(TemplateError):
        jinja(source)


@pytest.mark.fast
@pytest.mark.parametrize("error", [MemoryError, RecursionError])
def test_memory_and_recursion_errors_never_escape(error: type[BaseException]) -> None:
    def fail() -> None:
        raise error

    template = JinjaTemplate("{{ fail() }}")
    with pytest.raises(TemplateError, match=r"memory|deeply"):
        template.render(USER, fail=fail)


@pytest.mark.fast
def test_jinja_metering_keeps_the_language_working() -> None:
    source = (
        "{% for i in range(3) %}{{ loop.index }}{{ '.' if not loop.last }}{% else %}none{% endfor %}|"
        "{% for c in 'abc' if c != 'b' %}{{ c }}{% endfor %}|"
        "{% for x in [[1, [2]], [3]] recursive %}[{% if x is iterable %}{{ loop(x) }}{% else %}{{ x }}{% endif %}]"
        "{% endfor %}|"
        "{% macro tag(name) %}<{{ name }}>{{ caller() }}</{{ name }}>{% endmacro %}"
        "{% call tag('b') %}{{ 'x' ~ 'y' }}{% endcall %}|"
        "{{ '{:>5}|{:,}'.format('ab', 1234567) }}|{{ '%05.1f' % 3.14159 }}|{{ ['a', 'b'] | join(', ') }}|"
        "{{ messages | map(attribute='role') | join }}|{{ 2 ** 10 }}|{{ 'ab' * 3 }}|{{ {'k': [1]} | tojson }}"
        "{% filter upper %}|done{% endfilter %}"
    )
    assert jinja(source) == (
        '1.2.3|ac|[[1][[2]]][[3]]|<b>xy</b>|   ab|1,234,567|003.1|a, b|user|1024|ababab|{"k": [1]}|DONE'
    )


# --------------------------------------------------------------------------------------------------------------------
# Go


@pytest.mark.fast
def test_go_printf_width_is_refused_before_formatting() -> None:
    with pytest.raises(TemplateError, match=r"printf.*would build 1,000,000,000 characters.*output limit"):
        go('{{ printf "%1000000000d" 1 }}')


@pytest.mark.fast
@pytest.mark.parametrize("source", ['{{ printf "%.1000000000f" 1.5 }}', '{{ printf "%*d" 1000000000 1 }}'])
def test_go_printf_precision_and_star_width_are_refused(source: str) -> None:
    with pytest.raises(TemplateError, match="output limit"):
        go(source)


@pytest.mark.fast
def test_go_printf_still_formats() -> None:
    assert go('{{ printf "%5d|%-4s|%.2f|%q" 42 "ab" 3.14159 "x" }}') == '   42|ab  |3.14|"x"<no value>'


@pytest.mark.fast
def test_go_long_and_nested_ranges_hit_the_step_limit() -> None:
    with pytest.raises(TemplateError, match="ranges over 1,000,000,000, over its step limit"):
        go("{{ range 1000000000 }}{{ end }}")
    with pytest.raises(TemplateError, match=r"step limit of 10,000 steps.*LOCALLLM_TEMPLATE_MAX_STEPS"):
        go(NESTED_GO, SMALL)


@pytest.mark.fast
def test_go_default_limits_stop_the_hostile_template() -> None:
    started = time.perf_counter()
    with pytest.raises(TemplateError, match="limit"):
        go(NESTED_GO)
    assert time.perf_counter() - started < 2 * TemplateLimits().timeout


@pytest.mark.fast
def test_go_runaway_ranges_hit_the_time_limit() -> None:
    with pytest.raises(TemplateError, match=r"time limit of 0.2 seconds"):
        go(NESTED_GO, NO_STEP_LIMIT)


@pytest.mark.fast
def test_go_huge_output_hits_the_output_limit() -> None:
    with pytest.raises(TemplateError, match="output limit of 10,000 characters"):
        go("{{ range 1000 }}0123456789abcdef{{ end }}", SMALL)


@pytest.mark.fast
def test_go_legacy_turns_share_one_budget() -> None:
    """A legacy template runs once per turn; the turns together stay within one render's limits."""
    messages = [{"role": role, "content": "x" * 1000} for _ in range(8) for role in ("user", "assistant")]
    template = GoTemplate("{{ .Prompt }}{{ .Response }}", limits=SMALL)
    assert len(template.render(messages[:8])) <= 10_000
    with pytest.raises(TemplateError, match="output limit"):
        template.render(messages)


@pytest.mark.fast
def test_go_memory_errors_never_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm.chat.gotemplate import funcs as gotemplate

    def out_of_memory(args: list[Any]) -> str:
        raise MemoryError

    monkeypatch.setitem(gotemplate._FUNCS, "print", out_of_memory)
    with pytest.raises(TemplateError, match="memory"):
        go('{{ print "x" }}')


@pytest.mark.fast
def test_go_huge_number_literal_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="bad number"):
        go("{{ 0x" + "f" * 5000 + " }}")


# --------------------------------------------------------------------------------------------------------------------
# Real templates, raising limits, settings


@pytest.mark.fast
def test_smollm2_template_renders_a_long_conversation() -> None:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i}. " * 10} for i in range(2000)
    ]
    expected = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    expected += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    expected += "<|im_start|>assistant\n"
    assert JinjaTemplate(SMOLLM2).render(messages) == expected


@pytest.mark.fast
@pytest.mark.parametrize("template", [JinjaTemplate(QWEN_JINJA), GoTemplate(QWEN_GO)], ids=["jinja", "go"])
def test_tool_templates_render_a_long_agent_conversation(template: JinjaTemplate | GoTemplate) -> None:
    messages = long_conversation(500)
    prompt = template.render(messages, tools=[WEATHER_TOOL])
    assert prompt.count("<tool_response>") == 500
    assert prompt.count("get_weather") == 501
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.fast
def test_raising_a_limit_lets_a_bigger_render_through() -> None:
    loops = "{% for i in range(200) %}{% for j in range(200) %}{% endfor %}{% endfor %}done"
    with pytest.raises(TemplateError, match="step limit"):
        jinja(loops, SMALL)
    assert jinja(loops, TemplateLimits(max_steps=100_000)) == "done"
    text = "{% for i in range(1000) %}0123456789abcdef{% endfor %}"
    assert len(jinja(text, TemplateLimits(max_output=20_000))) == 16_000
    assert len(go("{{ range 1000 }}0123456789abcdef{{ end }}", TemplateLimits(max_output=20_000))) == 16_010
    with pytest.raises(TemplateError, match="step limit"):
        go("{{ range 200 }}{{ range 200 }}{{ end }}{{ end }}", SMALL)
    go("{{ range 200 }}{{ range 200 }}{{ end }}{{ end }}", TemplateLimits(max_steps=100_000))


@pytest.mark.fast
def test_limits_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("LOCALLLM_TEMPLATE_TIMEOUT", "LOCALLLM_TEMPLATE_MAX_STEPS", "LOCALLLM_TEMPLATE_MAX_OUTPUT"):
        monkeypatch.delenv(variable, raising=False)
    assert TemplateLimits() == TemplateLimits(timeout=2.0, max_steps=4_000_000, max_output=8 * 1024 * 1024)
    monkeypatch.setenv("LOCALLLM_TEMPLATE_TIMEOUT", "0.5")
    monkeypatch.setenv("LOCALLLM_TEMPLATE_MAX_STEPS", "1_000")
    monkeypatch.setenv("LOCALLLM_TEMPLATE_MAX_OUTPUT", "123456")
    assert TemplateLimits() == TemplateLimits(timeout=0.5, max_steps=1000, max_output=123_456)
    assert TemplateLimits(max_steps=5).max_steps == 5  # an explicit value wins
    with pytest.raises(TemplateError, match="step limit of 1,000 steps"):
        load_template(NESTED_JINJA).render(USER)  # read at render time


@pytest.mark.fast
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LOCALLLM_TEMPLATE_TIMEOUT", "soon"),
        ("LOCALLLM_TEMPLATE_TIMEOUT", "0"),
        ("LOCALLLM_TEMPLATE_TIMEOUT", "nan"),
        ("LOCALLLM_TEMPLATE_MAX_STEPS", "1.5"),
        ("LOCALLLM_TEMPLATE_MAX_STEPS", "-3"),
        ("LOCALLLM_TEMPLATE_MAX_OUTPUT", "8MiB"),
    ],
)
def test_bad_environment_values_are_invalid_options(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidOptions, match=f"{variable} must be a positive .*got '{value}'"):
        TemplateLimits()


@pytest.mark.fast
@pytest.mark.parametrize("arguments", [{"timeout": 0}, {"max_steps": 1.5}, {"max_output": -1}, {"max_steps": True}])
def test_bad_limits_are_invalid_options(arguments: dict[str, Any]) -> None:
    with pytest.raises(InvalidOptions, match="TemplateLimits"):
        TemplateLimits(**arguments)


# --------------------------------------------------------------------------------------------------------------------
# End to end on the real model: a hostile template never stalls the event loop (it renders in a worker thread)


@pytest.fixture
def render_threads(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads requests' templates render in. The event loop's thread must never be one of them: a
    render runs until its limits stop it, and the loop would stall for as long (shown by thread, not timed)."""
    threads: list[threading.Thread] = []
    prepare = chat_prompt.prepare_chat

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return prepare(*args, **kwargs)

    monkeypatch.setattr(chat_prompt, "prepare_chat", recording)
    return threads


async def test_hostile_request_templates_never_stall_the_event_loop(
    smollm2_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, render_threads: list[threading.Thread]
) -> None:
    model = str(smollm2_path)
    async with Engine(home) as engine:
        for hostile in (NESTED_JINJA, NESTED_GO):  # under the default limits
            with pytest.raises(TemplateError, match=r"(step|time) limit"):
                await engine.generate(model, "hi", template=hostile)

        monkeypatch.setenv("LOCALLLM_TEMPLATE_TIMEOUT", "0.3")
        monkeypatch.setenv("LOCALLLM_TEMPLATE_MAX_STEPS", str(10**12))
        with pytest.raises(TemplateError, match=r"time limit of 0\.3 seconds"):
            await engine.generate(model, "hi", template=NESTED_JINJA)

        reply = await engine.generate(model, "hi", template=SMOLLM2, options={"temperature": 0, "num_predict": 2})
        assert reply.done
    assert len(render_threads) == 4 and threading.current_thread() not in render_threads


async def test_hostile_modelfile_template_never_stalls_chat(
    smollm2_path: Path, home: Path, tmp_path: Path, render_threads: list[threading.Thread]
) -> None:
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f'FROM {smollm2_path}\nTEMPLATE """{NESTED_JINJA}"""\n')
    async with Engine(home) as engine:
        await engine.create("hostile", modelfile=modelfile)
        with pytest.raises(TemplateError, match=r"(step|time) limit"):
            await engine.chat("hostile", USER)
        assert (await engine.ps()).models == []  # refused before a runner was leased
    assert render_threads and threading.current_thread() not in render_threads

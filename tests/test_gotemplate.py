"""Ollama Go templates: the language, Ollama's rendering rules, and the stock templates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from localllm.chat import TemplateLimits
from localllm.chat.gotemplate import GoTemplate, go_format_float, go_json
from localllm.errors import TemplateError

pytestmark = pytest.mark.fast

# -- the template texts (data: Ollama's template/*.gotmpl and library templates) ---------------------------------------

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

LLAMA3_INSTRUCT = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

MISTRAL_INSTRUCT = """[INST] {{ range $index, $_ := .Messages }}
{{- if eq .Role "system" }}{{ .Content }}

{{ else if eq .Role "user" }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>[INST] {{ end }}
{{- end }}"""

GEMMA_INSTRUCT = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}
{{- if not $system }}{{ $system = .Content }}
{{- else }}{{ $system = printf "%s\\n\\n%s" $system .Content }}
{{- end }}
{{- continue }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{- if $system }}
{{ $system }}
{{- $system = "" }}
{{- end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{- end }}
{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""

PHI3 = """{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
"""

QWEN_TOOLS = """{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
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

MISTRAL_TOOLS = """{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and $.Tools (le (len (slice $.Messages $index)) 2) }}[AVAILABLE_TOOLS] {{ $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}</s>
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}}[/TOOL_RESULTS]
{{- end }}
{{- end }}"""

# -- conversations -------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hello, how are you?"}]
USER_ASSISTANT_USER = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]
SYSTEM_USER_ASSISTANT_USER = [{"role": "system", "content": "You are a helpful assistant."}, *USER_ASSISTANT_USER]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": "22C", "tool_name": "get_weather"},
]

# Expected renderings, worked out from Go's text/template rules: `{{-`/`-}}` trim the adjacent
# whitespace, `range` repeats its body per message, and the text after the loop is the generation prompt.
EXPECTED: dict[tuple[str, str], str] = {
    ("chatml", "user"): "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", "user-assistant-user"): (
        "<|im_start|>user\nHello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n"
        "<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    ("chatml", "system-user-assistant-user"): (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n"
        "<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    ("llama3-instruct", "user"): (
        "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("llama3-instruct", "user-assistant-user"): (
        "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("llama3-instruct", "system-user-assistant-user"): (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello, how are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI'm doing great. How can I help you today?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nI'd like to show off how chat templating works!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    ("mistral-instruct", "user"): "[INST] Hello, how are you?[/INST]",
    ("mistral-instruct", "user-assistant-user"): (
        "[INST] Hello, how are you?[/INST] I'm doing great. How can I help you today?</s>"
        "[INST] I'd like to show off how chat templating works![/INST]"
    ),
    ("mistral-instruct", "system-user-assistant-user"): (
        "[INST] You are a helpful assistant.\n\nHello, how are you?[/INST] "
        "I'm doing great. How can I help you today?</s>"
        "[INST] I'd like to show off how chat templating works![/INST]"
    ),
    ("gemma-instruct", "user"): "<start_of_turn>user\nHello, how are you?<end_of_turn>\n<start_of_turn>model\n",
    ("gemma-instruct", "user-assistant-user"): (
        "<start_of_turn>user\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    ("gemma-instruct", "system-user-assistant-user"): (
        "<start_of_turn>user\nYou are a helpful assistant.\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\nI'm doing great. How can I help you today?<end_of_turn>\n"
        "<start_of_turn>user\nI'd like to show off how chat templating works!<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    ("phi-3", "user"): "<|user|>\nHello, how are you?<|end|>\n<|assistant|>\n",
    ("phi-3", "user-assistant-user"): (
        "<|user|>\nHello, how are you?<|end|>\n"
        "<|assistant|>\nI'm doing great. How can I help you today?<|end|>\n"
        "<|user|>\nI'd like to show off how chat templating works!<|end|>\n"
        "<|assistant|>\n"
    ),
    ("phi-3", "system-user-assistant-user"): (
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nHello, how are you?<|end|>\n"
        "<|assistant|>\nI'm doing great. How can I help you today?<|end|>\n"
        "<|user|>\nI'd like to show off how chat templating works!<|end|>\n"
        "<|assistant|>\n"
    ),
}
TEMPLATES = {
    "chatml": CHATML,
    "llama3-instruct": LLAMA3_INSTRUCT,
    "mistral-instruct": MISTRAL_INSTRUCT,
    "gemma-instruct": GEMMA_INSTRUCT,
    "phi-3": PHI3,
}
CONVERSATIONS = {
    "user": USER,
    "user-assistant-user": USER_ASSISTANT_USER,
    "system-user-assistant-user": SYSTEM_USER_ASSISTANT_USER,
}


def render(source: str, **values: Any) -> str:
    """Execute template text on a plain values map (with Ollama's empty `.Response`)."""
    return GoTemplate(source).execute({"Response": "", **values})


@pytest.mark.parametrize(("name", "conversation"), sorted(EXPECTED))
def test_stock_templates(name: str, conversation: str) -> None:
    rendered = GoTemplate(TEMPLATES[name]).render(CONVERSATIONS[conversation])
    assert rendered == EXPECTED[(name, conversation)]


def test_qwen_tools_conversation() -> None:
    tmpl = GoTemplate(QWEN_TOOLS)
    assert tmpl.supports_tools
    function_json = (
        '{"name":"get_weather","description":"Get the weather","parameters":{"type":"object",'
        '"required":["city"],"properties":{"city":{"type":"string","description":"The city"}}}}'
    )
    expected = (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": ' + function_json + "}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tmpl.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL]) == expected


def test_qwen_tools_without_tools_or_system() -> None:
    tmpl = GoTemplate(QWEN_TOOLS)
    assert tmpl.render(USER) == "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n"


def test_qwen_prefill_leaves_last_assistant_open() -> None:
    messages = [*USER, {"role": "assistant", "content": "Sure, "}]
    rendered = GoTemplate(QWEN_TOOLS).render(messages)
    assert rendered.endswith("<|im_start|>assistant\nSure, ")


def test_mistral_tools_conversation() -> None:
    tmpl = GoTemplate(MISTRAL_TOOLS)
    tools_json = (
        '[{"type":"function","function":{"name":"get_weather","description":"Get the weather",'
        '"parameters":{"type":"object","required":["city"],'
        '"properties":{"city":{"type":"string","description":"The city"}}}}}]'
    )
    # the tool list goes with a user message among the last two only
    first = tmpl.render(TOOL_CONVERSATION[1:2], tools=[WEATHER_TOOL])
    assert first == "[AVAILABLE_TOOLS] " + tools_json + "[/AVAILABLE_TOOLS][INST] Weather in Paris?[/INST]"
    later = tmpl.render(TOOL_CONVERSATION[1:], tools=[WEATHER_TOOL])
    assert later == (
        "[INST] Weather in Paris?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city":"Paris"}}]</s>'
        '[TOOL_RESULTS] {"content": 22C}[/TOOL_RESULTS]'
    )


def test_tool_call_tags() -> None:
    assert GoTemplate(QWEN_TOOLS).tool_call_tag() == "<tool_call>"
    assert GoTemplate(QWEN_TOOLS).tool_call_prefix() == "<tool_call>"
    assert GoTemplate(MISTRAL_TOOLS).tool_call_tag() == "[TOOL_CALLS] ["
    assert GoTemplate(CHATML).tool_call_tag() == "{"
    assert GoTemplate(CHATML).tool_call_prefix() is None
    bare = '{{ if .ToolCalls }}{{ range .ToolCalls }}{"name": "{{ .Function.Name }}"}{{ end }}{{ end }}'
    assert GoTemplate(bare).tool_call_tag() == "{"
    assert GoTemplate("{{if .ToolCalls}}\n [ {{range .ToolCalls}}{{ . }}{{end}}]{{end}}").tool_call_tag() == "["
    assert GoTemplate("{{if .ToolCalls}}```json\n{{end}}").tool_call_tag() == "```json"


def test_vars_and_capabilities() -> None:
    assert GoTemplate("{{ .Prompt }}").vars() == ["prompt", "response"]
    assert GoTemplate("{{ with .Tools }}{{ . }}{{ end }} {{ .System }} {{ .Prompt }}").vars() == [
        "prompt",
        "response",
        "system",
        "tools",
    ]
    assert GoTemplate("{{ range .Messages }}{{ .Role }} {{ .Content }}{{ end }}").vars() == [
        "content",
        "messages",
        "role",
    ]
    assert GoTemplate(QWEN_TOOLS).supports_tools
    assert not GoTemplate(CHATML).supports_tools
    fim = GoTemplate("{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{- else }}{{ .Prompt }}{{- end }}")
    assert fim.supports_suffix
    assert fim.render(USER) == "Hello, how are you?"
    assert fim.render_suffix("def add(", "return x") == "<PRE> def add( <SUF>return x <MID>"


# -- Ollama's rendering rules --------------------------------------------------------------------------------------


def test_system_messages_are_collected_and_consecutive_roles_merged() -> None:
    tmpl = GoTemplate("{{ .System }}|{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}")
    messages = [
        {"role": "system", "content": "A"},
        {"role": "system", "content": "B"},
        {"role": "user", "content": "u1"},
        {"role": "user", "content": "u2"},
        {"role": "tool", "content": "t1"},
        {"role": "tool", "content": "t2"},
    ]
    assert tmpl.render(messages) == "A\n\nB|[system:A\n\nB][user:u1\n\nu2][tool:t1][tool:t2]"


LEGACY = "{{ if .System }}S:{{ .System }}\n{{ end }}{{ if .Prompt }}U:{{ .Prompt }}\n{{ end }}A:{{ .Response }}\n"


def test_legacy_template_renders_turn_by_turn() -> None:
    rendered = GoTemplate(LEGACY).render(SYSTEM_USER_ASSISTANT_USER)
    assert rendered == (
        "S:You are a helpful assistant.\nU:Hello, how are you?\n"
        "A:I'm doing great. How can I help you today?\n"
        "U:I'd like to show off how chat templating works!\nA:"
    )


def test_legacy_template_continues_a_prefilled_answer() -> None:
    messages = [*USER, {"role": "assistant", "content": "My name is"}]
    assert GoTemplate("[INST] {{ .Prompt }}[/INST] {{ .Response }}").render(messages) == (
        "[INST] Hello, how are you?[/INST] My name is"
    )


def test_legacy_template_without_response_gets_one_appended() -> None:
    messages = [*USER_ASSISTANT_USER]
    rendered = GoTemplate("[INST] {{ .Prompt }}[/INST] ").render(messages)
    assert rendered == (
        "[INST] Hello, how are you?[/INST] I'm doing great. How can I help you today?"
        "[INST] I'd like to show off how chat templating works![/INST] "
    )


def test_think_values() -> None:
    tmpl = GoTemplate("{{ range .Messages }}{{ end }}{{ .Think }} {{ .IsThinkSet }} {{ .ThinkLevel }}")
    assert tmpl.render(USER) == "false false "
    assert tmpl.render(USER, think=True) == "true true "
    assert tmpl.render(USER, think=False) == "false true "
    assert tmpl.render(USER, think="high") == "true true high"


def test_message_fields_and_tool_call_values() -> None:
    tmpl = GoTemplate(
        "{{ range .Messages }}{{ .Role }}|{{ .ToolName }}|{{ .ToolCallID }}|{{ .Thinking }}|"
        "{{ range .ToolCalls }}{{ .ID }} {{ .Function.Index }} {{ .Function.Name }} {{ .Function.Arguments }} "
        "{{ json .Function.Arguments }} {{ range $k, $v := .Function.Arguments }}{{ $k }}={{ $v }};{{ end }}"
        "{{ end }}\n{{ end }}"
    )
    messages = [
        {
            "role": "assistant",
            "content": "",
            "thinking": "hmm",
            "tool_calls": [
                {"id": "call_x", "function": {"name": "f", "arguments": '{"b": 1.5, "a": "<&>"}', "index": 2}}
            ],
        },
        {"role": "tool", "content": "ok", "tool_name": "f", "tool_call_id": "call_x"},
    ]
    assert tmpl.render(messages) == (
        'assistant|||hmm|call_x 2 f {"a":"\\u003c\\u0026\\u003e","b":1.5} {"a":"\\u003c\\u0026\\u003e","b":1.5} '
        "a=<&>;b=1.5;\ntool|f|call_x||\n"
    )


def test_tool_properties_values() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "z": {"type": ["string", "null"], "description": "zed"},
                    "a": {"type": "integer", "enum": [1, 2], "minimum": 0},
                },
            },
        },
    }
    tmpl = GoTemplate(
        "{{ range .Messages }}{{ end }}{{ range .Tools }}{{ .Function.Parameters.Properties }}|"
        "{{ range $name, $p := .Function.Parameters.Properties }}{{ $name }}:{{ $p.Type }}:"
        "{{ toTypeScriptType $p }};{{ end }}{{ end }}"
    )
    assert tmpl.render(USER, tools=[tool]) == (
        '{"a":{"type":"integer","enum":[1,2]},"z":{"type":["string","null"],"description":"zed"}}|'
        "a:integer:number;z:[string null]:string | null;"
    )


def test_message_without_a_field_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"1:\d+: .*can't evaluate field Nope"):
        GoTemplate("{{ range .Messages }}{{ .Nope }}{{ end }}").render(USER)


# -- the language --------------------------------------------------------------------------------------------------


def test_trim_markers_and_comments() -> None:
    assert render("a  {{- 1 -}}  b") == "a1b"
    assert render("a {{- /* note */ -}} b") == "ab"
    assert render("a {{/* note */}} b") == "a  b"
    assert render("{{ -3 }}") == "-3"
    assert render("a\n\n{{- /* x */}}\n\nb") == "a\n\nb"


def test_missing_values_and_truthiness() -> None:
    assert render("{{ .Missing }}") == "<no value>"
    assert render("{{ print .Missing }}") == "<nil>"
    assert render("{{ if .Missing.Deeper }}y{{ else }}n{{ end }}") == "n"
    cases = [(0, "n"), (1, "y"), ("", "n"), ("x", "y"), ((), "n"), ((1,), "y"), (0.0, "n"), (False, "n"), (True, "y")]
    for value, want in cases:
        assert render("{{ if .V }}y{{ else }}n{{ end }}", V=value) == want, value
    assert render("{{ if .M }}y{{ else }}n{{ end }}", M={}) == "n"


def test_else_if_with_and_else_with() -> None:
    src = "{{ if eq .N 1 }}one{{ else if eq .N 2 }}two{{ else }}many{{ end }}"
    assert [render(src, N=n) for n in (1, 2, 3)] == ["one", "two", "many"]
    assert render("{{ with .A }}[{{ . }}]{{ else with .B }}({{ . }}){{ else }}none{{ end }}", A="", B="b") == "(b)"
    assert render("{{ with $x := .A }}{{ $x }}{{ . }}{{ end }}", A="a") == "aa"


def test_range_forms() -> None:
    assert render("{{ range $i, $v := .L }}{{ $i }}={{ $v }} {{ end }}", L=["a", "b"]) == "0=a 1=b "
    assert render("{{ range .L }}x{{ else }}empty{{ end }}", L=[]) == "empty"
    assert render("{{ range $k, $v := .M }}{{ $k }}{{ $v }}{{ end }}", M={"b": 2, "a": 1}) == "a1b2"
    assert render("{{ range 3 }}{{ . }}{{ end }}") == "012"
    skip_and_stop = (
        "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}{{ break }}{{ end }}{{ . }}{{ end }}"
    )
    assert render(skip_and_stop, L=[1, 2, 3, 4, 5]) == "13"
    assert render("{{ range .Missing }}x{{ else }}none{{ end }}") == "none"


def test_variables_scope_and_assignment() -> None:
    src = '{{ $x := "a" }}{{ if true }}{{ $x = "b" }}{{ $y := "c" }}{{ $y }}{{ end }}{{ $x }}'
    assert render(src) == "cb"
    assert render("{{ range $i, $m := .L }}{{ $.Top }}{{ $m }}{{ end }}", L=[1, 2], Top="t") == "t1t2"
    with pytest.raises(TemplateError, match="undefined variable"):
        GoTemplate("{{ if true }}{{ $y := 1 }}{{ end }}{{ $y }}")


def test_functions() -> None:
    comparisons = '{{ eq .S "a" "b" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ le 2 2 }} {{ gt "b" "a" }} {{ ge 1 2 }}'
    assert render(comparisons, S="b") == "true true true true true false"
    assert render('{{ and 1 0 2 }} {{ and 1 2 }} {{ or 0 "" }} {{ or 0 3 }} {{ not 0 }}') == "0 2  3 true"
    lookups = '{{ len .S }} {{ len .L }} {{ index .L 1 }} {{ index .M "k" }}'
    assert render(lookups, S="héllo", L=[1, 2], M={"k": 9}) == "6 2 2 9"
    assert render("{{ slice .L 1 }} {{ slice .S 1 3 }} {{ len (slice .L 0 1) }}", L=[1, 2, 3], S="abcd") == "[2 3] bc 1"
    assert render('{{ printf "%s=%d %q %v %5.2f|%-3s|" "a" 3 "q" .L 3.14159 "x" }}', L=[1, "b"]) == (
        'a=3 "q" [1 b]  3.14|x  |'
    )
    assert render('{{ print "a" 1 2 "b" }} {{ println 1 "x" }}') == "a1 2b 1 x\n"
    assert render("{{ json .V }}", V={"b": [1, 2.5, None, True], "a": "x\n<"}) == (
        '{"a":"x\\n\\u003c","b":[1,2.5,null,true]}'
    )
    assert render('{{ "abc" | len }} {{ .S | printf "%s!" }}', S="hi") == "3 hi!"
    assert render("{{ html .S }} {{ urlquery .S }}", S="<a&b>") == "&lt;a&amp;b&gt; %3Ca%26b%3E"


def test_comparison_errors() -> None:
    with pytest.raises(TemplateError, match="incompatible types for comparison"):
        render('{{ eq 1 "1" }}')
    with pytest.raises(TemplateError, match="index out of range"):
        render("{{ index .L 5 }}", L=[1])


def test_number_formatting_matches_go() -> None:
    assert go_format_float(3.0) == "3"
    assert go_format_float(2.5) == "2.5"
    assert go_format_float(1e6) == "1e+06"
    assert go_format_float(123456.0) == "123456"
    assert go_format_float(1e-5) == "1e-05"
    assert go_json(1e21) == "1e+21"
    assert go_json(1e-7) == "1e-7"
    assert go_json(100.0) == "100"
    assert go_json("\u2028") == '"\\u2028"'


def test_define_and_template() -> None:
    src = '{{ define "greet" }}Hi {{ . }}!{{ end }}{{ template "greet" .Name }}'
    assert render(src, Name="Ann") == "Hi Ann!"
    with pytest.raises(TemplateError, match="undefined template"):
        GoTemplate('{{define "x"}}{{template "x"}}{{end}}{{template "x"}}')


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ .Prompt ", "unclosed action"),
        ("hello\n  {{ nope }}", r"2:6: function 'nope' not defined"),
        ("{{ if .A }}x", "without {{end}}"),
        ("{{ end }}", "unexpected {{end}}"),
        ("{{ $x }}", "undefined variable"),
        ("{{ break }}", "outside {{range}}"),
        ('{{ "unterminated }}', "unterminated quoted string"),
        ("{{ (1 }}", "unclosed left paren"),
        ("{{ .A | 1 }}", "non executable command"),
        ("{{/* x */ 1 }}", "comment ends before closing delimiter"),
    ],
)
def test_parse_errors_name_the_position(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        GoTemplate(source)


def test_execution_is_bounded() -> None:
    with pytest.raises(TemplateError, match="steps"):
        GoTemplate("{{ range 1000000000 }}{{ end }}", limits=TemplateLimits(max_steps=10_000)).execute({})
    with pytest.raises(TemplateError, match="steps"):
        nested = "{{ range 100 }}{{ range 100 }}{{ range 100 }}{{ end }}{{ end }}{{ end }}"
        GoTemplate(nested, limits=TemplateLimits(max_steps=10_000)).execute({})
    with pytest.raises(TemplateError, match="output limit"):
        many = "{{ range 100 }}{{ range 100 }}xxxxxxxxxx{{ end }}{{ end }}"
        GoTemplate(many, limits=TemplateLimits(max_output=5_000)).execute({})
    recursive = '{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}'
    with pytest.raises(TemplateError, match="depth"):
        GoTemplate(recursive).execute({})


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(TemplateError):
        GoTemplate("{{ if 1 }}" * 500 + "{{ end }}" * 500)
    with pytest.raises(TemplateError):
        GoTemplate("{{ " + "(" * 500 + "1" + ")" * 500 + " }}")


def test_messages_accept_message_objects() -> None:
    from localllm.types import Message

    messages = [Message(role="user", content="hi")]
    assert GoTemplate(CHATML).render(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tools_json_for_template_roundtrips() -> None:
    out = GoTemplate("{{ range .Messages }}{{ end }}{{ .Tools }}").render(USER, tools=[WEATHER_TOOL])
    data = json.loads(out)
    assert data[0]["function"]["name"] == "get_weather"
    assert data[0]["function"]["parameters"]["required"] == ["city"]

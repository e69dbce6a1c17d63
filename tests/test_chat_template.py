"""Choosing and rendering chat templates: Go, Jinja and the plain fallback."""

from __future__ import annotations

import pytest

from localllm.chat.gotemplate import GoTemplate
from localllm.chat.template import JinjaTemplate, PlainTemplate, is_go_template, load_template
from localllm.errors import TemplateError

pytestmark = pytest.mark.fast

CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_GO = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("source", "go"),
    [
        ("{{ .Prompt }}", True),
        ("{{- range .Messages }}{{ .Content }}{{ end }}", True),
        ("{{ if .System }}{{ .System }}{{ end }}", True),
        ("{{- $x := 1 }}{{ $x }}", True),
        ("{{/* a comment */}}{{ .Prompt }}", True),
        (CHATML_JINJA, False),
        ("{{ bos_token }}{{ messages[0]['content'] }}", False),
        ("{%- if tools %}x{% endif %}{{ .Prompt }}", False),
        ("plain text", False),
    ],
)
def test_is_go_template(source: str, go: bool) -> None:
    assert is_go_template(source) is go


def test_load_template_picks_the_kind() -> None:
    assert isinstance(load_template(CHATML_GO), GoTemplate)
    jinja = load_template(CHATML_JINJA, bos_token="<s>", eos_token="</s>")
    assert isinstance(jinja, JinjaTemplate)
    assert jinja.bos_token == "<s>"
    assert isinstance(load_template(""), PlainTemplate)
    assert isinstance(load_template(None), PlainTemplate)


def test_go_and_jinja_chatml_render_alike() -> None:
    go = load_template(CHATML_GO).render(MESSAGES)
    jinja = load_template(CHATML_JINJA).render(MESSAGES, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert go == jinja == expected


def test_plain_template_joins_the_text() -> None:
    assert PlainTemplate().render(MESSAGES) == "Be brief.\n\nHi"


def test_bad_templates_raise_template_error() -> None:
    with pytest.raises(TemplateError):
        load_template("{{ .Prompt ")
    with pytest.raises(TemplateError):
        load_template("{% for x in %}")
    with pytest.raises(TemplateError, match="raised"):
        load_template("{{ raise_exception('no') }}{% if true %}{% endif %}").render(MESSAGES)


def test_jinja_sandbox_blocks_attribute_escapes() -> None:
    tmpl = load_template("{{ ''.__class__.__mro__ }}{% if true %}{% endif %}")
    with pytest.raises(TemplateError):
        tmpl.render(MESSAGES)


def test_capabilities_are_reported() -> None:
    assert not load_template(CHATML_GO).supports_tools
    assert load_template("{{ range .Messages }}{{ end }}{{ if .Tools }}{{ .Tools }}{{ end }}").supports_tools
    assert load_template("{% if tools %}{{ tools | tojson }}{% endif %}").supports_tools


def test_thinking_tags_and_tool_prefix_on_every_kind() -> None:
    jinja = load_template("{% for m in messages %}<think>{{ m.thinking }}</think>{{ m.content }}{% endfor %}")
    assert jinja.thinking_tags() == ("<think>", "</think>")
    assert jinja.tool_call_prefix() is None
    assert load_template(CHATML_GO).thinking_tags() is None
    assert PlainTemplate().thinking_tags() is None
    go_tools = load_template("{{ range .Messages }}{{ if .ToolCalls }}<tool_call>{{ end }}{{ end }}")
    assert go_tools.tool_call_prefix() == "<tool_call>"

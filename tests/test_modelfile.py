"""Modelfile parsing and formatting."""

from __future__ import annotations

import random

import pytest

from localllm.errors import ModelfileError
from localllm.registry.modelfile import Instruction, Modelfile, format_value, parse

pytestmark = pytest.mark.fast

FULL = '''
# A Modelfile using every instruction
FROM ./SmolLM2-135M-Instruct.Q4_1.gguf
from ./mmproj.gguf
PARAMETER temperature 0.7
parameter num_ctx 2048
PARAMETER stop "<|im_end|>"
PARAMETER stop <|endoftext|>
PARAMETER use_mmap false
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}<|im_start|>user
{{ .Prompt }}<|im_end|>
<|im_start|>assistant
"""
System "You are a pirate. Say \\"arr\\"."
ADAPTER ./lora.gguf
LICENSE """MIT License

Copyright (c) someone"""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
message system "  keep my spaces  "
REQUIRES 0.5.1
'''


def test_every_instruction() -> None:
    mf = parse(FULL)
    assert mf.from_ == "./SmolLM2-135M-Instruct.Q4_1.gguf"
    assert mf.froms == ("./SmolLM2-135M-Instruct.Q4_1.gguf", "./mmproj.gguf")
    assert mf.parameters == {
        "temperature": 0.7,
        "num_ctx": 2048,
        "stop": ["<|im_end|>", "<|endoftext|>"],
        "use_mmap": False,
    }
    assert isinstance(mf.parameters["num_ctx"], int)
    assert mf.template == (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n"
        "{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert mf.system == 'You are a pirate. Say \\"arr\\".'
    assert mf.adapters == ("./lora.gguf",)
    assert mf.licenses == ("MIT License\n\nCopyright (c) someone",)
    assert mf.messages == (
        {"role": "user", "content": "Is Toronto in Canada?"},
        {"role": "assistant", "content": "yes"},
        {"role": "system", "content": "  keep my spaces  "},
    )
    assert mf.requires == "0.5.1"
    lines = {i.name: i.line for i in mf.instructions}
    assert lines["template"] == 10 and lines["requires"] == 24


def test_roundtrip_of_the_full_example() -> None:
    mf = parse(FULL)
    text = mf.format()
    again = parse(text)
    assert again == mf
    assert again.format() == text


def test_comments_blank_lines_bom_and_crlf() -> None:
    mf = parse("\ufeff# c\r\n\r\n   # indented comment\r\nFROM llama3 \r\nSYSTEM hi # not a comment\r\n")
    assert mf.from_ == "llama3"
    assert mf.system == "hi # not a comment"


def test_quoted_values_keep_inner_lines_verbatim() -> None:
    mf = parse('FROM x\nTEMPLATE """\n# not a comment\n  indented\n\nFROM not-an-instruction\n"""\n')
    assert mf.template == "\n# not a comment\n  indented\n\nFROM not-an-instruction\n"
    assert mf.froms == ("x",)


def test_single_quotes_may_span_lines_too() -> None:
    assert parse('FROM x\nSYSTEM "line one\nline two"\n').system == "line one\nline two"


def test_empty_quoted_value() -> None:
    assert parse('FROM x\nSYSTEM ""').system == ""
    assert parse('FROM x\nTEMPLATE """"""').template == ""


def test_later_template_and_system_win() -> None:
    mf = parse("FROM x\nSYSTEM a\nSYSTEM b\nTEMPLATE t1\nTEMPLATE t2")
    assert (mf.system, mf.template) == ("b", "t2")


def test_no_from_is_allowed_by_the_parser() -> None:
    assert parse("SYSTEM hi").from_ is None


def test_deprecated_parameter_warns_and_is_dropped() -> None:
    with pytest.warns(UserWarning, match="mirostat"):
        mf = parse("FROM x\nPARAMETER mirostat 2\nPARAMETER top_k 10")
    assert mf.parameters == {"top_k": 10}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("FROM x\nFORM y", 2, "unknown instruction 'FORM'"),
        ("FROM x\n\nPARAMETER nonsense 1", 3, "unknown parameter 'nonsense'"),
        ("FROM x\nPARAMETER temperature hot", 2, "temperature"),
        ("FROM x\nPARAMETER num_ctx 2.5", 2, "num_ctx"),
        ("FROM x\nPARAMETER use_mmap maybe", 2, "use_mmap"),
        ("FROM x\nPARAMETER temperature", 2, "PARAMETER needs a name and a value"),
        ("FROM x\nMESSAGE tool hello", 2, "message role"),
        ("FROM x\nMESSAGE user", 2, "MESSAGE needs a role"),
        ("FROM", 1, "FROM needs a value"),
        ("FROM x\nSYSTEM", 2, "SYSTEM needs a value"),
        ('FROM x\nSYSTEM """never closed\nstill going', 2, "never closed"),
        ('FROM x\nTEMPLATE "unterminated', 2, "never closed"),
        ("FROM x\nREQUIRES soon", 2, "REQUIRES"),
        ("FROM x\n!bang", 2, "not an instruction"),
        ("FROM x\nDRAFT ./d.gguf", 2, "unknown instruction 'DRAFT'"),
    ],
)
def test_errors_name_the_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ModelfileError) as info:
        parse(text)
    message = str(info.value)
    assert f"line {line}:" in message
    assert words in message, message
    assert info.value.line == line  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "value",
    ["plain", "", " lead", "trail ", "a\nb", 'say "hi"', '"', '"quoted"', 'multi\nline with "quotes"\n', "# hash"],
)
def test_format_value_reads_back(value: str) -> None:
    mf = Modelfile((Instruction("from", "m"), Instruction("system", value)))
    assert parse(mf.format()).system == value


def test_unwritable_value_is_an_error() -> None:
    with pytest.raises(ModelfileError):
        format_value('a"""\nb"\nc')


def test_build_and_format_like_ollama() -> None:
    mf = Modelfile.build(
        from_="/models/blobs/sha256-abc",
        template="{{ .Prompt }}",
        system="Be brief.",
        parameters={"stop": ["<|im_end|>", "</s>"], "temperature": 0.7, "num_ctx": 4096.0, "use_mmap": True},
        messages=[{"role": "user", "content": "hi"}],
        licenses=["MIT"],
    )
    assert mf.format() == (
        "FROM /models/blobs/sha256-abc\n"
        "TEMPLATE {{ .Prompt }}\n"
        "SYSTEM Be brief.\n"
        "PARAMETER stop <|im_end|>\n"
        "PARAMETER stop </s>\n"
        "PARAMETER temperature 0.7\n"
        "PARAMETER num_ctx 4096\n"
        "PARAMETER use_mmap true\n"
        "LICENSE MIT\n"
        "MESSAGE user hi\n"
    )
    assert parse(mf.format()) == mf


_PIECES = ["a", "Z", " ", "  ", "\n", '"', '"""', "#", "{{ .Prompt }}", "é", "\t", "x y", "<|im_end|>", "\\"]
_PARAMS = [("temperature", "0.5"), ("top_k", "7"), ("stop", None), ("seed", "-1"), ("penalize_newline", "true")]


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 7)))


def test_generated_roundtrips() -> None:
    rng = random.Random(42)
    checked = 0
    for _ in range(400):
        instructions: list[Instruction] = [Instruction("from", rng.choice(["llama3", "./m.gguf", "hf.co/a/b:Q4"]))]
        for _ in range(rng.randint(0, 6)):
            kind = rng.choice(["template", "system", "license", "message", "parameter", "adapter"])
            if kind == "message":
                instructions.append(Instruction("message", _random_text(rng), key=rng.choice(["user", "assistant"])))
            elif kind == "parameter":
                key, value = rng.choice(_PARAMS)
                if value is None:
                    value = _random_text(rng) or "</s>"
                instructions.append(Instruction("parameter", value, key=key))
            elif kind == "adapter":
                instructions.append(Instruction("adapter", rng.choice(["./a.gguf", "lora one.gguf"])))
            else:
                instructions.append(Instruction(kind, _random_text(rng)))
        mf = Modelfile(tuple(instructions))
        try:
            text = mf.format()
        except ModelfileError:
            continue  # a value with lines ending in quotes cannot be written; that is reported, not garbled
        assert parse(text) == mf, text
        checked += 1
    assert checked > 300

"""gpt-oss's harmony format: the prompt as Ollama writes it, replies split into thinking, content and calls,
and the models that use it (a Modelfile's `RENDERER`/`PARSER harmony`, or a template in harmony's markers)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from localllm import Engine
from localllm.chat.harmony import HarmonyParser, HarmonyTemplate, render_harmony, select_harmony, uses_harmony
from localllm.chat.prompt import prepare_chat
from localllm.chat.template import load_template
from localllm.chat.tools import ChatOutputParser

DAY = dt.date(2025, 8, 5)
SYSTEM = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05"
)
CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The unit"},
                "city": {"type": "string"},
                "days": {"type": ["integer", "null"]},
            },
        },
    },
}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


# --------------------------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.fast
def test_a_plain_conversation_reasons_at_medium_and_ends_with_the_assistants_start() -> None:
    prompt = render_harmony([{"role": "user", "content": "Hi"}], today=DAY)
    assert prompt == (
        f"{SYSTEM}\n\nReasoning: medium\n\n{CHANNELS}<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


@pytest.mark.fast
@pytest.mark.parametrize(
    ("think", "reasoning"),
    [(None, "\n\nReasoning: medium"), (True, "\n\nReasoning: medium"), (False, ""), ("low", "\n\nReasoning: low"),
     ("high", "\n\nReasoning: high"), ("max", "\n\nReasoning: high")],
)  # fmt: skip
def test_think_sets_the_reasoning_level(think: Any, reasoning: str) -> None:
    prompt = render_harmony([{"role": "user", "content": "Hi"}], think=think, today=DAY)
    assert prompt.startswith(f"{SYSTEM}{reasoning}\n\n{CHANNELS}<|end|>")


@pytest.mark.fast
def test_system_messages_become_the_developer_instructions() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
    ]
    assert render_harmony(messages, think=False, today=DAY) == (
        f"{SYSTEM}\n\n{CHANNELS}<|end|>"
        # Without tools the instructions keep the blank line that would follow them, as in Ollama's gpt-oss template.
        "<|start|>developer<|message|>\n\n# Instructions\n\nBe brief.\n\nAnswer in French.<|end|>"
        "<|start|>user<|message|>Hi<|end|><|start|>assistant"
    )


@pytest.mark.fast
def test_tools_are_a_typescript_namespace_in_the_developer_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    assert render_harmony(messages, tools=[WEATHER, NOW], think="low", today=DAY) == (
        f"{SYSTEM}\n\nReasoning: low\n\n{CHANNELS}\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Get the current weather\ntype get_weather = (_: {\n  city: string,\n  days: number | null,\n"
        "  // The unit\n  unit: string,\n}) => any;\n\n"
        "type now = () => any;\n\n} // namespace functions\n\n# Instructions\n\nBe brief.<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant"
    )


@pytest.mark.fast
def test_tool_calls_and_results_and_thinking_only_after_the_last_user_message() -> None:
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "thinking": "A greeting.", "content": "Hi!"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "thinking": "I need the weather.",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"unit": "celsius", "city": "Paris"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "21 degrees"},
    ]
    assert render_harmony(messages, tools=[NOW], today=DAY) == (
        f"{SYSTEM}\n\nReasoning: medium\n\n{CHANNELS}\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "type now = () => any;\n\n} // namespace functions<|end|>"
        "<|start|>user<|message|>Hello<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hi!<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>I need the weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city":"Paris","unit":"celsius"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|message|>21 degrees<|end|>"
        "<|start|>assistant"
    )


@pytest.mark.fast
def test_a_last_assistant_message_is_continued() -> None:
    user = {"role": "user", "content": "Hi"}
    head = f"{SYSTEM}\n\nReasoning: medium\n\n{CHANNELS}<|end|><|start|>user<|message|>Hi<|end|>"
    content = render_harmony([user, {"role": "assistant", "content": "Hel"}], today=DAY)
    assert content == head + "<|start|>assistant<|channel|>final<|message|>Hel"
    thinking = render_harmony([user, {"role": "assistant", "thinking": "The user"}], today=DAY)
    assert thinking == head + "<|start|>assistant<|channel|>analysis<|message|>The user"


# --------------------------------------------------------------------------------------------------------------------
# Parsing


def _parse_split(stream: str, at: int, parser: HarmonyParser | None = None) -> tuple[str, str, list[Any]]:
    parser = parser or HarmonyParser()
    thinking, content, calls = "", "", []
    for piece in (stream[:at], stream[at:]):
        t, c, k = parser.feed(piece)
        thinking, content, calls = thinking + t, content + c, calls + k
    t, c, k = parser.finish()
    return thinking + t, content + c, [(call.function.name, call.function.arguments) for call in calls + k]


def _parse_every_way(stream: str, parser_for: Any = HarmonyParser) -> tuple[str, str, list[Any]]:
    """The stream split at every position, and fed a character at a time: all must read the same."""
    results = {repr(_parse_split(stream, at, parser_for())) for at in range(len(stream) + 1)}
    one_by_one = parser_for()
    thinking, content, calls = "", "", []
    for char in stream:
        t, c, k = one_by_one.feed(char)
        thinking, content, calls = thinking + t, content + c, calls + k
    t, c, k = one_by_one.finish()
    whole = (thinking + t, content + c, [(call.function.name, call.function.arguments) for call in calls + k])
    results.add(repr(whole))
    assert len(results) == 1, results
    return whole


@pytest.mark.fast
def test_analysis_is_thinking_and_final_is_content() -> None:
    stream = "<|channel|>analysis<|message|>The user greets.<|end|><|start|>assistant<|channel|>final<|message|>Hello!"
    assert _parse_every_way(stream) == ("The user greets.", "Hello!", [])
    assert _parse_every_way(stream + "<|return|>") == ("The user greets.", "Hello!", [])


@pytest.mark.fast
def test_a_commentary_message_to_a_function_is_a_tool_call() -> None:
    stream = (
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
    )
    expected = ("Need the weather.", "", [("get_weather", {"city": "Paris"})])
    assert _parse_every_way(stream) == expected  # the runner stops at <|call|> and leaves it out
    assert _parse_every_way(stream + "<|call|>") == expected


@pytest.mark.fast
def test_the_recipient_may_come_before_the_channel_and_calls_are_numbered() -> None:
    stream = (
        "<|channel|>commentary to=functions.now<|message|>{}<|call|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>[{"city": "Oslo"}]<|call|>'
    )
    parser = HarmonyParser()
    _, _, calls = parser.feed(stream)
    assert [(c.function.name, c.function.arguments, c.function.index) for c in calls] == [
        ("now", {}, 0),
        ("get_weather", {"city": "Oslo"}, 1),
    ]
    assert all(c.id.startswith("call_") for c in calls)


@pytest.mark.fast
def test_commentary_to_no_one_is_content_and_bad_arguments_stay_text() -> None:
    assert _parse_every_way("<|channel|>commentary<|message|>Looking it up.") == ("", "Looking it up.", [])
    stream = "<|channel|>commentary to=functions.now <|constrain|>json<|message|>{not json"
    assert _parse_every_way(stream) == ("", "{not json", [])


@pytest.mark.fast
def test_a_continued_message_is_read_in_its_channel() -> None:
    def continued() -> HarmonyParser:
        return HarmonyParser("<|start|>assistant<|channel|>analysis<|message|>")

    assert _parse_every_way("still thinking<|end|><|start|>assistant<|channel|>final<|message|>Done", continued) == (
        "still thinking",
        "Done",
        [],
    )


# --------------------------------------------------------------------------------------------------------------------
# Which models use it


# A Go template of a harmony model: harmony's markers in it are how it is recognised.
HARMONY_GO_TEMPLATE = (
    "{{ range .Messages }}<|start|>{{ .Role }}<|message|>{{ .Content }}<|end|>{{ end }}<|start|>assistant"
    "{{ if .Tools }}{{ end }}{{ if .Think }}{{ end }}"
)
CHATML_TEMPLATE = (
    "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


@pytest.mark.fast
def test_a_template_in_harmony_markers_is_read_as_harmony() -> None:
    harmony = load_template(HARMONY_GO_TEMPLATE.replace("<|message|>", "<|channel|>final<|message|>"))
    assert uses_harmony(harmony) and not uses_harmony(load_template(CHATML_TEMPLATE))
    messages = [{"role": "user", "content": "Hi"}]
    prepared = prepare_chat(harmony, messages, tools=[WEATHER], tool_choice="required", think="max")
    assert prepared.prompt == harmony.render(messages, tools=[WEATHER], think="high")  # the template renders
    assert isinstance(prepared.parser(), HarmonyParser) and prepared.grammar is None  # calls are in their channel
    assert isinstance(prepare_chat(load_template(CHATML_TEMPLATE), messages).parser(), ChatOutputParser)


@pytest.mark.fast
def test_a_modelfiles_renderer_and_parser_choose_harmony() -> None:
    chatml = load_template(CHATML_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert select_harmony(chatml, renderer=None, parser=None) is chatml
    assert select_harmony(chatml, renderer="qwen3-coder", parser=None) is chatml

    rendered = prepare_chat(select_harmony(chatml, renderer="harmony", parser="harmony"), messages, think=True)
    assert rendered.prompt == render_harmony(messages, think=True)
    assert isinstance(rendered.parser(), HarmonyParser)

    parsed_only = prepare_chat(select_harmony(chatml, renderer=None, parser="harmony"), messages)
    assert parsed_only.prompt == chatml.render(messages)  # the model's own template writes the prompt
    assert isinstance(parsed_only.parser(), HarmonyParser)


@pytest.mark.fast
def test_a_long_conversation_is_cut_to_fit_keeping_the_system_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(20):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    full = render_harmony(messages)
    prepared = prepare_chat(HarmonyTemplate(), messages, fits=lambda prompt: len(prompt) < len(full) // 2)
    assert len(prepared.prompt) < len(full) // 2
    assert "# Instructions\n\nBe brief." in prepared.prompt and "question 0<" not in prepared.prompt
    assert prepared.prompt.endswith("<|start|>user<|message|>last question<|end|><|start|>assistant")


async def test_a_model_created_with_renderer_harmony_prompts_and_thinks_in_harmony(
    smollm2_path: Path, home: Path, tmp_path: Path
) -> None:
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {smollm2_path}\nRENDERER harmony\nPARSER harmony\nPARAMETER temperature 0\n")
    messages = [{"role": "user", "content": "Say hi"}]
    async with Engine(home) as engine:
        await engine.create("smollm2-harmony", modelfile=modelfile)
        # SmolLM2's own template cannot think; the harmony renderer can, at any level.
        reply = await engine.chat("smollm2-harmony", messages, think="high", options={"num_predict": 4})
    vocab = llama_cpp.Llama(model_path=str(smollm2_path), vocab_only=True, verbose=False)
    harmony_prompt = render_harmony(messages, think="high")
    assert reply.prompt_eval_count == len(vocab.tokenize(harmony_prompt.encode(), add_bos=True, special=True))


@pytest.mark.fast
def test_a_structured_reply_is_written_in_the_final_message() -> None:
    messages = [{"role": "user", "content": "A city as JSON"}]
    prepared = prepare_chat(HarmonyTemplate(), messages, format="json")
    # The grammar leaves no room for a header, so the prompt opens the final message itself.
    assert prepared.grammar is not None
    assert prepared.prompt == render_harmony(messages) + "<|channel|>final<|message|>"
    assert _parse_every_way('{"city": "Paris"}', prepared.parser) == ("", '{"city": "Paris"}', [])

    thinking = [*messages, {"role": "assistant", "thinking": "A famous one"}]
    closed = prepare_chat(HarmonyTemplate(), thinking, format="json")
    assert closed.prompt.endswith(
        "<|channel|>analysis<|message|>A famous one<|end|><|start|>assistant<|channel|>final<|message|>"
    )
